# EKS managed add-ons and the AWS side of the in-cluster system controllers:
#   vpc-cni            with the network policy agent on, so the charts' NetworkPolicies are enforced
#                      (without it EKS accepts NetworkPolicy objects and enforces nothing)
#   aws-ebs-csi-driver with its IRSA role and a default gp3 StorageClass: EKS >= 1.30 creates no
#                      default StorageClass, and without a driver + default class every PVC that
#                      names no class (KFP's, for one) stays Pending
#   cluster-autoscaler IRSA role (the Helm release itself is in modules/addons)
#   cluster admins     EKS access entries: Terraform's own caller (the Helm releases need it) plus
#                      var.cluster_admin_arns

variable "cluster_admin_arns" {
  description = "IAM role/user ARNs granted cluster admin (EKS access entry, AmazonEKSClusterAdminPolicy) besides the identity running Terraform."
  type        = list(string)
  default     = []
}

locals {
  oidc_issuer = replace(aws_eks_cluster.this.identity[0].oidc[0].issuer, "https://", "")
  # kube-system controllers that call AWS APIs, each with its own IRSA role: role key => service account.
  system_service_accounts = {
    ebs-csi            = "ebs-csi-controller-sa" # the name the EKS add-on gives its controller
    cluster-autoscaler = "cluster-autoscaler"    # rbac.serviceAccount.name in modules/addons
  }
}

# Newest add-on build for this Kubernetes version (vpc-cni >= 1.18.4 is what EFA-only interfaces need).
data "aws_eks_addon_version" "latest" {
  for_each           = toset(["vpc-cni", "aws-ebs-csi-driver"])
  addon_name         = each.key
  kubernetes_version = aws_eks_cluster.this.version
  most_recent        = true
}

# Created before the node groups (they depend on it), so every node starts with the policy agent.
resource "aws_eks_addon" "vpc_cni" {
  cluster_name                = aws_eks_cluster.this.name
  addon_name                  = "vpc-cni"
  addon_version               = data.aws_eks_addon_version.latest["vpc-cni"].version
  configuration_values        = jsonencode({ enableNetworkPolicy = "true" })
  resolve_conflicts_on_create = "OVERWRITE" # take over the self-managed aws-node EKS installs at creation
  resolve_conflicts_on_update = "OVERWRITE"
  tags                        = var.tags
}

resource "aws_eks_addon" "ebs_csi" {
  cluster_name             = aws_eks_cluster.this.name
  addon_name               = "aws-ebs-csi-driver"
  addon_version            = data.aws_eks_addon_version.latest["aws-ebs-csi-driver"].version
  service_account_role_arn = aws_iam_role.system["ebs-csi"].arn
  configuration_values = jsonencode({
    # StorageClass ebs-csi-default-sc: gp3, WaitForFirstConsumer, expandable, marked default. Volumes are
    # encrypted when the account's EBS encryption-by-default is on (an account setting, not managed here).
    defaultStorageClass = { enabled = true }
    # the node DaemonSet must also run on the tainted GPU nodes, or pods there cannot mount a volume
    node = { tolerateAllTaints = true }
  })
  resolve_conflicts_on_create = "OVERWRITE"
  resolve_conflicts_on_update = "OVERWRITE"
  tags                        = var.tags
  # the controller is a Deployment: the add-on only turns ACTIVE once nodes can run it
  depends_on = [aws_eks_node_group.pool, aws_iam_role_policy_attachment.ebs_csi]
}

# IRSA: each role trusts exactly kube-system/<service account> through the cluster's OIDC provider.
data "aws_iam_policy_document" "system_assume" {
  for_each = local.system_service_accounts
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [aws_iam_openid_connect_provider.this.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:kube-system:${each.value}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "system" {
  for_each           = local.system_service_accounts
  name               = "${var.name}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.system_assume[each.key].json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "ebs_csi" {
  role       = aws_iam_role.system["ebs-csi"].name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonEBSCSIDriverPolicy"
}

# cluster-autoscaler (its AWS README's auto-discovery policy): read ASGs, instance types and managed node
# groups; resize / terminate only ASGs tagged as this cluster's (EKS tags its managed node group ASGs
# k8s.io/cluster-autoscaler/<cluster>=owned, which is also how the autoscaler discovers them).
data "aws_iam_policy_document" "cluster_autoscaler" {
  statement {
    sid = "Discover"
    actions = [
      "autoscaling:DescribeAutoScalingGroups",
      "autoscaling:DescribeAutoScalingInstances",
      "autoscaling:DescribeLaunchConfigurations",
      "autoscaling:DescribeScalingActivities",
      "autoscaling:DescribeTags",
      "ec2:DescribeImages",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeLaunchTemplateVersions",
      "ec2:GetInstanceTypesFromInstanceRequirements",
    ]
    resources = ["*"] # Describe* calls take no resource ARN
  }
  statement {
    sid       = "NodeGroups"
    actions   = ["eks:DescribeNodegroup"] # labels and taints of a group that never had a node
    resources = ["arn:${data.aws_partition.current.partition}:eks:*:*:nodegroup/${var.name}/*"]
  }
  statement {
    sid       = "Scale"
    actions   = ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"]
    resources = ["*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/k8s.io/cluster-autoscaler/${var.name}"
      values   = ["owned"]
    }
  }
}

resource "aws_iam_role_policy" "cluster_autoscaler" {
  name   = "cluster-autoscaler"
  role   = aws_iam_role.system["cluster-autoscaler"].id
  policy = data.aws_iam_policy_document.cluster_autoscaler.json
}

# authentication_mode = "API" and the provider does not make the creator an admin: without these entries
# nobody (Terraform's Helm releases included) can talk to the cluster.
data "aws_caller_identity" "current" {}

data "aws_iam_session_context" "current" {
  arn = data.aws_caller_identity.current.arn # assumed-role session -> the role's ARN
}

resource "aws_eks_access_entry" "admin" {
  for_each      = toset(concat([data.aws_iam_session_context.current.issuer_arn], var.cluster_admin_arns))
  cluster_name  = aws_eks_cluster.this.name
  principal_arn = each.value
  type          = "STANDARD"
  tags          = var.tags
}

resource "aws_eks_access_policy_association" "admin" {
  for_each      = aws_eks_access_entry.admin
  cluster_name  = aws_eks_cluster.this.name
  principal_arn = each.value.principal_arn
  policy_arn    = "arn:${data.aws_partition.current.partition}:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"
  access_scope {
    type = "cluster"
  }
}

output "system_role_arns" {
  description = "IRSA role ARNs of the kube-system controllers: ebs-csi, cluster-autoscaler."
  value       = { for k, r in aws_iam_role.system : k => r.arn }
}

output "storage_class" {
  description = "Default StorageClass the EBS CSI add-on creates (gp3); PVCs that name no class get it."
  value       = "ebs-csi-default-sc"
}
