"""The settings boot pipeline: storewolf (defaults), sundog (generators), user data providers."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import shlex
import socket
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

from kiln.build.settings import merge_defaults
from kiln.host.boot import storewolf, sundog, userdata
from kiln.host.datastore import LAUNCH_TX, Datastore
from kiln.host.render.templates import Templates
from kiln.host.settings import definitions

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Templates(ROOT / "variants/settings/templates", compiled=None)
REAL_DEFAULTS = ROOT / "variants/settings/defaults.toml"

# -- storewolf --------------------------------------------------------------------------------


def defaults_json(tmp_path: Path, doc: dict[str, Any], name: str = "defaults.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_storewolf_first_boot_puts_the_defaults_in_the_launch_transaction(tmp_path: Path) -> None:
    doc = merge_defaults((REAL_DEFAULTS,))
    store = storewolf.run(tmp_path / "ds", defaults_json(tmp_path, doc), "1.0.0")
    assert os.readlink(tmp_path / "ds/current") == "v1.0.0"
    assert store.live() == {}
    assert store.transactions() == [LAUNCH_TX]
    assert store.pending(LAUNCH_TX) == doc["settings"]
    assert store.definitions() == definitions.from_defaults(doc)
    assert store.commit(LAUNCH_TX)
    assert store.live() == doc["settings"]


def test_storewolf_never_overwrites_live_values_and_drops_stale_transactions(tmp_path: Path) -> None:
    doc = merge_defaults((REAL_DEFAULTS,))
    store = storewolf.run(tmp_path / "ds", defaults_json(tmp_path, doc), "1.0.0")
    store.commit(LAUNCH_TX)
    store.patch({"motd": "mine", "kernel": {"sysctl": {"net.ipv4.ip_forward": "0"}}})
    store.commit()
    store.patch({"network": {"hostname": "left-over"}})  # a user's uncommitted change
    store.patch({"motd": "stale launch"}, LAUNCH_TX)

    # The next image changes defaults and adds some.
    new = json.loads(json.dumps(doc))
    new["settings"]["motd"] = "A newer welcome"
    new["settings"]["kernel"]["sysctl"]["net.ipv4.ip_forward"] = "1"
    new["settings"]["kernel"]["sysctl"]["vm.max_map_count"] = "262144"
    new["settings"]["updates"]["seed"] = 7
    new["metadata"]["settings"]["motd"]["affected-services"] = ["motd", "hostname"]
    store = storewolf.run(tmp_path / "ds", defaults_json(tmp_path, new, "new.json"), "2.0.0")

    assert os.readlink(tmp_path / "ds/current") == "v1.0.0", "the store keeps its version (migrations move it)"
    assert store.transactions() == [LAUNCH_TX]
    assert store.pending(LAUNCH_TX) == {"kernel": {"sysctl": {"vm.max_map_count": "262144"}}, "updates": {"seed": 7}}
    assert store.definitions() == definitions.from_defaults(new), "the image's definitions replace the old ones"
    store.commit(LAUNCH_TX)
    live = store.live()
    assert live["motd"] == "mine"
    assert live["kernel"]["sysctl"] == {
        "net.ipv4.ip_forward": "0", "net.ipv4.conf.all.rp_filter": "1", "vm.max_map_count": "262144"}
    assert "network" not in live

    # A third boot with nothing new leaves no launch transaction at all.
    store = storewolf.run(tmp_path / "ds", defaults_json(tmp_path, new, "new.json"), "2.0.0")
    assert store.transactions() == []


def test_missing_defaults() -> None:
    defaults = {"motd": "d", "ntp": {"time-servers": ["a"]}, "kernel": {"sysctl": {"a": "1", "b": "2"}}}
    assert storewolf.missing_defaults(defaults, {}) == defaults
    assert storewolf.missing_defaults(defaults, defaults) == {}
    live = {"motd": "", "ntp": {"time-servers": []}, "kernel": {"sysctl": {"b": "9"}}}
    assert storewolf.missing_defaults(defaults, live) == {"kernel": {"sysctl": {"a": "1"}}}
    # a leaf above a default's path counts as populated: nothing is put beneath it
    assert storewolf.missing_defaults({"a": {"b": 1}}, {"a": "set"}) == {}


# Upper bound for the steps that must stop at their deadline (0.5-2 s here): ~60 times the
# idle time, so a busy machine passes, yet far below what each would take without its
# deadline (an hour's sleep, an endless retry, an 8-hour trickle).
BOUND = 60


# -- sundog -----------------------------------------------------------------------------------


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def generators(tmp_path: Path) -> tuple[Datastore, Path]:
    ran = tmp_path / "ran"
    log = f">> {shlex.quote(str(ran))}"
    gens = {
        "motd": script(tmp_path, "ok", f'echo motd {log}; echo \'"generated motd"\''),
        "network.hostname": script(tmp_path, "skip", f"echo hostname {log}; exit 2"),
        "updates.seed": script(tmp_path, "fail", f"echo seed {log}; echo boom >&2; exit 1"),
        "ntp.time-servers": script(tmp_path, "hang", f"echo ntp {log}; exec sleep 3600"),
        "kernel.lockdown": script(tmp_path, "live", f"echo lockdown {log}; echo '\"integrity\"'"),
        "updates.version-lock": script(tmp_path, "pending", f"echo version-lock {log}; echo '\"v9.9.9\"'"),
        "updates.metadata-base-url": script(tmp_path, "notjson", "echo not json"),
        "updates.targets-base-url": script(tmp_path, "invalid", "echo '\"ftp://nope\"'"),
    }
    metadata: dict[str, Any] = {}
    for key, command in gens.items():
        node = metadata
        for seg in key.split("."):
            node = node.setdefault(seg, {})
        node["setting-generator"] = command
    store = Datastore.create(tmp_path / "ds", "1.0.0")
    store.set_definitions(definitions.from_defaults({"metadata": {"settings": metadata}}))
    store.patch({"kernel": {"lockdown": "none"}})
    store.commit()
    store.patch({"updates": {"version-lock": "latest"}}, LAUNCH_TX)
    return store, ran


def test_sundog(generators: tuple[Datastore, Path], capsys: pytest.CaptureFixture[str]) -> None:
    store, ran = generators
    start = time.monotonic()
    report = sundog.run(store, timeout=0.5)
    # The hanging generator sleeps an hour: done within a minute means its 0.5 s timeout
    # stopped it (a generous bound: ~1 s idle, far more on a busy machine).
    assert time.monotonic() - start < BOUND
    assert report["settings.motd"] == "generated"
    assert report["settings.network.hostname"] == "skipped"
    assert report["settings.updates.seed"] == "failed: exit 1: boom"
    assert report["settings.ntp.time-servers"].startswith("failed: ")
    assert "timed out" in report["settings.ntp.time-servers"]
    assert report["settings.kernel.lockdown"] == "populated"
    assert report["settings.updates.version-lock"] == "populated"
    assert report["settings.updates.metadata-base-url"].startswith("failed: ")
    assert report["settings.updates.targets-base-url"] == (
        "failed: settings.updates.targets-base-url: expected an http:// or https:// URL")
    assert len(report) == 8
    assert sorted(ran.read_text().split()) == ["hostname", "motd", "ntp", "seed"], "populated keys are not generated"
    assert store.pending(LAUNCH_TX) == {"updates": {"version-lock": "latest"}, "motd": "generated motd"}
    assert store.live() == {"kernel": {"lockdown": "none"}}
    assert "setting generator for settings.updates.seed failed: exit 1: boom" in capsys.readouterr().err

    # A second run generates nothing that is set now.
    ran.unlink()
    report = sundog.run(store, timeout=0.5)
    assert report["settings.motd"] == "populated"
    assert "motd" not in ran.read_text().split()


def test_the_real_generators(tmp_path: Path) -> None:
    """The default variant's generators (shell one-liners): a seed in 0..2047, kiln-<machine id>."""
    doc = tomllib.loads((ROOT / "variants/settings/defaults.toml").read_text())
    store = Datastore.create(tmp_path / "ds", "1.0.0")
    store.set_definitions(definitions.from_defaults({"metadata": doc["metadata"]}))
    report = sundog.run(store)
    assert report["settings.updates.seed"] == "generated"
    pending = store.pending(LAUNCH_TX)
    assert 0 <= pending["updates"]["seed"] <= 2047
    machine_id = Path("/etc/machine-id").read_text().strip()
    assert report["settings.network.hostname"] == "generated"
    assert pending["network"]["hostname"] == f"kiln-{machine_id[:8]}"
    seeds = {sundog.generate(store.raw_definitions()["setting-generators"]["settings.updates.seed"])
             for _ in range(40)}
    assert len(seeds) > 20 and all(0 <= s <= 2047 for s in seeds)


