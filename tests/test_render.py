"""The renderer: templates (front matter, StrictUndefined, precompiled bodies), apply() with
real restart commands, the real variant's defaults and templates, and build-time checks."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import stat
import sys
import time
import tomllib
import weakref
from pathlib import Path
from typing import Any

import jinja2
import msgspec
import pytest

from kiln.build import settings as build_settings
from kiln.core.errors import KilnError
from kiln.host.boot import applier
from kiln.host.datastore import Datastore
from kiln.host.render import apply as apply_mod
from kiln.host.render.apply import apply
from kiln.host.render.cache import RenderCache
from kiln.host.render.templates import FrontMatter, TemplateError, Templates, compile_all, split
from kiln.host.settings import definitions
from kiln.variant import load_variant

ROOT = Path(__file__).resolve().parents[1]
REAL_DEFAULTS = ROOT / "variants/settings/defaults.toml"
REAL_TEMPLATES = ROOT / "variants/settings/templates"


def _node_material() -> tuple[str, str, str, str]:
    """Real node TLS material (the datastore refuses material that does not load together)."""
    import tempfile

    from kiln import pki

    with tempfile.TemporaryDirectory(prefix="kiln-test-pki-") as tmp:
        fleet = Path(tmp) / "fleet"
        pki.init(fleet)
        node = pki.node_for_user_data(fleet)
        ca, cert, key = ((fleet / "ca.crt").read_text(), node.cert.read_text(), node.key.read_text())
        crl = (fleet / "crl.pem").read_text()
    return ca, cert, key, crl


CA, CERT, KEY, CRL = _node_material()

# -- front matter ---------------------------------------------------------------------------


def test_front_matter() -> None:
    fm, body = split("t", 'mode = "0600"\nrequires = ["settings.motd", \'settings.kernel.sysctl."a.b"\']\n+++\nhi\n')
    assert fm == FrontMatter(0o600, (("settings", "motd"), ("settings", "kernel", "sysctl", "a.b")))
    assert body == "hi\n"
    assert split("t", "+++\nbody") == (FrontMatter(0o644, ()), "body")
    assert split("t", "mode = '750'\n++++  \n\nx\n+++\n") == (FrontMatter(0o750, ()), "\nx\n+++\n")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("no separator\n", "no '+++' line"),
        ("mode = 644\n+++\n", "mode must be an octal string"),
        ("mode = '0999'\n+++\n", "mode must be an octal string"),
        ("mode = '10644'\n+++\n", "mode must be an octal string"),
        ("owner = 'root'\n+++\n", "unknown front matter key(s) ['owner']"),
        ("requires = 'settings.motd'\n+++\n", "requires must be a list of setting keys"),
        ("requires = [1]\n+++\n", "requires must be a list of setting keys"),
        ("requires = ['settings..motd']\n+++\n", "requires: key 'settings..motd': empty segment"),
        ("= nonsense\n+++\n", "front matter:"),
    ],
)
def test_front_matter_errors_name_the_template(text: str, why: str) -> None:
    with pytest.raises(TemplateError) as e:
        split("my-template", text)
    assert str(e.value).startswith("template 'my-template': ")
    assert why in str(e.value)


def write_templates(d: Path, templates: dict[str, str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in templates.items():
        (d / name).write_text(text)
    return d


def test_strict_undefined_names_the_template(tmp_path: Path) -> None:
    src = write_templates(tmp_path / "t", {"greeting": "+++\nhello {{ settings.network.hostname }}\n"})
    t = Templates(src, None)
    assert t.render("greeting", {"settings": {"network": {"hostname": "h"}}}) == "hello h\n"
    with pytest.raises(TemplateError, match=r"template 'greeting': .*'network'"):
        t.render("greeting", {"settings": {}})
    with pytest.raises(TemplateError, match="template 'nope' not found in"):
        t.render("nope", {})
    with pytest.raises(TemplateError, match="plain file names"):
        t.front_matter("../t/greeting")


def test_compile_all_reports_syntax_errors(tmp_path: Path) -> None:
    src = write_templates(tmp_path / "t", {"fine": "+++\nok\n", "broken": "mode = '0644'\n+++\n{% if %}\n"})
    with pytest.raises(TemplateError, match=r"template 'broken' line \d+: "):
        compile_all(src, tmp_path / "c")
    with pytest.raises(TemplateError, match="template 'broken'"):
        Templates(src, None).render("broken", {})


# -- apply() with test definitions and real restart commands ---------------------------------


def sh(script: str) -> str:
    return shlex.join(["/bin/sh", "-c", script])


@pytest.fixture
def rig(tmp_path: Path) -> tuple[Datastore, Templates, Path, Path]:
    """A datastore with test definitions whose restart commands append to a marker file."""
    marker = tmp_path / "MARKER"
    src = write_templates(tmp_path / "templates", {
        "motd": 'mode = "0640"\nrequires = ["settings.motd"]\n+++\n{{ settings.motd }} on {{ os.version_id }}\n',
        "ntp": 'requires = ["settings.ntp.time-servers"]\n+++\nNTP={{ settings.ntp["time-servers"] | join(" ") }}\n',
        "sysctl": "mode = '0600'\n+++\n{{ settings.kernel.sysctl.missing }}\n",
    })
    doc = {
        "metadata": {"settings": {
            "motd": {"affected-services": ["motd", "failing"]},
            "ntp": {"affected-services": ["ntp"]},
            "kernel": {"sysctl": {"affected-services": ["sysctl"]}},
        }},
        "services": {
            "motd": {"configuration-files": ["motd"], "restart-commands": [sh(f"echo motd >> {marker}")]},
            "failing": {"restart-commands": [sh(f"echo failing >> {marker}; exit 3"), sh(f"echo never >> {marker}")]},
            "ntp": {"configuration-files": ["ntp"],
                    "restart-commands": [sh(f"echo ntp-1 >> {marker}"), sh(f"echo ntp-2 >> {marker}")]},
            "sysctl": {"configuration-files": ["sysctl"], "restart-commands": [sh(f"echo sysctl >> {marker}")]},
        },
        "configuration-files": {
            "motd": {"path": "/etc/motd", "template-path": "motd"},
            "ntp": {"path": "/etc/systemd/timesyncd.conf.d/80-kiln.conf", "template-path": "ntp"},
            "sysctl": {"path": "/etc/sysctl.d/80-kiln.conf", "template-path": "sysctl"},
        },
    }
    store = Datastore.create(tmp_path / "ds", "1.0.0")
    store.set_definitions(definitions.from_defaults(doc))
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text('NAME="Kiln"\nVERSION_ID="9.8.7"\n')
    return store, Templates(src, None), root, marker


def restarts(marker: Path) -> list[str]:
    return marker.read_text().split() if marker.exists() else []


def test_only_affected_services_restart_and_a_failure_stops_no_other(
    rig: tuple[Datastore, Templates, Path, Path],
) -> None:
    store, templates, root, marker = rig
    store.patch({"motd": "hello", "ntp": {"time-servers": ["a", "b"]}})
    store.commit()
    report = apply(store, [("settings", "motd")], templates=templates, root=root)
    assert report.services == ["failing", "motd"]
    assert report.written == ["/etc/motd"]
    assert report.restarted == ["motd"]
    assert len(report.failed_restarts) == 1
    assert report.failed_restarts[0].startswith("service 'failing': command failed (exit 3)")
    assert restarts(marker) == ["failing", "motd"], "the failed service's later commands do not run"
    assert (root / "etc/motd").read_text() == "hello on 9.8.7\n"
    assert not (root / "etc/systemd").exists(), "ntp was not affected"

    marker.unlink()
    report = apply(store, [("settings", "ntp", "time-servers")], templates=templates, root=root)
    assert (report.services, report.restarted, report.errors) == (["ntp"], ["ntp"], [])
    assert restarts(marker) == ["ntp-1", "ntp-2"]
    assert (root / "etc/systemd/timesyncd.conf.d/80-kiln.conf").read_text() == "NTP=a b\n"

    marker.unlink()
    report = apply(store, [("settings", "network", "hostname")], templates=templates, root=root)
    assert (report.services, report.written, report.restarted, report.errors) == ([], [], [], [])
    assert restarts(marker) == []


def test_a_restart_predicate_leaves_the_refused_services_to_the_caller(
    rig: tuple[Datastore, Templates, Path, Path],
) -> None:
    """What the boot does for the agent's own services: rendered, not restarted, reported."""
    store, templates, root, marker = rig
    store.patch({"motd": "hello", "ntp": {"time-servers": ["a", "b"]}})
    store.commit()
    report = apply(store, [("settings", "motd"), ("settings", "ntp", "time-servers")], templates=templates,
                   root=root, restart=lambda cmd: "ntp-" not in cmd)
    assert (report.restarted, report.deferred) == (["motd"], ["ntp"])
    assert "ntp-1" not in restarts(marker) and "motd" in restarts(marker)
    assert (root / "etc/systemd/timesyncd.conf.d/80-kiln.conf").read_text() == "NTP=a b\n"


