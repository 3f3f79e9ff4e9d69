"""The Troupe Ray Serve application: ``Router`` (gateway + canary router) in front of model deployments.

Graph (one application per environment, ``troupe-<env>``; names in :mod:`serving.contract`)::

    HTTP -> Router (FastAPI ingress: auth, limits, persona card, sticky stable/canary split,
                    metrics, rollout stats)
              |-> stable  (Model: transformers + @serve.batch + persona-card KV cache | vLLM)
              '-> canary  (same, other model version; only when a canary model is configured)

Endpoints (relative to the route prefix):
    POST /v1/chat/completions   OpenAI-compatible (``stream: true`` -> SSE); ``model`` = character id
    POST /v1/roleplay           {character_id, conversation_id, messages} -> parsed reply
    GET  /v1/models             characters served
    GET  /v1/rollout/stats      per-variant counters for the rollout controller (``?since=unix_s``)
    GET  /healthz

The canary weight lives in the Router's ``user_config`` (``{"canary_weight_percent": pct,
"rolled_back": bool}``): changing it reconfigures the Router in place; model replicas are untouched.
A ``serveConfigV2`` overrides the Router only (the one deployment every build has); model replica
options (replicas, CPUs, GPUs, custom resources) travel in the ``model`` section of the args.

Models are pinned by version number when the app is built (``models:/name@alias`` ->
``models:/name/<n>``), so every replica serves the same version even if an alias moves. Characters
travel with the model version (:mod:`troupe.registry` stores them); a ``characters`` path in the
config (local runs, tests) takes precedence.

Import path ``serving.app:build_app`` (Helm RayService chart, ``troupe deploy``).
"""

import copy
import json
import logging
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import ray
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from serving import contract
from serving.backend import vllm_chat
from serving.gateway import (
    CONVERSATION_HEADER,
    GatewayError,
    Limits,
    StickyRouter,
    aggregate_events,
    build_prompt,
    check_api_key,
    load_key_hashes,
    parse_messages,
    split_reply,
    sticky_key,
)
from serving.model import Model
from troupe.config import repo_path

log = logging.getLogger("ray.serve")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs" / "serving"

#: Defaults under every serving config (configs/serving/<env>.yaml overrides, then build_app args).
#: These keys (plus :data:`URI_ARGS` and ``config``) are every arg the app knows; others are errors.
DEFAULTS: dict[str, Any] = {
    "env": "test",
    "route_prefix": "/test",
    "backend": "transformers",
    # path or candidate list of a characters.jsonl; "" = the characters stored with the model version
    "characters": "",
    "mlflow_tracking_uri": "",
    "model_name": "troupe-roleplay",
    "stable_alias": "champion",
    "canary_alias": "",
    contract.CANARY_WEIGHT: 0.0,
    "model": {
        "dtype": "float32",
        "device": "cpu",
        "num_replicas": 1,
        "num_cpus": 1,
        "num_gpus": 0,
        "resources": {},
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.02,
        "prefix_cache_mb": 64,
        "max_new_tokens": 48,
        "temperature": 0.7,
        "fault": {},
    },
    "canary_model": {},
    "gateway": {
        "served_model_name": "troupe",
        "require_api_key": False,
        "api_keys_sha256": [],
        "api_keys_env": contract.API_KEYS_ENV,
        "api_keys_file": "",
        "typing_chars_per_sec": 4.0,
        "limits": {},
    },
    "router": {"num_cpus": 0, "retry_on_canary_error": True, "stats_window": 50000},
    "vllm": {
        "max_model_len": 8192,
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "min_replicas": None,  # None = model.num_replicas (autoscaling bounds of vLLM replicas)
        "max_replicas": None,
        "accelerator_type": None,
    },
}
#: Args naming models directly (local dir or ``models:/name/<version>`` / ``models:/name@alias``).
URI_ARGS = ("model_uri", contract.STABLE_MODEL_URI, contract.CANARY_MODEL_URI)
#: Sections whose keys are checked one level down (``canary_model`` takes ``model`` keys).
_SECTIONS = {
    "model": "model",
    "canary_model": "model",
    "gateway": "gateway",
    "router": "router",
    "vllm": "vllm",
}


def known_args() -> frozenset[str]:
    """Every top-level key ``build_app`` accepts."""
    return frozenset(DEFAULTS) | frozenset(URI_ARGS) | {"config"}


