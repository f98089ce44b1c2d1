"""`kiln pki`: the fleet CA and the certificates of the mutual-TLS remote API.

`kiln.pki` (and `cryptography`) are imported inside the commands, so `kiln --help` and the
other commands do not pay for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_ADDRESS_HELP = "an IP address or DNS name clients reach the node by (repeatable)"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pki", help="fleet CA and certificates for the remote API (mutual TLS)")
    psub = p.add_subparsers(dest="pki_command", required=True)

    init = psub.add_parser("init", help="create a CA, its CRL and an admin client certificate")
    init.add_argument("dir", type=Path, help="directory to create them in (must not hold a CA yet)")
    init.add_argument("--days", type=int, default=365, help="validity of the admin certificate")
    init.add_argument("--json", action="store_true", help="print one JSON object with every file written")
    init.set_defaults(func=cmd_init)

    issue = psub.add_parser("issue-client", help="sign a client certificate for a role")
    issue.add_argument("dir", type=Path, help="the directory made by `kiln pki init`")
    issue.add_argument("--name", required=True, help="client name: the certificate CN and file name")
    issue.add_argument("--role", required=True, metavar="admin|reader", help="what the client may do")
    issue.add_argument("--days", type=int, default=365, help="validity in days")
    issue.add_argument("--json", action="store_true", help="print one JSON object describing the certificate")
    issue.set_defaults(func=cmd_issue_client)

    node = psub.add_parser("issue-node", help="sign one node's server certificate (its name and addresses)")
    node.add_argument("dir", type=Path, help="the directory made by `kiln pki init`")
    node.add_argument("--name", required=True, help="the node's name: certificate CN, DNS name and file name")
    node.add_argument("--address", action="append", default=[], metavar="IP|DNS", help=_ADDRESS_HELP)
    node.add_argument("--days", type=int, default=365, help="validity in days")
    node.add_argument("--json", action="store_true", help="print one JSON object describing the certificate")
    node.set_defaults(func=cmd_issue_node)

    ud = psub.add_parser(
        "user-data", help="print the user-data TOML that enables the remote API on one node",
        description="Prints [settings.api.remote] with the CA, the CRL and the node's own certificate and key, "
        "issuing the certificate first if the node has none. Without --name: the node 'localhost' "
        "(127.0.0.1, ::1), for a VM on this machine reached through `kiln run --forward`.",
    )
    ud.add_argument("dir", type=Path, help="the directory made by `kiln pki init`")
    ud.add_argument("--name", help="the node's name (default: localhost, with 127.0.0.1 and ::1)")
    ud.add_argument("--address", action="append", default=None, metavar="IP|DNS", help=_ADDRESS_HELP)
    ud.add_argument("--port", type=int, default=50000, help="the port the node listens on")
    ud.add_argument("--days", type=int, default=365, help="validity of a certificate issued now")
    ud.set_defaults(func=cmd_user_data)

    rv = psub.add_parser("revoke", help="put a client or node certificate on the CA's revocation list")
    rv.add_argument("dir", type=Path, help="the directory made by `kiln pki init`")
    rv.add_argument("target", metavar="NAME|client:NAME|node:NAME|SERIAL",
                    help="a client or node by name, or a serial number in hex")
    rv.add_argument("--force", action="store_true", help="revoke a serial no certificate in DIR carries")
    rv.add_argument("--json", action="store_true", help="print one JSON object describing what was done")
    rv.set_defaults(func=cmd_revoke)

    crl = psub.add_parser("crl", help="print the CRL as settings TOML, for `kiln settings apply -` on each node")
    crl.add_argument("dir", type=Path, help="the directory made by `kiln pki init`")
    crl.set_defaults(func=cmd_crl)


def cmd_init(args: argparse.Namespace) -> int:
    from kiln import pki

    result = pki.init(args.dir, days=args.days)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    _print_written(result.files)
    print(f"next: kiln pki user-data {args.dir} [--name NODE --address IP ...] > user-data.toml"
          f"  (one per node; keep {result.ca.key} off the nodes)")
    return 0


def cmd_issue_client(args: argparse.Namespace) -> int:
    from kiln import pki

    cert = pki.issue_client(args.dir, args.name, args.role, days=args.days)
    return _issued(args, cert, f"client {cert.common_name}: role {cert.role}")


def cmd_issue_node(args: argparse.Namespace) -> int:
    from kiln import pki

    cert = pki.issue_node(args.dir, args.name, args.address, days=args.days)
    return _issued(args, cert, f"node {cert.common_name}: names {', '.join(cert.sans)}")


def _issued(args: argparse.Namespace, cert: Any, what: str) -> int:
    """A certificate just issued: as JSON, or the files written and one line about it."""
    if args.json:
        print(json.dumps(cert.to_json(), indent=2))
        return 0
    _print_written((cert.cert, cert.key))
    print(f"{what}, serial {cert.to_json()['serial']}, valid until {cert.not_after:%Y-%m-%d %H:%M} UTC")
    return 0


def cmd_user_data(args: argparse.Namespace) -> int:
    from kiln import pki
    from kiln.pki.fleet import check_node_name

    name = check_node_name(args.name) if args.name is not None else pki.LOCAL_NODE
    cert_path = pki.Layout(args.dir).node(name)[0]
    new = not cert_path.exists()
    text = pki.user_data(args.dir, args.name, args.address, port=args.port, days=args.days)
    if new:  # stdout is the user data: say what was written on stderr
        node = pki.node_for_user_data(args.dir, args.name)
        print(f"issued node {node.common_name} ({', '.join(node.sans)}): {node.cert}", file=sys.stderr)
    print(text, end="")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from kiln import pki

    done = pki.revoke(args.dir, args.target, force=args.force)
    if args.json:
        print(json.dumps(done.to_json(), indent=2))
        return 0
    what = f"{done.target.kind} {done.target.name}".rstrip()
    serial = done.to_json()["serial"]
    if done.already:
        print(f"{what} (serial {serial}) was already revoked")
    else:
        print(f"revoked {what} (serial {serial}): {done.crl} lists {done.count}")
    for f in done.moved:
        print(f"moved to {f}")
    print(f"next, on every node: kiln pki crl {args.dir} | kiln --endpoint HOST:PORT --pki {args.dir} settings apply -")
    return 0


def cmd_crl(args: argparse.Namespace) -> int:
    from kiln import pki

    print(pki.crl_toml(args.dir), end="")
    return 0


def _print_written(files: tuple[Path, ...]) -> None:
    for f in files:
        print(f"wrote {f}")
