#!/usr/bin/env python3
"""API latency: GET /settings and PATCH + commit_and_apply over the local Unix socket, 1 and 16 clients.

Two servers, each in its own process (as on a host, so the load generator and the server
do not share an interpreter lock), measured side by side in one run:

- kiln:  the real API server (kiln.host.api.server.LocalServer) over a datastore made the
  way the image makes it (the variant's defaults through storewolf, the launch commit),
  templates precompiled as in the image, files rendered under a temporary root and
  restart commands off (they would restart this machine's services);
- floor: a minimal stdlib server (ThreadingMixIn + UnixStreamServer + BaseHTTPRequestHandler,
  HTTP/1.1) answering every GET with a constant JSON document of the same size: the
  least any stdlib HTTP-over-Unix-socket server can cost.

The clients are threads using kiln's own `Client` (a new connection per request, like
`kiln settings get`). A write is what `kiln settings set` does: PATCH /settings/keypair,
then POST /tx/commit_and_apply, each client in its own transaction; a 423 (another apply
running) is retried after 1 ms and counted. Reported: p50/p99 latency and throughput per
workload and client count, kiln/floor ratios, the server's resident memory.
Target: GET p99 < 10 ms at 16 clients. Writes bench/results/api_latency.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _bench as B

from kiln.host.api.client import ApiRefused, Client

DEFAULTS = B.REPO / "variants/settings/defaults.toml"
TEMPLATES = B.REPO / "variants/settings/templates"
TARGET_GET_P99_MS = 10.0
STARTUP_TIMEOUT = 30.0


# ------------------------------------------------------------------ servers (child processes)
def serve_kiln(sock: Path, base: Path) -> None:
    from kiln.host.api.routes import Api
    from kiln.host.api.server import LocalServer, serve
    from kiln.host.datastore import Datastore
    from kiln.host.render.templates import Templates

    api = Api(
        Datastore(base / "datastore"),
        templates=Templates(TEMPLATES, compiled=base / "compiled"),
        render_root=base / "root",
        os_release_path=base / "os-release",
        restart=False,
    )
    serve(LocalServer(api, sock))


def serve_floor(sock: Path, body: bytes) -> None:
    import socketserver
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True
        request_queue_size = socket.SOMAXCONN

    server = Server(str(sock), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    server.serve_forever(poll_interval=0.5)


def prepare_store(base: Path) -> bytes:
    """The datastore and precompiled templates the kiln server uses; returns GET /settings' body."""
    from kiln.build.settings import merge_defaults
    from kiln.host.boot import storewolf
    from kiln.host.render.templates import compile_all

    doc = base / "defaults.json"
    doc.write_text(json.dumps(merge_defaults((DEFAULTS,))))
    store = storewolf.run(base / "datastore", doc, "1.0.0")
    store.commit("kiln-launch")
    compile_all(TEMPLATES, base / "compiled")
    (base / "root").mkdir()
    (base / "os-release").write_text('NAME="Kiln"\nVERSION_ID=1.0.0\n')
    return json.dumps(store.live()).encode() + b"\n"


