"""The datastore (kiln.host.datastore): layout, validation, transactions, crashes, concurrent writers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from kiln.host.datastore import (
    DEFAULT_TX,
    MAX_PENDING_BYTES,
    MAX_TRANSACTIONS,
    Datastore,
    DatastoreError,
    NotFound,
    NothingPending,
    PendingTooLarge,
    TooManyTransactions,
)
from kiln.host.settings import definitions
from kiln.host.settings.model import InvalidSettings


@pytest.fixture
def store(tmp_path: Path) -> Datastore:
    return Datastore.create(tmp_path / "ds", "1.0.0")


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file (bytes) and symlink (target) below `root`."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "dir"
    return out


# -- layout ------------------------------------------------------------------------------


def test_create_makes_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    store = Datastore.create(root, "1.2.3")
    assert os.readlink(root / "current") == "v1.2.3"
    assert (root / "v1.2.3" / "pending").is_dir()
    for doc in ("settings.json", "definitions.json"):
        path = root / "v1.2.3" / "live" / doc
        assert json.loads(path.read_bytes()) == {}
        assert path.stat().st_mode & 0o777 == 0o640
    assert store.live() == {}
    assert store.transactions() == []
    assert store.definitions() == definitions.Definitions()
    assert not list(root.glob(".current*")), "the temporary symlink is gone"


def test_create_keeps_an_existing_store(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    Datastore.create(root, "v1.0.0").patch({"motd": "kept"})
    Datastore(root).commit()
    again = Datastore.create(root, "2.0.0")  # a newer image does not start a new store
    assert os.readlink(root / "current") == "v1.0.0"
    assert again.live() == {"motd": "kept"}


@pytest.mark.parametrize("version", ["", "1/2", "1 0", "../x"])
def test_create_refuses_bad_versions(tmp_path: Path, version: str) -> None:
    with pytest.raises(DatastoreError, match="invalid datastore version"):
        Datastore.create(tmp_path / "ds", version)
    assert not (tmp_path / "ds" / "current").exists()


def test_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatastoreError, match="no datastore at"):
        Datastore(tmp_path / "nothing").live()


# -- patch, commit, discard ------------------------------------------------------------


def test_patch_commit_and_changed_keys(store: Datastore) -> None:
    store.patch({"motd": "one", "kernel": {"sysctl": {"a.b": "1"}}})
    assert store.live() == {}
    assert store.pending() == {"motd": "one", "kernel": {"sysctl": {"a.b": "1"}}}
    assert store.transactions() == [DEFAULT_TX]
    assert store.commit() == [("settings", "kernel", "sysctl", "a.b"), ("settings", "motd")]
    assert store.live() == {"motd": "one", "kernel": {"sysctl": {"a.b": "1"}}}
    assert store.transactions() == []

    store.patch({"kernel": {"sysctl": {"c.d": "2"}}})
    store.patch({"motd": "one"})  # same value: not a change
    assert store.pending() == {"kernel": {"sysctl": {"c.d": "2"}}, "motd": "one"}
    assert store.commit() == [("settings", "kernel", "sysctl", "c.d")]
    assert store.live() == {"motd": "one", "kernel": {"sysctl": {"a.b": "1", "c.d": "2"}}}

    store.patch({"motd": "one"})
    assert store.commit() == []


def test_rejected_patches_leave_the_store_byte_for_byte(store: Datastore) -> None:
    store.patch({"motd": "live", "ntp": {"time-servers": ["a"]}})
    store.commit()
    store.patch({"network": {"hostname": "pending"}})
    store.patch({"motd": "other tx"}, "other")
    before = snapshot(store.root)
    bad: list[tuple[Any, str]] = [
        ({"network": {"hostname": "bad_name"}}, DEFAULT_TX),
        ({"motd": "ok", "kernel": {"sysctl": {"x": 1}}}, DEFAULT_TX),  # one bad value spoils the whole patch
        ({"bogus": True}, "other"),
        ({"network": {"hostname": None}}, DEFAULT_TX),
        ([], DEFAULT_TX),
    ]
    for tree, tx in bad:
        with pytest.raises(InvalidSettings):
            store.patch(tree, tx)
        assert snapshot(store.root) == before
    with pytest.raises(DatastoreError):
        store.patch({"motd": "x"}, "bad/tx")
    assert snapshot(store.root) == before
    assert store.pending() == {"network": {"hostname": "pending"}}
    assert store.live() == {"motd": "live", "ntp": {"time-servers": ["a"]}}


def test_transactions_are_isolated(store: Datastore) -> None:
    store.patch({"motd": "from a"}, "tx-a")
    store.patch({"network": {"hostname": "b"}}, "tx_b")
    store.patch({"motd": "default"})
    assert store.transactions() == ["default", "tx-a", "tx_b"]
    assert store.pending("tx-a") == {"motd": "from a"}
    assert store.pending("tx_b") == {"network": {"hostname": "b"}}
    assert store.pending("never-used") == {}

    assert store.commit("tx_b") == [("settings", "network", "hostname")]
    assert store.live() == {"network": {"hostname": "b"}}
    assert store.pending("tx-a") == {"motd": "from a"}, "other transactions are untouched"
    assert store.discard("tx-a") is True
    assert store.discard("tx-a") is False
    assert store.transactions() == ["default"]
    assert store.commit() == [("settings", "motd")]
    assert store.live() == {"network": {"hostname": "b"}, "motd": "default"}


def test_discard_all(store: Datastore) -> None:
    for tx in ("a", "b", "c"):
        store.patch({"motd": tx}, tx)
    assert store.discard_all() == ["a", "b", "c"]
    assert store.transactions() == []
    assert store.live() == {}
    assert store.discard_all() == []


def test_commit_with_nothing_pending(store: Datastore) -> None:
    with pytest.raises(NothingPending, match="'default' has nothing pending") as e:
        store.commit()
    assert e.value.status == 409
    store.patch({"motd": "x"}, "t")
    store.discard("t")
    with pytest.raises(NothingPending):
        store.commit("t")
    assert store.live() == {}


@pytest.mark.parametrize("tx", ["", "../live/settings", "a/b", "a.b", "x" * 65, "sp ace", "é"])
def test_invalid_transaction_names(store: Datastore, tx: str) -> None:
    before = snapshot(store.root)
    for op in (store.pending, store.discard, store.commit, lambda t: store.patch({"motd": "x"}, t)):
        with pytest.raises(DatastoreError, match="invalid transaction name") as e:
            op(tx)
        assert e.value.status == 400 and e.value.path == "tx"
    assert snapshot(store.root) == before


def test_error_statuses() -> None:
    assert (DatastoreError("x").status, NotFound("x").status, NothingPending("x").status) == (400, 404, 409)
    assert (TooManyTransactions("x").status, PendingTooLarge("x").status) == (409, 413)


def test_pending_transactions_are_capped_in_number(store: Datastore) -> None:
    for i in range(MAX_TRANSACTIONS):
        store.patch({"motd": f"tx {i}"}, f"t{i}")
    before = snapshot(store.root)
    with pytest.raises(TooManyTransactions, match="commit or discard one"):
        store.patch({"motd": "one more"}, "extra")
    assert snapshot(store.root) == before
    store.patch({"motd": "again"}, "t0")  # a pending one can still change, and be committed
    store.commit("t0")
    store.patch({"motd": "now there is room"}, "extra")


def test_pending_transactions_are_capped_in_size(store: Datastore) -> None:
    """About 0.9 MiB of settings per transaction (the API's 1 MiB body): a few fit, then 413."""
    def fat(tag: str) -> dict[str, Any]:
        return {"containers": {f"{tag}{i}": {"image": "busybox", "env": {f"E{j}": "x" * 300 for j in range(100)}}
                               for i in range(25)}}
    stored = 0
    for n in range(MAX_TRANSACTIONS):
        try:
            store.patch(fat("c"), f"fat{n}")
        except PendingTooLarge as e:
            assert "at most" in e.detail and e.path == "tx"
            break
        stored = sum(p.stat().st_size for p in (store.version_dir / "pending").glob("*.json"))
    else:
        raise AssertionError("no size cap")
    assert 0 < stored <= MAX_PENDING_BYTES and n >= 2
    assert not (store.version_dir / "pending" / f"fat{n}.json").exists()
    assert not list((store.version_dir / "pending").glob(".*"))  # no temporary left behind


@pytest.mark.parametrize(
    ("doc", "content", "why"),
    [
        ("settings.json", b'{"motd": "x"', "is corrupt"),
        ("settings.json", b"", "is corrupt"),
        ("settings.json", b"\xff\xfe", "is corrupt"),
        ("settings.json", b'["motd"]\n', "not a JSON object"),
        ("definitions.json", b"{", "is corrupt"),
        ("definitions.json", b'{"services": {"x": {"restart-commands": "reboot"}}}', "definitions are corrupt"),
    ],
)
def test_corrupt_files_are_datastore_errors(store: Datastore, doc: str, content: bytes, why: str) -> None:
    (store.version_dir / "live" / doc).write_bytes(content)
    read = store.live if doc == "settings.json" else store.definitions
    with pytest.raises(DatastoreError, match=why):
        read()


def test_corrupt_pending_transaction(store: Datastore) -> None:
    (store.version_dir / "pending" / "broken.json").write_text("{")
    with pytest.raises(DatastoreError, match=r"broken\.json is corrupt"):
        store.pending("broken")
    with pytest.raises(DatastoreError, match="corrupt"):
        store.commit("broken")
    assert store.live() == {}


def test_definitions_round_trip(store: Datastore) -> None:
    d = definitions.from_defaults({
        "metadata": {"settings": {"motd": {"affected-services": ["motd"]}}},
        "services": {"motd": {"configuration-files": ["motd"], "restart-commands": ["/bin/true"]}},
        "configuration-files": {"motd": {"path": "/etc/motd", "template-path": "motd"}},
    })
    store.set_definitions(d)
    assert store.definitions() == d
    assert Datastore(store.root).definitions().services_for([("settings", "motd")]) == ["motd"]


# -- crashes and concurrent writers -----------------------------------------------------------


def big_state(tag: str, n: int = 250) -> dict[str, Any]:
    """A large settings tree (~200 KiB committed); A and B differ in every value.

    Both states' sysctl keys end up live (a commit merges), within the model's 512 entries.
    """
    return {
        "motd": f"state {tag}",
        "kernel": {"sysctl": {f"k{i}.{tag.lower()}x": tag * 400 for i in range(n)} | {"shared.key": tag}},
        "ntp": {"time-servers": [f"{tag}{i}.example.com" for i in range(32)]},
    }


def _commit_forever(root: Path, a: dict[str, Any], b: dict[str, Any], progress: int) -> None:
    """Commit B, A, B, ... for ever, writing a byte to `progress` as each round starts."""
    store = Datastore(root)
    for i in range(10**9):
        os.write(progress, b".")
        store.patch(a if i % 2 else b)
        store.commit()


def test_kill_9_during_commits_leaves_exactly_one_state(tmp_path: Path) -> None:
    """A writer killed at random moments never leaves a mixed or unreadable store.

    40 kills, each at a random point of a random round: the writer says when each round
    starts, so a kill never lands before the writer got going, however slow the machine
    (and 40 kills take ~3 s idle, with no time limit to miss)."""
    root = tmp_path / "ds"
    store = Datastore.create(root, "1.0.0")
    # Same keys in both, so the live tree after a commit of A is exactly A (and of B exactly B).
    a = big_state("A")
    b = {**big_state("B"), "kernel": {"sysctl": {k: "B" * 40 for k in a["kernel"]["sysctl"]}}}
    store.patch(a)
    store.commit()
    rng = random.Random(1234)
    seen = {"A": 0, "B": 0}
    iterations = 0
    while iterations < 40:
        iterations += 1
        progress, child_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: never returns into pytest
            try:
                os.close(progress)
                _commit_forever(root, a, b, child_end)
            finally:
                os._exit(0)
        os.close(child_end)
        rounds = rng.randint(1, 3)  # let it start this many rounds, then kill it within the last
        with os.fdopen(progress, "rb", buffering=0) as started:
            for _ in range(rounds):
                assert started.read(1) == b".", "the writer died by itself"
            time.sleep(rng.uniform(0, 0.03))
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the writer died by itself"
        live = Datastore(root).live()
        if live == a:
            seen["A"] += 1
        elif live == b:
            seen["B"] += 1
        else:
            pytest.fail(f"iteration {iterations}: live settings are neither A nor B (motd={live.get('motd')!r})")
        pending = Datastore(root).pending()  # readable: {} or one whole patch
        assert pending in ({}, a, b)
    assert seen["A"] and seen["B"], f"the writer never got to commit both states: {seen}"
    # The store is still usable: the lock is free and a commit works.
    store.patch({"motd": "after"})
    store.commit()
    assert store.live()["motd"] == "after"
    # A kill between mkstemp and rename leaves a `.settings.json.*` temporary file behind;
    # storewolf removes them at the next boot.
    torn = len(list(store.version_dir.glob("*/.*.json.*")))
    assert store.remove_stale_temporaries() == torn
    assert not list(store.version_dir.glob("*/.*.json.*"))
    assert store.live()["motd"] == "after"
    print(f"kills={iterations} live={seen} temporary files left by kills={torn}")


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from kiln.host.datastore import Datastore, NothingPending
    root, me, tx, n = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = Datastore(root)
    sys.stdin.read()  # start together
    for i in range(n):
        store.patch({"kernel": {"sysctl": {f"{me}.k{i}": str(i)}}, "motd": f"{me} {i}"}, tx)
        try:
            store.commit(tx)
        except NothingPending:  # the other writer committed our shared transaction
            pass
""")


@pytest.mark.parametrize("shared_tx", [False, True], ids=["own-tx", "shared-tx"])
def test_concurrent_writers_lose_no_update(tmp_path: Path, shared_tx: bool) -> None:
    root = tmp_path / "ds"
    store = Datastore.create(root, "1.0.0")
    n = 40
    procs = []
    for me in ("w0", "w1"):
        with (tmp_path / f"{me}.err").open("wb") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", WRITER, str(root), me, "shared" if shared_tx else f"tx-{me}", str(n)],
                stdin=subprocess.PIPE, stderr=err,
            ))
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()  # both start now
    for me, p in zip(("w0", "w1"), procs, strict=True):
        try:
            p.wait(timeout=60)
        finally:
            p.kill()
        assert p.returncode == 0, (tmp_path / f"{me}.err").read_text()
    sysctl = store.live()["kernel"]["sysctl"]
    assert sysctl == {f"{me}.k{i}": str(i) for me in ("w0", "w1") for i in range(n)}
    assert store.live()["motd"] in (f"w0 {n - 1}", f"w1 {n - 1}")
    assert store.transactions() == []