def test_the_boot_restarts_only_services_whose_files_came_out_different(
    rig: tuple[Datastore, Templates, Path, Path],
) -> None:
    """The first boot of a new version renders everything again: the services already run
    with the files the initramfs restored, and restarting them for the same bytes is waste."""
    store, templates, root, marker = rig
    store.patch({"motd": "hello", "ntp": {"time-servers": ["a", "b"]}})
    store.commit()
    apply(store, None, templates=templates, root=root)  # the previous render (what was restored)
    marker.unlink()
    (root / "etc/motd").write_text("an older motd\n")  # restored from a different render
    report = apply(store, None, templates=templates, root=root, only_changed=True)
    assert "motd" in report.restarted and "ntp" in report.kept and "ntp" not in report.restarted
    assert "ntp-1" not in restarts(marker) and "motd" in restarts(marker)
    assert (root / "etc/motd").read_text() == "hello on 9.8.7\n"
    assert report.to_json()["kept"] == report.kept
    # without only_changed (an API apply) every affected service restarts, as before
    marker.unlink()
    report = apply(store, None, templates=templates, root=root)
    assert report.kept == [] and "ntp" in report.restarted and "kept" not in report.to_json()


def test_the_boot_defers_exactly_the_services_the_agent_hosts() -> None:
    """Of the image's services, the boot leaves to the agent those whose restart signals it
    (it starts them after the pipeline); every other one is restarted as before."""
    from kiln.host.boot.pipeline import not_the_agents

    defaults = Path(__file__).resolve().parents[1] / "variants/settings/defaults.toml"
    services = tomllib.loads(defaults.read_text())["services"]
    deferred = sorted(n for n, svc in services.items()
                      if not all(not_the_agents(c) for c in svc.get("restart-commands", [])))
    assert deferred == ["api-remote", "containers", "host-containers", "updater"]
    assert not_the_agents("/usr/bin/systemctl try-reload-or-restart systemd-timesyncd.service")


