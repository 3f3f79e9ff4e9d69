# EKS cluster: private API endpoint, KMS-encrypted secrets, all control-plane logs, OIDC provider for
# IRSA; managed node groups: system, CPU (gateways, Ray heads, MLflow), GPU groups (p4d / p5) with a
# nvidia.com/gpu NoSchedule taint and optional EFA through a launch template.

variable "name" {
  description = "Cluster name, e.g. troupe-prod."
  type        = string
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
  default     = "1.31"
}

variable "vpc_id" {
  description = "VPC id."
  type        = string
}

variable "vpc_cidr" {
  description = "VPC CIDR (API endpoint reachable from inside the VPC / VPN)."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the control plane ENIs and nodes."
  type        = list(string)
}

variable "system_nodes" {
  description = "System node group: instance type and size."
  type        = object({ instance_type = string, min = number, desired = number, max = number })
  default     = { instance_type = "m6i.large", min = 2, desired = 2, max = 3 }
}

variable "cpu_nodes" {
  description = "CPU node group (label troupe.ai/pool=cpu): chat gateways, Ray heads, MLflow."
  type        = object({ instance_type = string, min = number, desired = number, max = number })
  default     = { instance_type = "m6i.4xlarge", min = 1, desired = 2, max = 10 }
}

variable "gpu_node_groups" {
  description = "GPU node groups (label troupe.ai/pool=gpu, taint nvidia.com/gpu): name => {instance_type (p4d.24xlarge | p5.48xlarge), min, desired, max, efa}."
  type = map(object({
    instance_type = string
    min           = number
    desired       = number
    max           = number
    efa           = bool
  }))
  default = {}
}

variable "remote_node_cidrs" {
  description = "On-prem / Huawei Cloud CIDRs of EKS Hybrid Nodes (Ascend servers); empty = no hybrid nodes."
  type        = list(string)
  default     = []
}

variable "remote_pod_cidrs" {
  description = "Pod CIDRs on hybrid nodes (required with remote_node_cidrs)."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}

data "aws_partition" "current" {}

# Who may assume the cluster role (the EKS service) and the node role (EC2).
data "aws_iam_policy_document" "assume" {
  for_each = {
    cluster = { service = "eks.amazonaws.com", actions = ["sts:AssumeRole", "sts:TagSession"] }
    node    = { service = "ec2.amazonaws.com", actions = ["sts:AssumeRole"] }
  }
  statement {
    actions = each.value.actions
    principals {
      type        = "Service"
      identifiers = [each.value.service]
    }
  }
}

