"""DoRA scenario: an unmerged DoRA forward (``use_dora=True``), adaptfn ``inject`` vs PEFT's DoRA layers vs the base.

On the default workload (OPT, batch x seq tokens, r / alpha on q/k/v/out_proj, fc1, fc2). The adapter is made and
saved by PEFT (random ``A``, ``B``, magnitudes moved off their initial norms) and loaded by adaptfn, so both run
the same weights; the scenario prints their relative difference. Timed, interleaved, under ``inference_mode``:
the full batch and a decode-sized call (1 x 1 token).

PEFT recomputes every DoRA layer's weight norm at each call (``B(A(I))``, ``W + s B A``, the row norms: its
``ENABLE_DORA_CACHING`` is off by default); adaptfn computes the same factor once per adapter version in inference
(the cache follows in-place updates) and fuses ``bias + f (x W^T + s (x A^T) B^T)`` into one buffer.

Conv case (``conv ...`` medians): DoRA on the convolutions of the conv scenario's diffusers UNet (``bench/conv.py``,
same size, r=16 / alpha=32; ``--tiny``: the toy UNet), unmerged forward under ``inference_mode``, adaptfn vs PEFT's
``DoraConv2dLayer``. PEFT runs the base conv, recomputes the weight norm (``B.view(-1, r) @ A.view(r, -1)``, the
norms over ``[out, in * k]``), runs ``lora_A`` / ``lora_B`` and assembles four passes; adaptfn runs each layer as
one convolution with ``f * (W + s dW)``, cached per adapter version (``adaptfn/methods/dora_conv.py``).
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch

from bench.harness import Result, inference, interleaved

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def scenario_dora(w: Any) -> Result:
    import peft

    import adaptfn as af

    args, dev = w.args, w.device
    lc = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS, init_lora_weights=False,
                         use_dora=True)
    torch.manual_seed(300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(w.base), lc)
    g = torch.Generator().manual_seed(301)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g).to(p.device))
    pm.eval()
    folder = os.path.join(w.tmp, "dora")
    pm.save_pretrained(folder)
    adapted = af.inject(w.fn, af.load(folder, device=dev))

    def check() -> float:
        with torch.no_grad():
            a = adapted(w.params, input_ids=w.ids).logits
            b = pm(input_ids=w.ids).logits
        return float((a - b).abs().max() / b.abs().max())

    med: dict[str, float] = {}
    for tag, ids, reps, warm in (("", w.ids, args.repeats, args.warmup),
                                 ("decode ", w.ids1, args.repeats * 4, args.warmup * 4)):
        m = interleaved({
            "base": inference(lambda ids=ids: w.base(input_ids=ids, use_cache=False)),
            "peft": inference(lambda ids=ids: pm(input_ids=ids, use_cache=False)),
            "adaptfn": inference(lambda ids=ids: adapted(w.params, input_ids=ids, use_cache=False)),
        }, reps, warm)
        med.update({tag + k: v for k, v in m.items()})
    conv_err = _conv_case(w, med)
    ratios = {"adaptfn/peft": med["adaptfn"] / med["peft"], "adaptfn/base": med["adaptfn"] / med["base"],
              "decode adaptfn/peft": med["decode adaptfn"] / med["decode peft"],
              "conv adaptfn/peft": med["conv adaptfn"] / med["conv peft"]}
    return Result("13 DoRA unmerged forward", med, ratios, {"adaptfn/peft": 0.9},
                  notes=[f"{args.batch}x{args.seq} and 1x1 tokens; PEFT {peft.__version__} recomputes the weight "
                         "norms at every call, adaptfn once per adapter version; conv: DoRA on the conv "
                         "scenario's UNet convolutions"],
                  extra={"dora_rel_err_vs_peft": check(), "conv_dora_rel_err_vs_peft": conv_err})


def _conv_case(w: Any, med: dict[str, float]) -> float:
    """DoRA on the UNet's convolutions (see the module docstring): adds ``conv base`` / ``conv peft`` / ``conv
    adaptfn`` medians to ``med``; returns adaptfn's relative difference from PEFT's output."""
    import peft

    import adaptfn as af
    from bench.conv import CONV_TARGETS, unet

    args, dev = w.args, w.device
    tiny = bool(getattr(args, "tiny", False))
    base = unet(tiny).to(dev)
    size, ctx = (8, 12) if tiny else (32, 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, size, size, generator=g).to(dev)
    t = torch.tensor([1, 5, 7, 9]).to(dev)
    e = torch.randn(4, 8, ctx, generator=g).to(dev)
    r = 4 if tiny else 16
    torch.manual_seed(302)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=CONV_TARGETS, init_lora_weights=False, use_dora=True))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g).to(p.device))
    pm.eval()
    folder = os.path.join(w.tmp, "dora-conv")
    pm.save_pretrained(folder)
    fn, params = af.functional(base)
    adapted = af.inject(fn, af.load(folder, device=dev))
    with torch.inference_mode():
        ref = pm(x, t, e).sample
        err = float((adapted(params, x, t, e).sample - ref).abs().max() / ref.abs().max())
    m = interleaved({
        "conv base": inference(lambda: base(x, t, e)),
        "conv peft": inference(lambda: pm(x, t, e)),
        "conv adaptfn": inference(lambda: adapted(params, x, t, e)),
    }, args.repeats, args.warmup)
    med.update(m)
    return err
