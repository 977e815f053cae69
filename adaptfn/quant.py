"""Quantized base models: bitsandbytes ``Linear8bitLt`` (LLM.int8) and ``Linear4bit`` (nf4 / fp4) layers.

What adaptfn does with a model loaded by transformers with ``BitsAndBytesConfig(load_in_8bit=True)`` or
``load_in_4bit=True``:

* **Forward.** In the structural copy that :func:`adaptfn.functional` runs (never on the user's model),
  every supported bitsandbytes layer gets a pure forward that computes what the layer's own forward
  computes (the same bitsandbytes kernels: int8 matmul with outlier decomposition, or the 4-bit GEMM)
  without the layer's side effects: bitsandbytes moves the int8 row scales (``SCB``) into the layer's
  ``state`` on the first call, casts ``bias.data`` in place, fixes ``compute_dtype`` on the first call
  and, on CPUs with AVX512-BF16, repacks 4-bit weights in place on the first eval forward. None of
  that happens through adaptfn.
* **Gradients.** bitsandbytes' autograd functions do not support ``torch.func`` transforms. The pure
  forward runs inside :class:`QuantLinearFunction` (``setup_context`` + a ``vmap`` rule), whose backward
  gives the input gradient from the dequantized weight, ``grad_x = grad_y @ W`` (the base is frozen:
  no weight gradient). ``torch.func.grad`` / ``vmap`` over an adapter (QLoRA training) work.
* **Merge.** ``af.merge(params, adapter)`` dequantizes each targeted quantized weight, folds the
  adapter in (in float32) and quantizes the result into **new** tensors with the layer's settings
  (the originals are untouched); the requantization error is reported by a
  :class:`RequantizationWarning` whose ``errors`` maps each weight to its max abs error.
  ``af.merge(params, adapter, dequantize=True)`` instead returns every quantized weight of ``params`` as
  a float tensor [out, in] (float32 for int8 layers; the dtype the weight had before quantization for
  4-bit ones); the functional model then runs those layers with ``F.linear``.
* **Bad input.** Adapting a quantized layer adaptfn does not know (another library's, a subclass
  overriding ``forward``, other bitsandbytes types), or with adapter weights of a dtype that cannot be
  used with it, raises :class:`adaptfn.IncompatibleAdapterError` naming the module.

The CPU-repacked 4-bit layout (``quant_state.packing_format_for_cpu``: codes stored [N, K/2] in
32-row tiles, ``absmax`` transposed to [K / blocksize, N] in bfloat16, double quantization expanded) is
read as it is: :func:`dequantize` unpacks it into a new tensor, and the forward uses bitsandbytes' fused
kernel for that layout where the CPU has it, else ``F.linear`` with the unpacked weight.

Kernel difference: on CPUs with AVX512-BF16, bitsandbytes' own eval (no-grad) forward repacks a
``Linear4bit``'s weights in place at its first call and from then on computes in bfloat16 with a fused
kernel, ~0.5% rel. from the standard 4-bit kernel. adaptfn never repacks a user's layer (on one the user's
own forward has repacked, it computes as said above). To compare adaptfn with a PEFT / bitsandbytes model, put both in
the same layout: ``layer.support_avx512bf16_for_cpu = False`` on every ``Linear4bit`` before the first
forward gives the standard one. (Reading a repacked model's ``state_dict``, as PEFT's ``save_pretrained`` /
``from_pretrained`` do, makes bitsandbytes 0.50 undo the repack in place, not exactly.)

CPU note: bitsandbytes' CPU kernels run on the system's OpenMP runtime and torch on its own; on a few
cores, torch's spinning OpenMP workers can slow every bitsandbytes call down many times over (PEFT and
bitsandbytes' own forward alike). ``torch.set_num_threads(1)`` or ``OMP_WAIT_POLICY=PASSIVE`` (set before
torch is imported) avoids it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .adapter import GATE, SCALING, Adapter
from .errors import IncompatibleAdapterError, shape_str

logger = logging.getLogger(__name__)

INT8 = "int8"
FOUR_BIT = "4bit"
SUPPORTED = "bitsandbytes Linear8bitLt (int8) and Linear4bit (nf4 / fp4) layers"
_USABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# packages whose layers / tensor subclasses are quantized formats (adaptfn supports two bitsandbytes ones)
_QUANT_LIBS = ("bitsandbytes", "torchao", "optimum.quanto", "quanto", "hqq", "awq", "auto_gptq", "gptqmodel",
               "compressed_tensors", "fbgemm_gpu", "eetq", "aqlm", "vptq", "fp_quant")
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                                         "float8_e8m0fnu", "float4_e2m1fn_x2") if hasattr(torch, n))

__all__ = ["QuantLinearFunction", "RequantizationWarning", "dequantize", "is_quantized", "layer_kind",
           "requantize"]


class RequantizationWarning(UserWarning):
    """Emitted by ``af.merge`` after requantizing merged weights.

    Attributes:
        errors: ``{params key: max abs error}`` of each requantized weight: ``max |deq(q(W')) - W'|`` where
            ``W'`` is the float weight with the adapter folded in.
    """

    def __init__(self, message: str, errors: Mapping[str, float]) -> None:
        super().__init__(message)
        self.errors = dict(errors)


# -- recognising layers and tensors ------------------------------------------------------------------
def _bnb_nn() -> Any:
    """``bitsandbytes.nn`` if bitsandbytes is imported (no bitsandbytes object can exist otherwise)."""
    mod = sys.modules.get("bitsandbytes")
    return None if mod is None else getattr(mod, "nn", None)


def _bnb() -> Any:
    import bitsandbytes

    return bitsandbytes


def _from_quant_lib(cls: type) -> bool:
    mod = getattr(cls, "__module__", "") or ""
    return any(mod == p or mod.startswith(p + ".") for p in _QUANT_LIBS)


def is_quantized(t: Any) -> bool:
    """Whether ``t`` is a quantized bitsandbytes weight adaptfn can compute with.

    Arguments:
        t: anything (typically a value of the ``params`` dict from :func:`adaptfn.functional`).

    Returns:
        True for an ``Int8Params`` holding int8 data [out, in] or a ``Params4bit`` (packed 4-bit codes,
        [out * in / 2, 1] bytes); False otherwise (bitsandbytes not imported included).

    Example:
        >>> [k for k, v in params.items() if af.quant.is_quantized(v)][:2]
        ['model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.k_proj.weight']
    """
    bnn = _bnb_nn()
    if bnn is None or not isinstance(t, torch.Tensor):
        return False
    if type(t) is bnn.Params4bit:
        return True
    return type(t) is bnn.Int8Params and t.dtype == torch.int8


def _foreign_quantized(t: Any) -> bool:
    """A tensor that looks quantized but is not one adaptfn knows (int data, a quantization library's
    tensor subclass)."""
    if not isinstance(t, torch.Tensor) or is_quantized(t):
        return False
    if type(t) not in (torch.Tensor, nn.Parameter) and _from_quant_lib(type(t)):
        return True
    return t.dtype in _FP8 or not (t.is_floating_point() or t.is_complex())


def layer_kind(module: nn.Module) -> str | None:
    """Which supported quantized layer ``module`` is.

    Supported: ``Linear8bitLt`` with quantized int8 weights (``has_fp16_weights=False``, transformers'
    ``load_in_8bit``) and ``Linear4bit`` (and its ``LinearNF4`` / ``LinearFP4`` subclasses) with a quant
    state; subclasses that override ``forward`` are not (adaptfn could not reproduce their forward).

    Arguments:
        module: any module.

    Returns:
        ``"int8"``, ``"4bit"``, or None (not a supported quantized layer).

    Example:
        >>> {p: af.quant.layer_kind(m) for p, m in model.named_modules() if "self_attn" in p and af.quant.layer_kind(m)}
        {'model.layers.0.self_attn.q_proj': '4bit', 'model.layers.0.self_attn.k_proj': '4bit',
         'model.layers.0.self_attn.v_proj': '4bit', 'model.layers.0.self_attn.o_proj': '4bit'}
    """
    bnn = _bnb_nn()
    if bnn is None:
        return None
    cls = type(module)
    if isinstance(module, bnn.Linear8bitLt) and cls.forward is bnn.Linear8bitLt.forward:
        w = module.weight
        state = getattr(module, "state", None)
        if type(w) is bnn.Int8Params and w.dtype == torch.int8 and state is not None and not state.has_fp16_weights:
            return INT8
    if isinstance(module, bnn.Linear4bit) and cls.forward is bnn.Linear4bit.forward:
        w = module.weight
        if type(w) is bnn.Params4bit and _quant_state(w, module) is not None:
            return FOUR_BIT
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why adaptfn cannot adapt a quantized-looking module.

    Arguments:
        module: any module.

    Returns:
        A sentence naming the module's class and the problem (another library's quantized layer, a
        bitsandbytes subclass with its own forward, ``has_fp16_weights=True``, an int / float8 weight), or
        None when the module is a supported quantized layer or not quantized at all.
    """
    if layer_kind(module) is not None:
        return None
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    bnn = _bnb_nn()
    if bnn is not None:
        if isinstance(module, bnn.Linear8bitLt):
            if cls.forward is not bnn.Linear8bitLt.forward:
                return f"{name} is a subclass of bitsandbytes Linear8bitLt with its own forward"
            return f"{name} holds float weights (has_fp16_weights=True: quantized anew on every call)"
        if isinstance(module, bnn.Linear4bit):
            if cls.forward is not bnn.Linear4bit.forward:
                return f"{name} is a subclass of bitsandbytes Linear4bit with its own forward"
            return f"{name} is not quantized yet (no quant_state: move it to a device first)"
    if any(_from_quant_lib(c) for c in cls.__mro__):
        return f"{name} is a quantized layer type adaptfn does not support"
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and (is_quantized(w) or _foreign_quantized(w)):
        return f"{name} holds a quantized weight ({type(w).__name__}, dtype {str(w.dtype).replace('torch.', '')})"
    return None


def _quant_state(w: torch.Tensor, module: nn.Module | None = None) -> Any:
    qs = getattr(w, "quant_state", None)
    if qs is None and module is not None:
        qs = getattr(module, "quant_state", None)
    return qs


def _packed(qs: Any) -> bool:
    return bool(getattr(qs, "packing_format_for_cpu", False))


# -- per-model registry (filled by af.functional) --------------------------------------------------------
@dataclasses.dataclass
class _ModelInfo:
    kinds: dict[str, str]  # path -> "int8" / "4bit" of supported layers
    unsupported: dict[str, str]  # path -> why a quantized-looking layer is not supported


@dataclasses.dataclass
class _Owner:
    module: Any  # weakref.ref to the layer holding the weight
    path: str
    reason: str | None


_MODELS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register(model: nn.Module, modules: Mapping[str, nn.Module],
             tensors: Mapping[int, torch.Tensor] | None = None) -> None:
    """Record the quantized layers of ``model`` (called by :func:`adaptfn.functional`; cheap when none).

    Arguments:
        model: the user's model. modules: its modules by path.
        tensors: ``id(model tensor) -> the tensor functional() puts in params`` (plain parameters are
            detached there), so a params entry can be traced back to its layer.
    """
    kinds: dict[str, str] = {}
    bad: dict[str, str] = {}
    for path, m in modules.items():
        kind = layer_kind(m)
        if kind:
            kinds[path] = kind
            _OWNERS[m.weight] = _Owner(weakref.ref(m), path, None)
    for path, m in modules.items():
        reason = None if path in kinds else unsupported_reason(m)
        if reason:
            bad[path] = reason
            w = getattr(m, "weight", None)
            # a wrapper exposing a supported layer's weight (e.g. a PEFT layer) does not own it
            if isinstance(w, torch.Tensor) and not (w in _OWNERS and _OWNERS[w].reason is None):
                _OWNERS[w] = _Owner(weakref.ref(m), path, reason)
                twin = tensors.get(id(w)) if tensors is not None else None
                if twin is not None and twin is not w:
                    _OWNERS[twin] = _OWNERS[w]
    if kinds or bad:
        _MODELS[model] = _ModelInfo(kinds, bad)
    else:
        _MODELS.pop(model, None)


def install(model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Give each supported quantized layer of a structural copy the pure forward of this module (an
    instance ``forward``: quantized weight -> :class:`QuantLinearFunction`, float weight -> ``F.linear``).

    Called by ``functional._Base._build`` before the adapter slots wrap ``forward``; the user's layers are
    never touched.

    Arguments:
        model: the user's model (as registered by :func:`register`).
        modules: path -> module of the structural copy.
    """
    info = _MODELS.get(model)
    if info is None:
        return
    for path in info.kinds:
        m = modules.get(path)
        if m is None:
            continue
        # an accelerate hook wraps the layer's forward as ``_old_forward``: keep the hook, replace what it calls
        slot = "_old_forward" if "_old_forward" in m.__dict__ else "forward"
        m.__dict__[slot] = functools.partial(_layer_forward, m)


def check_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Raise :class:`IncompatibleAdapterError` (naming the module) if ``adapter`` adapts a quantized layer
    of ``model`` that adaptfn does not support, or a supported one with delta leaves of a dtype that cannot
    be used with it (not float16 / bfloat16 / float32 / float64: int, float8, ...). Called by
    ``FunctionalModel.check`` (so by :func:`adaptfn.inject`); a no-op for models without quantized layers.

    Arguments:
        model: the user's model. adapter: the adapter being injected.
    """
    info = _MODELS.get(model)
    if info is None:
        return
    for path, e in adapter.entry_items:
        if not e.kind:
            continue
        reason = info.unsupported.get(path)
        if reason is not None:
            raise IncompatibleAdapterError(
                f"module {path!r}: {reason}; adaptfn can adapt {SUPPORTED} only")
        kind = info.kinds.get(path)
        if kind is None:
            continue
        for name, t in adapter.leaves(path).items():
            if name in (GATE, SCALING) or name in e.replaced or not isinstance(t, torch.Tensor):
                continue
            if t.dtype not in _USABLE_DTYPES:
                raise IncompatibleAdapterError(
                    f"module {path!r} is a {kind} quantized layer; the adapter's {name!r} "
                    f"{shape_str(t.shape)} has dtype {str(t.dtype).replace('torch.', '')}, which cannot be used "
                    "with it (use float32, bfloat16, float16 or float64 adapter weights)")


# -- the quantized matmuls -----------------------------------------------------------------------------
class _Int8Op:
    """LLM.int8 ``x @ W^T`` (+ bias) for one call: W = CB [out, in] int8 rows scaled by SCB [out] / 127."""

    __slots__ = ("cb", "scb", "threshold", "training")

    def __init__(self, cb: torch.Tensor, scb: torch.Tensor, threshold: float, training: bool) -> None:
        self.cb, self.scb, self.threshold, self.training = cb, scb, threshold, training

    @property
    def out_features(self) -> int:
        return int(self.cb.shape[0])

    def matmul(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        bnb = _bnb()
        # a fresh state per call: bitsandbytes writes into the state it is given (outlier indices, ...)
        state = bnb.MatmulLtState()
        state.CB, state.SCB = self.cb, self.scb
        state.threshold = self.threshold
        state.has_fp16_weights = False
        state.is_training = self.training
        return bnb.matmul(x2, self.cb, bias=bias, state=state)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight [out, in] in ``dtype``."""
        return self.cb.to(dtype) * (self.scb.unsqueeze(1) * (1.0 / 127.0)).to(dtype)


class _FourBitOp:
    """4-bit (nf4 / fp4) ``x @ W^T`` (+ bias) for one call."""

    __slots__ = ("data", "qs")

    def __init__(self, data: torch.Tensor, qs: Any) -> None:
        self.data, self.qs = data, qs

    @property
    def out_features(self) -> int:
        return int(self.qs.shape[0])

    def matmul(self, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _packed(self.qs) and not (x2.device.type == "cpu" and _cpu_packed_kernel()):
            return F.linear(x2, self.weight(x2.dtype), bias)
        return _bnb().matmul_4bit(x2, self.data, quant_state=self.qs, bias=bias)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return _dequantize_4bit(self.data, self.qs).to(dtype)


@functools.cache
def _cpu_packed_kernel() -> bool:
    """Whether bitsandbytes registered its fused CPU kernel for the repacked 4-bit layout."""
    try:
        return bool(_bnb().functional.has_avx512bf16())
    except Exception:  # pragma: no cover - depends on the build
        return False


class QuantLinearFunction(torch.autograd.Function):
    """``y = x @ W^T + b`` with a quantized ``W``, usable under ``torch.func`` (grad, vjp, vmap).

    Forward: the bitsandbytes kernel of the layer (``op.matmul``). Backward: ``grad_x = grad_y @ W`` with
    ``W`` dequantized, ``grad_b = sum(grad_y)``; the quantized weight gets no gradient (frozen base).
    vmap: the batch axis is folded into the rows of ``x`` (the weight is never batched).

    Arguments (of ``apply``):
        x: [..., in] in the layer's compute dtype.
        bias: [out] or None.
        op: the layer's quantized matmul for this call (internal object).

    Returns:
        [..., out].
    """

    @staticmethod
    def forward(x: torch.Tensor, bias: torch.Tensor | None, op: Any) -> torch.Tensor:  # type: ignore[override]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:
            out = x2.new_zeros((0, op.out_features))
            if bias is not None:
                out = out + bias
        else:
            out = op.matmul(x2, bias)
        return out.reshape(*lead, out.shape[-1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, bias, op = inputs
        ctx.op = op
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.b_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, Any, None]:  # type: ignore[override]
        gx = gb = None
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = (g2 @ ctx.op.weight(g.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gb = g2.sum(0).to(ctx.b_dtype)
        return gx, gb, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, bias: torch.Tensor | None, op: Any) -> tuple[Any, int]:
        xd, bd, _ = in_dims
        n = info.batch_size
        xb = x.movedim(xd, 0) if xd is not None else x.expand(n, *x.shape)
        if bd is None:
            return QuantLinearFunction.apply(xb, bias, op), 0
        out = QuantLinearFunction.apply(xb, None, op)
        b = bias.movedim(bd, 0)  # type: ignore[union-attr]
        return out + b.reshape(n, *([1] * (out.dim() - 2)), b.shape[-1]), 0


def _scb(w: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    """The int8 row scales of ``w``: on the tensor until bitsandbytes' first forward moves them into
    the layer's ``state`` (kept when it holds the same int8 matrix)."""
    scb = getattr(w, "SCB", None)
    if scb is not None:
        return scb
    cands = [module] if module is not None else []
    owner = _OWNERS.get(w)
    if owner is not None and owner.module() is not None:
        cands.append(owner.module())
    for m in cands:
        state = getattr(m, "state", None)
        cb = getattr(state, "CB", None)
        if cb is not None and getattr(state, "SCB", None) is not None and cb.data_ptr() == w.data_ptr() \
                and cb.shape == w.shape:
            return state.SCB
    where = f" of {owner.path!r}" if owner is not None else ""
    raise IncompatibleAdapterError(
        f"int8 weight{where} {shape_str(w.shape)} has no row scales (SCB) on it or in its layer's state")


def _compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes' Linear4bit computes in (without fixing it on the module as it does)."""
    cdt = getattr(module, "compute_dtype", None)
    if not getattr(module, "compute_type_is_set", True) and x.dtype in (torch.float32, torch.bfloat16):
        cdt = x.dtype
    return cdt if cdt is not None else x.dtype


def _layer_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pure forward installed on the structural copy's bitsandbytes layers. ``x`` [..., in] ->
    [..., out]. The weight may be the quantized one, a new quantized one (``af.merge``) or a float one
    (``af.merge(..., dequantize=True)``)."""
    w = module.weight
    bias = module.bias
    if not is_quantized(w):
        if _foreign_quantized(w) or w.dim() != 2:
            raise IncompatibleAdapterError(
                f"{type(module).__name__}: weight {type(w).__name__} {shape_str(w.shape)} of dtype {w.dtype} is "
                "neither a bitsandbytes quantized weight nor a float [out, in] matrix")
        b = None if bias is None else bias.to(w.dtype)
        return F.linear(x.to(w.dtype), w, b).to(x.dtype)
    bnn = _bnb_nn()
    if type(w) is bnn.Params4bit:
        qs = _quant_state(w, module)
        cdt = _compute_dtype(module, x)
        b = None if bias is None else bias.to(x.dtype).to(cdt)
        out = QuantLinearFunction.apply(x.to(cdt), b, _FourBitOp(w.data, qs))
        return out.to(x.dtype)
    state = module.state  # type: ignore[union-attr]
    b = None if bias is None else bias.to(x.dtype)
    op = _Int8Op(w.data, _scb(w, module), float(state.threshold), bool(module.training))
    return QuantLinearFunction.apply(x, b, op)


# -- dequantize / requantize --------------------------------------------------------------------------------
def _original_dtype(qs: Any) -> torch.dtype:
    return getattr(qs, "original_dtype", qs.dtype) if _packed(qs) else qs.dtype


def _unpack_cpu_layout(data: torch.Tensor, qs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The repacked CPU layout -> (codes in the standard byte order [N*K/2], absmax [N*K/blocksize] fp32).

    Repacked: the 4-bit codes of W [N, K] are tiled as [N/32, K/2, 32, 2] (32 rows, one pair of columns
    per step) and each 64-code run is stored as 32 bytes, codes 0..31 in the low nibbles and 32..63 in
    the high ones; absmax is [K/blocksize, N] in bfloat16. Standard: row-major codes, two per byte, the
    first in the high nibble; absmax [N*K/blocksize]."""
    n, k = int(qs.shape[0]), int(qs.shape[1])
    tile = 32
    p = data.reshape(-1).view(torch.uint8).reshape(-1, tile)
    run = torch.cat([p & 0xF, p >> 4], dim=1)  # [-1, 64] codes
    codes = run.reshape(n // tile, k // 2, tile, 2).transpose(1, 2).reshape(-1)  # row-major [N*K]
    std = (codes[0::2] << 4) | codes[1::2]
    absmax = qs.absmax.t().reshape(-1).float()
    return std, absmax


def _dequantize_4bit(data: torch.Tensor, qs: Any) -> torch.Tensor:
    bF = _bnb().functional
    if not _packed(qs):
        return bF.dequantize_4bit(data, qs)
    std, absmax = _unpack_cpu_layout(data, qs)
    plain = bF.QuantState(absmax=absmax, shape=torch.Size(qs.shape), code=qs.code, blocksize=qs.blocksize,
                          quant_type=qs.quant_type, dtype=_original_dtype(qs))
    return bF.dequantize_4bit(std.reshape(-1, 1), plain)


def dequantize(weight: torch.Tensor, dtype: torch.dtype | None = None, module: nn.Module | None = None) -> torch.Tensor:
    """A quantized bitsandbytes weight as a new float tensor [out, in] (the stored one is not touched).

    Arguments:
        weight: an ``Int8Params`` (int8 [out, in], row scales on it or in its layer's state) or a
            ``Params4bit`` (packed codes, standard or CPU-repacked layout).
        dtype: result dtype; default float32 for int8, the pre-quantization dtype for 4-bit.
        module: the layer holding ``weight`` (found from :func:`adaptfn.functional`'s record if None).

    Returns:
        ``W`` [out, in]: ``CB * SCB / 127`` (int8) or the 4-bit codes times their block's absmax.

    Example:
        >>> w = af.quant.dequantize(params["model.layers.0.self_attn.q_proj.weight"])   # [out, in] float
    """
    bnn = _bnb_nn()
    if not is_quantized(weight):
        raise IncompatibleAdapterError(
            f"dequantize: expected a bitsandbytes Int8Params / Params4bit, got {type(weight).__name__} "
            f"of dtype {weight.dtype}")
    if type(weight) is bnn.Params4bit:
        owner = _OWNERS.get(weight)
        qs = _quant_state(weight, module if module is not None else (owner.module() if owner else None))
        if qs is None:
            raise IncompatibleAdapterError(f"dequantize: 4-bit weight {shape_str(weight.shape)} has no quant_state")
        w = _dequantize_4bit(weight.data, qs)
        return w.to(dtype) if dtype is not None and w.dtype != dtype else w
    scb = _scb(weight, module)
    return _Int8Op(weight.data, scb, 0.0, False).weight(dtype or torch.float32)


def _default_float_dtype(weight: torch.Tensor) -> torch.dtype:
    bnn = _bnb_nn()
    if type(weight) is bnn.Params4bit:
        owner = _OWNERS.get(weight)
        qs = _quant_state(weight, owner.module() if owner else None)
        return _original_dtype(qs)
    return torch.float32


def requantize(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Quantize a float weight into a NEW tensor with the settings of the quantized ``like``.

    4-bit: same quant type, block size, double quantization, storage dtype and pre-quantization dtype
    (a CPU-repacked ``like`` gives a standard-layout result). int8: LLM.int8 row-wise (from float16,
    as bitsandbytes quantizes), with the row scales (``SCB``) on the new tensor.

    Arguments:
        w: float [out, in].
        like: the ``Params4bit`` / ``Int8Params`` whose format to use (not modified).

    Returns:
        A new ``Params4bit`` ([out * in / 2, 1] codes, its own quant_state) or ``Int8Params`` (int8
        [out, in]), ``requires_grad=False``.

    Example:
        >>> q = af.quant.requantize(af.quant.dequantize(w) + delta, like=w)
    """
    bnb = _bnb()
    bnn = bnb.nn
    if type(like) is bnn.Params4bit:
        owner = _OWNERS.get(like)
        qs = _quant_state(like, owner.module() if owner else None)
        packed = _packed(qs)
        nested = bool(getattr(qs, "original_nested", qs.nested) if packed else qs.nested)
        storage = getattr(qs, "original_storage_type", None) if packed else None
        storage = storage or like.quant_storage or torch.uint8
        src = w.detach().to(device=like.device, dtype=_original_dtype(qs)).contiguous()
        data, new_qs = bnb.functional.quantize_4bit(src, blocksize=qs.blocksize, compress_statistics=nested,
                                                    quant_type=qs.quant_type, quant_storage=storage)
        return bnn.Params4bit(data, requires_grad=False, quant_state=new_qs, blocksize=qs.blocksize,
                              compress_statistics=nested, quant_type=qs.quant_type, quant_storage=storage,
                              bnb_quantized=True)
    if type(like) is bnn.Int8Params:
        src = w.detach().to(device=like.device, dtype=torch.float16).contiguous()
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(src)
        return bnn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    raise IncompatibleAdapterError(f"requantize: {type(like).__name__} is not a bitsandbytes quantized weight")


# -- merge support (called by adaptfn.transforms.merge) ----------------------------------------------------
@dataclasses.dataclass
class MergePlan:
    """Quantized entries of a merge: the original tensors and the float stand-ins put in their place."""

    originals: dict[str, torch.Tensor]
    floats: dict[str, torch.Tensor]
    dequantize: bool


def _check_mergeable(key: str, t: torch.Tensor) -> None:
    owner = _OWNERS.get(t)
    if owner is not None and owner.reason is not None:
        raise IncompatibleAdapterError(f"merge: module {owner.path!r}: {owner.reason}; adaptfn can merge into "
                                       f"{SUPPORTED} only")
    if not is_quantized(t):
        path = key[: -len(".weight")] if key.endswith(".weight") else key
        raise IncompatibleAdapterError(
            f"merge: module {path!r}: its weight is a {type(t).__name__} of dtype "
            f"{str(t.dtype).replace('torch.', '')}, a quantized format adaptfn cannot dequantize (it merges into "
            f"{SUPPORTED})")


def prepare_merge(out: dict[str, torch.Tensor], parts: Iterable[Adapter], to_float: bool) -> MergePlan | None:
    """Replace, in ``out``, the quantized weights the adapters target (and, when ``to_float``
    (``merge(..., dequantize=True)``), every quantized weight) by float32 dequantized copies, so the
    methods' float merges apply. Raises :class:`IncompatibleAdapterError` for a targeted weight of a
    quantized layer adaptfn does not support.

    Arguments:
        out: the merge's new params dict (modified in place). parts: the adapters being merged.
        to_float: ``merge(..., dequantize=True)``.

    Returns:
        What :func:`finish_merge` needs, or None when nothing quantized is involved.
    """
    keys = {f"{p}.weight" if p else "weight" for a in parts for p, e in a.entry_items if e.kind}
    if to_float:
        for k, v in out.items():
            owner = _OWNERS.get(v) if isinstance(v, torch.Tensor) else None
            if is_quantized(v) or (owner is not None and _foreign_quantized(v)):
                keys.add(k)
    plan: MergePlan | None = None
    for key in sorted(keys):
        t = out.get(key)
        if t is None:
            continue
        owner = _OWNERS.get(t)
        if not (is_quantized(t) or _foreign_quantized(t) or (owner is not None and owner.reason is not None)):
            continue  # a float weight of a float layer: the methods' own merge
        _check_mergeable(key, t)
        if plan is None:
            plan = MergePlan({}, {}, to_float)
        f = dequantize(t, torch.float32)
        plan.originals[key] = t
        plan.floats[key] = f
        out[key] = f
    return plan


def finish_merge(out: dict[str, torch.Tensor], plan: MergePlan | None) -> dict[str, torch.Tensor]:
    """Requantize the merged float weights into new quantized tensors and warn with the errors
    (:class:`RequantizationWarning`), or, for ``merge(..., dequantize=True)``, cast them to their float
    dtype; quantized entries no delta touched (gate off) get their original tensor back.

    Arguments:
        out: the merge's new params dict (modified in place and returned). plan: from :func:`prepare_merge`.

    Returns:
        ``out``.
    """
    if plan is None:
        return out
    errors: dict[str, float] = {}
    for key, orig in plan.originals.items():
        new = out[key]
        if plan.dequantize:
            out[key] = new.to(_default_float_dtype(orig))
        elif new is plan.floats[key]:
            out[key] = orig
        else:
            q = requantize(new, orig)
            with torch.no_grad():
                errors[key] = float((dequantize(q, torch.float32) - new.detach().float()).abs().max())
            out[key] = q
    if errors:
        worst = max(errors, key=errors.__getitem__)
        msg = (f"merge: requantized {len(errors)} quantized weight(s); max abs error {errors[worst]:.3g} "
               f"({worst!r}); use merge(..., dequantize=True) for exact float weights")
        for k, v in errors.items():
            logger.info("merge: requantized %s, max abs error %.3g", k, v)
        warnings.warn(RequantizationWarning(msg, errors), stacklevel=3)
    return out
