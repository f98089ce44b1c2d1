"""`kiln update check|apply|cancel|status` and `kiln rollback` (apiclient update …).

Each command starts an update action through the API and long-polls `/updates/status`
(answered when the status file changes) until the agent has finished it, so the same
commands work on the host (local socket) and from a workstation (mTLS). Long steps
report progress on a terminal; `--json` prints only the final status.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from kiln.core.errors import KilnError
from kiln.host.api.client import ApiRefused, ApiUnreachable, Client
from kiln.host.cli.api import _client

WAIT = 20.0  # a long poll's longest wait (the agent holds at most 30 s)
RETRY = 0.5  # while the API is restarting
TIMEOUTS = {"refresh": 300.0, "prepare": 3600.0, "activate": 120.0, "deactivate": 120.0}
PATHS = {
    "refresh": "/actions/refresh-updates",
    "prepare": "/actions/prepare-update",
    "activate": "/actions/activate-update",
    "deactivate": "/actions/deactivate-update",
}


def run_command(client: Client, command: str, *, show: bool) -> dict[str, Any]:
    """Start `command`, wait for its result; KilnError if it failed (its message)."""
    st: dict[str, Any] = client.request("GET", "/updates/status")
    seen = int((st.get("most_recent_command") or {}).get("id", 0))
    client.request("POST", PATHS[command])
    deadline = time.monotonic() + TIMEOUTS[command]
    last = ""
    while True:
        # a long poll: the agent answers when the status file changes (progress, the end)
        wait = max(0.0, min(WAIT, deadline - time.monotonic()))
        try:
            st = client.request("GET", f"/updates/status?since={st.get('revision', '')}&wait={wait:.1f}")
        except ApiUnreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(RETRY)
            continue  # the API restarts on demand (socket activation)
        if "revision" not in st:
            time.sleep(RETRY)  # an agent from before the long poll answers at once: poll
        cmd = st.get("most_recent_command") or {}
        if int(cmd.get("id", 0)) > seen and cmd.get("cmd_status") != "Running":
            if show and last:
                print(file=sys.stderr)
            if cmd.get("cmd_status") != "Success":
                raise KilnError(f"{command} failed: {cmd.get('stderr') or 'no reason given'}")
            return st
        if show and sys.stderr.isatty() and (line := _progress(st)) and line != last:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
            last = line
        if time.monotonic() > deadline:
            raise KilnError(f"{command} did not finish within {TIMEOUTS[command]:.0f} s", hint="kiln update status")


def _progress(st: dict[str, Any]) -> str:
    p = st.get("progress") or {}
    if not p.get("total"):
        return ""
    return f"  writing {p['image']}: {100 * p['done'] // p['total']:3d} % of {p['total'] >> 20} MiB"


def describe(st: dict[str, Any]) -> list[str]:
    """The status in words: what runs, what is chosen or staged, and why nothing is."""
    active, staging = st.get("active_partition") or {}, st.get("staging_partition") or {}
    lines = [f"state: {st.get('update_state')}"]
    lines.append(f"running: {active.get('version')} (slot {active.get('slot')})")
    if staging.get("version"):
        nxt = "boots next" if staging.get("next_to_boot") else "valid, not next"
        lines.append(f"other slot: {staging.get('version')} (slot {staging.get('slot')}, {nxt})")
    if st.get("chosen_update"):
        lines.append(f"chosen update: {st['chosen_update']['version']}")
    if st.get("available_updates"):
        lines.append(f"available: {', '.join(st['available_updates'])}")
    if st.get("reason"):
        lines.append(f"why nothing is applied: {st['reason']}")
    cmd = st.get("most_recent_command") or {}
    if cmd:
        lines.append(f"last command: {cmd.get('cmd_type')} {cmd.get('cmd_status')} at {cmd.get('timestamp')}"
                     + (f": {cmd.get('stderr')}" if cmd.get("stderr") else ""))
    failure = st.get("last_failure")
    if failure:
        kind = f" ({failure['kind']})" if failure.get("kind") else ""
        lines.append(f"last failed update: {failure.get('version')} at {failure.get('at')}{kind}: "
                     f"{failure.get('reason')}" + (" [cleared]" if failure.get("cleared") else ""))
    return lines + describe_daemon(st.get("daemon"))


def describe_daemon(d: dict[str, Any] | None) -> list[str]:
    """The update daemon's part: strategy, next check, the window and the fleet lock."""
    if not d:
        return ["daemon: not running (settings.updates.strategy is manual)"]
    lines = [f"daemon: strategy {d.get('strategy')}, {d.get('phase')}"
             + (f": {d['reason']}" if d.get("reason") else "")]
    if d.get("next_check"):
        lines.append(f"  next check: {d['next_check']}")
    window = d.get("window") or {}
    if window.get("opens_at"):
        lines.append(f"  maintenance window: {window.get('window')}, opens at {window['opens_at']}")
    elif window.get("closes_at"):
        lines.append(f"  maintenance window: {window.get('window')}, open until {window['closes_at']}")
    lock = d.get("lock")
    if lock == "held":
        lines.append(f"  reboot slot: held in group {d.get('group')} since {d.get('lock_since')}")
    elif d.get("waiting_since"):
        lines.append(f"  reboot slot: waiting since {d['waiting_since']} ({d.get('lock_attempts')} tries; "
                     f"next at {d.get('next_attempt')})")
    elif lock == "asking":
        lines.append("  reboot slot: asking")
    if d.get("last_error"):
        lines.append(f"  last error: {d['last_error']}")
    return lines


