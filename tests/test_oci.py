"""`kiln oci`: reproducible OCI images checked by skopeo, umoci and containerd, pushed to a
real docker-registry on 127.0.0.1 (plain HTTP, HTTPS, Basic auth, token auth, read-only), and
bad input."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiln.cli.main import main
from kiln.core.errors import KilnError
from kiln.core.run import run
from kiln.oci.build import build_dir, build_spec
from kiln.oci.layout import ImageConfig, Layout
from kiln.oci.push import Credentials, RegistryRefused, RegistryUnreachable, parse_reference, push
from kiln.oci.registry import LocalRegistry
from kiln.oci.spec import load_spec
from kiln.vm.qemu import free_port
from tests.registry import (
    CONTAINERS,
    Containerd,
    OciRegistry,
    TokenServer,
    serving_kiln_images,
    tls_files,
    write_htpasswd,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def registry_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciRegistry]:
    with serving_kiln_images(tmp_path_factory.mktemp("oci")) as reg:
        yield reg


def _layer_tar(layout: Path) -> tarfile.TarFile:
    image = Layout(layout).select()
    return tarfile.open(Layout(layout).blob_path(image.layers[0].digest), "r:gz")


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


# --- building ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["admin", "httpd"])
def test_rebuild_is_byte_identical(registry_images: OciRegistry, tmp_path: Path, spec: str) -> None:
    first = registry_images.images[spec]
    again = build_spec(load_spec(CONTAINERS / f"{spec}.toml"), tmp_path / "again")
    assert again.digest == first.digest
    assert _same_tree(first.layout, again.output)


def test_a_changed_file_or_epoch_changes_the_digest(
    registry_images: OciRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(CONTAINERS, tmp_path / "containers")
    spec = tmp_path / "containers" / "admin.toml"
    base = registry_images.images["admin"].digest
    assert build_spec(load_spec(spec), tmp_path / "same").digest == base
    with (tmp_path / "containers" / "admin" / "sheltie").open("a") as f:
        f.write("# changed\n")
    assert build_spec(load_spec(spec), tmp_path / "changed").digest != base
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = build_spec(load_spec(CONTAINERS / "admin.toml"), tmp_path / "dated")
    assert dated.digest != base
    assert Layout(dated.output).select().config["created"] == "2023-11-14T22:13:20Z"


def test_layer_is_deterministic_tar(registry_images: OciRegistry) -> None:
    layout = registry_images.images["admin"].layout
    image = Layout(layout).select()
    blob = Layout(layout).blob_path(image.layers[0].digest).read_bytes()
    assert blob[4:8] == b"\0\0\0\0" and blob[3] & 0x08 == 0  # gzip: mtime 0, no file name
    with _layer_tar(layout) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names, key=str.encode)
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" and m.mtime == 0 for m in members)
    assert all(not m.pax_headers for m in members)
    by_name = {m.name: m for m in members}
    assert by_name["bin/busybox"].isfile() and by_name["bin/busybox"].mode == 0o755
    assert by_name["bin/sh"].issym() and by_name["bin/sh"].linkname == "busybox"
    assert by_name["usr/bin/sh"].linkname == "../../bin/busybox"
    assert by_name["usr/bin/nsenter"].issym()
    assert by_name["usr/bin/sheltie"].mode == 0o755
    assert json.loads((layout / "index.json").read_bytes())["manifests"][0]["annotations"] == {
        "io.kiln.image.name": "kiln/admin", "org.opencontainers.image.ref.name": "1"}
    config = image.config["config"]
    assert config["Entrypoint"] == ["/usr/bin/admin-init"]
    assert config["Env"] == ["PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    assert config["Labels"] == {"org.opencontainers.image.title": "kiln-admin"}


def test_from_dir_keeps_links_and_refuses_special_files(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("hi\n")
    os.link(tree / "etc" / "motd", tree / "etc" / "motd.hard")
    (tree / "etc" / "link").symlink_to("motd")
    (tree / "run").mkdir()
    config = ImageConfig(cmd=("/bin/true",), env=("A=1",))
    result = build_dir(tree, tmp_path / "out", config, name="kiln/tree", tag="t1")
    with _layer_tar(result.output) as tar:
        by_name = {m.name: m for m in tar.getmembers()}
    assert by_name["etc/motd.hard"].islnk() and by_name["etc/motd.hard"].linkname == "etc/motd"
    assert by_name["etc/link"].issym() and by_name["run"].isdir()
    assert build_dir(tree, tmp_path / "again", config, name="kiln/tree", tag="t1").digest == result.digest
    os.mkfifo(tree / "run" / "fifo")
    with pytest.raises(KilnError, match=r"run/fifo: special files"):
        build_dir(tree, tmp_path / "fifo", config)
    assert not (tmp_path / "fifo").exists()
    with pytest.raises(KilnError, match="must not be inside"):
        build_dir(tree, tree / "out", config)


def test_output_that_is_not_a_layout_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "precious").write_text("keep")
    with pytest.raises(KilnError, match="not an OCI image layout; refusing"):
        build_dir(_small_tree(tmp_path), tmp_path / "home", ImageConfig())
    assert (tmp_path / "home" / "precious").read_text() == "keep"


# --- other tools read the layout --------------------------------------------------------


def test_skopeo_and_umoci_read_the_layout(registry_images: OciRegistry, tmp_path: Path) -> None:
    admin = registry_images.images["admin"]
    raw = run(["skopeo", "inspect", "--raw", f"oci:{admin.layout}:1"], timeout=60).stdout
    assert raw == Layout(admin.layout).blob_path(admin.digest).read_bytes()
    doc = json.loads(run(["skopeo", "inspect", f"oci:{admin.layout}:1"], timeout=60).stdout)
    assert doc["Digest"] == admin.digest and doc["Labels"]["org.opencontainers.image.title"] == "kiln-admin"

    bundle = tmp_path / "bundle"
    run(["umoci", "unpack", "--image", f"{admin.layout}:1", str(bundle)], timeout=60)
    rootfs = bundle / "rootfs"
    sheltie = (rootfs / "usr/bin/sheltie").read_text()
    assert sheltie.startswith("#!/bin/sh\n") and 'exec nsenter -t 1 -m -u -i -n -p -- "${@:-/bin/sh}"' in sheltie
    assert os.readlink(rootfs / "bin/sh") == "busybox"
    assert os.readlink(rootfs / "usr/bin/nsenter") == "../../bin/busybox"
    assert (rootfs / "usr/bin/sh").resolve() == (rootfs / "bin/busybox").resolve()
    process = json.loads((bundle / "config.json").read_text())["process"]
    assert process["args"] == ["/usr/bin/admin-init"]
    assert "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in process["env"]


def test_admin_init_idles_and_exits_0_on_sigterm(registry_images: OciRegistry, tmp_path: Path) -> None:
    """The init script under the image's own busybox sh, as a process group of its own."""
    layout = registry_images.images["admin"].layout
    with _layer_tar(layout) as tar:
        tar.extractall(tmp_path / "root", filter="tar")
    root = tmp_path / "root"
    env = {"PATH": f"{root}/bin"}
    proc = subprocess.Popen([root / "bin/busybox", "sh", root / "usr/bin/admin-init"], env=env, start_new_session=True)
    try:
        # The script sets its trap, then starts `sleep 3600 &`: a child means the trap is in.
        wait_until(lambda: proc.poll() is not None or bool(_children(proc.pid)), "admin-init started its sleep")
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGTERM)
        # Its sleep lasts an hour: an exit within 30 s (~0.01 s idle) can only be the trap's.
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def wait_until(ready: Callable[[], bool], what: str, bound: float = 30) -> None:
    """Poll for a state. `bound` only ends a hang: each state here comes within a second
    idle; 30 s leaves room for a machine busy with other builds and VMs."""
    deadline = time.monotonic() + bound
    while not ready():
        assert time.monotonic() < deadline, f"no {what} after {bound:.0f} s"
        time.sleep(0.02)


