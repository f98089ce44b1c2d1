"""`kiln pki`: the fleet CA and the certificates of the mutual-TLS remote API.

`kiln.pki` (and `cryptography`) are imported inside the commands, so `kiln --help` and the
other commands do not pay for them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pki", help="fleet CA and certificates for the remote API (mutual TLS)")
    psub = p.add_subparsers(dest="pki_command", required=True)

    init = psub.add_parser("init", help="create a CA, the node certificate and an admin client certificate")
    init.add_argument("dir", type=Path, help="directory to create them in (must not hold a CA yet)")
    init.add_argument("--node-name", default="kiln-node", help="the node certificate's CN and DNS name")
    init.add_argument(
        "--san", action="append", default=[], metavar="NAME|IP",
        help="another DNS name or IP address for the node certificate (repeatable)",
    )
    init.add_argument("--days", type=int, default=365, help="validity of the node and admin certificates")
    init.add_argument("--json", action="store_true", help="print one JSON object with every file written")
    init.set_defaults(func=cmd_init)

    issue = psub.add_parser("issue-client", help="sign a client certificate for a role")
    issue.add_argument("dir", type=Path, help="the directory made by `kiln pki init`")
    issue.add_argument("--name", required=True, help="client name: the certificate CN and file name")
    issue.add_argument("--role", required=True, metavar="admin|reader", help="what the client may do")
    issue.add_argument("--days", type=int, default=365, help="validity in days")
    issue.add_argument("--json", action="store_true", help="print one JSON object describing the certificate")
    issue.set_defaults(func=cmd_issue_client)

    ud = psub.add_parser("user-data", help="print the user-data TOML that enables the remote API on a node")
    ud.add_argument("dir", type=Path, help="the directory made by `kiln pki init`")
    ud.set_defaults(func=cmd_user_data)


def cmd_init(args: argparse.Namespace) -> int:
    from kiln import pki

    result = pki.init(args.dir, node_name=args.node_name, sans=args.san, days=args.days)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    _print_written(result.files)
    print(f"node names: {', '.join(result.sans)}")
    print(f"next: kiln pki user-data {args.dir} > remote-api.toml  (keep {result.ca.key} off the nodes)")
    return 0


def cmd_issue_client(args: argparse.Namespace) -> int:
    from kiln import pki

    cert = pki.issue_client(args.dir, args.name, args.role, days=args.days)
    if args.json:
        print(json.dumps(cert.to_json(), indent=2))
        return 0
    _print_written((cert.cert, cert.key))
    print(f"client {cert.common_name}: role {cert.role}, valid until {cert.not_after:%Y-%m-%d %H:%M} UTC")
    return 0


def cmd_user_data(args: argparse.Namespace) -> int:
    from kiln import pki

    print(pki.user_data(args.dir), end="")
    return 0


def _print_written(files: tuple[Path, ...]) -> None:
    for f in files:
        print(f"wrote {f}")
