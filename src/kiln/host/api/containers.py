"""The container routes, registered on the shared table.

    GET  /containers   declared host, bootstrap and workload containers and their state
    GET  /containers/logs?name=NAME[&kind=][&lines=N][&cursor=C]   their journal (kiln logs)
    POST /exec         Upgrade: kiln-exec — a process in a running container (kiln exec)

`/exec` takes {"target", "command", "tty", "rows", "cols"} and, once checked, answers 101
and speaks the frames of kiln.host.api.stream on the same connection.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, cast

from kiln.host.api.routes import Api, ApiError, Request, Response, admin_only, route
from kiln.host.api.stream import PROTOCOL

if TYPE_CHECKING:
    from kiln.host.containers.spec import Kind

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@route("GET", "/containers")
def list_containers(api: Api, req: Request) -> Response:
    from kiln.host.containers.control import overview

    return Response(200, overview(api.store.live_shared(), api.containers_state))


LOG_LINES = 10_000


@route("GET", "/containers/logs")
def container_logs(api: Api, req: Request) -> Response:
    from kiln.host.containers.control import CURSOR, BadCursor, LogsUnavailable, NoSuchContainer, log_target, logs

    admin_only(req, "a container's journal holds whatever it prints (secrets too)")
    name, kind, cursor = req.arg("name"), req.arg("kind"), req.arg("cursor")
    if name is None or not _NAME.fullmatch(name):
        raise ApiError(400, "expected a container name", "name")
    if kind not in (None, "host", "bootstrap", "workload"):
        raise ApiError(400, "expected 'host', 'bootstrap' or 'workload'", "kind")
    raw_lines = req.arg("lines", "100") or ""
    # isascii(): "²".isdigit() is True and int("²") raises (a 500); "١٢" would be 12.
    if not (raw_lines.isascii() and raw_lines.isdigit()) or not 1 <= int(raw_lines) <= LOG_LINES:
        raise ApiError(400, f"expected 1..{LOG_LINES}", "lines")
    if cursor is not None and not CURSOR.fullmatch(cursor):
        raise ApiError(400, "expected a cursor from an earlier answer", "cursor")
    try:
        spec = log_target(api.store.live_shared(), name, cast("Kind | None", kind))
        return Response(200, logs(spec, int(raw_lines), cursor))
    except NoSuchContainer as e:
        raise ApiError(404, str(e), "name") from None
    except BadCursor as e:
        raise ApiError(400, str(e), "cursor") from None
    except LogsUnavailable as e:
        raise ApiError(500, str(e)) from None


def _exec_request(body: Any) -> tuple[str, list[str], bool, int, int, Kind | None]:
    if not isinstance(body, dict):
        raise ApiError(400, 'expected {"target": NAME, "command": [ARG, ...]}', "body")
    unknown = set(body) - {"target", "command", "tty", "rows", "cols", "kind"}
    if unknown:
        raise ApiError(400, f"unknown field '{sorted(unknown)[0]}'", sorted(unknown)[0])
    name, command = body.get("target"), body.get("command")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ApiError(400, "expected a container name", "target")
    if (not isinstance(command, list) or not command or len(command) > 256
            or not all(isinstance(a, str) and "\0" not in a for a in command)):
        raise ApiError(400, "expected a non-empty list of arguments", "command")
    tty = body.get("tty", False)
    rows, cols = body.get("rows", 24), body.get("cols", 80)
    if not isinstance(tty, bool):
        raise ApiError(400, "expected true or false", "tty")
    for key, value in (("rows", rows), ("cols", cols)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            raise ApiError(400, "expected 1..65535", key)
    kind = body.get("kind")
    if kind not in (None, "host", "workload"):
        raise ApiError(400, "expected 'host' or 'workload'", "kind")
    return name, command, tty, rows, cols, cast("Kind | None", kind)


@route("POST", "/exec")
def exec_session(api: Api, req: Request) -> Response:
    if req.upgrade != PROTOCOL:
        raise ApiError(426, f"/exec needs 'Connection: Upgrade' and 'Upgrade: {PROTOCOL}' (kiln exec)")
    name, command, tty, rows, cols, kind = _exec_request(req.json())
    from kiln.host.containers.control import NoSuchContainer, NotRunning, target
    from kiln.host.containers.exec import Session

    try:
        spec = target(api.store.live_shared(), name, kind)
    except NoSuchContainer as e:
        raise ApiError(404, str(e), "target") from None
    except NotRunning as e:
        raise ApiError(409, str(e), "target") from None
    session = Session(spec, command, tty, rows, cols)

    def serve(conn: Any) -> None:
        session.serve(conn)

    return Response(101, upgrade=serve)
