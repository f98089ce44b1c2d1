"""early-boot-config: first-boot user data from providers, in a fixed order, later wins.

User data is TOML rooted at `[settings]` (gzip accepted). Providers, lowest precedence
first:

    local-file    /local/user-data.toml on the DATA partition
    config-drive  `user-data.toml` (or `user-data`) on an ISO 9660 volume (Rock Ridge
                  names) labelled KILN-USERDATA or CIDATA, or a vfat volume labelled
                  CIDATA (vfat labels hold 11 characters); read in place, never mounted
    http          the URL in `kiln.user-data-url=` on the kernel command line

The first two run before any service starts (phase `early`); the HTTP provider needs the
network and runs later (phase `network`), then commits and applies what it brought.
A provider whose data is invalid is rejected whole, with the offending key on the console;
the host boots on the other providers' data and the defaults, and says so.
"""

from __future__ import annotations

import json
import time
import tomllib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.host.boot.console import say
from kiln.host.datastore import LAUNCH_TX, Datastore
from kiln.host.settings.model import InvalidSettings, validate

STATE = Path("/var/lib/kiln/user-data")  # <phase>.json: what each provider did (the first-boot marker)
LOCAL_FILE = Path("/local/user-data.toml")
DRIVE_LABELS = ("KILN-USERDATA", "CIDATA")
DRIVE_FILES = ("user-data.toml", "user-data")
MAX_SIZE = 1 << 20
HTTP_DEADLINE = 60.0
UNREACHABLE = "unreachable:"


class Rejected(Exception):
    """User data that cannot be used; the message names the key or the line."""


class Unreachable(Rejected):
    """No answer from the metadata URL: not final, the next boot asks again."""


@dataclass
class Found:
    source: str  # where it came from, for the console
    data: bytes


def parse(raw: bytes, source: str) -> dict[str, Any]:
    """User data bytes → a validated settings tree, or Rejected naming the problem."""
    if raw[:2] == b"\x1f\x8b":
        # Bounded: a small gzip may expand a thousandfold (and this would repeat every boot).
        inflate = zlib.decompressobj(wbits=31)
        try:
            raw = inflate.decompress(raw, MAX_SIZE + 1)
        except zlib.error as e:
            raise Rejected(f"{source}: not valid gzip: {e}") from None
        if len(raw) > MAX_SIZE or inflate.unconsumed_tail:
            raise Rejected(f"{source}: larger than {MAX_SIZE} bytes once decompressed")
        if not inflate.eof:
            raise Rejected(f"{source}: not valid gzip: the stream is truncated")
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise Rejected(f"{source}: not valid TOML: {e}") from None
    extra = sorted(set(doc) - {"settings"})
    if extra:
        raise Rejected(f"{source}: '{extra[0]}' is outside [settings] (user data is rooted at [settings])")
    settings = doc.get("settings", {})
    try:
        validate(settings)
    except InvalidSettings as e:
        raise Rejected(f"{source}: {e}") from None
    return dict(settings)


def local_file(path: Path = LOCAL_FILE) -> Found | None:
    try:
        return Found(str(path), path.read_bytes()[: MAX_SIZE + 1])
    except FileNotFoundError:
        return None


def config_drive(sys_block: Path = Path("/sys/class/block"), dev: Path = Path("/dev")) -> Found | None:
    """An ISO 9660 or vfat volume labelled KILN-USERDATA or CIDATA, read without mounting it."""
    from kiln.image import fat, iso9660

    for entry in sorted(sys_block.iterdir()) if sys_block.is_dir() else ():
        node = dev / entry.name
        try:
            with open(node, "rb") as f:

                def read_at(offset: int, size: int, f: Any = f) -> bytes:
                    f.seek(offset)
                    return bytes(f.read(size))

                kind, label = "iso9660", iso9660.volume_label(read_at)
                if label is None:
                    kind, label = "vfat", fat.volume_label(read_at(0, 512))
                if label is None or label.upper() not in DRIVE_LABELS:
                    continue
                reader = iso9660.read_file if kind == "iso9660" else fat.read_file
                for name in DRIVE_FILES:
                    try:
                        return Found(f"config drive {node} ({kind} {label})", reader(read_at, name, MAX_SIZE))
                    except KilnError:
                        continue
                raise Rejected(f"config drive {node} ({label}): no {' or '.join(DRIVE_FILES)} on it")
        except OSError:
            continue
    return None


def cmdline_url(cmdline: Path = Path("/proc/cmdline")) -> str | None:
    for arg in cmdline.read_text().split():
        if arg.startswith("kiln.user-data-url="):
            return arg.split("=", 1)[1]
    return None


