"""`kiln` on a workstation: build, run and inspect images; the host commands come along."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from kiln import __version__
from kiln.cli import build_cmd, pki_cmd, run_cmd
from kiln.core.errors import KilnError
from kiln.host import cli as host_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Build, boot and manage Kiln images.")
    p.add_argument("--version", action="version", version=f"kiln {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command Kiln runs")
    sub = p.add_subparsers(dest="command", required=True)
    build_cmd.register(sub)
    run_cmd.register(sub)
    pki_cmd.register(sub)
    host_cli.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args))
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
