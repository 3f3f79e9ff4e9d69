# Ascend NPU nodes that join this EKS cluster as EKS Hybrid Nodes (mode "eks-hybrid"): Ascend servers
# (on-prem or Huawei Cloud BMS, reachable over VPN/Direct Connect). This module creates the node IAM
# role (assumed through SSM hybrid activations) and the HYBRID_LINUX access entry; the EKS module gets
# the node/pod CIDRs (remote_network_config). On each server: install the Ascend driver + device
# plugin, then `nodeadm init` with the activation (docs/production.md). AWS resources only.
# The other Ascend path, a node pool in a Huawei Cloud CCE cluster, is a root module of its own
# (infra/terraform/ascend-cce) so that this root never needs the huaweicloud provider.
# Nodes must carry label troupe.ai/pool=ascend and taint huawei.com/Ascend910=true:NoSchedule,
# which is what charts/*/values.yaml (accelerators.ascend) select and tolerate.

variable "mode" {
  description = "none | eks-hybrid."
  type        = string
  default     = "none"
  validation {
    condition     = contains(["none", "eks-hybrid"], var.mode)
    error_message = "ascend mode must be none or eks-hybrid (the CCE path is infra/terraform/ascend-cce)."
  }
}

variable "name" {
  description = "Name prefix."
  type        = string
}

variable "cluster_name" {
  description = "EKS cluster name (eks-hybrid)."
  type        = string
  default     = ""
}

variable "node_count" {
  description = "Ascend servers the SSM activation admits (eks-hybrid)."
  type        = number
  default     = 0
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}

data "aws_iam_policy_document" "hybrid_assume" {
  statement {
    actions = ["sts:AssumeRole", "sts:TagSession"]
    principals {
      type        = "Service"
      identifiers = ["ssm.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "hybrid_node" {
  count              = var.mode == "eks-hybrid" ? 1 : 0
  name               = "${var.name}-ascend-hybrid-node"
  assume_role_policy = data.aws_iam_policy_document.hybrid_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "hybrid_node" {
  for_each   = var.mode == "eks-hybrid" ? toset(["AmazonSSMManagedInstanceCore", "AmazonEC2ContainerRegistryPullOnly"]) : toset([])
  role       = aws_iam_role.hybrid_node[0].name
  policy_arn = "arn:aws:iam::aws:policy/${each.value}"
}

data "aws_iam_policy_document" "hybrid_describe" {
  statement {
    actions   = ["eks:DescribeCluster"]
    resources = ["arn:aws:eks:*:*:cluster/${var.cluster_name}"]
  }
}

resource "aws_iam_role_policy" "hybrid_describe" {
  count  = var.mode == "eks-hybrid" ? 1 : 0
  name   = "describe-cluster"
  role   = aws_iam_role.hybrid_node[0].id
  policy = data.aws_iam_policy_document.hybrid_describe.json
}

resource "aws_ssm_activation" "hybrid" {
  count              = var.mode == "eks-hybrid" ? 1 : 0
  name               = "${var.name}-ascend"
  iam_role           = aws_iam_role.hybrid_node[0].name
  registration_limit = max(var.node_count, 1)
  tags               = var.tags
}

resource "aws_eks_access_entry" "hybrid" {
  count         = var.mode == "eks-hybrid" ? 1 : 0
  cluster_name  = var.cluster_name
  principal_arn = aws_iam_role.hybrid_node[0].arn
  type          = "HYBRID_LINUX"
  tags          = var.tags
}

output "hybrid_node_role_arn" {
  description = "IAM role of the Ascend hybrid nodes (eks-hybrid), else null."
  value       = try(aws_iam_role.hybrid_node[0].arn, null)
}

output "ssm_activation" {
  description = "SSM activation id and code for `nodeadm init` on each Ascend server (eks-hybrid)."
  value       = try({ id = aws_ssm_activation.hybrid[0].id, code = aws_ssm_activation.hybrid[0].activation_code }, null)
  sensitive   = true
}
