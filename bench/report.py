"""Render a benchmark run (the JSON of ``python -m bench --json FILE``) as Markdown tables and SVG charts.

The documentation's Performance page is built from ``bench/latest.json`` by the mkdocs hook
``docs/_hooks/hooks.py`` with these functions, so its numbers are never typed by hand:
``python -m bench --json bench/latest.json`` refreshes them. ``python -m bench.report FILE`` prints the
Markdown.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

from bench.harness import fmt_time

__all__ = ["markdown", "charts", "load"]


def load(path: str) -> dict[str, Any]:
    """Read and check a results file: ``{"args": ..., "results": [{scenario, medians, ratios, targets, ...}]}``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list) or not data["results"]:
        raise ValueError(f"{path}: not a benchmark results file (python -m bench --json {path})")
    for r in data["results"]:
        missing = {"scenario", "medians", "ratios", "targets"} - set(r)
        if missing:
            raise ValueError(f"{path}: result {r.get('scenario')!r} lacks {sorted(missing)}")
    return data


def _fmt_ratio(v: float) -> str:
    return f"{v:.3f}"


def _workload(args: dict[str, Any]) -> str:
    return (f"transformers OPT from config: hidden {args.get('hidden')}, {args.get('layers')} layers, "
            f"{args.get('heads')} heads, ffn {args.get('ffn')}, vocab {args.get('vocab')}; batch "
            f"{args.get('batch')} x {args.get('seq')} tokens; LoRA r={args.get('r')}, alpha={args.get('alpha'):g} on "
            f"q/k/v/out_proj, fc1, fc2; {args.get('threads')} torch threads on {args.get('device')}; "
            f"{args.get('repeats')} timed rounds after {args.get('warmup')} warm-up (medians)")


def markdown(data: dict[str, Any], chart_dir: str = "") -> str:
    """The tables (and chart references, under ``chart_dir``) for a results dict from :func:`load`."""
    args, meta, results = data.get("args", {}), data.get("meta") or {}, data["results"]
    out: list[str] = []
    if meta:
        v = meta.get("versions", {})
        out += ["| run | |", "|---|---|",
                f"| date | {meta.get('date', '?')} |",
                f"| machine | {meta.get('cpu', '?')}, {meta.get('cpu_count', '?')} logical CPUs; "
                f"{meta.get('platform', '?')} |",
                "| software | " + ", ".join(f"{k} {val}" for k, val in v.items() if val) +
                f", Python {meta.get('python', '?')} |",
                f"| wall time | {meta.get('wall_s', 0) / 60:.1f} min |"]
        if meta.get("loadavg_end"):
            out.append("| load average at the end (1, 5, 15 min) | "
                       + ", ".join(f"{x:.2f}" for x in meta["loadavg_end"]) + " |")
        out.append("")
    if args:
        out += [f"Workload: {_workload(args)}.", ""]
    if args.get("tiny"):
        out += ["!!! warning \"A smoke run\"", "    This file comes from `python -m bench --tiny` (tiny sizes, one "
                "repeat): the numbers say nothing about speed.", ""]
    ok_total = sum(1 for r in results for k, t in r["targets"].items() if k in r["ratios"] and r["ratios"][k] <= t)
    n_total = sum(1 for r in results for k in r["targets"] if k in r["ratios"])
    out += ["## Ratios against their targets", "",
            f"{ok_total} of {n_total} targeted ratios are within their target in this run (ratios of medians; "
            "lower is better).", ""]
    if chart_dir is not None:
        out += [f"![Ratios of medians per scenario, with each target]({chart_dir}ratios.svg)", ""]
    out += ["| scenario | ratio | value | target | within |", "|---|---|---|---|---|"]
    for r in results:
        for name, value in r["ratios"].items():
            target = r["targets"].get(name)
            within = "" if target is None else ("yes" if value <= target else "**no**")
            out.append(f"| {r['scenario']} | {name} | {_fmt_ratio(value)} | "
                       f"{'<= ' + format(target, 'g') if target is not None else ''} | {within} |")
    out += ["", "## Medians per scenario", ""]
    scaling = _scaling_points(results)
    for r in results:
        out += [f"### {r['scenario']}", "", "| contender | median |", "|---|---|"]
        out += [f"| {name} | {fmt_time(s).strip()} |" for name, s in r["medians"].items()]
        out.append("")
        extra = dict(r.get("extra") or {})
        points = extra.pop("points", None)
        notes = list(r.get("notes") or []) + [f"`{k}` = {_fmt_extra(v)}" for k, v in extra.items()]
        if notes:
            out += [f"- {n}" for n in notes] + [""]
        if points:
            out += _points_table(points)
        if scaling and r is scaling[0] and chart_dir is not None:
            out += [f"![Time of one mixed batch and peak memory against the number of distinct adapters]"
                    f"({chart_dir}scaling.svg)",
                    ""]
    return "\n".join(out).rstrip() + "\n"


