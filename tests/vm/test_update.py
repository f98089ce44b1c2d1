"""Signed A/B updates end to end: releases published with `kiln repo` to the session's
repository, served on the host's 127.0.0.1 and reached from the guest at 10.0.2.2
through QEMU user networking; the guest's own `kiln update` drives its update agent."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln import pki
from kiln.repo import publish
from kiln.repo.serve import RepoServer
from kiln.vm.qemu import Forward, Vm, free_port, qmp
from tests.conftest import Images, UpdateRepo, raw_copy
from tests.helpers import Health

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
MIGRATION = ROOT / "migrations" / "2.0.0" / "stock-motd.py"
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}


@pytest.fixture
def served(update_repo: UpdateRepo) -> Iterator[UpdateRepo]:
    with RepoServer(update_repo.path, port=update_repo.port):
        yield update_repo


def status(vm: Vm) -> dict[str, Any]:
    st: dict[str, Any] = json.loads(vm.check("kiln update status --json"))
    return st


def setting(vm: Vm, key: str) -> Any:
    return json.loads(vm.check(f"kiln settings get --json {key}"))


def republish_panicking(src: Path, version: str, dest: Path) -> Path:
    """`src`'s artifacts as release `version`, with an initramfs the kernel cannot use:
    the kernel panics (panic=5 reboots) before any of Kiln's code runs."""
    from kiln.build.pipeline import write_artifacts
    from kiln.image.verity import VerityResult
    from tests.helpers import zstd_chunks

    manifest = json.loads((src / "manifest.json").read_text())
    work = dest.parent / f".{dest.name}-work"
    work.mkdir(parents=True)
    images = {}
    for key in ("boot", "root", "hash"):
        images[key] = work / f"{key}.img"
        with open(images[key], "wb") as f:
            for chunk in zstd_chunks(src / manifest["images"][key]["file"]):
                f.write(chunk)
    junk = work / "initrd.img"
    junk.write_bytes(b"\x00not an initramfs" * 4096)
    subprocess.run(["mcopy", "-o", "-i", str(images["boot"]), str(junk), "::/initrd.img"], check=True, env=MTOOLS_ENV)
    ver = manifest["verity"]
    vres = VerityResult(ver["root_hash"], ver["salt"], ver["data_blocks"], 0, "", 4096)
    write_artifacts(dest, manifest["variant"], version, vres, images, manifest["kernel"], manifest["build_id"])
    shutil.rmtree(work)
    return dest


