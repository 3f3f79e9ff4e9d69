# EKS cluster: private API endpoint, KMS-encrypted secrets, all control-plane logs, OIDC provider for
# IRSA; managed node groups: system, CPU (gateways, Ray heads, MLflow), GPU groups (p4d / p5) with a
# nvidia.com/gpu NoSchedule taint, EFA interfaces sized to the instance type and a cluster placement
# group, and the ASG tags cluster-autoscaler needs to scale a GPU group up from 0 nodes.
# EKS add-ons (VPC CNI with network policy, EBS CSI driver) and the system IRSA roles: addons.tf.

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

locals {
  # What the GPU node groups need to know about their instance type, keyed by instance type:
  #   gpus           nvidia.com/gpu per node (the scale-from-zero template cluster-autoscaler plans with)
  #   efa_interfaces EFA devices per node = the type's network cards (one EFA per card); the launch
  #                  template attaches that many and pods request vpc.amazonaws.com/efa: <this>
  #   accelerator    value of the k8s.amazonaws.com/accelerator label, by which cluster-autoscaler knows
  #                  a node is a GPU node (it waits for the device plugin before scaling up again)
  # Network cards per type: EC2 "network cards" tables (aws ec2 describe-instance-types
  # --query 'InstanceTypes[].NetworkInfo.MaximumNetworkCards'). Add a row before using a new type.
  gpu_instance_types = {
    "p4d.24xlarge"  = { gpus = 8, efa_interfaces = 4, accelerator = "nvidia-tesla-a100" }
    "p4de.24xlarge" = { gpus = 8, efa_interfaces = 4, accelerator = "nvidia-tesla-a100" }
    "p5.48xlarge"   = { gpus = 8, efa_interfaces = 32, accelerator = "nvidia-h100" }
    "p5e.48xlarge"  = { gpus = 8, efa_interfaces = 32, accelerator = "nvidia-h200" }
    "p5en.48xlarge" = { gpus = 8, efa_interfaces = 16, accelerator = "nvidia-h200" }
  }
  unknown_gpu_type = { gpus = 0, efa_interfaces = 0, accelerator = "" } # rejected by the node group's precondition
  gpu_type = {
    for k, g in var.gpu_node_groups : k => lookup(local.gpu_instance_types, g.instance_type, local.unknown_gpu_type)
  }

  # Each GPU group as the rest of this module uses it: its variable + its type's row + EFA count + labels.
  gpu = {
    for k, g in var.gpu_node_groups : k => merge(g, local.gpu_type[k], {
      efa_count = g.efa ? local.gpu_type[k].efa_interfaces : 0
      labels = {
        "troupe.ai/pool"                = "gpu"
        "troupe.ai/gpu-group"           = k
        "k8s.amazonaws.com/accelerator" = local.gpu_type[k].accelerator
      }
    })
  }

  # cluster-autoscaler builds a template node for a group with 0 nodes from these ASG tags (EKS does
  # not copy node group labels/taints to the ASG): without them it cannot tell that a pending pod
  # asking for nvidia.com/gpu (and vpc.amazonaws.com/efa) would fit, and the group stays at 0.
  ca_template = "k8s.io/cluster-autoscaler/node-template"
  gpu_asg_tags = merge([
    for k, g in local.gpu : {
      for key, value in merge(
        { for l, v in g.labels : "${local.ca_template}/label/${l}" => v },
        {
          "${local.ca_template}/taint/nvidia.com/gpu"     = "true:NoSchedule"
          "${local.ca_template}/resources/nvidia.com/gpu" = tostring(g.gpus)
        },
        g.efa ? { "${local.ca_template}/resources/vpc.amazonaws.com/efa" = tostring(g.efa_count) } : {},
      ) : "${k}|${key}" => { group = k, key = key, value = value }
    }
  ]...)
}

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

# EFA needs every node of a multi-node job in one cluster placement group (full-bisection, lowest
# latency network); one group per EFA node group.
resource "aws_placement_group" "efa" {
  for_each = { for k, g in local.gpu : k => g if g.efa }
  name     = "${var.name}-gpu-${each.key}"
  strategy = "cluster"
  tags     = var.tags
}

