# Plugin requirements for modern Packer (>= 1.7), read only by
# `packer init packer/plugins`. Kept out of packer/ because Debian's
# packer 1.6.6 rejects `required_plugins` in the templates it loads.
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    qemu = {
      source  = "github.com/hashicorp/qemu"
      version = ">= 1.0.9"
    }
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.0"
    }
    ansible = {
      source  = "github.com/hashicorp/ansible"
      version = ">= 1.1.0"
    }
  }
}