def test_a_template_that_fails_is_reported_and_its_service_not_restarted(
    rig: tuple[Datastore, Templates, Path, Path],
) -> None:
    store, templates, root, marker = rig
    store.patch({"kernel": {"sysctl": {"a.b": "1"}}})
    store.commit()
    report = apply(store, [("settings", "kernel", "sysctl", "a.b")], templates=templates, root=root)
    assert report.services == ["sysctl"]
    assert report.written == [] and report.restarted == []
    assert report.errors[0].startswith("configuration file 'sysctl' (/etc/sysctl.d/80-kiln.conf): template 'sysctl': ")
    assert "missing" in report.errors[0]
    assert report.errors[1] == "service 'sysctl': not restarted, a configuration file failed to render"
    assert restarts(marker) == []
    assert not (root / "etc/sysctl.d/80-kiln.conf").exists()


def test_requires_removes_stale_files(rig: tuple[Datastore, Templates, Path, Path]) -> None:
    store, templates, root, marker = rig
    stale = root / "etc/systemd/timesyncd.conf.d/80-kiln.conf"
    stale.parent.mkdir(parents=True)
    stale.write_text("NTP=old.example.com\n")
    store.patch({"motd": "m"})
    store.commit()
    report = apply(store, None, templates=templates, root=root, restart=False)
    assert report.services == ["failing", "motd", "ntp", "sysctl"]
    assert report.removed == ["/etc/systemd/timesyncd.conf.d/80-kiln.conf"]
    assert not stale.exists()
    assert report.written == ["/etc/motd"]
    assert restarts(marker) == [], "restart=False runs no command"
    # with restart: ntp's file was handled (removed), so ntp restarts to drop the old servers
    report = apply(store, [("settings", "ntp")], templates=templates, root=root)
    assert (report.removed, report.restarted) == ([], ["ntp"])


