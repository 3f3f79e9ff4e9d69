# S3 buckets of one environment: DVC remote, MLflow artifacts, training checkpoints, plus an
# access-log bucket. All KMS-encrypted, versioned, public access blocked, lifecycle managed.

variable "name" {
  description = "Name prefix, e.g. troupe-prod (bucket names: <name>-dvc, <name>-mlflow-artifacts, <name>-checkpoints)."
  type        = string
}

variable "noncurrent_days" {
  description = "Days to keep non-current object versions."
  type        = number
  default     = 90
}

variable "force_destroy" {
  description = "Allow destroying non-empty buckets (test only)."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}

locals {
  buckets = toset(["dvc", "mlflow-artifacts", "checkpoints"])
}

module "kms" {
  source      = "../kms"
  description = "${var.name} S3 buckets"
  tags        = var.tags
}

# Access logs of the data buckets.
module "logs" {
  source        = "./bucket"
  bucket        = "${var.name}-access-logs"
  kms_key_arn   = module.kms.arn
  log_bucket    = ""
  force_destroy = var.force_destroy
  tags          = var.tags
}

module "bucket" {
  source          = "./bucket"
  for_each        = local.buckets
  bucket          = "${var.name}-${each.key}"
  kms_key_arn     = module.kms.arn
  log_bucket      = module.logs.id
  noncurrent_days = var.noncurrent_days
  force_destroy   = var.force_destroy
  tags            = merge(var.tags, { Purpose = each.key })
}

output "buckets" {
  description = "Bucket names by purpose: dvc, mlflow-artifacts, checkpoints."
  value       = { for k, b in module.bucket : k => b.id }
}

output "bucket_arns" {
  description = "Bucket ARNs by purpose."
  value       = { for k, b in module.bucket : k => b.arn }
}

output "kms_key_arn" {
  description = "KMS key encrypting the buckets (IRSA roles need kms:Decrypt/GenerateDataKey)."
  value       = module.kms.arn
}
