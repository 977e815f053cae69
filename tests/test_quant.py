"""Quantized bases (bitsandbytes LLM.int8 ``Linear8bitLt`` and 4-bit ``Linear4bit``, nf4 / fp4, double
quantization on / off, compute dtype float32 / bfloat16), loaded by transformers from a saved tiny model.

Tolerances (relative: max abs difference / max abs reference):

* adaptfn vs PEFT's bitsandbytes LoRA / IA3 layers on the same quantized model: ``TOL = 1e-5``. Both run
  the same bitsandbytes kernels on the same quantized weights, so only float rounding can differ (it is 0
  here). The one exception: on CPUs with AVX512-BF16, bitsandbytes' own eval forward first repacks 4-bit
  weights and then computes in bfloat16; adaptfn computes such a layer with the same kernel once it is
  repacked (checked at ``TOL``), but before that with the unpacked fp32 path, so *that* comparison
  gets ``TOL_BF16``.
* gradients of an adapter on the quantized model vs on a float model whose Linear weights are the
  dequantized ones ("float twin"): ``1e-4`` where the quantized forward is exactly dequantize + float
  matmul (4-bit with float32 compute; int8 in training mode, where bitsandbytes uses its dequantizing
  path); ``GRAD_TOL_INT8 = 0.1`` for int8 in eval mode (LLM.int8 also quantizes the *activations* to int8
  per row: ~1/127 relative error per element, measured ~0.04 on the loss gradients); ``TOL_BF16 = 5e-2``
  for bfloat16 compute (8-bit mantissa, ~4e-3 per rounding, measured ~0.015). An all-zero gradient has a
  relative error of 1 and fails every one of these.
* requantizing merge: bit-identical quantized weights to PEFT's ``merge_and_unload`` (same dequantize +
  add + quantize), and the reported error is checked against a recomputation.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import bitsandbytes as bnb
import peft
import pytest
import torch
from torch import nn
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import adaptfn as af
from adaptfn import quant

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" on every int8 call

TOL = 1e-5
TOL_BF16 = 5e-2
GRAD_TOL_EXACT = 1e-4
GRAD_TOL_INT8 = 0.1

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="CUDA bitsandbytes layers need a GPU"))]

QUANTS: dict[str, dict[str, Any]] = {
    "int8": dict(load_in_8bit=True),
    "nf4-dq-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.float32),
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                     bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                     bnb_4bit_compute_dtype=torch.float32),
    "fp4-dq-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16),
}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "opt": ["q_proj", "v_proj", "fc2"]}
ARCH = {"llama": LlamaForCausalLM, "opt": OPTForCausalLM}
VOCAB = {"llama": 67, "opt": 61}


def _llama() -> nn.Module:
    # 128-wide: bitsandbytes' CPU 4-bit kernels want block-aligned sizes; head_dim 64 (even, for RoPE)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB["llama"], hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _opt() -> nn.Module:  # Linear layers with biases
    torch.manual_seed(1)
    cfg = OPTConfig(vocab_size=VOCAB["opt"], hidden_size=128, num_hidden_layers=2, ffn_dim=256,
                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=128,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return OPTForCausalLM(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """bitsandbytes' CPU kernels use the system libgomp, torch its own: on a 2-core machine torch's spinning
    OpenMP workers slow every bitsandbytes call ~50x. These tiny models gain nothing from 2 threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = {}
    for arch, build in (("llama", _llama), ("opt", _opt)):
        d = tmp_path_factory.mktemp(arch)
        build().save_pretrained(d)
        out[arch] = str(d)
    return out


def load(folders: dict[str, str], arch: str, q: str, device: str = "cpu") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARCH[arch].from_pretrained(folders[arch], quantization_config=BitsAndBytesConfig(**QUANTS[q]),
                                          device_map=device).eval()


def float_twin(folders: dict[str, str], arch: str, qm: nn.Module) -> nn.Module:
    """The float model whose quantized layers' weights are the dequantized ones (float32)."""
    fm = ARCH[arch].from_pretrained(folders[arch]).to(next(qm.parameters()).device).train(qm.training)
    sd = {f"{p}.weight": quant.dequantize(m.weight, torch.float32, module=m)
          for p, m in qm.named_modules() if quant.layer_kind(m)}
    assert sd, "no quantized layer found"
    fm.load_state_dict(sd, strict=False)
    return fm


