"""Convolution scenario: LoRA on a diffusers UNet2DConditionModel's conv layers, adaptfn vs PEFT.

The UNet is built from a config (``--tiny``: a toy one): block channels (64, 128), one layer per block, a 32 x 32
sample of 4 channels, batch 4, text context 8 x 64; float32, eval, ``inference_mode``. LoRA r=16, alpha=32 on every
``nn.Conv2d`` PEFT's users target in a UNet: the resnets' ``conv1`` / ``conv2`` / ``conv_shortcut``, the
down/upsamplers' ``conv``, the transformers' ``proj_in`` / ``proj_out`` (1x1 convs in this config), ``conv_in``,
``conv_out``. The adapters are made and saved by PEFT and loaded by adaptfn, so both run the same weights.

Timed, interleaved:

* unmerged forward: ``inject(fn, a)(params, x, t, ctx)`` vs PEFT's unmerged ``PeftModel(x, t, ctx)`` vs the base
  model. adaptfn runs each adapted conv in inference as one convolution with ``W + s * B . A`` (formed by one GEMM
  per call, far cheaper than the conv when the batch has more output pixels than the layer has channels); PEFT runs
  the base conv, then ``lora_A`` (a conv) and ``lora_B`` (a 1x1 conv) and adds.
* mixed batch: each of the 4 rows with one of 4 adapters (one row per adapter): ``route=`` vs PEFT's
  ``adapter_names=``. adaptfn's ``merged`` kernel runs one convolution per adapter's rows with that adapter's
  ``W + s_j * B_j . A_j``; PEFT runs the base conv on the batch and each adapter's pair on its rows.
* a training step (forward and backward of ``sample.square().mean()`` into the LoRA weights): adaptfn's
  ``torch.func.grad`` over the adapter vs PEFT's ``loss.backward()``; both run the low-rank pair here (autograd).
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from typing import Any

import torch

from bench.harness import Result, inference, interleaved

CONV_TARGETS = ["conv1", "conv2", "conv_shortcut", "conv", "proj_in", "proj_out", "conv_in", "conv_out"]


def unet(tiny: bool) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if tiny:
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4).eval()
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32).eval()


def scenario_conv(w: Any) -> Result:
    import peft

    import adaptfn as af

    args, dev = w.args, w.device
    tiny = bool(getattr(args, "tiny", False))
    base = unet(tiny).to(dev)
    size, ctx = (8, 12) if tiny else (32, 64)
    bsz, n = 4, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(bsz, 4, size, size, generator=g).to(dev)
    t = torch.tensor([1, 5, 7, 9]).to(dev)
    e = torch.randn(bsz, 8, ctx, generator=g).to(dev)
    r = 4 if tiny else 16
    with tempfile.TemporaryDirectory(prefix="adaptfn-bench-conv-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = [f"a{i}" for i in range(n)]
        for i, name in enumerate(names):
            torch.manual_seed(100 + i)
            lc = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=CONV_TARGETS, init_lora_weights=False)
            peft.get_peft_model(copy.deepcopy(base), lc).save_pretrained(os.path.join(tmp, name))
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(tmp, names[0]), adapter_name=names[0])
        for name in names[1:]:
            pm.load_adapter(os.path.join(tmp, name), adapter_name=name)
        pm.set_adapter(names[0])
        pm.eval()
        adapters = [af.load(os.path.join(tmp, name), device=dev) for name in names]
    fn, params = af.functional(base)
    injected = af.inject(fn, adapters[0])
    route = torch.arange(n, device=dev)
    routed = af.inject(fn, af.stack(adapters), route=route)

    def peft_step() -> None:
        pm.zero_grad(set_to_none=True)
        pm(x, t, e).sample.square().mean().backward()

    def loss(a: Any) -> torch.Tensor:
        return injected_with(a)(params, x, t, e).sample.square().mean()

    def injected_with(a: Any) -> Any:
        return af.inject(fn, a)

    train = adapters[0]
    grad = torch.func.grad(loss)
    for p in pm.parameters():
        p.requires_grad_(False)
    for name, p in pm.named_parameters():
        if ".lora_" in name and f".{names[0]}." in name:
            p.requires_grad_(True)
    with torch.inference_mode():
        ref = pm(x, t, e).sample
        err = float((injected(params, x, t, e).sample - ref).abs().max() / ref.abs().max())
        mixed_ref = pm(x, t, e, adapter_names=names).sample
        err_mixed = float((routed(params, x, t, e).sample - mixed_ref).abs().max() / mixed_ref.abs().max())
    med = interleaved({
        "base": inference(lambda: base(x, t, e)),
        "peft": inference(lambda: pm(x, t, e)),
        "adaptfn": inference(lambda: injected(params, x, t, e)),
        "peft adapter_names": inference(lambda: pm(x, t, e, adapter_names=names)),
        "route": inference(lambda: routed(params, x, t, e)),
        "peft train step": peft_step,
        "adaptfn train step": lambda: grad(train),
    }, args.repeats, args.warmup)
    res = Result("12 conv LoRA, UNet", med,
                 {"adaptfn/peft": med["adaptfn"] / med["peft"], "adaptfn/base": med["adaptfn"] / med["base"],
                  "route/peft": med["route"] / med["peft adapter_names"], "route/base": med["route"] / med["base"],
                  "train adaptfn/peft": med["adaptfn train step"] / med["peft train step"]},
                 {"adaptfn/peft": 1.0, "route/peft": 1.0},
                 notes=[f"{'tiny' if tiny else 'default'} UNet, batch {bsz} x 4 x {size} x {size}, r={r}, "
                        f"{len(adapters[0].paths)} conv targets; mixed batch: {n} adapters, one row each"],
                 extra={"rel_err_vs_peft": err, "rel_err_mixed_vs_peft": err_mixed})
    return res
