"""Terraform (infra/terraform): every file parses, the one platform root uses the shared modules, each
environment is only a var file + backend config, and checkov reports no failed check with either
environment's values (a skip must carry a written reason next to the resource).

``terraform validate`` needs the providers from registry.terraform.io, which this machine cannot
reach; parsing with python-hcl2 and checkov's graph checks stand in for it. ``terraform fmt -check``
runs when a terraform binary is on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

hcl2 = pytest.importorskip("hcl2", reason="pip install python-hcl2 (dev extra)")

ROOT = Path(__file__).resolve().parents[1]
TF = ROOT / "infra" / "terraform"
TF_FILES = sorted(TF.rglob("*.tf"))
ENVS = ("test", "prod")
MODULES = {"vpc", "eks", "s3", "rds", "iam", "ascend"}


def val(x: Any) -> Any:
    """A parsed HCL value without the single-element list wrapping some hcl2 versions add, unquoted."""
    while isinstance(x, list) and len(x) == 1:
        x = x[0]
    if isinstance(x, str) and len(x) >= 2 and x[0] == x[-1] == '"':
        x = x[1:-1]
    return x


def blocks(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    """``{name: body}`` of top-level ``variable`` / ``output`` / ``module`` blocks."""
    out: dict[str, Any] = {}
    for item in doc.get(kind, []):
        out.update({val(k): v for k, v in item.items()})
    return out


def resources(doc: dict[str, Any], rtype: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in doc.get("resource", []):
        for t, named in item.items():
            if val(t) == rtype:
                out.update({val(k): v for k, v in named.items()})
    return out


def parse(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        return hcl2.load(f)


def test_there_is_terraform() -> None:
    assert {p.parent.name for p in TF_FILES} >= MODULES
    assert {"main.tf", "variables.tf", "outputs.tf"} <= {p.name for p in TF.glob("*.tf")}
    for env in ENVS:
        assert (TF / "envs" / f"{env}.tfvars").is_file() and (TF / "envs" / f"{env}.backend.hcl").is_file()


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: str(p.relative_to(TF)))
def test_parses_and_documents_every_variable_and_output(path: Path) -> None:
    doc = parse(path)
    for kind in ("variable", "output"):
        for name, body in blocks(doc, kind).items():
            assert val(body.get("description")), f"{path}: {kind} {name} has no description"


def root() -> dict[str, Any]:
    """The platform root's blocks (main.tf + variables.tf + outputs.tf) merged."""
    doc: dict[str, Any] = {}
    for name in ("main.tf", "variables.tf", "outputs.tf"):
        for kind, items in parse(TF / name).items():
            doc.setdefault(kind, []).extend(items)
    return doc


def load_tfvars(env: str) -> dict[str, Any]:
    """``envs/<env>.tfvars`` as ``{variable: value}`` (hcl2's ``__comments__`` entries dropped)."""
    doc = parse(TF / "envs" / f"{env}.tfvars")
    return {k: val(v) for k, v in doc.items() if not k.startswith("__")}


def test_root_uses_the_shared_modules() -> None:
    doc = root()
    mods = blocks(doc, "module")
    assert set(mods) == MODULES
    for name, body in mods.items():
        source = val(body["source"])
        assert source == f"./modules/{name}", "local modules only (no registry downloads)"
        assert (TF / source).resolve().is_dir()
    outputs = blocks(doc, "output")
    assert {"training_role_arn", "serving_role_arn", "mlflow_role_arn", "checkpoints_bucket"} <= set(outputs)
    # the environment is a variable, never a literal: nothing in the root is test- or prod-specific
    main = (TF / "main.tf").read_text()
    assert not re.search(r"troupe-(test|prod)|10\.(20|30)\.0\.0", main)