# IMDSv2 only, encrypted root volume; EFA GPU groups get one EFA per network card and the placement group.
resource "aws_launch_template" "node" {
  for_each = merge(
    { system = { efa_count = 0, disk = 50 }, cpu = { efa_count = 0, disk = 100 } },
    { for k, g in local.gpu : k => { efa_count = g.efa_count, disk = 500 } },
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

  # Card 0 carries the primary interface (EFA with ENA: the node's IP); every further card gets an
  # EFA-only interface on device index 1 (EC2's layout for multi-card EFA instances; EFA-only takes
  # no VPC IP, so a p5 node uses 1 IP, not 32). The count comes from local.gpu_instance_types.
  dynamic "network_interfaces" {
    for_each = range(each.value.efa_count)
    content {
      network_card_index    = network_interfaces.value
      device_index          = network_interfaces.value == 0 ? 0 : 1
      interface_type        = network_interfaces.value == 0 ? "efa" : "efa-only"
      delete_on_termination = true
      security_groups       = [aws_eks_cluster.this.vpc_config[0].cluster_security_group_id]
    }
  }

  dynamic "placement" {
    for_each = each.value.efa_count > 0 ? [aws_placement_group.efa[each.key].name] : []
    content {
      group_name = placement.value
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
  lifecycle {
    ignore_changes = [scaling_config[0].desired_size] # cluster-autoscaler moves it between min and max
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
  depends_on = [aws_iam_role_policy_attachment.node, aws_eks_addon.vpc_cni] # nodes start with the network policy agent
}

resource "aws_eks_node_group" "gpu" {
  for_each        = local.gpu
  cluster_name    = aws_eks_cluster.this.name
  node_group_name = "gpu-${each.key}"
  node_role_arn   = aws_iam_role.node.arn
  # EFA needs all nodes of a job in one AZ (cluster placement); non-EFA groups spread.
  subnet_ids     = each.value.efa ? [var.subnet_ids[0]] : var.subnet_ids
  instance_types = [each.value.instance_type]
  ami_type       = "AL2023_x86_64_NVIDIA" # NVIDIA driver + EFA host libraries; the device plugins come from modules/addons
  labels         = each.value.labels
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
  # cluster-autoscaler owns desired_size once the group exists; Terraform keeps min and max.
  lifecycle {
    ignore_changes = [scaling_config[0].desired_size]
    precondition {
      condition     = contains(keys(local.gpu_instance_types), each.value.instance_type)
      error_message = "gpu_node_groups.${each.key}: instance type ${each.value.instance_type} is not in local.gpu_instance_types (modules/eks); add its GPU and EFA counts there."
    }
  }
  tags       = var.tags
  depends_on = [aws_iam_role_policy_attachment.node, aws_eks_addon.vpc_cni] # nodes start with the network policy agent
}

# Scale-from-zero template tags (local.gpu_asg_tags) on each GPU group's ASG; not propagated to instances.
resource "aws_autoscaling_group_tag" "gpu_template" {
  for_each               = local.gpu_asg_tags
  autoscaling_group_name = aws_eks_node_group.gpu[each.value.group].resources[0].autoscaling_groups[0].name
  tag {
    key                 = each.value.key
    value               = each.value.value
    propagate_at_launch = false
  }
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

output "cluster_ca_data" {
  description = "Base64 cluster CA certificate (helm provider, kubeconfig)."
  value       = aws_eks_cluster.this.certificate_authority[0].data
}

output "gpu_node_groups" {
  description = "Per GPU group: instance_type, gpus and efa (vpc.amazonaws.com/efa) per node, node labels, taint; what the charts request and select."
  value = {
    for k, g in local.gpu : k => {
      instance_type = g.instance_type
      gpus_per_node = g.gpus
      efa_per_node  = g.efa_count
      labels        = g.labels
      taint         = "nvidia.com/gpu=true:NoSchedule"
    }
  }
}
