"""A private container registry for tests and labs: Debian's `docker-registry` (the CNCF
distribution registry) on 127.0.0.1, storing under a directory of our choosing.

`with LocalRegistry(DIR) as reg:` writes `DIR/config.yml`, starts `docker-registry serve`
in its own process group (so stopping it can never touch anything else), waits until
`GET /v2/` answers, and stops exactly that process group on exit. Plain HTTP only: clients
push with `--plain-http` (skopeo: `--tls-verify=false`, ctr: `--plain-http`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from kiln.core.errors import KilnError
from kiln.core.run import which
from kiln.vm.qemu import end_process_group, free_port

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class LocalRegistry:
    """`docker-registry` serving `root/data` at http://host:port (port 0: a free one).

    `htpasswd` turns on Basic authentication against that file (bcrypt hashes). `extra`
    adds to the registry's configuration, section by section (token `auth`, read-only
    `storage.maintenance`: what tests need).
    """

    def __init__(
        self, root: Path, host: str = "127.0.0.1", port: int = 0, htpasswd: Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.host = host
        self._fixed_port = port
        self.port = port
        self.htpasswd = Path(htpasswd).absolute() if htpasswd is not None else None
        self.extra = dict(extra or {})
        self.config = self.root / "config.yml"
        self.log = self.root / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def _write_config(self) -> None:
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}, "delete": {"enabled": True}},
            # Our own upload-state secret: without one the registry makes one up and warns.
            "http": {"addr": self.address, "secret": os.urandom(16).hex()},
        }
        if self.htpasswd is not None:
            if not self.htpasswd.is_file():
                raise KilnError(f"htpasswd file {self.htpasswd} does not exist")
            config["auth"] = {"htpasswd": {"realm": "kiln-registry", "path": str(self.htpasswd)}}
        for key, value in self.extra.items():
            base = config.get(key)
            config[key] = {**base, **value} if isinstance(base, dict) and isinstance(value, Mapping) else value
        self.config.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=1)
        try:
            conn.request("GET", "/v2/")
            conn.getresponse()  # any answer will do: 401 with auth, 400 from a TLS port
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def start(self) -> LocalRegistry:
        exe = which("docker-registry")
        self.root.mkdir(parents=True, exist_ok=True)
        # A port chosen here can be taken before the registry binds it: try another one.
        for _attempt in range(3 if self._fixed_port == 0 else 1):
            self.port = self._fixed_port or free_port()
            self._write_config()
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    [exe, "serve", str(self.config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True,
                )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._answers():
                    return self
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.stop()
                raise KilnError(f"docker-registry did not answer on {self.address} within {START_TIMEOUT:g} s",
                                hint=f"see {self.log}")
        tail = "\n".join(self.log.read_text(errors="replace").strip().splitlines()[-5:])
        self.proc = None
        raise KilnError(f"docker-registry exited at start on {self.address}:\n{tail}", hint=f"see {self.log}")

    def wait(self) -> int:
        """Block until the registry exits (for `kiln registry serve`); returns its status."""
        if self.proc is None:
            return 0
        return self.proc.wait()

    def stop(self) -> None:
        """SIGTERM the registry's own process group, SIGKILL it if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT)
        end_process_group(proc)

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
