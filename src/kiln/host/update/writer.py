"""Write a release into the inactive slot: stream, decompress, write, verify, mark valid.

Bottlerocket's order, nearly: clear the inactive slot first (it cannot be booted while
half-written), then write root, hash and boot straight from the download through zstd
into the partitions, and only mark the slot valid once every check passed. The checks:
each download against its TUF target hash (in the fetcher), each image's length against
the signed manifest, boot and hash against their signed sha256, and root + hash read back
from the disk as dm-verity will, against the signed root hash. That read-back is root's
content check: the root hash is a sha256 tree over every block, so hashing root a second
time on the way in would only cost a pass over 100 MiB (about 2 s of CPU under
emulation); and it runs while boot is written, on the other CPU. An interruption
anywhere leaves the slot cleared, so the command can simply be run again. Memory stays
bounded by a few chunks whatever the image size: nothing is buffered whole, nothing is
copied to a temporary file.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator

from kiln.host.slot import Slots
from kiln.host.update.errors import UntrustedUpdate, UpdateError
from kiln.host.update.manifest import Update

CHUNK = 1 << 20
ORDER = ("root", "hash", "boot")  # root and its tree first: they are checked while boot is written
VERITY_CHECKED = "root"  # its content check is the read-back against the signed root hash

Progress = Callable[[str, int, int], None]  # (image key, bytes written, expected total)


def decompress(chunks: Iterable[bytes], limit: int, what: str) -> Iterator[bytes]:
    """zstd-decompress a stream through the `zstd` binary (a feeder thread keeps both
    pipes moving); refuses output beyond `limit` bytes. Errors from `chunks` (a failed
    download or hash check) are raised here once the decompressed bytes are consumed."""
    proc = subprocess.Popen(
        ["zstd", "-d", "-c", "-q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin and proc.stdout and proc.stderr

    def feed() -> None:
        assert proc.stdin
        try:
            for chunk in chunks:
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass  # zstd stopped reading: its exit status says why
        except BaseException:
            proc.kill()
            raise  # to the reader, by feeder.result()
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()

    feeder = Background(feed, name=f"feed-{what}")
    total = 0
    try:
        while data := proc.stdout.read(CHUNK):
            total += len(data)
            if total > limit:
                raise UntrustedUpdate(f"{what}: decompresses to more than the signed {limit} bytes")
            yield data
        feeder.result()
        if proc.wait() != 0:
            err = proc.stderr.read().decode(errors="replace").strip()
            raise UntrustedUpdate(f"{what}: not a valid zstd stream ({err or f'zstd exit {proc.returncode}'})")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        feeder.join(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def write_release(
    slots: Slots,
    update: Update,
    fetch: Callable[[str], Iterable[bytes]],
    progress: Progress | None = None,
) -> str:
    """Write `update` into the inactive slot and mark it valid; returns the slot.

    `fetch(target)` yields the compressed target's bytes and raises (after the last
    chunk at the latest) when they are not what the repository signed."""
    slots.apply("clear-inactive")
    slot = slots.state().inactive
    check: Background | None = None
    try:
        for key in ORDER:
            image = update.images[key]

            def counted(chunks: Iterable[bytes], key: str = key, total: int = image.size) -> Iterator[bytes]:
                done = 0
                for chunk in chunks:
                    done += len(chunk)
                    if progress:
                        progress(key, done, total)
                    yield chunk

            data = decompress(fetch(image.target), image.size, image.target)
            written, digest = slots.write_image(slot, key, counted(data), digest=key != VERITY_CHECKED)
            if written != image.size or digest not in (None, image.sha256):
                raise UntrustedUpdate(
                    f"{image.target}: wrote {written} bytes" + (f" with sha256 {digest}" if digest else "")
                    + f"; the manifest signs {image.size} bytes with sha256 {image.sha256}"
                )
            if key == "hash":
                check = Background(lambda: verify_slot(slots, slot, update), name="verify-slot")
        assert check is not None, "ORDER writes hash"
        check.result()
    finally:
        if check is not None:
            check.join()  # an error above: the read-back must not outlive the command
    slots.apply("mark-inactive-valid")
    return slot


class Background:
    """A function on a thread of its own; `result()` waits and raises what it raised."""

    def __init__(self, fn: Callable[[], None], name: str) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # handed to the caller by result()
            self._error = e

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def result(self) -> None:
        self.join()
        if self._error is not None:
            raise self._error


def verify_slot(slots: Slots, slot: str, update: Update) -> None:
    """Read root + hash back from the disk and check them as dm-verity will."""
    from kiln.core.errors import KilnError
    from kiln.image import verity

    parts = slots.partitions(slot)
    root, hashp = parts["root"], parts["hash"]
    try:
        with open(root.path, "rb") as data, open(hashp.path, "rb") as tree:
            data.seek(root.offset)
            tree.seek(hashp.offset)
            verity.verify(data, tree, root_hash=update.root_hash, salt=update.salt, data_blocks=update.data_blocks)
    except KilnError as e:
        raise UpdateError(f"slot {slot} does not verify after writing: {e}") from None
