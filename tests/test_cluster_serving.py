"""Cluster in a box, serving: the production RayService's serveConfigV2 on a two-node Ray cluster.

Follows docs/production.md ("Serving"), with the stand-ins of :mod:`tests.cluster_box`:

1. A model (the tiny test model) is uploaded to S3 (moto) where training leaves it,
   ``s3://<bucket>/runs/box-<n>/dpo``, with its eval metrics; ``troupe registry register`` registers
   it in the MLflow server the MLflow chart runs, from that URI (no copy), with the run's characters
   (version 2 carries one more character); the run's local characters file is then deleted.
2. The serving chart is rendered with ``values-prod.yaml`` plus the box's stand-ins (MLflow's
   loopback URL for the Service name, the API-keys Secret's mount path -> a temp dir holding the
   hash file, ``accelerator=cpu``, replica counts and CPUs sized for two cores); its ``serveConfigV2``
   is PUT to Serve's REST API on the box's dashboard as KubeRay does; the app must get RUNNING.
3. The ``openai`` client gets a reply in the character's persona (the prompt is that character's
   card: its token count is checked) with a production key, 401 without one or with a wrong one;
   the characters come from the model versions in MLflow; each node downloaded only what it runs.
4. The chart's ``app.canaryWeightPercent`` (30) and ``app.canaryVersion`` are rendered and PUT again:
   the share of conversations routed to the canary lies in the binomial 95 % interval of 30 %.
5. ``troupe deploy --env production --rayservice`` (its function, with the Kubernetes API stand-in)
   patches the RayService: stable pinned by number, applied on the cluster, smoke request answered.

Reverting the chart to the old deployment names (``Gateway``/``ModelBackend``) or to a fraction
(``canaryWeight: 0.05``) makes step 2 or 4 fail.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serving import contract
from tests import cluster_box
from tests.cluster_box import (
    RayServiceStandIn,
    free_port,
    put_serve_config,
    render_chart,
    serve_status,
    wait_app_running,
)
from tests.serve_fixtures import CHARACTERS, characters_file, tiny_model
from tests.test_registry import GOOD_EVAL_FILES  # an evaluation that passes configs/gate_policy.yaml

pytestmark = pytest.mark.timeout(900)
s3, mlflow_server, ray_cluster = (
    cluster_box.s3,
    cluster_box.mlflow_server,
    cluster_box.ray_cluster,
)  # fixtures

NAME = "troupe-roleplay"
APP = contract.app_name("production")
KEY = "sk-box-production-key"
EXTRA = {
    "id": "alice",
    "name": "Alice",
    "language": "en",
    "profile": {"job": "cartographer"},
    "style": "curious",
    "examples": ["Where does this road go?"],
}


@pytest.fixture(scope="module")
def registered(s3, mlflow_server, tmp_path_factory) -> list[dict[str, Any]]:
    """Versions 1 (champion) and 2 (challenger, + character ``alice``) registered from S3 URIs."""
    from troupe import storage
    from troupe.registry import promote, register

    d = tmp_path_factory.mktemp("runs")
    decisions = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        for n in (1, 2):
            run = s3.uri("runs", f"box-{n}")
            storage.upload(tiny_model(), storage.join(run, "dpo"))
            for f, text in GOOD_EVAL_FILES.items():  # v2 pairs with v1's stored scores on the same set
                storage.write_text(storage.join(run, "eval", f), text)
            splits = d / f"splits-{n}"
            splits.mkdir()
            chars = characters_file(splits)
            if n == 2:
                with chars.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(EXTRA) + "\n")
            mp.setenv("TROUPE_PIPELINE_RUN", f"box-run-{n}")
            params = {
                "paths": {
                    "eval": storage.join(run, "eval"),
                    "dpo_model": storage.join(run, "dpo"),
                    "splits": str(splits),
                    "registry": str(d / f"registry-{n}"),
                },
                "registry": {
                    "model_name": NAME,
                    "experiment": "troupe-box",
                    "gate_policy": "configs/gate_policy.yaml",
                },
            }
            decisions.append(register(params))
            if n == 1:
                promote(NAME)  # champion -> 1; version 2 stays challenger
            shutil.rmtree(splits)  # characters must now come with the versions, not the run's files
    return decisions


class Served:
    """State shared by the steps: the cluster, the rendered RayService, the serve URL."""

    def __init__(self, ray_cluster, mlflow_server, keys_dir: Path, port: int) -> None:
        self.ray, self.mlflow, self.keys_dir, self.port = ray_cluster, mlflow_server, keys_dir, port
        self.base = f"http://127.0.0.1:{port}"
        self.box_options = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port}}
        self.rayservice: dict[str, Any] = {}

    def render(self, app_values: dict[str, Any] | None = None) -> dict[str, Any]:
        """The RayService of ``helm install -f values-prod.yaml`` + the box's stand-ins."""
        values = {
            "accelerator": "cpu",
            "app": {
                "mlflowTrackingUri": self.mlflow.uri,  # stands in for troupe-mlflow.troupe-prod.svc...
                # sized for a 2-CPU worker node; the tests' one client would hit the per-client rate limit
                "gateway": {"numReplicas": 1, "numCpus": 0.5, "requestsPerMinute": 0},
                "model": {"numReplicas": 1, "numCpus": 0.5},
                **(app_values or {}),
            },
            "apiKeys": {"mountPath": str(self.keys_dir)},  # where the Secret's file would be mounted
        }
        docs = render_chart("troupe-serving", values, release="troupe-serving", namespace="troupe-prod")
        (self.rayservice,) = [d for d in docs if d["kind"] == "RayService"]
        return self.rayservice

    def deploy(self) -> dict[str, Any]:
        """KubeRay's step: PUT the rendered serveConfigV2, wait until Serve reports it RUNNING."""
        body = put_serve_config(
            self.ray.dashboard_url, self.rayservice["spec"]["serveConfigV2"], self.box_options
        )
        (app,) = body["applications"]
        return wait_app_running(self.ray.dashboard_url, app["name"], 420, since_args=app["args"])

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def stats(self) -> dict[str, Any]:
        r = httpx.get(self.url("/v1/rollout/stats"), headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="module")
