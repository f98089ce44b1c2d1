"""The host agent killed with SIGKILL in the middle of its work, on a real guest: systemd
restarts it, the API answers again on the socket systemd kept, and what was cut off is
safe to redo (issue 14: a crash of the agent loses nothing)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kiln.repo import publish
from kiln.repo.serve import RepoServer
from kiln.vm.qemu import Vm, free_port
from tests.conftest import Images, UpdateRepo, raw_copy

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

KILL = "systemctl kill --signal=SIGKILL kiln-agent.service"


def _json(vm: Vm, command: str, timeout: float = 60) -> Any:
    return json.loads(vm.check(command, timeout=timeout))


def _agent_pid(vm: Vm) -> int:
    return int(vm.check("systemctl show -P MainPID kiln-agent.service").strip())


def _killed_and_back(vm: Vm) -> None:
    """SIGKILL the agent, then wait (bounded) for systemd's restart and the API's answer."""
    before = _agent_pid(vm)
    vm.check(KILL)
    vm.check(f"(for i in $(seq 120); do p=$(systemctl show -P MainPID kiln-agent.service); "
             f"[ \"$p\" != 0 ] && [ \"$p\" != {before} ] && "
             "[ $(systemctl show -P ActiveState kiln-agent.service) = active ] && exit 0; sleep 0.5; done; exit 1)",
             timeout=90)  # a subshell: `exit` must not end the debug shell
    # the socket stayed open: the first client waits for the new agent instead of failing
    assert _json(vm, "kiln settings get --json motd", timeout=120)["motd"]


def test_agent_killed_mid_prepare_and_mid_commit_loses_nothing(
    images: Images, update_repo: UpdateRepo, boot: Callable[..., Vm], tmp_path: Path
) -> None:
    v1, v2 = images.get("1.0.0"), images.get("2.0.0")
    repo = tmp_path / "repo"  # this test's own repository, signed with the session's keys
    shutil.copytree(update_repo.pristine, repo)
    publish.add(repo, v2.manifest.parent, waves="none")
    port = free_port()
    user_data = tmp_path / "user-data.toml"
    user_data.write_text(f"""
[settings.updates]
metadata-base-url = "http://10.0.2.2:{port}/metadata/"
targets-base-url = "http://10.0.2.2:{port}/targets/"
""")
    with RepoServer(repo, port=port):
        vm = boot(raw_copy(v1.disk, tmp_path / "disk.img"), overlay=False, cpus=2, user_data=user_data)
        assert vm.wait_ready(300).group(1, 3) == ("1.0.0", "A")
        assert "kiln-agent" in vm.wait_for(r"kiln: status (.*)\n", 30).group(1)

        # --- mid-prepare: the write into slot B is cut off by the kill
        assert _json(vm, "kiln update check --json", timeout=240)["update_state"] == "Available"
        vm.check("(kiln update apply > /tmp/apply.log 2>&1 &)")
        vm.check("(for i in $(seq 200); do kiln update status --json | "
                 "grep -q '\"cmd_type\": \"prepare\"' && exit 0; sleep 0.2; done; exit 1)", timeout=400)
        _killed_and_back(vm)
        st = _json(vm, "kiln update status --json")
        cmd = st["most_recent_command"]
        # cut off (reconciled from the status file) or, on a fast machine, already done
        assert (cmd["cmd_type"], cmd["cmd_status"]) in {("prepare", "Failed"), ("prepare", "Success"),
                                                       ("activate", "Success"), ("activate", "Failed")}, st
        if cmd["cmd_status"] == "Failed":
            assert "interrupted" in cmd["stderr"], st
        slots = _json(vm, "kiln slot status --json")
        assert slots["active"] == "A"
        assert st["update_state"] in ("Available", "Staged", "Ready"), st
        # the same command again finishes the job
        again = _json(vm, "kiln update apply --json", timeout=900)
        assert again["update_state"] == "Ready" and again["staged_version"] == "2.0.0", again
        assert _json(vm, "kiln slot status --json")["next"] == "B"

        # --- mid-commit: a settings change and a kill racing it; whatever won, the
        # datastore is whole, no transaction is left half-applied, and the change can be made
        vm.check("(kiln settings set motd=during-the-kill > /tmp/set.log 2>&1 &); sleep 0.3")
        _killed_and_back(vm)
        motd = _json(vm, "kiln settings get --json motd")["motd"]
        assert motd in ("Welcome to Kiln!", "during-the-kill"), motd
        vm.check("kiln settings set motd=after-the-kill", timeout=120)
        assert _json(vm, "kiln settings get --json motd")["motd"] == "after-the-kill"
        assert vm.check("cat /etc/motd").strip() == "after-the-kill"

        # --- the boot is not judged twice: one ready line, the gate's record kept
        assert vm.output.count("kiln: ready version=") == 1
        assert json.loads(vm.check("cat /run/kiln/gate.json")) == {"ready": True}
