"""Shared fixtures: built images (once per session) and booted VMs (killed in teardown)."""

from __future__ import annotations

import faulthandler
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.build.pipeline import BuildOptions, BuildResult, build
from kiln.core.progress import Progress
from kiln.variant import Variant, load_variant
from kiln.vm.qemu import Vm, VmConfig
from tests.etcd_cluster import EtcdCluster, etcd_cluster
from tests.registry import OciRegistry, serving_kiln_images

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    from tests.toolcheck import ToolCheck

    if not config.pluginmanager.has_plugin("kiln-toolcheck"):
        config.pluginmanager.register(ToolCheck(), "kiln-toolcheck")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("Kiln's tests build images and must run as root (make test uses sudo)")


@dataclass(frozen=True)
class UpdateRepo:
    """The session's signed update repository: every test image trusts its root and
    looks for updates at http://10.0.2.2:<port> (the host, through QEMU user networking);
    tests that update serve it there with `kiln.repo.serve.RepoServer(path, port=port)`."""

    path: Path
    port: int
    pristine: Path  # a copy made right after `init`: the same keys, no release published

    @property
    def guest_url(self) -> str:
        return f"http://10.0.2.2:{self.port}"


@dataclass
class Images:
    """Builds each distinct image once per session, under one temporary directory."""

    base: Path
    cache: dict[tuple[str, bool, Path | None], BuildResult]
    repo: UpdateRepo | None = None

    def get(self, version: str = "1.0.0", debug_console: bool = True, variant: Variant | None = None,
            keys: Path | None = None) -> BuildResult:
        """`keys`: a `kiln keys init` directory; the image is then signed for Secure Boot."""
        key = (version, debug_console, keys)
        if key not in self.cache:
            v = (variant or load_variant()).with_version(version)
            out = self.base / f"{v.name}-{version}{'-debug' if debug_console else ''}{'-signed' if keys else ''}"
            opts = BuildOptions(
                v, out, debug_console=debug_console,
                update_root=self.repo.path if self.repo else None,
                update_url=self.repo.guest_url if self.repo else None, keys=keys,
            )
            self.cache[key] = build(opts, Progress(quiet=True))
        return self.cache[key]


@pytest.fixture(scope="session")
def update_repo(tmp_path_factory: pytest.TempPathFactory) -> UpdateRepo:
    import shutil

    from kiln.repo import admin
    from kiln.vm.qemu import free_port

    path = tmp_path_factory.mktemp("update-repo") / "repo"
    admin.init(path)
    pristine = path.with_name("pristine")
    shutil.copytree(path, pristine)
    return UpdateRepo(path, free_port(), pristine)


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory, update_repo: UpdateRepo) -> Images:
    return Images(tmp_path_factory.mktemp("images"), {}, update_repo)


@pytest.fixture(scope="session")
def built(images: Images) -> BuildResult:
    """The default image (no debug console), shared by every host-side test."""
    return images.get(debug_console=False)


@pytest.fixture(scope="session")
def secure_boot_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `kiln keys init` directory for the session's signed image."""
    from kiln.secureboot import keys

    d = tmp_path_factory.mktemp("secure-boot") / "keys"
    keys.init(d)
    return d


@pytest.fixture(scope="session")
def signed_build(images: Images, secure_boot_keys: Path) -> BuildResult:
    """The default image with the debug console, built with `--keys` (Secure Boot)."""
    return images.get(keys=secure_boot_keys)


@pytest.fixture
def boot(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Vm]]:
    """Start VMs; every one is killed (its whole process group) at teardown. A guest
    reboot is a new QEMU on the same disk (VmConfig.cold_reboot): QEMU 7.2's warm reset
    under TCG sometimes hangs for good.

    A guest gets two vCPUs unless the test says otherwise: a lone guest then has both of the
    workstation's cores (QEMU start -> ready about 31 s against 47 s with one, measured on
    this machine in 2026-12); tests that run two guests at once give each one."""
    started: list[Vm] = []

    def start(image: Path, *, overlay: bool = True, cpus: int = 2, cold_reboot: bool = True, **kw: object) -> Vm:
        workdir = tmp_path / f"vm{len(started)}"
        log = tmp_path / f"serial{len(started)}.log"
        cfg = VmConfig(image, workdir, cpus=cpus, overlay=overlay, accel="tcg", cold_reboot=cold_reboot, **kw)  # type: ignore[arg-type]
        vm = Vm(cfg, serial_log=log)
        started.append(vm)
        return vm.start()

    yield start
    for vm in started:
        vm.kill()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for i, _ in enumerate(started):
            log = tmp_path / f"serial{i}.log"
            if log.exists():
                print(f"--- serial log {i} (tail) ---\n" + log.read_text()[-4000:])


# Past pytest-timeout's own limit: its SIGALRM runs only when the main thread runs Python
# (a signal taken by another thread leaves a blocked main thread where it is), and once fired
# it no longer covers the teardown. A test still running this long after its limit has every
# thread's stack printed and the run ended, instead of CI's whole time used up in silence.
WATCHDOG_GRACE = 180.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    from _pytest.faulthandler import fault_handler_stderr_fd_key

    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0] if marker and marker.args else item.config.getini("timeout") or 0)
    fd = item.config.stash.get(fault_handler_stderr_fd_key, None)
    if limit > 0 and fd is not None:
        faulthandler.dump_traceback_later(limit + WATCHDOG_GRACE, exit=True, file=fd)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)


def raw_copy(src: Path, dest: Path) -> Path:
    """A sparse copy of a disk image that a test may boot and then inspect."""
    subprocess.run(["cp", "--sparse=always", src, dest], check=True)
    return dest


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciRegistry]:
    """docker-registry on 127.0.0.1 holding Kiln's admin, httpd and bootstrap images
    (built by `kiln oci build`, pushed by `kiln oci push`); guests reach it at 10.0.2.2."""
    with serving_kiln_images(tmp_path_factory.mktemp("oci"), ("admin", "httpd", "bootstrap")) as reg:
        yield reg


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster on loopback for the fleet tests that do not break it (each
    test uses its own group names); fault tests start their own."""
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster
