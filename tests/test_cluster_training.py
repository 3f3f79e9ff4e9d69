"""Cluster-in-a-box, training: the KFP step -> RayJob -> Ray Train on two nodes -> S3 -> MLflow path.

Real parts: a two-node Ray cluster (``ray start`` head + a worker node, each node's processes with
their own scratch dir, :mod:`tests.cluster_box`), a moto S3 server on loopback as the only storage
the nodes share, a real ``mlflow server``, KFP's local runner, the training chart's RayJob as
``troupe rayjob submit`` builds it (equal to ``helm template``, tests/test_rayjob.py).

The one stand-in is the Kubernetes API (none can run here): :class:`tests.kube_standin.KubeRayStandIn`
does what KubeRay does with the RayJob - mounts the params ConfigMap, submits ``spec.entrypoint``
and ``spec.runtimeEnvYAML`` through Ray's Job Submission API, retries up to ``backoffLimit`` and stops
the job when the RayJob is deleted - on the running local cluster instead of a fresh RayCluster.

What the tests show (issue 9, item 2):
* every input and output of SFT and DPO is an ``s3://`` URI; each node downloads what it reads into
  its own scratch (the driver drops its downloads before workers start); the registered model loads
  from S3 into an empty directory;
* a RayJob attempt stopped mid-run is retried by "KubeRay" with the same identity and resumes from
  its last checkpoint (not step 0), each rank downloading only its own ZeRO shard, old checkpoints
  pruned (``num_to_keep``), while the KFP step waits through the FAILED/Retrying states;
* SIGTERM to the submitting step deletes the RayJob and stops the Ray job;
* a RayJob whose inputs are local paths or missing objects is refused before anything is created.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster_box import mlflow_server, ray_cluster, s3  # noqa: F401 - fixtures
from tests.kube_standin import KubeRayStandIn

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


def _write_splits(dest: Path) -> Path:
    """A small train split of the project's sample data (two characters, 8 dialogues)."""
    from troupe.contract import Character, Dialogue, read_jsonl, write_jsonl

    chars = {c.id: c for c in read_jsonl(SAMPLE / "characters.jsonl", Character)}
    keep = ["lin_xiaoman", "su_tang"]
    ds = [d for d in read_jsonl(SAMPLE / "dialogues.jsonl", Dialogue) if d.character_id in keep]
    ds = [d for c in keep for d in ds if d.character_id == c][:4] + [
        d for d in ds if d.character_id == keep[1]
    ][:4]
    dest.mkdir(parents=True, exist_ok=True)
    write_jsonl(dest / "characters.jsonl", [chars[c] for c in keep])
    write_jsonl(dest / "train.jsonl", ds)
    return dest


@pytest.fixture(scope="module")
def box(s3, ray_cluster, mlflow_server, tiny_model_dir, tmp_path_factory):  # noqa: F811
    """Inputs on S3, a params file whose every path is a URI, the KubeRay stand-in and a kubeconfig."""
    from troupe import storage

    tmp = tmp_path_factory.mktemp("cluster-training")
    root = f"s3://{s3.bucket}/troupe"
    storage.upload(tiny_model_dir, f"{root}/inputs/base_model")
    storage.upload(_write_splits(tmp / "splits"), f"{root}/inputs/splits")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"].update(
        base_model=f"{root}/inputs/base_model",
        splits=f"{root}/inputs/splits",
        sft_model=f"{root}/r1/sft_model",
        pairs=f"{root}/r1/pairs",
        dpo_model=f"{root}/r1/dpo_model",
    )
    params["model"]["base"] = "tiny-random"
    params["data"]["cutoff_len"] = 768  # the zh persona cards are ~450 tokens
    # SPREAD: one rank per node here, so the test sees what crosses nodes (production packs ranks)
    params["train"].update(accelerator="cpu", num_workers=2, zero_stage=3, checkpoint_num_to_keep=1,
                           placement_strategy="SPREAD")  # fmt: skip
    params["sft"].update(max_steps=6, per_device_batch_size=1, learning_rate=1e-3)
    params["pairs"].update(max_pairs=4, max_new_tokens=8)
    params["dpo"].update(max_steps=2, per_device_batch_size=1, gradient_accumulation_steps=1)
    params["registry"]["tracking_uri"] = mlflow_server.uri
    pfile = tmp / "params.yaml"
    pfile.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    mounts = tmp / "mounts"
    with KubeRayStandIn(ray_cluster.dashboard_url, mounts) as kube:
        yield {
            "root": root, "params": params, "pfile": pfile, "kube": kube, "tmp": tmp,
            "kubeconfig": kube.kubeconfig(tmp / "kubeconfig"), "mounts": mounts,
            "cluster": ray_cluster, "mlflow": mlflow_server, "s3": s3,
        }  # fmt: skip


