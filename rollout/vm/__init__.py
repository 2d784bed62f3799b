"""Real Linux nodes under QEMU: the sample guest OS, its disks, the VMs and the VM fleet.

- `guest`: builds (once, cached) a small Debian 13 root tree with the rollout agent as a
  systemd unit, and the sample root-filesystem images made from it.
- `disk`: the node disk layout (MBR, GRUB, boot partition, slots A and B, data partition)
  assembled from files without loop devices.
- `qemu`: starts and stops QEMU processes (KVM when it works, TCG otherwise).
- `fleet`: `rollout fleet up --vm` / `fleet down` for a fleet of such VMs.
"""