# --- pushing ----------------------------------------------------------------------------


def test_push_matches_skopeo_and_is_idempotent(registry_images: OciRegistry) -> None:
    for image in registry_images.images.values():
        out = run(["skopeo", "inspect", "--tls-verify=false", f"docker://{image.ref}"], timeout=60).stdout
        assert json.loads(out)["Digest"] == image.digest
    admin = registry_images.images["admin"]
    again = push(admin.layout, admin.ref, plain_http=True)
    assert again.digest == admin.digest and not again.pushed and len(again.skipped) == 2
    untagged = push(admin.layout, f"{registry_images.address}/kiln/admin", plain_http=True)
    assert str(untagged.reference).endswith("/kiln/admin:1")


def test_containerd_pulls_and_runs_the_images(registry_images: OciRegistry, tmp_path: Path) -> None:
    with Containerd(tmp_path / "containerd") as ctrd:
        for image in registry_images.images.values():
            ctrd.ctr("images", "pull", "--plain-http", image.ref, timeout=60)
        listed = ctrd.ctr("images", "ls").stdout.decode()
        for image in registry_images.images.values():
            assert any(line.split()[:3] == [image.ref, "application/vnd.oci.image.manifest.v1+json", image.digest]
                       for line in listed.splitlines()), listed

        admin, httpd = registry_images.refs["admin"], registry_images.refs["httpd"]
        out = ctrd.ctr("run", "--rm", admin, "check", "/bin/sh", "-c", "test -x /usr/bin/sheltie && echo ok")
        assert out.stdout.strip() == b"ok"
        # admin-init as the container's PID 1: runs until SIGTERM, then exits 0 at once.
        # Two processes in the task (admin-init and its sleep) mean its trap is set.
        ctrd.ctr("run", "-d", admin, "admin")
        wait_until(lambda: len(ctrd.ctr("tasks", "ps", "admin").stdout.splitlines()) >= 3, "admin-init's sleep")
        assert b"RUNNING" in ctrd.ctr("tasks", "ls").stdout
        ctrd.ctr("tasks", "kill", "-s", "SIGTERM", "admin")
        # Its sleep lasts an hour: stopped within the wait's bound means the trap ended it.
        wait_until(lambda: b"STOPPED" in ctrd.ctr("tasks", "ls").stdout, "the admin task stopped")
        assert ctrd.ctr("tasks", "delete", "admin").returncode == 0  # ctr fails on a non-zero exit
        ctrd.ctr("containers", "rm", "admin")
        # httpd serves /www inside its container (own network namespace, loopback only).
        ctrd.ctr("run", "-d", httpd, "web")
        page = b""
        for _ in range(30):
            page = ctrd.ctr("tasks", "exec", "--exec-id", "get", "web", "wget", "-q", "-O-",
                            "http://127.0.0.1:8080/", check=False).stdout
            if page:
                break
            time.sleep(0.1)
        assert page == b"hello from kiln\n"


