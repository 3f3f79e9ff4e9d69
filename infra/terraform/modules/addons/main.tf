# In-cluster add-ons that have no EKS managed add-on, installed as pinned Helm charts into kube-system:
#   nvidia-device-plugin      advertises nvidia.com/gpu on the GPU nodes (the AL2023 NVIDIA AMI ships the
#                             driver, not the plugin: without it no pod asking for a GPU is ever scheduled)
#   aws-efa-k8s-device-plugin advertises vpc.amazonaws.com/efa (pods request it to get the EFA devices;
#                             without it NCCL falls back to TCP)
#   cluster-autoscaler        scales the managed node groups, GPU groups from 0 (their ASG template tags
#                             are set in modules/eks), with the IRSA role from modules/eks
# The helm provider (root main.tf) reaches the private API endpoint, so apply from inside the VPC.

terraform {
  required_providers {
    helm = {
      source = "hashicorp/helm"
    }
  }
}

variable "cluster_name" {
  description = "EKS cluster name (cluster-autoscaler auto-discovers the ASGs tagged k8s.io/cluster-autoscaler/<this>)."
  type        = string
}

variable "region" {
  description = "AWS region of the cluster (cluster-autoscaler's AWS API region)."
  type        = string
}

variable "cluster_autoscaler_role_arn" {
  description = "IRSA role of kube-system/cluster-autoscaler (modules/eks system_role_arns)."
  type        = string
}

variable "nvidia_device_plugin_version" {
  description = "nvidia-device-plugin chart version (https://nvidia.github.io/k8s-device-plugin)."
  type        = string
  default     = "0.17.1"
}

variable "efa_device_plugin_version" {
  description = "aws-efa-k8s-device-plugin chart version (https://aws.github.io/eks-charts)."
  type        = string
  default     = "v0.5.30"
}

variable "cluster_autoscaler_version" {
  description = "cluster-autoscaler chart version; its app minor must equal the cluster's Kubernetes minor (9.43.x = autoscaler 1.31, for EKS 1.31)."
  type        = string
  default     = "9.43.2"
}

locals {
  gpu_nodes      = { "troupe.ai/pool" = "gpu" } # label of every GPU node group (modules/eks)
  gpu_toleration = { key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }
}

resource "helm_release" "nvidia_device_plugin" {
  name       = "nvidia-device-plugin"
  namespace  = "kube-system"
  repository = "https://nvidia.github.io/k8s-device-plugin"
  chart      = "nvidia-device-plugin"
  version    = var.nvidia_device_plugin_version
  values = [yamlencode({
    # The chart's default affinity requires Node Feature Discovery labels (pci-10de.present), which EKS
    # nodes do not carry: the DaemonSet would run nowhere. Select the GPU pool instead (this replaces the
    # default nodeSelectorTerms list). The chart already tolerates the nvidia.com/gpu taint.
    affinity = {
      nodeAffinity = {
        requiredDuringSchedulingIgnoredDuringExecution = {
          nodeSelectorTerms = [{
            matchExpressions = [{ key = "troupe.ai/pool", operator = "In", values = ["gpu"] }]
          }]
        }
      }
    }
  })]
}

resource "helm_release" "efa_device_plugin" {
  name       = "aws-efa-k8s-device-plugin"
  namespace  = "kube-system"
  repository = "https://aws.github.io/eks-charts"
  chart      = "aws-efa-k8s-device-plugin"
  version    = var.efa_device_plugin_version
  values = [yamlencode({
    # the chart already limits itself to EFA-capable instance types; it must tolerate the GPU taint
    nodeSelector = local.gpu_nodes
    tolerations  = [local.gpu_toleration]
  })]
}

resource "helm_release" "cluster_autoscaler" {
  name       = "cluster-autoscaler"
  namespace  = "kube-system"
  repository = "https://kubernetes.github.io/autoscaler"
  chart      = "cluster-autoscaler"
  version    = var.cluster_autoscaler_version
  values = [yamlencode({
    cloudProvider = "aws"
    awsRegion     = var.region
    autoDiscovery = { clusterName = var.cluster_name }
    rbac = {
      serviceAccount = {
        create      = true
        name        = "cluster-autoscaler" # the service account the IRSA role trusts
        annotations = { "eks.amazonaws.com/role-arn" = var.cluster_autoscaler_role_arn }
      }
    }
    extraArgs = {
      expander                      = "least-waste" # cheapest group that fits the pending pods
      skip-nodes-with-local-storage = false         # Ray pods use emptyDir /dev/shm; still let idle nodes go
      scale-down-unneeded-time      = "10m"         # an idle GPU node goes after 10 minutes
    }
    # on the system pool, never on a node it might remove
    nodeSelector = { "troupe.ai/pool" = "system" }
    tolerations  = [{ key = "CriticalAddonsOnly", operator = "Exists" }]
  })]
}

output "releases" {
  description = "Helm releases installed into kube-system, name => chart version."
  value = {
    for r in [helm_release.nvidia_device_plugin, helm_release.efa_device_plugin, helm_release.cluster_autoscaler] : r.name => r.version
  }
}
