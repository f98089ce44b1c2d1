"""Helpers for VM tests: write a slot from a build's update artifacts, as an update will."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

from kiln.host.slot import Slots


def zstd_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    proc = subprocess.Popen(["zstd", "-dc", str(path)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        while chunk := proc.stdout.read(size):
            yield chunk
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise RuntimeError(f"zstd -dc {path} failed")


def install_to_inactive(disk: Path, artifacts: Path, *, active: str = "A",
                        replace: dict[str, Path] | None = None, upgrade: bool = True) -> str:
    """clear-inactive, stream boot/root/hash into the inactive slot, mark valid, upgrade.

    `replace` substitutes an uncompressed image for one of the artifacts (to test broken
    slots). Returns the slot written."""
    manifest = json.loads((artifacts / "manifest.json").read_text())
    slots = Slots.open(image=disk, active=active)
    slots.apply("clear-inactive")
    target = slots.state().inactive
    for key in ("boot", "root", "hash"):
        if replace and key in replace:
            data = replace[key].read_bytes()
            written, _ = slots.write_image(target, key, iter([data]))
            assert written == len(data)
            continue
        entry = manifest["images"][key]
        written, digest = slots.write_image(target, key, zstd_chunks(artifacts / entry["file"]))
        assert (written, digest) == (entry["uncompressed_size"], entry["uncompressed_sha256"])
    slots.apply("mark-inactive-valid")
    if upgrade:
        slots.apply("upgrade-to-inactive")
    return target


def fake_release(dest: Path, version: str, *, variant: str = "container-host", root_mib: int = 4,
                 seed: int = 0, incompressible: bool = False) -> Path:
    """A build's `artifacts/` directory (same writer, same manifest) for small made-up
    boot/root images with a real verity tree: what `kiln repo add` publishes, without a
    full image build. Returns the artifacts directory."""
    import hashlib
    import random
    import uuid

    from kiln.build.pipeline import write_artifacts
    from kiln.image import verity

    rng = random.Random(f"{variant}-{version}-{seed}")
    work = dest.parent / f".{dest.name}-images"
    work.mkdir(parents=True, exist_ok=True)
    images = {key: work / f"{key}.img" for key in ("boot", "root", "hash")}
    images["boot"].write_bytes(f"boot {variant} {version}\n".encode().ljust(64 * 1024, b"\0"))
    # Compressible but not trivially: zstd must do real work on the way back.
    block = bytes(rng.getrandbits(8) for _ in range(4096))
    with images["root"].open("wb") as f:
        for i in range(root_mib * 256):
            f.write(rng.randbytes(4096) if incompressible else block[i % 64:] + block[: i % 64])
    salt = hashlib.sha256(f"salt-{version}".encode()).digest()
    vres = verity.build_hash_tree(images["root"], images["hash"], salt=salt, uuid=uuid.UUID(int=seed + 1))
    write_artifacts(dest, variant, version, vres, images, "6.1.0-test-cloud-amd64", f"test{version}")
    for p in images.values():
        p.unlink()
    work.rmdir()
    return dest


def small_disk(path: Path, *, root_mib: int = 8) -> Path:
    """A Kiln GPT disk with small partitions (real ESP + grubenv, slot A from a made-up
    release, slot B empty): enough for the update agent to write slot B on the host."""
    import dataclasses

    from kiln.build import bootloader, disk
    from kiln.variant import Partitions, load_variant

    MiB = 1 << 20
    work = path.parent / f".{path.name}-parts"
    release = fake_release(work / "artifacts", "1.0.0", root_mib=root_mib // 2)
    v = dataclasses.replace(
        load_variant(),
        partitions=Partitions(efi=8 * MiB, boot=MiB, root=root_mib * MiB, hash=MiB, private=MiB, data=MiB),
    )
    esp = work / "esp.img"
    bootloader.esp_partition(esp, v.partitions.efi, mtime=1700000000, work=work / "esp")
    manifest = json.loads((release / "manifest.json").read_text())
    images = {"efi": esp}
    for key in ("boot", "root", "hash"):
        dest = work / f"{key}.img"
        with open(dest, "wb") as f:
            for chunk in zstd_chunks(release / manifest["images"][key]["file"]):
                f.write(chunk)
        images[key] = dest
    disk.assemble(path, v, "small", images)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    return path


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
