# S3 buckets of one environment: DVC remote, MLflow artifacts, training checkpoints (KMS-encrypted,
# ./bucket), plus the access-log bucket their server access logs go to (below). All versioned, public
# access blocked, lifecycle managed.

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

variable "log_retention_days" {
  description = "Days to keep server access logs."
  type        = number
  default     = 365
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

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {}

# Server access logs of the data buckets. S3 delivers them as the logging service principal
# logging.s3.amazonaws.com; with Object Ownership BucketOwnerEnforced, ACL grants are off, so the bucket
# policy below is the only thing that lets it write (without it logging is configured and no log ever
# arrives). Encrypted with SSE-S3: the default encryption log delivery has always supported (with
# SSE-KMS the logging principal would also need the key, which the data buckets' key does not grant).
resource "aws_s3_bucket" "logs" {
  #checkov:skip=CKV_AWS_18:this is the access-log target bucket; logging it would log into itself
  #checkov:skip=CKV_AWS_144:cross-region replication not required for access logs; they are an audit aid, not data
  #checkov:skip=CKV2_AWS_62:no event consumers for access logs
  #checkov:skip=CKV_AWS_145:SSE-S3 on purpose, the default encryption S3 server access log delivery supports; logs hold request metadata only
  bucket        = "${var.name}-access-logs"
  force_destroy = var.force_destroy
  tags          = merge(var.tags, { Purpose = "access-logs" })
}

resource "aws_s3_bucket_versioning" "logs" {
  bucket = aws_s3_bucket.logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_public_access_block" "logs" {
  bucket                  = aws_s3_bucket.logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    id     = "expire-logs"
    status = "Enabled"
    filter {}
    expiration {
      days = var.log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 7
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

# What AWS requires for server access log delivery to a bucket policy-only target: the logging service
# may put objects, only for our own source buckets in our account (confused-deputy guard).
data "aws_iam_policy_document" "logs" {
  statement {
    sid       = "S3ServerAccessLogDelivery"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.logs.arn}/*"]
    principals {
      type        = "Service"
      identifiers = ["logging.s3.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = [for b in local.buckets : "arn:${data.aws_partition.current.partition}:s3:::${var.name}-${b}"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.logs.arn, "${aws_s3_bucket.logs.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "logs" {
  bucket     = aws_s3_bucket.logs.id
  policy     = data.aws_iam_policy_document.logs.json
  depends_on = [aws_s3_bucket_public_access_block.logs]
}

module "bucket" {
  source          = "./bucket"
  for_each        = local.buckets
  bucket          = "${var.name}-${each.key}"
  kms_key_arn     = module.kms.arn
  log_bucket      = aws_s3_bucket.logs.id
  noncurrent_days = var.noncurrent_days
  force_destroy   = var.force_destroy
  tags            = merge(var.tags, { Purpose = each.key })
  depends_on      = [aws_s3_bucket_policy.logs] # log delivery is allowed before logging is switched on
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

output "access_log_bucket" {
  description = "Bucket receiving the data buckets' server access logs (prefix <bucket name>/)."
  value       = aws_s3_bucket.logs.id
}
