"""``troupe deploy`` and ``troupe chat``: run the Serve app per environment on a local Ray cluster.

Applications are deployed declaratively (a ``ServeDeploySchema``, the same shape as a RayService's
``serveConfigV2``): one application per environment named ``troupe-<env>`` at ``/<env>``, import path
``serving.app:build_app``. Declarative deploys keep model replicas running when only the Router's
``user_config`` (the canary weight) changes, which is what :mod:`troupe.rollout` relies on.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import click

from troupe.cli import step_options
from troupe.config import ConfigError, path_of, section

IMPORT_PATH = "serving.app:build_app"
ALIASES = {"test": "challenger", "production": "champion"}


def app_name(env: str) -> str:
    """Serve application name of an environment (``troupe-test``, ``troupe-production``)."""
    return f"troupe-{env}"


def serving_config_path(env: str) -> Path:
    """``configs/serving/<env>.yaml`` (ConfigError when the environment has no config)."""
    from serving.app import CONFIG_DIR

    p = CONFIG_DIR / f"{env}.yaml"
    if not p.is_file():
        raise ConfigError(f"{p}: no serving config for env {env!r}")
    return p


def characters_path(params: dict[str, Any]) -> str | None:
    """First existing characters.jsonl: paths.splits, paths.validated, then data/sample (absolute)."""
    paths = params.get("paths", {})
    cands = [Path(paths[k]) / "characters.jsonl" for k in ("splits", "validated") if k in paths]
    cands.append(Path("data/sample/characters.jsonl"))
    for c in cands:
        if c.is_file():
            return str(c.resolve())
    return None


def app_config(
    env: str,
    params: dict[str, Any],
    *,
    model_uri: str | None = None,
    canary_uri: str | None = None,
    canary_weight: float = 0.0,
    extra_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``ServeDeploySchema`` application entry for ``env``.

    Args:
        env: ``test`` or ``production`` (selects ``configs/serving/<env>.yaml``).
        params: params.yaml dict (``registry.model_name``, ``paths``).
        model_uri: stable model override (local dir or ``models:/name@alias``); default
            ``models:/<model_name>@challenger`` for test, ``@champion`` for production.
        canary_uri: canary model (production rollout), None for no canary.
        canary_weight: initial canary share in percent (the Router's ``user_config``).
        extra_args: more ``build_app`` args (serving-config overrides).

    Returns:
        ``{name, route_prefix, import_path, args, deployments, runtime_env}``.
    """
    import yaml

    cfg = yaml.safe_load(serving_config_path(env).read_text(encoding="utf-8")) or {}
    reg = params.get("registry", {})
    name = reg.get("model_name", cfg.get("model_name", "troupe-roleplay"))
    from troupe.tracking import tracking_uri

    tracking = reg.get("tracking_uri") or tracking_uri()
    args: dict[str, Any] = {
        "env": env,
        "model_name": name,
        "mlflow_tracking_uri": tracking,
        "stable_alias": ALIASES.get(env, "champion"),
        "canary_alias": "",
        "canary_weight": float(canary_weight),
        "route_prefix": cfg.get("route_prefix", f"/{env}"),
    }
    if model_uri:
        args["stable_model_uri"] = str(Path(model_uri).resolve()) if Path(model_uri).is_dir() else model_uri
    if canary_uri:
        args["canary_model_uri"] = (
            str(Path(canary_uri).resolve()) if Path(canary_uri).is_dir() else canary_uri
        )
    chars = characters_path(params)
    if chars:
        args["characters"] = chars
    args.update(extra_args or {})
    env_vars = {k: os.environ[k] for k in ("TROUPE_API_KEYS_SHA256", "HF_HUB_OFFLINE") if k in os.environ}
    out: dict[str, Any] = {
        "name": app_name(env),
        "route_prefix": args["route_prefix"],
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": [{"name": "Router", "user_config": {"canary_weight": float(canary_weight)}}],
    }
    if env_vars:
        out["runtime_env"] = {"env_vars": env_vars}
    return out


def connect(address: str = "auto", num_cpus: int | None = None) -> None:
    """Connect to the local Ray cluster, starting ``ray start --head`` when none is running.

    Raises:
        click.ClickException: the cluster cannot be started.
    """
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False)
        return
    except ConnectionError:
        pass
    cmd = ["ray", "start", "--head", "--disable-usage-stats"]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise click.ClickException(f"ray start --head failed: {r.stderr.strip()[-500:]}")
    ray.init(address="auto", log_to_driver=False)


