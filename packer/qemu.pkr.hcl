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
  headless         = true
  vnc_bind_address = "127.0.0.1"

  # The disk sits on an NVMe controller, as in the OVA and on EC2 Nitro: the
  # appliance boots without an initramfs, and its kernel has NVMe built in but
  # virtio-blk only as a module. Giving -drive and -device here replaces all
  # of Packer's defaults for them (Packer 1.6.6 and the qemu plugin alike), so
  # the NIC is listed too. discard/detect-zeroes=unmap: freed blocks
  # (sysprep's fstrim) become holes in the raw disk.
  qemuargs = [
    ["-netdev", "user,id=user.0,restrict=on,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
    ["-device", "virtio-net,netdev=user.0"],
    ["-drive", "if=none,id=disk0,file=${var.output_dir}/${var.vm_name},format=raw,cache=writeback,discard=unmap,detect-zeroes=unmap"],
    ["-device", "nvme,drive=disk0,serial=tether-build,bootindex=0"],
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
