# Build inside AWS from Debian's official bookworm AMI with the same playbook.
# Checked with `packer validate` here; never run from this machine.
source "amazon-ebs" "tether" {
  region        = var.aws_region
  instance_type = var.aws_instance_type
  ami_name      = var.ami_name
  ssh_username  = "admin"

  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = ["136693071363"]
    most_recent = true
  }

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 16
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    delete_on_termination = true
  }

  ena_support   = true
  sriov_support = true
}
