"""A FleetLock v1 client (zincati's protocol): ask for a reboot slot, give it back.

Works with any FleetLock server (Kiln's `kiln fleet serve`, poseidon/fleetlock, airlock).
Only a 200 is a yes: a refusal, an error, a timeout or an unreachable server all mean
"do not reboot", told apart only so the daemon can say why. Kiln's extensions (`kiln`
in the body, `/v1/report`) are ignored by other servers; a server without `/v1/report`
answers 404, which the daemon takes as "not a Kiln server" and stops reporting to.
Stdlib only (it runs in the image).
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from kiln.core.errors import KilnError

TIMEOUT = 10.0  # seconds for one request, connect to answer


class LockError(KilnError):
    """The server did not grant the request: no reboot."""

    kind = "error"


class LockRefused(LockError):
    """The server answered and said no (semaphore full, bad request...)."""

    def __init__(self, status: int, kind: str, value: str) -> None:
        super().__init__(f"{kind}: {value}" if value else kind)
        self.status, self.kind, self.value = status, kind, value


class LockUnreachable(LockError):
    """No answer in time, a connection error, or a server error (5xx)."""

    kind = "unreachable"


@dataclass(frozen=True)
class FleetLockClient:
    url: str  # base URL: endpoints are {url}/v1/pre-reboot ...
    id: str
    group: str = "default"
    timeout: float = TIMEOUT
    ca: str | None = None  # PEM the server's certificate must chain to (https); None: the system's

    def _tls(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https://"):
            return None
        ctx = ssl.create_default_context(cadata=self.ca) if self.ca else ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def _post(self, endpoint: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"client_params": {"id": self.id, "group": self.group}, **(extra or {})}
        req = urllib.request.Request(
            f"{self.url.rstrip('/')}/v1/{endpoint}", data=json.dumps(body).encode(), method="POST",
            headers={"fleet-lock-protocol": "true", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._tls()) as r:  # validated settings
                data = r.read(64 * 1024)
        except urllib.error.HTTPError as e:
            doc = _json(e.read(64 * 1024))
            kind, value = str(doc.get("kind", f"http_{e.code}")), str(doc.get("value", e.reason))
            if e.code >= 500:
                raise LockUnreachable(f"{endpoint}: server error {e.code} ({kind}: {value})") from None
            raise LockRefused(e.code, kind, value) from None
        except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: a malformed answer
            raise LockUnreachable(f"{endpoint}: {getattr(e, 'reason', e)}") from None
        return _json(data)

    def pre_reboot(self, version: str | None = None, report: dict[str, Any] | None = None) -> dict[str, Any]:
        """RecursiveLock: returns when a slot is held, raises LockError otherwise. `report`
        (what the host runs, see `report`) rides along for a Kiln server."""
        kiln = {**(report or {}), **({"version": version} if version else {})}
        return self._post("pre-reboot", {"kiln": kiln} if kiln else None)

    def steady_state(self) -> dict[str, Any]:
        """UnlockIfHeld: succeeds also when nothing was held."""
        return self._post("steady-state")

    def report(self, version: str, failure: str | None, **more: str | None) -> dict[str, Any]:
        """Kiln extension: what this host runs, and why its update failed; `more` adds the
        slot, the daemon's state and the version being rolled out (for the fleet's view)."""
        return self._post("report", {"kiln": {"version": version, "failure": failure, **more}})


def _json(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}
