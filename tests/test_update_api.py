"""The update routes (thar-be-updates' API) and `kiln update` / `kiln rollback`, end to end
but for the process boundary: `Api(updates=...)` gets an UpdateControl whose launcher runs
the real Agent in a thread (where the server would start `python3 -m kiln.host.update.agent`
holding the lock), against a real repository served on 127.0.0.1 and a small Kiln disk.

Routes are called through `Api.handle`; the CLI talks to a LocalServer on a temporary Unix
socket. Every answer is checked against the OpenAPI document's schema for its status.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from kiln.core.errors import KilnError
from kiln.host.api.routes import Api, Request, Response
from kiln.host.api.server import LocalServer
from kiln.host.datastore import Datastore
from kiln.host.slot import Slots
from kiln.host.update.agent import Agent
from kiln.host.update.control import UpdateControl, revision
from kiln.host.update.status import Status
from kiln.repo.metadata import Repo
from tests.controlled_repo import ControlledRepo, published
from tests.helpers import fake_release, small_disk
from tests.test_api import OPENAPI, ApiHost, check_schema, wait_for
from tests.test_cli_api import Run
from tests.test_update_agent import make_agent

pytestmark = pytest.mark.timeout(60)
CHOSEN = {"variant": "container-host", "arch": "amd64", "version": "1.1.0"}
POSTS = ["/actions/refresh-updates", "/actions/prepare-update", "/actions/activate-update",
         "/actions/deactivate-update", "/actions/rollback?reboot=false"]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_release(tmp_path_factory.mktemp("releases") / "1.1.0", "1.1.0", root_mib=4)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(OPENAPI.read_text())
    return loaded


@pytest.fixture
def repo(tmp_path: Path, release: Path) -> Iterator[ControlledRepo]:
    with published(tmp_path / "repo", release) as srv:
        yield srv


@dataclass
class Updates:
    """UpdateControl's collaborators: the disk's slots, the running version, and a launcher
    that runs the real Agent in a thread and closes the locked file when it is done."""

    tmp_path: Path
    disk: Path
    srv: ControlledRepo
    settings: dict[str, Any] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def agent(self) -> Agent:
        return make_agent(self.tmp_path, self.disk, self.srv, **self.settings)

    def slots(self) -> Slots:
        return Slots.open(image=self.disk, active="A")

    def launch(self, command: str, lock_fd: int) -> None:
        agent = self.agent()

        def work() -> None:
            try:
                agent.run(command)
            except KilnError:
                pass  # recorded in the status file, as the agent process would
            finally:
                os.close(lock_fd)

        thread = threading.Thread(target=work, name=f"agent-{command}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def control(self) -> UpdateControl:
        return UpdateControl(paths=self.agent().paths, slots=self.slots, version=lambda: "1.0.0", launch=self.launch)

    def wait(self) -> None:
        for thread in self.threads:
            thread.join(timeout=20)
            assert not thread.is_alive(), f"{thread.name} did not finish"


@pytest.fixture
def updates(tmp_path: Path, repo: ControlledRepo) -> Iterator[Updates]:
    u = Updates(tmp_path, small_disk(tmp_path / "disk.img"), repo)
    yield u
    u.wait()


@pytest.fixture
def api(tmp_path: Path, updates: Updates) -> Api:
    return Api(Datastore.create(tmp_path / "datastore", "1.0.0"), updates=updates.control)


class Call:
    """`api.handle` of one request, its answer checked against the OpenAPI document."""

    def __init__(self, api: Api, doc: dict[str, Any]) -> None:
        self.api, self.doc = api, doc

    def __call__(self, method: str, target: str, role: str = "admin") -> Response:
        r = self.api.handle(Request.from_target(method, target, role=role))
        check_schema(self.doc, method, target, r.status, r.body)
        return r

    def status(self) -> dict[str, Any]:
        r = self("GET", "/updates/status")
        assert r.status == 200, r.body
        body: dict[str, Any] = r.body
        return body

    def run(self, updates: Updates, path: str) -> dict[str, Any]:
        """POST a command (202), wait for its agent, return the status."""
        r = self("POST", path)
        assert r.status == 202, r.body
        updates.wait()
        return self.status()


@pytest.fixture
def call(api: Api, doc: dict[str, Any]) -> Call:
    return Call(api, doc)


# --- the API ------------------------------------------------------------------------------------


def test_status_shape(call: Call, doc: dict[str, Any]) -> None:
    st = call.status()
    schema = doc["components"]["schemas"]["UpdateStatus"]
    assert set(schema["required"]) <= set(st)
    assert (st["update_state"], st["available_updates"], st["chosen_update"]) == ("Idle", [], None)
    assert st["active_partition"] == {"slot": "A", "version": "1.0.0", "next_to_boot": True}
    assert st["staging_partition"] == {"slot": "B", "version": None, "next_to_boot": False}
    assert st["most_recent_command"] is None and st["last_failure"] is None


def test_status_long_poll_is_answered_when_a_command_begins_or_after_its_wait(call: Call, updates: Updates) -> None:
    rev = call.status()["revision"]
    started = time.monotonic()
    r = call("GET", f"/updates/status?since={rev}&wait=0.3")
    assert r.body["revision"] == rev and time.monotonic() - started >= 0.3  # nothing changed: held for `wait`

    answers: list[Response] = []
    poll = threading.Thread(target=lambda: answers.append(call("GET", f"/updates/status?since={rev}&wait=20")))
    poll.start()
    time.sleep(0.3)
    assert poll.is_alive() and not answers, "the poll answered before anything changed"
    started = time.monotonic()
    call("POST", "/actions/refresh-updates")
    poll.join(10)
    assert answers and time.monotonic() - started < 5, "the poll was not answered when the command began"
    assert answers[0].body["revision"] != rev and answers[0].body["most_recent_command"]["cmd_type"] == "refresh"
    updates.wait()
    r = call("GET", f"/updates/status?since={rev}&wait=20")  # an old revision: answered at once
    assert r.body["most_recent_command"]["cmd_status"] == "Success"


def test_a_held_long_poll_is_answered_when_the_server_stops(call: Call, api: Api) -> None:
    rev = call.status()["revision"]
    answers: list[Response] = []
    poll = threading.Thread(target=lambda: answers.append(call("GET", f"/updates/status?since={rev}&wait=20")))
    poll.start()
    time.sleep(0.3)
    assert poll.is_alive()
    started = time.monotonic()
    api.close()  # what a stopping server does before it waits for its requests in flight
    poll.join(10)
    assert answers and answers[0].status == 200 and time.monotonic() - started < 2


def test_a_command_cut_off_by_a_dead_agent_is_written_as_failed_when_the_next_agent_starts(
    updates: Updates, tmp_path: Path
) -> None:
    """A client long-polling on the revision it saw before the agent died must hear of the
    end from the next agent at once: the file itself changes, not only the report."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    paths = updates.agent().paths
    paths.status.parent.mkdir(parents=True, exist_ok=True)
    running = {"cmd_type": "prepare", "cmd_status": "Running", "id": 3, "pid": dead.pid, "timestamp": "t"}
    Status(update_state="Available", most_recent_command=running).save(paths.status)
    before = revision(paths.status)
    control = updates.control()  # what the restarted agent makes on its first update request
    assert revision(paths.status) != before
    cmd = Status.load(paths.status).most_recent_command
    assert cmd is not None and (cmd["cmd_status"], cmd["id"]) == ("Failed", 3) and "interrupted" in cmd["stderr"]
    st = control.status(before, 20.0)  # answered at once, not after 20 s
    assert st["most_recent_command"]["cmd_status"] == "Failed" and st["revision"] != before