class Child:
    """A server subprocess of this script, stopped with SIGTERM (then SIGKILL) by its pid."""

    def __init__(self, argv: list[str], sock: Path) -> None:
        self.sock = sock
        self.proc = subprocess.Popen([sys.executable, __file__, *argv], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"server {argv} did not start listening on {sock}") from None
                time.sleep(0.02)

    def rss_kib(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ------------------------------------------------------------------ load
def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def run_load(op: Callable[[Client, int, int], int], sock: Path, clients: int, per_client: int,
             warmup: int) -> dict[str, Any]:
    """`clients` threads each run `op` per_client times (after `warmup` untimed ones)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    retries = [0] * clients
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        c = Client.local(sock, timeout=30)
        try:
            for n in range(warmup):
                op(c, i, -1 - n)
            barrier.wait()
            for n in range(per_client):
                t0 = time.perf_counter()
                retries[i] += op(c, i, n)
                latencies[i].append(time.perf_counter() - t0)
        except Exception as e:  # reported, not raised: a benchmark never dies half-way
            errors.append(f"client {i}: {e}")
            if not barrier.broken:
                barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = sorted(x for lat in latencies for x in lat)
    if not flat:
        return {"clients": clients, "ops": 0, "errors": errors}
    return {
        "clients": clients,
        "ops": len(flat),
        "p50_ms": round(percentile(flat, 50) * 1000, 3),
        "p99_ms": round(percentile(flat, 99) * 1000, 3),
        "max_ms": round(flat[-1] * 1000, 3),
        "mean_ms": round(sum(flat) / len(flat) * 1000, 3),
        "ops_per_s": round(len(flat) / wall, 1),
        "wall_s": round(wall, 3),
        "retries_423": sum(retries),
        "errors": errors,
    }


def measure(child: Child, op: Callable[[Client, int, int], int], clients: int, per_client: int,
            warmup: int) -> dict[str, Any]:
    """run_load plus the server's CPU time per operation (robust to a busy machine, unlike latency)."""
    cpu0 = child.cpu_seconds()
    r = run_load(op, child.sock, clients, per_client, warmup)
    ops = r["ops"] + clients * warmup
    r["server_cpu_us_per_op"] = round((child.cpu_seconds() - cpu0) / ops * 1e6) if ops else None
    return r


def get_settings(c: Client, _i: int, _n: int) -> int:
    c.request("GET", "/settings")
    return 0


def patch_commit_apply(c: Client, i: int, n: int) -> int:
    """PATCH /settings/keypair + POST /tx/commit_and_apply in transaction bench<i>; returns 423 retries."""
    tx = f"bench{i}"
    c.request("PATCH", f"/settings/keypair?tx={tx}", {"request_payload": [f"motd=client {i} write {n}"]})
    retries = 0
    while True:
        try:
            c.request("POST", f"/tx/commit_and_apply?tx={tx}")
            return retries
        except ApiRefused as e:
            if e.status != 423 or retries >= 10_000:
                raise
            retries += 1
            time.sleep(0.001)


# ------------------------------------------------------------------ report
def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"


def report(result: dict[str, Any]) -> str:
    rows = []
    for r in result["runs"]:
        floor = next((f for f in result["runs"] if f["server"] == "floor" and f["workload"] == r["workload"]
                      and f["clients"] == r["clients"]), None) if r["server"] == "kiln" else None
        ratio = "-" if floor is None else f"{r['p99_ms'] / floor['p99_ms']:.1f}x"
        rows.append([
            f"{r['server']} {r['workload']}", str(r["clients"]), str(r["ops"]), fmt_ms(r.get("p50_ms")),
            fmt_ms(r.get("p99_ms")), f"{r.get('ops_per_s', 0):.0f}/s", ratio,
            "-" if r.get("server_cpu_us_per_op") is None else f"{r['server_cpu_us_per_op']} us",
            str(r.get("retries_423", 0)), str(len(r.get("errors", []))),
        ])
    head = ["", "clients", "ops", "p50", "p99", "throughput", "p99/floor", "server CPU/op", "423s", "errors"]
    t = result["target"]
    verdict = "ok" if t["met"] else "MISSED"
    lines = [
        "API latency over the local Unix socket (new connection per request; a write = PATCH keypair + "
        "commit_and_apply)",
        "",
        B.table(rows, head),
        "",
        f"target: GET /settings p99 at 16 clients < {t['get_p99_ms_max']:.0f} ms: {fmt_ms(t['get_p99_ms_16'])} "
        f"-> {verdict}",
        f"server resident memory after the run: kiln {result['rss_kib'].get('kiln')} KiB, "
        f"floor {result['rss_kib'].get('floor')} KiB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--serve"]:  # child mode: --serve kiln SOCK BASE | --serve floor SOCK BODYFILE
        kind, sock, extra = args_in[1], Path(args_in[2]), Path(args_in[3])
        if kind == "kiln":
            serve_kiln(sock, extra)
        else:
            serve_floor(sock, extra.read_bytes())
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--clients", default="1,16", help="concurrent client counts (default 1,16)")
    ap.add_argument("--gets", type=int, default=4000, help="GET requests per client count (default 4000)")
    ap.add_argument("--writes", type=int, default=400, help="writes per client count (default 400)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args(args_in)
    counts = [int(x) for x in args.clients.split(",")]
    info = B.machine()
    t0 = time.monotonic()
    runs: list[dict[str, Any]] = []
    rss: dict[str, int | None] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-api-") as tmp:
        base = Path(tmp)
        body = prepare_store(base)
        (base / "floor.json").write_bytes(body)
        servers = {
            "kiln": Child(["--serve", "kiln", str(base / "kiln.sock"), str(base)], base / "kiln.sock"),
            "floor": Child(["--serve", "floor", str(base / "floor.sock"), str(base / "floor.json")],
                           base / "floor.sock"),
        }
        try:
            for name, child in servers.items():  # the first requests after a start are slow: not measured
                B.log(f"warm-up: {name}")
                run_load(get_settings, child.sock, 1, 300, warmup=0)
            for clients in counts:
                per = max(1, args.gets // clients)
                for name in ("floor", "kiln"):  # side by side, each after 50 untimed requests per client
                    B.log(f"GET /settings: {name}, {clients} clients x {per}")
                    r = measure(servers[name], get_settings, clients, per, warmup=50)
                    runs.append({"server": name, "workload": "GET /settings", **r})
            for clients in counts:
                per = max(1, args.writes // clients)
                B.log(f"PATCH + commit_and_apply: kiln, {clients} clients x {per}")
                r = measure(servers["kiln"], patch_commit_apply, clients, per, warmup=3)
                runs.append({"server": "kiln", "workload": "PATCH+commit+apply", **r})
            rss = {name: child.rss_kib() for name, child in servers.items()}
        finally:
            for child in servers.values():
                child.stop()
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    get16 = next((r for r in runs if r["server"] == "kiln" and r["workload"] == "GET /settings"
                  and r["clients"] == 16), None)
    p99_16 = get16.get("p99_ms") if get16 else None
    result = {
        "benchmark": "api_latency",
        "machine": info,
        "wall_seconds": round(time.monotonic() - t0, 1),
        "settings_body_bytes": len(body),
        "target": {"get_p99_ms_max": TARGET_GET_P99_MS, "get_p99_ms_16": p99_16,
                   "met": p99_16 is not None and p99_16 < TARGET_GET_P99_MS},
        "rss_kib": rss,
        "runs": runs,
    }
    B.emit("api_latency", result, report(result), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
