"""Grow DATA to fill its disk (the counterpart of Bottlerocket's repart-local).

When the disk is larger than the image (a bigger cloud volume, an enlarged VM disk), the
GPT's backup header moves to the new end, DATA's entry is extended, the kernel is told the
new partition size, and ext4 is grown online.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kiln.core.run import run
from kiln.image import gpt, layout

DATA = layout.part_name("data")


def parent_disk(partition: str) -> tuple[Path, int]:
    """/dev/vda9 -> (/dev/vda, 9), read from sysfs."""
    sys_part = Path("/sys/class/block") / partition
    number = int((sys_part / "partition").read_text())
    disk = sys_part.resolve().parent.name
    return Path("/dev") / disk, number


def main() -> int:
    from kiln.host.slot.disk import Disk

    region = Disk.from_host().region(DATA)
    disk, number = parent_disk(region.path.name)
    size = int((Path("/sys/class/block") / disk.name / "size").read_text()) * 512
    with open(disk, "r+b") as f:
        table = gpt.grow_last_partition(f, size)
    if table is None:
        print("kiln-grow-data: DATA already fills its disk")
        return 0
    last = table.partitions[-1]
    if last.name != DATA:
        print(f"kiln-grow-data: last partition is {last.name}, not {DATA}", file=sys.stderr)
        return 1
    # Tell the kernel the new size without re-reading the whole (in-use) table.
    run(["partx", "-u", "--nr", str(number), disk])
    run(["resize2fs", region.path])
    print(f"kiln-grow-data: grew {DATA} to {last.size // 2**20} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