@pytest.mark.parametrize("env", ENVS)
def test_env_is_a_var_file_over_declared_variables(env: str) -> None:
    variables = blocks(root(), "variable")
    tfvars = load_tfvars(env)
    assert set(tfvars) <= set(variables), f"{env}.tfvars sets undeclared {set(tfvars) - set(variables)}"
    required = {n for n, body in variables.items() if "default" not in body}
    assert required <= set(tfvars), f"{env}.tfvars misses required {required - set(tfvars)}"
    assert tfvars["env"] == env
    backend = (TF / "envs" / f"{env}.backend.hcl").read_text()
    assert f'key     = "troupe/{env}/terraform.tfstate"' in backend


def test_defaults_are_production_safe_and_test_relaxes_them() -> None:
    variables = blocks(root(), "variable")
    assert val(variables["db_deletion_protection"]["default"]) is True
    assert val(variables["db_multi_az"]["default"]) is True
    assert val(variables["force_destroy_buckets"]["default"]) is False
    test = load_tfvars("test")
    assert test["db_deletion_protection"] is False and test["force_destroy_buckets"] is True


def test_gpu_node_groups_are_tainted_and_efa_capable() -> None:
    doc = parse(TF / "modules" / "eks" / "main.tf")
    gpu = val(resources(doc, "aws_eks_node_group")["gpu"])
    taint = val(gpu["taint"])
    assert val(taint["key"]) == "nvidia.com/gpu" and val(taint["effect"]) == "NO_SCHEDULE"
    text = (TF / "modules" / "eks" / "main.tf").read_text()
    assert 'interface_type     = "efa"' in text
    gpu_default = (TF / "variables.tf").read_text()  # prod's node groups are the defaults
    assert "p4d.24xlarge" in gpu_default and "p5.48xlarge" in gpu_default


def test_buckets_are_encrypted_versioned_and_private() -> None:
    doc = parse(TF / "modules" / "s3" / "bucket" / "main.tf")
    for rtype in (
        "aws_s3_bucket_versioning",
        "aws_s3_bucket_server_side_encryption_configuration",
        "aws_s3_bucket_public_access_block",
        "aws_s3_bucket_lifecycle_configuration",
    ):
        assert resources(doc, rtype), rtype
    pab = val(resources(doc, "aws_s3_bucket_public_access_block")["this"])
    assert all(
        val(pab[k]) is True
        for k in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets")
    )


def test_rds_is_private_and_encrypted() -> None:
    db = val(resources(parse(TF / "modules" / "rds" / "main.tf"), "aws_db_instance")["this"])
    assert val(db["publicly_accessible"]) is False and val(db["storage_encrypted"]) is True
    assert val(db["manage_master_user_password"]) is True  # no password in Terraform state or code


def test_every_checkov_skip_has_a_reason() -> None:
    for path in TF_FILES:
        for line in path.read_text().splitlines():
            if "checkov:skip" in line:
                m = re.search(r"#checkov:skip=(CKV2?_AWS_\d+):(.+)$", line)
                assert m and len(m.group(2).strip()) > 15, f"{path}: {line.strip()}"


def test_terraform_fmt() -> None:
    exe = shutil.which("terraform")
    if not exe:
        pytest.skip("no terraform binary on PATH")
    proc = subprocess.run([exe, "fmt", "-check", "-recursive", str(TF)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("env", ENVS)
def test_checkov_has_no_failed_check(env: str) -> None:
    exe = Path(os.environ.get("TROUPE_CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
    if not exe.is_file():
        pytest.fail(
            f"checkov not found at {exe}: python3 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov"
        )
    proc = subprocess.run(
        [
            str(exe),
            "-d",
            str(TF),
            "--var-file",
            str(TF / "envs" / f"{env}.tfvars"),
            "--framework",
            "terraform",
            "-o",
            "json",
            "--compact",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        pytest.fail(f"checkov exited {proc.returncode}: {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    (tf,) = [r for r in reports if r.get("check_type") == "terraform"]
    assert tf["summary"]["parsing_errors"] == 0
    assert tf["summary"]["passed"] > 100
    failed = [
        f"{c['check_id']} {c['resource']} {c['file_path']}: {c['check_name']}"
        for c in tf["results"]["failed_checks"]
    ]
    assert failed == []
