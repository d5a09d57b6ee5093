# Inputs of the tether image templates. `tether-image build` (tether/image/cli.py)
# sets them through a generated variables file; see docs/CONTRACTS.md.

variable "base_disk" {
  type        = string
  description = "Per-build copy of the cached base disk (raw, name not ending in .raw)."
  default     = "/nonexistent/disk.img"
}

variable "output_dir" {
  type        = string
  description = "Packer's output directory for the qemu source (must not exist)."
  default     = "output-qemu"
}

variable "vm_name" {
  type        = string
  description = "File name of the provisioned disk inside output_dir."
  default     = "tether.img"
}

variable "accelerator" {
  type        = string
  description = "kvm when a probe really booted a kernel with it, else tcg."
  default     = "tcg"
}

variable "cpus" {
  type    = number
  default = 2
}

variable "memory" {
  type        = number
  description = "MiB of guest RAM during the build."
  default     = 2048
}

variable "ssh_private_key_file" {
  type        = string
  description = "Build-only key; its public half is in the disk's authorized_keys."
  default     = "/nonexistent/build_key"
}

variable "serial_log" {
  type        = string
  description = "Where the guest's serial console is written (build log)."
  default     = "serial.log"
}

variable "playbook_file" {
  type        = string
  description = "Empty: ansible/site.yml of this checkout."
  default     = ""
}

variable "ansible_config" {
  type        = string
  description = "Empty: ansible/ansible.cfg of this checkout."
  default     = ""
}

variable "ansible_playbook" {
  type        = string
  description = "ansible-playbook of the project venv."
  default     = "ansible-playbook"
}

variable "buildvars_file" {
  type        = string
  description = "JSON with tether_wheelhouse, tether_credential, tether_image_name, tether_image_id."
  default     = "/nonexistent/buildvars.json"
}

variable "ansible_tags" {
  type        = string
  description = "Roles (site.yml tags) this run applies: all, or the layer's / the image's roles."
  default     = "all"
}

variable "aws_region" {
  type    = string
  default = "eu-central-1"
}

variable "aws_instance_type" {
  type    = string
  default = "t3.large"
}

variable "ami_name" {
  type    = string
  default = "tether-appliance"
}

locals {
  playbook_file  = coalesce(var.playbook_file, "${path.root}/../ansible/site.yml")
  ansible_config = coalesce(var.ansible_config, "${path.root}/../ansible/ansible.cfg")
}
