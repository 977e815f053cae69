"""QLoRA scenario: a 4-bit (nf4, double quantization) base with a LoRA adapter, adaptfn vs PEFT.

The workload's OPT config (widths rounded up to multiples of 128: bitsandbytes' 4-bit blocks) is saved and
loaded twice by transformers with ``BitsAndBytesConfig(load_in_4bit=True)`` on ``--device`` (float32
compute on CPU, bfloat16 on CUDA): one copy for PEFT (``get_peft_model`` wraps it in place), one for adaptfn,
with the same quantized bytes and the same adapter (PEFT saves it, adaptfn loads the folder). Timed,
interleaved: an inference forward (``inference_mode``) and a training step -- PEFT's
``loss.backward()`` into its LoRA parameters vs adaptfn's ``torch.func.grad`` over the adapter tree.

Both copies are kept in bitsandbytes' standard 4-bit layout (``support_avx512bf16_for_cpu = False`` on every
``Linear4bit`` before any forward): on CPUs with AVX512-BF16, bitsandbytes' own eval forward would otherwise
repack PEFT's weights in place at its first call and from then on run a fused bfloat16 kernel, which also
fails PEFT's training step (an in-place ``result += bias`` under autograd). adaptfn never repacks, so both
contenders run the same standard 4-bit kernel.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Any

import torch

from bench.harness import Result, interleaved


def _round128(n: int) -> int:
    return max(128, -(-n // 128) * 128)


def scenario_qlora(w: Any) -> Result:
    import bitsandbytes as bnb
    import peft
    from transformers import BitsAndBytesConfig, OPTConfig, OPTForCausalLM

    import adaptfn as af

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    args, dev = w.args, w.device
    hidden, ffn = _round128(args.hidden), _round128(args.ffn)
    heads = args.heads if hidden % args.heads == 0 else 2
    cfg = OPTConfig(vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=args.layers, ffn_dim=ffn,
                    num_attention_heads=heads, max_position_embeddings=max(2048, args.seq),
                    word_embed_proj_dim=hidden, attn_implementation="sdpa")
    compute = torch.bfloat16 if dev.type == "cuda" else torch.float32
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    with tempfile.TemporaryDirectory(prefix="adaptfn-bench-qlora-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        OPTForCausalLM(cfg).save_pretrained(os.path.join(tmp, "base"))

        def load() -> Any:
            model = OPTForCausalLM.from_pretrained(os.path.join(tmp, "base"), quantization_config=qcfg,
                                                   device_map={"": str(dev)}).eval()
            for m in model.modules():  # the standard 4-bit layout: bitsandbytes' eval forward never repacks
                if isinstance(m, bnb.nn.Linear4bit):
                    m.support_avx512bf16_for_cpu = False
            return model

        torch.manual_seed(1)
        pm = peft.get_peft_model(load(), peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets,
                                                         init_lora_weights=False)).eval()
        pm.save_pretrained(os.path.join(tmp, "lora"))
        fn, params = af.functional(load())
        adapter = af.load(os.path.join(tmp, "lora"), device=dev)
    g = af.inject(fn, adapter)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen).to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        a = g(params, input_ids=ids, use_cache=False).logits
        b = pm(input_ids=ids, use_cache=False).logits
    rel_err = float((a.float() - b.float()).abs().max() / b.float().abs().max())

    def peft_fwd() -> None:
        with torch.inference_mode():
            pm(input_ids=ids, use_cache=False)
        sync()

    def af_fwd() -> None:
        with torch.inference_mode():
            g(params, input_ids=ids, use_cache=False)
        sync()

    def peft_step() -> None:
        pm.zero_grad(set_to_none=True)
        pm(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        sync()

    def loss(ad: af.Adapter) -> torch.Tensor:
        return af.inject(fn, ad)(params, input_ids=ids, labels=ids, use_cache=False).loss

    grad = torch.func.grad(loss)

    def af_step() -> None:
        grad(adapter)
        sync()

    # the same gradients through ordinary autograd: the adapter's trainable leaves require grad
    with_grad = af.tree.map(lambda t: t.detach().requires_grad_(t.is_floating_point()), adapter)
    leaves = [t for p in with_grad.paths for n, t in with_grad.tensors[p].items() if n != "gate"]

    def af_autograd_step() -> None:
        torch.autograd.grad(loss(with_grad), leaves)
        sync()

    med = interleaved({"peft fwd": peft_fwd, "adaptfn fwd": af_fwd, "peft step": peft_step,
                       "adaptfn step (func.grad)": af_step, "adaptfn step (autograd)": af_autograd_step},
                      args.repeats, args.warmup)
    best = min(med["adaptfn step (func.grad)"], med["adaptfn step (autograd)"])
    res = Result(f"10 qlora (4-bit nf4, {dev.type})", med,
                 {"fwd adaptfn/peft": med["adaptfn fwd"] / med["peft fwd"],
                  "step best adaptfn/peft": best / med["peft step"],
                  "step func.grad/peft": med["adaptfn step (func.grad)"] / med["peft step"],
                  "step autograd/peft": med["adaptfn step (autograd)"] / med["peft step"]},
                 {"fwd adaptfn/peft": 1.0, "step best adaptfn/peft": 1.0},
                 extra={"rel_err_vs_peft": rel_err})
    res.notes.append(f"OPT hidden {hidden}, ffn {ffn}, {args.layers} layers, compute {str(compute)[6:]}; "
                     "step = grads of the LoRA weights (PEFT: loss.backward; adaptfn: torch.func.grad over the "
                     "tree, or torch.autograd.grad on leaves that require grad); both in bitsandbytes' standard "
                     "4-bit layout, so both run the standard 4-bit kernel (no CPU repack for AVX512-BF16's bf16 "
                     "kernel); on CPU, bitsandbytes' OpenMP runtime competes with torch's (try --threads 1 on few "
                     "cores)")
    return res