def deployed_apps() -> dict[str, dict[str, Any]]:
    """``{app name: deployed app config}`` of declaratively deployed apps on the connected cluster."""
    from ray.serve.context import _get_global_client

    try:
        details = _get_global_client().get_serve_details()
    except Exception:  # Serve not started
        return {}
    out = {}
    for name, app in (details.get("applications") or {}).items():
        cfg = app.get("deployed_app_config")
        if cfg:
            out[name] = cfg
    return out


def apply_apps(
    apps: list[dict[str, Any]], host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 300
) -> None:
    """Deploy or update applications (others already deployed are kept) and wait until RUNNING.

    Serve is started detached with HTTP on ``host:port`` if it is not running (an already running
    Serve keeps its HTTP options).

    Raises:
        click.ClickException: an application ends DEPLOY_FAILED or is not RUNNING within ``timeout_s``.
    """
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve.start(http_options={"host": host, "port": int(port)})
    current = deployed_apps()
    for a in apps:
        current[a["name"]] = a
    schema = ServeDeploySchema.model_validate({"applications": list(current.values())})
    _get_global_client().deploy_apps(schema)
    wait_running([a["name"] for a in apps], timeout_s)


def wait_running(names: list[str], timeout_s: float = 300) -> None:
    """Poll ``serve.status()`` until every named application is RUNNING (ClickException otherwise)."""
    from ray import serve

    t0 = time.time()
    while True:
        st = serve.status().applications
        states = {n: (st[n].status if n in st else "NOT_STARTED") for n in names}
        if all(s == "RUNNING" for s in states.values()):
            time.sleep(0.5)  # let the proxy pick up new routes
            return
        failed = [n for n, s in states.items() if s == "DEPLOY_FAILED"]
        if failed:
            raise click.ClickException(f"deploy failed: {failed}: {st[failed[0]].message[-2000:]}")
        if time.time() - t0 > timeout_s:
            raise click.ClickException(f"applications not RUNNING after {timeout_s}s: {states}")
        time.sleep(1)


def set_router_config(name: str, user_config: dict[str, Any], wait: bool = True) -> dict[str, Any]:
    """Set the Router ``user_config`` of a deployed app (in-place reconfigure; models untouched).

    Returns the new app config. Raises ClickException when the app is not deployed declaratively.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    current = deployed_apps()
    if name not in current:
        raise click.ClickException(f"application {name!r} is not deployed (troupe deploy first)")
    app = current[name]
    deps = [d for d in app.get("deployments", []) if d.get("name") != "Router"]
    deps.append({"name": "Router", "user_config": dict(user_config)})
    app["deployments"] = deps
    _get_global_client().deploy_apps(
        ServeDeploySchema.model_validate({"applications": list(current.values())})
    )
    if wait:
        wait_running([name])
    return app


def smoke_request(base_url: str, character_id: str, api_key: str | None = None) -> dict[str, Any]:
    """One chat completion through the ``openai`` client; returns request, reply and timing."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=120, max_retries=0)
    msgs = [{"role": "user", "content": "你好" if character_id else "hello"}]
    t0 = time.perf_counter()
    r = client.chat.completions.create(
        model=character_id, messages=msgs, max_tokens=16, extra_body={"conversation_id": "smoke"}
    )
    extra = (r.model_extra or {}).get("troupe", {})
    return {
        "base_url": base_url,
        "request": {"model": character_id, "messages": msgs},
        "reply": r.choices[0].message.content,
        "variant": extra.get("variant"),
        "model_version": extra.get("model_version"),
        "latency_ms": round((time.perf_counter() - t0) * 1000, 1),
        "usage": r.usage.model_dump() if r.usage else None,
    }


def first_character(base_url: str, api_key: str | None) -> str:
    """Id of the first character served (``GET /v1/models``)."""
    import httpx

    h = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(f"{base_url}/models", headers=h, timeout=30)
    r.raise_for_status()
    data = r.json()["data"]
    if not data:
        raise click.ClickException("the app serves no characters")
    return data[0]["id"]