def chart_sets(box: dict[str, Any], release: str) -> list[str]:
    """Chart values a cluster install would give, with the stand-ins' addresses."""
    return [
        "aws.existingSecret=troupe-aws",  # moto credentials come from the nodes' environment
        f"mlflow.trackingUri={box['mlflow'].uri}",
        f"params.mountPath={box['mounts']}/{release}",
        "checkpoints.everySteps=2",
        f"checkpoints.s3Uri={box['root']}/{release}/checkpoints",
    ]


class Chaos(threading.Thread):
    """Stops the first Ray job attempt of a RayJob once its first checkpoint is registered (a lost
    node, a preempted spot instance) and records every listing of the run's checkpoint prefix.

    "Registered" = listed in Ray Train's checkpoint-manager snapshot in storage, which is what a new
    attempt restores from; a checkpoint uploaded but not yet registered (the controller collects
    reports on its ~2 s poll) is lost with the attempt, in production as here."""

    def __init__(self, kube: KubeRayStandIn, rayjob: str, s3box, ckpt_prefix: str):
        super().__init__(daemon=True)
        self.kube, self.rayjob, self.s3 = kube, rayjob, s3box
        self.key = ckpt_prefix.split("/", 3)[3]  # s3://bucket/<key>
        self.listings: list[list[str]] = []
        self.stopped: str | None = None
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        # boto3 on its own client: this thread only observes storage, as an outside tool would
        client = self.s3.client()
        while not self.done.is_set():
            try:
                keys = [o["Key"][len(self.key) + 1 :] for o in
                        client.list_objects_v2(Bucket=self.s3.bucket, Prefix=self.key + "/").get("Contents", [])]  # fmt: skip
                names = sorted({k.split("/")[0] for k in keys if k.startswith("checkpoint-")})
                registered = False
                if "checkpoint_manager_snapshot.json" in keys:
                    body = client.get_object(
                        Bucket=self.s3.bucket, Key=f"{self.key}/checkpoint_manager_snapshot.json"
                    )
                    registered = "checkpoint-0" in body["Body"].read().decode()
            except Exception as e:  # noqa: BLE001 - keep observing
                self.errors.append(repr(e)[:200])
                names, registered = [], False
            if names:
                self.listings.append(names)
            attempts = self.kube.attempts.get(self.rayjob) or []
            if self.stopped is None and attempts and registered:
                self.stopped = attempts[0]
                self.kube.jobs.stop_job(attempts[0])
            time.sleep(0.3)


