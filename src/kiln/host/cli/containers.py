"""`kiln containers` (what runs), `kiln logs NAME` (what it printed) and `kiln exec NAME --
CMD...` (Bottlerocket's `apiclient exec`).

`kiln exec` works the same on a host (the local socket) and from a workstation (`--endpoint
--pki`, mutual TLS). With a terminal on both ends it is interactive: raw mode, the window
size follows the local terminal, Ctrl-C goes to the remote process. Otherwise stdin,
stdout and stderr are plain streams for scripts. It exits with the remote command's status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import termios
import time
import tty
import urllib.parse
from collections.abc import Iterator
from types import FrameType
from typing import Any

from kiln.core.errors import KilnError
from kiln.host.api import stream
from kiln.host.cli.api import JSON_HELP, _client


def cmd_containers(args: argparse.Namespace) -> int:
    entries = _client(args).request("GET", "/containers")
    if args.json:
        print(json.dumps(entries, indent=2, sort_keys=True))
        return 0
    print(f"{'KIND':<10} {'NAME':<16} {'STATE':<11} {'PID':<8} {'RESTARTS':<8} IMAGE")
    for e in entries:
        pid = e.get("pid", "-")
        print(f"{e['kind']:<10} {e['name']:<16} {e['state']:<11} {pid:<8} {e.get('restarts', 0):<8} {e['image']}")
        if e.get("detail") and e["state"] in ("failed", "restarting", "pulling"):
            print(f"{'':<10} {e['detail']}")
    return 0


FOLLOW_INTERVAL = 1.0  # seconds between polls of `kiln logs -f`
LOG_LINES = 10_000  # the API's most entries per answer (kiln.host.api.containers.LOG_LINES)


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    query = {"name": args.name, "lines": str(args.lines)} | ({"kind": args.kind} if args.kind else {})
    cursor = None
    try:
        while True:
            params = query | ({"cursor": cursor} if cursor else {})
            answer = client.request("GET", "/containers/logs?" + urllib.parse.urlencode(params))
            for entry in answer["entries"]:
                print(_log_line(entry, args.json, args.timestamps))
            if not args.follow:
                return 0
            sys.stdout.flush()
            cursor = answer["cursor"] or cursor
            # After the first answer, every entry since the cursor: `lines` keeps the *last*
            # N after it, so -n 1 dropped all but one of the entries that came in one interval.
            query["lines"] = str(LOG_LINES)
            time.sleep(FOLLOW_INTERVAL)
    except KeyboardInterrupt:  # how -f ends
        return 0


def _log_line(entry: dict[str, Any], as_json: bool, timestamps: bool) -> str:
    if as_json:
        return json.dumps(entry, sort_keys=True)
    if timestamps:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(entry["time"])) + f" {entry['message']}"
    return str(entry["message"])


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _Winch:
    """Remembers that the local terminal changed size (sent from the main loop)."""

    def __init__(self) -> None:
        self.changed = False

    def __call__(self, _sig: int, _frame: FrameType | None) -> None:
        self.changed = True


def _size() -> tuple[int, int]:
    """The local terminal's rows and columns (the terminal's own, not $LINES/$COLUMNS)."""
    for fd in (1, 0, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        if size.lines and size.columns:
            return size.lines, size.columns
    return 24, 80


def relay(sock: socket.socket, leftover: bytes, interactive: bool) -> int:
    """Local stdin → frames; frames → local stdout/stderr; returns the remote exit status."""
    frames = stream.Frames()
    box = stream.Outbox(sock)
    winch = _Winch()
    old = signal.signal(signal.SIGWINCH, winch) if interactive else None
    stdin_open = True
    try:
        received: bytes | None = leftover
        while True:
            for kind, payload in frames.feed(received or b""):
                if kind == stream.STDOUT:
                    _write(sys.stdout.fileno(), payload)
                elif kind == stream.STDERR:
                    _write(sys.stderr.fileno(), payload)
                elif kind == stream.EXIT:
                    return stream.unpack_int(payload)
                elif kind == stream.ERROR:
                    raise KilnError(f"exec session failed on the host: {payload.decode(errors='replace')}")
            if winch.changed:
                winch.changed = False
                box.put(stream.resize(*_size()))
            sources = [0] if stdin_open and not box.full else []
            try:
                sock_ready, ready, can_write = stream.wait(
                    sock, True, sources, [sock.fileno()] if box.buf else [], 0.5)
            except InterruptedError:
                ready, can_write, sock_ready = [], [], False
            if ready:
                data = os.read(0, stream.CHUNK)
                box.put(stream.frame(stream.STDIN, data) if data else stream.frame(stream.STDIN_EOF))
                stdin_open = bool(data)
            if can_write or box.buf:
                box.flush()
            received = box.recv() if sock_ready else None
            if received == b"":
                raise KilnError("the host closed the exec session without an exit status")
    except stream.ProtocolError as e:
        raise KilnError(f"exec session: {e}") from None
    finally:
        if old is not None:
            signal.signal(signal.SIGWINCH, old)
        sock.close()


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def cmd_exec(args: argparse.Namespace) -> int:
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise KilnError("name a command: kiln exec NAME -- CMD [ARG...]")
    interactive = args.tty if args.tty is not None else (sys.stdin.isatty() and sys.stdout.isatty())
    rows, cols = _size()
    body: dict[str, Any] = {"target": args.name, "command": command, "tty": interactive,
                            "rows": rows, "cols": cols}
    if args.kind:
        body["kind"] = args.kind
    sock, leftover = _client(args).upgrade("/exec", body, stream.PROTOCOL)
    if interactive and sys.stdin.isatty():
        with _raw(0):
            return relay(sock, leftover, True)
    return relay(sock, leftover, interactive)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("containers", help="host, bootstrap and workload containers and their state")
    c.add_argument("--json", action="store_true", help=JSON_HELP)
    c.set_defaults(func=cmd_containers)

    lg = sub.add_parser("logs", help="what a container printed and the supervisor's lines about it "
                            "(the journal's entries under the container's id)")
    lg.add_argument("name", metavar="NAME", help="a host container, bootstrap container or workload")
    lg.add_argument("-n", "--lines", type=int, default=100, help="the last N entries (default 100, at most 10000)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new entries until interrupted")
    lg.add_argument("-t", "--timestamps", action="store_true", help="prefix each entry with its time")
    lg.add_argument("--kind", choices=["host", "bootstrap", "workload"], help="when names are shared across kinds")
    lg.add_argument("--json", action="store_true", help="one JSON object per entry (time, message)")
    lg.set_defaults(func=cmd_logs)

    e = sub.add_parser("exec", help="run a command in a running container (kiln exec admin -- sheltie)")
    e.add_argument("name", metavar="NAME", help="a host container (admin) or a workload")
    e.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command and its arguments")
    mode = e.add_mutually_exclusive_group()
    mode.add_argument("-t", "--tty", dest="tty", action="store_true", default=None,
                      help="interactive terminal (default when stdin and stdout are terminals)")
    mode.add_argument("-T", "--no-tty", dest="tty", action="store_false", help="plain streams, for scripts")
    e.add_argument("--kind", choices=["host", "workload"], help="when a host container and a workload share NAME")
    e.set_defaults(func=cmd_exec)
