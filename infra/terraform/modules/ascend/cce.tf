# Huawei Cloud CCE path (mode = "cce"): an Ascend node pool in an existing CCE cluster.
terraform {
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.80"
    }
    huaweicloud = {
      source  = "huaweicloud/huaweicloud"
      version = ">= 1.70"
    }
  }
}

resource "huaweicloud_cce_node_pool" "ascend" {
  count              = var.mode == "cce" ? 1 : 0
  cluster_id         = var.cce_cluster_id
  name               = "${var.name}-ascend"
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
