# Local build: boot the per-build copy of the base disk under qemu, provision
# it over SSH with the build-only key. The guest gets user networking with
# restrict=on: DHCP and the SSH forward on 127.0.0.1, nothing else.
source "qemu" "tether" {
  iso_url      = var.base_disk
  iso_checksum = "none"
  disk_image   = true
  format       = "raw"
  disk_size    = "16384M"
  # Packer's output is a raw disk that the pipeline turns into the OVA and AMI.
  output_directory = var.output_dir
  vm_name          = var.vm_name

  accelerator    = var.accelerator
  cpus           = var.cpus
  memory         = var.memory
  headless       = true
  disk_interface = "virtio"
  net_device     = "virtio-net"
  # Freed blocks (sysprep's fstrim) become holes in the raw disk.
  disk_discard        = "unmap"
  disk_detect_zeroes  = "unmap"
  vnc_bind_address    = "127.0.0.1"

  qemuargs = [
    ["-netdev", "user,id=user.0,restrict=on,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
    ["-serial", "file:${var.serial_log}"],
  ]

  communicator         = "ssh"
  ssh_username         = "root"
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "20m"

  # sysprep purged sshd, but this session lives on (Debian's ssh.service has
  # KillMode=process), so the clean poweroff still goes through it.
  shutdown_command = "systemctl poweroff"
  shutdown_timeout = "10m"
}
