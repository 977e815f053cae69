"""A thousand adapters (issue "Scale"): scenario 9 (N distinct adapters in one mixed batch, up to 1,000),
scenario 15 (loading 1,000 adapter folders against reading their files) and scenario 16 (an offloaded pool:
host storage, a device cache).

The adapters are LoRA on the benchmark's Llama with heterogeneous ranks and targets (:func:`mixed_config`):
ranks drawn from 4, 8, 12, 16, 24, 32, 48, 64 and targets from q+v, q+k+v+o, the MLP (gate, up, down) or all
seven projections, one draw per adapter from a seeded generator. Every N runs in a fresh process
(``python -m bench.thousand child ...``), so its peak RSS is its own.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from bench.harness import Result, interleaved

RANKS = (4, 8, 12, 16, 24, 32, 48, 64)
LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_SETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"),
               LLAMA_ALL)
ROWS = 64
ROUTES = 4  # random batches per N, timed in turn (see child); <= adaptfn.pooling.PLAN_CACHE, the routes a pool keeps
# pool: pow2 buckets (the default); portable: the same pool on its portable kernels (no native kernel);
# max: buckets=(64,); stack: af.stack
LAYOUTS = ("pool", "portable", "exact", "max", "stack")


def mixed_config(i: int, af: Any, tiny: bool = False) -> Any:
    """Adapter ``i``'s config: a rank and a target set drawn from a generator seeded by ``i``."""
    rng = random.Random(7919 * i + 17)
    r = rng.choice(RANKS if not tiny else (2, 3, 4))
    return af.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(rng.choice(TARGET_SETS)), init_lora_weights=False)


def llama(args: Any, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      intermediate_size=args.ffn, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=2048, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)


def make_adapters(fn: Any, n: int, tiny: bool, device: str = "cpu", dtype: torch.dtype | None = None) -> list[Any]:
    import adaptfn as af

    out = []
    for i in range(n):
        a = af.init(fn, mixed_config(i, af, tiny), generator=torch.Generator(device=device).manual_seed(1000 + i),
                    dtype=dtype)
        out.append(a)
    return out


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def _reset_peak() -> None:
    try:  # reset the peak-RSS mark (Linux), so that VmHWM below is the calls' own peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def own_bytes(adapters: list[Any]) -> int:
    return sum(t.nbytes for a in adapters for p in a.paths for k, t in a.leaves(p).items() if k in ("lora_A", "lora_B"))


