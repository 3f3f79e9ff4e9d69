"""Terraform (infra/terraform): every file parses, the one platform root uses the shared modules, each
environment is only a var file + backend config, and checkov reports no failed check with either
environment's values (a skip must carry a written reason next to the resource).

What a cluster needs besides the cluster itself is asserted resource by resource: EBS CSI driver
(IRSA role, default StorageClass), VPC CNI network policy, NVIDIA and EFA device plugins,
cluster-autoscaler with scale-from-zero tags on the GPU groups, S3 gateway endpoint, an access-log
bucket the S3 logging service may write to, EFA interfaces and a placement group sized to the instance
type, and an AWS root that needs no Huawei Cloud provider (the CCE path is its own root).

``terraform init`` needs the providers from registry.terraform.io, which this machine cannot reach;
parsing with python-hcl2 and checkov's graph checks stand in for it. ``terraform fmt -check`` runs
when a terraform binary is on PATH; ``terraform test`` plans both environments against a mocked AWS
provider when a local copy of the AWS provider is there (``TROUPE_TF_PLUGIN_DIR``).
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
MODULES = {"vpc", "eks", "addons", "s3", "rds", "iam", "ascend"}
#: The Huawei Cloud CCE node pool: a root of its own, the only place the huaweicloud provider appears.
CCE_ROOT = TF / "ascend-cce"
#: A filesystem mirror holding registry.terraform.io/hashicorp/aws (for ``terraform test`` offline).
PLUGIN_DIR = Path(os.environ.get("TROUPE_TF_PLUGIN_DIR", "/opt/tf-plugins"))


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


def module(name: str) -> dict[str, Any]:
    """All blocks of ``modules/<name>/*.tf`` merged (a module may span several files)."""
    doc: dict[str, Any] = {}
    for path in sorted((TF / "modules" / name).glob("*.tf")):
        for kind, items in parse(path).items():
            doc.setdefault(kind, []).extend(items)
    return doc


def module_text(name: str) -> str:
    return "\n".join(p.read_text() for p in sorted((TF / "modules" / name).glob("*.tf")))


def data_sources(doc: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Like ``resources`` for ``data`` blocks."""
    out: dict[str, Any] = {}
    for item in doc.get("data", []):
        for t, named in item.items():
            if val(t) == dtype:
                out.update({val(k): v for k, v in named.items()})
    return out


def locals_(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in doc.get("locals", []):
        out.update(item)
    return out


def unquote_keys(x: Any) -> Any:
    """hcl2 keeps the quotes of quoted map keys and string values: drop them, recursively."""
    if isinstance(x, dict):
        return {val(k): unquote_keys(v) for k, v in x.items() if not str(k).startswith("__")}
    if isinstance(x, list):
        return [unquote_keys(v) for v in x]
    return val(x)


def addon(name: str) -> dict[str, Any]:
    """The ``aws_eks_addon`` of modules/eks whose addon_name is ``name`` (fails if there is none)."""
    found = [b for b in resources(module("eks"), "aws_eks_addon").values() if val(b["addon_name"]) == name]
    assert len(found) == 1, f"modules/eks installs no EKS add-on {name}"
    return found[0]


def irsa_role(role_ref: str) -> tuple[str, str]:
    """``(role key, service account)`` of a modules/eks system IRSA role reference like
    ``aws_iam_role.system["ebs-csi"].arn``, from the role's trust policy."""
    m = re.fullmatch(r'\$\{aws_iam_role\.system\["([\w-]+)"\]\.(arn|id|name)\}', role_ref)
    assert m, f"not a modules/eks system IRSA role: {role_ref}"
    accounts = unquote_keys(locals_(module("eks"))["system_service_accounts"])
    trust = data_sources(module("eks"), "aws_iam_policy_document")["system_assume"]
    conditions = {
        val(c["variable"]).split(":")[-1]: val(c["values"]) for c in trust["statement"][0]["condition"]
    }
    assert "AssumeRoleWithWebIdentity" in str(trust["statement"][0]["actions"])
    assert conditions["sub"] == "system:serviceaccount:kube-system:${each.value}"
    assert conditions["aud"] == "sts.amazonaws.com"
    return m.group(1), accounts[m.group(1)]


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
    assert '"efa" : "efa-only"' in text  # EFA on card 0, EFA-only on the others
    gpu_default = (TF / "variables.tf").read_text()  # prod's node groups are the defaults
    assert "p4d.24xlarge" in gpu_default and "p5.48xlarge" in gpu_default


def test_efa_interfaces_and_placement_group_follow_the_instance_type() -> None:
    """One EFA per network card of the instance type (p4d 4, p5 32; was: 1 on every type) and every
    EFA group in a cluster placement group (was: none)."""
    eks = module("eks")
    assert "gpu_instance_types" in locals_(eks), "no per-instance-type EFA/GPU map in modules/eks"
    types = unquote_keys(locals_(eks)["gpu_instance_types"])
    assert types["p4d.24xlarge"]["efa_interfaces"] == 4 and types["p5.48xlarge"]["efa_interfaces"] == 32
    assert all(t["gpus"] == 8 for t in types.values())
    # every GPU type the environments use has a row (else the node group's precondition fails the plan)
    for groups in [val(blocks(root(), "variable")["gpu_node_groups"]["default"])] + [
        load_tfvars(env).get("gpu_node_groups", {}) for env in ENVS
    ]:
        assert {val(g["instance_type"]) for g in unquote_keys(groups).values()} <= set(types)
    gpu = locals_(eks)["gpu"]
    assert "lookup(local.gpu_instance_types, g.instance_type" in val(locals_(eks)["gpu_type"])
    assert "efa_count = g.efa ? local.gpu_type[k].efa_interfaces : 0" in gpu
    lt = resources(eks, "aws_launch_template")["node"]
    dynamic = {val(k): v for d in lt["dynamic"] for k, v in d.items()}
    nics = dynamic["network_interfaces"]
    assert val(nics["for_each"]) == "${range(each.value.efa_count)}"
    content = nics["content"][0]
    assert val(content["network_card_index"]) == "${network_interfaces.value}"
    assert val(content["interface_type"]) == '${network_interfaces.value == 0 ? "efa" : "efa-only"}'
    assert val(content["device_index"]) == "${network_interfaces.value == 0 ? 0 : 1}"
    placement = dynamic["placement"]
    assert "aws_placement_group.efa[each.key].name" in val(placement["for_each"])
    pg = resources(eks, "aws_placement_group")["efa"]
    assert val(pg["strategy"]) == "cluster" and "if g.efa" in val(pg["for_each"])
    node_group = resources(eks, "aws_eks_node_group")["gpu"]
    assert "each.value.efa ? [var.subnet_ids[0]]" in val(node_group["subnet_ids"])  # one AZ
    # what the charts request per pod comes out of the root
    out = val(blocks(root(), "output")["gpu_node_groups"]["value"])
    assert out == "${module.eks.gpu_node_groups}"
    assert "efa_per_node  = g.efa_count" in module_text("eks")


def test_ebs_csi_driver_addon_with_irsa_role() -> None:
    """Without the EBS CSI driver (and, on EKS >= 1.30, a default StorageClass) every PVC stays Pending."""
    ebs = addon("aws-ebs-csi-driver")
    role, account = irsa_role(val(ebs["service_account_role_arn"]))
    assert account == "ebs-csi-controller-sa"
    attach = resources(module("eks"), "aws_iam_role_policy_attachment")["ebs_csi"]
    assert val(attach["role"]) == f'${{aws_iam_role.system["{role}"].name}}'
    assert val(attach["policy_arn"]).endswith(":iam::aws:policy/service-role/AmazonEBSCSIDriverPolicy")
    config = val(ebs["configuration_values"])
    assert "defaultStorageClass = {enabled = true}" in config  # gp3 StorageClass marked default
    assert "tolerateAllTaints = true" in config  # node DaemonSet on the tainted GPU nodes too


def test_vpc_cni_enforces_network_policies() -> None:
    """The charts ship NetworkPolicies; the VPC CNI enforces them only with its network policy agent on."""
    cni = addon("vpc-cni")
    assert val(cni["configuration_values"]) == '${jsonencode({enableNetworkPolicy = "true"})}'
    assert val(cni["resolve_conflicts_on_create"]) == "OVERWRITE"
    # nodes come up after the add-on, so none runs without the policy agent
    for name in ("pool", "gpu"):
        node_group = resources(module("eks"), "aws_eks_node_group")[name]
        assert "${aws_eks_addon.vpc_cni}" in node_group["depends_on"]


def test_gpu_device_plugins_are_installed() -> None:
    """NVIDIA (nvidia.com/gpu) and EFA (vpc.amazonaws.com/efa) device plugins on the GPU nodes."""
    mods = blocks(root(), "module")
    assert val(mods["addons"]["source"]) == "./modules/addons"
    releases = resources(module("addons"), "helm_release")
    charts = {val(r["chart"]): r for r in releases.values()}
    nvidia, efa = charts["nvidia-device-plugin"], charts["aws-efa-k8s-device-plugin"]
    assert val(nvidia["repository"]) == "https://nvidia.github.io/k8s-device-plugin"
    assert val(efa["repository"]) == "https://aws.github.io/eks-charts"
    variables = blocks(module("addons"), "variable")
    for release in (nvidia, efa):
        assert val(release["namespace"]) == "kube-system"
        version = val(release["version"]).removeprefix("${var.").removesuffix("}")
        assert val(variables[version]["default"]), "chart versions are pinned"
    # the NVIDIA chart's default affinity wants Node Feature Discovery labels EKS nodes lack
    assert 'key = "troupe.ai/pool", operator = "In", values = ["gpu"]' in val(nvidia["values"])
    # the EFA plugin must tolerate the GPU taint to run where the EFAs are
    toleration = unquote_keys(locals_(module("addons"))["gpu_toleration"])
    assert toleration == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert "tolerations = [local.gpu_toleration]" in val(efa["values"])
    # the helm provider authenticates with the aws identity (no static credentials)
    (helm,) = [v for p in root()["provider"] for k, v in p.items() if val(k) == "helm"]
    exec_ = helm["kubernetes"][0]["exec"][0]
    assert val(exec_["command"]) == "aws" and [val(a) for a in exec_["args"][:2]] == ["eks", "get-token"]


def test_gpu_groups_scale_from_zero_with_cluster_autoscaler() -> None:
    """The docs say GPU groups scale from 0: an autoscaler with its IRSA role, and on each GPU group's ASG
    the node-template tags it needs to plan a node that does not exist yet (GPUs, EFAs, labels, taint)."""
    releases = {val(r["chart"]): r for r in resources(module("addons"), "helm_release").values()}
    ca = releases["cluster-autoscaler"]
    assert val(ca["repository"]) == "https://kubernetes.github.io/autoscaler"
    values = val(ca["values"])
    assert "autoDiscovery = {clusterName = var.cluster_name}" in values
    assert (
        'name = "cluster-autoscaler"' in values
        and '"eks.amazonaws.com/role-arn" = var.cluster_autoscaler_role_arn' in values
    )
    mods = blocks(root(), "module")
    role, account = irsa_role(
        val(mods["addons"]["cluster_autoscaler_role_arn"]).replace(
            'module.eks.system_role_arns["cluster-autoscaler"]',
            'aws_iam_role.system["cluster-autoscaler"].arn',
        )
    )
    assert (role, account) == ("cluster-autoscaler", "cluster-autoscaler")
    policy = data_sources(module("eks"), "aws_iam_policy_document")["cluster_autoscaler"]
    scale = [st for st in policy["statement"] if "autoscaling:SetDesiredCapacity" in str(st["actions"])]
    assert scale and "aws:ResourceTag/k8s.io/cluster-autoscaler/${var.name}" in str(scale[0]["condition"])
    # scale-from-zero template tags on the GPU groups' ASGs
    eks = module("eks")
    tags = val(locals_(eks)["gpu_asg_tags"])
    template = val(locals_(eks)["ca_template"])
    assert template == "k8s.io/cluster-autoscaler/node-template"
    for piece in (
        '"${local.ca_template}/resources/nvidia.com/gpu" = tostring(g.gpus)',
        '"${local.ca_template}/taint/nvidia.com/gpu" = "true:NoSchedule"',
        '{for l, v in g.labels : "${local.ca_template}/label/${l}" => v}',
        'g.efa ? {"${local.ca_template}/resources/vpc.amazonaws.com/efa" = tostring(g.efa_count)}',
    ):
        assert piece in tags, piece
    asg_tag = resources(eks, "aws_autoscaling_group_tag")["gpu_template"]
    assert val(asg_tag["for_each"]) == "${local.gpu_asg_tags}"
    assert "aws_eks_node_group.gpu[each.value.group].resources[0].autoscaling_groups[0].name" in val(
        asg_tag["autoscaling_group_name"]
    )
    assert val(asg_tag["tag"][0]["propagate_at_launch"]) is False
    # the labels the template advertises are the node group's own, including the accelerator label the
    # autoscaler uses to wait for the device plugin
    assert val(resources(eks, "aws_eks_node_group")["gpu"]["labels"]) == "${each.value.labels}"
    assert '"k8s.amazonaws.com/accelerator" = local.gpu_type[k].accelerator' in val(locals_(eks)["gpu"])
    # groups start at 0 and the autoscaler, not Terraform, owns desired_size afterwards
    defaults = unquote_keys(val(blocks(root(), "variable")["gpu_node_groups"]["default"]))
    assert all(g["min"] == 0 and g["desired"] == 0 for g in defaults.values())
    lifecycle = resources(eks, "aws_eks_node_group")["gpu"]["lifecycle"][0]
    assert "${scaling_config[0].desired_size}" in str(lifecycle["ignore_changes"])


def test_s3_gateway_endpoint_on_the_private_route_tables() -> None:
    endpoint = resources(module("vpc"), "aws_vpc_endpoint")["s3"]
    assert val(endpoint["vpc_endpoint_type"]) == "Gateway"
    assert val(endpoint["service_name"]).endswith(".s3")
    assert val(endpoint["route_table_ids"]) == "${aws_route_table.private[*].id}"


def test_access_log_bucket_lets_the_s3_logging_service_write() -> None:
    """With BucketOwnerEnforced (no ACLs) S3 server access logs arrive only if the target bucket's policy
    allows logging.s3.amazonaws.com to put objects; the old log bucket had no policy at all."""
    s3 = module("s3")
    policies = resources(s3, "aws_s3_bucket_policy")
    assert len(policies) == 1, "modules/s3 puts no bucket policy on the access-log bucket"
    (policy_res,) = policies.values()
    assert val(policy_res["bucket"]) == "${aws_s3_bucket.logs.id}"
    doc_name = (
        val(policy_res["policy"]).removeprefix("${data.aws_iam_policy_document.").removesuffix(".json}")
    )
    statements = data_sources(s3, "aws_iam_policy_document")[doc_name]["statement"]
    (delivery,) = [
        st
        for st in statements
        if [val(i) for i in st["principals"][0]["identifiers"]] == ["logging.s3.amazonaws.com"]
    ]
    assert val(delivery.get("effect", "Allow")) == "Allow"
    assert [val(a) for a in delivery["actions"]] == ["s3:PutObject"]
    assert [val(r) for r in delivery["resources"]] == ["${aws_s3_bucket.logs.arn}/*"]
    conditions = {val(c["variable"]) for c in delivery["condition"]}
    assert conditions == {"aws:SourceArn", "aws:SourceAccount"}  # only our buckets, only our account
    # the data buckets log there, unconditionally (a count on the not-yet-known bucket name broke the plan)
    assert val(blocks(s3, "module")["bucket"]["log_bucket"]) == "${aws_s3_bucket.logs.id}"
    logging = resources(parse(TF / "modules" / "s3" / "bucket" / "main.tf"), "aws_s3_bucket_logging")["this"]
    assert "count" not in logging
    sse = resources(s3, "aws_s3_bucket_server_side_encryption_configuration")["logs"]
    assert val(sse["rule"][0]["apply_server_side_encryption_by_default"][0]["sse_algorithm"]) == "AES256"


def _required_providers(doc: dict[str, Any]) -> set[str]:
    return {
        val(name)
        for block in doc.get("terraform", [])
        for providers in block.get("required_providers", [])
        for name in providers
        if not name.startswith("__")
    }


def test_aws_root_needs_no_huawei_provider() -> None:
    """``terraform init`` of the AWS root installs every provider any of its modules names: the CCE node pool
    lived in modules/ascend, so an AWS-only install needed the huaweicloud provider (and its credentials at
    plan). It is now the root ascend-cce/, which nothing in the AWS root references."""
    aws_files = [p for p in TF_FILES if CCE_ROOT not in p.parents]
    for path in aws_files:
        doc = parse(path)
        assert "huaweicloud" not in _required_providers(doc), path
        assert all(not val(k).startswith("huaweicloud") for p in doc.get("provider", []) for k in p), path
        for kind in ("resource", "data"):
            types = {val(t) for item in doc.get(kind, []) for t in item}
            assert not any(t.startswith("huaweicloud_") for t in types), f"{path}: {types}"
        assert "ascend-cce" not in "".join(
            str(val(b.get("source", ""))) for b in blocks(doc, "module").values()
        ), f"{path} sources the CCE root"
    cce = parse(CCE_ROOT / "main.tf")
    assert _required_providers(cce) == {"huaweicloud"}
    assert "huaweicloud_cce_node_pool" in {val(t) for item in cce["resource"] for t in item}
    # the AWS root still offers the AWS-only Ascend path and refuses "cce" with a pointer to the CCE root
    ascend_mode = blocks(root(), "variable")["ascend_mode"]
    assert 'contains(["none", "eks-hybrid"], var.ascend_mode)' in val(
        ascend_mode["validation"][0]["condition"]
    )
    assert "ascend-cce" in val(ascend_mode["validation"][0]["error_message"])


#: ``terraform test`` run: plan the whole root with the AWS provider mocked (no credentials, no API calls).
PLAN_TEST = """
mock_provider "aws" {
  mock_data "aws_iam_policy_document" {
    defaults = { json = "{\\"Version\\":\\"2012-10-17\\",\\"Statement\\":[]}" }
  }
  mock_data "aws_caller_identity" {
    defaults = { arn = "arn:aws:sts::111122223333:assumed-role/terraform/ci", account_id = "111122223333" }
  }
  mock_data "aws_iam_session_context" {
    defaults = { issuer_arn = "arn:aws:iam::111122223333:role/terraform" }
  }
  mock_data "aws_region" {
    defaults = { name = "us-east-1" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }
}

run "plan" {
  command = plan
  assert {
    condition = alltrue([
      for name, g in var.gpu_node_groups :
      output.gpu_node_groups[name].efa_per_node == (g.efa ? { "p4d.24xlarge" = 4, "p5.48xlarge" = 32 }[g.instance_type] : 0)
    ])
    error_message = "EFA interfaces per node do not follow the instance type"
  }
}
"""


def _offline_root(dest: Path) -> Path:
    """A copy of the AWS root that plans with only the AWS provider: the S3 backend, the tls data source
    (OIDC thumbprint) and the helm provider with the Helm add-ons are cut out, as their providers are
    not on this machine; everything else is planned as written."""
    shutil.copytree(TF, dest, ignore=shutil.ignore_patterns("ascend-cce", ".terraform*"))
    shutil.rmtree(dest / "modules" / "addons", ignore_errors=True)
    main = (dest / "main.tf").read_text()
    for pattern in (
        r'\n  backend "s3" \{.*?\n  \}',
        r"\n    (tls|helm) = \{.*?\n    \}",
        r'\nprovider "helm" \{.*?\n\}',
        r'\nmodule "addons" \{.*?\n\}',
    ):
        main = re.sub(pattern, "", main, flags=re.S)
    (dest / "main.tf").write_text(main)
    eks = dest / "modules" / "eks" / "main.tf"
    text = re.sub(r'\ndata "tls_certificate" "oidc" \{.*?\n\}', "", eks.read_text(), flags=re.S)
    eks.write_text(
        text.replace("data.tls_certificate.oidc.certificates[0].sha1_fingerprint", '"' + "0" * 40 + '"')
    )
    (dest / "tests").mkdir()
    (dest / "tests" / "plan.tftest.hcl").write_text(PLAN_TEST)
    return dest


@pytest.mark.parametrize("env", ENVS)
def test_terraform_plans_with_a_mocked_aws_provider(env: str, tmp_path: Path) -> None:
    """`terraform test` plans the root with each env's var file: every for_each / count / precondition
    must be decidable at plan time (the old count on the log bucket's unknown name was not)."""
    exe = shutil.which("terraform")
    if not exe or not (PLUGIN_DIR / "registry.terraform.io" / "hashicorp" / "aws").is_dir():
        pytest.skip(f"needs terraform and the AWS provider in a filesystem mirror ({PLUGIN_DIR})")
    work = _offline_root(tmp_path / "root")
    env_vars = {
        **os.environ,
        "TF_IN_AUTOMATION": "1",
        "CHECKPOINT_DISABLE": "1",
        "TF_DATA_DIR": str(tmp_path / "data"),
    }
    init = subprocess.run(
        [exe, f"-chdir={work}", "init", "-backend=false", f"-plugin-dir={PLUGIN_DIR}", "-no-color"],
        capture_output=True,
        text=True,
        env=env_vars,
        timeout=300,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    test = subprocess.run(
        [exe, f"-chdir={work}", "test", f"-var-file={TF / 'envs' / f'{env}.tfvars'}", "-no-color"],
        capture_output=True,
        text=True,
        env=env_vars,
        timeout=600,
    )
    assert test.returncode == 0 and "1 passed, 0 failed" in test.stdout, (
        test.stdout[-4000:] + test.stderr[-2000:]
    )


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


def test_roles_reach_what_the_cluster_path_reads() -> None:
    """MLflow reads the RDS-managed DB secret at every start (rotation); serving reads model versions
    where training wrote them (checkpoints bucket); the KFP step uploads a run's inputs there."""
    iam = module("iam")
    text = (TF / "modules" / "iam" / "main.tf").read_text()
    assert "secretsmanager:GetSecretValue" in text and "var.db_secret_arn" in text
    assert "mlflow_db_secret" in resources(iam, "aws_iam_role_policy")
    roles = re.search(r"roles = \{(.*?)\n  \}", text, re.S).group(1)
    serving = next(line for line in roles.splitlines() if line.strip().startswith("serving"))
    pipeline = next(line for line in roles.splitlines() if line.strip().startswith("pipeline"))
    assert '"checkpoints"' in serving and 'rw = ["dvc", "mlflow-artifacts", "checkpoints"]' in pipeline
    root = blocks(parse(TF / "main.tf"), "module")
    assert "module.rds.master_user_secret_arn" in str(root["iam"])
