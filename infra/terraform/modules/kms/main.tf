# Customer-managed KMS key with rotation and an account-root key policy (IAM policies grant the use):
# one per consumer (EKS secrets, the MLflow database, the S3 buckets).

variable "description" {
  description = "Key description, e.g. \"troupe-prod EKS secrets\"."
  type        = string
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {}

resource "aws_kms_key" "this" {
  description         = var.description
  enable_key_rotation = true
  tags                = var.tags
}

resource "aws_kms_key_policy" "this" {
  key_id = aws_kms_key.this.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "Account"
      Effect    = "Allow"
      Principal = { AWS = "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root" }
      Action    = "kms:*"
      Resource  = "*"
    }]
  })
}

output "id" {
  description = "Key id."
  value       = aws_kms_key.this.id
}

output "arn" {
  description = "Key ARN."
  value       = aws_kms_key.this.arn
}