def _print(st: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print("\n".join(describe(st)))


def cmd_update(args: argparse.Namespace) -> int:
    client = _client(args)
    show = not args.json
    if args.update_command == "status":
        _print(client.request("GET", "/updates/status"), args)
        return 0
    if args.update_command == "check":
        _print(run_command(client, "refresh", show=show), args)
        return 0
    if args.update_command == "retry":
        value = client.request("POST", f"/actions/retry-update?version={args.version}")
        if args.json:
            print(json.dumps(value, indent=2, sort_keys=True))
        else:
            print(f"{value['version']}: {value['cleared']} failure(s) cleared; the next check may take it again")
        return 0
    if args.update_command == "cancel":
        _print(run_command(client, "deactivate", show=show), args)
        return 0
    # apply: refresh, write the chosen update, make it boot next, optionally reboot
    st = run_command(client, "refresh", show=show)
    if st["update_state"] == "Idle":  # nothing to take; the status says why
        _print(st, args)
        return 0
    if st["update_state"] in ("Available", "Staged"):
        st = run_command(client, "prepare", show=show)
    if st["update_state"] == "Staged":
        st = run_command(client, "activate", show=show)
    _print(st, args)
    if args.reboot and st["update_state"] == "Ready":
        client.request("POST", "/actions/reboot")
        if show:
            print(f"rebooting into {(st.get('staging_partition') or {}).get('version')}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        value = client.request("POST", "/actions/rollback" + ("?reboot=false" if args.no_reboot else ""))
    except ApiRefused as e:
        raise KilnError(str(e), hint="the other slot must hold a version that booted successfully") from None
    if args.json:
        print(json.dumps(value, indent=2, sort_keys=True))
    else:
        print(f"slot {value.get('next')} boots next" + ("; rebooting" if value.get("rebooting") else ""))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    update = sub.add_parser("update", help="check for, apply and cancel OS updates")
    usub = update.add_subparsers(dest="update_command", required=True)
    for name, text in (
        ("check", "refresh the signed metadata and say which update would be taken, or why none"),
        ("apply", "download and write the chosen update into the other slot and make it boot next"),
        ("cancel", "keep booting the running version (undo apply before the reboot)"),
        ("status", "the update state, and why nothing is applied"),
        ("retry", "forget this host's failures of a version, so it is taken again"),
    ):
        p = usub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "retry":
            p.add_argument("version", help="the version to retry (MAJOR.MINOR.PATCH)")
        if name == "apply":
            p.add_argument("--reboot", action="store_true", help="reboot into the new version when written")
    update.set_defaults(func=cmd_update)
    rb = sub.add_parser("rollback", help="boot the previous version (the other slot) again")
    rb.add_argument("--no-reboot", action="store_true", help="only make it boot next")
    rb.add_argument("--json", action="store_true", help="machine-readable output")
    rb.set_defaults(func=cmd_rollback)
