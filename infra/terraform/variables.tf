variable "env" {
  description = "Environment name: test | prod (resource names troupe-<env>, namespace troupe-<env>)."
  type        = string
  validation {
    condition     = contains(["test", "prod"], var.env)
    error_message = "env must be test or prod."
  }
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "us-east-1"
}

variable "azs" {
  description = "Availability zones."
  type        = list(string)
  default     = ["us-east-1a", "us-east-1b", "us-east-1c"]
}

variable "gpu_node_groups" {
  description = "GPU node groups (see modules/eks): min 0 so idle GPU nodes scale away and cluster-autoscaler scales them up from 0; efa = true attaches one EFA per network card of the instance type (p4d 4, p5 32) in a cluster placement group."
  type = map(object({
    instance_type = string
    min           = number
    desired       = number
    max           = number
    efa           = bool
  }))
  default = {
    p4d = { instance_type = "p4d.24xlarge", min = 0, desired = 0, max = 4, efa = true }
    p5  = { instance_type = "p5.48xlarge", min = 0, desired = 0, max = 4, efa = true }
  }
}

variable "ascend_mode" {
  description = "Ascend NPU nodes: none | eks-hybrid (servers join this EKS cluster). A Huawei Cloud CCE node pool is the separate root ascend-cce/."
  type        = string
  default     = "none"
  validation {
    condition     = contains(["none", "eks-hybrid"], var.ascend_mode)
    error_message = "ascend_mode is none or eks-hybrid; for a Huawei Cloud CCE node pool apply infra/terraform/ascend-cce instead."
  }
}

variable "ascend_remote_node_cidrs" {
  description = "eks-hybrid: CIDRs of the Ascend servers' network."
  type        = list(string)
  default     = []
}

variable "ascend_remote_pod_cidrs" {
  description = "eks-hybrid: pod CIDRs on the Ascend servers."
  type        = list(string)
  default     = []
}

variable "ascend_node_count" {
  description = "eks-hybrid: number of Ascend servers the SSM activation admits."
  type        = number
  default     = 0
}

variable "vpc_cidr" {
  description = "VPC CIDR (test 10.20.0.0/16, prod 10.30.0.0/16 so the two can be peered)."
  type        = string
  default     = "10.30.0.0/16"
}

variable "cpu_nodes" {
  description = "CPU node group for MLflow, KFP, Ray heads and CPU serving."
  type = object({
    instance_type = string
    min           = number
    desired       = number
    max           = number
  })
  default = { instance_type = "m6i.4xlarge", min = 2, desired = 4, max = 12 }
}

variable "force_destroy_buckets" {
  description = "Let terraform destroy non-empty buckets (test only)."
  type        = bool
  default     = false
}

variable "db_instance_class" {
  description = "RDS instance class of the MLflow PostgreSQL."
  type        = string
  default     = "db.r6g.large"
}

variable "db_multi_az" {
  description = "RDS Multi-AZ standby."
  type        = bool
  default     = true
}

variable "db_deletion_protection" {
  description = "RDS refuses deletion (false only so a test env can be torn down)."
  type        = bool
  default     = true
}

variable "install_cluster_addons" {
  description = "Install the Helm add-ons (NVIDIA + EFA device plugins, cluster-autoscaler; modules/addons). Needs the private API endpoint, i.e. an apply from inside the VPC; false applies the AWS side only."
  type        = bool
  default     = true
}

variable "cluster_admin_arns" {
  description = "IAM role/user ARNs that get cluster admin through EKS access entries, besides the identity running Terraform."
  type        = list(string)
  default     = []
}
