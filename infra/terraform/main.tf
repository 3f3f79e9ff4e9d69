# Troupe platform root, one per environment by var file + backend config:
# VPC -> EKS (+ GPU node groups, EKS add-ons) -> cluster add-ons (Helm) -> S3 -> RDS -> IRSA roles
# (-> Ascend EKS Hybrid Nodes). AWS only: the Huawei Cloud CCE path is its own root, ./ascend-cce,
# so an AWS-only init downloads no huaweicloud provider and needs no Huawei credentials.
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
    helm = {
      source  = "hashicorp/helm"
      version = ">= 2.12, < 3.0" # 3.x changed the kubernetes block to an attribute
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

# In-cluster add-ons (modules/addons). No static credentials: a token from `aws eks get-token` with the
# same AWS identity as the aws provider (modules/eks grants it cluster admin). The endpoint is private,
# so an apply that installs them runs from inside the VPC; install_cluster_addons = false skips them.
provider "helm" {
  kubernetes {
    host                   = module.eks.cluster_endpoint
    cluster_ca_certificate = base64decode(module.eks.cluster_ca_data)
    exec {
      api_version = "client.authentication.k8s.io/v1beta1"
      command     = "aws"
      args        = ["eks", "get-token", "--cluster-name", module.eks.cluster_name, "--region", var.region]
    }
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
  source             = "./modules/eks"
  name               = local.name
  vpc_id             = module.vpc.vpc_id
  vpc_cidr           = module.vpc.vpc_cidr
  subnet_ids         = module.vpc.private_subnet_ids
  cpu_nodes          = var.cpu_nodes
  gpu_node_groups    = var.gpu_node_groups
  remote_node_cidrs  = local.hybrid ? var.ascend_remote_node_cidrs : []
  remote_pod_cidrs   = local.hybrid ? var.ascend_remote_pod_cidrs : []
  cluster_admin_arns = var.cluster_admin_arns
  tags               = local.tags
}

module "addons" {
  source                      = "./modules/addons"
  count                       = var.install_cluster_addons ? 1 : 0
  cluster_name                = module.eks.cluster_name
  region                      = var.region
  cluster_autoscaler_role_arn = module.eks.system_role_arns["cluster-autoscaler"]
  depends_on                  = [module.eks] # node groups, add-ons and admin access entry first
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
  db_secret_arn     = module.rds.master_user_secret_arn
  tags              = local.tags
}

module "ascend" {
  source       = "./modules/ascend"
  mode         = var.ascend_mode
  name         = local.name
  cluster_name = module.eks.cluster_name
  node_count   = var.ascend_node_count
  tags         = local.tags
}
