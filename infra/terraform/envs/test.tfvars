# terraform apply -var-file=envs/test.tfvars (see main.tf): a cheaper, disposable environment.
env                    = "test"
vpc_cidr               = "10.20.0.0/16"
cpu_nodes              = { instance_type = "m6i.2xlarge", min = 1, desired = 1, max = 4 }
force_destroy_buckets  = true
db_instance_class      = "db.t4g.medium"
db_multi_az            = false
db_deletion_protection = false

gpu_node_groups = {
  p4d = { instance_type = "p4d.24xlarge", min = 0, desired = 0, max = 2, efa = false }
}
