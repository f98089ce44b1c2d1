"""kiln-agent.service: the host's one long-lived Python process (Talos's machined, in spirit).

Every Kiln component that used to start its own interpreter runs here, each still in its
own package: the boot's settings pipeline (`boot.pipeline`), the local API and the mTLS
listener (`api.server`), update commands (`update.control.in_thread`), the health gate and
ready line (`boot.ready`), growing DATA (`boot.growdata`) and the update daemon
(`update.updater.Loop`). This module only wires them: the order, the threads, systemd.

The order of a boot:

    settings pipeline → READY=1 → API on the socket systemd holds → start kiln-ready.target
    → health gate, ready line → kiln-booted.target → update daemon, grow DATA

A crash loses nothing: systemd restarts the agent (the API socket stays open, so clients
wait), and each step is driven by state on disk: the pipeline's record in /run/kiln says
this boot's settings are applied, the gate's record says it ran, update commands are
reconciled from their status file, and the daemon keeps its state in /var/lib/kiln.
What must stay isolated still runs in its own process: migrations, restart commands,
containers and every tool (through kiln.core.run).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socketserver
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from kiln.core.fs import atomic_write
from kiln.host.agent.notify import notify
from kiln.host.boot import pipeline

if TYPE_CHECKING:  # the API is imported once the settings are applied, after READY=1
    from kiln.host.api import server
    from kiln.host.api.routes import Api

REMOTE_CONFIG = Path("/etc/kiln/api-remote.json")  # kiln.host.api.server.REMOTE_CONFIG
GATE_RECORD = Path("/run/kiln/gate.json")  # the gate ran this boot (and its outcome)
CONTAINERS_STOPPED = Path("/run/kiln/containers/stopped")  # kiln-containers.service's stop waits for it
READY_TARGET = "kiln-ready.target"
BOOTED_TARGET = "kiln-booted.target"
SYSTEMCTL = "/usr/bin/systemctl"
RETRY = 5.0  # seconds between attempts to bind the mTLS listener
RESTART_THREAD = 10.0  # seconds before a component thread that crashed starts again

log = logging.getLogger("kiln.agent")


class Agent:
    def __init__(self, *, remote_config: Path = REMOTE_CONFIG, remote_address: str | None = None,
                 timings: Path = pipeline.TIMINGS, gate_record: Path = GATE_RECORD) -> None:
        self.remote_config = remote_config
        self.remote_address = remote_address  # None: every address (tests: 127.0.0.1)
        self.timings = timings
        self.gate_record = gate_record
        self.api: Api | None = None
        self.local: server.LocalServer | None = None
        self.remote: server.RemoteServer | None = None
        self._remote_seen: str | None = None  # the config text the listener was (tried to be) made from
        self._remote_failed = False
        self.updater: Any = None  # kiln.host.update.updater.Loop, imported when configured
        self.containers: Any = None  # kiln.host.containers.supervise.Supervisor, once it runs
        self._stop_containers = threading.Event()  # SIGUSR2: kiln-containers.service stops
        self._sync_containers = threading.Event()  # SIGUSR1: container settings changed, or started again
        self._held = False  # the containers are stopped by SIGUSR2 until the next SIGUSR1
        self._gate_done = threading.Event()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._events = threading.Event()

    # --- signals (main thread): only flags, the loop does the work ----------------------
    def on_signal(self, sig: int, _frame: FrameType | None = None) -> None:
        """SIGTERM/SIGINT: stop; SIGHUP: settings.api.remote or .updates changed; SIGUSR1:
        container settings changed (or kiln-containers.service started); SIGUSR2:
        kiln-containers.service is stopping."""
        {signal.SIGHUP: self._reload, signal.SIGUSR1: self._sync_containers,
         signal.SIGUSR2: self._stop_containers}.get(signal.Signals(sig), self._stop).set()
        self._events.set()

    # --- the boot ------------------------------------------------------------------------
    def settings(self) -> str | None:
        """The settings pipeline, once per boot; why the host cannot be healthy, or None."""
        try:
            record = json.loads(self.timings.read_bytes())
        except (FileNotFoundError, ValueError):
            notify("STATUS=applying settings")
            return pipeline.boot(self.timings)
        print("kiln-agent: settings already applied this boot (restarted)", flush=True)
        return pipeline.problem(record)

    def gate(self, broken: str | None) -> None:
        """Start the ready target, then the health gate and the ready line, once per boot."""
        from kiln.core.run import run
        from kiln.host.boot import ready

        done = self.gate_record.exists()
        reached = False
        if not done:
            notify(f"STATUS=starting {READY_TARGET}")
            started = run([SYSTEMCTL, "start", READY_TARGET], check=False)
            reached = started.returncode == 0  # the job completed: the target is active
            if not reached:  # the gate says which unit; this is for the journal
                print(f"kiln-agent: {READY_TARGET}: {started.stderr.decode().strip()}", file=sys.stderr, flush=True)
        # After the bootstrap containers (they ran to completion in the ready target), as
        # Bottlerocket orders them; beside the health gate, which may wait for a workload.
        self.thread("containers", self._supervise, restart=True)
        if not done:
            notify("STATUS=health gate")
            try:
                ok = ready.boot_gate(broken, target_reached=reached)
            except Exception:  # a bug in the gate: the host is not ready, and the boot goes on
                traceback.print_exc()
                ok = False
            self.gate_record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.gate_record, json.dumps({"ready": ok}).encode() + b"\n")
        ok = bool(json.loads(self.gate_record.read_bytes()).get("ready"))
        run([SYSTEMCTL, "start", "--no-block", BOOTED_TARGET], check=False)
        notify("STATUS=ready" if ok else "STATUS=not ready (see the journal)")
        self._gate_done.set()
        self._events.set()  # the loop starts what waits for the gate
        if os.path.ismount("/local"):
            self.thread("grow-data", _grow_data)

    # --- components ----------------------------------------------------------------------
    def thread(self, name: str, target: Callable[[], object], restart: bool = False) -> None:
        """A component on a thread of its own; one that crashes is logged (and restarted
        after a pause when `restart`) instead of taking the whole agent down."""

        def body() -> None:
            while True:
                try:
                    target()
                    return
                except Exception:  # a bug in one component, reported with its stack
                    print(f"kiln-agent: {name} crashed", file=sys.stderr, flush=True)
                    traceback.print_exc()
                if not restart or self._stop.wait(RESTART_THREAD):
                    return

        threading.Thread(target=body, name=name, daemon=True).start()

    def _supervise(self) -> None:
        from kiln.host.containers.supervise import Supervisor

        # A SIGUSR1 from before it ran (kiln-containers.service's start at boot) is served
        # by its first reading of the settings, not by a second one.
        self._sync_containers.clear()
        self.containers = Supervisor()
        self.containers.serve_forever()  # returns at shutdown(); a crash is restarted

    def stop_containers(self) -> None:
        """kiln-containers.service is stopping (shutdown, before containerd; or by hand):
        every container stopped cleanly, workloads first, then the marker its stop waits for."""
        try:
            if self.containers is not None:
                for cid in self.containers.stop_all():
                    print(f"kiln-agent: stopped container {cid}", flush=True)
        finally:
            CONTAINERS_STOPPED.parent.mkdir(parents=True, exist_ok=True)
            CONTAINERS_STOPPED.touch()

    def serve(self, srv: socketserver.BaseServer, name: str) -> None:
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.5}, name=name, daemon=True).start()

    def reload_remote(self) -> None:
        """(Re)bind the mTLS listener when its rendered config changed, or a bind failed."""
        try:
            text = self.remote_config.read_text()
        except FileNotFoundError:
            text = ""
        if text == self._remote_seen and not self._remote_failed:
            return
        self._remote_seen, self._remote_failed = text, False
        old, self.remote = self.remote, None
        if old is not None:
            old.shutdown()
            old.socket.close()  # the port is free now; in-flight requests finish on their own
            threading.Thread(target=old.server_close, name="api-remote-drain", daemon=True).start()
        assert self.api is not None, "the API comes before its listeners"
        from kiln.host.api import server

        try:
            new = server.remote_server(self.api, self.remote_config, self.remote_address)
        except Exception as e:  # bad TLS material or a busy port: say it, try again
            print(f"kiln-agent: remote API not listening: {e}", file=sys.stderr, flush=True)
            self._remote_failed = True
            return
        if new is not None:
            self.remote = new
            self.serve(new, "api-remote")

    def reload_updater(self) -> None:
        from kiln.host.update import updater

        if self.updater is not None:
            self.updater.poke()
            return
        if not updater.configured():
            return
        try:
            self.updater = updater.make_loop(containers=lambda: self.containers)
        except Exception as e:  # KilnError: no machine id
            print(f"kiln-updater: {e}", file=sys.stderr, flush=True)
            return
        self.thread("updater", self.updater.run, restart=True)

    # --- the process ---------------------------------------------------------------------
    def run(self) -> int:
        broken = self.settings()
        # Ready as soon as the settings are rendered (what units after it need): the API's
        # imports overlap containerd and the ready target; clients wait on the socket.
        notify("READY=1", f"STATUS=waiting for {READY_TARGET}")
        from kiln.host.api import server
        from kiln.host.update.control import in_thread

        self.api = server.make_api(launch=in_thread)
        self.local = server.LocalServer(self.api, server.SOCKET, server.activated_fd())
        self.serve(self.local, "api-local")
        self.reload_remote()
        gc.freeze()  # start-up objects never die: keep them out of every collection (tail latency)
        self.thread("gate", lambda: self.gate(broken))
        updater_started = False
        while not self._stop.is_set():
            self._events.wait(RETRY if self._remote_failed else None)
            self._events.clear()
            if self._stop.is_set():
                break
            reload = self._reload.is_set()
            self._reload.clear()
            if reload or self._remote_failed:
                self.reload_remote()
            if self._gate_done.is_set() and (reload or not updater_started):
                updater_started = True
                self.reload_updater()
            if self._stop_containers.is_set():
                self._stop_containers.clear()
                self._held = True
                self.thread("containers-stop", self.stop_containers)
            if self._sync_containers.is_set() and self.containers is not None:
                self._sync_containers.clear()
                if self._held:  # kiln-containers.service started again
                    self._held = False
                    self.containers.undrain()
                self.containers.request_sync()
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        notify("STOPPING=1")
        if self.updater is not None:
            self.updater.stop()
        if self.containers is not None:
            self.containers.shutdown()  # the containers keep running: the next start adopts them
        if self.api is not None:
            self.api.close()
        for srv in (self.local, self.remote):
            if srv is not None:
                srv.shutdown()
                srv.server_close()


def _grow_data() -> None:
    from kiln.host.boot import growdata

    growdata.main()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    agent = Agent()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, agent.on_signal)
    return agent.run()