# -- user data: parsing ---------------------------------------------------------------------------


def test_parse_user_data() -> None:
    text = b'[settings]\nmotd = "hi"\n[settings.kernel.sysctl]\n"net.ipv4.ip_forward" = "0"\n'
    want = {"motd": "hi", "kernel": {"sysctl": {"net.ipv4.ip_forward": "0"}}}
    assert userdata.parse(text, "src") == want
    assert userdata.parse(gzip.compress(text), "src") == want
    assert userdata.parse(b"", "src") == {}
    assert userdata.parse(b"# only a comment\n", "src") == {}


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'[settings]\nmotd = "unterminated\n', "src: not valid TOML: "),
        (b'[settings]\nmotd = "a"\nmotd = "b"\n', "(at line 3"),
        (b"\xff\xfe[settings]\n", "src: not valid TOML: "),
        (b"\x1f\x8b\x08\x00broken", "src: not valid gzip: "),
        (b'[network]\nhostname = "x"\n', "src: 'network' is outside [settings]"),
        (b'motd = "x"\n', "src: 'motd' is outside [settings]"),
        (b'[settings.network]\nhostname = "bad_name"\n', "src: settings.network.hostname: expected a hostname"),
        (b'[settings]\nbogus = 1\n', "src: settings.bogus: unknown setting"),
        (b'[settings.kernel.sysctl]\n"a.b" = 1\n', 'src: settings.kernel.sysctl."a.b": expected str, got int'),
        (gzip.compress(b'[settings.updates]\nseed = 9999\n'), "src: settings.updates.seed: expected int <= 2047"),
    ],
)
def test_parse_errors_name_the_key_or_line(raw: bytes, why: str) -> None:
    with pytest.raises(userdata.Rejected) as e:
        userdata.parse(raw, "src")
    assert why in str(e.value)
    assert str(e.value).startswith("src: ")


