"""Quantized bases (bitsandbytes LLM.int8 ``Linear8bitLt`` and 4-bit ``Linear4bit``, nf4 / fp4, double
quantization on / off, compute dtype float32 / bfloat16), loaded by transformers from a saved tiny model.

Tolerances (relative: max abs difference / max abs reference):

* adaptfn vs PEFT's bitsandbytes LoRA / IA3 layers on the same quantized model: ``TOL = 1e-5``. Both run
  the same bitsandbytes kernels on the same quantized weights, so only float rounding can differ (it is 0
  here). For that, both sides are first put in the same 4-bit *layout* (:func:`set_layout`), whatever the
  CPU: bitsandbytes' own eval forward repacks a ``Linear4bit``'s weights in place on CPUs with AVX512-BF16
  and from then on computes with a fused bfloat16 kernel, ~0.5% rel. from the standard one. Every 4-bit
  parity test runs in the standard layout (on every CPU) and the repacked one. bitsandbytes registers the
  repacked layout's kernel only on AVX512-BF16 CPUs (elsewhere its default kernel reads the repacked bytes
  as standard ones), so PEFT cannot run a repacked layer on other CPUs: those cases are skipped there
  (``needs_repacked_kernel``), and adaptfn's own handling of the layout is checked on every CPU against
  the float twin (``test_cpu_repacked_4bit_layout``, both of adaptfn's paths forced).
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

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA bitsandbytes layers need a GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]

# 4-bit layouts (see set_layout). bitsandbytes registers its fused CPU kernel for the repacked one
# (``gemv_4bit``) at import, only where this is True.
LAYOUTS = ("standard", "repacked")
BNB_REPACKED_KERNEL = bool(bnb.functional.has_avx512bf16())
needs_repacked_kernel = pytest.mark.skipif(
    not BNB_REPACKED_KERNEL,
    reason="this CPU has no AVX512-BF16, so bitsandbytes has no kernel for the repacked 4-bit layout (its default "
           "one reads the repacked bytes as standard ones): PEFT / bitsandbytes cannot run a repacked layer here")

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


def cases(*items: tuple[str, ...], needs_kernel: bool = True) -> list[Any]:
    """pytest params ``(*case, layout)`` for cases ``(..., q, device)``: each in the standard layout, and 4-bit
    ones on CPU in the repacked one too (int8 layers have no 4-bit weights; bitsandbytes repacks on CPU
    only). ``needs_kernel``: the repacked case runs a bitsandbytes / PEFT forward on repacked layers (skipped
    on CPUs without the kernel for it, ``needs_repacked_kernel``)."""
    out = []
    for case in items:
        q, device = case[-2], case[-1]
        for layout in LAYOUTS:
            if layout == "repacked" and (q == "int8" or device != "cpu"):
                continue
            marks = [NEEDS_CUDA] if device == "cuda" else []
            if layout == "repacked" and needs_kernel:
                marks.append(needs_repacked_kernel)
            out.append(pytest.param(*case, layout, marks=marks, id="-".join((*case, layout))))
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


def _is_repacked(m: nn.Module) -> bool:
    return bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))


def repacked(model: nn.Module) -> bool:
    return any(_is_repacked(m) for m in bnb_layers(model).values())


def set_layout(model: nn.Module, layout: str) -> nn.Module:
    """Put every ``bnb.nn.Linear4bit`` of ``model`` (a PEFT model's base layers included) in a 4-bit layout,
    the same on every CPU; returns ``model``.

    ``"standard"``: ``support_avx512bf16_for_cpu = False``, so bitsandbytes' own forward never repacks the
    layer (set before its first eval forward on an AVX512-BF16 CPU). ``"repacked"``: the flag True and one
    eval no-grad forward of each layer, which repacks its weight in place (``quant_state
    .packing_format_for_cpu``) as bitsandbytes' forward does on AVX512-BF16 CPUs. Where bitsandbytes has no
    kernel for that layout, that forward computes nothing meaningful; its output is discarded."""
    assert layout in LAYOUTS, layout
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        m.support_avx512bf16_for_cpu = layout == "repacked"
        if layout == "standard" or _is_repacked(m):
            continue
        assert m.weight.device.type == "cpu", "bitsandbytes repacks 4-bit weights on CPU only"
        training = m.training
        x = torch.zeros(1, m.in_features, dtype=m.weight.quant_state.dtype)
        with torch.no_grad():
            m.eval()(x)
        m.train(training)
        assert _is_repacked(m)
    return model


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
@pytest.mark.parametrize("arch,q,device,layout", cases(*[(arch, q, d) for d in ("cpu", "cuda") for arch, q in
                                                         [("llama", q) for q in QUANTS] + [("opt", "int8"),
                                                                                           ("opt", "nf4-bf16")]]))
def test_lora_matches_peft_bnb_layers(folders, arch, q, device, layout, tmp_path) -> None:
    """adaptfn vs PEFT's bitsandbytes LoRA layers, and adaptfn's base vs bitsandbytes' own forward, on the same
    quantized layers in one layout (``TOL``).

    The layout is set after ``af.functional`` (so, in the repacked case, bitsandbytes repacks the user's
    layers after adaptfn has read the model, as the user's first eval forward would: adaptfn uses the layers
    as they are at each call) and after PEFT's ``from_pretrained``: reading a model's ``state_dict`` makes
    bitsandbytes undo the repack in place, not exactly (0.50.2 requantizes double-quantized scales and
    leaves the others in the repacked order: measured 0.5% and 47% rel. weight changes).
    The repacked case needs bitsandbytes' kernel for that layout (PEFT's forward and bitsandbytes' own run
    it), which exists on AVX512-BF16 CPUs only; elsewhere it is skipped, and
    ``test_cpu_repacked_4bit_layout`` checks adaptfn on that layout instead.
    """
    qm = load(folders, arch, q, device)
    fn, params = af.functional(qm)
    a = lora(fn, arch)
    af.save(a, tmp_path / "a")
    ids = ids_for(arch, device)
    g = af.inject(fn, a)
    pm = peft.PeftModel.from_pretrained(qm, str(tmp_path / "a")).eval()  # wraps qm's layers in place
    layer = pm.get_submodule(f"base_model.model.{a.paths[0]}")
    assert type(layer) in (peft.tuners.lora.bnb.Linear8bitLt, peft.tuners.lora.bnb.Linear4bit)
    set_layout(qm, layout)
    with torch.no_grad():
        out = g(params, input_ids=ids).logits
        base = fn(params, input_ids=ids).logits
        ref = pm(input_ids=ids).logits
        with pm.disable_adapter():
            own = pm(input_ids=ids).logits  # bitsandbytes' own forward on the same layers
    assert repacked(qm) == (layout == "repacked")
    assert rel(out, base) > 1e-3  # the adapter does something
    assert rel(base, own) <= TOL, rel(base, own)
    assert rel(out, ref) <= TOL, rel(out, ref)


@pytest.mark.parametrize("q,device,layout", cases(("int8", "cpu"), ("nf4-dq-fp32", "cpu")))
def test_peft_saved_lora_on_quantized_model(folders, q, device, layout, tmp_path) -> None:
    """A LoRA adapter PEFT made and saved, loaded by adaptfn onto a second load of the same model; both loads
    in one layout, set after PEFT's ``save_pretrained`` (it reads the ``state_dict``: see
    ``test_lora_matches_peft_bnb_layers``, also for the repacked case's skip)."""
    arch = "llama"
    ids = ids_for(arch, device)
    qm1 = load(folders, arch, q, device)
    torch.manual_seed(7)
    pm = peft.get_peft_model(qm1, peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS[arch],
                                                  init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "p")
    set_layout(qm1, layout)
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    qm2 = load(folders, arch, q, device)  # a second load: the same floats, the same bytes
    fn, params = af.functional(qm2)
    a = af.load(str(tmp_path / "p"))
    set_layout(qm2, layout)
    with torch.no_grad():
        out = af.inject(fn, a)(params, input_ids=ids).logits
    assert repacked(qm1) == repacked(qm2) == (layout == "repacked")
    assert rel(out, ref) <= TOL, rel(out, ref)