@pytest.mark.timeout(900)
def test_kfp_step_runs_sft_as_rayjob_survives_a_lost_attempt_and_resumes(
    box: dict[str, Any], monkeypatch
) -> None:
    """KFP local runner -> train_sft component (kubernetes=True) -> RayJob via the API stand-in ->
    Ray Job API on two nodes; attempt 0 is stopped after its first checkpoint; the retry resumes."""
    from kfp import dsl, local
    from kfp.dsl import Dataset, Model, Output

    from components import steps
    from troupe import storage

    monkeypatch.setenv("KUBECONFIG", str(box["kubeconfig"]))
    run_id = "kfp-run-1"
    release = "troupe-kfp-run-1"
    params = json.loads(json.dumps(box["params"]))
    for k in ("base_model", "splits"):  # the KFP step starts from its own (pod-local) artifacts
        params["paths"][k] = str(storage.local_copy(params["paths"][k]))

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def stage_dataset(src: str, out: Output[Dataset]):
        import shutil

        shutil.copytree(src, out.path)

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def stage_model(src: str, out: Output[Model]):
        import shutil

        shutil.copytree(src, out.path)

    @dsl.pipeline(name="sft-on-kuberay")
    def sft_pipeline(params_yaml: str, splits_src: str, model_src: str) -> None:
        splits = stage_dataset(src=splits_src).outputs["out"]
        base = stage_model(src=model_src).outputs["out"]
        steps.train_sft(
            params_yaml=params_yaml, splits=splits, base_model=base, kubernetes=True,
            storage_root=f"{box['root']}/kfp", run_id=run_id, rayjob_namespace="troupe-test",
            rayjob_env="test",
            # the step itself puts checkpoints under its storage root
            rayjob_values=[v for v in chart_sets(box, release) if not v.startswith("checkpoints.s3Uri")],
        )  # fmt: skip

    rayjob = f"{release}-sft"
    ckpts = f"{box['root']}/kfp/{release}/checkpoints/sft-{run_id}"
    chaos = Chaos(box["kube"], rayjob, box["s3"], ckpts)
    chaos.start()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(box["tmp"] / "kfp-root"))
    try:
        sft_pipeline(
            params_yaml=yaml.safe_dump(params, allow_unicode=True),
            splits_src=params["paths"]["splits"],
            model_src=params["paths"]["base_model"],
        )
    finally:
        chaos.done.set()
    kube = box["kube"]
    # KubeRay ran two attempts of the same RayJob: the first stopped, the retry succeeded
    assert kube.attempts[rayjob] == [f"{rayjob}-0", f"{rayjob}-1"], (
        kube.events,
        chaos.errors[-3:],
        chaos.listings[-3:],
    )
    assert chaos.stopped == f"{rayjob}-0"
    assert kube.jobs.get_job_status(f"{rayjob}-0").value == "STOPPED"
    assert kube.jobs.get_job_status(f"{rayjob}-1").value == "SUCCEEDED"
    out = f"{box['root']}/kfp/{release}/sft_model"
    log = json.loads(storage.read_text(f"{out}/train_log.json"))
    assert log["resumed_from_step"] and log["resumed_from_step"] >= 2, log  # not step 0
    assert log["global_step"] == 6
    # inputs went to S3 before the RayJob was created (pod-local artifact paths never reach Ray)
    assert storage.exists(f"{box['root']}/kfp/{release}/inputs/splits/train.jsonl")
    # num_to_keep=1: a newer checkpoint replaced the first while the run went on
    assert any("checkpoint-000002" not in names for names in chaos.listings if names), chaos.listings
    # each rank downloaded only its own ZeRO shard on resume, each on its own node's scratch
    resumed = {}
    for scratch in box["cluster"].scratch_dirs().values():
        for f in Path(scratch).glob(f"runs/sft-{run_id}/resume-rank*/troupe_resume.json"):
            got = json.loads(f.read_text())
            resumed[got["rank"]] = (scratch, got)
    assert set(resumed) == {0, 1}, resumed
    assert resumed[0][0] != resumed[1][0]  # the two ranks ran on different nodes
    for rank, (_, got) in resumed.items():
        assert any(f"zero_pp_rank_{rank}_" in f for f in got["downloaded"])
        assert not any(f"zero_pp_rank_{1 - rank}_" in f for f in got["downloaded"])
    # each node fetched the base model itself (no node read another node's files)
    for scratch in box["cluster"].scratch_dirs().values():
        assert any(Path(scratch, "inputs").glob("*/config.json")), scratch
    box["sft_model"] = out


