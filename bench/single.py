"""Scenario 14 (issue "Scale"): one LoRA adapter on a small Llama, unmerged, against the base model and PEFT.

Workload: transformers Llama from config, hidden 448, 3 layers, 7 heads (7 key/value heads), ffn 1216, vocab
8192, float32, eval; batch 4 x 96 tokens; LoRA r=8, alpha=16 on q/v/o_proj, gate_proj, down_proj (made and saved
by PEFT, loaded by adaptfn). ``--tiny`` shrinks it. The LoRA FLOPs are ~1.3 % of the forward's.
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any

import torch

from bench.harness import Result, interleaved

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
SIZES = {"hidden": 448, "layers": 3, "heads": 7, "ffn": 1216, "vocab": 8192, "batch": 4, "seq": 96, "r": 8}
TINY = {"hidden": 28, "layers": 1, "heads": 2, "ffn": 40, "vocab": 97, "batch": 2, "seq": 8, "r": 4}


def workload(tiny: bool, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The base model, PEFT's saved adapter folder, a PeftModel on a copy, and the inputs."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    s = TINY if tiny else SIZES
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                      intermediate_size=s["ffn"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=2048, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)
    lc = peft.LoraConfig(r=s["r"], lora_alpha=2 * s["r"], target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), lc)
    d = os.path.join(tempfile.mkdtemp(prefix="adaptfn-single-"), "a")
    pm.save_pretrained(d)
    ids = torch.randint(3, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(2)).to(device)
    return {"base": base, "peft": pm.eval(), "dir": d, "ids": ids, "sizes": s}


def scenario_single_llama(w: Any) -> Result:
    """Scenario 14: unmerged inject / base, PEFT / base and merged / base on the small Llama, interleaved."""
    import adaptfn as af

    args = w.args
    device = getattr(args, "device", "cpu")
    wl = workload(args.tiny, device)
    base, pm, ids = wl["base"], wl["peft"], wl["ids"]
    fn, params = af.functional(base)
    a = af.load(wl["dir"], device=device)
    g = af.inject(fn, a)
    merged = af.merge(params, a)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def run(f: Any) -> Any:
        def go() -> None:
            with torch.inference_mode():
                f()
            sync()
        return go

    with torch.inference_mode():
        got = g(params, input_ids=ids, use_cache=False).logits
        want = pm(input_ids=ids, use_cache=False).logits
    med = interleaved({
        "base": run(lambda: base(input_ids=ids, use_cache=False)),
        "adaptfn inject": run(lambda: g(params, input_ids=ids, use_cache=False)),
        "peft": run(lambda: pm(input_ids=ids, use_cache=False)),
        "adaptfn merged": run(lambda: fn(merged, input_ids=ids, use_cache=False)),
    }, args.repeats * 2, args.warmup * 2)
    s = wl["sizes"]
    r = Result(f"14 single adapter on Llama (hidden {s['hidden']}, {s['layers']} layers, {s['batch']}x{s['seq']})",
               med, {"inject/base": med["adaptfn inject"] / med["base"], "peft/base": med["peft"] / med["base"],
                     "merged/base": med["adaptfn merged"] / med["base"]}, {"inject/base": 1.06})
    r.extra["rel_err_vs_peft"] = float((got - want).abs().max() / want.abs().max())
    r.notes.append("LoRA r=8 on q/v/o_proj, gate_proj, down_proj; the LoRA FLOPs are ~1.3 % of the forward")
    return r
