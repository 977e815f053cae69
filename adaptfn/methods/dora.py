"""DoRA, PEFT's ``use_dora=True`` LoRA variant (weight-decomposed low-rank adaptation), called from
:mod:`adaptfn.methods.lora` for entries that carry a magnitude leaf.

A DoRA module computes ``y = m / ||W + s B A||_c * (W + s B A) x + bias``: the LoRA update sets the
direction, the trained **magnitude** vector ``m`` (one value per output channel) its length. ``||.||_c`` is
the L2 norm of each output channel's weights (a row of a Linear's [out, in] weight, a column of a GPT-2
``Conv1D``'s [in, out] one, one embedding dimension over the vocabulary for an ``nn.Embedding``). As in PEFT
(and the DoRA paper, section 4.3) the norm is **detached**: it is recomputed from the current ``A``, ``B`` at
every call but passes no gradient to them (nor to the base weight); ``m`` and the LoRA path get the usual
gradients. Per call it is computed in the adapter's dtype from ``W``, ``B @ A`` and the scaling, as PEFT's
``DoraLinearLayer.get_weight_norm`` does; in inference (nothing needs a gradient, no torch.func transform or
torch.compile) the factor ``m / ||W + s B A||_c`` is cached per (weight, A, B, m) tensor and version, so an
unchanged adapter pays for ``B @ A`` once, not at every call (an in-place update, e.g. an optimiser step,
bumps a version and the factor is recomputed).

The output is assembled as PEFT assembles it: ``y = base(x) + (f - 1) * (base(x) - bias) + f * s * B A x``
with ``f = m / ||W + s B A||_c`` (embeddings: ``y = f * base(x) + f * s * B A x``), so an entry that is off
(``f`` exactly 1, the low-rank part exactly 0) gives the base output bit for bit under transforms too. Plain
Linear / Conv1D layers in inference take a fused path: ``f * (bias / f + s (x A^T) B^T + x W^T)`` in one buffer
(the base GEMM accumulating into it, one multiply at the end).

Leaves: ``lora_A``, ``lora_B`` as LoRA's, plus ``lora_magnitude`` (PEFT's ``lora_magnitude_vector`` key):
[out] for Linear / Conv1D, [embedding_dim] for embeddings ([N, ...] stacked). :func:`init_magnitude` is PEFT's
initialisation: ``m = ||W + s B A||_c`` of the freshly initialised ``A``, ``B`` (so a fresh adapter computes
what plain LoRA with the same ``A``, ``B`` computes: the base model for ``init_lora_weights=True``).

A scale weight ``w`` (:func:`adaptfn.scale`, the ``coef`` leaf) weights the **delta direction** and moves the
magnitude from the base weight's own norm toward ``m``::

    y = m_w / ||W + w s B A||_c * (W + w s B A) x + bias,     m_w = ||W||_c + w (m - ||W||_c)  (torch.lerp)

so ``w = 0`` is the base model (``m_0 = ||W||_c``, the factor exactly 1), ``w = 1`` exactly the adapter
(``lerp`` returns ``m`` at 1 and ``x * 1 == x``), and ``w`` is differentiable (the norm keeps its path to
``w``; only ``A``, ``B`` see it detached). ``merge`` folds the same weight in. PEFT's file cannot hold
``m_w`` without the base weight, so saving a DoRA entry with a weight other than 1, or a masked one (whose
magnitude would have to be ``||W||_c``), raises :class:`adaptfn.ConfigError`: merge it, or drop it with
:func:`adaptfn.select`.

Per-row routing (``route=``, ``route="all"``): each adapter ``j`` of the stack has its own factor ``F_j``
(computed for all of them at once, ``B_j @ A_j`` in chunks, and cached in inference), and row ``i`` uses
``F[route[i]]`` (1 for rows routed to -1 and adapters whose gate is off) around the per-row low-rank part from
:mod:`adaptfn.routing` (dense / gather kernels, chosen as for LoRA).

Module kinds plug in through :data:`KINDS` (a :class:`DoraKind` per LoRA kind: how the stored weight is
oriented channel-first, the low-rank weight in that orientation, the output's channel axis and, for kinds
without a dedicated path here, the low-rank output). A convolution kind registers one with
:func:`register_kind` (PEFT: the norm over all axes but the output channel's, magnitude [1, out, 1, ...]).

Example:
    >>> cfg = af.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    >>> dora = af.init(fn, cfg, generator=torch.Generator().manual_seed(0))
    >>> leaves = dora.leaves("model.decoder.layers.0.self_attn.q_proj")
    >>> sorted(leaves), tuple(leaves["lora_magnitude"].shape)
    (['gate', 'lora_A', 'lora_B', 'lora_magnitude'], (22,))
    >>> w = params["model.decoder.layers.0.self_attn.q_proj.weight"]        # [out, in]
    >>> torch.allclose(leaves["lora_magnitude"], w.norm(dim=1))             # B = 0: the rows' norms
    True
    >>> out = af.inject(fn, dora)(params, input_ids=ids).logits             # so it starts as the base
    >>> torch.allclose(out, fn(params, input_ids=ids).logits, atol=1e-5)
    True
    >>> half = af.scale(dora, 0.5)                      # weighted: merged and injected alike, not saved
    >>> merged = af.merge(params, half)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant, routing
from ..adapter import COEF, GATE, SCALING, Entry, coef_value
from ..errors import ConfigError, IncompatibleAdapterError, shape_str, single_for_route, stacked_called_directly
from .common import dropout, is_conv1d, module_path, weight_needs_transpose

__all__ = ["MAGNITUDE", "PEFT_KEY", "DoraKind", "KINDS", "register_kind", "init_magnitude", "forward", "merge",
           "check", "to_peft", "channels"]

MAGNITUDE = "lora_magnitude"
"""The leaf name of DoRA's magnitude vector."""
PEFT_KEY = "lora_magnitude_vector"
"""PEFT's key suffix for it (``base_model.model.<path>.lora_magnitude_vector``, no ``.weight``)."""