def check_model_uri(uri: str, tracking_uri: str | None, params: dict[str, Any]) -> None:
    """Fail before touching the cluster when ``models:/name@alias`` names no version.

    Raises:
        ConfigError: the alias is unset (for ``challenger``: the gate did not pass; the message points
            at ``paths.registry/gate.md``), or a local model directory does not exist.
    """
    if not uri.startswith("models:/"):
        if not Path(uri).is_dir():
            raise ConfigError(f"{uri}: model directory not found (--model-uri)")
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    ref = uri[len("models:/") :]
    if "@" not in ref:
        return
    name, alias = ref.split("@", 1)
    try:
        mlflow.MlflowClient(tracking_uri or None).get_model_version_by_alias(name, alias)
    except MlflowException as e:
        gate = Path(params.get("paths", {}).get("registry", "work/registry")) / "gate.md"
        hint = f"; the gate decision is in {gate}" if gate.is_file() else ""
        raise ConfigError(
            f"{uri}: no version of {name!r} has alias {alias!r} (the gate did not pass or `troupe registry "
            f"register` has not run{hint}); deploy another version with --model-uri models:/{name}/<version>"
        ) from e


@click.command("deploy")
@click.option("--env", type=click.Choice(["test", "production"]), default=None, help="default: serve.env")
@click.option("--model-uri", default=None, help="local checkpoint dir or models:/name@alias (default: alias)")
@click.option("--address", default="auto", show_default=True, help="Ray cluster address")
@step_options
def deploy_cmd(params: dict, env: str | None, model_uri: str | None, address: str) -> None:
    """Deploy/update the Serve app of an environment and write paths.deploy/smoke.json."""
    s = section(params, "serve")
    env = env or s.get("env", "test")
    host, port = s.get("host", "127.0.0.1"), int(s.get("port", 8000))
    app = app_config(env, params, model_uri=model_uri)
    uri = (
        app["args"].get("stable_model_uri")
        or f"models:/{app['args']['model_name']}@{app['args']['stable_alias']}"
    )
    check_model_uri(uri, app["args"].get("mlflow_tracking_uri"), params)
    connect(address)
    click.echo(f"[deploy] {app['name']} at http://{host}:{port}{app['route_prefix']} ({uri})")
    apply_apps([app], host, port)
    base = f"http://{host}:{port}{app['route_prefix']}/v1"
    key = os.environ.get("TROUPE_API_KEY")
    smoke = smoke_request(base, first_character(base, key), key)
    smoke.update(env=env, app=app["name"], app_config=app)
    out = path_of(params, "deploy")
    out.mkdir(parents=True, exist_ok=True)
    (out / "smoke.json").write_text(json.dumps(smoke, ensure_ascii=False, indent=2), encoding="utf-8")
    click.echo(
        f"[deploy] smoke ok: {smoke['latency_ms']} ms, model {smoke['model_version']} -> {out / 'smoke.json'}"
    )


@click.command("chat")
@click.option("--env", type=click.Choice(["test", "production"]), default="test", show_default=True)
@click.option("--character", "character_id", required=True, help="character id (GET /v1/models)")
@click.option("--conversation", default=None, help="conversation id (default: random)")
@click.option("--delay/--no-delay", default=False, help="sleep each message's typing delay")
@step_options
def chat_cmd(params: dict, env: str, character_id: str, conversation: str | None, delay: bool) -> None:
    """Terminal chat with a character of the running app (shows emotion and image requests)."""
    import uuid

    import httpx

    s = section(params, "serve")
    prefix = f"/{env}"
    try:
        prefix = app_config(env, params)["route_prefix"]
    except ConfigError:
        pass
    url = f"http://{s.get('host', '127.0.0.1')}:{int(s.get('port', 8000))}{prefix}/v1/roleplay"
    key = os.environ.get("TROUPE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    conv = conversation or uuid.uuid4().hex[:12]
    history: list[dict[str, str]] = []
    click.echo(f"chatting with {character_id} ({url}, conversation {conv}); empty line or Ctrl-D quits")
    while True:
        try:
            line = click.prompt("you", default="", show_default=False)
        except (EOFError, click.Abort):
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        r = httpx.post(
            url,
            json={"character_id": character_id, "conversation_id": conv, "messages": history},
            headers=headers,
            timeout=120,
        )
        if r.status_code != 200:
            click.echo(f"[{r.status_code}] {r.text}", err=True)
            history.pop()
            continue
        d = r.json()
        for m in d["messages"] or [{"text": d["text"], "delay_ms": 0}]:
            if delay:
                time.sleep(m["delay_ms"] / 1000)
            click.echo(f"{character_id}: {m['text']}")
        tags = [f"emotion={d['emotion']}"] if d.get("emotion") else []
        tags += [
            f"image({'with' if i['include_person'] else 'without'} person): {i['prompt']}"
            for i in d["images"]
        ]
        tags.append(f"{d['variant']} {d['model_version']}")
        click.echo("  [" + " | ".join(tags) + "]")
        history.append({"role": "assistant", "content": d["raw"]})
