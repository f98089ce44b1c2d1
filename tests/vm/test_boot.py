"""VM: the default image boots to the ready line; root, /etc and /local behave as designed."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.vm.qemu import SerialTimeout, Vm, free_port
from tests.conftest import Images

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


def test_default_image_boots_to_ready_and_powers_off(images: Images, boot: Callable[..., Vm]) -> None:
    build = images.get(debug_console=False)
    vm = boot(build.disk)
    ready = vm.wait_ready(240)
    assert ready.group(0) == "kiln: ready version=1.0.0 variant=container-host slot=A"
    status = vm.wait_for(r"kiln: status (.*)\n", 30).group(1)
    assert "root=dm-verity,erofs,ro" in status
    assert "etc=tmpfs" in status and "local=ext4" in status
    assert "containerd" in status
    # No login anywhere: nothing answers on the serial console.
    assert "getty" not in status and "sshd" not in status
    vm.mark()
    vm.send("echo KI$((6*7))N\n")
    with pytest.raises(SerialTimeout):
        vm.wait_for("KI42N", 8)
    assert vm.shutdown(timeout=120), "the guest did not power off on the ACPI power button"


def test_root_verity_readonly_etc_tmpfs_local_persists_and_data_grows(
    images: Images, boot: Callable[..., Vm]
) -> None:
    """One boot of a 2 GiB disk (the image is 506 MiB) for both: each boot costs ~25 s."""
    build = images.get(debug_console=True)
    vm = boot(build.disk, disk_size=2 * 1024**3)
    vm.wait_ready(240)
    vm.wait_for(r"kiln: status .*\n", 30)

    # The host agent grows DATA once the gate has run; wait for its word (bounded).
    said = vm.check("for i in $(seq 90); do journalctl -u kiln-agent --no-pager -o cat | "
                    "grep -E 'kiln-grow-data|grow-data crashed' && break; sleep 1; done", timeout=180)
    assert "kiln-grow-data: grew KILN-DATA" in said, said
    assert vm.check("echo ok > /tmp/kiln-tmp-test && cat /tmp/kiln-tmp-test").strip() == "ok"
    blocks = int(vm.check("df -k --output=size /local | tail -1").strip())
    assert blocks > 1_400_000, f"/local is only {blocks} KiB on a 2 GiB disk"
    data_dev = vm.check("grep ' /local ' /proc/mounts").split()[0]
    sectors = int(vm.check(f"cat /sys/class/block/{data_dev.rsplit('/', 1)[1]}/size").strip())
    assert sectors * 512 > 1_400_000 * 1024
    # The table stays valid: the slot tool still reads the ESP through it.
    assert '"active": "A"' in vm.check("kiln slot status --json")

    osr = vm.check("cat /etc/os-release")
    assert "KILN_DEBUG_CONSOLE=yes" in osr and "VERSION_ID=1.0.0" in osr

    root = vm.check("grep ' / ' /proc/mounts").split()
    assert root[2] == "erofs" and root[3].split(",")[0] == "ro"
    table = vm.check("dmsetup table kiln-root")
    assert " verity 1 " in table and "restart_on_corruption" in table
    assert build.root_hash in table
    status, out = vm.sh("touch /usr/kiln-write-test")
    assert status != 0 and "Read-only file system" in out

    assert vm.check("stat -f -c %T /etc").strip() == "tmpfs"
    vm.check("echo scratch > /etc/kiln-etc-test")
    vm.check("echo persisted > /local/kiln-marker && sync")
    assert vm.check("stat -f -c %T /local").strip() == "ext2/ext3"
    assert vm.check("cat /var/lib/kiln/machine-id").strip() == vm.check("cat /etc/machine-id").strip()
    machine_id = vm.check("cat /etc/machine-id").strip()

    vm.send("reboot\n")
    vm.wait_ready(300)
    vm.wait_for(r"kiln: status .*\n", 30)
    assert vm.check("cat /local/kiln-marker").strip() == "persisted"
    assert vm.sh("test -e /etc/kiln-etc-test")[0] != 0, "/etc must not survive a reboot"
    assert vm.check("cat /etc/machine-id").strip() == machine_id
    slot = vm.check("kiln slot status --json")
    assert re.search(r'"active": "A"', slot) and re.search(r'"ever_succeeded": true', slot)
    assert int(vm.check("df -k --output=size /local | tail -1").strip()) > 1_400_000, "DATA shrank back"


def test_kiln_run_headless_json(images: Images, tmp_path: Path) -> None:
    build = images.get(debug_console=False)
    before = hashlib.sha256(build.disk.read_bytes()).hexdigest()
    log = tmp_path / "serial.log"
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli.main", "run", str(build.output), "--headless", "--json",
         "--serial-log", str(log), "--forward", f"{free_port()}:80"],
        capture_output=True, text=True, timeout=480, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["ready"] == "kiln: ready version=1.0.0 variant=container-host slot=A"
    assert info["slot"] == "A" and info["seconds_to_ready"] > 0
    assert "root=dm-verity" in info["status"]
    assert "kiln: ready" in log.read_text()
    # The image itself was never written (the guest wrote a copy-on-write overlay).
    assert hashlib.sha256(build.disk.read_bytes()).hexdigest() == before