resource "aws_iam_role" "cluster" {
  name               = "${var.name}-eks-cluster"
  assume_role_policy = data.aws_iam_policy_document.assume["cluster"].json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "cluster" {
  role       = aws_iam_role.cluster.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonEKSClusterPolicy"
}

module "kms" {
  source      = "../kms"
  description = "${var.name} EKS secrets"
  tags        = var.tags
}

resource "aws_security_group" "cluster" {
  name        = "${var.name}-eks-cluster"
  description = "EKS control plane: API from inside the VPC"
  vpc_id      = var.vpc_id
  tags        = var.tags

  ingress {
    description = "Kubernetes API from the VPC"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = concat([var.vpc_cidr], var.remote_node_cidrs)
  }

  egress {
    description = "Control plane to nodes and hybrid nodes"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = concat([var.vpc_cidr], var.remote_node_cidrs, var.remote_pod_cidrs)
  }
}

resource "aws_eks_cluster" "this" {
  name                      = var.name
  version                   = var.kubernetes_version
  role_arn                  = aws_iam_role.cluster.arn
  enabled_cluster_log_types = ["api", "audit", "authenticator", "controllerManager", "scheduler"]

  access_config {
    authentication_mode = "API"
  }

  vpc_config {
    subnet_ids              = var.subnet_ids
    security_group_ids      = [aws_security_group.cluster.id]
    endpoint_private_access = true
    endpoint_public_access  = false
  }

  encryption_config {
    resources = ["secrets"]
    provider {
      key_arn = module.kms.arn
    }
  }

  dynamic "remote_network_config" {
    for_each = length(var.remote_node_cidrs) > 0 ? [1] : []
    content {
      remote_node_networks {
        cidrs = var.remote_node_cidrs
      }
      remote_pod_networks {
        cidrs = var.remote_pod_cidrs
      }
    }
  }

  tags       = var.tags
  depends_on = [aws_iam_role_policy_attachment.cluster]
}

data "tls_certificate" "oidc" {
  url = aws_eks_cluster.this.identity[0].oidc[0].issuer
}

resource "aws_iam_openid_connect_provider" "this" {
  url             = aws_eks_cluster.this.identity[0].oidc[0].issuer
  client_id_list  = ["sts.amazonaws.com"]
  thumbprint_list = [data.tls_certificate.oidc.certificates[0].sha1_fingerprint]
  tags            = var.tags
}

resource "aws_iam_role" "node" {
  name               = "${var.name}-eks-node"
  assume_role_policy = data.aws_iam_policy_document.assume["node"].json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "node" {
  for_each   = toset(["AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryReadOnly"])
  role       = aws_iam_role.node.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/${each.value}"
}

# IMDSv2 only, encrypted root volume; GPU groups add EFA interfaces when asked.
resource "aws_launch_template" "node" {
  for_each = merge(
    { system = { efa = false, disk = 50 }, cpu = { efa = false, disk = 100 } },
    { for k, g in var.gpu_node_groups : k => { efa = g.efa, disk = 500 } },
  )
  name_prefix = "${var.name}-${each.key}-"

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1 # pods use IRSA, not the node role
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size = each.value.disk
      volume_type = "gp3"
      encrypted   = true
    }
  }

  dynamic "network_interfaces" {
    for_each = each.value.efa ? [0] : []
    content {
      device_index       = 0
      network_card_index = 0
      interface_type     = "efa"
      security_groups    = [aws_eks_cluster.this.vpc_config[0].cluster_security_group_id]
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${var.name}-${each.key}" })
  }
  tags = var.tags
}

# System and CPU node groups: one shape, sized by var.system_nodes / var.cpu_nodes; only the system
# group keeps everything but critical add-ons away.
resource "aws_eks_node_group" "pool" {
  for_each        = { system = var.system_nodes, cpu = var.cpu_nodes }
  cluster_name    = aws_eks_cluster.this.name
  node_group_name = each.key
  node_role_arn   = aws_iam_role.node.arn
  subnet_ids      = var.subnet_ids
  instance_types  = [each.value.instance_type]
  labels          = { "troupe.ai/pool" = each.key }
  launch_template {
    id      = aws_launch_template.node[each.key].id
    version = aws_launch_template.node[each.key].latest_version
  }
  scaling_config {
    min_size     = each.value.min
    desired_size = each.value.desired
    max_size     = each.value.max
  }
  dynamic "taint" {
    for_each = each.key == "system" ? [1] : []
    content {
      key    = "CriticalAddonsOnly"
      value  = "true"
      effect = "PREFER_NO_SCHEDULE"
    }
  }
  tags       = var.tags
  depends_on = [aws_iam_role_policy_attachment.node]
}

resource "aws_eks_node_group" "gpu" {
  for_each        = var.gpu_node_groups
  cluster_name    = aws_eks_cluster.this.name
  node_group_name = "gpu-${each.key}"
  node_role_arn   = aws_iam_role.node.arn
  # EFA needs all nodes of a job in one AZ (cluster placement); non-EFA groups spread.
  subnet_ids     = each.value.efa ? [var.subnet_ids[0]] : var.subnet_ids
  instance_types = [each.value.instance_type]
  ami_type       = "AL2023_x86_64_NVIDIA"
  labels         = { "troupe.ai/pool" = "gpu", "troupe.ai/gpu-group" = each.key }
  launch_template {
    id      = aws_launch_template.node[each.key].id
    version = aws_launch_template.node[each.key].latest_version
  }
  scaling_config {
    min_size     = each.value.min
    desired_size = each.value.desired
    max_size     = each.value.max
  }
  taint {
    key    = "nvidia.com/gpu"
    value  = "true"
    effect = "NO_SCHEDULE"
  }
  tags       = var.tags
  depends_on = [aws_iam_role_policy_attachment.node]
}

output "cluster_name" {
  description = "EKS cluster name (aws eks update-kubeconfig --name <this>)."
  value       = aws_eks_cluster.this.name
}

output "cluster_endpoint" {
  description = "Private API endpoint."
  value       = aws_eks_cluster.this.endpoint
}

output "cluster_security_group_id" {
  description = "Cluster security group created by EKS (nodes and control plane)."
  value       = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

output "oidc_provider_arn" {
  description = "IAM OIDC provider ARN for IRSA."
  value       = aws_iam_openid_connect_provider.this.arn
}

output "oidc_issuer" {
  description = "OIDC issuer URL without https://."
  value       = replace(aws_eks_cluster.this.identity[0].oidc[0].issuer, "https://", "")
}
