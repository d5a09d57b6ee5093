# One playbook for both sources: ansible/site.yml with the build variables file.
# use_proxy = false: Ansible talks to the guest's sshd directly (Packer's SSH
# proxy fails against OpenSSH 9, which refuses its ssh-rsa host key).
build {
  sources = ["source.qemu.tether", "source.amazon-ebs.tether"]

  provisioner "ansible" {
    only          = ["qemu.tether"]
    command       = var.ansible_playbook
    playbook_file = local.playbook_file
    user          = "root"
    use_proxy     = false
    # ansible_tags: the layer's run applies the shared roles, the image's run
    # the per-image ones (tether/image/layer.py).
    extra_arguments = ["--tags", var.ansible_tags, "--extra-vars", "@${var.buildvars_file}"]
    ansible_env_vars = [
      "ANSIBLE_CONFIG=${local.ansible_config}",
      "ANSIBLE_NOCOLOR=1",
      "ANSIBLE_HOST_KEY_CHECKING=False",
    ]
  }

  provisioner "ansible" {
    only          = ["amazon-ebs.tether"]
    command       = var.ansible_playbook
    playbook_file = local.playbook_file
    user          = "admin"
    use_proxy     = false
    extra_arguments = ["--become", "--extra-vars", "@${var.buildvars_file}"]
    ansible_env_vars = [
      "ANSIBLE_CONFIG=${local.ansible_config}",
      "ANSIBLE_NOCOLOR=1",
      "ANSIBLE_HOST_KEY_CHECKING=False",
    ]
  }
}
