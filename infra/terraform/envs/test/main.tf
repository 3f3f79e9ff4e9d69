# Troupe test environment: VPC -> EKS (+ GPU node groups) -> S3 -> RDS -> IRSA roles (-> Ascend).
# terraform -chdir=infra/terraform/envs/test init -backend-config=bucket=<state bucket> \
#   -backend-config=dynamodb_table=<lock table>
# terraform -chdir=infra/terraform/envs/test apply

terraform {
  required_version = ">= 1.6"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.80"
    }
    tls = {
      source  = "hashicorp/tls"
      version = ">= 4.0"
    }
    huaweicloud = {
      source  = "huaweicloud/huaweicloud"
      version = ">= 1.70"
    }
  }
  backend "s3" {
    key     = "troupe/test/terraform.tfstate"
    encrypt = true
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = local.tags
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
    p4d = { instance_type = "p4d.24xlarge", min = 0, desired = 0, max = 2, efa = false }
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

locals {
  name      = "troupe-test"
  namespace = "troupe-test"
  tags      = { Project = "troupe", Environment = "test", ManagedBy = "terraform" }
  hybrid    = var.ascend_mode == "eks-hybrid"
}

module "vpc" {
  source = "../../modules/vpc"
  name   = local.name
  cidr   = "10.20.0.0/16"
  azs    = var.azs
  tags   = local.tags
}

module "eks" {
  source            = "../../modules/eks"
  name              = local.name
  vpc_id            = module.vpc.vpc_id
  vpc_cidr          = module.vpc.vpc_cidr
  subnet_ids        = module.vpc.private_subnet_ids
  cpu_nodes         = { instance_type = "m6i.2xlarge", min = 1, desired = 1, max = 4 }
  gpu_node_groups   = var.gpu_node_groups
  remote_node_cidrs = local.hybrid ? var.ascend_remote_node_cidrs : []
  remote_pod_cidrs  = local.hybrid ? var.ascend_remote_pod_cidrs : []
  tags              = local.tags
}

module "s3" {
  source        = "../../modules/s3"
  name          = local.name
  force_destroy = true
  tags          = local.tags
}

module "rds" {
  source                   = "../../modules/rds"
  name                     = local.name
  vpc_id                   = module.vpc.vpc_id
  subnet_ids               = module.vpc.private_subnet_ids
  client_security_group_id = module.eks.cluster_security_group_id
  instance_class           = "db.t4g.medium"
  multi_az                 = false
  deletion_protection      = false
  tags                     = local.tags
}

module "iam" {
  source            = "../../modules/iam"
  name              = local.name
  oidc_provider_arn = module.eks.oidc_provider_arn
  oidc_issuer       = module.eks.oidc_issuer
  namespace         = local.namespace
  bucket_arns       = module.s3.bucket_arns
  kms_key_arn       = module.s3.kms_key_arn
  tags              = local.tags
}

module "ascend" {
  source         = "../../modules/ascend"
  mode           = var.ascend_mode
  name           = local.name
  cluster_name   = module.eks.cluster_name
  cce_cluster_id = var.cce_cluster_id
  node_count     = var.ascend_node_count
  tags           = local.tags
}

output "cluster_name" {
  description = "aws eks update-kubeconfig --name <cluster_name>."
  value       = module.eks.cluster_name
}

output "buckets" {
  description = "dvc, mlflow-artifacts and checkpoints bucket names."
  value       = module.s3.buckets
}

output "checkpoints_bucket" {
  description = "troupe-training checkpoints.s3Uri = s3://<this>/runs."
  value       = module.s3.buckets["checkpoints"]
}

output "mlflow_artifacts_bucket" {
  description = "troupe-mlflow artifacts.destination = s3://<this>."
  value       = module.s3.buckets["mlflow-artifacts"]
}

output "mlflow_db_endpoint" {
  description = "host:port of the MLflow PostgreSQL."
  value       = module.rds.endpoint
}

output "mlflow_db_secret_arn" {
  description = "Secrets Manager secret with the MLflow DB password."
  value       = module.rds.master_user_secret_arn
}

output "training_role_arn" {
  description = "troupe-training aws.roleArn."
  value       = module.iam.role_arns["training"]
}

output "serving_role_arn" {
  description = "troupe-serving aws.roleArn."
  value       = module.iam.role_arns["serving"]
}

output "mlflow_role_arn" {
  description = "troupe-mlflow aws.roleArn."
  value       = module.iam.role_arns["mlflow"]
}

output "pipeline_role_arn" {
  description = "IRSA role of the KFP pipeline pods (serviceaccount troupe-pipeline)."
  value       = module.iam.role_arns["pipeline"]
}