def ids_for(arch: str, device: str = "cpu", seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB[arch], (2, 6), generator=g).to(device)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def lora(fn: af.FunctionalModel, arch: str, seed: int = 0, **kw: Any) -> af.Adapter:
    cfg = af.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False, **kw)
    return af.init(fn, cfg, generator=gen(seed))


def small(a: af.Adapter, s: float = 0.1) -> af.Adapter:
    """Scale lora_B down: a delta of the size training produces (random init gives a large one)."""
    return af.tree.map(lambda t: t * s if t.dim() == 2 and t.shape[1] == 4 else t, a)


def bnb_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}


def repacked(model: nn.Module) -> bool:
    return any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
               for m in bnb_layers(model).values())


# -- snapshots of the user's quantized layers ------------------------------------------------------------
def _freeze(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", v.data_ptr(), v.dtype, tuple(v.shape), v.detach().clone().cpu())
    if isinstance(v, bnb.functional.QuantState):
        return ("qs", id(v), {k: _freeze(x) for k, x in sorted(vars(v).items())})
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything of each bitsandbytes layer an operation could change: the weight object, its bytes,
    version counter and attributes (SCB / CB / quant_state, deep), the layer's state, bias and attributes."""
    snap: dict[str, Any] = {}
    for p, m in bnb_layers(model).items():
        w = m.weight
        d: dict[str, Any] = {
            "weight": (id(w), type(w), w._version, w.requires_grad, _freeze(w.data)),
            "w_attrs": {k: _freeze(getattr(w, k, None)) for k in ("CB", "SCB", "quant_state", "blocksize",
                                                                     "quant_type", "bnb_quantized")},
            "bias": None if m.bias is None else (id(m.bias), m.bias._version, _freeze(m.bias.data)),
            "dict": sorted(m.__dict__),
            "attrs": {k: _freeze(getattr(m, k, None)) for k in ("compute_dtype", "compute_type_is_set", "training",
                                                                 "quant_state")},
        }
        st = getattr(m, "state", None)
        if st is not None:
            d["state"] = (id(st), {k: _freeze(v) for k, v in sorted(vars(st).items())})
        snap[p] = d
    return snap


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# -- 1. parity with PEFT --------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,q", [("llama", q) for q in QUANTS] + [("opt", "int8"), ("opt", "nf4-bf16")])
def test_lora_matches_peft_bnb_layers(folders, arch, q, device, tmp_path) -> None:
    qm = load(folders, arch, q, device)
    fn, params = af.functional(qm)
    a = lora(fn, arch)
    af.save(a, tmp_path / "a")
    ids = ids_for(arch, device)
    g = af.inject(fn, a)
    with torch.no_grad():
        before = g(params, input_ids=ids).logits
        base = fn(params, input_ids=ids).logits
    pm = peft.PeftModel.from_pretrained(qm, str(tmp_path / "a")).eval()
    layer = pm.get_submodule(f"base_model.model.{a.paths[0]}")
    assert type(layer) in (peft.tuners.lora.bnb.Linear8bitLt, peft.tuners.lora.bnb.Linear4bit)
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        after = g(params, input_ids=ids).logits  # the same quantized layers, after PEFT's forward ran on them
    assert rel(before, base) > 1e-3  # the adapter does something
    assert rel(after, ref) <= TOL, rel(after, ref)
    assert rel(before, ref) <= (TOL_BF16 if repacked(qm) else TOL), rel(before, ref)


@pytest.mark.parametrize("q", ["int8", "nf4-dq-fp32"])
def test_peft_saved_lora_on_quantized_model(folders, q, tmp_path) -> None:
    arch = "llama"
    ids = ids_for(arch)
    qm1 = load(folders, arch, q)
    torch.manual_seed(7)
    pm = peft.get_peft_model(qm1, peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS[arch],
                                                  init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "p")
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    qm2 = load(folders, arch, q)  # a second load quantizes the same floats into the same bytes
    fn, params = af.functional(qm2)
    a = af.load(str(tmp_path / "p"))
    with torch.no_grad():
        out = af.inject(fn, a)(params, input_ids=ids).logits
    assert rel(out, ref) <= (TOL_BF16 if repacked(qm1) else TOL)


@pytest.mark.parametrize("arch,q", [("opt", "int8"), ("opt", "fp4-dq-bf16"), ("llama", "nf4-dq-fp32")])
def test_ia3_matches_peft_bnb_layers(folders, arch, q, tmp_path) -> None:
    qm = load(folders, arch, q)
    fn, params = af.functional(qm)
    ff = {"opt": ["fc2"], "llama": ["down_proj"]}[arch]
    a = af.init(fn, af.IA3Config(target_modules=TARGETS[arch], feedforward_modules=ff, init_ia3_weights=False),
                generator=gen(1))
    af.save(a, tmp_path / "a")
    ids = ids_for(arch)
    g = af.inject(fn, a)
    with torch.no_grad():
        before = g(params, input_ids=ids).logits
    pm = peft.PeftModel.from_pretrained(qm, str(tmp_path / "a")).eval()
    assert "ia3.bnb" in type(pm.get_submodule(f"base_model.model.{a.paths[0]}")).__module__
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
        after = g(params, input_ids=ids).logits
    assert rel(after, ref) <= TOL
    assert rel(before, ref) <= (TOL_BF16 if repacked(qm) else TOL)


# -- 2. gradients (QLoRA) --------------------------------------------------------------------------------
GRAD_CASES = [  # (quant, training mode, tolerance vs the float twin; see the module docstring)
    ("int8", False, GRAD_TOL_INT8),
    ("int8", True, GRAD_TOL_EXACT),
    ("nf4-dq-fp32", False, GRAD_TOL_EXACT),
    ("fp4-dq-bf16", True, TOL_BF16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q,train,tol", GRAD_CASES)
def test_grad_matches_dequantized_float_model(folders, q, train, tol, device) -> None:
    arch = "llama"
    qm = load(folders, arch, q, device).train(train)
    fm = float_twin(folders, arch, qm)
    fn, params = af.functional(qm)
    ffn, fparams = af.functional(fm)
    a = small(lora(fn, arch), 0.5)
    ids = ids_for(arch, device)

    def loss(f: af.FunctionalModel, p: dict) -> Any:
        return lambda ad: af.inject(f, ad)(p, input_ids=ids, labels=ids).loss

    g = torch.func.grad(loss(fn, params))(a)
    gf = torch.func.grad(loss(ffn, fparams))(a)
    assert isinstance(g, af.Adapter) and g.paths == a.paths
    for p in a.paths:
        for k in ("lora_A", "lora_B"):
            x, y = g.leaves(p)[k], gf.leaves(p)[k]
            assert y.abs().max() > 0
            assert x.abs().max() > 0, f"{p}.{k}: all-zero gradient"
            assert rel(x, y) <= tol, f"{p}.{k}: {rel(x, y):.3g} > {tol:g}"


@pytest.mark.parametrize("q", ["int8", "nf4-dq-fp32"])
def test_vmap_and_autograd_through_quantized_layers(folders, q) -> None:
    arch = "llama"
    qm = load(folders, arch, q)
    fn, params = af.functional(qm)
    a1, a2 = lora(fn, arch, 0), small(lora(fn, arch, 1), 0.3)
    ids = ids_for(arch)
    stacked = af.stack([a1, a2])

    def logits(ad: af.Adapter) -> torch.Tensor:
        return af.inject(fn, ad)(params, input_ids=ids).logits

    def loss(ad: af.Adapter) -> torch.Tensor:
        return af.inject(fn, ad)(params, input_ids=ids, labels=ids).loss

    with torch.no_grad():
        outs = torch.func.vmap(logits)(stacked)
        for i, ad in enumerate((a1, a2)):
            assert rel(outs[i], logits(ad)) <= TOL
    gs = torch.func.vmap(torch.func.grad(loss))(stacked)
    g1 = torch.func.grad(loss)(a1)
    # plain autograd (loss.backward-style) on leaves that require grad
    leaves = {p: {k: v.detach().clone().requires_grad_(k.startswith("lora")) for k, v in a1.leaves(p).items()}
              for p in a1.paths}
    a_req = af.Adapter(a1.method, a1.config, a1.entries, leaves)
    lo = loss(a_req)
    p0 = a1.paths[0]
    (ga,) = torch.autograd.grad(lo, [leaves[p0]["lora_A"]])
    for p in a1.paths:
        for k in ("lora_A", "lora_B"):
            assert rel(gs.leaves(p)[k][0], g1.leaves(p)[k]) <= TOL
    assert rel(ga, g1.leaves(p0)["lora_A"]) <= TOL


def test_concurrent_calls_on_one_quantized_model(folders) -> None:
    """Threads sharing one int8 model, each with its own adapter: bitsandbytes' own forward would share the
    layer's matmul state between them; adaptfn's gives each call a fresh one."""
    from concurrent.futures import ThreadPoolExecutor

    arch = "llama"
    qm = load(folders, arch, "int8")
    fn, params = af.functional(qm)
    ids = ids_for(arch)
    adapters = [lora(fn, arch, seed) for seed in range(4)]
    with torch.no_grad():
        want = [af.inject(fn, a)(params, input_ids=ids).logits for a in adapters]

    def run(i: int) -> torch.Tensor:
        with torch.no_grad():
            return af.inject(fn, adapters[i % 4])(params, input_ids=ids).logits

    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(run, range(12)))
    for i, out in enumerate(got):
        assert torch.equal(out, want[i % 4]), i


# -- 3. the user's layers are left as found --------------------------------------------------------------
def _everything(folders: dict[str, str], arch: str, qm: nn.Module, tmp_path: Any) -> None:
    """Every operation adaptfn offers on a quantized model."""
    ids = ids_for(arch)
    fn, params = af.functional(qm)
    a = lora(fn, arch)
    g = af.inject(fn, a)
    with torch.no_grad():
        fn(params, input_ids=ids)
        g(params, input_ids=ids)
        fn.generate(params, input_ids=ids[:1, :3], max_new_tokens=2, do_sample=False)
    torch.func.grad(lambda ad: af.inject(fn, ad)(params, input_ids=ids, labels=ids).loss)(a)
    with torch.no_grad():
        torch.func.vmap(lambda ad: af.inject(fn, ad)(params, input_ids=ids).logits)(af.stack([a, a]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", quant.RequantizationWarning)
        merged = af.merge(params, a)
    md = af.merge(params, a, dequantize=True)
    with torch.no_grad():
        fn(merged, input_ids=ids)
        fn(md, input_ids=ids)
    for v in params.values():
        if quant.is_quantized(v):
            quant.dequantize(v)
    af.save(a, tmp_path / "saved")
    ia3 = af.init(fn, af.IA3Config(target_modules=TARGETS[arch], feedforward_modules=[]), generator=gen(2))
    with torch.no_grad():
        af.inject(fn, ia3)(params, input_ids=ids)
    af.merge(params, ia3, dequantize=True)


@pytest.mark.parametrize("arch,q", [("opt", "int8"), ("llama", "nf4-dq-fp32"), ("opt", "fp4-dq-bf16")])
def test_users_quantized_layers_untouched(folders, arch, q, tmp_path) -> None:
    qm = load(folders, arch, q)
    with torch.no_grad():  # the user's own forward first: bitsandbytes moves SCB / repacks (AVX512-BF16) now
        qm(input_ids=ids_for(arch))
    before = snapshot(qm)
    assert before
    _everything(folders, arch, qm, tmp_path)
    assert_same(snapshot(qm), before, "layers")
    for m in bnb_layers(qm).values():
        assert "forward" not in m.__dict__


# -- 4. the CPU-repacked 4-bit layout --------------------------------------------------------------------
def _force_cpu_repack(model: nn.Module) -> None:
    """Make bitsandbytes' own eval forward repack the 4-bit weights, as it does on AVX512-BF16 CPUs."""
    for m in bnb_layers(model).values():
        m.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        try:
            model(input_ids=ids_for("llama"))
        except Exception:  # the fused kernel for that layout may be missing on this CPU; the repack is done
            pass


@pytest.mark.parametrize("q,everything", [("nf4-dq-fp32", True), ("fp4-fp32", False)])
def test_cpu_repacked_4bit_layout(folders, q, everything, tmp_path) -> None:
    arch = "llama"
    plain = load(folders, arch, q)
    packed = load(folders, arch, q)
    _force_cpu_repack(packed)
    assert repacked(packed) and not repacked(plain)
    for p, m in bnb_layers(plain).items():
        qs = m.weight.quant_state
        absmax = qs.absmax
        if qs.nested:
            absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        # the repacked layout keeps absmax in bfloat16: the reference uses the same rounded scales
        ref_qs = bnb.functional.QuantState(absmax=absmax.to(torch.bfloat16).float(), shape=qs.shape, code=qs.code,
                                           blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=qs.dtype)
        ref = bnb.functional.dequantize_4bit(m.weight.data, ref_qs)
        got = quant.dequantize(packed.get_submodule(p).weight)
        assert got.dtype == qs.dtype and torch.equal(got, ref), p
    before = snapshot(packed)
    fm = float_twin(folders, arch, packed)
    fn, params = af.functional(packed)
    ffn, fparams = af.functional(fm)
    ids = ids_for(arch)
    a = small(lora(fn, arch))
    tol = TOL_BF16 if quant._cpu_packed_kernel() else TOL  # that kernel computes in bfloat16
    with torch.no_grad():
        assert rel(af.inject(fn, a)(params, input_ids=ids).logits,
                   af.inject(ffn, a)(fparams, input_ids=ids).logits) <= tol
    g = torch.func.grad(lambda ad: af.inject(fn, ad)(params, input_ids=ids, labels=ids).loss)(a)
    gf = torch.func.grad(lambda ad: af.inject(ffn, ad)(fparams, input_ids=ids, labels=ids).loss)(a)
    for p in a.paths:
        assert rel(g.leaves(p)["lora_A"], gf.leaves(p)["lora_A"]) <= (TOL_BF16 if tol > TOL else GRAD_TOL_EXACT)
    md = af.merge(params, a, dequantize=True)
    with pytest.warns(quant.RequantizationWarning):
        merged = af.merge(params, a)
    k = f"{a.paths[0]}.weight"
    assert not merged[k].quant_state.__dict__.get("packing_format_for_cpu", False)  # a standard-layout tensor
    with torch.no_grad():
        assert rel(fn(md, input_ids=ids).logits, af.inject(ffn, a)(fparams, input_ids=ids).logits) <= TOL
        fn(merged, input_ids=ids)
    if everything:
        _everything(folders, arch, packed, tmp_path)
    assert_same(snapshot(packed), before, "repacked layers")


# -- 5. merge ---------------------------------------------------------------------------------------------
def _delta(a: af.Adapter, path: str) -> torch.Tensor:
    e, lv = a.entries[path], a.leaves(path)
    return (lv["lora_B"] @ lv["lora_A"]) * e.scaling


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q", ["int8", "nf4-dq-fp32", "fp4-dq-bf16"])
def test_merge_requantizes_into_new_tensors(folders, q, device, tmp_path) -> None:
    arch = "llama"
    qm = load(folders, arch, q, device)
    fn, params = af.functional(qm)
    a = small(lora(fn, arch))
    with pytest.warns(quant.RequantizationWarning) as rec:
        merged = af.merge(params, a)
    errors = next(r.message for r in rec if isinstance(r.message, quant.RequantizationWarning)).errors
    targeted = {f"{p}.weight" for p in a.paths}
    assert set(errors) == targeted
    for k, v in params.items():
        if k not in targeted:
            assert merged[k] is v, k
    for k in targeted:
        old, new = params[k], merged[k]
        assert type(new) is type(old) and new is not old and quant.is_quantized(new)
        assert new.shape == old.shape and new.dtype == old.dtype
        want = quant.dequantize(old, torch.float32) + _delta(a, k[: -len(".weight")]).to(device)
        err = float((quant.dequantize(new, torch.float32) - want).abs().max())
        assert err == pytest.approx(errors[k], rel=1e-6)
        assert 0 < err <= (want.abs().max() / 127 if q == "int8" else 0.2 * want.abs().max())
    # PEFT's merge_and_unload requantizes the same way: the same bytes
    af.save(a, tmp_path / "a")
    qm2 = load(folders, arch, q, device)
    mm = peft.PeftModel.from_pretrained(qm2, str(tmp_path / "a")).merge_and_unload()
    for k in targeted:
        m2 = mm.get_submodule(k[: -len(".weight")])
        assert torch.equal(quant.dequantize(merged[k]), quant.dequantize(m2.weight, module=m2)), k
    ids = ids_for(arch, device)
    fm = ARCH[arch].from_pretrained(folders[arch]).eval().to(device)
    with torch.no_grad():
        out = fn(merged, input_ids=ids).logits
        assert rel(out, mm(input_ids=ids).logits) <= TOL
        # requantizing costs about what quantizing the float model cost in the first place
        quantization_err = rel(fn(params, input_ids=ids).logits, fm(input_ids=ids).logits)
        assert rel(out, af.inject(fn, a)(params, input_ids=ids).logits) <= 1.5 * quantization_err


@pytest.mark.parametrize("q", ["int8", "nf4-dq-fp32", "fp4-dq-bf16"])
def test_merge_dequantize_gives_float_weights(folders, q) -> None:
    arch = "opt" if q == "int8" else "llama"  # OPT: biases on the float path too
    qm = load(folders, arch, q)
    fn, params = af.functional(qm)
    fm = float_twin(folders, arch, qm)
    ffn, fparams = af.functional(fm)
    a = small(lora(fn, arch))
    with warnings.catch_warnings():
        warnings.simplefilter("error", quant.RequantizationWarning)
        md = af.merge(params, a, dequantize=True)
    quantized = [k for k, v in params.items() if quant.is_quantized(v)]
    assert len(quantized) > len(a.paths)
    for k in quantized:
        w = md[k]
        assert type(w) is torch.Tensor and w.is_floating_point() and w.dim() == 2
        want_dtype = torch.float32 if q == "int8" else params[k].quant_state.dtype
        assert w.dtype == want_dtype
        path = k[: -len(".weight")]
        want = quant.dequantize(params[k], torch.float32)
        if path in a.entries:
            want = want + _delta(a, path)
        assert torch.allclose(w.float(), want, rtol=0, atol=1e-6), k
    for k, v in params.items():
        if k not in quantized:
            assert md[k] is v
    ids = ids_for(arch)
    with torch.no_grad():
        # fn runs the float weights with F.linear: the float model with the adapter folded in
        assert rel(fn(md, input_ids=ids).logits, af.inject(ffn, a)(fparams, input_ids=ids).logits) <= TOL
        md0 = af.merge(params, af.mask(a, False), dequantize=True)
        assert rel(fn(md0, input_ids=ids).logits, ffn(fparams, input_ids=ids).logits) <= TOL


def test_ia3_merge_on_quantized(folders) -> None:
    arch = "opt"
    qm = load(folders, arch, "int8")
    fn, params = af.functional(qm)
    fm = float_twin(folders, arch, qm)
    ffn, fparams = af.functional(fm)
    a = af.init(fn, af.IA3Config(target_modules=TARGETS[arch], feedforward_modules=["fc2"], init_ia3_weights=False),
                generator=gen(1))
    a = af.tree.map(lambda t: 1 + 0.1 * t if t.dim() == 2 else t, a)  # vectors near 1, as trained ones are
    ids = ids_for(arch)
    md = af.merge(params, a, dequantize=True)
    with pytest.warns(quant.RequantizationWarning):
        merged = af.merge(params, a)
    with torch.no_grad():
        ref = af.inject(ffn, a)(fparams, input_ids=ids).logits
        assert rel(fn(md, input_ids=ids).logits, ref) <= TOL
        original = ARCH[arch].from_pretrained(folders[arch]).eval()
        quantization_err = rel(fn(params, input_ids=ids).logits, original(input_ids=ids).logits)
        assert rel(fn(merged, input_ids=ids).logits, af.inject(fn, a)(params, input_ids=ids).logits) \
            <= 1.5 * quantization_err
    bias = "model.decoder.layers.0.self_attn.v_proj.bias"  # IA3 output vectors scale the bias too
    assert md[bias] is not params[bias] and merged[bias] is not params[bias]


# -- 6. bad input -------------------------------------------------------------------------------------------
class MyLinear4bit(bnb.nn.Linear4bit):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a subclass with its own forward
        return super().forward(x) * 2


class FakeQuantLinear(nn.Linear):
    """Another library's quantized Linear: int8 weight, float scales."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.weight = nn.Parameter(torch.randint(-127, 127, (n_out, n_in), dtype=torch.int8), requires_grad=False)
        self.register_buffer("scales", torch.rand(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.float() * self.scales[:, None], self.bias)


def test_unsupported_quantized_layers_raise(folders) -> None:
    arch = "llama"
    qm = load(folders, arch, "nf4-dq-fp32")
    bad = "model.layers.1.self_attn.v_proj"
    qm.get_submodule(bad).__class__ = MyLinear4bit
    fn, params = af.functional(qm)
    a = lora(fn, arch)
    with pytest.raises(af.IncompatibleAdapterError, match=f"'{bad}'.*MyLinear4bit"):
        af.inject(fn, a)
    with pytest.raises(af.IncompatibleAdapterError, match=f"'{bad}'.*MyLinear4bit"):
        af.merge(params, a)
    ok = af.select(a, lambda p: p != bad)  # the other layers still work
    with torch.no_grad():
        af.inject(fn, ok)(params, input_ids=ids_for(arch))

    fm = _llama()
    fake = "model.layers.0.self_attn.q_proj"
    lin = fm.get_submodule(fake)
    fm.model.layers[0].self_attn.q_proj = FakeQuantLinear(lin.in_features, lin.out_features)
    fm.model.layers[1].mlp.down_proj = bnb.nn.OutlierAwareLinear(256, 128)  # another bitsandbytes layer type
    fn2, params2 = af.functional(fm)
    a2 = af.init(fn2, af.LoraConfig(r=2, target_modules=["q_proj"]), generator=gen())
    with pytest.raises(af.IncompatibleAdapterError, match=f"'{fake}'.*FakeQuantLinear"):
        af.inject(fn2, a2)
    with pytest.raises(af.IncompatibleAdapterError, match=f"'{fake}'"):
        af.merge(params2, a2)
    a3 = af.init(fn2, af.LoraConfig(r=2, target_modules=["down_proj"]), generator=gen())
    with pytest.raises(af.IncompatibleAdapterError, match="'model.layers.1.mlp.down_proj'.*OutlierAwareLinear"):
        af.inject(fn2, a3)
    with pytest.raises(af.IncompatibleAdapterError, match="'model.layers.1.mlp.down_proj'"):
        af.merge(params2, a3)


def test_unusable_adapter_dtype_raises(folders) -> None:
    arch = "llama"
    qm = load(folders, arch, "int8")
    fn, params = af.functional(qm)
    a = lora(fn, arch)
    for dt in (torch.int8, torch.float8_e4m3fn):
        bad = af.tree.map(lambda t, dt=dt: t.to(dt) if t.dim() == 2 else t, a)
        with pytest.raises(af.IncompatibleAdapterError, match=f"'{a.paths[0]}'.*dtype"):
            af.inject(fn, bad)
    with pytest.raises(af.IncompatibleAdapterError, match="has_fp16_weights"):
        m = nn.Sequential(bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=True))
        f3, _ = af.functional(m)
        af.inject(f3, af.init(f3, af.LoraConfig(r=2, target_modules=["0"]), generator=gen()))


# -- 7. the example -----------------------------------------------------------------------------------------
def test_qlora_example_short_run(tmp_path) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "qlora.py"
    spec = importlib.util.spec_from_file_location("qlora_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(["--steps", "3", "--lr", "1e-2", "--out", str(tmp_path / "adapter")])
    assert r["steps"] == 3 and r["after"] < r["before"]
    assert r["adaptfn_reload_diff"] <= TOL and r["peft_reload_diff"] <= TOL
    assert r["merged_float_diff"] <= TOL and r["fn_float_diff"] <= TOL
    assert 0 < r["requantized_max_weight_error"] < 0.5
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert sorted({p.rsplit(".", 1)[-1] for p in af.load(str(tmp_path / "adapter")).paths}) == sorted(mod.TARGETS)
