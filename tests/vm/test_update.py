"""Signed A/B updates end to end: releases published with `kiln repo` to the session's
repository, served on the host's 127.0.0.1 and reached from the guest at 10.0.2.2
through QEMU user networking; the guest's own `kiln update` drives its update agent."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.repo import publish
from kiln.repo.serve import RepoServer
from kiln.vm.qemu import Vm
from tests.conftest import Images, UpdateRepo, raw_copy

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


class Health:
    """The HTTP health check the hosts are configured with (settings.health.http-check),
    answered on the host's loopback; the test decides whether it passes."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.ok = True
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200 if outer.ok else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
    user_data = tmp_path / "user-data.toml"
    user_data.write_text(f"""
[settings.health]
units = ["containerd.service", "kiln-apiserver.socket"]
http-check = "http://10.0.2.2:{health.port}/healthz"
timeout = 20
""")
    vm = boot(disk, overlay=False, cpus=2, user_data=user_data)
    assert vm.wait_ready(300).group(1, 3) == ("1.0.0", "A")
    vm.check("echo from-v1 > /local/marker && kiln settings set network.hostname=updated-host")
    assert setting(vm, "motd") == {"motd": "Welcome to Kiln!"}

    # --- v1 -> v2: check, apply, reboot; data and settings survive, the migration ran
    check = json.loads(vm.check("kiln update check --json", timeout=240))
    assert check["update_state"] == "Available" and check["chosen_update"]["version"] == "2.0.0"
    vm.check("kiln update apply --reboot", timeout=900)
    assert vm.wait_ready(300).group(1, 3) == ("2.0.0", "B")
    assert vm.check("cat /local/marker").strip() == "from-v1"
    assert setting(vm, "network.hostname") == {"network": {"hostname": "updated-host"}}
    assert setting(vm, "motd") == {"motd": "Welcome to Kiln 2!"}, "the 2.0.0 migration did not run forward"
    assert "kiln: datastore 1.0.0 -> 2.0.0: ran migrate_2.0.0_stock-motd.py" in vm.output
    st = status(vm)
    assert st["update_state"] == "Idle"
    assert st["active_partition"] == {"slot": "B", "version": "2.0.0", "next_to_boot": True}
    assert st["staging_partition"]["version"] == "1.0.0"

    # --- manual rollback: v1 again, with 2.0.0's migration run backward by 1.0.0
    vm.check("kiln rollback")
    assert vm.wait_ready(300).group(1, 3) == ("1.0.0", "A")
    assert setting(vm, "motd") == {"motd": "Welcome to Kiln!"}, "the migration did not run backward"
    assert setting(vm, "network.hostname") == {"network": {"hostname": "updated-host"}}
    vm.check("kiln rollback")
    assert vm.wait_ready(300).group(1, 3) == ("2.0.0", "B")
    assert setting(vm, "motd") == {"motd": "Welcome to Kiln 2!"}

    # --- a 3.0.0 whose kernel panics: back on 2.0.0 by itself, and the API says so
    publish.add(served.path, republish_panicking(v2.manifest.parent, "3.0.0", tmp_path / "v3"), waves="none")
    vm.check("kiln update apply --reboot", timeout=900)
    vm.wait_for(r"Kernel panic", 300)
    assert vm.wait_ready(300).group(1, 3) == ("2.0.0", "B")
    assert "kiln: update to 3.0.0 failed (did not finish booting" in vm.output
    failure = status(vm)["last_failure"]
    assert failure["version"] == "3.0.0" and "did not finish booting" in failure["reason"]
    again = json.loads(vm.check("kiln update check --json", timeout=240))
    assert again["update_state"] == "Idle" and "3.0.0 failed on this host before" in again["reason"]

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