def check_args(args: dict[str, Any], where: str = "args") -> None:
    """Reject keys the app does not know (top level and inside the config sections).

    Raises:
        ValueError: naming each unknown key and the known ones, e.g. a chart that still passes
            ``canary_weight`` (a unit-less fraction) instead of ``canary_weight_percent``.
    """
    unknown = sorted(set(args) - known_args())
    if unknown:
        raise ValueError(f"serving {where}: unknown keys {unknown} (known: {sorted(known_args())})")
    for sec, like in _SECTIONS.items():
        val = args.get(sec)
        if val is None:
            continue
        if not isinstance(val, dict):
            raise ValueError(f"serving {where}.{sec}: expected a mapping, got {type(val).__name__}")
        bad = sorted(set(val) - set(DEFAULTS[like]))
        if bad:
            raise ValueError(f"serving {where}.{sec}: unknown keys {bad} (known: {sorted(DEFAULTS[like])})")
    if contract.CANARY_WEIGHT in args:
        contract.check_weight(args[contract.CANARY_WEIGHT], f"serving {where}.{contract.CANARY_WEIGHT}")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``base`` with ``over`` merged in (dicts recursively, other values replaced)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_serving_config(args: dict[str, Any]) -> dict[str, Any]:
    """Serving config: :data:`DEFAULTS` <- ``configs/serving/{env}.yaml`` (or ``args['config']``) <- args.

    Raises:
        FileNotFoundError: an explicit ``config`` path does not exist.
        ValueError: an unknown key in the args or the config file (:func:`check_args`).
    """
    check_args(args)
    env = str(args.get("env") or DEFAULTS["env"])
    path = args.get("config")
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        p = repo_path(path)
        if not p.is_file():
            raise FileNotFoundError(f"serving config {path}: not found")
    else:
        p = CONFIG_DIR / f"{env}.yaml"
    if p.is_file():
        file_cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        check_args(file_cfg, str(p))
        cfg = deep_merge(cfg, file_cfg)
    return deep_merge(cfg, {k: v for k, v in args.items() if k != "config" and v is not None})


def model_uris(cfg: dict[str, Any]) -> tuple[str, str | None]:
    """(stable URI, canary URI or None) from explicit ``*_model_uri`` args or registry aliases.

    ``model_uri`` serves one model as stable; ``models:/{model_name}@{alias}`` is used otherwise. No
    canary when ``canary_alias`` is empty or it resolves to the same URI as stable.

    Raises:
        ValueError: no stable model can be named (no URI and no model_name/stable_alias).
    """
    name = cfg.get("model_name")
    stable = cfg.get(contract.STABLE_MODEL_URI) or cfg.get("model_uri")
    if not stable:
        if not (name and cfg.get("stable_alias")):
            raise ValueError("serving: give model_uri / stable_model_uri, or model_name + stable_alias")
        stable = f"models:/{name}@{cfg['stable_alias']}"
    canary = cfg.get(contract.CANARY_MODEL_URI)
    if not canary and name and cfg.get("canary_alias"):
        canary = f"models:/{name}@{cfg['canary_alias']}"
    return str(stable), (str(canary) if canary and str(canary) != str(stable) else None)


def pin_uri(uri: str, tracking_uri: str | None) -> str:
    """``models:/name@alias`` -> ``models:/name/<version>`` (other URIs unchanged).

    Raises:
        troupe.config.ConfigError: the alias names no version.
    """
    if not (uri.startswith("models:/") and "@" in uri):
        return uri
    from troupe.registry import model_version

    mv = model_version(uri, tracking_uri or None)
    return contract.model_version_uri(mv.name, mv.version)


def pinned_models(cfg: dict[str, Any]) -> tuple[str, str | None]:
    """:func:`model_uris` with aliases pinned to version numbers; a canary alias that names no
    version, or the stable version, means no canary (logged)."""
    stable, canary = model_uris(cfg)
    tracking = cfg.get("mlflow_tracking_uri") or None
    stable = pin_uri(stable, tracking)
    if canary:
        try:
            canary = pin_uri(canary, tracking)
        except Exception as e:  # e.g. no challenger yet: serve stable alone
            log.warning("canary %s not served: %s", canary, e)
            canary = None
    if canary == stable:
        canary = None
    return stable, canary


def version_label(uri: str) -> str:
    """``name/<version>`` for ``models:/name/<version>``, the directory name for a local path."""
    if uri.startswith("models:/"):
        return uri[len("models:/") :]
    return Path(uri).name if uri else ""


