"""The update routes (Bottlerocket's thar-be-updates API), registered on the shared table.

    GET  /updates/status[?since=REVISION&wait=S]   a long poll with since: answered on a change
    POST /actions/refresh-updates | prepare-update | activate-update | deactivate-update
    POST /actions/rollback[?reboot=false]
    POST /actions/retry-update?version=V   forget this host's failures of V

Commands are started and answered with 202; clients long-poll the status. 409: not allowed in
the current state; 423: another update command is running.
"""

from __future__ import annotations

from kiln.host.api.routes import Api, ApiError, Request, Response, route

COMMANDS = {
    "/actions/refresh-updates": "refresh",
    "/actions/prepare-update": "prepare",
    "/actions/activate-update": "activate",
    "/actions/deactivate-update": "deactivate",
}


@route("GET", "/updates/status")
def update_status(api: Api, req: Request) -> Response:
    from kiln.host.update.control import MAX_WAIT

    since, text = req.arg("since"), req.arg("wait", "0") or "0"
    try:
        wait = float(text)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT:  # also refuses nan
        raise ApiError(400, f"wait must be a number of seconds from 0 to {MAX_WAIT:.0f}, not '{text}'", "wait")
    return Response(200, api.updates().status(since, wait))


def _start(api: Api, req: Request) -> Response:
    from kiln.host.update.errors import Busy, NotAllowed

    command = COMMANDS[req.path]
    try:
        api.updates().start(command)
    except Busy as e:
        raise ApiError(423, str(e)) from None
    except NotAllowed as e:
        raise ApiError(409, str(e)) from None
    return Response(202, {"command": command, "status": "/updates/status"})


for _path in COMMANDS:
    route("POST", _path)(_start)


@route("POST", "/actions/rollback")
def rollback(api: Api, req: Request) -> Response:
    from kiln.host.slot import SlotError
    from kiln.host.update.errors import Busy

    flag = req.arg("reboot", "true")
    if flag not in ("true", "false"):  # `reboot=no` must not reboot: only the two documented values
        raise ApiError(400, f"reboot must be true or false, not '{flag}'", "reboot")
    reboot = flag == "true"
    if reboot and api.reboot is None:
        raise ApiError(409, "reboot is not available here (use ?reboot=false)")
    try:
        slots = api.updates().rollback()
    except Busy as e:
        raise ApiError(423, str(e)) from None
    except SlotError as e:
        raise ApiError(409, str(e)) from None
    return Response(202, {"next": slots.get("next"), "rebooting": reboot}, after=api.reboot if reboot else None)


@route("POST", "/actions/retry-update")
def retry_update(api: Api, req: Request) -> Response:
    from kiln.host.update.errors import Busy
    from kiln.host.update.manifest import ManifestError, Version

    text = req.arg("version") or ""
    try:
        version = str(Version.parse(text, "version"))
    except ManifestError as e:
        raise ApiError(400, f"{e} (?version=MAJOR.MINOR.PATCH)", "version") from None
    try:
        cleared = api.updates().retry(version)
    except Busy as e:
        raise ApiError(423, str(e)) from None
    return Response(200, {"version": version, "cleared": cleared})