# -- user data: providers ------------------------------------------------------------------------


def fat_image(path: Path, label: str, files: dict[str, bytes]) -> Path:
    subprocess.run(["mkfs.vfat", "-n", label, "-C", str(path), "1024"], check=True, capture_output=True)
    for name, content in files.items():
        src = path.with_name(path.name + "." + name)
        src.write_bytes(content)
        subprocess.run(["mcopy", "-i", str(path), str(src), f"::{name}"], check=True, capture_output=True,
                       env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    return path


def block_devices(tmp_path: Path, devices: dict[str, Path | bytes | None]) -> tuple[Path, Path]:
    """A fake /sys/class/block and /dev: each device's node is the image file (None: no node)."""
    sys_block, dev = tmp_path / "sys-class-block", tmp_path / "dev"
    sys_block.mkdir()
    dev.mkdir()
    for name, image in devices.items():
        (sys_block / name).mkdir()
        if isinstance(image, Path):
            os.link(image, dev / name)
        elif isinstance(image, bytes):
            (dev / name).write_bytes(image)
    return sys_block, dev


def test_config_drive_is_found_by_label(tmp_path: Path) -> None:
    drive = fat_image(tmp_path / "cidata.img", "CIDATA", {"user-data.toml": b'[settings]\nmotd = "drive"\n'})
    other = fat_image(tmp_path / "other.img", "OTHER", {"user-data.toml": b'[settings]\nmotd = "other"\n'})
    sys_block, dev = block_devices(tmp_path, {
        "sda": b"\0" * 65536,  # not a filesystem
        "sdb": other,  # a FAT volume with another label
        "sdc": None,  # no device node
        "vdb": drive,
        "vdc": b"\0" * 512,
    })
    found = userdata.config_drive(sys_block, dev)
    assert found is not None
    assert found.data == b'[settings]\nmotd = "drive"\n'
    assert "config drive" in found.source and str(dev / "vdb") in found.source and "CIDATA" in found.source


def test_config_drive_without_user_data(tmp_path: Path) -> None:
    drive = fat_image(tmp_path / "cidata.img", "cidata", {"README": b"nothing here\n"})
    sys_block, dev = block_devices(tmp_path, {"vdb": drive})
    with pytest.raises(userdata.Rejected, match=r"no user-data\.toml or user-data on it"):
        userdata.config_drive(sys_block, dev)
    # and the plain `user-data` name is read too
    drive2 = fat_image(tmp_path / "cidata2.img", "CIDATA", {"user-data": b'[settings]\nmotd = "plain"\n'})
    (tmp_path / "second").mkdir()
    sys_block2, dev2 = block_devices(tmp_path / "second", {"vdb": drive2})
    found = userdata.config_drive(sys_block2, dev2)
    assert found is not None and found.data == b'[settings]\nmotd = "plain"\n'


def test_no_config_drive(tmp_path: Path) -> None:
    assert userdata.config_drive(tmp_path / "no-such-dir", tmp_path) is None
    sys_block, dev = block_devices(tmp_path, {"sda": b"\0" * 4096})
    assert userdata.config_drive(sys_block, dev) is None


def test_config_drive_iso9660(tmp_path: Path) -> None:
    """Clouds attach user data as a CD; ISO 9660 labels may be longer than vfat's 11 characters."""
    content = tmp_path / "content"
    content.mkdir()
    (content / "user-data.toml").write_bytes(b'[settings]\nmotd = "from a cd"\n')
    image = tmp_path / "cd.iso"
    subprocess.run(["genisoimage", "-quiet", "-r", "-V", "KILN-USERDATA", "-o", str(image), str(content)],
                   check=True, capture_output=True)
    sys_block, dev = block_devices(tmp_path, {"sr0": image})
    found = userdata.config_drive(sys_block, dev)
    assert found is not None and found.data == b'[settings]\nmotd = "from a cd"\n'


def test_local_file(tmp_path: Path) -> None:
    assert userdata.local_file(tmp_path / "absent.toml") is None
    path = tmp_path / "user-data.toml"
    path.write_bytes(b"x" * (userdata.MAX_SIZE + 100))
    found = userdata.local_file(path)
    assert found is not None and len(found.data) == userdata.MAX_SIZE + 1, "reads one byte more than allowed"


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, bytes]]] = {}

    def do_GET(self) -> None:
        status, body = self.routes.get(self.path, (404, b"not found"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, tuple[int, bytes]]]]:
    routes: dict[str, tuple[int, bytes]] = {}
    handler = type("Handler", (_Handler,), {"routes": routes})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", routes
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_http_provider(server: tuple[str, dict[str, tuple[int, bytes]]]) -> None:
    base, routes = server
    routes["/ud"] = (200, b'[settings]\nmotd = "http"\n')
    routes["/broken"] = (500, b"oops")
    found = userdata.http(f"{base}/ud", deadline=2)
    assert found is not None and found.data == b'[settings]\nmotd = "http"\n' and found.source == f"{base}/ud"
    assert userdata.http(f"{base}/missing", deadline=2) is None

    start = time.monotonic()
    with pytest.raises(userdata.Unreachable, match=r"/broken for 1 s \(HTTP 500\); trying again next boot"):
        userdata.http(f"{base}/broken", deadline=1)
    assert time.monotonic() - start < BOUND  # it retries until its deadline, then stops (not for ever)