def load_character_file(spec: str | list[str]) -> dict[str, Any]:
    """``{id: Character}`` from the first existing path of ``spec`` (a path or candidate list).

    Raises:
        FileNotFoundError: none of the candidates exists.
    """
    from troupe.contract import load_characters

    cands = [spec] if isinstance(spec, str) else list(spec)
    for c in cands:
        p = repo_path(c)
        if p.is_file():
            return load_characters(p)
    raise FileNotFoundError(f"characters: none of {cands} exists (set 'characters' in the serving config)")


def model_characters(uri: str, tracking_uri: str | None) -> dict[str, Any]:
    """``{id: Character}`` stored with a model: the registered version's characters artifact
    (:func:`troupe.registry.characters_file`; only that small file is downloaded), or
    ``characters.jsonl`` inside a local model directory.

    Raises:
        FileNotFoundError / ConfigError: the model carries no characters.
    """
    from troupe.contract import load_characters

    if uri.startswith("models:/"):
        from troupe.registry import characters_file

        return load_characters(characters_file(uri, tracking_uri or None))
    p = Path(uri) / contract.CHARACTERS_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"characters: {uri} holds no {contract.CHARACTERS_FILE} and no 'characters' path is configured"
        )
    return load_characters(p)


def serving_characters(cfg: dict[str, Any], stable: str, canary: str | None) -> dict[str, Any]:
    """The characters the Router serves: the configured ``characters`` file when set, else those of
    the stable version plus characters only the canary version carries."""
    if cfg.get("characters"):
        return load_character_file(cfg["characters"])
    tracking = cfg.get("mlflow_tracking_uri") or None
    chars = dict(model_characters(canary, tracking)) if canary else {}
    chars.update(model_characters(stable, tracking))
    return chars


# -- rollout statistics, shared by every Router replica ------------------------------------------
@ray.remote(num_cpus=0)
class RolloutStats:
    """Router events of one application from all its Router replicas: the controller reads every
    request, not the share one replica saw. One named, detached actor per application
    (:func:`serving.contract.stats_actor_name` in namespace :data:`serving.contract.RAY_NAMESPACE`),
    created by the first Router replica and found by the others (``get_if_exists``); it outlives
    app redeploys, and stats are always read for a window (``since``), so old events do not leak
    into a new step.

    Args:
        window: events kept (the oldest are dropped first).
    """

    def __init__(self, window: int = 50000) -> None:
        self.events: deque[tuple] = deque(maxlen=int(window))

    def record(self, event: tuple) -> None:
        """Add one event ``(unix_s, variant, ok, latency_ms, markup_bad, language_bad, phrase)``."""
        self.events.append(tuple(event))

    def summary(self, since: float = 0.0) -> dict[str, Any]:
        """:func:`serving.gateway.aggregate_events` of the events since ``since`` (unix seconds)."""
        return aggregate_events(self.events, since)

    def count(self) -> int:
        return len(self.events)


