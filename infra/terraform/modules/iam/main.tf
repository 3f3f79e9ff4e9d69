# IAM roles for Kubernetes service accounts (IRSA): training (checkpoints RW, DVC remote read,
# MLflow artifacts RW), serving (MLflow artifacts read), mlflow (MLflow artifacts RW).
# Each role trusts exactly one namespace/serviceaccount through the cluster's OIDC provider.

variable "name" {
  description = "Name prefix, e.g. troupe-prod."
  type        = string
}

variable "oidc_provider_arn" {
  description = "EKS OIDC provider ARN."
  type        = string
}

variable "oidc_issuer" {
  description = "OIDC issuer host/path (no https://)."
  type        = string
}

variable "namespace" {
  description = "Namespace of the Troupe workloads (troupe-test | troupe-prod)."
  type        = string
}

variable "bucket_arns" {
  description = "Bucket ARNs by purpose (dvc, mlflow-artifacts, checkpoints)."
  type        = map(string)
}

variable "kms_key_arn" {
  description = "KMS key of the buckets."
  type        = string
}

variable "db_secret_arn" {
  description = "ARN of the RDS-managed master user secret (Secrets Manager) the MLflow role may read."
  type        = string
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}

locals {
  # role => service account name (the charts' serviceAccount.name) and bucket access.
  roles = {
    training = { sa = "troupe-training", rw = ["checkpoints", "mlflow-artifacts"], ro = ["dvc"] }
    # serving reads model versions where training wrote them (MLflow registers s3://<checkpoints>/... URIs)
    serving = { sa = "troupe-serving", rw = [], ro = ["mlflow-artifacts", "checkpoints"] }
    mlflow  = { sa = "troupe-mlflow", rw = ["mlflow-artifacts"], ro = [] }
    # the KFP training step uploads a run's inputs under its storage root (checkpoints bucket) for the RayJob
    pipeline = { sa = "troupe-pipeline", rw = ["dvc", "mlflow-artifacts", "checkpoints"], ro = [] }
  }
}

data "aws_iam_policy_document" "assume" {
  for_each = local.roles
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.namespace}:${each.value.sa}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "access" {
  for_each = local.roles
  statement {
    sid       = "List"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [for b in concat(each.value.rw, each.value.ro) : var.bucket_arns[b]]
  }
  statement {
    sid       = "Read"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = [for b in concat(each.value.rw, each.value.ro) : "${var.bucket_arns[b]}/*"]
  }
  dynamic "statement" {
    for_each = length(each.value.rw) > 0 ? [1] : []
    content {
      sid       = "Write"
      actions   = ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
      resources = [for b in each.value.rw : "${var.bucket_arns[b]}/*"]
    }
  }
  statement {
    sid       = "Kms"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_role" "this" {
  for_each           = local.roles
  name               = "${var.name}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.assume[each.key].json
  tags               = var.tags
}

# The MLflow server reads the RDS-managed master password at every start (troupe.mlflow_server), so a
# rotation (every 7 days) is picked up by a restart instead of a stale copy in a Kubernetes Secret.
data "aws_iam_policy_document" "mlflow_db_secret" {
  statement {
    sid       = "ReadRdsManagedSecret"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [var.db_secret_arn]
  }
}

resource "aws_iam_role_policy" "mlflow_db_secret" {
  name   = "rds-secret-read"
  role   = aws_iam_role.this["mlflow"].id
  policy = data.aws_iam_policy_document.mlflow_db_secret.json
}

resource "aws_iam_role_policy" "this" {
  for_each = local.roles
  name     = "s3-access"
  role     = aws_iam_role.this[each.key].id
  policy   = data.aws_iam_policy_document.access[each.key].json
}

output "role_arns" {
  description = "IRSA role ARNs by workload: training, serving, mlflow, pipeline (chart value aws.roleArn)."
  value       = { for k, r in aws_iam_role.this : k => r.arn }
}
