"""Timing harness: interleaved runs (A B C A B C ...), warm-up, medians, ratios.

Every scenario times its contenders in the same process, interleaved round by round, so slow drifts of
a noisy machine hit all of them alike; it reports medians and ratios of medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    scenario: str
    medians: dict[str, float]  # seconds
    ratios: dict[str, float]
    targets: dict[str, float]  # ratio name -> upper bound
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def ok(self) -> dict[str, bool]:
        return {k: self.ratios[k] <= v for k, v in self.targets.items() if k in self.ratios}


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                setup: dict[str, Callable[[], Any]] | None = None) -> dict[str, float]:
    """Median seconds of each fn, timed round-robin. ``setup[name]`` runs untimed before each timing. On a
    CUDA machine each timing ends with ``torch.cuda.synchronize()`` (once CUDA is initialised), so kernels
    queued by one contender are not billed to the next."""
    setup = setup or {}
    fns = {k: _synced(f) for k, f in fns.items()}
    for _ in range(warmup):
        for name, f in fns.items():
            if name in setup:
                setup[name]()
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            if name in setup:
                setup[name]()
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def inference(f: Callable[[], Any]) -> Callable[[], None]:
    """``f`` as a contender for :func:`interleaved`: run under ``torch.inference_mode`` (interleaved adds the
    GPU synchronisation)."""
    import torch

    def go() -> None:
        with torch.inference_mode():
            f()
    return go


def _synced(f: Callable[[], Any]) -> Callable[[], Any]:
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return f

    def go() -> Any:
        out = f()
        torch.cuda.synchronize()
        return out
    return go


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:8.1f} us"
    if s < 1:
        return f"{s * 1e3:8.2f} ms"
    return f"{s:8.2f} s "


def table(results: list[Result]) -> str:
    lines = ["| scenario | medians | ratio | target | ok |", "|---|---|---|---|---|"]
    for r in results:
        med = "<br>".join(f"{k}: {fmt_time(v).strip()}" for k, v in r.medians.items())
        first = True
        for name, value in r.ratios.items():
            target = r.targets.get(name)
            ok = "" if target is None else ("yes" if value <= target else "**no**")
            lines.append(f"| {r.scenario if first else ''} | {med if first else ''} | {name} = {value:.3f} | "
                         f"{'<= ' + format(target, 'g') if target is not None else ''} | {ok} |")
            first = False
    return "\n".join(lines)


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, values, bounds = [], [], []
    for r in results:
        for k, v in r.ratios.items():
            names.append(f"{r.scenario}\n{k}")
            values.append(v)
            bounds.append(r.targets.get(k))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4.5))
    colors = ["tab:green" if b is None or v <= b else "tab:red" for v, b in zip(values, bounds)]
    ax.bar(range(len(values)), values, color=colors)
    for i, b in enumerate(bounds):
        if b is not None:
            ax.plot([i - 0.4, i + 0.4], [b, b], color="black", lw=1.5)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("ratio of medians (lower is better; black line: target)")
    ax.set_yscale("log")
    ax.set_title("adaptfn vs PEFT vs base model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