@pytest.mark.parametrize("arch,q,device,layout", cases(("opt", "int8", "cpu"), ("opt", "fp4-dq-bf16", "cpu"),
                                                       ("llama", "nf4-dq-fp32", "cpu")))
def test_ia3_matches_peft_bnb_layers(folders, arch, q, device, layout, tmp_path) -> None:
    """adaptfn vs PEFT's bitsandbytes IA3 layers on the same layers in one layout, set after PEFT's
    ``from_pretrained`` (see ``test_lora_matches_peft_bnb_layers``, also for the repacked case's skip)."""
    qm = load(folders, arch, q, device)
    fn, params = af.functional(qm)
    ff = {"opt": ["fc2"], "llama": ["down_proj"]}[arch]
    a = af.init(fn, af.IA3Config(target_modules=TARGETS[arch], feedforward_modules=ff, init_ia3_weights=False),
                generator=gen(1))
    af.save(a, tmp_path / "a")
    ids = ids_for(arch, device)
    g = af.inject(fn, a)
    pm = peft.PeftModel.from_pretrained(qm, str(tmp_path / "a")).eval()
    assert "ia3.bnb" in type(pm.get_submodule(f"base_model.model.{a.paths[0]}")).__module__
    set_layout(qm, layout)
    with torch.no_grad():
        out = g(params, input_ids=ids).logits
        ref = pm(input_ids=ids).logits
    assert repacked(qm) == (layout == "repacked")
    assert rel(out, ref) <= TOL, rel(out, ref)


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


@pytest.mark.parametrize("arch,q,device,layout", cases(("opt", "int8", "cpu"), ("llama", "nf4-dq-fp32", "cpu"),
                                                       ("opt", "fp4-dq-bf16", "cpu"), needs_kernel=False))
