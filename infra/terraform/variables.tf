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
  description = "GPU node groups (see modules/eks); min 0 so idle GPU nodes scale away."
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
  description = "Ascend NPU nodes: none | eks-hybrid (servers join this EKS cluster) | cce (Huawei Cloud CCE node pool)."
  type        = string
  default     = "none"
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
  description = "Number of Ascend nodes (eks-hybrid: activation limit; cce: node pool size)."
  type        = number
  default     = 0
}

variable "cce_cluster_id" {
  description = "cce: existing CCE cluster id."
  type        = string
  default     = ""
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