def test_files_are_replaced_atomically_with_the_front_matter_mode(rig: tuple[Datastore, Templates, Path, Path]) -> None:
    store, templates, root, _ = rig
    store.patch({"motd": "first"})
    store.commit()
    apply(store, None, templates=templates, root=root, restart=False)
    motd = root / "etc/motd"
    assert stat.S_IMODE(motd.stat().st_mode) == 0o640
    with motd.open() as old:  # a reader of the old file keeps seeing all of it
        inode = os.fstat(old.fileno()).st_ino
        store.patch({"motd": "second"})
        store.commit()
        apply(store, [("settings", "motd")], templates=templates, root=root, restart=False)
        assert old.read() == "first on 9.8.7\n"
    assert motd.read_text() == "second on 9.8.7\n"
    assert motd.stat().st_ino != inode, "replaced by rename, not rewritten in place"
    assert stat.S_IMODE(motd.stat().st_mode) == 0o640
    assert sorted(p.name for p in motd.parent.iterdir()) == ["motd", "os-release"], "no temporary files left"


def test_a_hanging_restart_command_times_out(
    rig: tuple[Datastore, Templates, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, templates, root, marker = rig
    defs = store.definitions()
    services = dict(defs.services)
    services["motd"] = definitions.Service(["motd"], ["/bin/sleep 30", sh(f"echo after >> {marker}")])
    store.set_definitions(msgspec.structs.replace(defs, services=services))
    store.patch({"motd": "m"})
    store.commit()
    monkeypatch.setattr(apply_mod, "RESTART_TIMEOUT", 0.5)
    start = time.monotonic()
    report = apply(store, [("settings", "motd")], templates=templates, root=root)
    assert time.monotonic() - start < 10
    failed = report.failed_restarts
    assert any(e.startswith("service 'motd': command failed") and "timed out after 0.5 s" in e for e in failed)
    assert "motd" not in report.restarted
    assert "after" not in restarts(marker)


# -- the real variant's defaults and templates ------------------------------------------------


def real_store(tmp_path: Path, *patches: dict[str, Any]) -> Datastore:
    doc = build_settings.merge_defaults((REAL_DEFAULTS,))
    store = Datastore.create(tmp_path / "ds", "1.0.0")
    store.set_definitions(build_settings.check(doc, {p.name: p for p in REAL_TEMPLATES.iterdir()}))
    for patch in (doc["settings"], *patches):
        store.patch(patch)
        store.commit()
    return store


def render_real(tmp_path: Path, *patches: dict[str, Any], compiled: Path | None = None) -> dict[str, str | None]:
    store = real_store(tmp_path, *patches)
    root = tmp_path / "root"
    report = apply(store, None, templates=Templates(REAL_TEMPLATES, compiled), root=root, restart=False)
    assert report.errors == []
    out: dict[str, str | None] = {}
    for cf in store.definitions().configuration_files.values():
        path = root / cf.path.lstrip("/")
        out[cf.path] = path.read_text() if path.exists() else None
    return out


def test_real_defaults_render(tmp_path: Path) -> None:
    files = render_real(tmp_path)
    assert files["/etc/motd"] == "Welcome to Kiln!\n"
    assert files["/etc/hostname"] is None, "no hostname: DHCP's (or the generator's) is kept"
    assert files["/etc/hosts"] == "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
    timesyncd = files["/etc/systemd/timesyncd.conf.d/80-kiln.conf"]
    assert timesyncd is not None
    assert "[Time]\nNTP=0.debian.pool.ntp.org 1.debian.pool.ntp.org\n" in timesyncd
    sysctl = files["/etc/sysctl.d/80-kiln.conf"]
    assert sysctl is not None
    assert [line for line in sysctl.splitlines() if not line.startswith("#")] == [
        "net.ipv4.conf.all.rp_filter = 1",
        "net.ipv4.ip_forward = 1",
    ]
    assert files["/etc/kiln/api-remote.json"] == ""
    assert stat.S_IMODE((tmp_path / "root/etc/kiln/api-remote.json").stat().st_mode) == 0o600


def test_real_templates_with_settings(tmp_path: Path) -> None:
    files = render_real(tmp_path, {
        "network": {"hostname": "node-1.example.com"},
        "motd": "Hi",
        "ntp": {"time-servers": ["10.0.0.1"]},
        "kernel": {"sysctl": {"vm.max_map_count": "262144"}},
    })
    assert files["/etc/hostname"] == "node-1.example.com\n"
    hosts = files["/etc/hosts"]
    assert hosts is not None and hosts.endswith("127.0.1.1 node-1.example.com\n")
    assert files["/etc/motd"] == "Hi\n"
    assert "\nNTP=10.0.0.1\n" in (files["/etc/systemd/timesyncd.conf.d/80-kiln.conf"] or "")
    assert "vm.max_map_count = 262144\n" in (files["/etc/sysctl.d/80-kiln.conf"] or "")


@pytest.mark.parametrize(
    ("remote", "expected"),
    [
        ({"ca": CA, "certificate": CERT}, None),  # no key: not configured
        ({"ca": CA, "certificate": CERT, "key": KEY}, 50000),
        ({"ca": CA, "certificate": CERT, "key": KEY, "port": 8443}, 8443),
        ({"ca": CA, "certificate": CERT, "key": KEY, "enabled": True}, 50000),
        ({"ca": CA, "certificate": CERT, "key": KEY, "enabled": False}, None),
        ({"port": 8443}, None),
    ],
)
def test_real_api_remote(tmp_path: Path, remote: dict[str, Any], expected: int | None) -> None:
    text = render_real(tmp_path, {"api": {"remote": remote}})["/etc/kiln/api-remote.json"]
    assert text is not None
    if expected is None:
        assert text == ""
    else:
        assert json.loads(text) == {"port": expected, "ca": CA, "certificate": CERT, "key": KEY}


def test_real_api_remote_crl_is_a_file_of_its_own(tmp_path: Path) -> None:
    """The CRL goes to its own file (which the listener follows, no restart), not into api-remote.json."""
    files = render_real(tmp_path, {"api": {"remote": {"ca": CA, "certificate": CERT, "key": KEY, "crl": CRL}}})
    assert files["/etc/kiln/api-remote-crl.pem"] == CRL
    assert "crl" not in json.loads(files["/etc/kiln/api-remote.json"] or "")
    assert stat.S_IMODE((tmp_path / "root/etc/kiln/api-remote-crl.pem").stat().st_mode) == 0o644
    assert render_real(tmp_path / "none", {})["/etc/kiln/api-remote-crl.pem"] is None  # unset: no file


CONTEXTS: list[dict[str, Any]] = [
    {},
    {"network": {"hostname": "h"}, "motd": "a 'quoted' \"motd\" with {{ braces }} & <html>"},
    {"api": {"remote": {"ca": CA, "certificate": CERT, "key": KEY, "port": 1}}},
    {"kernel": {"sysctl": {"z.last": "1", "a.first": "0"}}, "ntp": {"time-servers": ["x", "y", "z"]}},
]


def test_precompiled_and_source_templates_render_the_same(tmp_path: Path) -> None:
    compiled = tmp_path / "compiled"
    names = compile_all(REAL_TEMPLATES, compiled)
    assert names == sorted(p.name for p in REAL_TEMPLATES.iterdir())
    assert Templates(REAL_TEMPLATES, compiled).compiled == compiled
    for i, patch in enumerate(CONTEXTS):
        from_source = render_real(tmp_path / f"s{i}", patch)
        from_compiled = render_real(tmp_path / f"c{i}", patch, compiled=compiled)
        assert from_source == from_compiled
        # and template by template, including the ones apply() removes for a missing setting
        store = real_store(tmp_path / f"t{i}", patch)
        context = {"settings": store.live(), "os": {}}
        src, comp = Templates(REAL_TEMPLATES, None), Templates(REAL_TEMPLATES, compiled)
        for name in names:
            try:
                want: str | None = src.render(name, context)
            except TemplateError:
                want = None
            try:
                got: str | None = comp.render(name, context)
            except TemplateError:
                got = None
            assert got == want, name
    # the compiled bodies run in private namespaces: nothing left in sys.modules (jinja2's
    # ModuleLoader leaves a weak proxy there, which broke hypothesis when it died)
    assert not [k for k, m in sys.modules.items() if k.startswith("_jinja2_module") or type(m) is weakref.ProxyType]
    (compiled / jinja2.ModuleLoader.get_module_filename("motd")).unlink()
    with pytest.raises(TemplateError, match="motd"):
        Templates(REAL_TEMPLATES, compiled).render("motd", {"settings": {}})


# -- build-time checks ---------------------------------------------------------------------


def install_with(tmp_path: Path, extra_defaults: str = "", templates: dict[str, str] | None = None) -> Path:
    defaults = tmp_path / "defaults.toml"
    defaults.write_text(REAL_DEFAULTS.read_text() + "\n" + extra_defaults)
    dirs: tuple[Path, ...] = (REAL_TEMPLATES,)
    if templates is not None:
        dirs += (write_templates(tmp_path / "extra-templates", templates),)
    variant = dataclasses.replace(load_variant(), settings_defaults=(defaults,), templates=dirs)
    build_settings.install(tmp_path / "root", variant)
    return defaults


def test_install_writes_defaults_templates_and_compiled_bodies(tmp_path: Path) -> None:
    install_with(tmp_path)
    root = tmp_path / "root"
    doc = json.loads((root / "usr/share/kiln/defaults.json").read_text())
    assert doc == build_settings.merge_defaults((REAL_DEFAULTS,))
    shipped = sorted(p.name for p in (root / "usr/share/kiln/templates").iterdir())
    assert shipped == sorted(p.name for p in REAL_TEMPLATES.iterdir())
    assert Templates(root / "usr/share/kiln/templates", root / "usr/share/kiln/templates.compiled").compiled


def test_build_options_add_defaults(tmp_path: Path) -> None:
    """`kiln build --update-url/--admin-image` defaults land in defaults.json over the variant's."""
    extra = build_settings.option_defaults("http://10.0.2.2:8080/", "10.0.2.2:5000/kiln/admin:1")
    variant = dataclasses.replace(load_variant(), settings_defaults=(REAL_DEFAULTS,), templates=(REAL_TEMPLATES,))
    build_settings.install(tmp_path / "root", variant, extra)
    settings = json.loads((tmp_path / "root/usr/share/kiln/defaults.json").read_text())["settings"]
    assert settings["host-containers"]["admin"] == {
        "source": "10.0.2.2:5000/kiln/admin:1", "enabled": False, "superpowered": True,
    }
    assert settings["updates"]["metadata-base-url"] == "http://10.0.2.2:8080/metadata/"
    assert build_settings.option_defaults(None, None) is None


@pytest.mark.parametrize(
    ("update_url", "admin_image", "why"),
    [
        ("ftp://x/", None, "--update-url ftp://x/: expected an http:// or https:// URL"),
        (None, "Admin Image", "--admin-image Admin Image: settings.host-containers.admin.source:"),
        (None, "", "--admin-image : settings.host-containers.admin.source:"),
    ],
)
def test_build_options_are_checked(update_url: str | None, admin_image: str | None, why: str) -> None:
    with pytest.raises(KilnError) as e:
        build_settings.option_defaults(update_url, admin_image)
    assert str(e.value).startswith(why)


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ('[metadata.settings.network]\naffected-services = ["nosuch"]\n',
         "metadata settings.network: affected service 'nosuch' is not defined"),
        ('[services.extra]\nconfiguration-files = ["nosuch"]\n',
         "services.extra: configuration file 'nosuch' is not defined"),
        ('[configuration-files.extra]\npath = "/etc/extra"\ntemplate-path = "nosuch"\n',
         "configuration-files.extra: template 'nosuch' not found"),
        ('[settings.network]\nhostname = "not_valid"\n', "settings.network.hostname: expected a hostname"),
        ("[extra]\nx = 1\n", "unknown table 'extra'"),
        ("[settings\n", "defaults.toml"),
    ],
)
def test_install_errors_name_the_defaults_file(tmp_path: Path, extra: str, why: str) -> None:
    with pytest.raises(KilnError) as e:
        install_with(tmp_path, extra)
    assert str(tmp_path / "defaults.toml") in str(e.value)
    assert why in str(e.value)
    assert not (tmp_path / "root/usr/share/kiln/defaults.json").exists()


