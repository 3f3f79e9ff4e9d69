"""Helm charts: rendered with the real Helm engine (helm-python-sdk), linted, validated, scanned.

Every chart x environment file (values-test.yaml, values-prod.yaml) x accelerator (cpu, nvidia,
ascend) is rendered; core kinds are validated against the Kubernetes OpenAPI schemas
(kubernetes-validate), RayJob / RayService against the KubeRay v1.7.0 CRD schemas in
``../shared/k8s/crds``; the training RayJob must equal ``troupe.kube.rayjob_manifest`` for the same
values; checkov must report no failed check over all rendered manifests.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (dev extra)")

from troupe.config import ConfigError  # noqa: E402
from troupe.kube.rayjob import chart_values, merge_values, params_configmap, rayjob_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHARTS = ROOT / "charts"
CRDS = ROOT / ".." / "shared" / "k8s" / "crds"
ENVS = ("test", "prod")
ACCELERATORS = ("cpu", "nvidia", "ascend")
KUBE_VERSION = "1.31"
#: What Terraform outputs provide at install time (role ARNs); placeholders for rendering.
ROLE_ARN = "arn:aws:iam::123456789012:role/troupe-{env}-{chart}"

CASES = [("troupe-mlflow", env, None) for env in ENVS] + [
    (chart, env, acc)
    for chart in ("troupe-training", "troupe-serving")
    for env in ENVS
    for acc in ACCELERATORS
]


def case_id(case: tuple[str, str, str | None]) -> str:
    return "-".join(x for x in case if x)


def install_values(chart: str, env: str, acc: str | None) -> dict[str, Any]:
    """The values a `helm install -f values-<env>.yaml --set accelerator=.. --set aws.roleArn=..` gives."""
    vals = yaml.safe_load((CHARTS / chart / f"values-{env}.yaml").read_text()) or {}
    vals = merge_values(vals, {"aws": {"roleArn": ROLE_ARN.format(env=env, chart=chart)}})
    if acc:
        vals["accelerator"] = acc
    return vals


def render(chart: str, values: dict[str, Any], release: str = "troupe", namespace: str = "troupe-test"):
    """Rendered manifests as a list of dicts (empty documents dropped)."""
    out = helm.Chart.load(CHARTS / chart).render(values, name=release, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {case_id(c): render(c[0], install_values(*c), namespace=f"troupe-{c[1]}") for c in CASES}


def _crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def _unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would silently prune (not in a structural schema's properties)."""
    out: list[str] = []
    if isinstance(obj, dict) and "properties" in schema:
        open_ = schema.get("additionalProperties") or schema.get("x-kubernetes-preserve-unknown-fields")
        for k, v in obj.items():
            if k in schema["properties"]:
                out += _unknown_fields(v, schema["properties"][k], f"{path}.{k}")
            elif not open_:
                out.append(f"{path}.{k}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            out += _unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lint_has_no_errors(case: tuple[str, str, str | None]) -> None:
    chart, env, acc = case
    report = helm.lint(CHARTS / chart, install_values(chart, env, acc), namespace=f"troupe-{env}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 3] == []


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_manifests_validate(case: tuple[str, str, str | None], rendered) -> None:
    import kubernetes_validate

    docs = rendered[case_id(case)]
    kinds = {d["kind"] for d in docs}
    expected = {
        "troupe-mlflow": {"Deployment", "Service", "ServiceAccount", "NetworkPolicy"},
        "troupe-training": {"RayJob", "ConfigMap", "ServiceAccount", "NetworkPolicy", "PodDisruptionBudget"},
        "troupe-serving": {"RayService", "ServiceAccount", "NetworkPolicy"},
    }[case[0]]
    assert expected <= kinds
    for d in docs:
        if d["apiVersion"].startswith("ray.io/"):
            schema = _crd_schema(d["kind"])
            jsonschema.Draft7Validator(schema).validate(d)
            assert _unknown_fields(d, schema) == [], d["kind"]
        else:
            kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
        assert d["metadata"]["namespace"] == f"troupe-{case[1]}"


@pytest.mark.parametrize("case", [c for c in CASES if c[2]], ids=case_id)
def test_accelerator_selects_resources(case: tuple[str, str, str | None], rendered) -> None:
    chart, _, acc = case
    kind = "RayJob" if chart == "troupe-training" else "RayService"
    (obj,) = [d for d in rendered[case_id(case)] if d["kind"] == kind]
    cluster = obj["spec"]["rayClusterSpec" if kind == "RayJob" else "rayClusterConfig"]
    accel_group = cluster["workerGroupSpecs"][-1]["template"]["spec"]
    (container,) = accel_group["containers"]
    limits = container["resources"]["limits"]
    resource = {"cpu": None, "nvidia": "nvidia.com/gpu", "ascend": "huawei.com/Ascend910"}[acc]
    suffix = {"cpu": "cpu", "nvidia": "cuda", "ascend": "ascend"}[acc]
    assert container["image"].endswith(f"-{suffix}")
    assert container["image"].startswith("ghcr.io/troupe-ml/troupe:")
    if resource:
        assert limits[resource] >= 1 and container["resources"]["requests"][resource] == limits[resource]
        assert any(t["key"] == resource for t in accel_group["tolerations"])
    else:
        assert not {"nvidia.com/gpu", "huawei.com/Ascend910"} & set(limits)
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
    if kind == "RayJob":
        dshm = [v for v in accel_group["volumes"] if v["name"] == "dshm"]
        assert dshm[0]["emptyDir"]["medium"] == "Memory"
        assert obj["spec"]["entrypoint"] == "troupe train sft --params /etc/troupe/params.yaml"
        assert obj["spec"]["shutdownAfterJobFinishes"] is True
    else:
        serve = yaml.safe_load(obj["spec"]["serveConfigV2"])
        (app,) = serve["applications"]
        assert app["import_path"] == "serving.app:build_app"
        model = app["args"]["model"]
        # model replicas request their device and serve in bf16: vLLM on GPU, transformers on the NPU
        # (no vllm-ascend release fits Ray Serve 2.60, tests/test_images.py)
        assert model["resources"]["accelerator_slot"] == 1
        if acc == "nvidia":
            assert (
                app["args"]["backend"] == "vllm" and model["dtype"] == "bfloat16" and model["num_gpus"] == 1
            )
        elif acc == "ascend":
            assert app["args"]["backend"] == "transformers" and model["dtype"] == "bfloat16"
            assert model["device"] == "npu" and model["resources"]["NPU"] == 1 and model["num_gpus"] == 0
        else:
            assert app["args"]["backend"] == "transformers" and model["num_gpus"] == 0
        assert obj["spec"]["upgradeStrategy"]["type"] == "NewCluster"


def test_env_files_differ_where_they_should(rendered) -> None:
    def serve_app(env: str) -> dict[str, Any]:
        (rs,) = [d for d in rendered[f"troupe-serving-{env}-nvidia"] if d["kind"] == "RayService"]
        return yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]

    def weight(env: str) -> float:
        (router,) = serve_app(env)["deployments"]
        return router["user_config"]["canary_weight_percent"]

    test, prod = serve_app("test"), serve_app("prod")
    assert test["args"]["env"] == "test" and test["args"]["stable_alias"] == "challenger"
    assert test["args"]["canary_alias"] == "" and weight("test") == 0
    assert prod["args"]["env"] == "production" and prod["args"]["stable_alias"] == "champion"
    assert prod["args"]["canary_alias"] == "challenger"
    assert weight("prod") == 5  # a percent: 5 % of conversations start on the challenger
    assert (
        prod["args"]["gateway"]["require_api_key"] is True
        and test["args"]["gateway"]["require_api_key"] is False
    )


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "troupe-serving"], ids=case_id)
def test_serving_chart_matches_the_app(case: tuple[str, str, str | None], rendered, tmp_path: Path) -> None:
    """The RayService's serveConfigV2 is an application serving.app builds: names, arg keys and the
    canary weight's unit come from serving.contract; Ray Serve refuses an override for a deployment
    the built app lacks, so every overridden deployment must be one every build has.

    The app is built offline (Ray Serve's own ``build_app``) with the transformers backend (vLLM
    needs the gpu extra) and local stand-in model dirs for the registered versions.
    """
    from ray.serve._private.build_app import build_app as build_serve_app

    from serving import contract
    from serving.app import build_app, check_args
    from tests.serve_fixtures import characters_file

    _, env, _ = case
    (rs,) = [d for d in rendered[case_id(case)] if d["kind"] == "RayService"]
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    env_name = {"test": "test", "prod": "production"}[env]
    assert app["name"] == contract.app_name(env_name) and app["import_path"] == contract.IMPORT_PATH
    check_args(app["args"])  # ValueError naming any key the app does not know
    for dep in app["deployments"]:
        assert dep["name"] in contract.ALWAYS_DEPLOYED, f"serveConfigV2 overrides {dep['name']!r}"
        contract.check_user_config(dep["user_config"])  # canary_weight_percent, 0-100
    models = []
    for name in ("v1", "v2"):
        (tmp_path / name).mkdir()
        characters_file(tmp_path / name)
        models.append(str(tmp_path / name))
    args = {**app["args"], "backend": "transformers"}
    args.update({contract.STABLE_MODEL_URI: models[0], contract.CANARY_MODEL_URI: models[1]})
    built = build_serve_app(build_app(args), name=app["name"])
    assert {d["name"] for d in app["deployments"]} <= {d.name for d in built.deployments}
    assert built.ingress_deployment_name == contract.ROUTER
    by_name = {d.name: d for d in built.deployments}
    assert by_name[contract.STABLE].ray_actor_options["resources"]["accelerator_slot"] == 1
    # API key hashes: the Secret is mounted read-only where the app reads them
    gateway_pod = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in gateway_pod["containers"][0].get("volumeMounts", [])}
    if app["args"]["gateway"]["require_api_key"]:
        assert app["args"]["gateway"]["api_keys_file"] == contract.API_KEYS_FILE
        assert mounts[contract.API_KEYS_DIR]["readOnly"] is True
        (vol,) = [v for v in gateway_pod["volumes"] if v["name"] == mounts[contract.API_KEYS_DIR]["name"]]
        assert vol["secret"]["secretName"]
    values = yaml.safe_load((CHARTS / "troupe-serving" / "values.yaml").read_text())
    assert values["apiKeys"]["mountPath"] == contract.API_KEYS_DIR
    assert values["apiKeys"]["secretKey"] == contract.API_KEYS_SECRET_KEY
    assert values["app"]["importPath"] == contract.IMPORT_PATH


