"""adaptfn vs PEFT benchmarks: ``python -m bench [--scenarios ...] [--json out.json] [--png out.png]``.

Default workload: transformers OPT from config (hidden 512, 4 layers, 8 heads, ffn 2048, vocab 8192),
float32, eval, no grad; batch 8 x 128 tokens; LoRA r=16, alpha=32 on q/k/v/out_proj, fc1, fc2; the
same adapter weights in adaptfn and PEFT (PEFT's saved folder is loaded by adaptfn).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from typing import Any

import torch

from bench import conv, dora, many, qlora, single, thousand
from bench.harness import Result, inference, interleaved, plot, table

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


class Workload:
    def __init__(self, args: argparse.Namespace) -> None:
        import peft
        from transformers import OPTConfig, OPTForCausalLM

        import adaptfn as af

        torch.manual_seed(0)
        self.args = args
        self.device = torch.device(args.device)
        cfg = OPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        ffn_dim=args.ffn, num_attention_heads=args.heads, max_position_embeddings=max(2048, args.seq),
                        word_embed_proj_dim=args.hidden, attn_implementation="sdpa")
        self.cfg = cfg
        self.dtype = getattr(torch, args.dtype)
        self.base = OPTForCausalLM(cfg).eval().to(device=self.device, dtype=self.dtype)
        self.tmp = tempfile.mkdtemp(prefix="adaptfn-bench-")
        self.dirs = []
        for i in range(2):  # two adapters, made and saved by PEFT
            lc = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS, init_lora_weights=False)
            torch.manual_seed(100 + i)
            pm = peft.get_peft_model(copy.deepcopy(self.base), lc)
            d = os.path.join(self.tmp, f"a{i}")
            pm.save_pretrained(d)
            self.dirs.append(d)
        self.peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(self.base), self.dirs[0], adapter_name="a0")
        self.peft_model.load_adapter(self.dirs[1], adapter_name="a1")
        self.peft_model.set_adapter("a0")
        self.peft_model.eval()
        self.fn, self.params = af.functional(self.base)
        self.adapters = [af.load(d, device=self.device, dtype=self.dtype) for d in self.dirs]
        self.g = af.inject(self.fn, self.adapters[0])
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(self.device)
        self.ids1 = self.ids[:1, :1].contiguous()

    def check_same(self) -> float:
        with torch.no_grad():
            a = self.g(self.params, input_ids=self.ids).logits
            b = self.peft_model(input_ids=self.ids).logits
        return float((a - b).abs().max() / b.abs().max())


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _base_peft_adaptfn(w: Workload, ids: torch.Tensor, repeats: int, warmup: int) -> dict[str, float]:
    """Medians of the base model, PEFT unmerged and adaptfn ``inject`` on ``ids``, interleaved."""
    return interleaved({
        "base": inference(lambda: w.base(input_ids=ids, use_cache=False)),
        "peft": inference(lambda: w.peft_model(input_ids=ids, use_cache=False)),
        "adaptfn": inference(lambda: w.g(w.params, input_ids=ids, use_cache=False)),
    }, repeats, warmup)


def scenario_unmerged(w: Workload) -> Result:
    med = _base_peft_adaptfn(w, w.ids, w.args.repeats, w.args.warmup)
    return Result("1 unmerged forward", med,
                  {"adaptfn/peft": med["adaptfn"] / med["peft"], "adaptfn/base": med["adaptfn"] / med["base"]},
                  {"adaptfn/peft": 0.97, "adaptfn/base": 1.08}, extra={"rel_err_vs_peft": w.check_same()})


def scenario_merged(w: Workload) -> Result:
    import adaptfn as af

    args, ids = w.args, w.ids
    merged = af.merge(w.params, w.adapters[0])

    med = interleaved({
        "base": inference(lambda: w.base(input_ids=ids, use_cache=False)),
        "adaptfn merged": inference(lambda: w.fn(merged, input_ids=ids, use_cache=False)),
    }, args.repeats, args.warmup)
    return Result("2 merged forward", med, {"merged/base": med["adaptfn merged"] / med["base"]},
                  {"merged/base": 1.02})


def scenario_decode(w: Workload) -> Result:
    med = _base_peft_adaptfn(w, w.ids1, w.args.repeats * 4, w.args.warmup * 4)
    return Result("3 decode call (1x1)", med,
                  {"adaptfn/peft": med["adaptfn"] / med["peft"], "adaptfn/base": med["adaptfn"] / med["base"]},
                  {"adaptfn/peft": 1.0})


def scenario_switch(w: Workload) -> Result:
    import adaptfn as af

    args = w.args
    adapters = {"a0": w.adapters[0], "a1": w.adapters[1]}
    state = {"i": 0}
    names = ["a0", "a1"]

    def peft_switch():
        state["i"] ^= 1
        w.peft_model.set_adapter(names[state["i"]])

    def af_switch():
        state["i"] ^= 1
        w._switched = af.inject(w.fn, af.select(adapters, names[state["i"]]))

    med = interleaved({"peft set_adapter": peft_switch, "adaptfn select+inject": af_switch},
                      args.repeats * 20, args.warmup * 5)
    w.peft_model.set_adapter("a0")
    r = med["adaptfn select+inject"] / med["peft set_adapter"]
    res = Result("4 switch adapter", med, {"adaptfn/peft": r}, {"adaptfn/peft": 0.1})
    res.notes.append(f"adaptfn switch = {med['adaptfn select+inject'] * 1e3:.4f} ms (target < 0.1 ms)")
    res.extra["adaptfn_switch_under_0.1ms"] = med["adaptfn select+inject"] < 1e-4
    return res


def scenario_load(w: Workload) -> Result:
    import peft

    import adaptfn as af

    args, ids = w.args, w.ids1
    fresh: dict[str, Any] = {}

    def make_fresh():
        fresh["m"] = copy.deepcopy(w.base)

    def peft_load():
        pm = peft.PeftModel.from_pretrained(fresh["m"], w.dirs[1])
        with torch.inference_mode():
            pm(input_ids=ids, use_cache=False)

    def af_load():
        g = af.inject(w.fn, af.load(w.dirs[1], device=w.device))
        with torch.inference_mode():
            g(w.params, input_ids=ids, use_cache=False)

    med = interleaved({"peft from_pretrained": peft_load, "adaptfn load+inject": af_load},
                      args.repeats, args.warmup, setup={"peft from_pretrained": make_fresh})
    return Result("5 folder -> ready call", med,
                  {"adaptfn/peft": med["adaptfn load+inject"] / med["peft from_pretrained"]},
                  {"adaptfn/peft": 0.5}, notes=["both include one 1x1 forward; PEFT's base copy is made untimed"])


def scenario_merge(w: Workload) -> Result:
    import peft

    import adaptfn as af

    args = w.args
    fresh: dict[str, Any] = {}

    def make_fresh():
        fresh["pm"] = peft.PeftModel.from_pretrained(copy.deepcopy(w.base), w.dirs[0])

    def peft_merge():
        fresh["pm"].merge_and_unload()
        _sync(w.device)

    def af_merge():
        af.merge(w.params, w.adapters[0])
        _sync(w.device)

    med = interleaved({"peft merge_and_unload": peft_merge, "adaptfn merge": af_merge},
                      args.repeats, args.warmup, setup={"peft merge_and_unload": make_fresh})
    return Result("6 merge", med, {"adaptfn/peft": med["adaptfn merge"] / med["peft merge_and_unload"]},
                  {"adaptfn/peft": 1.0})


SCENARIOS = {
    "unmerged": scenario_unmerged,
    "merged": scenario_merged,
    "decode": scenario_decode,
    "switch": scenario_switch,
    "load": scenario_load,
    "merge": scenario_merge,
    "same": many.scenario_same,
    "mixed": many.scenario_mixed,
    "scaling": thousand.scenario_scaling,
    "qlora": qlora.scenario_qlora,
    "hetero": many.scenario_hetero,
    "conv": conv.scenario_conv,
    "dora": dora.scenario_dora,
    "single_llama": single.scenario_single_llama,
    "load_many": thousand.scenario_load_many,
    "offload": thousand.scenario_offload,
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="all", help=f"comma list of {list(SCENARIOS)} or 'all'")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the base model's and the adapters' dtype")
    p.add_argument("--scaling-n", default=None, type=lambda v: tuple(int(x) for x in v.split(",")),
                   help="scenario 9: comma list of N (default 1,16,64,256,1000)")
    p.add_argument("--no-scaling-layouts", dest="scaling_layouts", action="store_false",
                   help="scenario 9: the default pool layout only (not af.stack / exact / max)")
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.add_argument("--png", default=None, help="write a bar chart of the ratios here")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, 1 repeat (smoke test)")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.heads, args.ffn, args.vocab = 32, 1, 2, 48, 97
        args.batch, args.seq, args.r, args.repeats, args.warmup = 2, 8, 4, 1, 0
    return args


def _meta(t0: float) -> dict[str, Any]:
    """Where and when the run happened (docs/performance.md shows it beside the tables)."""
    import datetime
    import platform
    from importlib import metadata

    from adaptfn.pooling import native_status

    versions = {}
    for dist in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": round(time.perf_counter() - t0, 1), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "versions": versions,
            "pool_kernel": native_status()}


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    names = list(SCENARIOS) if args.scenarios == "all" else args.scenarios.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenarios {unknown}; have {list(SCENARIOS)}")
    t0 = time.perf_counter()
    w = Workload(args)
    print(f"workload: OPT hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab}; "
          f"batch {args.batch}x{args.seq}; LoRA r={args.r} alpha={args.alpha:g} on {TARGETS}; "
          f"{args.threads} threads, {args.device}, {args.dtype}; torch {torch.__version__}", flush=True)
    results = []
    for n in names:
        r = SCENARIOS[n](w)
        results.append(r)
        status = ", ".join(f"{k}={v:.3f}" + (f" (<= {r.targets[k]:g}: {'ok' if v <= r.targets[k] else 'MISSED'})"
                                              if k in r.targets else "") for k, v in r.ratios.items())
        print(f"[{time.perf_counter() - t0:6.1f}s] {r.scenario}: {status}", flush=True)
    print()
    print(table(results))
    for r in results:
        for note in r.notes:
            print(f"- {r.scenario}: {note}")
        for k, v in r.extra.items():
            print(f"- {r.scenario}: {k} = {v}")
    if args.json:
        meta = _meta(t0)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "meta": meta, "results": [asdict(r) for r in results]}, f, indent=2)
    if args.png:
        plot(results, args.png)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