def served(registered, ray_cluster, mlflow_server, tmp_path_factory) -> Served:
    keys_dir = tmp_path_factory.mktemp("api-keys")
    (keys_dir / contract.API_KEYS_SECRET_KEY).write_text(hashlib.sha256(KEY.encode()).hexdigest() + "\n")
    srv = Served(ray_cluster, mlflow_server, keys_dir, free_port())
    srv.render()
    srv.deploy()
    return srv


def test_registered_from_s3_with_characters(registered, s3, mlflow_server):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server.uri)
    for n, d in enumerate(registered, 1):
        mv = client.get_model_version(NAME, d["version"])
        assert mv.source == s3.uri("runs", f"box-{n}", "dpo")  # registered from its URI
        assert mv.tags[contract.CHARACTERS_URI_TAG].endswith("/" + contract.CHARACTERS_FILE)
    assert [d["alias"] for d in registered] == ["challenger", "challenger"]
    if mlflow_server.auth:  # the chart's basic auth is on: the box's processes use its admin user
        anonymous = httpx.get(
            f"{mlflow_server.uri}/api/2.0/mlflow/registered-models/get", params={"name": NAME}
        )
        assert anonymous.status_code == 401
    assert client.get_model_version_by_alias(NAME, "champion").version == registered[0]["version"]
    # MLflow's own artifact prefix holds the characters and metrics, not a second copy of the weights
    assert not [k for k in s3.keys("mlflow/") if k.endswith(".safetensors")]
    assert any(k.endswith("/characters.jsonl") for k in s3.keys("mlflow/"))