def test_install_errors_name_a_broken_template(tmp_path: Path) -> None:
    with pytest.raises(KilnError) as e:
        install_with(tmp_path, templates={"motd": "no front matter separator\n"})
    assert str(tmp_path / "extra-templates/motd") in str(e.value)
    with pytest.raises(KilnError, match=r"template 'motd' line \d+"):
        install_with(tmp_path, templates={"motd": "+++\n{{ settings.motd \n"})


# -- the render cache (kiln.host.render.cache) ------------------------------------------------


def _cached_host(tmp_path: Path) -> tuple[Datastore, Templates, Path, RenderCache]:
    store = real_store(tmp_path)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text('VERSION_ID=1.0.0\nBUILD_ID="abc"\n')
    return store, Templates(REAL_TEMPLATES, compiled=None), root, RenderCache(tmp_path / "rendered")


def test_full_apply_fills_the_cache_and_boot_skips_when_current(tmp_path: Path) -> None:
    store, templates, root, cache = _cached_host(tmp_path)
    report = apply(store, None, templates=templates, root=root, restart=False, cache=cache)
    assert not report.errors
    for path in report.written:
        assert (cache.root / path.lstrip("/")).read_bytes() == (root / path.lstrip("/")).read_bytes()
    assert set(cache.manifest()["files"]) >= set(report.written)
    # The next boot: same settings, same image, files in place → nothing to do.
    assert applier.run(store, root=root, cache=cache, templates=templates, restart=False) is None
    # A file that is not in place (say the initramfs could not restore it) → full render.
    (root / "etc/motd").unlink()
    again = applier.run(store, root=root, cache=cache, templates=templates, restart=False)
    assert again is not None and "/etc/motd" in again.written