class PowerCuts:
    """The disk as a power cut at eight points of one `kiln update apply --reboot` (and of
    the new version's first boot) leaves it: at each point the VM is paused (QEMU finishes
    the writes in flight), its raw disk copied, and resumed; the guest's page cache is not
    flushed, as in a real cut. Each copy is later booted in a fresh QEMU (two at a time)
    and must come up ready on a valid version: the old one while the new slot is
    incomplete or unconfirmed, the new one once it was activated."""

    OLD, NEW = {"1.0.0 A"}, {"2.0.0 B"}

    def __init__(self, vm: Vm, disk: Path, tmp: Path) -> None:
        self.vm, self.disk, self.tmp = vm, disk, tmp
        self.qmp = vm.cfg.workdir / "qmp.sock"
        self.cuts: list[tuple[str, Path, set[str]]] = []

    def cut(self, name: str, expect: set[str]) -> None:
        assert qmp(self.qmp, "stop").get("return") == {}
        copy = raw_copy(self.disk, self.tmp / f"cut{len(self.cuts)}.img")
        assert qmp(self.qmp, "cont").get("return") == {}
        self.cuts.append((name, copy, expect))

    def progress(self, image: str) -> int:
        found = re.findall(rf"writing {image}:\s+(\d+) %", self.vm.output)
        return max((int(p) for p in found), default=-1)

    def until(self, what: str, done: Callable[[], bool], timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def during_apply_and_first_boot(self) -> None:
        vm, old, new = self.vm, self.OLD, self.NEW
        vm.send("kiln update apply --reboot\n")
        time.sleep(2.0)
        self.cut("refreshing metadata", old)
        # one cut inside root's write: a cut at 10 % or 80 % leaves the same kind of disk
        # (slot B partly written, grubenv untouched), and each boot of a copy costs ~40 s
        self.until("root 45 %", lambda: self.progress("root") >= 45)
        self.cut("writing root (45 %)", old)
        # the writer's order is root, hash, boot; root + hash are re-read beside boot's write
        self.until("boot image", lambda: self.progress("boot") >= 0)
        self.cut("writing boot, the verity re-read beside it", old)
        # (the CLI polls twice a second and may miss 100 %: the apply's end counts too)
        self.until("boot image written", lambda: self.progress("boot") >= 100 or "state: Ready" in self.vm.output)
        self.cut("boot written", old | new)  # the check's end, mark-valid and activate race the cut
        vm.wait_for(r"state: Ready", 300)
        self.cut("activated, before the reboot", new)
        vm.wait_for(r"rebooting into 2\.0\.0", 300)
        time.sleep(1.5)
        self.cut("shutting down", new)
        vm.wait_for(r"kiln-grub: booting slot B", 300)
        vm.wait_for(r"Booting in blind mode", 60)  # GRUB hands over to the kernel (quiet: no kernel lines)
        time.sleep(2.0)
        self.cut("first boot of 2.0.0, its try spent", old)  # never confirmed: GRUB falls back
        vm.wait_for(r"kiln: datastore 1\.0\.0 -> 2\.0\.0", 300)
        self.cut("first boot of 2.0.0, datastore migrated", old)  # 1.0.0 migrates it back

    def boot_all(self, boot: Callable[..., Vm]) -> None:
        results = []
        for i in range(0, len(self.cuts), 2):
            pair = [(c, boot(c[1], overlay=True, cpus=1)) for c in self.cuts[i:i + 2]]
            for (name, _, expect), vm in pair:
                m = vm.wait_ready(420)
                results.append((name, f"{m.group(1)} {m.group(3)}", expect))
                vm.kill()
        bad = [(name, got, expect) for name, got, expect in results if got not in expect]
        assert not bad, f"booted the wrong version after a power cut: {bad}"
        assert len(results) == 8


@pytest.fixture
def health() -> Iterator[Health]:
    h = Health()
    yield h
    h.close()


def test_update_rollback_and_broken_releases(
    images: Images, served: UpdateRepo, health: Health, boot: Callable[..., Vm], tmp_path: Path
) -> None:
    v1, v2, v31 = images.get("1.0.0"), images.get("2.0.0"), images.get("3.1.0")
    publish.add(served.path, v2.manifest.parent, waves="none", migrations=[f"1.0.0:{MIGRATION}"])
    disk = raw_copy(v1.disk, tmp_path / "disk.img")
    fleet = tmp_path / "pki"
    pki.init(fleet)
    user_data = tmp_path / "user-data.toml"
    user_data.write_text(pki.user_data(fleet) + f"""
[settings.health]
units = ["containerd.service", "kiln-agent.service"]
http-check = "http://10.0.2.2:{health.port}/healthz"
timeout = 20
""")
    port = free_port()
    vm = boot(disk, overlay=False, cpus=2, user_data=user_data, forwards=(Forward(port, 50000),))
    assert vm.wait_ready(300).group(1, 3) == ("1.0.0", "A")
    vm.check("echo from-v1 > /local/marker && kiln settings set network.hostname=updated-host")
    assert setting(vm, "motd") == {"motd": "Welcome to Kiln!"}

    # --- v1 -> v2: check, apply, reboot; data and settings survive, the migration ran.
    # Meanwhile the disk is captured at eight points (see PowerCuts), booted at the end.
    check = json.loads(vm.check("kiln update check --json", timeout=240))
    assert check["update_state"] == "Available" and check["chosen_update"]["version"] == "2.0.0"
    cuts = PowerCuts(vm, disk, tmp_path)
    cuts.during_apply_and_first_boot()
    assert vm.wait_ready(300).group(1, 3) == ("2.0.0", "B")
    assert vm.check("cat /local/marker").strip() == "from-v1"
    assert setting(vm, "network.hostname") == {"network": {"hostname": "updated-host"}}
    assert setting(vm, "motd") == {"motd": "Welcome to Kiln 2!"}, "the 2.0.0 migration did not run forward"
    assert "kiln: datastore 1.0.0 -> 2.0.0: ran migrate_2.0.0_stock-motd.py" in vm.output
    st = status(vm)
    assert st["update_state"] == "Idle"
    assert st["active_partition"] == {"slot": "B", "version": "2.0.0", "next_to_boot": True}
    assert st["staging_partition"]["version"] == "1.0.0"

    # --- manual rollback: v1 again, with 2.0.0's migration run backward by 1.0.0. The
    # power is cut (QEMU killed) while it shuts down for that; the next QEMU boots 1.0.0.
    assert "rebooting" in vm.check("kiln rollback")
    time.sleep(1.0)
    vm.kill()
    vm = boot(disk, overlay=False, cpus=2, forwards=(Forward(port, 50000),))
    assert vm.wait_ready(300).group(1, 3) == ("1.0.0", "A")
    assert setting(vm, "motd") == {"motd": "Welcome to Kiln!"}, "the migration did not run backward"
    assert setting(vm, "network.hostname") == {"network": {"hostname": "updated-host"}}
    vm.check("kiln rollback")
    assert vm.wait_ready(300).group(1, 3) == ("2.0.0", "B")
    assert setting(vm, "motd") == {"motd": "Welcome to Kiln 2!"}

    # --- a 3.0.0 whose kernel panics: back on 2.0.0 by itself, and the API says so. A boot
    # that never finished is ambiguous (a power cut looks the same) and retried up to
    # max-boot-attempts; with 1, this one failure is final.
    vm.check("kiln settings set updates.max-boot-attempts=1")
    publish.add(served.path, republish_panicking(v2.manifest.parent, "3.0.0", tmp_path / "v3"), waves="none")
    vm.check("kiln update apply --reboot", timeout=900)
    vm.wait_for(r"Kernel panic", 300)
    assert vm.wait_ready(300).group(1, 3) == ("2.0.0", "B")
    assert "kiln: update to 3.0.0 failed (did not finish booting" in vm.output
    failure = status(vm)["last_failure"]
    assert failure["version"] == "3.0.0" and "did not finish booting" in failure["reason"]
    assert failure["kind"] == "ambiguous"
    again = json.loads(vm.check("kiln update check --json", timeout=240))
    assert again["update_state"] == "Idle" and "3.0.0 failed on this host before" in again["reason"]
    # an operator clears it: the next check chooses it again
    assert "1 failure(s) cleared" in vm.check("kiln update retry 3.0.0")
    again = json.loads(vm.check("kiln update check --json", timeout=240))
    assert again["chosen_update"]["version"] == "3.0.0" and again["last_failure"]["cleared"] is True

    # --- a 3.1.0 that boots but fails its health check: back on 2.0.0, the API says why
    publish.add(served.path, v31.manifest.parent, waves="none")
    health.ok = False  # the application check fails while 3.1.0 runs
    vm.check("kiln update apply --reboot", timeout=900)
    vm.wait_for(r"kiln: version 3\.1\.0 failed its health gate", 300)
    health.ok = True
    assert vm.wait_ready(300).group(1, 3) == ("2.0.0", "B")
    failure = status(vm)["last_failure"]
    assert failure["version"] == "3.1.0"
    assert "health gate failed: health check http://10.0.2.2" in failure["reason"] and "503" in failure["reason"]
    assert setting(vm, "motd") == {"motd": "Welcome to Kiln 2!"}

    # --- the same status from the workstation, over the mutual-TLS API
    remote = [sys.executable, "-m", "kiln.cli.main", "--endpoint", f"127.0.0.1:{port}", "--pki", str(fleet)]
    out = subprocess.run([*remote, "update", "status"], capture_output=True, text=True, timeout=120, check=True)
    assert "running: 2.0.0 (slot B)" in out.stdout
    assert "last failed update: 3.1.0" in out.stdout and "HTTP 503" in out.stdout
    vm.kill()

    # --- every disk captured during the v1 -> v2 update boots ready on a valid version
    cuts.boot_all(boot)

    # --- a power cut is not a bad release: the disk cut during 2.0.0's first boot came up
    # on 1.0.0 with an ambiguous failure; the next cycle takes 2.0.0 again, and it boots
    (name, copy, _) = next(c for c in cuts.cuts if c[0] == "first boot of 2.0.0, its try spent")
    vm = boot(copy, overlay=True, cpus=2)
    assert vm.wait_ready(420).group(1, 3) == ("1.0.0", "A")
    st = status(vm)
    assert st["last_failure"]["version"] == "2.0.0" and st["last_failure"]["kind"] == "ambiguous"
    vm.check("kiln settings set updates.version-lock=2.0.0")  # the repository has 3.1.0 by now
    retry = json.loads(vm.check("kiln update check --json", timeout=240))
    assert retry["chosen_update"]["version"] == "2.0.0", retry["reason"]
    vm.check("kiln update apply --reboot", timeout=900)
    assert vm.wait_ready(420).group(1, 3) == ("2.0.0", "B"), name