def test_users_quantized_layers_untouched(folders, arch, q, device, layout, tmp_path) -> None:
    """Nothing adaptfn does changes the user's layers, standard or repacked (on every CPU: only adaptfn runs
    on the repacked layers after the user's forward, whose output is not used)."""
    qm = set_layout(load(folders, arch, q, device), layout)
    with torch.no_grad():  # the user's own forward first: bitsandbytes moves the int8 SCB now
        qm(input_ids=ids_for(arch, device))
    assert repacked(qm) == (layout == "repacked")
    before = snapshot(qm)
    assert before
    _everything(folders, arch, qm, tmp_path)
    assert_same(snapshot(qm), before, "layers")
    for m in bnb_layers(qm).values():
        assert "forward" not in m.__dict__


# -- 4. the CPU-repacked 4-bit layout --------------------------------------------------------------------
@pytest.mark.parametrize("path", [pytest.param("kernel", marks=needs_repacked_kernel), "fallback"])
@pytest.mark.parametrize("q,everything", [("nf4-dq-fp32", True), ("fp4-fp32", False)])
def test_cpu_repacked_4bit_layout(folders, q, everything, path, tmp_path, monkeypatch) -> None:
    """adaptfn on 4-bit layers bitsandbytes has repacked (forced by ``set_layout`` on any CPU).

    ``dequantize`` reads the layout exactly (vs the standard layout's weights with the repacked layout's
    bfloat16 scales); the forward and gradients match the float twin, merges give standard-layout tensors,
    and the user's layers are left as found. Both of adaptfn's paths for the layout are forced:
    ``"fallback"`` (``F.linear`` with the unpacked weight, ``quant._cpu_packed_kernel`` patched to False: exact
    in float32, on every CPU) and ``"kernel"`` (bitsandbytes' fused kernel, bfloat16; it exists on
    AVX512-BF16 CPUs only, so that case is skipped elsewhere; there it must also match the model's own
    forward exactly).
    """
    monkeypatch.setattr(quant, "_cpu_packed_kernel", lambda: path == "kernel")
    arch = "llama"
    plain = set_layout(load(folders, arch, q), "standard")
    packed = set_layout(load(folders, arch, q), "repacked")
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
    ids = ids_for(arch)
    with torch.no_grad():
        own = packed(input_ids=ids).logits if path == "kernel" else None  # bitsandbytes' own forward
    before = snapshot(packed)
    fm = float_twin(folders, arch, packed)
    fn, params = af.functional(packed)
    ffn, fparams = af.functional(fm)
    a = small(lora(fn, arch))
    tol = TOL_BF16 if path == "kernel" else TOL  # the kernel computes in bfloat16
    with torch.no_grad():
        assert rel(af.inject(fn, a)(params, input_ids=ids).logits,
                   af.inject(ffn, a)(fparams, input_ids=ids).logits) <= tol
        if own is not None:  # the same kernel as the model's own forward
            assert rel(fn(params, input_ids=ids).logits, own) <= TOL
    g = torch.func.grad(lambda ad: af.inject(fn, ad)(params, input_ids=ids, labels=ids).loss)(a)
    gf = torch.func.grad(lambda ad: af.inject(ffn, ad)(fparams, input_ids=ids, labels=ids).loss)(a)
    for p in a.paths:
        assert rel(g.leaves(p)["lora_A"], gf.leaves(p)["lora_A"]) <= (TOL_BF16 if path == "kernel" else GRAD_TOL_EXACT)
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


@pytest.mark.parametrize("q,device,layout", cases(*[(q, d) for q in ("int8", "nf4-dq-fp32", "fp4-dq-bf16")
                                                     for d in ("cpu", "cuda")]))
def test_merge_requantizes_into_new_tensors(folders, q, device, layout, tmp_path) -> None:
    """``af.merge`` requantizes into new tensors, byte-equal to PEFT's ``merge_and_unload``; the merged models
    agree (``TOL``) in one layout. adaptfn's merged tensors are new standard-layout ones (adaptfn never
    repacks): for the repacked case they are put into a load's layers, where a user would run them, and
    bitsandbytes' forward repacks them in place there, as it does PEFT's merged layers. That case needs
    bitsandbytes' kernel for the layout (see ``test_lora_matches_peft_bnb_layers``)."""
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
    if layout == "repacked":
        set_layout(qm, layout)  # the weights the merge left as they were (params' tensors, in place)
        host = load(folders, arch, q, device)
        for k in targeted:
            host.get_submodule(k[: -len(".weight")]).weight = merged[k]
        set_layout(host, layout)  # adaptfn's merged tensors, in place
        assert all(_is_repacked(m) for m in bnb_layers(host).values())
    set_layout(mm, layout)
    ids = ids_for(arch, device)
    fm = ARCH[arch].from_pretrained(folders[arch]).eval().to(device)
    with torch.no_grad():
        out = fn(merged, input_ids=ids).logits
        assert rel(out, mm(input_ids=ids).logits) <= TOL, rel(out, mm(input_ids=ids).logits)
        assert repacked(mm) == (layout == "repacked")
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
