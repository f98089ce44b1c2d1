"""Boot Kiln images under QEMU: the runner behind `kiln run` and the VM test harness."""
