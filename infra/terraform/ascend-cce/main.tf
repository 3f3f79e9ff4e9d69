# Ascend NPU node pool in an existing Huawei Cloud CCE cluster: the "cce" Ascend path, a root module
# of its own so that only this path needs the huaweicloud provider and Huawei Cloud credentials (the
# AWS root, infra/terraform, never downloads it). KubeRay and the troupe-training chart are installed
# in that CCE cluster too (docs/production.md).
#   export HW_ACCESS_KEY=... HW_SECRET_KEY=...          # huaweicloud provider credentials
#   terraform -chdir=infra/terraform/ascend-cce init -backend-config=../envs/$env.backend.hcl \
#     -backend-config=key=troupe/$env/ascend-cce.tfstate -backend-config=bucket=<state bucket> ...
#   terraform -chdir=infra/terraform/ascend-cce apply -var env=$env -var cce_cluster_id=<id> ...
# Nodes carry label troupe.ai/pool=ascend and taint huawei.com/Ascend910=true:NoSchedule, which is
# what charts/*/values.yaml (accelerators.ascend) select and tolerate.

terraform {
  required_version = ">= 1.6"
  required_providers {
    huaweicloud = {
      source  = "huaweicloud/huaweicloud"
      version = ">= 1.70"
    }
  }
  backend "s3" {
    # same state bucket as the AWS root, its own key (troupe/<env>/ascend-cce.tfstate)
    encrypt = true
  }
}

variable "env" {
  description = "Environment name: test | prod (node pool troupe-<env>-ascend)."
  type        = string
  validation {
    condition     = contains(["test", "prod"], var.env)
    error_message = "env must be test or prod."
  }
}

variable "region" {
  description = "Huawei Cloud region of the CCE cluster, e.g. cn-southwest-2."
  type        = string
}

variable "cce_cluster_id" {
  description = "Existing CCE cluster id."
  type        = string
}

variable "cce_flavor" {
  description = "Huawei Cloud Ascend flavor of the node pool; check the region's flavor list."
  type        = string
  default     = "physical.kat2ne.48xlarge.8.313t"
}

variable "cce_availability_zone" {
  description = "Huawei Cloud AZ of the node pool."
  type        = string
}

variable "node_count" {
  description = "Initial number of Ascend nodes in the pool."
  type        = number
  default     = 1
}

variable "cce_key_pair" {
  description = "Huawei Cloud key pair name for node login."
  type        = string
}

provider "huaweicloud" {
  region = var.region # credentials from HW_ACCESS_KEY / HW_SECRET_KEY, never in code or state
}

resource "huaweicloud_cce_node_pool" "ascend" {
  cluster_id         = var.cce_cluster_id
  name               = "troupe-${var.env}-ascend"
  os                 = "EulerOS 2.9"
  flavor_id          = var.cce_flavor
  availability_zone  = var.cce_availability_zone
  key_pair           = var.cce_key_pair
  initial_node_count = var.node_count
  scall_enable       = false

  root_volume {
    size       = 200
    volumetype = "SSD"
  }

  data_volumes {
    size       = 1000
    volumetype = "SSD"
  }

  labels = {
    "troupe.ai/pool" = "ascend"
  }

  taints {
    key    = "huawei.com/Ascend910"
    value  = "true"
    effect = "NoSchedule"
  }
}

output "node_pool_id" {
  description = "CCE node pool id of the Ascend nodes."
  value       = huaweicloud_cce_node_pool.ascend.id
}
