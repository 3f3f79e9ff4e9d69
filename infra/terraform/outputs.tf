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

output "gpu_node_groups" {
  description = "Per GPU group: instance_type, gpus_per_node, efa_per_node (request vpc.amazonaws.com/efa: <this> with all of a node's GPUs), labels, taint."
  value       = module.eks.gpu_node_groups
}

output "storage_class" {
  description = "Default StorageClass (EBS CSI add-on, gp3) that PVCs naming no class get."
  value       = module.eks.storage_class
}

output "system_role_arns" {
  description = "IRSA roles of kube-system controllers: ebs-csi (EBS CSI add-on), cluster-autoscaler."
  value       = module.eks.system_role_arns
}
