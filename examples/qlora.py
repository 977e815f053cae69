"""QLoRA, functionally: train a LoRA adapter on a 4-bit base with ``torch.func.grad``, save it in PEFT's format,
reload it (adaptfn and PEFT) and fold it into a float model.

Steps:

1. build a small Llama from a config, save it, load it back 4-bit (nf4, double quantization) with
   transformers' ``BitsAndBytesConfig`` -- the quantized model is never modified from here on;
2. ``fn, params = af.functional(model)``; a LoRA adapter on every Linear of the blocks;
3. train it on a toy task (continue a counting sequence: token t is followed by t + 1) with
   ``torch.func.grad_and_value`` over the adapter and ``af.optim.adamw``: the gradient flows through the
   4-bit layers (adaptfn's torch.func-compatible path: input gradients from the dequantized weights);
4. ``af.save`` (PEFT layout) -> ``af.load`` and ``peft.PeftModel.from_pretrained`` on a fresh 4-bit load:
   the same logits;
5. ``af.merge(params, adapter, dequantize=True)``: float weights with the adapter folded in, loaded into
   a plain float ``LlamaForCausalLM`` -- the same logits again (a requantizing ``af.merge`` is shown too,
   with its reported error).

Run:  .venv/bin/python examples/qlora.py            (well under a minute on 2 CPU cores)
      .venv/bin/python examples/qlora.py --steps 3  (smoke run)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import warnings
from typing import Any

import torch

import adaptfn as af

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
VOCAB, SEQ = 64, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_and_save(folder: str) -> None:
    """A small random Llama (128 wide: bitsandbytes' 4-bit blocks), saved as a transformers checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def load_4bit(folder: str) -> Any:
    """The saved model, quantized on load: nf4 codes, double-quantized scales, float32 compute."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu").eval()


def batch(g: torch.Generator, n: int = 8) -> torch.Tensor:
    """Counting sequences from random starts: [n, SEQ] token ids, t followed by t + 1 (mod VOCAB)."""
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    return (start + torch.arange(SEQ)) % VOCAB


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--out", default=None, help="where to save the adapter (default: a temp folder)")
    args = p.parse_args(argv)
    # one torch thread: bitsandbytes' CPU kernels run on the system's OpenMP runtime, torch on its own, and
    # torch's spinning workers slow each bitsandbytes call down badly on a few cores (this model is tiny anyway)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="adaptfn-qlora-") as work:
        return run(args, os.path.join(work, "base"), args.out or os.path.join(work, "adapter"))


def run(args: argparse.Namespace, base_dir: str, out_dir: str) -> dict[str, Any]:
    """Steps 1-5 (see the module docstring); returns the numbers printed on the RESULT line."""
    t0 = time.perf_counter()
    build_and_save(base_dir)

    # 1-2. a 4-bit base and a LoRA adapter on its quantized Linear layers
    model = load_4bit(base_dir)
    fn, params = af.functional(model)
    n4 = sum(af.quant.is_quantized(v) for v in params.values())
    kind = type(params["model.layers.0.self_attn.q_proj.weight"]).__name__
    print(f"4-bit base: {n4} quantized weights ({kind})")
    cfg = af.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
    adapter = af.init(fn, cfg, generator=torch.Generator().manual_seed(0))
    print(adapter)

    # 3. train: grad over the adapter tree, through the 4-bit layers
    def loss_fn(a: af.Adapter, ids: torch.Tensor) -> torch.Tensor:
        return af.inject(fn, a)(params, input_ids=ids, labels=ids).loss

    grad_and_loss = torch.func.grad_and_value(loss_fn)
    opt = af.optim.adamw(lr=args.lr, weight_decay=0.0)
    state = opt.init(adapter)
    g = torch.Generator().manual_seed(1)
    held_out = batch(torch.Generator().manual_seed(123), 16)
    with torch.no_grad():
        before = float(loss_fn(adapter, held_out))
    for step in range(args.steps):
        grads, loss = grad_and_loss(adapter, batch(g))
        adapter, state = opt.update(grads, state, adapter)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {float(loss):.4f}")
    with torch.no_grad():
        after = float(loss_fn(adapter, held_out))
    print(f"held-out loss: {before:.4f} -> {after:.4f}  ({time.perf_counter() - t0:.1f}s so far)")

    # 4. save in PEFT's format; reload in adaptfn and in PEFT (on a fresh 4-bit load)
    af.save(adapter, out_dir)
    ids = held_out[:4]
    with torch.no_grad():
        trained = af.inject(fn, adapter)(params, input_ids=ids).logits
        reloaded = af.inject(fn, af.load(out_dir))(params, input_ids=ids).logits
    import bitsandbytes as bnb
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(load_4bit(base_dir), out_dir).eval()
    # like with like: keep PEFT's 4-bit layers in adaptfn's standard layout (AVX512-BF16 CPUs would repack them)
    for m in pm.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        from_peft = pm(input_ids=ids).logits
    scale = float(trained.abs().max())
    af_diff = float((reloaded - trained).abs().max()) / scale
    peft_diff = float((from_peft - trained).abs().max()) / scale
    layer = type(pm.base_model.model.model.layers[0].self_attn.q_proj)
    print(f"reloaded in adaptfn: rel. diff {af_diff:.2e};  in PEFT ({layer.__module__}.{layer.__name__}): "
          f"rel. diff {peft_diff:.2e}")

    # 5. fold into float weights -> a plain float model; and the requantizing merge
    from transformers import LlamaForCausalLM

    float_params = af.merge(params, adapter, dequantize=True)
    float_model = LlamaForCausalLM(model.config).eval()
    keys = float_model.state_dict().keys()  # (params also holds non-persistent buffers: rotary inv_freq)
    float_model.load_state_dict({k: v for k, v in float_params.items() if k in keys}, strict=True)
    with torch.no_grad():
        merged_float = float_model(input_ids=ids).logits
        fn_float = fn(float_params, input_ids=ids).logits
    float_diff = float((merged_float - trained).abs().max()) / scale
    fn_float_diff = float((fn_float - trained).abs().max()) / scale
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        requantized = af.merge(params, adapter)
    errs = [r.message.errors for r in rec if isinstance(r.message, af.quant.RequantizationWarning)]
    with torch.no_grad():
        requant_diff = float((fn(requantized, input_ids=ids).logits - trained).abs().max()) / scale
    worst = max(errs[0].values()) if errs else float("nan")
    print(f"merged float model: rel. diff {float_diff:.2e} (fn on the float params: {fn_float_diff:.2e}); "
          f"requantized merge: max weight error {worst:.3g}, rel. logit diff {requant_diff:.2e}")
    result = {
        "steps": args.steps, "before": before, "after": after, "adaptfn_reload_diff": af_diff,
        "peft_reload_diff": peft_diff, "merged_float_diff": float_diff, "fn_float_diff": fn_float_diff,
        "requantized_max_weight_error": worst, "requantized_logit_diff": requant_diff,
        "out": out_dir if args.out else None,
        "seconds": time.perf_counter() - t0,
    }
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