def test_no_credentials_in_values() -> None:
    for f in CHARTS.glob("*/values*.yaml"):
        text = f.read_text().lower()
        for needle in (
            "aws_secret_access_key:",
            "password:",
            "postgresql://",
            "postgresql+psycopg2://mlflow:",
        ):
            body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
            assert needle not in body, f"{f}: {needle}"


@pytest.mark.parametrize(
    ("chart", "values", "setting"),
    [
        ("troupe-training", {"accelerator": "tpu"}, "set accelerator"),
        ("troupe-training", {"aws": {"roleArn": ""}}, "aws.roleArn"),
        ("troupe-training", {"checkpoints": {"s3Uri": ""}}, "checkpoints.s3Uri"),
        ("troupe-serving", {"accelerator": "tpu"}, "set accelerator"),
        ("troupe-serving", {"apiKeys": {"existingSecret": ""}}, "apiKeys.existingSecret"),
        ("troupe-serving", {"app": {"canaryWeightPercent": 150}}, "app.canaryWeightPercent"),
        ("troupe-serving", {"app": {"canaryWeight": 0.05}}, "canaryWeight"),  # the unit-less key is gone
        # troupe-mlflow's bad values: tests/test_mlflow_chart.py::test_bad_values_fail_naming_the_setting
    ],
)
def test_bad_values_fail_naming_the_setting(chart: str, values: dict[str, Any], setting: str) -> None:
    vals = merge_values(install_values(chart, "prod", None), values)
    with pytest.raises(helm.HelmError, match=setting.replace(".", r"\.")):
        render(chart, vals)


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("acc", ACCELERATORS)
def test_rayjob_manifest_equals_chart(env: str, acc: str) -> None:
    """The Python builder and the chart give the same RayJob and params ConfigMap."""
    overrides = merge_values(install_values("troupe-training", env, acc), {"step": "dpo"})
    overrides["params"] = {"content": "train:\n  accelerator: " + acc + "\n  num_workers: 16\n"}
    values = merge_values(chart_values(CHARTS / "troupe-training", [f"values-{env}.yaml"]), overrides)
    docs = render("troupe-training", overrides, release="run-7", namespace=f"troupe-{env}")
    (chart_job,) = [d for d in docs if d["kind"] == "RayJob"]
    (chart_cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert rayjob_manifest(values, release="run-7", namespace=f"troupe-{env}") == chart_job
    assert params_configmap(values, release="run-7", namespace=f"troupe-{env}") == chart_cm
    assert chart_job["metadata"]["name"] == "run-7-dpo"


def test_rayjob_manifest_rejects_unknown_accelerator() -> None:
    values = chart_values(CHARTS / "troupe-training", ["values-prod.yaml"])
    values = merge_values(values, {"accelerator": "tpu", "aws": {"roleArn": "arn:x"}})
    with pytest.raises(ConfigError, match="set accelerator"):
        rayjob_manifest(values)


def checkov_bin() -> Path:
    """checkov lives in its own venv (it conflicts with the main one): $TROUPE_CHECKOV or .venv-checkov."""
    return Path(os.environ.get("TROUPE_CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))


def run_checkov(args: list[str]) -> dict[str, Any]:
    """Run checkov with ``args`` (+ JSON output); return {check_type: results} and fail if it is absent."""
    exe = checkov_bin()
    if not exe.is_file():
        pytest.fail(
            f"checkov not found at {exe}: python3 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov"
        )
    proc = subprocess.run(
        [str(exe), *args, "-o", "json", "--compact", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        pytest.fail(f"checkov exited {proc.returncode}: {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    return {r.get("check_type", "?"): r.get("results", {}) for r in reports if isinstance(r, dict)}


def failed_checks(results: dict[str, Any]) -> list[str]:
    return [
        f"{c['check_id']} {c.get('resource')} {c.get('file_path')}: {c.get('check_name')}"
        for res in results.values()
        for c in res.get("failed_checks", [])
    ]


def test_checkov_rendered_manifests(tmp_path: Path, rendered) -> None:
    for name, docs in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    results = run_checkov(["-d", str(tmp_path), "--framework", "kubernetes"])
    assert results, "checkov scanned nothing"
    passed = sum(len(r.get("passed_checks", [])) for r in results.values())
    assert passed > 0
    assert failed_checks(results) == []


def test_checkov_dockerfiles() -> None:
    """The images the charts run (docker/Dockerfile.{cpu,cuda,ascend}): non-root, pinned bases."""
    results = run_checkov(["-d", str(ROOT / "docker"), "--framework", "dockerfile"])
    assert sum(len(r.get("passed_checks", [])) for r in results.values()) > 0
    assert failed_checks(results) == []
    for name in ("cpu", "cuda", "ascend"):
        text = (ROOT / "docker" / f"Dockerfile.{name}").read_text()
        assert "USER 10001" in text and ":latest" not in text


def test_catalogue_and_rate_limit_values_reach_the_app() -> None:
    """``app.catalogueUri`` and ``app.gateway.requestsPerMinute``/``burst`` arrive as the args the app
    reads (``catalogue_uri``, ``gateway.limits``), accepted by ``check_args``."""
    from serving import contract
    from serving.app import check_args
    from serving.gateway import Limits

    over = {"app": {"catalogueUri": "s3://troupe-prod/catalogue/characters.jsonl"}}
    over["app"]["gateway"] = {"requestsPerMinute": 30, "burst": 3}
    vals = merge_values(install_values("troupe-serving", "prod", "nvidia"), over)
    (rs,) = [d for d in render("troupe-serving", vals) if d["kind"] == "RayService"]
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    check_args(app["args"])
    assert app["args"][contract.CATALOGUE_URI] == "s3://troupe-prod/catalogue/characters.jsonl"
    limits = Limits.from_dict(app["args"]["gateway"]["limits"])
    assert (limits.requests_per_minute, limits.burst) == (30, 3)
    default = [d for d in render("troupe-serving", install_values("troupe-serving", "prod", "nvidia"))]
    (rs,) = [d for d in default if d["kind"] == "RayService"]
    assert (
        contract.CATALOGUE_URI not in yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    )


def test_feedback_store_url_reaches_the_router_from_a_secret_only() -> None:
    """``app.feedback.existingSecret`` puts the preference store's URL into every Ray container's env as
    ``TROUPE_FEEDBACK_DB_URL`` (the Router reads it when ``feedback_db_url`` is not an arg); the URL
    never appears in serveConfigV2. Off by default: no env, so POST /v1/feedback answers 501."""
    from serving import contract

    def containers(docs: list[dict]) -> list[dict]:
        (rs,) = [d for d in docs if d["kind"] == "RayService"]
        spec = rs["spec"]["rayClusterConfig"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]

    over = {"app": {"feedback": {"existingSecret": "troupe-feedback-db", "secretKey": "dsn"}}}
    docs = render("troupe-serving", merge_values(install_values("troupe-serving", "prod", "nvidia"), over))
    for c in containers(docs):
        (env,) = [e for e in c["env"] if e["name"] == contract.FEEDBACK_DB_URL_ENV]
        assert env["valueFrom"]["secretKeyRef"] == {"name": "troupe-feedback-db", "key": "dsn"}
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    assert contract.FEEDBACK_DB_URL not in rs["spec"]["serveConfigV2"]
    default = render("troupe-serving", install_values("troupe-serving", "prod", "nvidia"))
    assert all(e["name"] != contract.FEEDBACK_DB_URL_ENV for c in containers(default) for e in c["env"])