@pytest.mark.parametrize("wait", ["-1", "31", "nan", "inf", "soon"])
def test_status_wait_out_of_range_is_400_naming_it(call: Call, wait: str) -> None:
    r = call("GET", f"/updates/status?since=0&wait={wait}")
    assert r.status == 400 and r.body["path"] == "wait" and wait in r.body["detail"], r.body


def test_refresh_then_available(call: Call, updates: Updates) -> None:
    r = call("POST", "/actions/refresh-updates")
    assert (r.status, r.body) == (202, {"command": "refresh", "status": "/updates/status"})
    updates.wait()
    st = call.status()
    assert (st["update_state"], st["chosen_update"], st["available_updates"]) == ("Available", CHOSEN, ["1.1.0"])
    cmd = st["most_recent_command"]
    assert (cmd["cmd_type"], cmd["cmd_status"], cmd["exit_status"], cmd["id"]) == ("refresh", "Success", 0, 1)


@pytest.mark.parametrize(("path", "command"), [
    ("/actions/prepare-update", "prepare"), ("/actions/activate-update", "activate"),
    ("/actions/deactivate-update", "deactivate"),
])
def test_commands_refused_in_idle(call: Call, updates: Updates, path: str, command: str) -> None:
    r = call("POST", path)
    assert r.status == 409 and r.body["detail"].startswith(f"{command} is not allowed in state Idle"), r.body
    assert updates.threads == []
    assert call("POST", "/actions/refresh-updates").status == 202  # the lock was let go