def http(url: str, deadline: float = HTTP_DEADLINE) -> Found | None:
    """GET the URL, retrying (the network may still be coming up) for at most `deadline` s.

    404 means "no user data"; anything else that is not 200 after the deadline is an error.
    """
    import http.client
    import urllib.error
    import urllib.request

    end = time.monotonic() + deadline
    last = ""
    for attempt in range(1000):
        try:
            remaining = max(0.5, min(10.0, end - time.monotonic()))
            with urllib.request.urlopen(url, timeout=remaining) as resp:
                return Found(url, _read_until(resp, end))
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            last = f"HTTP {e.code}"
        except (OSError, ValueError, http.client.HTTPException) as e:
            last = str(getattr(e, "reason", e)) or type(e).__name__
        if time.monotonic() > end:
            break
        time.sleep(max(0.0, min(0.25 * 2**attempt, 2.0, end - time.monotonic())))
    raise Unreachable(f"{url} for {deadline:g} s ({last}); trying again next boot")


def _read_until(resp: Any, end: float) -> bytes:
    """The body, at most MAX_SIZE + 1 bytes, and not a moment past the deadline."""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_SIZE:
        if time.monotonic() > end:
            raise TimeoutError("the body did not arrive before the deadline")
        chunk = resp.read1(min(65536, MAX_SIZE + 1 - size)) if hasattr(resp, "read1") else resp.read(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


Provider = tuple[str, Callable[[], Found | None]]


def early_providers() -> list[Provider]:
    return [("local-file", local_file), ("config-drive", config_drive)]


def network_providers() -> list[Provider]:
    url = cmdline_url()
    return [] if url is None else [("http", lambda: http(url))]


def collect(providers: list[Provider], store: Datastore) -> dict[str, str]:
    """Run providers in order, PATCH each one's settings into the launch transaction."""
    report: dict[str, str] = {}
    for name, provider in providers:
        try:
            found = provider()
            if found is None:
                report[name] = "none"
                continue
            if len(found.data) > MAX_SIZE:
                raise Rejected(f"{found.source}: larger than {MAX_SIZE} bytes")
            settings = parse(found.data, found.source)
            store.patch(settings, LAUNCH_TX)
            report[name] = f"applied from {found.source}"
            say(f"kiln: user data applied from {found.source}")
        except Unreachable as e:
            report[name] = f"{UNREACHABLE} {e}"
            say(f"kiln: user data {UNREACHABLE} {e}; booting without it")
        except (Rejected, InvalidSettings) as e:
            report[name] = f"rejected: {e}"
            say(f"kiln: user data rejected: {e}; booting without it (defaults and other providers apply)")
    return report


def run_phase(phase: str, store: Datastore) -> dict[str, str] | None:
    """Run one phase's providers on first boot (None when it already ran on an earlier boot).

    `early` only fills the launch transaction: the caller commits it and then calls
    `mark_done`, so a crash before the commit reads the user data again next boot. `network`
    comes after that commit, so it commits and applies what it brought, then marks itself
    done, unless the metadata URL was unreachable (the next boot tries again).
    """
    if (STATE / f"{phase}.json").exists():
        return None
    if phase == "early":
        return collect(early_providers(), store)
    if phase != "network":
        raise ValueError(f"unknown user data phase '{phase}' (early or network)")
    report = collect(network_providers(), store)
    if any(v.startswith("applied") for v in report.values()):
        from kiln.host.render.apply import apply
        from kiln.host.render.cache import RenderCache

        result = apply(store, store.commit(LAUNCH_TX), cache=RenderCache())
        for problem in [*result.errors, *result.failed_restarts]:
            say(f"kiln: {problem}")
    if not any(v.startswith(UNREACHABLE) for v in report.values()):
        mark_done(phase, report)
    return report


def mark_done(phase: str, report: dict[str, str]) -> None:
    """Record what the providers did; from now on this phase is skipped (first boot only)."""
    from kiln.core.fs import atomic_write

    STATE.mkdir(parents=True, exist_ok=True)
    atomic_write(STATE / f"{phase}.json", json.dumps(report, indent=1).encode() + b"\n")


def main(argv: list[str] | None = None) -> int:
    import sys

    phase = (argv if argv is not None else sys.argv[1:] or ["early"])[0]
    store = Datastore()
    try:
        report = run_phase(phase, store)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if phase == "early" and report is not None:
        import contextlib

        from kiln.host.datastore import NothingPending

        with contextlib.suppress(NothingPending):
            store.commit(LAUNCH_TX)
        mark_done(phase, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
