"""The fleet's only state store: an etcd cluster, through its v3 JSON gateway (etcd3gw).

Kiln keeps no state of its own on the fleet server: every change is a compare-and-swap
transaction on one key's `mod_revision`, so any number of `kiln fleet serve` processes
against one cluster are interchangeable. This module is the thin layer over etcd3gw the
rest uses: several endpoints tried in turn, one error for "etcd did not answer"
(quorum lost, member down, timeout) apart from a lost race, and the key's history by
revision (what the fault tests check the semaphore against).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kiln.core.errors import KilnError

DEFAULT_TIMEOUT = 3.0  # seconds per request: etcd without quorum holds writes until its own timeout


class EtcdUnavailable(KilnError):
    """No endpoint answered (network, member down, no quorum): retry later, change nothing."""


@dataclass(frozen=True)
class Tls:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Entry:
    value: bytes
    mod_revision: int  # 0: the key does not exist


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix` (etcd's convention)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def parse_endpoint(url: str) -> tuple[str, str, int]:
    """'http://127.0.0.1:2379' -> ('http', '127.0.0.1', 2379); KilnError naming the URL."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise KilnError(f"etcd endpoint '{url}' is not http(s)://HOST:PORT")
    try:
        port = parts.port or 2379
    except ValueError:
        raise KilnError(f"etcd endpoint '{url}' has a bad port") from None
    return parts.scheme, parts.hostname, port


def _session(tls: Tls) -> Any:
    """A requests session that takes nothing from the environment: requests lets
    REQUESTS_CA_BUNDLE override a session's own CA (so --etcd-ca would be ignored) and
    HTTP(S)_PROXY route loopback members through a proxy."""
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    session.trust_env = False
    # One server thread per FleetLock request: the default pool of 10 connections per
    # member would make most of them open a new connection to etcd under load.
    adapter = HTTPAdapter(pool_connections=8, pool_maxsize=128)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if tls.ca:
        session.verify = tls.ca
    if tls.cert:
        session.cert = (tls.cert, tls.key) if tls.key else tls.cert
    return session


class Etcd:
    """A client for one etcd cluster, failing over between its endpoints."""

    def __init__(self, endpoints: Sequence[str], *, tls: Tls | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        import etcd3gw

        if not endpoints:
            raise KilnError("no etcd endpoint given", hint="--etcd http://127.0.0.1:2379 (repeat for each member)")
        tls = tls or Tls()
        self.endpoints = list(endpoints)
        self._clients = []
        for url in self.endpoints:
            scheme, host, port = parse_endpoint(url)
            self._clients.append(etcd3gw.Etcd3Client(
                host=host, port=port, protocol=scheme, timeout=timeout, api_path="/v3/", session=_session(tls),
            ))
        self._preferred = 0
        self._lock = threading.Lock()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the first endpoint that answers, starting from the last one that did."""
        from etcd3gw import exceptions

        errors = []
        with self._lock:
            start = self._preferred
        for i in range(len(self._clients)):
            n = (start + i) % len(self._clients)
            client = self._clients[n]
            try:
                result: dict[str, Any] = client.post(client.get_url(path), json=body)
            except exceptions.Etcd3Exception as e:
                errors.append(f"{self.endpoints[n]}: {type(e).__name__} {e.detail_text or ''}".strip())
                continue
            except ValueError as e:  # a body that is not JSON
                errors.append(f"{self.endpoints[n]}: bad answer: {e}")
                continue
            with self._lock:
                self._preferred = n
            return result
        raise EtcdUnavailable("etcd did not answer: " + "; ".join(e[:200] for e in errors))

    def get(self, key: str, *, revision: int | None = None) -> Entry:
        body: dict[str, Any] = {"key": _b64(key)}
        if revision is not None:
            body["revision"] = revision
        kvs = self._post("/kv/range", body).get("kvs") or []
        if not kvs:
            return Entry(b"", 0)
        kv = kvs[0]
        return Entry(base64.b64decode(kv.get("value", "")), int(kv.get("mod_revision", 0)))

    def get_prefix(self, prefix: str) -> dict[str, Entry]:
        kvs = self._post("/kv/range", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}).get("kvs") or []
        return {
            base64.b64decode(kv["key"]).decode(): Entry(base64.b64decode(kv.get("value", "")), int(kv["mod_revision"]))
            for kv in kvs
        }

    def count_prefix(self, prefix: str) -> int:
        body = {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)), "count_only": True}
        return int(self._post("/kv/range", body).get("count", 0))

    def swap(self, key: str, value: bytes, mod_revision: int, *, lease: int | None = None) -> bool:
        """Write `value` if the key is still at `mod_revision` (0: does not exist yet).
        False when another writer came first: re-read and decide again."""
        compare = {"target": "MOD", "key": _b64(key), "result": "EQUAL", "mod_revision": mod_revision}
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            put["lease"] = lease
        result = self._post("/kv/txn", {"compare": [compare], "success": [{"request_put": put}]})
        return bool(result.get("succeeded", False))  # proto3 JSON leaves out a false

    def put(self, key: str, value: bytes, *, lease: int | None = None) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            body["lease"] = lease
        self._post("/kv/put", body)

    def delete(self, key: str) -> None:
        self._post("/kv/deleterange", {"key": _b64(key)})

    def grant(self, ttl: int) -> int:
        return int(self._post("/lease/grant", {"TTL": ttl})["ID"])

    def revision(self) -> int:
        header = self._post("/kv/range", {"key": _b64("\0"), "count_only": True}).get("header", {})
        return int(header.get("revision", 0))

    def history(self, key: str) -> list[tuple[int, bytes]]:
        """Every value the key has had, oldest first, as (mod_revision, value): read back
        revision by revision from etcd's own store (needs no compaction in between)."""
        out: list[tuple[int, bytes]] = []
        rev = self.revision()
        while rev > 0:
            entry = self.get(key, revision=rev)
            if entry.mod_revision == 0:
                break
            out.append((entry.mod_revision, entry.value))
            rev = entry.mod_revision - 1
        return out[::-1]

    def member_status(self) -> list[dict[str, Any]]:
        """Each endpoint's /maintenance/status, or its error: what `kiln fleet status` shows."""
        out = []
        for url, client in zip(self.endpoints, self._clients, strict=True):
            try:
                st = client.post(client.get_url("/maintenance/status"), json={})
                out.append({"endpoint": url, "ok": True, "leader": st.get("leader") == st.get("header", {}).get(
                    "member_id"), "version": st.get("version")})
            except Exception as e:  # any failure is a member that is not answering
                out.append({"endpoint": url, "ok": False, "error": type(e).__name__})
        return out