def test_production_key_gets_an_in_character_reply(served):
    from openai import AuthenticationError, OpenAI

    from serving.backend import TransformersBackend
    from serving.gateway import Limits, build_prompt, parse_messages
    from troupe.contract import Character

    messages = [{"role": "user", "content": "Ahoy! Who are you and what is your trade?"}]
    client = OpenAI(base_url=served.url("/v1"), api_key=KEY, max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model="bob",
        messages=messages,
        max_tokens=8,
        temperature=0,
        extra_body={"conversation_id": "box-hello"},
    )
    extra = r.model_extra["troupe"]
    assert r.model == "bob" and isinstance(r.choices[0].message.content, str)
    version = {"stable": registered_version(1), "canary": registered_version(2)}[extra["variant"]]
    assert extra["model_version"] == f"{NAME}/{version}"
    # in character: the prompt the model saw is Bob's persona card + the turn (its exact token count)
    cfg = yaml.safe_load((Path(contract.__file__).parents[1] / "configs/serving/production.yaml").read_text())
    prompt = build_prompt(
        Character(**CHARACTERS[0]),
        parse_messages(messages, Limits()),
        Limits.from_dict(cfg["gateway"]["limits"]),
    )
    backend = TransformersBackend(tiny_model(), prefix_cache_bytes=0)
    prefix, suffix = backend.gen.texts(prompt)
    assert r.usage.prompt_tokens == len(backend.gen.ids(prefix)) + len(backend.gen.ids(suffix))

    for bad in ("", "sk-wrong"):
        if bad:
            with pytest.raises(AuthenticationError):
                OpenAI(base_url=served.url("/v1"), api_key=bad, max_retries=0).chat.completions.create(
                    model="bob", messages=messages, max_tokens=4
                )
        r = httpx.post(
            served.url("/v1/chat/completions"),
            json={"model": "bob", "messages": messages},
            headers={"Authorization": f"Bearer {bad}"} if bad else {},
            timeout=30,
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def registered_version(n: int) -> str:
    return str(n)  # a fresh MLflow: the n-th registered version is version n


def test_characters_and_weights_come_from_the_registry(served, ray_cluster):
    r = httpx.get(served.url("/v1/models"), headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert {m["id"] for m in r.json()["data"]} == {"bob", "daiyu", "alice"}  # alice: only version 2
    stats = served.stats()
    assert stats["canary_available"] is True
    assert stats[contract.CANARY_WEIGHT] == 5.0  # values-prod.yaml: 5 percent, not 0.05
    # each node downloaded what it runs, from S3 / MLflow, into its own scratch dir
    worker, head = ray_cluster.worker.scratch / "models" / NAME, ray_cluster.head.scratch / "models" / NAME
    for v in ("1", "2"):
        weights = worker / v / "weights"
        assert (weights / ".troupe-source").read_text().startswith("s3://")
        assert list(weights.rglob("model.safetensors"))
        assert (worker / v / "characters" / contract.CHARACTERS_FILE).is_file()  # the Router's node
    assert not head.exists() or not list(head.rglob("model.safetensors"))  # the head serves no model


def test_canary_share_follows_the_chart_value(served):
    from serving.gateway import choose_variant

    weight = 30.0
    served.render({"canaryWeightPercent": weight, "canaryVersion": registered_version(2)})
    (app,) = yaml.safe_load(served.rayservice["spec"]["serveConfigV2"])["applications"]
    assert app["args"][contract.CANARY_MODEL_URI] == contract.model_version_uri(NAME, 2)
    served.deploy()
    assert served.stats()[contract.CANARY_WEIGHT] == weight

    n = 400
    convs = [f"share-{i}" for i in range(n)]

    def variant(conv: str) -> str:
        body = {"model": "daiyu", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 1}
        r = httpx.post(
            served.url("/v1/chat/completions"),
            json={**body, "conversation_id": conv},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        return r.json()["troupe"]["variant"]

    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(convs, pool.map(variant, convs), strict=True))
    share = sum(v == contract.CANARY for v in got.values()) / n
    p = weight / 100
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert p - half <= share <= p + half, f"canary share {share:.3f} outside {p} +- {half:.3f}"
    assert got == {c: choose_variant(c, weight) for c in convs}  # sticky hash buckets, same as the app's


def test_deploy_patches_the_rayservice_with_a_pinned_version(served, mlflow_server, tmp_path, monkeypatch):
    """``troupe deploy --env production --rayservice troupe-serving`` against the Kubernetes API
    stand-in: the patch pins stable by number; KubeRay's part (PUT to Serve) runs on the box."""
    from troupe.deploy import deploy_kubernetes

    api = RayServiceStandIn(served.rayservice, served.ray.dashboard_url, served.box_options)
    api.observed = 1  # this serveConfigV2 is already applied (previous test)
    monkeypatch.setenv("TROUPE_API_KEY", KEY)
    params = {
        "registry": {"model_name": NAME, "tracking_uri": mlflow_server.uri},
        "paths": {"registry": str(tmp_path / "registry")},
    }
    smoke = deploy_kubernetes(
        "production", params, "troupe-serving", "troupe-prod", serve_url=served.base, timeout_s=420, api=api
    )
    assert smoke["model_uri"] == contract.model_version_uri(NAME, 1) and isinstance(smoke["reply"], str)
    (patch,) = api.patches
    (app,) = yaml.safe_load(patch["spec"]["serveConfigV2"])["applications"]
    assert app["name"] == APP and app["args"][contract.STABLE_MODEL_URI] == contract.model_version_uri(
        NAME, 1
    )
    assert (
        app["deployments"]
        == yaml.safe_load(served.rayservice["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    )  # the Router's canary weight is left alone
    deployed = serve_status(served.ray.dashboard_url)[APP]
    assert deployed["status"] == "RUNNING"
    assert deployed["deployed_app_config"]["args"][contract.STABLE_MODEL_URI] == contract.model_version_uri(
        NAME, 1
    )


def test_a_card_imported_to_s3_is_served_after_one_reload(served, s3, monkeypatch):
    """A committed Character Card V2 PNG imported into an ``s3://`` catalogue (``troupe characters
    import``), then ``troupe deploy --env production --rayservice troupe-serving --catalogue s3://...
    --reload-characters`` against the Kubernetes API stand-in, KubeRay's part (PUT to Serve) run on
    the box: only the Router's ``user_config`` changes, the Router pods read the catalogue from S3,
    the new character answers a SillyTavern-shaped request, and the model replica is the same one."""
    from troupe.characters.catalogue import import_card, load_catalogue, save_catalogue
    from troupe.contract import Character
    from troupe.deploy import reload_characters_kubernetes

    auth = {"Authorization": f"Bearer {KEY}"}
    engine = served.url(contract.ENGINE_ENDPOINT)
    before = httpx.get(engine, headers=auth, timeout=60).json()["stable"]["replica"]
    uri = s3.uri("catalogues", "production.jsonl")
    save_catalogue([Character(**c) for c in CHARACTERS], uri)
    card = Path(contract.__file__).parents[1] / "characters" / "cards" / "wren_calloway.png"
    wren = import_card(card, uri)
    assert httpx.get(served.url(f"/v1/models/{wren.id}"), headers=auth, timeout=30).status_code == 404

    deployed = serve_status(served.ray.dashboard_url)[APP]["deployed_app_config"]
    now = {**served.rayservice, "spec": {**served.rayservice["spec"]}}
    now["spec"]["serveConfigV2"] = yaml.safe_dump({"applications": [deployed]})
    api = RayServiceStandIn(now, served.ray.dashboard_url, served.box_options)
    api.observed = 1  # what the stand-in starts from is what Serve runs
    uc = reload_characters_kubernetes("production", "troupe-serving", "troupe-prod", uri, 420, api=api)
    router_uc = next(d for d in deployed["deployments"] if d["name"] == contract.ROUTER).get("user_config")
    version = load_catalogue(uri).version
    assert uc == {**(router_uc or {}), contract.CATALOGUE_URI: uri, contract.CATALOGUE_VERSION: version}
    (patch,) = api.patches
    (app,) = yaml.safe_load(patch["spec"]["serveConfigV2"])["applications"]
    assert app["args"] == deployed["args"]  # args unchanged: Serve rebuilds nothing

    body = {  # SillyTavern's Chat Completion request ("Custom (OpenAI-compatible)" source)
        "model": wren.id,
        "messages": [
            {
                "role": "system",
                "content": "Write Wren's next reply in a fictional chat between Wren and User.",
            },
            {"role": "assistant", "content": wren.greetings[0]},
            {"role": "user", "content": "Hi Wren, how was your day?"},
        ],
        "temperature": 1,
        "max_tokens": 8,
        "stream": False,
        "stop": ["\nUser:"],
        "seed": 7,
    }
    r = httpx.post(served.url("/v1/chat/completions"), json=body, headers=auth, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == wren.id and isinstance(r.json()["choices"][0]["message"]["content"], str)
    assert httpx.get(engine, headers=auth, timeout=60).json()["stable"]["replica"] == before
