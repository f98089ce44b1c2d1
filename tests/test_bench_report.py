"""docs/benchmarks.md is what bench/report.py makes of the recorded runs in bench/results/.

Every figure in the document comes from a result file: regenerating it from the committed
JSON must give the committed document byte for byte, the template's prose must carry no
hand-typed figure, and every result file must be a list of runs that say where they came
from (commit, date, machine, load). Fast: no benchmark runs here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report() -> ModuleType:
    return load_module("report")


def test_document_is_generated_from_the_committed_results(report: ModuleType) -> None:
    assert report.OUTPUT.read_text() == report.build(), (
        "docs/benchmarks.md differs from what bench/report.py makes of bench/results: run "
        "`.venv/bin/python bench/report.py` and commit the result"
    )


def test_template_prose_has_no_hand_typed_figures(report: ModuleType) -> None:
    assert report.lint(report.TEMPLATE.read_text()) == []


def test_lint_catches_figures_outside_placeholders_and_code(report: ModuleType) -> None:
    found = report.lint("p99 9.74 ms, 0.43 s warm, 2,550/s, 1.64×, 43.9 MiB\n{{api.verdict}} `sleep 0.5` 2.0.0")
    assert [f.split(": ", 1)[1] for f in found] == ["'9.74 ms'", "'0.43 s'", "'2,550/s'", "'1.64×'", "'43.9 MiB'",
                                                    "'9.74'", "'0.43'", "'1.64'", "'43.9'"]


def test_every_placeholder_has_a_value(report: ModuleType) -> None:
    with pytest.raises(SystemExit, match=r"no value for nothing\.here"):
        report.render("{{nothing.here}}", {})


@pytest.mark.parametrize("name", ["build_time", "boot_time", "api_latency", "guest_api", "update", "containers",
                                  "fleet", "fleet_simulate", "fleet_view", "secure_boot"])
def test_results_are_lists_of_runs_that_say_where_they_come_from(report: ModuleType, name: str) -> None:
    runs: list[dict[str, Any]] = json.loads((report.RESULTS / f"{name}.json").read_text())
    assert isinstance(runs, list) and runs
    for run in runs:
        assert run["benchmark"] == name
        assert {"date", "commit", "uncommitted", "machine", "load", "argv", "note", "result"} <= set(run)
        assert run["date"]
        # A run without a recorded commit is one converted from an old single-run file, and says so.
        assert run["commit"] or run["note"]
        if run["note"] is None:  # measured since every run is kept: the full picture
            assert len(run["commit"]) == 40
            assert run["machine"]["cpus"] and run["load"]["start"] and run["load"]["end"]


def test_write_result_appends_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_module("_bench")
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    source = {"commit": "0" * 40, "uncommitted": [], "uncommitted_diff_sha256": None}
    monkeypatch.setattr(bench, "_source_at_start", source)  # no git here: the test run starts no tool
    machine = {"date": "2026-12-02T00:00:00+00:00", "cpus": 2, "loadavg_at_start": [0.5, 0.4, 0.3]}
    bench.write_result("probe", {"machine": machine, "value": 1})
    bench.write_result("probe", {"machine": machine, "value": 2})
    runs = json.loads((tmp_path / "results" / "probe.json").read_text())
    assert [r["result"] for r in runs] == [{"value": 1}, {"value": 2}]
    assert runs[0]["commit"] == "0" * 40
    assert runs[0]["load"]["start"] == [0.5, 0.4, 0.3] and runs[0]["load"]["end"]
    assert set(runs[0]) == set(bench.RUN_KEYS)


def test_guest_api_judges_the_agent_design_and_shows_older_runs_apart(report: ModuleType) -> None:
    mib = 1024 * 1024

    def run(result: dict[str, Any]) -> dict[str, Any]:
        return {"date": "2026-12-02T12:00:00+00:00", "commit": "a" * 40, "uncommitted": [], "note": None,
                "load": {"start": [1.0], "end": [1.0]}, "result": {"result": result}}

    old = run({"agents": ["kiln-apiserver", "kiln-api-remote", "kiln-updater"], "agents_resident_bytes": 70 * mib,
               "agents_target_bytes": 60 * mib, "api": {"first_response_s": 1.0},
               "first_boot": {"settings_unit_wall_s": 7.0, "ready_target_s": 16.0}})

    def boot(resident: int, first: float) -> dict[str, Any]:
        return {"kiln_resident_bytes": resident, "api_first_response_s": first, "ready_target_s": 12.0,
                "rss_bytes": {"kiln-agent.service": resident, "kiln-containers.service": None},
                "restart": {"kill_to_response_s": 2.0}}

    agent = run({"design": "agent", "kiln_target_bytes": 40 * mib, "api_first_response_target_s": 0.2,
                 "first_boot": boot(30 * mib, 0.05), "second_boot": boot(36 * mib, 0.3)})
    values = report.guest_api_section([old, agent, agent])
    assert values["verdict"] == "**met** (median of 4 boots from 2 runs: 33.0 MiB)"
    assert values["first_verdict"] == "**met** (median of 4 boots from 2 runs: 0.175 s)"
    assert values["target"] == "≤ 40 MiB" and values["first_target"] == "≤ 0.2 s"
    assert values["old_verdict"].startswith("not judged: 1 run")  # the previous design, apart
    assert "previous (a unit each)" in values["runs"] and "| agent |" in values["runs"]
    # With no run of the agent's design yet, the targets still say what they are.
    only_old = report.guest_api_section([old])
    assert only_old["target"] == "≤ 40 MiB" and only_old["verdict"].startswith("not judged: 0 measurements")


def test_containers_judges_the_supervisor_design_and_shows_older_runs_apart(report: ModuleType) -> None:
    mib = 1024 * 1024

    def run(derived: dict[str, Any], segments: dict[str, float]) -> dict[str, Any]:
        return {"date": "2026-12-02T12:00:00+00:00", "commit": "a" * 40, "uncommitted": [], "note": None,
                "load": {"start": [1.0], "end": [1.0]},
                "result": {"derived": derived, "admin_enable": {"segments_s": segments, "cli_s": 1.0},
                           "workloads": {"kiln": [{}, {}, {}], "floor": [{}, {}, {}]}}}

    old = run({"kiln_later_median_s": 3.9, "floor_median_s": 1.1,
               "admin": {"task_started_s": 14.0, "by_hand_s": 2.0},
               "memory": {"workload manager unit (median)": {"rss": 45 * mib}, "managers": 3}},
              {"manager: interpreter start, imports, settings read": 1.0})

    def supervisor(serve: float, admin: float, per_container: float) -> dict[str, Any]:
        return run({"kiln_later_median_s": serve * 2.0, "floor_median_s": 2.0,
                    "admin": {"task_started_s": admin * 4.0, "by_hand_s": 4.0},
                    "memory": {"Kiln per running container (logger + supervisor growth)":
                               {"rss": per_container * mib, "pss": 0.4 * mib},
                               "supervisor growth per workload": {"rss": 0.2 * mib}, "kiln workloads": 3}},
                   {"supervisor: prepare, ctr run -d (pull on first use) → shim up": 2.0})

    runs = [old, supervisor(1.2, 2.0, 2.5), supervisor(1.4, 1.4, 2.6), supervisor(1.3, 1.2, 3.5)]
    values = report.containers_section(runs)
    assert values["serve_verdict"] == "**met** (median of 3 runs: 1.30)"
    assert values["admin_verdict"] == "**met** (median of 3 runs: 1.40)"
    assert values["memory_verdict"] == "**met** (median of 3 runs: 2.60 MiB)"
    assert values["serve_target"] == "≤ 1.5" and values["memory_target"] == "≤ 3 MiB"
    # Each design's tables hold its own runs only: the manager's segments and memory are not in the
    # supervisor's tables, and the supervisor's not in the previous design's.
    assert "manager" not in values["segments"] + values["admin"] + values["memory"]
    assert "supervisor" not in values["old_admin"] and "Kiln per running container" not in values["old_memory"]
    assert "| 3.90 s |" in values["old_serve_table"] and "3.90 s" not in values["serve_table"]
    assert values["provenance"].startswith("**3 runs**") and values["old_provenance"].startswith("**1 run**")
    assert "previous (a manager unit each)" in values["runs"] and "| supervisor |" in values["runs"]
    # One run of the supervisor's design: its figures, no verdict.
    one = report.containers_section([old, supervisor(1.33, 2.1, 2.64)])
    assert one["serve_verdict"] == "not judged: 1 run, re-run needed (so far 1.33)"
    assert one["admin_verdict"] == "not judged: 1 run, re-run needed (so far 2.10)"
    assert one["memory_verdict"] == "not judged: 1 run, re-run needed (so far 2.64 MiB)"
    # With none yet, the targets still say what they are, and nothing of the older runs is judged.
    only_old = report.containers_section([old])
    assert only_old["serve_verdict"].startswith("not judged: 0 runs") and only_old["serve_target"] == "≤ 1.5"