def test_a_partial_apply_mirrors_its_files_but_the_next_boot_renders_all(tmp_path: Path) -> None:
    store, templates, root, cache = _cached_host(tmp_path)
    apply(store, None, templates=templates, root=root, restart=False, cache=cache)
    store.patch({"motd": "changed"})
    changed = store.commit()
    apply(store, changed, templates=templates, root=root, restart=False, cache=cache)
    assert (cache.root / "etc/motd").read_text() == "changed\n"
    # Only a full render vouches for every file (a commit without an apply, say).
    assert cache.manifest() == {}
    assert applier.run(store, root=root, cache=cache, templates=templates, restart=False) is not None
    assert applier.run(store, root=root, cache=cache, templates=templates, restart=False) is None


def test_a_commit_without_an_apply_is_rendered_at_the_next_boot(tmp_path: Path) -> None:
    """The reviewer's case: motd committed but never applied, then another key applied."""
    store, templates, root, cache = _cached_host(tmp_path)
    apply(store, None, templates=templates, root=root, restart=False, cache=cache)
    store.patch({"motd": "committed, not applied"})
    store.commit()
    store.patch({"network": {"hostname": "h2"}})
    apply(store, store.commit(), templates=templates, root=root, restart=False, cache=cache)
    report = applier.run(store, root=root, cache=cache, templates=templates, restart=False)
    assert report is not None and (root / "etc/motd").read_text() == "committed, not applied\n"


