"""`kiln` on a workstation: build, run and inspect images; the host commands come along."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kiln import __version__
from kiln.cli import build_cmd, fleet_cmd, keys_cmd, oci_cmd, pki_cmd, repo_cmd, run_cmd
from kiln.core.errors import KilnError
from kiln.host import cli as host_cli
from kiln.host.api.client import Client
from kiln.host.cli import api as host_api


def make_client(args: argparse.Namespace) -> Client:
    """The API client for the host commands: the remote endpoint with TLS, or the local socket."""
    if args.endpoint is None:
        return Client.local(args.socket)
    host, sep, port = args.endpoint.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise KilnError(f"--endpoint '{args.endpoint}' must be HOST:PORT")
    if args.pki is None:
        raise KilnError("--endpoint needs --pki DIR (the fleet CA and a client certificate)")
    from kiln import pki

    return Client.remote(host.strip("[]"), int(port), pki.client_context(args.pki, args.client),
                         server_name=args.node_name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Build, boot and manage Kiln images.")
    p.add_argument("--version", action="version", version=f"kiln {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command Kiln runs")
    remote = p.add_argument_group("remote API (settings, tx, raw, reboot from a workstation)")
    remote.add_argument("--endpoint", metavar="HOST:PORT", help="a host's mutual-TLS API (default: the local socket)")
    remote.add_argument("--pki", type=Path, metavar="DIR", help="the fleet PKI directory (kiln pki init)")
    remote.add_argument("--client", default="admin", metavar="NAME", help="client certificate in DIR/clients")
    remote.add_argument("--node-name", metavar="NAME",
                        help="the name the node's certificate must carry (default: HOST of --endpoint; "
                             "for port forwards and addresses not in the certificate)")
    host_api.add_connection_options(p, remote=True)
    p.set_defaults(make_client=make_client)
    sub = p.add_subparsers(dest="command", required=True)
    build_cmd.register(sub)
    run_cmd.register(sub)
    pki_cmd.register(sub)
    keys_cmd.register(sub)
    repo_cmd.register(sub)
    oci_cmd.register(sub)
    fleet_cmd.register(sub)
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