def stats_actor(app: str, window: int = 50000):
    """The application's :class:`RolloutStats` actor (created on first use)."""
    return RolloutStats.options(
        name=contract.stats_actor_name(app),
        namespace=contract.RAY_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote(window)


# -- router / gateway -----------------------------------------------------------------------------
api = FastAPI(title="Troupe role-play gateway")


@serve.deployment(name=contract.ROUTER, max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Router:
    """Gateway + sticky weighted router (see module docstring). ``user_config``: canary weight.

    Args:
        stable, canary: handles of the model deployments (``canary`` None without a canary).
        cfg: the serving config; ``stable_model_uri`` / ``canary_model_uri`` are the pinned URIs
            whose characters are served unless ``characters`` names a file.
    """

    def __init__(self, stable: Any, canary: Any | None, cfg: dict[str, Any]) -> None:
        from ray.serve.metrics import Counter, Histogram

        from troupe.checks import check_reply

        self._check_reply = check_reply
        self.handles = {contract.STABLE: stable, contract.CANARY: canary}
        self.labels = {  # version labels of the vLLM replicas (the transformers Model reports its own)
            v: version_label(cfg.get(k) or "")
            for v, k in (
                (contract.STABLE, contract.STABLE_MODEL_URI),
                (contract.CANARY, contract.CANARY_MODEL_URI),
            )
        }
        self.cfg = cfg
        self.env = str(cfg.get("env", "test"))
        gw = cfg.get("gateway", {})
        self.limits = Limits.from_dict(gw.get("limits"))
        self.served_name = gw.get("served_model_name", "troupe")
        self.keys = load_key_hashes(
            gw.get("api_keys_sha256"),
            gw.get("api_keys_env", contract.API_KEYS_ENV),
            gw.get("api_keys_file") or None,
        )
        self.require_key = bool(gw.get("require_api_key", False))
        self.cps = float(gw.get("typing_chars_per_sec", 4.0))
        self.characters = serving_characters(
            cfg, cfg[contract.STABLE_MODEL_URI], cfg.get(contract.CANARY_MODEL_URI)
        )
        self.router = StickyRouter(contract.check_weight(cfg.get(contract.CANARY_WEIGHT, 0.0)))
        self.rolled_back = False
        self.rollback_reason = ""
        self.retry = bool(cfg.get("router", {}).get("retry_on_canary_error", True))
        self.vllm = cfg.get("backend") == "vllm"
        self.stats_window = int(cfg.get("router", {}).get("stats_window", 50000))
        self._stats = stats_actor(contract.app_name(self.env), self.stats_window)
        self.versions: dict[str, str] = {}
        self.model_calls = 0  # requests forwarded to a model (rejections never count)
        tags = ("variant", "env")
        self.m_requests = Counter("troupe_requests", description="Replies served, by variant.", tag_keys=tags)
        self.m_errors = Counter(
            "troupe_errors", description="Model call failures, by variant.", tag_keys=tags
        )
        self.m_rejected = Counter(
            "troupe_rejected", description="Gateway rejections by code.", tag_keys=("code", "env")
        )
        self.m_latency = Histogram(
            "troupe_latency_ms",
            description="Model call latency (ms), by variant.",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
            tag_keys=tags,
        )
        self.m_quality = Counter(
            "troupe_reply_violations",
            description="Live reply rule violations.",
            tag_keys=("variant", "env", "check"),
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``{"canary_weight_percent": pct, "rolled_back": bool, "reason": str}`` without restarts.

        Raises:
            ValueError: an unknown key (e.g. ``canary_weight``) or a weight outside 0-100; Serve
                then reports the deployment unhealthy instead of routing with a wrong unit.
        """
        contract.check_user_config(user_config)
        if user_config.get(contract.ROLLED_BACK):
            self.router.rollback()
            self.rolled_back = True
            self.rollback_reason = str(user_config.get(contract.ROLLBACK_REASON, ""))
        else:
            self.rolled_back = False
            self.rollback_reason = ""
            self.router.set_weight(
                float(user_config.get(contract.CANARY_WEIGHT, self.router.canary_weight_percent))
            )

    # -- helpers ---------------------------------------------------------------------------------
    async def _read_json(self, request: Request) -> dict[str, Any]:
        check_api_key(dict(request.headers), self.keys, self.require_key)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limits.max_body_bytes:
            raise GatewayError(
                413, "request_too_large", f"body {length} bytes > {self.limits.max_body_bytes}"
            )
        body = await request.body()
        if len(body) > self.limits.max_body_bytes:
            raise GatewayError(
                413, "request_too_large", f"body {len(body)} bytes > {self.limits.max_body_bytes}"
            )
        try:
            data = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GatewayError(400, "invalid_json", f"body is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise GatewayError(400, "invalid_request", "body must be a JSON object")
        return data

    def _error(self, e: GatewayError) -> JSONResponse:
        self.m_rejected.inc(tags={"code": e.code, "env": self.env})
        return JSONResponse(e.body(), status_code=e.status)

    def _character(self, cid: Any):
        if not isinstance(cid, str) or cid not in self.characters:
            raise GatewayError(
                404, "unknown_character", f"unknown character {cid!r} (GET /v1/models lists them)"
            )
        return self.characters[cid]

    def _max_new(self, data: dict[str, Any]) -> int | None:
        v = data.get("max_tokens", data.get("max_completion_tokens", data.get("max_new_tokens")))
        if v is None:
            return None
        if not isinstance(v, int) or v < 1 or v > self.limits.max_new_tokens:
            raise GatewayError(
                400, "invalid_max_tokens", f"max_tokens must be 1..{self.limits.max_new_tokens}"
            )
        return v

    def _prepare(self, data: dict[str, Any], cid: Any, headers: dict[str, str]) -> dict[str, Any]:
        """Character, prompt and routing key of a request (:func:`serving.gateway.sticky_key`:
        conversation id, else the client's user / session id, else a random id returned to it)."""
        char = self._character(cid)
        msgs = parse_messages(data.get("messages"), self.limits)
        prompt = build_prompt(char, msgs, self.limits)
        conv, _ = sticky_key(data.get("conversation_id"), data.get("user"), headers)
        payload = {"messages": prompt, "cache_key": char.id, "max_new_tokens": self._max_new(data)}
        if data.get("temperature") is not None:
            t = data["temperature"]
            if not isinstance(t, int | float) or not 0 <= t <= 2:
                raise GatewayError(400, "invalid_temperature", "temperature must be in [0, 2]")
            payload["temperature"] = float(t)
        return {"character": char, "conversation_id": str(conv), "payload": payload}

    async def _record(self, variant: str, ok: bool, ms: float, reply: str | None, char) -> None:
        tags = {"variant": variant, "env": self.env}
        q = (False, False, False)
        if ok:
            self.m_requests.inc(tags=tags)
            self.m_latency.observe(ms, tags=tags)
            if reply is not None:
                c = self._check_reply(reply, character_name=char.name, language=char.language)
                q = (not c.markup_valid, not c.language_ok, bool(c.assistant_phrase))
                for name, bad in zip(
                    ("markup_invalid", "language_mismatch", "assistant_phrase"), q, strict=True
                ):
                    if bad:
                        self.m_quality.inc(tags={**tags, "check": name})
        else:
            self.m_errors.inc(tags=tags)
        event = (time.time(), variant, ok, ms, *q)
        try:  # awaited, so a stats read after the reply sees this request
            await self._stats.record.remote(event)
        except Exception as e:  # the stats actor died: a new one, the reply still goes out
            log.warning("rollout stats actor unavailable (%s); recreating it", e)
            self._stats = stats_actor(contract.app_name(self.env), self.stats_window)
            self.m_errors.inc(tags={"variant": "stats", "env": self.env})

    async def _call_model(self, variant: str, payload: dict[str, Any]) -> dict[str, Any]:
        h = self.handles[variant]
        if self.vllm:
            return {**await vllm_chat(h, payload, self.served_name), "model_version": self.labels[variant]}
        return await h.generate.remote(payload)

    async def _generate(self, prep: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Route, call, retry a failed canary call on stable; returns (model result, variant)."""
        variant = self.router.route(prep["conversation_id"], self.handles[contract.CANARY] is not None)
        self.model_calls += 1
        t0 = time.perf_counter()
        try:
            out = await self._call_model(variant, prep["payload"])
        except Exception as e:
            await self._record(variant, False, (time.perf_counter() - t0) * 1000, None, prep["character"])
            if variant != contract.CANARY or not self.retry:
                raise
            log.warning("canary call failed (%s); retrying on stable", e)
            variant = contract.STABLE
            t0 = time.perf_counter()
            try:
                out = await self._call_model(variant, prep["payload"])
            except Exception:
                await self._record(variant, False, (time.perf_counter() - t0) * 1000, None, prep["character"])
                raise
        await self._record(variant, True, (time.perf_counter() - t0) * 1000, out["text"], prep["character"])
        self.versions[variant] = out.get("model_version", "")
        return out, variant

    # -- endpoints -------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"ok": True, "env": self.env, "characters": len(self.characters)}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            check_api_key(dict(request.headers), self.keys, self.require_key)
        except GatewayError as e:
            return self._error(e)
        data = [
            {"id": c.id, "object": "model", "owned_by": "troupe", "name": c.name, "language": c.language}
            for c in self.characters.values()
        ]
        return {"object": "list", "data": data}

    @api.post("/v1/roleplay")
    async def roleplay(self, request: Request):
        """``{character_id, conversation_id?, messages, max_tokens?, temperature?}`` -> parsed reply."""
        from troupe.markup import parse_reply

        try:
            data = await self._read_json(request)
            prep = self._prepare(data, data.get("character_id"), dict(request.headers))
        except GatewayError as e:
            return self._error(e)
        try:
            out, variant = await self._generate(prep)
        except Exception as e:
            return JSONResponse({"error": {"code": "model_error", "message": str(e)[:500]}}, status_code=503)
        parsed = parse_reply(out["text"])
        msgs = split_reply(parsed.text, self.cps)
        if msgs and parsed.images:
            msgs[-1]["images"] = [i.__dict__ for i in parsed.images]
        body = {
            "text": parsed.text,
            "raw": out["text"],
            "emotion": parsed.emotion,
            "clauses": [c.__dict__ for c in parsed.clauses],
            "images": [i.__dict__ for i in parsed.images],
            "markup_valid": parsed.valid,
            "messages": msgs,
            "variant": variant,
            "model_version": out.get("model_version", ""),
            "character_id": prep["character"].id,
            "conversation_id": prep["conversation_id"],
            "usage": {
                "prompt_tokens": out.get("prompt_tokens"),
                "completion_tokens": out.get("completion_tokens"),
            },
        }
        return JSONResponse(body, headers={CONVERSATION_HEADER: prep["conversation_id"]})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI chat completions; ``model`` is a character id (or ``served_model_name`` +
        ``character_id``). Routing key (:func:`serving.gateway.sticky_key`): ``conversation_id`` /
        ``x-conversation-id``, else the OpenAI ``user`` field / ``x-session-id``, else a random id;
        the key used comes back in ``troupe.conversation_id`` and the ``x-conversation-id`` header."""
        try:
            data = await self._read_json(request)
            cid = data.get("model")
            if cid == self.served_name or cid not in self.characters:
                cid = data.get("character_id", cid)
            prep = self._prepare(data, cid, dict(request.headers))
            if data.get("n", 1) != 1:
                raise GatewayError(400, "invalid_request", "n must be 1")
        except GatewayError as e:
            return self._error(e)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        model_id = prep["character"].id
        if data.get("stream"):
            return StreamingResponse(
                self._sse(prep, rid, created, model_id),
                media_type="text/event-stream",
                headers={CONVERSATION_HEADER: prep["conversation_id"]},
            )
        try:
            out, variant = await self._generate(prep)
        except Exception as e:
            return JSONResponse({"error": {"code": "model_error", "message": str(e)[:500]}}, status_code=503)
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out["text"]},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": out.get("prompt_tokens", 0),
                "completion_tokens": out.get("completion_tokens", 0),
                "total_tokens": out.get("prompt_tokens", 0) + out.get("completion_tokens", 0),
            },
            "troupe": {
                "variant": variant,
                "model_version": out.get("model_version", ""),
                "conversation_id": prep["conversation_id"],
            },
        }
        return JSONResponse(body, headers={CONVERSATION_HEADER: prep["conversation_id"]})

    async def _sse(self, prep: dict[str, Any], rid: str, created: int, model_id: str):
        def chunk(delta: dict[str, Any], finish: str | None = None, extra: dict | None = None) -> str:
            d = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if extra:
                d["troupe"] = extra
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        variant = self.router.route(prep["conversation_id"], self.handles[contract.CANARY] is not None)
        self.model_calls += 1
        yield chunk({"role": "assistant", "content": ""})
        pieces: list[str] = []
        for attempt in (variant, contract.STABLE):
            t0 = time.perf_counter()
            try:
                if self.vllm:
                    out = await vllm_chat(self.handles[attempt], prep["payload"], self.served_name)
                    pieces.append(out["text"])
                    yield chunk({"content": out["text"]})
                else:
                    gen = self.handles[attempt].options(stream=True).stream.remote(prep["payload"])
                    async for piece in gen:
                        pieces.append(piece)
                        yield chunk({"content": piece})
                variant = attempt
                await self._record(
                    attempt, True, (time.perf_counter() - t0) * 1000, "".join(pieces), prep["character"]
                )
                break
            except Exception as e:
                await self._record(attempt, False, (time.perf_counter() - t0) * 1000, None, prep["character"])
                if attempt == contract.STABLE or pieces or not self.retry:  # cannot retry after output began
                    err = {"error": {"code": "model_error", "message": str(e)[:500]}}
                    yield f"data: {json.dumps(err)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        yield chunk({}, "stop", {"variant": variant, "conversation_id": prep["conversation_id"]})
        yield "data: [DONE]\n\n"

    @api.get("/v1/rollout/stats")
    async def rollout_stats(self, request: Request, since: float = 0.0):
        """Per-variant counters since ``since`` (unix seconds): requests, errors, rates, latency p50/p95."""
        try:
            check_api_key(dict(request.headers), self.keys, self.require_key)
        except GatewayError as e:
            return self._error(e)
        return await self.stats(since)

    async def stats(self, since: float = 0.0) -> dict[str, Any]:
        """The JSON served by ``GET /v1/rollout/stats``: the Router settings of this replica and the
        variants' counters over ALL Router replicas since ``since`` (the :class:`RolloutStats`
        actor; :func:`serving.gateway.variant_summary`)."""
        variants = await self._stats.summary.remote(since)
        return {
            "env": self.env,
            "now": time.time(),
            "since": since,
            contract.CANARY_WEIGHT: self.router.canary_weight_percent,
            "canary_available": self.handles[contract.CANARY] is not None,
            "rolled_back": self.rolled_back,
            "rollback_reason": self.rollback_reason,
            "pinned_conversations": self.router.pinned,
            "model_calls": self.model_calls,
            "model_versions": dict(self.versions),
            "router_replica": serve.get_replica_context().replica_id.unique_id,
            "variants": variants,
        }


def _actor_options(mcfg: dict[str, Any]) -> dict[str, Any]:
    """``ray_actor_options`` of a model replica from the ``model`` section (CPUs, GPUs, resources)."""
    opts: dict[str, Any] = {"num_cpus": float(mcfg.get("num_cpus", 1))}
    if float(mcfg.get("num_gpus") or 0):
        opts["num_gpus"] = float(mcfg["num_gpus"])
    if mcfg.get("resources"):
        opts["resources"] = {k: float(v) for k, v in mcfg["resources"].items()}
    return opts


def _model_app(variant: str, uri: str, cfg: dict[str, Any], mcfg: dict[str, Any]):
    if cfg.get("backend") == "vllm":  # optional `gpu` extra; imported only here
        from ray.serve.llm import LLMConfig, build_llm_deployment

        from serving.backend import vllm_engine_config
        from troupe.registry import model_source

        source = model_source(uri, cfg.get("mlflow_tracking_uri") or None)  # replicas download it
        vcfg = {"served_model_name": cfg["gateway"].get("served_model_name", "troupe"), **cfg.get("vllm", {})}
        return build_llm_deployment(
            LLMConfig(**vllm_engine_config(source, vcfg, mcfg)), name_prefix=f"{variant}-"
        )
    return Model.options(
        name=variant, num_replicas=int(mcfg.get("num_replicas", 1)), ray_actor_options=_actor_options(mcfg)
    ).bind(uri, cfg.get("mlflow_tracking_uri") or None, mcfg)


def build_app(args: dict[str, Any]):
    """Application builder (``serving.app:build_app``) for ``serve run``/``serve deploy``/RayService.

    Args:
        args: ``env`` (test|production; selects ``configs/serving/<env>.yaml``), optional ``config``
            path, ``mlflow_tracking_uri``, ``model_name``, ``stable_alias``, ``canary_alias``,
            ``canary_weight_percent`` (initial Router weight, percent), ``route_prefix``
            (informational; the route prefix is set by the deploy config),
            ``model_uri``/``stable_model_uri``/``canary_model_uri`` (local dir or
            ``models:/name/<version>`` / ``models:/name@alias``), and any serving-config section to
            override (``model`` incl. ``num_replicas``/``num_cpus``/``num_gpus``/``resources``,
            ``canary_model``, ``gateway``, ``router``, ``vllm``, ``characters``, ``backend``).
            Unknown keys are errors (:func:`check_args`).

    Returns:
        A bound Ray Serve application whose ingress is the ``Router`` deployment.

    Raises:
        ValueError: unknown args or no stable model named; FileNotFoundError / ConfigError: config,
            model version or characters missing.
    """
    cfg = load_serving_config(args)
    stable_uri, canary_uri = pinned_models(cfg)
    cfg[contract.STABLE_MODEL_URI], cfg[contract.CANARY_MODEL_URI] = stable_uri, canary_uri
    serving_characters(cfg, stable_uri, canary_uri)  # fail at build time, not on the first request
    stable = _model_app(contract.STABLE, stable_uri, cfg, cfg["model"])
    canary = None
    if canary_uri:
        canary = _model_app(
            contract.CANARY, canary_uri, cfg, deep_merge(cfg["model"], cfg.get("canary_model") or {})
        )
    else:
        cfg[contract.CANARY_WEIGHT] = 0.0
    rcfg = cfg.get("router", {})
    return Router.options(
        ray_actor_options={"num_cpus": float(rcfg.get("num_cpus", 0))},
        user_config=contract.router_user_config(cfg.get(contract.CANARY_WEIGHT, 0.0)),
    ).bind(stable, canary, cfg)
