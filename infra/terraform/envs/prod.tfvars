# terraform apply -var-file=envs/prod.tfvars (see main.tf): the variable defaults are production's.
env = "prod"
