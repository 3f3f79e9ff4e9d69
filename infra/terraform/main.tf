# Troupe platform root, one per environment by var file + backend config:
# VPC -> EKS (+ GPU node groups) -> S3 -> RDS -> IRSA roles (-> Ascend).
#   env=test   # or prod
#   export TF_DATA_DIR=.terraform-$env          # one working dir per environment's state
#   terraform -chdir=infra/terraform init -backend-config=envs/$env.backend.hcl \
#     -backend-config=bucket=<state bucket> -backend-config=dynamodb_table=<lock table>
#   terraform -chdir=infra/terraform apply -var-file=envs/$env.tfvars
# Variable defaults are the production (safe) values; envs/test.tfvars relaxes them for cost.

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
    # key (troupe/<env>/terraform.tfstate) comes from envs/<env>.backend.hcl
    encrypt = true
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = local.tags
  }
}

locals {
  name      = "troupe-${var.env}"
  namespace = "troupe-${var.env}"
  tags      = { Project = "troupe", Environment = var.env, ManagedBy = "terraform" }
  hybrid    = var.ascend_mode == "eks-hybrid"
}

module "vpc" {
  source = "./modules/vpc"
  name   = local.name
  cidr   = var.vpc_cidr
  azs    = var.azs
  tags   = local.tags
}

module "eks" {
  source            = "./modules/eks"
  name              = local.name
  vpc_id            = module.vpc.vpc_id
  vpc_cidr          = module.vpc.vpc_cidr
  subnet_ids        = module.vpc.private_subnet_ids
  cpu_nodes         = var.cpu_nodes
  gpu_node_groups   = var.gpu_node_groups
  remote_node_cidrs = local.hybrid ? var.ascend_remote_node_cidrs : []
  remote_pod_cidrs  = local.hybrid ? var.ascend_remote_pod_cidrs : []
  tags              = local.tags
}

module "s3" {
  source        = "./modules/s3"
  name          = local.name
  force_destroy = var.force_destroy_buckets
  tags          = local.tags
}

module "rds" {
  source                   = "./modules/rds"
  name                     = local.name
  vpc_id                   = module.vpc.vpc_id
  subnet_ids               = module.vpc.private_subnet_ids
  client_security_group_id = module.eks.cluster_security_group_id
  instance_class           = var.db_instance_class
  multi_az                 = var.db_multi_az
  deletion_protection      = var.db_deletion_protection
  tags                     = local.tags
}

module "iam" {
  source            = "./modules/iam"
  name              = local.name
  oidc_provider_arn = module.eks.oidc_provider_arn
  oidc_issuer       = module.eks.oidc_issuer
  namespace         = local.namespace
  bucket_arns       = module.s3.bucket_arns
  kms_key_arn       = module.s3.kms_key_arn
  tags              = local.tags
}

module "ascend" {
  source         = "./modules/ascend"
  mode           = var.ascend_mode
  name           = local.name
  cluster_name   = module.eks.cluster_name
  cce_cluster_id = var.cce_cluster_id
  node_count     = var.ascend_node_count
  tags           = local.tags
}