def test_second_command_while_one_runs_is_423(call: Call, updates: Updates, repo: ControlledRepo) -> None:
    """The first refresh is held at its timestamp download (the server answers when the test
    lets it): every other command, and a rollback, is refused at once; the status still reads."""
    gate = threading.Event()

    def held(path: str, data: bytes | None) -> bytes | None:
        gate.wait(20)
        return data

    repo.hooks["/metadata/timestamp.json"] = held
    try:
        assert call("POST", "/actions/refresh-updates").status == 202
        wait_for(lambda: "/metadata/timestamp.json" in repo.requests)
        for path in POSTS:
            r = call("POST", path)
            assert r.status == 423 and r.body["detail"] == "another update command is running", (path, r.body)
        running = call.status()["most_recent_command"]
        assert (running["cmd_type"], running["cmd_status"]) == ("refresh", "Running")
    finally:
        gate.set()
    updates.wait()
    assert call.status()["update_state"] == "Available"
    assert len(updates.threads) == 1


def test_prepare_activate_deactivate(call: Call, updates: Updates) -> None:
    call.run(updates, "/actions/refresh-updates")
    st = call.run(updates, "/actions/prepare-update")
    assert (st["update_state"], st["staged_version"]) == ("Staged", "1.1.0"), st["most_recent_command"]
    assert st["staging_partition"] == {"slot": "B", "version": "1.1.0", "next_to_boot": False}
    st = call.run(updates, "/actions/activate-update")
    assert st["update_state"] == "Ready" and st["staging_partition"]["next_to_boot"] is True
    assert updates.slots().state().next_boot == "B"
    st = call.run(updates, "/actions/deactivate-update")
    assert st["update_state"] == "Staged" and updates.slots().state().next_boot == "A"
    assert st["most_recent_command"]["id"] == 4


def test_failed_command_is_reported(call: Call, updates: Updates, repo: ControlledRepo) -> None:
    repo.hooks["/metadata/timestamp.json"] = lambda path, data: b"{}"
    st = call.run(updates, "/actions/refresh-updates")
    cmd = st["most_recent_command"]
    assert (cmd["cmd_status"], cmd["error"], cmd["exit_status"]) == ("Failed", "UntrustedUpdate", 1)
    assert "timestamp.json: DeserializationError" in cmd["stderr"]
    assert st["update_state"] == "Idle" and st["reason"].startswith("cannot check for updates: ")


def test_reader_may_only_read(call: Call, updates: Updates) -> None:
    for path in POSTS:
        r = call("POST", path, role="reader")
        assert r.status == 403 and "needs admin" in r.body["detail"], (path, r.body)
    assert call("GET", "/updates/status", role="reader").status == 200
    assert updates.threads == []


