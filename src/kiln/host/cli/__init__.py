"""`kiln` inside the image: the commands that make sense on a host (argparse, lean imports).

The workstation CLI (kiln.cli) registers the same groups, so `kiln slot status --image
disk.img` and `kiln --endpoint HOST:PORT --pki DIR settings get` work from outside too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kiln.core.errors import KilnError
from kiln.host.cli import api, containers, slot, update


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    slot.register(sub)
    api.register(sub)
    update.register(sub)
    containers.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln host commands")
    api.add_connection_options(parser, remote=False)
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
