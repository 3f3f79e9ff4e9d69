# terraform init -backend-config=envs/test.backend.hcl -backend-config=bucket=<state bucket> -backend-config=dynamodb_table=<lock table>
key     = "troupe/test/terraform.tfstate"
encrypt = true