def test_htpasswd_registry_refuses_without_the_right_password(tmp_path: Path) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "s3cret"})
    layout = build_dir(_small_tree(tmp_path), tmp_path / "layout", ImageConfig(cmd=("/x",)), tag="1").output
    with LocalRegistry(tmp_path / "reg", htpasswd=htpasswd) as reg:
        ref = f"{reg.address}/kiln/private:1"
        unauthorized = r"401 Unauthorized \(UNAUTHORIZED: authentication required\)"
        with pytest.raises(RegistryRefused, match=rf"registry {reg.address} refused .*: {unauthorized}") as e:
            push(layout, ref, plain_http=True)
        assert e.value.hint and "--user" in e.value.hint
        with pytest.raises(RegistryRefused, match="401") as e:
            push(layout, ref, plain_http=True, credentials=Credentials("alice", "wrong"))
        assert e.value.hint == "check the user name and password"
        result = push(layout, ref, plain_http=True, credentials=Credentials("alice", "s3cret"))
        out = run(["skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", "alice:s3cret", f"docker://{ref}"],
                  timeout=60).stdout
        assert Layout(layout).blob_path(result.digest).read_bytes() == out


def test_token_auth_registry(tmp_path: Path) -> None:
    layout = build_dir(_small_tree(tmp_path), tmp_path / "layout", ImageConfig(cmd=("/x",)), tag="1").output
    with TokenServer(tmp_path, {"bob": "pw"}) as tokens, \
            LocalRegistry(tmp_path / "reg", extra=tokens.registry_config()) as reg:
        ref = f"{reg.address}/team/app:1"
        with pytest.raises(RegistryRefused, match=r"refused a token from 127\.0\.0\.1:\d+: 401"):
            push(layout, ref, plain_http=True)
        result = push(layout, ref, plain_http=True, credentials=Credentials("bob", "pw"))
        assert len(result.pushed) == 2
        assert tokens.requests[-1]["scope"][0] == "repository:team/app:pull,push"
        assert tokens.requests[-1]["service"] == [TokenServer.service]


