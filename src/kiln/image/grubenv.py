"""GRUB environment block: the 1024-byte file GRUB's `load_env`/`save_env` read and write.

Kiln keeps A/B slot state here, so both GRUB (at boot) and Linux (after an update) can
change it. Parsing mirrors grub-core/lib/envblk.c so we see exactly what GRUB sees.
"""

from __future__ import annotations

from collections.abc import Mapping

from kiln.core.errors import KilnError

SIZE = 1024
SECTOR = 512
HEADER = b"# GRUB Environment Block\n"
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"  # keep arbitrary bytes round-tripping through str


def parse(block: bytes) -> dict[str, str]:
    """Variables in `block`, later duplicates winning (as when GRUB loads them in order)."""
    if len(block) != SIZE:
        raise KilnError(f"grubenv block is {len(block)} bytes, expected {SIZE}")
    if not block.startswith(HEADER):
        raise KilnError(f"grubenv block does not start with {HEADER!r}")
    env: dict[str, str] = {}
    p, end = len(HEADER), len(block)
    while p < end:
        if block[p] == ord("#"):
            p = _next_line(block, p)
            continue
        eq = block.find(b"=", p)
        if eq < 0:
            break  # GRUB stops at a line with no '=' ("broken")
        q = eq + 1
        value = bytearray()
        while q < end and block[q] != ord("\n"):
            if block[q] == ord("\\"):
                q += 1
                if q >= end:
                    break
            value.append(block[q])
            q += 1
        if q >= end:
            break  # unterminated last line: GRUB ignores it too
        env[block[p:eq].decode(_ENCODING, _ERRORS)] = value.decode(_ENCODING, _ERRORS)
        p = q + 1
    return env


def _next_line(block: bytes, p: int) -> int:
    nl = block.find(b"\n", p)
    return len(block) if nl < 0 else nl + 1


def _content(env: Mapping[str, str]) -> bytes:
    out = bytearray(HEADER)
    for key, value in env.items():
        if not key or "=" in key or "\n" in key or "\0" in key or key.startswith("#"):
            raise KilnError(
                f"grubenv key {key!r} is invalid: it must be non-empty, not start with '#' "
                "and contain no '=', newline or NUL"
            )
        if "\n" in value or "\0" in value:
            raise KilnError(f"grubenv value of {key!r} contains a newline or NUL: {value!r}")
        out += key.encode(_ENCODING, _ERRORS) + b"="
        # grub-editenv escapes backslash (and newline, which we refuse) with a backslash.
        out += value.encode(_ENCODING, _ERRORS).replace(b"\\", b"\\\\") + b"\n"
    return bytes(out)


def serialize(env: Mapping[str, str]) -> bytes:
    """The 1024-byte block for `env`, keys in the given order, padded with '#'."""
    content = _content(env)
    if len(content) > SIZE:
        raise KilnError(
            f"grubenv variables need {len(content)} bytes but the block holds {SIZE}",
            hint="use fewer or shorter variables",
        )
    return content.ljust(SIZE, b"#")


def fits_first_sector(env: Mapping[str, str]) -> bool:
    """Whether header and variables end within the first 512-byte sector.

    Kiln keeps its slot state there so a torn write of the 1024-byte block (one sector
    new, one old) can never mix old and new variables.
    """
    return len(_content(env)) <= SECTOR