@pytest.mark.timeout(900)
def test_dpo_rayjob_on_s3_then_registered_model_loads_from_s3(box: dict[str, Any], monkeypatch) -> None:
    """pairs in-process from the SFT model on S3; DPO as a RayJob; MLflow registers the S3 URI."""
    import mlflow
    from click.testing import CliRunner

    from troupe import storage
    from troupe.cli import main as troupe_main
    from troupe.kube.cli import rayjob_cli

    sft = box.get("sft_model")
    if sft is None:
        pytest.fail("needs the SFT model of the previous test (run the module, not this test alone)")
    monkeypatch.setenv("KUBECONFIG", str(box["kubeconfig"]))
    params = json.loads(json.dumps(box["params"]))
    params["paths"]["sft_model"] = sft
    pfile = box["tmp"] / "params-dpo.yaml"
    pfile.write_text(yaml.safe_dump(params, allow_unicode=True))
    troupe_main(["train", "pairs", "--params", str(pfile)])  # exits non-zero on failure
    assert storage.exists(f"{params['paths']['pairs']}/pairs.jsonl")
    release = "r1"
    args = ["submit", "--step", "dpo", "--params", str(pfile), "--env", "test", "-n", "troupe-test",
            "--release", release, "--poll", "1"]  # fmt: skip
    for s in chart_sets(box, release):
        args += ["--chart-set", s]
    res = CliRunner().invoke(rayjob_cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    dpo = params["paths"]["dpo_model"]
    assert json.loads(storage.read_text(f"{dpo}/train_log.json"))["global_step"] == 2
    # MLflow registers the model from its URI; it loads from S3 into an empty directory
    client = mlflow.MlflowClient(box["mlflow"].uri)
    client.create_registered_model("cluster-box")
    mv = client.create_model_version("cluster-box", source=dpo)
    from troupe.registry import resolve_model_dir

    empty = box["tmp"] / "empty"
    got = resolve_model_dir(
        f"models:/cluster-box/{mv.version}", tracking_uri=box["mlflow"].uri, cache_dir=empty
    )
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(got)).num_parameters() > 0
    assert str(got).startswith(str(empty))


def test_sigterm_to_the_submitting_step_deletes_the_rayjob(box: dict[str, Any]) -> None:
    """KFP stops a run by deleting its pod: the step gets SIGTERM and must not leave training running."""
    release = "r-sigterm"
    env = {**os.environ, "KUBECONFIG": str(box["kubeconfig"])}
    args = [str(Path(sys.executable).with_name("troupe")), "rayjob", "submit", "--step", "sft", "--params",
            str(box["pfile"]), "--env", "test", "-n", "troupe-test", "--release", release, "--poll", "0.5"]  # fmt: skip
    for s in chart_sets(box, release):
        args += ["--chart-set", s]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kube = box["kube"]
    rayjob = f"{release}-sft"
    deadline = time.time() + 180
    while time.time() < deadline:
        sids = kube.attempts.get(rayjob) or []
        if sids and kube.jobs.get_job_status(sids[0]).value == "RUNNING":
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"RayJob never ran: {proc.communicate()[0][-2000:]}")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert rayjob in kube.deleted, out
    deadline = time.time() + 60
    while (
        kube.jobs.get_job_status(f"{rayjob}-0").value not in ("STOPPED", "FAILED") and time.time() < deadline
    ):
        time.sleep(0.5)
    assert kube.jobs.get_job_status(f"{rayjob}-0").value == "STOPPED"


def test_rayjob_with_unreachable_inputs_is_refused_before_creation(box: dict[str, Any], monkeypatch) -> None:
    """A local path or a missing object in paths.* fails at submission, naming the setting."""
    from click.testing import CliRunner

    from troupe.kube.cli import rayjob_cli

    monkeypatch.setenv("KUBECONFIG", str(box["kubeconfig"]))
    before = len(box["kube"].created)
    cases = (
        (
            ["--set", "paths.splits=/minio/mlpipeline/splits"],
            "paths.splits='/minio/mlpipeline/splits': a local path",
        ),
        (["--set", f"paths.base_model={box['root']}/nope"], f"paths.base_model: {box['root']}/nope: no such"),
        (
            ["--chart-set", "checkpoints.s3Uri=s3://no-such-bucket/runs"],
            "bucket s3://no-such-bucket does not exist",
        ),
    )
    for extra, needle in cases:
        args = ["submit", "--step", "sft", "--params", str(box["pfile"]), "--env", "test", "--release", "bad"]
        args += sum((["--chart-set", s] for s in chart_sets(box, "bad")), []) + extra
        res = CliRunner().invoke(rayjob_cli, args)
        assert res.exit_code != 0 and needle in (res.output + str(res.exception)), (res.output, res.exception)
    assert len(box["kube"].created) == before
