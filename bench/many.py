"""Many adapters in one call (issue: vmap over stacks and per-row routing) vs PEFT.

Scenarios (registered in bench.run):
* ``same``: N adapters on the same inputs; adaptfn ``route="all"`` / ``vmap`` vs PEFT's loop of
  ``set_adapter`` + forward, at batch 8x128 and 1x32.
* ``mixed``: a batch of 32 rows, each with one of 16 adapters; adaptfn ``route=`` vs PEFT's
  ``adapter_names=`` and vs the base model, on OPT (attention targets) and Llama (attention + MLP),
  at 1 and 128 tokens per row.
* ``hetero``: a mixed batch over 16 adapters that target different modules (a stack of the union of their
  targets) vs 16 adapters that all target that union, same ranks: ``route=`` on both, interleaved.
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any

import torch

from bench.harness import Result, interleaved

OPT_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(kind: str, args: Any):
    if kind == "opt":
        from transformers import OPTConfig, OPTForCausalLM

        cfg = OPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        ffn_dim=args.ffn, num_attention_heads=args.heads, max_position_embeddings=2048,
                        word_embed_proj_dim=args.hidden, attn_implementation="sdpa")
        torch.manual_seed(0)
        return _placed(OPTForCausalLM(cfg).eval(), args)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      intermediate_size=args.ffn, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=2048, attn_implementation="sdpa")
    torch.manual_seed(0)
    return _placed(LlamaForCausalLM(cfg).eval(), args)


def _placed(model: Any, args: Any) -> Any:
    """``model`` on ``args.device`` in ``args.dtype`` (the bench's --device / --dtype flags)."""
    return model.to(device=getattr(args, "device", "cpu"), dtype=getattr(torch, getattr(args, "dtype", "float32")))


def _device(args: Any) -> str:
    return getattr(args, "device", "cpu")


class Many:
    """A base model, N adapters (made by adaptfn, saved, loaded into one PeftModel), their stack. ``targets`` is
    one list for every adapter, or a function ``i -> list`` giving adapter ``i`` its own."""

    def __init__(self, kind: str, targets: Any, n: int, args: Any, peft_too: bool = True) -> None:
        import adaptfn as af

        self.base = _model(kind, args)
        self.fn, self.params = af.functional(self.base)
        self.adapters = []
        for i in range(n):
            tm = targets(i) if callable(targets) else targets
            cfg = af.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=tm, init_lora_weights=False)
            self.adapters.append(af.init(self.fn, cfg, generator=torch.Generator(_device(args)).manual_seed(1000 + i)))
        self.stacked = af.stack(self.adapters)
        self.names = [f"a{i}" for i in range(n)]
        self.peft = None
        if peft_too:
            import peft

            tmp = tempfile.mkdtemp(prefix="adaptfn-many-")
            for name, a in zip(self.names, self.adapters):
                af.save(a, os.path.join(tmp, name))
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(self.base), os.path.join(tmp, "a0"), adapter_name="a0")
            for name in self.names[1:]:
                pm.load_adapter(os.path.join(tmp, name), adapter_name=name)
            self.peft = pm.eval()


