"""Smoke test of the benchmark harness: every scenario runs once at a tiny size (no timing assertions)."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def test_bench_scenarios_run_tiny(tmp_path) -> None:
    from bench.run import SCENARIOS, main

    out = tmp_path / "r.json"
    png = tmp_path / "r.png"
    results = main(["--tiny", "--json", str(out), "--png", str(png)])
    assert [r.scenario.split()[0] for r in results] == [str(i) for i in range(1, len(SCENARIOS) + 1)]
    data = json.loads(out.read_text())
    assert len(data["results"]) == len(SCENARIOS)
    for r in results:
        assert all(v > 0 for v in r.medians.values())
    assert png.stat().st_size > 1000
    unmerged = results[0]
    assert unmerged.extra["rel_err_vs_peft"] < 1e-5  # same adapter in both libraries
    qlora = next(r for r in results if "qlora" in r.scenario)
    assert qlora.extra["rel_err_vs_peft"] < 1e-5  # both in the standard 4-bit layout, whatever the CPU
    dora = next(r for r in results if "DoRA" in r.scenario)
    assert dora.extra["dora_rel_err_vs_peft"] < 1e-5
    assert dora.extra["conv_dora_rel_err_vs_peft"] < 1e-5
    # the documentation's Performance page is rendered from such a file (bench/report.py, docs/_hooks/hooks.py)
    from bench import report

    page = report.markdown(report.load(str(out)), chart_dir="performance/")
    assert all(r.scenario in page for r in results) and "A smoke run" in page
    assert "performance/ratios.svg" in page and "performance/scaling.svg" in page
    charts = report.charts(json.loads(out.read_text()))
    assert set(charts) == {"ratios.svg", "scaling.svg"} and all(b"<svg" in c for c in charts.values())


def test_performance_page_source_is_a_full_run() -> None:
    """bench/latest.json, which docs/performance.md is built from, is a full-size run (not --tiny) of every
    scenario, with its metadata."""
    from bench.run import SCENARIOS

    data = json.loads(open(os.path.join(os.path.dirname(__file__), "..", "bench", "latest.json")).read())
    assert data["args"]["tiny"] is False and data["args"]["scenarios"] == "all"
    assert len(data["results"]) == len(SCENARIOS) and {"date", "versions", "cpu"} <= set(data["meta"])