def child(argv: list[str]) -> dict[str, Any]:
    """One N and layout in this process: build, time base vs routed at ROWS x 1 and ROWS x 16 tokens, peak RSS."""
    import adaptfn as af

    spec = json.loads(argv[0])
    args = type("Args", (), spec["args"])()
    n, layout, device = spec["n"], spec["layout"], spec.get("device", "cpu")
    dtype = getattr(torch, spec.get("dtype", "float32"))
    torch.set_num_threads(args.threads)
    model = llama(args, device, dtype)
    fn, params = af.functional(model)
    t0 = time.perf_counter()
    adapters = make_adapters(fn, n, args.tiny, device, dtype)
    made = time.perf_counter() - t0
    own = own_bytes(adapters)
    t0 = time.perf_counter()
    if layout == "stack":
        held: Any = af.stack(adapters)
        resident = sum(t.nbytes for p in held.paths for t in held.leaves(p).values())
    else:
        held = af.pool(adapters, buckets={"pool": "pow2", "portable": "pow2", "exact": "exact", "max": (64,)}[layout])
        resident = held.memory()["allocated"]
    if layout == "portable":
        from adaptfn import pooling

        pooling.NATIVE = False
    built = time.perf_counter() - t0
    del adapters
    rows = spec["rows"]
    # ROUTES random batches (each row a random adapter), timed in turn: one draw can hold adapters of far more
    # (or fewer) bytes than a typical batch (seed 5 alone, at N = 1,000: 239 MB of adapter rows, the 93rd
    # percentile of 200 draws; their median is 198 MB)
    routes = [torch.randint(0, n, (rows,), generator=torch.Generator().manual_seed(5 + k)).to(device)
              for k in range(ROUTES)]
    gs = [af.inject(fn, held, route=route) for route in routes]
    meds: dict[str, float] = {}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rss_before = _status("VmRSS:")
    _reset_peak()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        dev_before = torch.cuda.memory_allocated()
    for t in spec["tokens"]:
        ids = torch.randint(3, args.vocab, (rows, t), generator=torch.Generator().manual_seed(t)).to(device)

        def base(ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False)
            sync()

        def routed(g: Any, ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                g(params, input_ids=ids, use_cache=False)
            sync()

        fns = {"base": base, **{f"route {k}": functools.partial(routed, g) for k, g in enumerate(gs)}}
        med = interleaved(fns, spec["repeats"], spec["warmup"])
        meds[f"base {rows}x{t}"] = med["base"]
        meds[f"routed {rows}x{t}"] = sum(med[f"route {k}"] for k in range(len(gs))) / len(gs)
        for k in range(len(gs)):
            meds[f"route {k} {rows}x{t}"] = med[f"route {k}"]
    peak = _status("VmHWM:")
    dev = {"cuda_before_mib": round(dev_before / 2**20, 1),
           "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if cuda else {}
    return {**dev, "n": n, "layout": layout, "medians": meds, "own_bytes": own, "resident_bytes": resident,
            "rss_before_kib": rss_before, "peak_kib": peak,
            "distinct": sum(int(r.unique().numel()) for r in routes) / len(routes),
            "make_s": round(made, 2), "build_s": round(built, 2), "loadavg": list(os.getloadavg())}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "bench.thousand", "child", json.dumps(spec)], capture_output=True,
                         text=True, env=env, cwd=root)
    if out.returncode:
        raise RuntimeError(f"bench.thousand child failed ({spec['n']} {spec['layout']}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plain_args(args: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


def scenario_scaling(w: Any) -> Result:
    """Scenario 9: N distinct adapters resident, a mixed batch of ROWS rows x 1 and x 16 tokens, each row a random
    adapter; time against one base forward, and peak RSS, per N and layout (each in a fresh process)."""
    from adaptfn.pooling import native_status

    args = w.args
    tiny = args.tiny
    device = getattr(args, "device", "cpu")
    dtype = getattr(args, "dtype", "float32")
    ns = getattr(args, "scaling_n", None) or ((1, 16, 64, 256, 1000) if not tiny else (1, 3))
    rows, tokens = (ROWS, (1, 16)) if not tiny else (4, (1, 2))
    plan = [(n, "pool") for n in ns]
    if getattr(args, "scaling_layouts", True):  # the other layouts, to compare (af.stack up to N = 256)
        if not tiny:
            plan += [(n, "stack") for n in ns if n <= 256]
            plan += [(ns[-1], "portable"), (ns[-1], "exact"), (ns[-1], "max")]
        else:
            plan += [(ns[-1], "stack")]
    meds: dict[str, float] = {}
    ratios: dict[str, float] = {}
    targets: dict[str, float] = {}
    points = []
    for n, layout in plan:
        spec = {"args": _plain_args(args), "n": n, "layout": layout, "rows": rows, "tokens": list(tokens),
                "repeats": max(3, args.repeats), "warmup": max(1, args.warmup // 2), "device": device,
                "dtype": dtype}
        res = run_child(spec)
        points.append(res)
        tag = f"N={n}" + ("" if layout == "pool" else f" {layout}")
        for t in tokens:
            key = f"{rows}x{t}"
            meds[f"{tag} {key}"] = res["medians"][f"routed {key}"]
            ratios[f"{tag} {key}/base"] = res["medians"][f"routed {key}"] / res["medians"][f"base {key}"]
            if layout == "pool" and n >= 256:
                targets[f"{tag} {key}/base"] = 1.5 if t == 1 else 1.15
        print(f"  scaling {tag}: " + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items() if k.startswith(tag + " "))
              + f"; resident {res['resident_bytes'] / 2**20:.0f} MiB (own {res['own_bytes'] / 2**20:.0f} MiB), peak "
              f"above resident {(res['peak_kib'] - res['rss_before_kib']) / 1024:.0f} MiB, load "
              f"{res['loadavg'][0]:.2f}", flush=True)
    r = Result(f"9 scaling to {ns[-1]} adapters, {rows}x{tokens[0]} and {rows}x{tokens[-1]} rows, Llama, mixed "
               "ranks and targets", meds, ratios, targets)
    r.extra["points"] = points
    r.notes.append("each row a random adapter of N; ranks 4-64 and four target sets (bench/thousand.py); pool = "
                   "af.pool (power-of-two rank buckets), portable = the same pool on its portable kernels (no native "
                   "kernel), exact = one bucket per rank, max = every rank padded to 64, stack = af.stack (padded to "
                   "r=64 and the union of targets); pool kernel: " + native_status())
    return r


# -- scenario 15: loading many adapters ------------------------------------------------------------------
def scenario_load_many(w: Any) -> Result:
    """Scenario 15: af.load of N saved adapter folders (mixed ranks and targets) against reading the same
    safetensors files raw (safetensors.torch.load_file), interleaved; adapters per second."""
    import safetensors.torch

    import adaptfn as af

    args = w.args
    n = 1000 if not args.tiny else 8
    model = llama(args)
    fn, _ = af.functional(model)
    tmp = tempfile.mkdtemp(prefix="adaptfn-thousand-")
    dirs = []
    for i, a in enumerate(make_adapters(fn, n, args.tiny)):
        d = os.path.join(tmp, f"a{i:04d}")
        af.save(a, d)
        dirs.append(d)
    files = [os.path.join(d, "adapter_model.safetensors") for d in dirs]
    total = sum(os.path.getsize(f) for f in files)

    def raw() -> None:
        for f in files:
            safetensors.torch.load_file(f)

    def load() -> None:
        for d in dirs:
            af.load(d)

    def load_pool() -> None:
        af.pool(af.load(d) for d in dirs)

    med = interleaved({"raw safetensors read": raw, "af.load": load, "af.load + af.pool": load_pool},
                      max(3, args.repeats // 5), 1)
    ratios = {"af.load/raw read": med["af.load"] / med["raw safetensors read"],
              "af.load + af.pool/raw read": med["af.load + af.pool"] / med["raw safetensors read"]}
    r = Result(f"15 load {n} adapters", med, ratios, {"af.load/raw read": 1.5})
    r.extra.update({"adapters": n, "MiB": round(total / 2**20, 1),
                    "af.load adapters/s": round(n / med["af.load"], 1),
                    "raw read adapters/s": round(n / med["raw safetensors read"], 1),
                    "af.load MiB/s": round(total / 2**20 / med["af.load"], 1)})
    r.notes.append("warm page cache (the files were just written); both read the same files")
    return r


# -- scenario 16: offloaded pool --------------------------------------------------------------------------
def scenario_offload(w: Any) -> Result:
    """Scenario 16: N adapters in host memory with a device cache (af.OffloadedPool) vs the same pool resident,
    ROWS x 1 token rows of random adapters: a cold call (every adapter paged in) and a warm one (all cached)."""
    import adaptfn as af

    args = w.args
    n, rows = (1000, ROWS) if not args.tiny else (6, 4)
    device = getattr(args, "device", "cpu")
    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    cpu_model = llama(args, "cpu", dtype)  # the adapters are made on the host, where the pool keeps them
    host = af.pool(make_adapters(af.functional(cpu_model)[0], n, args.tiny, "cpu", dtype),
                   pin_memory=device.startswith("cuda"))
    model = cpu_model.to(device)
    fn, params = af.functional(model)
    resident = host.to(device)
    ids = torch.randint(3, args.vocab, (rows, 1), generator=torch.Generator().manual_seed(3)).to(device)
    state = {"k": 0}
    routes = [torch.randperm(n, generator=torch.Generator().manual_seed(k))[:rows] for k in range(64)]
    off = af.OffloadedPool(host, device, capacity=rows)

    def fresh() -> None:  # every call names rows new adapters: all misses (the cache holds rows)
        state["k"] += 1

    def cold() -> None:
        with torch.inference_mode():
            af.inject(fn, off, route=routes[state["k"] % len(routes)])(params, input_ids=ids, use_cache=False)

    warm_route = routes[0]
    warm_off = af.OffloadedPool(host, device, capacity=rows)

    def warm() -> None:
        with torch.inference_mode():
            af.inject(fn, warm_off, route=warm_route)(params, input_ids=ids, use_cache=False)

    def res() -> None:
        with torch.inference_mode():
            af.inject(fn, resident, route=warm_route)(params, input_ids=ids, use_cache=False)

    def base() -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    med = interleaved({"base": base, "resident pool": res, "offloaded, warm cache": warm,
                       "offloaded, cold (every adapter copied)": cold}, max(3, args.repeats // 2), 1,
                      setup={"offloaded, cold (every adapter copied)": fresh})
    st = off.stats()
    ratios = {"warm/resident": med["offloaded, warm cache"] / med["resident pool"],
              "cold/resident": med["offloaded, cold (every adapter copied)"] / med["resident pool"],
              "resident/base": med["resident pool"] / med["base"]}
    r = Result(f"16 offloaded pool, {n} adapters on the host, cache of {rows}", med, ratios, {"warm/resident": 1.1})
    mem = off.memory()
    r.extra.update({"host MiB": round(mem["allocated"] / 2**20, 1), "device cache MiB": round(mem["device"] / 2**20, 1),
                    "copied per cold call MiB": round(st["bytes_copied"] / max(1, st["calls"] - 1) / 2**20, 2),
                    "misses": st["misses"], "hits": st["hits"], "evictions": st["evictions"]})
    return r


def main(argv: list[str]) -> None:
    if argv and argv[0] == "child":
        print(json.dumps(child(argv[1:])))
        return
    raise SystemExit("usage: python -m bench.thousand child SPEC_JSON (run by python -m bench)")


if __name__ == "__main__":
    main(sys.argv[1:])