def test_rollback(call: Call, api: Api, updates: Updates) -> None:
    r = call("POST", "/actions/rollback?reboot=false")
    assert r.status == 409 and r.body["detail"].startswith("cannot roll back to slot B: it would not boot"), r.body
    r = call("POST", "/actions/rollback")
    assert r.status == 409 and "reboot is not available here" in r.body["detail"]
    # slot B held the previous version, which booted successfully (flags as signpost leaves them)
    other = Slots.open(image=updates.disk, active="B")
    other.apply("mark-successful-boot")
    other.apply("rollback-to-inactive")
    assert updates.slots().state().next_boot == "A"
    r = call("POST", "/actions/rollback?reboot=false")
    assert (r.status, r.body, r.after) == (202, {"next": "B", "rebooting": False}, None)
    assert updates.slots().state().next_boot == "B"
    reboots: list[str] = []
    api.reboot = lambda: reboots.append("reboot")
    for bad in ("no", "0", "null", "", "False", "yes"):  # only the two documented values
        r = call("POST", f"/actions/rollback?reboot={bad}")
        assert r.status == 400 and r.body["path"] == "reboot", (bad, r.body)
    assert reboots == [] and updates.slots().state().next_boot == "B"
    r = call("POST", "/actions/rollback")
    assert (r.status, r.body) == (202, {"next": "B", "rebooting": True})
    assert r.after is not None and reboots == []  # the transport reboots once the answer is sent
    r.after()
    assert reboots == ["reboot"]


def test_no_updates_here(tmp_path: Path, doc: dict[str, Any]) -> None:
    call = Call(Api(Datastore.create(tmp_path / "datastore", "1.0.0")), doc)
    for method, path in [("GET", "/updates/status"), *(("POST", p) for p in POSTS)]:
        r = call(method, path)
        assert r.status == 409 and r.body["detail"] == "updates are not available here", (path, r.body)


# --- the CLI through a LocalServer ------------------------------------------------------------------


@pytest.fixture
def socket_path(tmp_path: Path, api: Api) -> Iterator[Path]:
    sock = tmp_path / "api.sock"
    server = LocalServer(api, sock)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield sock
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def kiln(socket_path: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    """`kiln --socket SOCK ARGS...` (test_cli_api's runner)."""
    return Run(cast(ApiHost, SimpleNamespace(socket=socket_path)), capsys)


def test_cli_status_and_check(kiln: Run, doc: dict[str, Any]) -> None:
    code, out, err = kiln("update", "status")
    assert code == 0 and out.splitlines()[:2] == ["state: Idle", "running: 1.0.0 (slot A)"], (out, err)
    st = kiln.json("update", "check")
    check_schema(doc, "GET", "/updates/status", 200, st)
    assert (st["update_state"], st["chosen_update"]) == ("Available", CHOSEN)
    code, out, err = kiln("update", "status")
    assert "chosen update: 1.1.0" in out.splitlines() and "available: 1.1.0" in out.splitlines()
    assert "last command: refresh Success at " in out


def test_cli_apply_and_cancel(kiln: Run, updates: Updates) -> None:
    st = kiln.json("update", "apply")
    assert st["update_state"] == "Ready"
    assert st["staging_partition"] == {"slot": "B", "version": "1.1.0", "next_to_boot": True}
    assert updates.slots().state().next_boot == "B"
    code, out, err = kiln("update", "cancel")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "state: Staged" and "other slot: 1.1.0 (slot B, valid, not next)" in lines
    assert updates.slots().state().next_boot == "A"
    assert [t.name for t in updates.threads] == ["agent-refresh", "agent-prepare", "agent-activate",
                                                 "agent-deactivate"]


def test_cli_apply_with_nothing_to_take(kiln: Run, updates: Updates) -> None:
    updates.settings["version-lock"] = "1.0.0"
    code, out, err = kiln("update", "apply")
    assert code == 0, err
    assert "state: Idle" in out and "why nothing is applied: locked to 1.0.0" in out
    assert [t.name for t in updates.threads] == ["agent-refresh"]


def test_cli_failures_exit_1(kiln: Run, repo: ControlledRepo) -> None:
    url = "/targets/" + Repo.open(repo.directory).target_path("manifest.json").name
    repo.hooks[url] = lambda path, data: (data or b"").replace(b"1.1.0", b"6.6.6")
    code, out, err = kiln("update", "check")
    assert (code, out) == (1, "") and err.startswith("kiln: error: refresh failed: target manifest.json: sha256"), err
    code, out, err = kiln("update", "cancel")
    assert code == 1 and "deactivate is not allowed in state Idle" in err
    code, out, err = kiln("rollback", "--no-reboot")
    assert code == 1 and "cannot roll back to slot B" in err and "hint: " in err
