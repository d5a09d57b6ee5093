"""Image tooling that the build pipeline and Packer call: base disk, OVA, AMI."""
