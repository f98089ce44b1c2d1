"""Write a release into the inactive slot: stream, decompress, write, verify, mark valid.

The order is Bottlerocket's: clear the inactive slot first (it cannot be booted while
half-written), write root, boot and hash straight from the download through zstd into
the partitions, check each against the signed manifest (length and sha256 of the
uncompressed image), re-read root + hash as dm-verity will and compare with the signed
root hash, and only then mark the slot valid. An interruption anywhere leaves the slot
cleared, so the command can simply be run again. Memory stays bounded by a few chunks
whatever the image size: nothing is buffered whole, nothing is copied to a temporary file.
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
ORDER = ("root", "boot", "hash")

Progress = Callable[[str, int, int], None]  # (image key, bytes written, expected total)


def decompress(chunks: Iterable[bytes], limit: int, what: str) -> Iterator[bytes]:
    """zstd-decompress a stream through the `zstd` binary (a feeder thread keeps both
    pipes moving); refuses output beyond `limit` bytes. Errors from `chunks` (a failed
    download or hash check) are raised here once the decompressed bytes are consumed."""
    proc = subprocess.Popen(
        ["zstd", "-d", "-c", "-q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin and proc.stdout and proc.stderr
    failure: list[BaseException] = []

    def feed() -> None:
        assert proc.stdin
        try:
            for chunk in chunks:
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass  # zstd stopped reading: its exit status says why
        except BaseException as e:
            failure.append(e)
            proc.kill()
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()

    feeder = threading.Thread(target=feed, name=f"feed-{what}", daemon=True)
    feeder.start()
    total = 0
    try:
        while data := proc.stdout.read(CHUNK):
            total += len(data)
            if total > limit:
                raise UntrustedUpdate(f"{what}: decompresses to more than the signed {limit} bytes")
            yield data
        feeder.join()
        if failure:
            raise failure[0]
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
        written, digest = slots.write_image(slot, key, counted(data))
        if written != image.size or digest != image.sha256:
            raise UntrustedUpdate(
                f"{image.target}: wrote {written} bytes with sha256 {digest}; "
                f"the manifest signs {image.size} bytes with sha256 {image.sha256}"
            )
    verify_slot(slots, slot, update)
    slots.apply("mark-inactive-valid")
    return slot


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