_CHUNK = 1 << 24  # elements of B_j @ A_j materialised at once when computing a stack's factors


def _orient_2d(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.T if transposed else weight


def _delta_2d(A: torch.Tensor, B: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return B @ A  # [..., out, in] (embedding: [..., dim, num])


@dataclasses.dataclass(frozen=True)
class DoraKind:
    """What DoRA needs to know of one LoRA kind (``Entry.kind``).

    Attributes:
        orient: ``(weight, transposed) -> view``: the stored weight channel-first (Linear: as stored [out, in];
            Conv1D and embeddings: transposed; convolutions: as stored [out, in/groups, *k]). Its own inverse.
        delta: ``(A, B, oriented_shape) -> B A`` in that orientation (leading stack axes kept), unscaled.
        out_axis: the axis of the module's output that holds the channels (-1; 1 for convolutions).
        magnitude_shape: ``channels -> PEFT's shape of the magnitude`` ([C]; convolutions [1, C, 1, ...]).
        lowrank: for kinds without a dedicated forward here: ``(entry, leaves, module, h) -> B A h``, the
            unscaled low-rank output shaped like the module's output (None: linear / embedding, handled here).
        always_transposed: the stored weight is always oriented by transposing (embeddings: [num, dim]).
        channels: ``lora_B -> C``: the number of output channels, single or stacked (default ``lora_B.shape[-2]``,
            for ``lora_B`` [(N,) out, r]; a 2-d convolution's [(N,) out, r, 1, 1] gives ``shape[-4]``).
        forward: a kind's own module output, replacing :func:`forward`'s (same arguments; None: the paths here).
        merge_delta: ``(A, B) -> B A`` as :func:`merge` adds it to the weight (None: ``delta``), unscaled.
        merge_check: ``(entry, leaves, weight) -> None``: raises where the kind cannot merge (None: always can).
    """

    orient: Callable[[torch.Tensor, bool], torch.Tensor] = _orient_2d
    delta: Callable[[torch.Tensor, torch.Tensor, torch.Size], torch.Tensor] = _delta_2d
    out_axis: int = -1
    magnitude_shape: Callable[[int], tuple[int, ...]] = lambda c: (c,)
    lowrank: Callable[..., torch.Tensor] | None = None
    always_transposed: bool = False
    channels: Callable[[torch.Tensor], int] = lambda B: int(B.shape[-2])
    forward: Callable[..., torch.Tensor] | None = None
    merge_delta: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    merge_check: Callable[[Entry, Mapping[str, torch.Tensor], torch.Tensor], None] | None = None


KINDS: dict[str, DoraKind] = {
    "linear": DoraKind(),
    "embedding": DoraKind(always_transposed=True),
}


def register_kind(kind: str, spec: DoraKind) -> None:
    """Let DoRA run on another LoRA kind (e.g. a convolution), described by ``spec``."""
    KINDS[kind] = spec


def _kind(entry: Entry) -> DoraKind:
    spec = KINDS.get(entry.kind)
    if spec is None:
        raise IncompatibleAdapterError(f"DoRA (use_dora=True) is not available for LoRA kind {entry.kind!r} "
                                       f"(DoRA kinds: {sorted(KINDS)})")
    return spec


def channels(entry: Entry, leaves: Mapping[str, torch.Tensor]) -> int:
    """The number of output channels (the magnitude's length) of an entry's low-rank weight."""
    return _kind(entry).channels(leaves["lora_B"])


def _channel_norm(v: torch.Tensor, lead: int) -> torch.Tensor:
    """The L2 norm of each channel of ``v`` [*lead axes, C, ...]: [*lead axes, C] (PEFT's ``linalg.norm``)."""
    dims = tuple(range(lead + 1, v.dim()))
    return torch.linalg.vector_norm(v, dim=dims)


def _weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The module's weight as a float tensor in ``dtype`` (bitsandbytes weights dequantized), detached."""
    w = module.weight
    if quant.is_quantized(w):
        return quant.dequantize(w, dtype, module).detach()
    return w.detach().to(dtype)


def init_magnitude(entry: Entry, module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA initialisation of the magnitude (``DoraLinearLayer.update_layer``).

    Arguments:
        entry: the module's LoRA entry (its kind and scaling ``s``). module: the base layer (Linear, Conv1D,
            Embedding; a bitsandbytes weight is dequantized). A, B: the freshly initialised factors, [r, in] and
            [out, r] (embeddings: [r, num], [dim, r]).

    Returns:
        ``||W + s B A||_c`` in float32 (or wider: the caller casts), in PEFT's shape for the kind ([out]; [dim]).

    Example:
        >>> from adaptfn.methods import dora
        >>> e = af.Entry(kind="linear", r=2, scaling=2.0)
        >>> q = model.model.decoder.layers[0].self_attn.q_proj
        >>> m = dora.init_magnitude(e, q, torch.zeros(2, 22), torch.zeros(22, 2))
        >>> torch.equal(m, q.weight.detach().norm(dim=1))
        True
    """
    spec = _kind(entry)
    dt = torch.promote_types(A.dtype, torch.float32)
    W = _weight(module, dt)
    Wo = spec.orient(W, spec.always_transposed or is_conv1d(module))
    v = Wo + entry.scaling * spec.delta(A.to(dt), B.to(dt), Wo.shape)
    return _channel_norm(v, 0).reshape(spec.magnitude_shape(Wo.shape[0]))


# -- the factor m / ||W + s B A||_c ------------------------------------------------------------------
_FACTORS = routing._DerivedCache()


def _factor(spec: DoraKind, Wo: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, s: Any,
            c: torch.Tensor | None, on: Any) -> torch.Tensor:
    """``f`` [C] = ``m_w / ||W + w s B A||_c`` (detached norm, except for its path to the weight ``w = c``);
    exactly 1 where the gate is off. ``Wo``: the channel-first base weight in the adapter's dtype."""
    D = spec.delta(A.detach(), B.detach(), Wo.shape) * s
    mv = m.reshape(-1)
    if c is None:
        n = _channel_norm(Wo + D, 0).detach()
    else:
        cd = c.to(D.dtype)
        n = _channel_norm(Wo + D * cd, 0)  # its graph reaches only c (A, B, W detached)
        n0 = _channel_norm(Wo, 0)
        mv = torch.lerp(n0, mv, cd)  # exactly n0 at 0, exactly m at 1
    f = mv / n
    if on is not True:
        f = torch.where(on, f, torch.ones((), dtype=f.dtype, device=f.device))
    return f


def _cache_keys(module: nn.Module, leaves: Mapping[str, torch.Tensor], s: Any, on: Any) -> tuple | None:
    if type(s) is not float or on is not True or torch.compiler.is_compiling():
        return None
    keys = (module.weight, leaves["lora_A"], leaves["lora_B"], leaves[MAGNITUDE])
    c = leaves.get(COEF)
    return keys if c is None else (*keys, c)


def _factor_cached(spec: DoraKind, entry: Entry, module: nn.Module, leaves: Mapping[str, torch.Tensor], s: Any,
                   on: Any, transposed: bool) -> torch.Tensor:
    A, B, m = leaves["lora_A"], leaves["lora_B"], leaves[MAGNITUDE]
    c = leaves.get(COEF)
    return _FACTORS.memo(_cache_keys(module, leaves, s, on), (entry.kind, s, transposed, A.dtype),
                         lambda: _factor(spec, spec.orient(_weight(module, A.dtype), transposed), A, B, m, s, c, on))


def _bias_over_factor(module: nn.Module, leaves: Mapping[str, torch.Tensor], s: Any, f: torch.Tensor,
                      bias: torch.Tensor, transposed: bool) -> torch.Tensor | None:
    """``bias / f`` (so the fused kernel's buffer starts with it and one multiply by ``f`` ends it), or None
    where ``f`` has a zero (then the bias is added after); cached with the factor."""
    keys = _cache_keys(module, leaves, s, True)

    def make() -> torch.Tensor | None:
        bf = bias / f
        return bf if bool(torch.isfinite(bf).all()) else None

    return _FACTORS.memo(None if keys is None else (*keys, bias), ("bias/f", s, transposed, f.dtype), make)


def _raw_scale(entry: Entry, leaves: Mapping[str, torch.Tensor]) -> Any:
    return leaves[SCALING].detach() if SCALING in leaves else entry.scaling


def _lora_scale(s: Any, c: torch.Tensor | None, on: Any) -> Any:
    """The low-rank part's multiplier: the scaling, times the gate under a transform (the weight ``c`` is applied
    to the rank-r product)."""
    return s if on is True else s * on


# -- forward -------------------------------------------------------------------------------------------
def forward(lora: Any, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
            call_base: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor,
            route: torch.Tensor | None = None) -> torch.Tensor:
    """The DoRA module output (called by the LoRA method for entries with a ``lora_magnitude`` leaf).

    Arguments:
        lora: the LoRA method. entry, leaves, on, generator: as in :meth:`adaptfn.methods.base.Method.forward`
            (``generator``: LoRA dropout, which DoRA applies as PEFT does: the base part is then recomputed from
            the dropped-out input). call_base: the base forward. module: the base layer. x: the input [..., in]
            (embeddings: token ids). route: None, or int64 [batch]: row ``i`` uses adapter ``route[i]`` of a
            stacked ``leaves`` (-1: none).

    Returns:
        ``base(x) + (f - 1) (base(x) - bias) + f s B A x`` with ``f = m / ||W + s B A||_c`` (see the module
        docstring; embeddings ``f base(x) + f s B A x``), in the base output's dtype.
    """
    spec = _kind(entry)
    if spec.forward is not None:
        return spec.forward(lora, entry, leaves, on, generator, call_base, module, x, route)
    A, m = leaves["lora_A"], leaves[MAGNITUDE]
    if route is not None:
        if A.dim() != 3:
            raise single_for_route()
        return _routed(spec, entry, leaves, on, generator, call_base, module, x, route)
    if A.dim() != 2 or m.dim() != len(spec.magnitude_shape(1)):
        raise stacked_called_directly(module_path(module))
    if entry.kind == "embedding":
        return _embedding(spec, entry, leaves, on, call_base, module, x)
    if spec.lowrank is not None:
        return _generic(spec, entry, leaves, on, generator, call_base, module, x)
    return _linear(spec, entry, leaves, on, generator, call_base, module, x)


def _dropping(entry: Entry, generator: Any) -> bool:
    return generator is not None and entry.option("dropout", 0.0) > 0


def _linear(spec: DoraKind, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
            call_base: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    A, B, m = leaves["lora_A"], leaves["lora_B"], leaves[MAGNITUDE]
    c = leaves.get(COEF)
    s = _raw_scale(entry, leaves)
    transposed = is_conv1d(module)
    f = _factor_cached(spec, entry, module, leaves, s, on, transposed)
    sl = _lora_scale(s, c, on)
    if not _dropping(entry, generator):
        gemm = routing.base_gemm(call_base, module, x, A, B, m, *(() if c is None else (c,)))
        if gemm is not None and type(sl) is float:
            # inference on a plain Linear / Conv1D: s (x A^T) B^T, then x W^T accumulated into it, then the
            # factor and the bias, all in one [M, out] buffer
            # (bias / f + s (x A^T) B^T + x W^T) * f: two GEMMs and one pass over [M, out] more than LoRA
            h2 = F.linear(x, A).view(-1, A.shape[0])
            if c is not None:
                h2.mul_(c)
            if sl != 1.0:
                h2.mul_(sl)
            bias = gemm.bias
            bf = None if bias is None else _bias_over_factor(module, leaves, s, f, bias, transposed)
            z = torch.mm(h2, B.T) if bf is None else torch.addmm(bf, h2, B.T)
            w = gemm.weight
            z.addmm_(x.reshape(-1, x.shape[-1]), w if gemm.transposed else w.T)
            z.mul_(f)
            if bias is not None and bf is None:
                z.add_(bias)
            return z.view(*x.shape[:-1], z.shape[-1])
    result = call_base(x)
    h = dropout(entry, generator, x if x.dtype == A.dtype else x.to(A.dtype))
    if _dropping(entry, generator):  # PEFT: the base part is recomputed from the dropped-out input, no bias
        base = F.linear(h, spec.orient(_weight(module, h.dtype), transposed))
    else:
        bias = module.bias
        base = result if bias is None else result - bias
    low = F.linear(h, A)
    if c is not None:
        low = low * c.to(low.dtype)
    low = F.linear(low, B)
    out = result + ((f - 1) * base + f * low * sl)
    return out.to(result.dtype)


def _embedding(spec: DoraKind, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
               call_base: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    A, B = leaves["lora_A"], leaves["lora_B"]
    c = leaves.get(COEF)
    s = _raw_scale(entry, leaves)
    f = _factor_cached(spec, entry, module, leaves, s, on, True)
    result = call_base(x)
    mod: Any = module
    h = F.embedding(x, A.T, mod.padding_idx, mod.max_norm, mod.norm_type, mod.scale_grad_by_freq, mod.sparse)
    if c is not None:
        h = h * c.to(h.dtype)
    low = h @ B.T
    out = f * result + f * low * _lora_scale(s, c, on)  # PEFT's embedding form: f * (base + s B A x)
    return out.to(result.dtype)


def _channel_view(spec: DoraKind, f: torch.Tensor, ndim: int) -> torch.Tensor:
    if spec.out_axis in (-1, ndim - 1):
        return f
    shape = [1] * ndim
    shape[spec.out_axis] = -1
    return f.reshape(shape)


def _generic(spec: DoraKind, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
             call_base: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A registered kind with its own ``lowrank`` (e.g. a convolution): PEFT's ``(f - 1) * (base - bias) +
    f * s * lowrank`` on the channel axis ``out_axis``."""
    A = leaves["lora_A"]
    c = leaves.get(COEF)
    s = _raw_scale(entry, leaves)
    f = _factor_cached(spec, entry, module, leaves, s, on, False)
    result = call_base(x)
    h = dropout(entry, generator, x if x.dtype == A.dtype else x.to(A.dtype))
    lv = dict(leaves)
    low = spec.lowrank(entry, lv, module, h)  # type: ignore[misc]
    if c is not None:
        low = low * c.to(low.dtype)
    fv = _channel_view(spec, f, result.dim())
    bias = getattr(module, "bias", None)
    base = result if bias is None else result - _channel_view(spec, bias, result.dim())
    out = result + ((fv - 1) * base + fv * low * _lora_scale(s, c, on))
    return out.to(result.dtype)


# -- per-row routing -------------------------------------------------------------------------------------
def _stack_factors(spec: DoraKind, Wo: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor,
                   s: torch.Tensor, c: torch.Tensor | None, on: Any) -> torch.Tensor:
    """[N, C]: each stacked adapter's factor (1 where its gate is off). s: [N] scalings (detached)."""
    n_ad = A.shape[0]
    step = max(1, _CHUNK // max(1, Wo.numel()))
    sw = s if c is None else s * c.to(s.dtype)
    norms = []
    for i in range(0, n_ad, step):
        D = spec.delta(A[i:i + step].detach(), B[i:i + step].detach(), Wo.shape)  # [k, C, ...]
        k = D.shape[0]
        v = Wo + D * sw[i:i + k].to(D.dtype).reshape(k, *([1] * (D.dim() - 1)))
        norms.append(_channel_norm(v, 1))
    n = torch.cat(norms)
    mv = m.reshape(n_ad, -1)
    if c is None:
        n = n.detach()
    else:
        mv = torch.lerp(_channel_norm(Wo, 0).expand_as(mv), mv, c.to(mv.dtype)[:, None])
    fs = mv / n
    if on is not True:
        fs = torch.where(on[:, None], fs, torch.ones((), dtype=fs.dtype, device=fs.device))
    return fs


def _routed(spec: DoraKind, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
            call_base: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor,
            route: torch.Tensor) -> torch.Tensor:
    """Row i of the batch uses adapter ``route[i]`` of the stack, with that adapter's own factor."""
    if spec.lowrank is not None:
        raise IncompatibleAdapterError(f"route= with DoRA is not available for LoRA kind {entry.kind!r} yet")
    A, B, m = leaves["lora_A"], leaves["lora_B"], leaves[MAGNITUDE]
    c = leaves.get(COEF)
    n_ad = A.shape[0]
    s = leaves[SCALING].detach() if SCALING in leaves else torch.full(
        (n_ad,), entry.scaling, dtype=torch.float32, device=A.device)
    embedding = entry.kind == "embedding"
    transposed = True if embedding else is_conv1d(module)
    sources = None
    if SCALING in leaves and not torch.compiler.is_compiling():  # the leaves (``s`` is a new tensor each call)
        sources = (module.weight, A, B, m, leaves[SCALING], leaves[GATE]) + (() if c is None else (c,))
    fs = _FACTORS.memo(sources, ("stack", entry.kind, transposed, A.dtype),
                       lambda: _stack_factors(spec, spec.orient(_weight(module, A.dtype), transposed), A, B, m, s,
                                              c, on))
    sl = s.to(A.dtype) if c is None else s.to(A.dtype) * c.to(A.dtype)
    if on is not True:
        sl = sl * on
    bsz = route.shape[0]
    ic = route.clamp(min=0)
    rows = torch.where((route >= 0)[:, None], fs[ic], torch.ones((), dtype=fs.dtype, device=fs.device))
    fr = rows[:, None, :]  # [bsz, 1, C]
    result = call_base(x)
    if embedding:
        low = routing.embedding_lowrank(x, A, B, sl, route)
        r3, l3 = result.reshape(bsz, -1, result.shape[-1]), low.reshape(bsz, -1, low.shape[-1])
        return (fr * r3 + fr * l3).reshape(result.shape).to(result.dtype)
    h = dropout(entry, generator, x if x.dtype == A.dtype else x.to(A.dtype))
    if _dropping(entry, generator):
        base = F.linear(h, spec.orient(_weight(module, h.dtype), transposed))
    else:
        bias = module.bias
        base = result if bias is None else result - bias
    low = routing.lowrank(h, A, B, sl, route)
    o = result.shape[-1]
    r3, b3, l3 = result.reshape(bsz, -1, o), base.reshape(bsz, -1, o), low.reshape(bsz, -1, o)
    return (r3 + ((fr - 1) * b3 + fr * l3)).reshape(result.shape).to(result.dtype)


# -- merge, files, checks ----------------------------------------------------------------------------
def merge(entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
          tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DoRA entry folded into its module's weight (PEFT's ``merge``).

    Arguments:
        entry, leaves, on: as in :func:`forward`. tensors: the module's tensors: ``weight`` (as earlier adapters
            of the same merge left it) and ``base_layer.weight`` (before them: the norm is the unmerged weight's,
            as in PEFT). The layout of a 2-D weight is the model's (:mod:`adaptfn._layout`).

    Returns:
        ``{"weight": f * (W + w s B A)}`` in the stored layout, ``f = m_w / ||W0 + w s B A||_c``, computed in the
        wider dtype and rounded once.

    Example:
        >>> cfg = af.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
        >>> d = af.init(fn, cfg, generator=torch.Generator().manual_seed(1))
        >>> merged = af.merge(params, d)                 # calls this for every DoRA entry
        >>> out = fn(merged, input_ids=ids).logits
        >>> torch.allclose(out, af.inject(fn, d)(params, input_ids=ids).logits, atol=1e-5)
        True
    """
    spec = _kind(entry)
    weight = tensors["weight"]
    base = tensors.get("base_layer.weight", weight)
    A, B, m = leaves["lora_A"], leaves["lora_B"], leaves[MAGNITUDE]
    if spec.merge_check is not None:
        spec.merge_check(entry, leaves, weight)
    if spec.always_transposed:
        transposed = True
    elif weight.dim() == 2:
        transposed = weight_needs_transpose(weight, (B.shape[0], A.shape[1]), entry.fan_in_fan_out)
    else:
        transposed = False
    c = leaves.get(COEF)
    s = _raw_scale(entry, leaves)
    Wo, Wo0 = spec.orient(weight, transposed), spec.orient(base, transposed)
    Dn = (spec.delta(A, B, Wo.shape) if spec.merge_delta is None else spec.merge_delta(A, B)) * s  # PEFT's
    # delta weight (scaled), channel-first
    mv = m.reshape(-1)
    if c is None:
        D = Dn
        n = _channel_norm(Wo0 + D.detach(), 0).detach()
    else:
        cd = c.to(Dn.dtype)
        D = Dn * cd
        n = _channel_norm(Wo0 + Dn.detach() * cd, 0)  # keeps its path to the weight
        mv = torch.lerp(_channel_norm(Wo0.to(mv.dtype), 0), mv, cd.to(mv.dtype))
    f = mv / n
    if on is not True:
        D = D * on
        f = torch.where(on, f, torch.ones((), dtype=f.dtype, device=f.device))
    merged = f.reshape(-1, *([1] * (Wo.dim() - 1))) * (Wo + D)
    return {"weight": spec.orient(merged, transposed).to(weight.dtype)}


def check(path: str, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> None:
    """The magnitude's shape fits the entry (PEFT's: [out], [embedding_dim] or the kind's)."""
    spec = _kind(entry)
    m = leaves[MAGNITUDE]
    want = spec.magnitude_shape(channels(entry, leaves))
    got = tuple(m.shape[max(0, m.dim() - len(want)):])  # a stack's leading axis aside
    if got != want or m.dim() > len(want) + 1:
        raise IncompatibleAdapterError(f"module {path!r}: {MAGNITUDE} {shape_str(m.shape)} does not fit the LoRA "
                                       f"factors (expected {list(want)}, one value per output channel)")


def to_peft(entry: Entry, leaves: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The magnitude for PEFT's file; a scale weight other than 1 cannot be written (see the module docstring)."""
    c = leaves.get(COEF)
    if c is not None:
        cv = coef_value(c.detach())
        if cv != 1.0:
            raise ConfigError(
                f"a DoRA module with a scale weight ({cv if cv is not None else 'a traced tensor'}) cannot be "
                "written to PEFT's file: its magnitude moves toward the base weight's norm (lerp(||W||, m, w)), "
                "which the file cannot hold without the base weight; merge it (af.merge) or save the unweighted "
                "adapter")
    return leaves[MAGNITUDE]


def off_error() -> ConfigError:
    """The error for writing a masked-off DoRA entry (its magnitude would have to be the base weight's norm)."""
    return ConfigError("a masked-off DoRA module cannot be written to PEFT's file without the base weight (its "
                       "magnitude would have to be the weight's norm); drop the module with af.select(adapter, ...) "
                       "first")
