"""`kiln keys`: the Secure Boot key set a fleet owns (PK, KEK, db and the boot-file key).

`kiln.secureboot` (and `cryptography`) are imported inside the commands, so `kiln --help`
and the other commands do not pay for them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keys", help="Secure Boot keys: the UEFI hierarchy and the boot-file signing key")
    ksub = p.add_subparsers(dest="keys_command", required=True)

    init = ksub.add_parser(
        "init", help="make a new key set (PK, KEK, db, boot.key) in a new or empty directory",
        description="Makes PK, KEK and db (self-signed RSA-2048 X.509 certificates and their keys), "
        "boot.key (RSA-3072, signs the files GRUB loads) and kiln-keys.json (the EFI signature owner GUID). "
        "Use it with `kiln build --keys DIR`. Keep DIR off the hosts and backed up: "
        "an image signed by another key set does not boot on hosts enrolled with this one.",
    )
    init.add_argument("dir", type=Path, help="directory to create (must not exist, or be empty)")
    init.add_argument("--name", default="Kiln", help="common-name prefix of the certificates (default: Kiln)")
    init.add_argument("--json", action="store_true", help="print one JSON object with every file written")
    init.set_defaults(func=cmd_init)

    show = ksub.add_parser("show", help="check a key set (every file present, each certificate matching its key)")
    show.add_argument("dir", type=Path, help="the directory made by `kiln keys init`")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=cmd_show)


def cmd_init(args: argparse.Namespace) -> int:
    from kiln.secureboot import keys

    made = keys.init(args.dir, name=args.name)
    if args.json:
        print(json.dumps(made.to_json(), indent=2))
        return 0
    for path in made.files().values():
        print(f"wrote {path}")
    print(f"EFI signature owner: {made.owner_guid}")
    print(f"next: kiln build --keys {made.dir}  (keep the *.key files off the hosts)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from kiln.secureboot import keys

    loaded = keys.load(args.dir)
    if args.json:
        print(json.dumps(loaded.to_json(), indent=2))
        return 0
    print(f"key set {loaded.dir}: PK, KEK, db and boot.key present and matching; "
          f"owner {loaded.owner_guid}, created {loaded.created}")
    return 0
