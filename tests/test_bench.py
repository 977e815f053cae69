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


def test_gpu_script_names_real_scenarios_and_flags() -> None:
    """bench/gpu.sh (the one command for a CUDA machine) parses, and what it passes to ``python -m bench`` is
    accepted by the bench's parser (its --dry mode runs the same steps on a CPU: bench/README.md)."""
    import re
    import shlex
    import subprocess

    from bench.run import SCENARIOS, parse

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read()
    names = re.search(r"--scenarios (\S+)", text).group(1).split(",")
    assert names and all(n in SCENARIOS for n in names)
    sizes = [shlex.split(m) for m in re.findall(r"SIZES=\(([^)]*)\)", text)]
    assert len(sizes) == 2  # --dry, then the GPU's
    for argv in sizes:
        args = parse(argv + ["--no-scaling-layouts"])
        assert args.scenarios == "all" and args.scaling_layouts is False
    gpu = parse(sizes[1])
    assert (gpu.device, gpu.dtype, gpu.hidden, gpu.scaling_n) == ("cuda", "bfloat16", 4096, (1000,))