def test_http_provider_unreachable_gives_up_after_the_deadline() -> None:
    url = f"http://127.0.0.1:{closed_port()}/user-data"
    start = time.monotonic()
    with pytest.raises(userdata.Unreachable, match=r"/user-data for 1 s .*Connection refused"):
        userdata.http(url, deadline=1)
    elapsed = time.monotonic() - start
    assert 1 <= elapsed < BOUND, elapsed  # tried for the whole deadline, then gave up


def test_collect_precedence_local_then_drive_then_http(
    tmp_path: Path, server: tuple[str, dict[str, tuple[int, bytes]]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, routes = server
    local = tmp_path / "user-data.toml"
    local.write_text('[settings]\nmotd = "local"\n[settings.network]\nhostname = "local-host"\n'
                     '[settings.ntp]\ntime-servers = ["local.ntp"]\n')
    drive = fat_image(tmp_path / "cidata.img", "CIDATA", {"user-data.toml": gzip.compress(
        b'[settings]\nmotd = "drive"\n[settings.network]\nhostname = "drive-host"\n')})
    sys_block, dev = block_devices(tmp_path, {"vdb": drive})
    routes["/ud"] = (200, b'[settings]\nmotd = "http"\n[settings.kernel.sysctl]\n"a.b" = "1"\n')

    store = storewolf.run(tmp_path / "ds", defaults_json(tmp_path, merge_defaults((REAL_DEFAULTS,))), "1.0.0")
    report = userdata.collect([
        ("local-file", lambda: userdata.local_file(local)),
        ("config-drive", lambda: userdata.config_drive(sys_block, dev)),
        ("http", lambda: userdata.http(f"{base}/ud", deadline=2)),
        ("http-none", lambda: userdata.http(f"{base}/nothing", deadline=2)),
    ], store)
    assert report["local-file"] == f"applied from {local}"
    assert report["config-drive"].startswith(f"applied from config drive {dev / 'vdb'}")
    assert report["http"] == f"applied from {base}/ud"
    assert report["http-none"] == "none"
    pending = store.pending(LAUNCH_TX)
    assert pending["motd"] == "http"
    assert pending["network"] == {"hostname": "drive-host"}
    assert pending["ntp"] == {"time-servers": ["local.ntp"]}
    assert pending["kernel"]["sysctl"]["a.b"] == "1"
    assert pending["kernel"]["sysctl"]["net.ipv4.ip_forward"] == "1", "defaults stay under user data"
    assert store.live() == {}
    assert "kiln: user data applied from" in capsys.readouterr().err


def test_an_invalid_provider_is_rejected_whole(
    tmp_path: Path, server: tuple[str, dict[str, tuple[int, bytes]]], capsys: pytest.CaptureFixture[str]
) -> None:
    base, routes = server
    local = tmp_path / "user-data.toml"
    local.write_text('[settings]\nmotd = "local"\n')
    # valid hostname, invalid seed: none of the drive's settings apply
    drive = fat_image(tmp_path / "cidata.img", "CIDATA", {
        "user-data.toml": b'[settings.network]\nhostname = "drive-host"\n[settings.updates]\nseed = "7"\n'})
    sys_block, dev = block_devices(tmp_path, {"vdb": drive})
    routes["/ud"] = (200, b'[settings.ntp]\ntime-servers = ["http.ntp"]\n')
    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"x" * userdata.MAX_SIZE + b"\n")

    store = Datastore.create(tmp_path / "ds", "1.0.0")
    start = time.monotonic()
    report = userdata.collect([
        ("local-file", lambda: userdata.local_file(local)),
        ("config-drive", lambda: userdata.config_drive(sys_block, dev)),
        ("too-big", lambda: userdata.local_file(big)),
        ("unreachable", lambda: userdata.http(f"http://127.0.0.1:{closed_port()}/x", deadline=0.5)),
        ("http", lambda: userdata.http(f"{base}/ud", deadline=2)),
    ], store)
    assert time.monotonic() - start < BOUND  # the unreachable provider gave up at its 0.5 s deadline
    assert report["config-drive"].startswith("rejected: config drive")
    assert report["config-drive"].endswith("settings.updates.seed: expected int, got str")
    assert report["too-big"] == f"rejected: {big}: larger than {userdata.MAX_SIZE} bytes"
    assert report["unreachable"].startswith("unreachable: http://127.0.0.1:")
    assert report["local-file"].startswith("applied") and report["http"].startswith("applied")
    assert store.pending(LAUNCH_TX) == {"motd": "local", "ntp": {"time-servers": ["http.ntp"]}}
    err = capsys.readouterr().err
    assert "kiln: user data rejected: config drive" in err
    assert "booting without it" in err


# -- review fixes: bounds and first-boot marker ordering -------------------------------------------


def test_a_gzip_bomb_is_refused_without_inflating_it() -> None:
    bomb = gzip.compress(b"[settings]\n" + b"#" * (4 * userdata.MAX_SIZE))
    assert len(bomb) < 64 * 1024
    with pytest.raises(userdata.Rejected, match="larger than 1048576 bytes once decompressed"):
        userdata.parse(bomb, "src")


def test_a_trickling_body_is_cut_at_the_deadline() -> None:
    """A server that sends a byte now and then cannot hold the boot past the deadline."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            try:
                listener.settimeout(0.2)
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while not stop.is_set():
                    try:
                        conn.sendall(b"#")
                    except OSError:
                        break
                    time.sleep(0.3)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        with pytest.raises(userdata.Unreachable, match="trying again next boot"):
            userdata.http(f"http://127.0.0.1:{listener.getsockname()[1]}/ud", deadline=1.5)
        assert time.monotonic() - start < BOUND  # the whole body would trickle for 8 hours
    finally:
        stop.set()
        thread.join(3)
        listener.close()


def test_first_boot_user_data_is_marked_done_only_after_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.host.boot import applier, pipeline

    defaults = tmp_path / "defaults.json"
    defaults.write_text(json.dumps(merge_defaults((ROOT / "variants/settings/defaults.toml",))))
    local = tmp_path / "user-data.toml"
    local.write_text('[settings]\nmotd = "from user data"\n')
    monkeypatch.setattr(userdata, "STATE", tmp_path / "user-data-state")
    monkeypatch.setattr(pipeline, "USER_DATA_MARKER", tmp_path / "user-data-state" / "early.json")
    monkeypatch.setattr(userdata, "early_providers", lambda: [("local-file", lambda: userdata.local_file(local))])
    monkeypatch.setattr(sundog, "run", lambda store: {})  # no generators here

    def crash(store: Datastore, **kw: Any) -> None:
        raise OSError("power cut before the commit")

    real_applier = applier.run
    monkeypatch.setattr(applier, "run", crash)
    with pytest.raises(OSError, match="power cut"):
        pipeline.run(tmp_path / "ds", defaults)
    assert not (tmp_path / "user-data-state" / "early.json").exists(), "must read the user data again"

    monkeypatch.setattr(applier, "run", lambda store, **kw: real_applier(store, root=tmp_path / "root", restart=False,
                                                                    cache=None, templates=TEMPLATES))
    record = pipeline.run(tmp_path / "ds", defaults)
    assert record["user-data"] == {"local-file": f"applied from {local}"}
    assert Datastore(tmp_path / "ds").live()["motd"] == "from user data"
    assert json.loads((tmp_path / "user-data-state" / "early.json").read_text()) == record["user-data"]


def test_definitions_come_from_the_image_every_boot(tmp_path: Path) -> None:
    """A restart command planted on PRIVATE does not survive the next boot."""
    doc = merge_defaults((ROOT / "variants/settings/defaults.toml",))
    defaults = tmp_path / "defaults.json"
    defaults.write_text(json.dumps(doc))
    image_defs = tmp_path / "definitions.json"
    from kiln.host.datastore import encode_definitions

    image_defs.write_bytes(encode_definitions(msgspec.to_builtins(definitions.from_defaults(doc))))
    store = storewolf.run(tmp_path / "ds", defaults, "1.0.0", image_defs)
    live_defs = store.version_dir / "live" / "definitions.json"
    assert live_defs.read_bytes() == image_defs.read_bytes()
    tampered = json.loads(live_defs.read_text())
    tampered["services"]["motd"]["restart-commands"] = ["/bin/sh -c 'touch /tmp/owned'"]
    live_defs.write_text(json.dumps(tampered))
    storewolf.run(tmp_path / "ds", defaults, "1.0.0", image_defs)
    assert live_defs.read_bytes() == image_defs.read_bytes()
    assert store.definitions().services["motd"].restart_commands == []
