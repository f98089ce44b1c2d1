"""`kiln fleet`: the FleetLock server (state in etcd) and what operators ask of it.

    kiln fleet serve --etcd http://127.0.0.1:2379 [--etcd …] [--config fleet.toml] [--port 8700]
    kiln fleet status [--server URL] [--json]
    kiln fleet release ID --group G [--server URL]
    kiln fleet simulate --hosts N --release REPO_OR_MANIFEST [--waves NAME|FILE] [--slots N] … [--output DIR]
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

    sim = fsub.add_parser(
        "simulate", help="plan a rollout: N hosts running the real update daemon, waves and FleetLock, simulated",
        description="Simulate a release's rollout: every host runs the real update daemon, wave arithmetic and "
                    "FleetLock semaphore on a virtual clock (kiln.fleet.simulate). Writes timeline.csv, "
                    "timeline.json (the dashboard loads it as a planned rollout), summary.json and PNG plots.")
    sim.add_argument("--hosts", type=int, default=1000, help="hosts in the fleet (default 1000)")
    sim.add_argument("--release", required=True, metavar="REPO_OR_MANIFEST",
                     help="a repository directory (kiln repo), a manifest.json or its URL: its newest release")
    sim.add_argument("--waves", metavar="NAME|FILE",
                     help="instead of the release's waves: default, accelerated, slow, ohno, none or a wave TOML "
                          "file (kiln repo waves), laid out from --start")
    sim.add_argument("--from", dest="from_version", metavar="VERSION",
                     help="what the hosts run before (default: the release before it in the manifest)")
    sim.add_argument("--groups", type=int, default=0, help="FleetLock groups, hosts spread evenly (default: one per "
                                                           "1000 hosts)")
    sim.add_argument("--slots", type=int, default=1, help="reboot slots per group (default 1)")
    sim.add_argument("--check-interval", default="1h", help="settings.updates.check-interval (default 1h)")
    sim.add_argument("--windows", type=Path, metavar="FILE",
                     help="maintenance windows, TOML or JSON in settings.updates.maintenance-windows' shape")
    sim.add_argument("--failure-rate", type=float, default=0.0,
                     help="chance that the release fails its health gate on a host (default 0)")
    sim.add_argument("--reboot-time", default="60s", metavar="DIST",
                     help="reboot to health gate: 60s, uniform:40s-90s or normal:60s,10s (default 60s)")
    sim.add_argument("--seed", type=int, default=0, help="the simulation's random seed (default 0)")
    sim.add_argument("--start", metavar="TIME", help="when the hosts start looking (default: the release's first "
                                                     "wave opening, or now)")
    sim.add_argument("--horizon", default="60d", help="stop after this much simulated time (default 60d)")
    sim.add_argument("--sample", default="5m", help="the timeline's resolution (default 5m)")
    sim.add_argument("--exact", action="store_true",
                     help="run every pass of every daemon, without the shortcuts (slow: small fleets)")
    sim.add_argument("--output", type=Path, default=Path("fleet-simulation"), metavar="DIR",
                     help="where the timeline, summary and plots go (default ./fleet-simulation)")
    sim.add_argument("--no-plots", action="store_true", help="skip the PNG plots (and matplotlib)")
    sim.add_argument("--json", action="store_true", help="print summary.json")
    sim.set_defaults(func=cmd_simulate)


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


def _release(spec: str) -> Any:
    """The manifest behind --release: a repository's current manifest.json target (checked
    against its targets metadata), or a manifest.json file or URL."""
    from kiln.fleet.release import read_manifest

    if (Path(spec) / "repo.json").is_file():
        from kiln.repo.metadata import Repo
        from kiln.repo.publish import current_manifest

        return current_manifest(Repo.open(Path(spec)))
    return read_manifest(spec)


def cmd_simulate(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from datetime import UTC, datetime

    from kiln.fleet.simulate import simulate
    from kiln.fleet.simulate_params import Params, RebootTime, read_windows
    from kiln.fleet.simulate_report import describe, write
    from kiln.host.update.manifest import ManifestError, Version, parse_time
    from kiln.host.update.windows import parse_interval
    from kiln.repo import schedule

    manifest = _release(args.release)
    if not manifest.updates:
        raise KilnError(f"--release {args.release}: the manifest lists no release")
    release = max(manifest.updates, key=lambda u: u.version)
    try:
        if args.from_version:
            before = Version.parse(args.from_version, "--from")
        else:
            older = [u.version for u in manifest.updates if u.version < release.version
                     and (u.variant, u.arch) == (release.variant, release.arch)]
            if not older:
                raise KilnError(f"--release {args.release}: no release before {release.version} to start from",
                                hint="--from VERSION: what the hosts run before the rollout")
            before = max(older)
        start = (parse_time(args.start, "--start") if args.start else min(release.waves.values()) if release.waves
                 else datetime.now(UTC).replace(second=0, microsecond=0))
    except ManifestError as e:
        raise KilnError(str(e)) from None
    waves_name = "release"
    if args.waves:
        sched = schedule.load(args.waves)
        release, waves_name = replace(release, waves=sched.at(start)), sched.name
    try:
        horizon, sample = parse_interval(args.horizon), parse_interval(args.sample)
    except ValueError as e:
        raise KilnError(f"--horizon/--sample: {e}") from None
    params = Params(
        hosts=args.hosts, release=release, start=start, from_version=before, groups=args.groups, slots=args.slots,
        check_interval=args.check_interval, windows=read_windows(args.windows) if args.windows else (),
        failure_rate=args.failure_rate, reboot_time=RebootTime.parse(args.reboot_time), seed=args.seed,
        horizon=horizon, sample=sample, exact=args.exact,
        waves_name=waves_name)
    result = simulate(params)
    files = write(result, args.output, plots=not args.no_plots)
    if args.json:
        print(json.dumps(result.summary, indent=2))
    else:
        print("\n".join(describe(result.summary)))
        print(f"wrote {', '.join(str(f) for f in files)}")
    return 0
