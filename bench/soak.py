"""Soak: many threads of mixed adapted calls on one tiny base model; every result must equal the
single-threaded one, and the resident memory must stay flat after warm-up.

    .venv/bin/python -m bench.soak                        # 8 threads x 2,000 calls (docs/reliability.md)
    .venv/bin/python -m bench.soak --threads 4 --calls 200 --json out.json

Calls, drawn per thread from a seeded generator: one adapter (``inject`` made per call, or made once and
reused), several at once (``select(adapters, [names])``), a stacked adapter routed per row (``route=``),
``merge`` then the plain function, and the base alone; each on one of a few input batches. The expected
logits of every (call, input) are computed once, single-threaded, before the threads start.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import threading
import time
from typing import Any

import torch

import adaptfn as af


def _rss_mib() -> float:
    """Resident memory now (Linux /proc; ru_maxrss elsewhere, which is the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model() -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=61, hidden_size=22, num_hidden_layers=2, ffn_dim=37, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=22, attn_implementation="eager",
                    pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return OPTForCausalLM(cfg).eval()


def _setup(seed: int) -> dict[str, Any]:
    model = _model()
    fn, params = af.functional(model)
    g = torch.Generator().manual_seed(seed)
    cfg = dict(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapters = {f"a{i}": af.init(fn, af.LoraConfig(r=2 + i % 3, lora_alpha=4 + i, **cfg), generator=g)
                for i in range(4)}
    stacked = af.stack(list(adapters.values()))
    inputs = [torch.randint(3, 61, (4, 6), generator=g) for _ in range(3)]
    routes = [torch.tensor([0, 1, 2, 3]), torch.tensor([3, -1, 1, 1]), torch.tensor([2, 2, 0, -1])]
    reused = {n: af.inject(fn, a) for n, a in adapters.items()}
    merged = {n: af.merge(params, a) for n, a in adapters.items()}
    return dict(fn=fn, params=params, adapters=adapters, stacked=stacked, inputs=inputs, routes=routes,
                reused=reused, merged=merged)


KINDS = ("single", "single_reused", "select", "route", "merge", "base")


def _specs(world: dict[str, Any]) -> list[tuple]:
    names = list(world["adapters"])
    out: list[tuple] = []
    for x in range(len(world["inputs"])):
        out += [("single", n, x) for n in names] + [("single_reused", n, x) for n in names]
        out += [("select", ("a0", "a2"), x), ("select", ("a1", "a2", "a3"), x)]
        out += [("route", r, x) for r in range(len(world["routes"]))]
        out += [("merge", n, x) for n in names[:2]] + [("base", None, x)]
    return out


def _call(world: dict[str, Any], spec: tuple) -> torch.Tensor:
    kind, what, x = spec
    fn, params, ids = world["fn"], world["params"], world["inputs"][x]
    if kind == "single":
        return af.inject(fn, world["adapters"][what])(params, input_ids=ids).logits
    if kind == "single_reused":
        return world["reused"][what](params, input_ids=ids).logits
    if kind == "select":
        return af.inject(fn, af.select(world["adapters"], list(what)))(params, input_ids=ids).logits
    if kind == "route":
        return af.inject(fn, world["stacked"], route=world["routes"][what])(params, input_ids=ids).logits
    if kind == "merge":
        return fn(world["merged"][what], input_ids=ids).logits
    return fn(params, input_ids=ids).logits


def run(threads: int = 8, calls: int = 2000, seed: int = 0, warmup_frac: float = 0.1) -> dict[str, Any]:
    """Run the soak; returns a report (calls, mismatches, errors, per-kind counts, RSS figures, seconds)."""
    world = _setup(seed)
    specs = _specs(world)
    with torch.inference_mode():
        expected = {s: _call(world, s) for s in specs}
    mismatches: list[str] = []
    errors: list[str] = []
    counts = {k: 0 for k in KINDS}
    lock = threading.Lock()
    done = [0]
    rss_after_warmup: list[float] = []
    warm_at = max(1, int(threads * calls * warmup_frac))
    barrier = threading.Barrier(threads)

    def work(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        barrier.wait()
        for _ in range(calls):
            spec = rng.choice(specs)
            try:
                with torch.inference_mode():
                    out = _call(world, spec)
                ok = torch.equal(out, expected[spec])
            except Exception as e:  # noqa: BLE001 - reported, the soak goes on
                with lock:
                    errors.append(f"thread {i} {spec[0]}: {type(e).__name__}: {e}")
                continue
            with lock:
                counts[spec[0]] += 1
                if not ok:
                    mismatches.append(f"thread {i}: {spec}")
                done[0] += 1
                if done[0] == warm_at:
                    gc.collect()
                    rss_after_warmup.append(_rss_mib())

    rss_start = _rss_mib()
    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    seconds = time.perf_counter() - t0
    gc.collect()
    rss_end = _rss_mib()
    warm = rss_after_warmup[0] if rss_after_warmup else rss_start
    return {"threads": threads, "calls": threads * calls, "seconds": round(seconds, 2),
            "mismatches": len(mismatches), "mismatch_examples": mismatches[:5], "errors": errors[:5],
            "per_kind": counts, "rss_start_mib": round(rss_start, 1), "rss_after_warmup_mib": round(warm, 1),
            "rss_end_mib": round(rss_end, 1), "rss_growth_after_warmup_mib": round(rss_end - warm, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--calls", type=int, default=2000, help="calls per thread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    report = run(args.threads, args.calls, args.seed)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
