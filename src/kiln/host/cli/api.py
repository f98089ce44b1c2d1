"""The apiclient commands: `kiln settings|tx|raw|reboot`.

On a host they use /run/kiln/api.sock. The workstation front end adds `--endpoint
HOST:PORT --pki DIR` and injects a remote client (kiln.cli builds the TLS context, so this
module, which ships in the image, never imports the PKI code).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError
from kiln.host.api.client import SOCKET, Client

JSON_HELP = "machine-readable output"


def add_connection_options(parser: argparse.ArgumentParser, remote: bool) -> None:
    parser.add_argument("--socket", type=Path, default=SOCKET, help="the local API socket (default: %(default)s)")
    if not remote:
        parser.set_defaults(make_client=lambda args: Client.local(args.socket))


def _client(args: argparse.Namespace) -> Client:
    client: Client = args.make_client(args)
    return client


def _q(**params: str | None) -> str:
    given = {k: v for k, v in params.items() if v is not None}
    return ("?" + urllib.parse.urlencode(given)) if given else ""


def _show(value: Any, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(value, indent=2, sort_keys=True))
    elif isinstance(value, dict):
        for key, leaf in _leaves(value):
            print(f"{key} = {json.dumps(leaf)}")
    elif isinstance(value, list):
        for item in value:
            print(item)
    elif value is not None:
        print(value)


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    from kiln.host.settings.keys import flatten, format_key

    return [(prefix + format_key(path), leaf) for path, leaf in flatten(tree)]


def _report_apply(result: dict[str, Any], args: argparse.Namespace) -> int:
    """Print a commit-and-apply result; non-zero when a file or a restart failed."""
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        changed = result.get("changed", [])
        print("changed: " + (", ".join(changed) if changed else "nothing"))
        applied = result.get("apply", result)
        for label in ("services", "written", "removed", "restarted"):
            if applied.get(label):
                print(f"{label}: {', '.join(applied[label])}")
        for problem in [*applied.get("errors", []), *applied.get("failed_restarts", [])]:
            print(f"error: {problem}", file=sys.stderr)
    applied = result.get("apply", result)
    return 1 if applied.get("errors") or applied.get("failed_restarts") else 0


def cmd_settings(args: argparse.Namespace) -> int:
    c = _client(args)
    if args.settings_command == "get":
        keys = ",".join(args.keys) if args.keys else None
        value = c.request("GET", "/settings" + _q(keys=keys, prefix=args.prefix))
        _show({"settings": value} if not args.json else value, args)
        return 0
    if args.settings_command == "unset":
        return _report_apply(c.request("DELETE", "/settings" + _q(keys=",".join(args.keys))), args)
    if args.settings_command == "set":
        c.request("PATCH", "/settings/keypair" + _q(tx=args.tx), {"request_payload": args.pairs})
    else:
        c.request("PATCH", "/settings" + _q(tx=args.tx), read_settings_file(args.file))
    if args.no_apply:
        return 0
    return _report_apply(c.request("POST", "/tx/commit_and_apply" + _q(tx=args.tx)), args)


def read_settings_file(name: str) -> Any:
    """TOML or JSON (by content), from a file or `-` for stdin; `[settings]` root optional."""
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text()
    except OSError as e:
        raise KilnError(f"cannot read settings file {name}: {e.strerror}") from None
    try:
        doc = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise KilnError(f"settings file {name}: not valid TOML or JSON: {e}") from None
    if isinstance(doc, dict) and set(doc) == {"settings"}:
        doc = doc["settings"]
    return doc


def cmd_tx(args: argparse.Namespace) -> int:
    c = _client(args)
    q = _q(tx=args.tx)
    if args.tx_command == "show":
        pending = c.request("GET", "/tx" + q)
        _show({"settings": pending} if not args.json else pending, args)
    elif args.tx_command == "list":
        _show(c.request("GET", "/tx/list"), args)
    elif args.tx_command == "commit":
        _show(c.request("POST", "/tx/commit" + q), args)
    elif args.tx_command == "apply":
        return _report_apply(c.request("POST", "/tx/apply"), args)
    elif args.tx_command == "commit-and-apply":
        return _report_apply(c.request("POST", "/tx/commit_and_apply" + q), args)
    else:
        c.request("DELETE", "/tx" + q)
    return 0


def cmd_raw(args: argparse.Namespace) -> int:
    body = None
    if args.data is not None:
        try:
            body = json.loads(args.data)
        except ValueError as e:
            raise KilnError(f"--data is not JSON: {e}") from None
    path = args.path if args.path.startswith("/") else "/" + args.path
    value = _client(args).request(args.method.upper(), path, body)
    if value is not None:
        print(json.dumps(value, indent=2, sort_keys=True))
    return 0


def cmd_reboot(args: argparse.Namespace) -> int:
    value = _client(args).request("POST", "/actions/reboot")
    _show(value if args.json else "rebooting", args)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(p: argparse.ArgumentParser, tx: bool = True) -> argparse.ArgumentParser:
        p.add_argument("--json", action="store_true", help=JSON_HELP)
        if tx:
            p.add_argument("--tx", default=None, help="transaction name (default: 'default')")
        return p

    settings = sub.add_parser("settings", help="read and change settings through the API")
    ssub = settings.add_subparsers(dest="settings_command", required=True)
    get = common(ssub.add_parser("get", help="show settings (all, or the given keys)"), tx=False)
    get.add_argument("keys", nargs="*", metavar="KEY", help="e.g. settings.motd or network.hostname")
    get.add_argument("--prefix", help="only keys starting with this")
    st = common(ssub.add_parser("set", help="set KEY=VALUE pairs, commit and apply"))
    st.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    st.add_argument("--no-apply", action="store_true", help="only add to the transaction")
    un = common(ssub.add_parser("unset", help="remove named entries (containers.NAME, ...) and apply"), tx=False)
    un.add_argument("keys", nargs="+", metavar="KEY", help="e.g. containers.web or kernel.sysctl.\"vm.swappiness\"")
    ap = common(ssub.add_parser("apply", help="apply a TOML or JSON settings file ('-' for stdin)"))
    ap.add_argument("file", metavar="FILE")
    ap.add_argument("--no-apply", action="store_true", help="only add to the transaction")
    settings.set_defaults(func=cmd_settings)

    tx = sub.add_parser("tx", help="pending transactions")
    tsub = tx.add_subparsers(dest="tx_command", required=True)
    for name, text in (
        ("show", "show pending settings"),
        ("list", "list transactions with pending settings"),
        ("commit", "make pending settings live (prints the changed keys)"),
        ("apply", "render every configuration file and restart services"),
        ("commit-and-apply", "commit, then apply what changed"),
        ("discard", "drop pending settings"),
    ):
        common(tsub.add_parser(name, help=text))
    tx.set_defaults(func=cmd_tx)

    raw = sub.add_parser("raw", help="send any request to the API and print the JSON answer")
    raw.add_argument("method", metavar="METHOD")
    raw.add_argument("path", metavar="PATH", help="e.g. /settings?prefix=settings.ntp")
    raw.add_argument("--data", help="JSON request body")
    raw.set_defaults(func=cmd_raw)

    reboot = common(sub.add_parser("reboot", help="reboot the host"), tx=False)
    reboot.set_defaults(func=cmd_reboot)
