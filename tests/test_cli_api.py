"""The host CLI (apiclient): `kiln --socket PATH settings|tx|raw|reboot ...` against a real server."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.host.cli import main as host_main
from tests.test_api import RESTART_DEFAULTS, ApiHost, running_api

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiHost]:
    with running_api(tmp_path_factory.mktemp("cli")) as host:
        yield host


@pytest.fixture
def host(running: ApiHost) -> ApiHost:
    running.reset()
    return running


class Run:
    """`kiln --socket SOCK ARGS...` → (exit code, stdout, stderr)."""

    def __init__(self, host: ApiHost, capsys: pytest.CaptureFixture[str]) -> None:
        self.host = host
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = host_main(["--socket", str(self.host.socket), *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> Any:
        code, out, err = self(*args, "--json")
        assert code == 0, err
        return json.loads(out)

    def live(self) -> Any:
        return self.host.client().request("GET", "/settings")


@pytest.fixture
def kiln(host: ApiHost, capsys: pytest.CaptureFixture[str]) -> Run:
    return Run(host, capsys)


# --- settings get ---------------------------------------------------------------------------------


def test_settings_get_human_and_json(kiln: Run) -> None:
    code, out, _ = kiln("settings", "get")
    assert code == 0
    lines = out.splitlines()
    assert 'settings.motd = "Welcome to Kiln!"' in lines
    assert 'settings.kernel.sysctl."net.ipv4.ip_forward" = "1"' in lines
    assert 'settings.ntp.time-servers = ["0.debian.pool.ntp.org", "1.debian.pool.ntp.org"]' in lines
    assert kiln.json("settings", "get") == kiln.live()


def test_settings_get_keys_and_prefix(kiln: Run) -> None:
    code, out, _ = kiln("settings", "get", "motd", 'settings.kernel.sysctl."net.ipv4.ip_forward"')
    assert code == 0
    assert out.splitlines() == ['settings.motd = "Welcome to Kiln!"',  # in the order asked for
                                'settings.kernel.sysctl."net.ipv4.ip_forward" = "1"']
    assert kiln.json("settings", "get", "--prefix", "settings.upd") == {
        "updates": {"ignore-waves": False, "version-lock": "latest", "strategy": "manual", "check-interval": "1h",
                    "max-boot-attempts": 3, "fleet-lock": {"group": "default"}}}
    code, out, _ = kiln("settings", "get", "network.hostname")
    assert (code, out) == (0, "")  # not set: nothing to show


def test_settings_get_bad_key_is_exit_1(kiln: Run) -> None:
    code, out, err = kiln("settings", "get", 'motd."x')
    assert code == 1 and out == ""
    assert "API refused (400)" in err and "unterminated quote" in err and "[at keys]" in err


# --- settings set ---------------------------------------------------------------------------------


def test_settings_set_commits_and_applies(kiln: Run, host: ApiHost) -> None:
    code, out, err = kiln("settings", "set", "motd=hi there", "updates.seed=42", "network.hostname=42")
    assert code == 0, err
    assert out.splitlines() == [
        "changed: settings.motd, settings.network.hostname, settings.updates.seed",
        "services: hostname, motd, updater",  # updates.*: the update daemon reads them again
        "written: /etc/hostname, /etc/hosts, /etc/motd, /etc/kiln/updater",
    ]
    live = kiln.live()
    assert live["updates"]["seed"] == 42 and live["network"]["hostname"] == "42"
    assert (host.render_root / "etc/motd").read_text() == "hi there\n"


def test_settings_set_json(kiln: Run) -> None:
    result = kiln.json("settings", "set", "motd=json")
    assert result == {"changed": ["settings.motd"], "apply": {"services": ["motd"], "written": ["/etc/motd"],
                                                              "removed": [], "restarted": [], "errors": [],
                                                              "failed_restarts": []}}


def test_settings_set_no_apply_and_tx(kiln: Run, host: ApiHost) -> None:
    code, out, _ = kiln("settings", "set", "--no-apply", "--tx", "later", "motd=pending")
    assert (code, out) == (0, "")
    assert kiln.live()["motd"] == "Welcome to Kiln!"
    assert kiln.json("tx", "show", "--tx", "later") == {"motd": "pending"}
    assert not any(host.render_root.rglob("*"))


@pytest.mark.parametrize(
    ("pair", "message"),
    [("motd", "'motd' is not KEY=VALUE"), ("updates.seed=9999", "settings.updates.seed"),
     ("no.such=1", "unknown setting")],
)
def test_settings_set_refused_is_exit_1(kiln: Run, host: ApiHost, pair: str, message: str) -> None:
    before = host.state()
    code, out, err = kiln("settings", "set", pair)
    assert code == 1 and out == "" and "API refused (400)" in err and message in err
    assert host.state() == before


# --- settings apply FILE -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("s.toml", '[settings]\nmotd = "from toml"\n[settings.network]\nhostname = "toml-host"\n'),
        ("bare.toml", 'motd = "from toml"\n[network]\nhostname = "toml-host"\n'),
        ("s.json", '{"settings": {"motd": "from toml", "network": {"hostname": "toml-host"}}}'),
        ("bare.json", '  {"motd": "from toml", "network": {"hostname": "toml-host"}}\n'),
    ],
)
def test_settings_apply_file(kiln: Run, host: ApiHost, tmp_path: Path, name: str, text: str) -> None:
    f = tmp_path / name
    f.write_text(text)
    code, out, err = kiln("settings", "apply", str(f))
    assert code == 0, err
    assert out.startswith("changed: settings.motd, settings.network.hostname\n")
    assert kiln.live()["network"] == {"hostname": "toml-host"}
    assert (host.render_root / "etc/hostname").read_text() == "toml-host\n"


def test_settings_apply_stdin(kiln: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('[settings.ntp]\ntime-servers = ["ntp.example"]\n'))
    result = kiln.json("settings", "apply", "-")
    assert result["changed"] == ["settings.ntp.time-servers"] and result["apply"]["services"] == ["ntp"]
    monkeypatch.setattr("sys.stdin", io.StringIO('{"motd": "stdin json"}'))
    code, _, _ = kiln("settings", "apply", "-", "--no-apply")
    assert code == 0 and kiln.json("tx", "show") == {"motd": "stdin json"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read settings file {f}"),
        ("motd = \n", "settings file {f}: not valid TOML or JSON"),
        ('{"motd": ', "settings file {f}: not valid TOML or JSON"),
        ("[settings]\nmotd = 5\n", "API refused (400): expected str, got int [at settings.motd]"),
        ("[settings]\nnope = 1\n", "unknown setting [at settings.nope]"),
    ],
)
def test_settings_apply_bad_file_is_exit_1(kiln: Run, host: ApiHost, tmp_path: Path, content: str | None,
                                           message: str) -> None:
    f = tmp_path / "bad.toml"
    if content is not None:
        f.write_text(content)
    before = host.state()
    code, out, err = kiln("settings", "apply", str(f))
    assert code == 1 and out == ""
    assert message.format(f=f) in err, err
    assert host.state() == before


# --- tx ---------------------------------------------------------------------------------------------------


def test_tx_commands_human(kiln: Run, host: ApiHost) -> None:
    kiln("settings", "set", "--no-apply", "motd=one", "network.hostname=h1")
    kiln("settings", "set", "--no-apply", "--tx", "other", "motd=two")
    assert kiln("tx", "list") == (0, "default\nother\n", "")
    assert kiln("tx", "show") == (0, 'settings.motd = "one"\nsettings.network.hostname = "h1"\n', "")
    assert kiln("tx", "commit") == (0, "settings.motd\nsettings.network.hostname\n", "")
    code, out, err = kiln("tx", "commit")
    assert code == 1 and "API refused (409)" in err and "nothing pending" in err
    assert kiln("tx", "discard", "--tx", "other") == (0, "", "")
    code, _, err = kiln("tx", "discard", "--tx", "other")
    assert code == 1 and "API refused (404)" in err
    code, out, _ = kiln("tx", "apply")
    services = "api-remote, api-remote-crl, containers, host-containers, hostname, lockdown, motd, ntp, sysctl, updater"
    assert code == 0 and out.startswith(f"changed: nothing\nservices: {services}\n")
    assert (host.render_root / "etc/hostname").read_text() == "h1\n"
    kiln("settings", "set", "--no-apply", "motd=three")
    code, out, _ = kiln("tx", "commit-and-apply")
    assert (code, out) == (0, "changed: settings.motd\nservices: motd\nwritten: /etc/motd\n")


def test_tx_commands_json(kiln: Run) -> None:
    kiln("settings", "set", "--no-apply", "--tx", "j", "motd=j")
    assert kiln.json("tx", "list") == ["j"]
    assert kiln.json("tx", "show", "--tx", "j") == {"motd": "j"}
    assert kiln.json("tx", "commit", "--tx", "j") == ["settings.motd"]
    assert kiln.json("tx", "apply")["services"] == [
        "api-remote", "api-remote-crl", "containers", "host-containers", "hostname", "lockdown", "motd", "ntp",
        "sysctl", "updater"]
    kiln("settings", "set", "--no-apply", "motd=k")
    assert kiln.json("tx", "commit-and-apply")["changed"] == ["settings.motd"]
    kiln("settings", "set", "--no-apply", "motd=l")
    assert kiln("tx", "discard", "--json") == (0, "", "")
    assert kiln.json("tx", "show") == {}


def test_tx_invalid_name_is_exit_1(kiln: Run) -> None:
    code, _, err = kiln("tx", "show", "--tx", "../x")
    assert code == 1 and "invalid transaction name" in err and "[at tx]" in err


def test_apply_failures_make_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "restarted"
    defaults = json.loads(json.dumps(RESTART_DEFAULTS).replace("RESTART_MOTD", f"/usr/bin/touch {marker}"))
    with running_api(tmp_path / "host", defaults=defaults, restart=True) as host:
        run = Run(host, capsys)
        code, out, err = run("tx", "apply")
        assert code == 1
        assert "restarted: motd" in out and "error: service 'broken'" in err
        code, out, err = run("settings", "set", "motd=fine")
        assert (code, err) == (0, "") and "restarted: motd" in out and marker.exists()


# --- raw, reboot, no server ------------------------------------------------------------------------------------


def test_raw(kiln: Run) -> None:
    code, out, _ = kiln("raw", "GET", "/settings?keys=motd")
    assert code == 0 and json.loads(out) == {"motd": "Welcome to Kiln!"}
    code, out, _ = kiln("raw", "patch", "settings", "--data", '{"motd": "raw"}')
    assert (code, out) == (0, "")
    assert kiln.json("tx", "show") == {"motd": "raw"}
    code, _, err = kiln("raw", "GET", "/nope")
    assert code == 1 and "API refused (404): no such endpoint: /nope" in err
    code, _, err = kiln("raw", "PATCH", "/settings", "--data", "{nope")
    assert code == 1 and "--data is not JSON" in err


def test_reboot(kiln: Run, host: ApiHost) -> None:
    assert kiln("reboot") == (0, "rebooting\n", "")
    assert kiln.json("reboot") == {"rebooting": True}


def test_no_server_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = host_main(["--socket", str(tmp_path / "none.sock"), "settings", "get"])
    err = capsys.readouterr().err
    assert code == 1 and f"cannot reach the Kiln API at {tmp_path / 'none.sock'}" in err
