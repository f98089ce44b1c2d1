"""`kiln fleet`: the FleetLock server (state in etcd) and what operators ask of it.

    kiln fleet serve --etcd http://127.0.0.1:2379 [--etcd …] [--config fleet.toml] [--port 8700]
    kiln fleet status [--server URL] [--json]
    kiln fleet release ID --group G [--server URL]
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kiln.core.errors import KilnError

DEFAULT_PORT = 8700
DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_PORT}"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fleet", help="coordinate fleet reboots: a FleetLock server over etcd, its status")
    fsub = p.add_subparsers(dest="fleet_command", required=True)

    serve = fsub.add_parser("serve", help="serve FleetLock v1 (+ status, metrics) with its state in etcd")
    serve.add_argument("--etcd", action="append", required=True, metavar="URL",
                       help="an etcd member's client URL (repeat for each member)")
    serve.add_argument("--config", type=Path, help="TOML: slots per group, stale-after (kiln.fleet.config)")
    serve.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)")
    serve.add_argument("--etcd-ca", help="CA certificate of the etcd members (https endpoints)")
    serve.add_argument("--etcd-cert", help="client certificate for etcd")
    serve.add_argument("--etcd-key", help="client key for etcd")
    serve.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM), e.g. a `kiln pki` node.crt")
    serve.add_argument("--tls-key", help="its private key")
    serve.add_argument("--client-ca", help="with --tls-cert: require client certificates signed by this CA")
    serve.add_argument("--release", metavar="PATH_OR_URL",
                       help="a repository's manifest.json (file, directory or URL): the dashboard shows its waves")
    serve.add_argument("--forget-after", default="24 hours",
                       help="a host that stops reporting leaves the fleet view after this (default: 24 hours)")
    serve.add_argument("--sample-every", default="1 minute",
                       help="a point of the fleet's versions over time this often (default: 1 minute)")
    serve.add_argument("--json", action="store_true", help="print the listening address as JSON once ready")
    serve.set_defaults(func=cmd_serve)

    status = fsub.add_parser("status", help="groups, slots, holders (since when, what failed) and events")
    status.add_argument("--server", default=DEFAULT_SERVER, help=f"the fleet server (default {DEFAULT_SERVER})")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _tls_options(status)
    status.set_defaults(func=cmd_status)

    release = fsub.add_parser("release", help="free a host's reboot slot (after a failed release, or a dead host)")
    release.add_argument("id", help="the host's id (as `kiln fleet status` lists it)")
    release.add_argument("--group", required=True, help="its group")
    release.add_argument("--server", default=DEFAULT_SERVER, help=f"the fleet server (default {DEFAULT_SERVER})")
    release.add_argument("--json", action="store_true", help="machine-readable output")
    _tls_options(release)
    release.set_defaults(func=cmd_release)


def _tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", help="an https server: the CA its certificate is checked against")
    p.add_argument("--cert", help="a client certificate, for a server started with --client-ca")
    p.add_argument("--key", help="its key")


def _context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.server.startswith("https://"):
        return None
    ctx = ssl.create_default_context(cafile=args.ca)
    try:
        if args.cert:
            ctx.load_cert_chain(args.cert, args.key)
    except (ssl.SSLError, OSError) as e:
        raise KilnError(f"--cert {args.cert} / --key {args.key}: {e}") from None
    return ctx


def cmd_serve(args: argparse.Namespace) -> int:
    from kiln.fleet.config import FleetConfig
    from kiln.fleet.etcd import Etcd, EtcdUnavailable, Tls
    from kiln.fleet.hosts import FleetHosts
    from kiln.fleet.locks import FleetLocks
    from kiln.fleet.release import ReleaseSource
    from kiln.fleet.server import FleetServer, serve, tls_context
    from kiln.host.update.waves import parse_offset

    if bool(args.tls_cert) != bool(args.tls_key) or (args.client_ca and not args.tls_cert):
        raise KilnError("--tls-cert and --tls-key go together (and --client-ca needs them)")
    tls = tls_context(args.tls_cert, args.tls_key, args.client_ca) if args.tls_cert else None
    config = FleetConfig.load(args.config)
    try:
        forget_after, sample_every = parse_offset(args.forget_after), parse_offset(args.sample_every)
    except ValueError as e:
        raise KilnError(f"--forget-after/--sample-every: {e}") from None
    if forget_after.total_seconds() < 60 or sample_every.total_seconds() < 1:
        raise KilnError("--forget-after is at least 60 seconds, --sample-every at least 1 second")
    release = ReleaseSource(args.release) if args.release else None
    etcd = Etcd(args.etcd, tls=Tls(args.etcd_ca, args.etcd_cert, args.etcd_key))
    try:
        etcd.revision()
    except EtcdUnavailable as e:
        raise KilnError(str(e), hint="is the etcd cluster up? (see the README: a 3-member cluster)") from None

    def ready(server: FleetServer) -> None:
        host, port = str(server.server_address[0]), int(server.server_address[1])
        scheme = "https" if tls else "http"
        if args.json:
            print(json.dumps({"address": host, "port": port, "scheme": scheme, "etcd": args.etcd}), flush=True)
        else:
            print(f"kiln fleet: FleetLock and the dashboard on {scheme}://{host}:{port}/ "
                  f"(etcd: {', '.join(args.etcd)})", flush=True)

    try:
        serve((args.address, args.port), FleetLocks(etcd, config), ready, tls,
              hosts=FleetHosts(etcd, forget_after=forget_after), release=release, sample_every=sample_every)
    except OSError as e:
        raise KilnError(f"cannot listen on {args.address}:{args.port}: {e.strerror}") from None
    return 0


def _call(server: str, method: str, path: str, body: dict[str, Any] | None = None,
          tls: ssl.SSLContext | None = None) -> dict[str, Any]:
    req = urllib.request.Request(
        server.rstrip("/") + path, method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"fleet-lock-protocol": "true", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=15, context=tls) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read())
        except ValueError:
            err = {}
        raise KilnError(f"{server}{path}: {e.code} {err.get('kind', '')}: {err.get('value', e.reason)}") from None
    except (urllib.error.URLError, OSError) as e:
        raise KilnError(f"cannot reach the fleet server {server}: {getattr(e, 'reason', e)}",
                        hint="kiln fleet serve --etcd URL (or --server URL)") from None


def describe(status: dict[str, Any]) -> list[str]:
    lines = [f"fleet at {status.get('time')}"]
    for g in status.get("groups", []):
        if "error" in g:
            lines.append(f"group {g['group']}: {g['error']}")
            continue
        halted = "  HALTED: a release failed on every slot holder" if g.get("halted") else ""
        lines.append(f"group {g['group']}: {len(g['holders'])}/{g['slots']} slots held{halted}")
        for h in g["holders"]:
            what = f"failed: {h['failure']}" if h.get("failure") else "rebooting or updating"
            lines.append(f"  {h['id']}  since {h['since']} ({h['held_for']} s), seen {h['seen']}, "
                         f"version {h.get('version') or '?'}: {what}")
        for e in g.get("events", [])[-5:]:
            extra = ", ".join(f"{k} {v}" for k, v in e.items() if k not in ("at", "event", "id"))
            lines.append(f"  {e['at']} {e['event']} {e['id']}" + (f" ({extra})" if extra else ""))
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    status = _call(args.server, "GET", "/v1/status", tls=_context(args))
    print(json.dumps(status, indent=2) if args.json else "\n".join(describe(status)))
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    answer = _call(args.server, "POST", "/v1/release", {"client_params": {"id": args.id, "group": args.group}},
                   tls=_context(args))
    if args.json:
        print(json.dumps(answer, indent=2))
    elif answer.get("kind") == "not-held":
        print(f"{args.id} held no slot in group {args.group}", file=sys.stderr)
    else:
        print(f"released {args.id}'s slot in group {args.group}")
    return 0