def test_a_new_image_renders_everything(tmp_path: Path) -> None:
    store, templates, root, cache = _cached_host(tmp_path)
    apply(store, None, templates=templates, root=root, restart=False, cache=cache)
    assert applier.run(store, root=root, cache=cache, templates=templates, restart=False) is None
    # A new image (another BUILD_ID in os-release) re-renders everything.
    (root / "etc/os-release").write_text('VERSION_ID=1.1.0\nBUILD_ID="def"\n')
    assert applier.run(store, root=root, cache=cache, templates=templates, restart=False) is not None


def test_partial_apply_without_a_full_one_starts_no_cache(tmp_path: Path) -> None:
    store, templates, root, cache = _cached_host(tmp_path)
    store.patch({"motd": "only this"})
    apply(store, store.commit(), templates=templates, root=root, restart=False, cache=cache)
    assert cache.manifest() == {}
    assert applier.run(store, root=root, cache=cache, templates=templates, restart=False) is not None  # renders all


def test_failed_render_invalidates_the_cache(tmp_path: Path) -> None:
    store, templates, root, cache = _cached_host(tmp_path)
    apply(store, None, templates=templates, root=root, restart=False, cache=cache)
    broken = tmp_path / "broken"
    shutil.copytree(REAL_TEMPLATES, broken)
    (broken / "motd").write_text("+++\n{{ settings.no_such_thing }}\n")
    report = apply(store, None, templates=Templates(broken, compiled=None), root=root, restart=False, cache=cache)
    assert report.errors and cache.manifest() == {}