def _ids(vocab: int, b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def scenario_same(w: Any) -> Result:
    import adaptfn as af

    args = w.args
    n = 8
    m = Many("opt", OPT_ATTN + ["fc1", "fc2"], n, args)
    med_all: dict[str, float] = {}
    ratios: dict[str, float] = {}
    for b, t in ((args.batch, args.seq), (1, 32 if not args.tiny else 4)):
        ids = _ids(args.vocab, b, t).to(_device(args))
        g_all = af.inject(m.fn, m.stacked, route="all")

        def peft_loop():
            with torch.inference_mode():
                for name in m.names:
                    m.peft.set_adapter(name)
                    m.peft(input_ids=ids, use_cache=False)

        def af_all():
            with torch.inference_mode():
                g_all(m.params, input_ids=ids, use_cache=False)

        def af_vmap():
            with torch.inference_mode():
                torch.func.vmap(lambda a: af.inject(m.fn, a)(m.params, input_ids=ids, use_cache=False).logits)(
                    m.stacked)

        med = interleaved({"peft loop": peft_loop, "route=all": af_all, "vmap": af_vmap},
                          max(3, args.repeats // 3), max(1, args.warmup // 2))
        best = min(med["route=all"], med["vmap"])
        tag = f"{b}x{t}"
        ratios[f"best/peft {tag}"] = best / med["peft loop"]
        ratios[f"route=all/peft {tag}"] = med["route=all"] / med["peft loop"]
        ratios[f"vmap/peft {tag}"] = med["vmap"] / med["peft loop"]
        med_all.update({f"{k} {tag}": v for k, v in med.items()})
    return Result(f"7 same inputs, N={n}", med_all, ratios,
                  {f"best/peft {args.batch}x{args.seq}": 0.9, f"best/peft 1x{32 if not args.tiny else 4}": 0.5})


def scenario_mixed(w: Any) -> Result:
    import adaptfn as af

    args = w.args
    n, rows = (16, 32) if not args.tiny else (3, 4)
    meds: dict[str, float] = {}
    ratios: dict[str, float] = {}
    targets: dict[str, float] = {}
    for kind, tm in (("opt", OPT_ATTN), ("llama", LLAMA_ALL)):
        m = Many(kind, tm, n, args)
        idx = (torch.arange(rows) % n).to(_device(args))
        names = [m.names[i] for i in idx.tolist()]
        g = af.inject(m.fn, m.stacked, route=idx)
        for t in (1, args.seq):
            ids = _ids(args.vocab, rows, t, seed=t).to(_device(args))

            def base():
                with torch.inference_mode():
                    m.base(input_ids=ids, use_cache=False)

            def peft_mixed():
                with torch.inference_mode():
                    m.peft(input_ids=ids, adapter_names=names, use_cache=False)

            def routed():
                with torch.inference_mode():
                    g(m.params, input_ids=ids, use_cache=False)

            med = interleaved({"base": base, "peft adapter_names": peft_mixed, "route": routed},
                              max(5, args.repeats // 2), args.warmup)
            tag = f"{kind} {rows}x{t}"
            meds.update({f"{k} {tag}": v for k, v in med.items()})
            ratios[f"route/peft {tag}"] = med["route"] / med["peft adapter_names"]
            ratios[f"route/base {tag}"] = med["route"] / med["base"]
            long = t > 1
            targets[f"route/peft {tag}"] = 0.95 if long else 0.5
            targets[f"route/base {tag}"] = 1.10 if long else 1.3
    return Result(f"8 mixed batch, {n} adapters", meds, ratios, targets)


def hetero_targets(i: int) -> list[str]:
    """Adapter ``i``'s targets: attention (q, v, and o or k by parity) plus one MLP projection in turn; over 16
    adapters the union is all seven Llama projections, and no two neighbours target the same modules."""
    return ["q_proj", "v_proj", "o_proj" if i % 2 else "k_proj", ["gate_proj", "up_proj", "down_proj"][i % 3]]


def scenario_hetero(w: Any) -> Result:
    """Adapters with different targets in one mixed batch cost what a same-target stack of their union costs:
    where an adapter lacks a module its rows run the union's kernels on zero leaves (padding), nothing more."""
    import adaptfn as af

    args = w.args
    n, rows = (16, 32) if not args.tiny else (3, 4)
    het = Many("llama", hetero_targets, n, args, peft_too=False)
    union = sorted({t for i in range(n) for t in hetero_targets(i)})
    same = Many("llama", union, n, args, peft_too=False)
    assert set(het.stacked.paths) == set(same.stacked.paths)
    idx = (torch.arange(rows) % n).to(_device(args))
    g_het, g_same = af.inject(het.fn, het.stacked, route=idx), af.inject(same.fn, same.stacked, route=idx)
    meds: dict[str, float] = {}
    ratios: dict[str, float] = {}
    for t in (1, args.seq):
        ids = _ids(args.vocab, rows, t, seed=t).to(_device(args))

        def run_het():
            with torch.inference_mode():
                g_het(het.params, input_ids=ids, use_cache=False)

        def run_same():
            with torch.inference_mode():
                g_same(same.params, input_ids=ids, use_cache=False)

        med = interleaved({"different targets": run_het, "same targets (the union)": run_same},
                          max(5, args.repeats // 2), max(1, args.warmup))
        tag = f"{rows}x{t}"
        meds.update({f"{k} {tag}": v for k, v in med.items()})
        ratios[f"different/same {tag}"] = med["different targets"] / med["same targets (the union)"]
    return Result(f"11 different targets, {n} adapters", meds, ratios, {k: 1.05 for k in ratios},
                  notes=[f"each adapter targets 4 of the {len(union)} Llama projections; the same-target stack targets"
                         " all of them, same ranks"])
