"""The host agent's own wiring, on the workstation: sd_notify, the boot record it trusts
after a restart, and the mTLS listener following its rendered config without a restart.
(The agent on a real boot, and killed mid-work, is tests/vm/test_agent.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln import pki
from kiln.host.agent import main as agent_mod
from kiln.host.agent.notify import notify
from kiln.host.api import server
from kiln.host.api.client import ApiUnreachable, Client
from tests.test_api import TIMEOUT, bootstrap, variant_defaults
from tests.test_api_abuse import _free_port


def test_notify_reaches_the_socket_systemd_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False  # not run by systemd: nothing to tell
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1", "STATUS=health gate")
        assert s.recv(4096) == b"READY=1\nSTATUS=health gate"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(f"\0kiln-test-{tmp_path.name}")  # systemd may name an abstract socket: "@…"
        monkeypatch.setenv("NOTIFY_SOCKET", f"@kiln-test-{tmp_path.name}")
        assert notify("STOPPING=1") and s.recv(4096) == b"STOPPING=1"


def test_a_restarted_agent_trusts_this_boots_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline runs once per boot: after a restart the record decides, and a render
    error recorded then still fails the gate."""

    def must_not_run(_timings: Path) -> str | None:
        raise AssertionError("the pipeline ran twice in one boot")

    timings = tmp_path / "boot-settings.json"
    timings.write_text(json.dumps({"steps": {}, "total": 0.1, "apply": {"errors": ["motd: template broke"]}}))
    monkeypatch.setattr(agent_mod.pipeline, "boot", must_not_run)
    agent = agent_mod.Agent(timings=timings)
    assert agent.settings() == "settings did not render: motd: template broke"
    timings.write_text(json.dumps({"steps": {}, "total": 0.1, "apply": "current: files restored by the initramfs"}))
    assert agent.settings() is None


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    fleet = tmp_path / "fleet"
    pki.init(fleet)
    return fleet


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[agent_mod.Agent]:
    a = agent_mod.Agent(remote_config=tmp_path / "api-remote.json", remote_address="127.0.0.1")
    a.api = server.make_api(bootstrap(tmp_path, variant_defaults()))
    yield a
    a.shutdown()


def _write_config(path: Path, fleet: Path, port: int) -> None:
    node = pki.node_for_user_data(fleet)
    path.write_text(json.dumps({"ca": (fleet / "ca.crt").read_text(), "certificate": node.cert.read_text(),
                                "key": node.key.read_text(), "port": port}))


def _motd(fleet: Path, port: int) -> object:
    admin = Client.remote("127.0.0.1", port, pki.client_context(fleet, "admin"), timeout=TIMEOUT)
    return admin.request("GET", "/settings?keys=motd")


def test_the_mtls_listener_follows_its_config_without_a_restart(
    agent: agent_mod.Agent, fleet: Path, tmp_path: Path
) -> None:
    cfg = tmp_path / "api-remote.json"
    agent.reload_remote()
    assert agent.remote is None  # no config: off
    first, second = _free_port(), _free_port()
    _write_config(cfg, fleet, first)
    agent.reload_remote()
    assert _motd(fleet, first) == {"motd": "Welcome to Kiln!"}
    listening = agent.remote
    agent.reload_remote()  # a reload for another setting (updates): the listener stays
    assert agent.remote is listening
    _write_config(cfg, fleet, second)  # a new port: the old one closes, the new one serves
    agent.reload_remote()
    assert _motd(fleet, second) == {"motd": "Welcome to Kiln!"}
    with pytest.raises(ApiUnreachable):
        _motd(fleet, first)
    cfg.write_text("")  # switched off in settings.api.remote
    agent.reload_remote()
    assert agent.remote is None
    with pytest.raises(ApiUnreachable):
        _motd(fleet, second)


def test_a_listener_that_cannot_start_is_said_and_tried_again(
    agent: agent_mod.Agent, fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "api-remote.json"
    port = _free_port()
    with socket.socket() as squatter:  # the port is taken: the agent says so and keeps serving locally
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        _write_config(cfg, fleet, port)
        agent.reload_remote()
        assert agent.remote is None
        assert "kiln-agent: remote API not listening" in capsys.readouterr().err
    agent.reload_remote()  # the same config, tried again (the agent's loop does it every 5 s)
    assert _motd(fleet, port) == {"motd": "Welcome to Kiln!"}


def test_the_agent_starts_without_the_heavy_imports() -> None:
    """What only some boots or requests need (TUF and its HTTP stack for updates, Jinja2
    for a render) is imported when needed: never on every boot's way to ready."""
    code = ("import sys, kiln.host.agent.main; "
            "print(' '.join(m for m in ('tuf', 'securesystemslib', 'urllib3', 'jinja2', 'urllib.request') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at start: {out.stdout.strip()}"
