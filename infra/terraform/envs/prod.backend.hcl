# terraform init -backend-config=envs/prod.backend.hcl -backend-config=bucket=<state bucket> -backend-config=dynamodb_table=<lock table>
key     = "troupe/prod/terraform.tfstate"
encrypt = true
