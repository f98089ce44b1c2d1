"""`kiln repo`: the TUF update repository (Bottlerocket's tuftool and updata).

`kiln.repo`, python-tuf and securesystemslib are imported inside the commands, so the
rest of the CLI does not pay for them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRES_HELP = "expiry of ROLE's metadata in days (repeatable; defaults root=365 targets=90 snapshot=30 timestamp=7)"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("repo", help="TUF update repository: publish releases, sign, serve and check")
    rsub = p.add_subparsers(dest="repo_command", required=True)

    def command(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        c = rsub.add_parser(name, help=help, description=help)
        c.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        c.set_defaults(func=func)
        return c

    init = command("init", "create a repository: keys, signed metadata, an empty manifest.json", cmd_init)
    init.add_argument("dir", type=Path, help="directory to create (must not exist or be empty)")
    init.add_argument("--root-keys", type=int, default=1, metavar="N", help="number of root keys (default 1)")
    init.add_argument("--root-threshold", type=int, default=1, metavar="M", help="root signatures needed (M <= N)")
    init.add_argument("--expires", action="append", default=[], metavar="ROLE=DAYS", help=EXPIRES_HELP)

    add = command("add", "publish a build's update images as a release in manifest.json", cmd_add)
    add.add_argument("dir", type=Path, help="the repository")
    add.add_argument("artifacts", type=Path, help="a build's artifacts/ directory (or the build output holding it)")
    add.add_argument(
        "--waves", default="default", metavar="NAME|FILE",
        help="rollout schedule: default, accelerated, slow, ohno, none, or a wave TOML file (default: default)",
    )
    add.add_argument("--start-at", metavar="RFC3339", help="when the schedule starts (default: now)")
    add.add_argument("--max-version", metavar="V", help="newest version hosts of this variant may take "
                     "(default: the higher of this version and the current max_version)")
    add.add_argument(
        "--migration", action="append", default=[], metavar="FROM_VERSION:PATH",
        help="a migration to run between FROM_VERSION and this release (repeatable)",
    )

    waves = command("waves", "set the rollout waves of a published version", cmd_waves)
    waves.add_argument("dir", type=Path, help="the repository")
    waves.add_argument("version", help="the published version")
    waves.add_argument("schedule", metavar="NAME|FILE", help="default, accelerated, slow, ohno, none or a TOML file")
    waves.add_argument("--start-at", metavar="RFC3339", help="when the schedule starts (default: now)")
    waves.add_argument("--variant", help="only this variant's release (default: every variant with VERSION)")
    waves.add_argument("--arch", help="only this architecture's release")

    refresh = command("refresh", "re-sign snapshot and timestamp with new expiry dates (run from cron)", cmd_refresh)
    refresh.add_argument("dir", type=Path, help="the repository")
    refresh.add_argument(
        "--expires", action="append", default=[], metavar="ROLE=DAYS",
        help="set ROLE's expiry in days from now on (saved in repo.json); a named root or targets is re-signed too",
    )

    rotate = command("rotate-key", "replace a role's signing keys; clients follow through a new root", cmd_rotate)
    rotate.add_argument("dir", type=Path, help="the repository")
    rotate.add_argument("role", choices=ROLES, help="whose keys to replace")
    rotate.add_argument("--key-id", metavar="PREFIX", help="replace only this key (default: all of the role's keys)")

    check = command("check", "verify a served repository as a host would and download every target", cmd_check)
    check.add_argument("url", help="base URL serving metadata/ and targets/ (as `kiln repo serve` does)")
    check.add_argument("--root", type=Path, required=True, metavar="ROOT_JSON", help="the root.json to trust")
    check.add_argument("--metadata-url", help="metadata base URL, if not URL/metadata/")
    check.add_argument("--targets-url", help="targets base URL, if not URL/targets/")

    serve = command("serve", "serve DIR/metadata and DIR/targets over HTTP (tests and labs)", cmd_serve)
    serve.add_argument("dir", type=Path, help="the repository")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")

    status = command("status", "roles, versions, keys, expiry and the published releases", cmd_status)
    status.add_argument("dir", type=Path, help="the repository")


def _print_json(doc: Any) -> int:
    print(json.dumps(doc, indent=2))
    return 0


def _versions(versions: dict[str, int]) -> str:
    return ", ".join(f"{r} v{v}" for r, v in versions.items())


def cmd_init(args: argparse.Namespace) -> int:
    from kiln.repo import admin
    from kiln.repo.metadata import parse_expires

    result = admin.init(
        args.dir, root_keys=args.root_keys, root_threshold=args.root_threshold, expires=parse_expires(args.expires)
    )
    if args.json:
        return _print_json(result.to_json())
    for f in [*result.new_keys, *result.files]:
        print(f"wrote {f}")
    print(f"repository {result.dir}: {_versions(result.versions)}")
    print(f"hosts trust {result.dir}/metadata/1.root.json; keep {result.dir}/keys private")
    print(f"next: kiln repo add {result.dir} build/<variant>-<version>/artifacts")
    return 0


def _print_updates(updates: list[Any]) -> None:
    from kiln.host.update.manifest import format_time

    for u in updates:
        waves = sorted(u.waves.items())
        when = (
            f"{len(waves)} waves, {format_time(waves[0][1])} .. {format_time(waves[-1][1])}" if waves else "no waves"
        )
        print(f"{u.variant} {u.arch} {u.version}: max_version {u.max_version}, {when}")


def cmd_add(args: argparse.Namespace) -> int:
    from kiln.repo import publish

    result = publish.add(
        args.dir, args.artifacts, waves=args.waves, start_at=args.start_at, max_version=args.max_version,
        migrations=args.migration,
    )
    if args.json:
        return _print_json(result.to_json())
    _print_updates(result.updates)
    print(f"published {len(result.targets)} targets: {', '.join(result.targets)}")
    print(f"now {_versions(result.versions)}")
    return 0


def cmd_waves(args: argparse.Namespace) -> int:
    from kiln.repo import publish

    result = publish.set_waves(
        args.dir, args.version, args.schedule, start_at=args.start_at, variant=args.variant, arch=args.arch
    )
    if args.json:
        return _print_json(result.to_json())
    _print_updates(result.updates)
    print(f"now {_versions(result.versions)}")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from kiln.repo import admin
    from kiln.repo.metadata import parse_expires

    result = admin.refresh(args.dir, expires=parse_expires(args.expires))
    if args.json:
        return _print_json(result.to_json())
    print(f"re-signed: {_versions(result.versions)}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from kiln.repo import admin

    result = admin.rotate_key(args.dir, args.role, keyid=args.key_id)
    if args.json:
        return _print_json(result.to_json())
    for f in result.new_keys:
        print(f"new key {f}")
    for f in result.removed_keys:
        print(f"removed old key {f}")
    print(f"now {_versions(result.versions)}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from kiln.core.progress import Progress, human_size, table
    from kiln.repo import check

    progress = Progress(quiet=args.json or not sys.stderr.isatty())
    result = check.check(
        args.url, args.root, metadata_url=args.metadata_url, targets_url=args.targets_url, progress=progress
    )
    if args.json:
        return _print_json(result.to_json())
    doc = result.to_json()
    rows = [(r, str(d["version"]), d["expires"]) for r, d in doc["roles"].items()]
    print(table(rows, ("role", "version", "expires")))
    print()
    for v in doc["versions"]:
        print(f"release {v['variant']} {v['arch']} {v['version']} (max_version {v['max_version']})")
    total = sum(n for _, n in result.targets)
    print(f"ok: {len(result.targets)} targets verified ({human_size(total)}) from {result.targets_url}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kiln.repo.serve import RepoServer

    with RepoServer(args.dir, args.host, args.port, log=None if args.json else sys.stderr) as srv:
        if args.json:
            doc = {"url": srv.url, "metadata_url": srv.metadata_url, "targets_url": srv.targets_url}
            print(json.dumps(doc), flush=True)
        else:
            print(f"metadata: {srv.metadata_url}\ntargets:  {srv.targets_url}\n(Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            srv.wait()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from kiln.core.progress import table
    from kiln.host.update.manifest import format_time
    from kiln.repo import admin

    st = admin.status(args.dir)
    if args.json:
        return _print_json(st.to_json())
    rows = []
    for r in st.roles:
        keys = " ".join(k[:12] + ("(no private key)" if k in r.missing_keys else "") for k in r.keyids)
        rows.append((r.name, str(r.version), f"{r.threshold} of {len(r.keyids)}", keys,
                     format_time(r.expires), r.expiry(st.now), f"{st.expires_days[r.name]} days"))
    print(f"repository {st.dir}")
    print(table(rows, ("role", "version", "threshold", "key ids", "expires", "", "renewed for")))
    print()
    if not st.manifest.updates:
        print("no releases published")
    for u in st.manifest.updates:
        print(f"{u.variant} {u.arch} {u.version}  max_version {u.max_version}  build {u.build_id or '-'}")
        for seed, when in sorted(u.waves.items()):
            state = "open" if when <= st.now else "opens"
            print(f"    wave from seed {seed:>4}: {state} {format_time(when)}")
    for (frm, to), names in sorted(st.manifest.migrations.items()):
        print(f"migrations {frm} -> {to}: {', '.join(names)}")
    print(f"{st.targets} targets")
    return 0