def _points_table(points: list[dict[str, Any]]) -> list[str]:
    """Scenario 9's per-process points: N, layout, routed / base per batch shape, bytes and peak RSS."""
    out = ["| N | layout | routed / base | adapters' own MiB | resident MiB | peak RSS MiB (before the calls) |",
           "|---|---|---|---|---|---|"]
    for p in points:
        m = p["medians"]
        ratios = ", ".join(f"{k.split()[-1]}: {m[k] / m['base ' + k.split()[-1]]:.3f}" for k in m
                           if k.startswith("routed "))
        peak, before = p["peak_kib"] / 1024, p["rss_before_kib"] / 1024
        out.append(f"| {p['n']} | {p['layout']} | {ratios} | {p['own_bytes'] / 2**20:.1f} | "
                   f"{p['resident_bytes'] / 2**20:.1f} | {peak:.0f} ({before:.0f}) |")
    return out + [""]


def _fmt_extra(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt_extra(x)}" for k, x in v.items())
    return str(v)


def _scaling_points(results: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """(result, points) for the scaling scenario (9), if the run has it: one point per N of the default
    layout, each ``{"n", "ratios": {tokens label: routed / base}, "peak_mib", "resident_mib"}``."""
    for r in results:
        pts = [p for p in (r.get("extra") or {}).get("points", []) if p.get("layout") == "pool"]
        if len(pts) < 2:
            old = _old_scaling(r)
            if old:
                return r, old
            continue
        out = []
        for p in sorted(pts, key=lambda p: p["n"]):
            m = p["medians"]
            ratios = {k.split()[-1]: m[k] / m["base " + k.split()[-1]] for k in m if k.startswith("routed ")}
            out.append({"n": p["n"], "ratios": ratios, "peak_mib": p["peak_kib"] / 1024,
                        "resident_mib": p["resident_bytes"] / 2**20})
        return r, out
    return None


def _old_scaling(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Points of a run from before the issue "Scale" (medians named ``N=<int>``, one batch shape, no base): time
    against N=1's, no memory."""
    named = sorted((int(k[2:]), v) for k, v in r["medians"].items() if k.startswith("N=") and k[2:].isdigit())
    if len(named) < 2:
        return []
    return [{"n": n, "ratios": {"vs N=1": v / named[0][1]}, "peak_mib": float("nan"), "resident_mib": float("nan")}
            for n, v in named]


def scaling_figure(r: dict[str, Any], pts: list[dict[str, Any]]) -> Any:
    """A matplotlib figure of scenario 9: routed / base time (per tokens per row, with the targets) and the
    process's peak RSS and the pool's bytes, against N."""
    import matplotlib.pyplot as plt

    ns = [p["n"] for p in pts]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for label in pts[0]["ratios"]:
        ax.plot(ns, [p["ratios"].get(label, float("nan")) for p in pts], marker="o", label=f"{label} tokens")
    for t in sorted(set((r.get("targets") or {}).values())):
        ax.axhline(t, color="black", lw=0.8, ls=":")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("distinct adapters resident (N)")
    ax.set_ylabel("mixed batch time / base forward")
    ax.legend(fontsize=8)
    ax2.plot(ns, [p["peak_mib"] for p in pts], marker="o", label="peak RSS of the process")
    ax2.plot(ns, [p["resident_mib"] for p in pts], marker="s", label="the pool's buffers")
    ax2.set_xscale("log")
    ax2.set_xticks(ns, [str(n) for n in ns])
    ax2.set_xlabel("distinct adapters resident (N)")
    ax2.set_ylabel("MiB")
    ax2.legend(fontsize=8)
    fig.suptitle(r["scenario"], fontsize=9)
    fig.tight_layout()
    return fig


def _svg(fig: Any) -> bytes:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue().encode()


def charts(data: dict[str, Any]) -> dict[str, bytes]:
    """SVG charts: ``ratios.svg`` (every ratio with its target) and, when the run has scenario 9,
    ``scaling.svg`` (time and peak RSS against the number of distinct adapters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    out: dict[str, bytes] = {}
    with matplotlib.rc_context({"svg.hashsalt": "adaptfn-bench", "font.size": 9}):
        names, values, bounds = [], [], []
        for r in results:
            for k, v in r["ratios"].items():
                names.append(f"{r['scenario']}: {k}")
                values.append(v)
                bounds.append(r["targets"].get(k))
        height = max(3.0, 0.28 * len(names) + 1.2)
        fig, ax = plt.subplots(figsize=(9, height))
        ys = list(range(len(values)))[::-1]
        colors = ["#43a047" if b is None or v <= b else "#e53935" for v, b in zip(values, bounds)]
        ax.barh(ys, values, color=colors, height=0.7)
        for y, b in zip(ys, bounds):
            if b is not None:
                ax.plot([b, b], [y - 0.42, y + 0.42], color="black", lw=1.6)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(ys, names)
        ax.set_xscale("log")
        ax.set_xlabel("ratio of medians (log scale; lower is better; black tick: the target; dashed: 1)")
        ax.set_title("adaptfn vs PEFT vs the base model")
        fig.tight_layout()
        out["ratios.svg"] = _svg(fig)
        plt.close(fig)
        scaling = _scaling_points(results)
        if scaling:
            fig = scaling_figure(*scaling)
            out["scaling.svg"] = _svg(fig)
            plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m bench.report RESULTS.json")
    sys.stdout.write(markdown(load(sys.argv[1])))