def test_https_registry_and_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPS is the default: an untrusted certificate fails, trusting it (SSL_CERT_FILE) works,
    and an HTTPS registry with --plain-http is a clear error too."""
    layout = build_dir(_small_tree(tmp_path), tmp_path / "layout", ImageConfig(cmd=("/x",)), tag="1").output
    cert, key = tls_files(tmp_path)
    tls = {"http": {"tls": {"certificate": str(cert), "key": str(key)}}}
    with LocalRegistry(tmp_path / "reg", extra=tls) as reg:
        ref = f"{reg.address}/kiln/tls:1"
        with pytest.raises(RegistryUnreachable, match=r"TLS failed: CERTIFICATE_VERIFY_FAILED"):
            push(layout, ref)
        with pytest.raises(RegistryRefused, match="400 Bad Request") as e:
            push(layout, ref, plain_http=True)
        assert e.value.hint == "the registry serves HTTPS: leave out --plain-http"
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert len(push(layout, ref).pushed) == 2


def test_registry_error_message_is_shown(tmp_path: Path) -> None:
    layout = build_dir(_small_tree(tmp_path), tmp_path / "layout", ImageConfig(cmd=("/x",)), tag="1").output
    readonly = {"storage": {"maintenance": {"readonly": {"enabled": True}}}}
    message = r"refused starting the upload .*: 405 Method Not Allowed \(Method not allowed\)"
    with LocalRegistry(tmp_path / "reg", extra=readonly) as reg, pytest.raises(RegistryRefused, match=message):
        push(layout, f"{reg.address}/kiln/ro:1", plain_http=True)


def test_unreachable_registry_fails_fast(tmp_path: Path) -> None:
    layout = build_dir(_small_tree(tmp_path), tmp_path / "layout", ImageConfig(cmd=("/x",))).output
    port = free_port()
    start = time.monotonic()
    with pytest.raises(RegistryUnreachable, match=rf"registry 127\.0\.0\.1:{port} is unreachable: Connection refused"):
        push(layout, f"127.0.0.1:{port}/kiln/x:1", plain_http=True)
    # A listener that never answers: the request times out instead of hanging.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(RegistryUnreachable, match="no answer within 1 s"):
            push(layout, f"127.0.0.1:{silent.getsockname()[1]}/kiln/x:1", plain_http=True, timeout=1)
    assert time.monotonic() - start < 5


def _small_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "small"
    tree.mkdir()
    (tree / "x").write_text("#!/bin/sh\n")
    return tree


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "error"),
    [
        ("kiln/admin:1", "does not start with a registry"),
        ("127.0.0.1:5000", "does not start with a registry"),
        ("127.0.0.1:5000/Kiln/Admin:1", "invalid repository name 'Kiln/Admin'"),
        ("127.0.0.1:5000/kiln/admin:-bad", "invalid tag '-bad'"),
        ("127.0.0.1:5000/kiln/admin@sha256:" + "0" * 64, "push to a tag, not a digest"),
    ],
)
def test_bad_reference(ref: str, error: str) -> None:
    with pytest.raises(KilnError, match=error):
        parse_reference(ref)


def test_good_references() -> None:
    r = parse_reference("localhost:5000/a/b-c:v1.2")
    assert (r.registry, r.repository, r.tag) == ("localhost:5000", "a/b-c", "v1.2")
    assert parse_reference("registry.example.com/x").tag is None


SPEC_HEAD = '[image]\nname = "kiln/t"\n'


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (SPEC_HEAD + "nmae = 1\n", r"t\.toml: image: unknown key 'nmae'"),
        ('[image]\nname = "Kiln"\n', r"t\.toml: image\.name: invalid image name 'Kiln'"),
        (SPEC_HEAD + 'tag = "a b"\n', r"image\.tag: invalid tag 'a b'"),
        (SPEC_HEAD + "[oops]\n", r"t\.toml: unknown key 'oops'"),
        (SPEC_HEAD + '[files]\n"/x" = "missing.sh"\n', r'files\."/x"\.source: .*missing\.sh\' does not exist'),
        (SPEC_HEAD + '[files]\n"x" = "t.toml"\n', r'files\."x": \'x\' must be an absolute path'),
        (SPEC_HEAD + '[files]\n"/x" = { source = "t.toml", mode = "rwx" }\n', r'files\."/x"\.mode: \'rwx\''),
        (SPEC_HEAD + '[files]\n"/x" = { source = "t.toml", owner = 0 }\n', r"files\.\"/x\": unknown key 'owner'"),
        (SPEC_HEAD + "[config]\nenv = 3\n", r"config\.env: expected a table or a list"),
        (SPEC_HEAD + '[config]\nenv = ["1A=b"]\n', r"config\.env: invalid variable name '1A'"),
        (SPEC_HEAD + '[config]\nentrypoint = "/bin/sh"\n', r"config\.entrypoint: expected list"),
        (SPEC_HEAD + '[config]\nexposed-ports = ["http"]\n', r"config\.exposed-ports\[0\]: 'http'"),
        (SPEC_HEAD + '[packages]\ninclude = ["Bad_Name"]\n', r"packages\.include\[0\]: invalid value 'Bad_Name'"),
        (SPEC_HEAD + '[busybox]\nlinks = ["../bin"]\n', r"busybox\.links: '\.\./bin' must be an absolute path"),
        ("[image\n", r"t\.toml: malformed TOML"),
        ("", r"t\.toml: required table \[image\] is missing"),
    ],
)
def test_bad_spec(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "t.toml").write_text(text)
    with pytest.raises(KilnError, match=error):
        load_spec(tmp_path / "t.toml")


def test_missing_spec_and_busybox_without_package(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match=r"image spec '.*nope\.toml' not found"):
        load_spec(tmp_path / "nope.toml")
    (tmp_path / "t.toml").write_text(SPEC_HEAD + '[busybox]\nlinks = ["/bin"]\n')
    with pytest.raises(KilnError, match=r"t\.toml: busybox: /bin/busybox is not in the image") as e:
        build_spec(load_spec(tmp_path / "t.toml"), tmp_path / "out")
    assert e.value.hint and "busybox-static" in e.value.hint


def test_unknown_package_is_named(tmp_path: Path) -> None:
    (tmp_path / "t.toml").write_text(SPEC_HEAD + '[packages]\ninclude = ["busybox-static", "kiln-no-such-pkg"]\n')
    with pytest.raises(KilnError, match=r"t\.toml: packages\.include: unknown Debian package 'kiln-no-such-pkg'"):
        build_spec(load_spec(tmp_path / "t.toml"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the CLI ----------------------------------------------------------------------------


def test_cli_build_inspect_push(
    registry_images: OciRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "httpd"
    assert main(["oci", "build", str(CONTAINERS / "httpd.toml"), "--output", str(out), "--tag", "demo", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["tag"] == "demo" and built["packages"][0]["name"] == "busybox-static"
    assert main(["oci", "inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["digest"] == built["digest"] and info["cmd"][0] == "/bin/httpd" and len(info["layers"]) == 1
    ref = f"{registry_images.address}/kiln/httpd:demo"
    assert main(["oci", "push", str(out), ref, "--plain-http"]) == 0
    assert capsys.readouterr().out.strip() == built["digest"]

    tree = _small_tree(tmp_path)
    assert main(["oci", "build", "--from-dir", str(tree), "--output", str(tmp_path / "fd"), "--cmd", "/x --flag",
                 "--entrypoint", '["/bin/sh", "-c"]', "--env", "A=1", "--workdir", "/srv", "--json"]) == 0
    config = Layout(tmp_path / "fd").select().config["config"]
    assert config["Cmd"] == ["/x", "--flag"] and config["Entrypoint"] == ["/bin/sh", "-c"]
    assert config["Env"] == ["A=1"] and config["WorkingDir"] == "/srv"
    capsys.readouterr()
    assert main(["oci", "build", str(CONTAINERS / "httpd.toml"), "--output", str(out), "--cmd", "x"]) == 1
    assert "--cmd is for --from-dir" in capsys.readouterr().err
    assert main(["oci", "push", str(out), ref, "--plain-http", "--password-stdin"]) == 1
    assert "--password-stdin needs --user" in capsys.readouterr().err


def test_cli_registry_serve(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli.main", "registry", "serve", "--dir", str(tmp_path / "reg"), "--json"],
        stdout=subprocess.PIPE, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        doc = json.loads(proc.stdout.readline())
        assert doc["address"] == f"127.0.0.1:{doc['port']}"
        layout = build_dir(_small_tree(tmp_path), tmp_path / "layout", ImageConfig(cmd=("/x",)), tag="1").output
        push(layout, f"{doc['address']}/kiln/x:1", plain_http=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        with pytest.raises(RegistryUnreachable):
            push(layout, f"{doc['address']}/kiln/x:1", plain_http=True, timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

