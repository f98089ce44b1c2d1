"""VM: a host configured by first-boot user data, reconfigured live over the mTLS API."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln import pki
from kiln.image.gpt import read_gpt
from kiln.vm.qemu import Forward, Vm, free_port
from tests.conftest import Images, raw_copy
from tests.ntp_server import sntp_server

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


def kiln(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kiln.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_user_data_configures_host_then_remote_api_changes_it_live(
    images: Images, boot: Callable[..., Vm], tmp_path: Path
) -> None:
    build = images.get(debug_console=True)
    fleet = tmp_path / "pki"
    pki.init(fleet)
    pki.issue_client(fleet, "auditor", "reader")
    user_data = tmp_path / "user-data.toml"
    user_data.write_text(pki.user_data(fleet) + """
[settings]
motd = "Configured by user data"
[settings.network]
hostname = "kiln-vm-1"
[settings.ntp]
time-servers = ["10.0.2.2"]
[settings.kernel.sysctl]
"vm.swappiness" = "17"
""")
    port = free_port()
    with sntp_server() as ntp_clients:
        disk = raw_copy(build.disk, tmp_path / "disk.img")  # the second boot is a new QEMU on it
        vm = boot(disk, overlay=False, user_data=user_data, forwards=(Forward(port, 50000),))
        vm.wait_for(r"kiln: user data applied from config drive", 240)
        vm.wait_ready(240)
        vm.wait_shell()

        # Rendered from user data, and the running system uses it.
        assert vm.check("cat /etc/motd").strip() == "Configured by user data"
        assert vm.check("cat /proc/sys/kernel/hostname").strip() == "kiln-vm-1"
        assert "NTP=10.0.2.2" in vm.check("cat /etc/systemd/timesyncd.conf.d/80-kiln.conf")
        assert vm.check("cat /proc/sys/vm/swappiness").strip() == "17"
        assert vm.check("stat -c '%a %G' /run/kiln/api.sock").strip() == "660 api"
        # timesyncd really talks to the server from the settings (10.0.2.2 is this host).
        status = ""
        for _ in range(30):
            status = vm.check("systemctl show -p StatusText --value systemd-timesyncd")
            if "time server 10.0.2.2" in status and ntp_clients:
                break
            vm.check("sleep 2")
        assert "time server 10.0.2.2" in status and ntp_clients, f"timesyncd did not reach it: {status!r}"

    # From the workstation, over mutual TLS: read, then change the hostname live.
    remote = ["--endpoint", f"127.0.0.1:{port}", "--pki", str(fleet)]
    got = kiln(*remote, "settings", "get", "settings.network.hostname", "--json")
    assert got.returncode == 0, got.stderr
    assert '"kiln-vm-1"' in got.stdout
    changed = kiln(*remote, "settings", "set", "network.hostname=renamed-node", 'kernel.sysctl."vm.swappiness"=23')
    assert changed.returncode == 0, changed.stderr
    assert "settings.network.hostname" in changed.stdout
    assert vm.check("cat /proc/sys/kernel/hostname").strip() == "renamed-node"
    assert vm.check("cat /proc/sys/vm/swappiness").strip() == "23"
    assert "127.0.1.1 renamed-node" in vm.check("cat /etc/hosts")
    # Kernel lockdown: one way, raised live, and again on every later boot.
    assert "[none]" in vm.check("cat /sys/kernel/security/lockdown")
    locked = kiln(*remote, "settings", "set", "kernel.lockdown=integrity")
    assert locked.returncode == 0, locked.stderr
    assert "[integrity]" in vm.check("cat /sys/kernel/security/lockdown")

    # A reader may look but not touch; the node's key stays hidden from it.
    reader = [*remote, "--client", "auditor"]
    seen = kiln(*reader, "settings", "get", "--json")
    assert seen.returncode == 0 and "<redacted>" in seen.stdout and "PRIVATE KEY" not in seen.stdout
    refused = kiln(*reader, "settings", "set", "motd=nope")
    assert refused.returncode == 1 and "403" in refused.stderr
    assert vm.check("cat /etc/motd").strip() == "Configured by user data"

    # Settings survive a reboot; user data is not applied a second time.
    # Power off and boot again in a new QEMU (its warm reset hangs now and then under TCG after
    # this test's run; the A/B tests cover warm reboots). The config drive stays attached.
    assert vm.shutdown(timeout=120), "the guest did not power off"
    vm = boot(disk, overlay=False, user_data=user_data, forwards=(Forward(port, 50000),))
    since = 0
    vm.wait_ready(300)
    vm.wait_shell()
    assert vm.check("cat /proc/sys/kernel/hostname").strip() == "renamed-node"
    assert vm.check("cat /proc/sys/vm/swappiness").strip() == "23"
    assert "[integrity]" in vm.check("cat /sys/kernel/security/lockdown")
    assert "user data applied" not in vm.output[since:]
    # Settings changed at run time, so this boot rendered everything once (the render cache
    # only trusts a full render) and recorded a cache the next boot can skip with.
    timings = json.loads(vm.check("cat /run/kiln/boot-settings.json"))
    assert isinstance(timings["apply"], dict) and timings["apply"]["errors"] == []
    manifest = json.loads(vm.check("cat /var/lib/kiln/rendered/manifest.json"))
    assert "/etc/hostname" in manifest["files"] and manifest["digest"]


def test_invalid_user_data_boots_on_defaults_and_says_so(
    images: Images, boot: Callable[..., Vm], tmp_path: Path
) -> None:
    build = images.get(debug_console=True)
    user_data = tmp_path / "user-data.toml"
    user_data.write_text('[settings]\nmotd = "never shown"\n[settings.network]\nhostname = 5\n')
    vm = boot(build.disk, user_data=user_data)
    rejected = vm.wait_for(r"kiln: user data rejected: (.*)\n", 240).group(1)
    assert "settings.network.hostname: expected str, got int" in rejected
    assert "booting without it" in rejected
    vm.wait_ready(240)
    vm.wait_shell()
    assert vm.check("cat /etc/motd").strip() == "Welcome to Kiln!"
    assert vm.check("cat /proc/sys/kernel/hostname").strip().startswith("kiln-")
    assert vm.check("kiln settings get motd").strip() == 'settings.motd = "Welcome to Kiln!"'


def _set_boot_cmdline(disk: Path, extra: str) -> None:
    """Append `extra` to slot A's kernel command line (kiln.cfg on KILN-BOOT-A), with mtools."""
    with open(disk, "rb") as f:
        table = read_gpt(f, disk.stat().st_size)
    boot = next(p for p in table.partitions if p.name == "KILN-BOOT-A")
    image = f"{disk}@@{boot.offset}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    cfg = subprocess.run(["mtype", "-i", image, "::/kiln.cfg"], capture_output=True, text=True, check=True, env=env)
    text = re.sub(r'set KILN_CMDLINE="([^"]*)"', lambda m: f'set KILN_CMDLINE="{m.group(1)} {extra}"', cfg.stdout)
    new = disk.parent / "kiln.cfg"
    new.write_text(text)
    subprocess.run(["mcopy", "-o", "-i", image, str(new), "::/kiln.cfg"], check=True, env=env)


def test_user_data_from_a_metadata_url_overrides_the_config_drive(
    images: Images, boot: Callable[..., Vm], tmp_path: Path
) -> None:
    build = images.get(debug_console=True)
    served = b'[settings]\nmotd = "from the metadata URL"\n'
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200 if self.path == "/user-data" else 404)
            self.send_header("Content-Length", str(len(served)))
            self.end_headers()
            self.wfile.write(served)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        disk = raw_copy(build.disk, tmp_path / "disk.img")
        _set_boot_cmdline(disk, f"kiln.user-data-url=http://10.0.2.2:{server.server_address[1]}/user-data")
        drive = tmp_path / "user-data.toml"
        drive.write_text('[settings]\nmotd = "from the config drive"\n[settings.network]\nhostname = "from-drive"\n')
        vm = boot(disk, user_data=drive)
        vm.wait_for(r"kiln: user data applied from config drive", 240)
        vm.wait_for(r"kiln: user data applied from http://10\.0\.2\.2:\d+/user-data", 240)
        vm.wait_ready(240)
        vm.wait_shell()
        # Later providers win key by key: the URL's motd, the drive's hostname.
        assert vm.check("cat /etc/motd").strip() == "from the metadata URL"
        assert vm.check("cat /proc/sys/kernel/hostname").strip() == "from-drive"
        report = json.loads(vm.check("cat /var/lib/kiln/user-data/network.json"))
        assert report["http"].startswith("applied from http://10.0.2.2")
        assert requests == ["/user-data"]
    finally:
        server.shutdown()
        server.server_close()
