"""Layer kinds beyond Linear / Conv1D / Embedding, shared by the methods: ``nn.Conv1d`` / ``nn.Conv2d`` /
``nn.Conv3d`` and ``nn.MultiheadAttention``.

What is here is geometry and kernels, no method's format: the methods (``lora_layers.py``, ``ia3.py``,
``adalora.py``) call it.

Convolutions. A conv layer's low-rank delta (PEFT's LoRA) is a pair of convolutions:

* ``A`` [r, in, *k]: a convolution with the base layer's kernel size, stride, padding, dilation and
  padding mode, and ``groups=1`` (it reads every input channel, whatever the base's groups);
* ``B`` [out, r / groups, 1, ...]: a 1x1 convolution with the base's ``groups`` (so ``r % groups == 0``).

``y = base(x) + s * B(A(x))``. For ``groups=1`` that is ``base(x)`` with the weight ``W + s * delta``, where
``delta = B . A`` [out, in, *k] (:func:`conv_delta`): the delta is a conv weight and merges exactly. For
``groups > 1`` the delta mixes every input channel into every output group, which a grouped weight cannot hold:
such an entry runs unmerged only (PEFT refuses to merge it too).

PEFT 0.21.2 builds ``A`` from the base's kernel size, stride and padding only: on a dilated base its unmerged
forward fails (the spatial sizes differ) or, where the sizes happen to agree, disagrees with its own merge, and
on a base with ``padding_mode != "zeros"`` its ``A`` pads with zeros. adaptfn gives ``A`` the base's dilation
and padding mode, so the unmerged forward equals the merged model (PEFT's merge, and the fix proposed upstream);
for ``dilation == 1`` and zero padding, the two agree with PEFT's unmerged forward.

``nn.MultiheadAttention`` (``_qkv_same_embed_dim`` only): PEFT adapts the packed ``in_proj_weight``
[3E, E] (``lora_A`` [r, E], ``lora_B`` [3E, r]) and ``out_proj.weight`` [E, E] (``lora_A`` [r, E], ``lora_B``
[E, r], saved under ``<path>.base_layer.out_proj.``), with one rank and scale, and runs the layer with the
merged weights (its forward never calls ``out_proj.forward``). :func:`mha_call` does that without mutating the
model: the merged weights are bound to the per-thread copy's module for one call.

Per-row routing (``af.inject(fn, stacked, route=idx)``) for convolutions, :func:`conv_lowrank_routed`: the base
convolution runs once on the whole batch, only ``B(A(x))`` is per row, by one of three kernels:

* ``segment``: the rows sorted into one group per adapter used, one ``A`` conv and one ``B`` product per group
  (exact FLOPs; the choice in inference when few adapters share the rows);
* ``gather``: every row's own ``A`` in one grouped convolution (the batch folded into channels, ``groups=rows``),
  then a batched ``B`` product (exact FLOPs, no data-dependent shapes: used under torch.func transforms and
  when many adapters have few rows each);
* ``dense``: every adapter's ``A`` on every row in one convolution (``N * r`` output channels), a per-row mask,
  one ``B`` product (N x the low-rank FLOPs, no gathers; tiny stacks).

``nn.MultiheadAttention`` routes by groups of rows too (:func:`mha_routed`): the layer runs once per adapter used,
on its rows, with that adapter's merged weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._where import is_target
from ..errors import IncompatibleAdapterError, shape_str
from .common import expand_all_linear, is_conv1d

__all__ = ["CONV_KINDS", "MHA", "ModuleCall", "conv_kind", "is_mha", "layer_name", "conv_nd", "conv_dims",
           "conv_a", "conv_b", "conv_lowrank", "conv_delta", "conv_groups", "conv_lowrank_routed", "conv_fn",
           "check_mha", "mha_call", "mha_routed", "mha_out_proj_of", "merge_weight_names", "channel_view",
           "pad_grouped", "unpad_grouped", "CONV_ROUTE_KERNELS", "plan_targets", "layer_option",
           "weight_kernel_ok", "conv_with_delta", "conv_routed_merged"]

CONV_KINDS: dict[str, int] = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
"""Entry kind -> number of spatial dimensions."""
MHA = "mha"
_CONV_CLASSES = ((nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"))
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ModuleCall:
    """The base forward of a module called with more than its first argument (``mha(q, k, v, ...)``): calling
    it with ``x`` runs ``fn(x, *args, **kwargs)``; ``args`` / ``kwargs`` are there for methods that need to
    call the base on other inputs (per-row routing slices ``key``, ``value`` and the masks)."""

    __slots__ = ("fn", "args", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __call__(self, x: Any) -> Any:
        return self.fn(x, *self.args, **self.kwargs)


# -- kinds ---------------------------------------------------------------------------------------------------
def conv_kind(module: nn.Module) -> str | None:
    """``"conv1d"`` / ``"conv2d"`` / ``"conv3d"`` for ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (subclasses
    included; transposed convolutions are not these), else None."""
    for cls, kind in _CONV_CLASSES:
        if isinstance(module, cls):
            return kind
    return None


def is_mha(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention)


def layer_name(module: nn.Module) -> str:
    """How messages name a module's layer kind: its class, with the base class it is one of when it is a
    subclass (``LoRACompatibleConv (an nn.Conv2d)``), and ``groups`` for grouped convolutions."""
    name = type(module).__name__
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, nn.Linear, nn.Embedding):
        if isinstance(module, cls) and type(module) is not cls:
            name += f" (an nn.{cls.__name__})"
            break
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        name += " (a transposed convolution)"
    groups = getattr(module, "groups", 1)
    if conv_kind(module) and groups != 1:
        name += f" with groups={groups}"
    return name


def conv_nd(kind: str) -> int:
    return CONV_KINDS[kind]


def conv_fn(nd: int) -> Callable[..., torch.Tensor]:
    return _CONV_FNS[nd]


def conv_dims(module: nn.Module) -> tuple[int, int, int, tuple[int, ...]]:
    """``(in_channels, out_channels, groups, kernel_size)`` of a convolution."""
    m: Any = module
    return int(m.in_channels), int(m.out_channels), int(m.groups), tuple(int(k) for k in m.kernel_size)


def conv_groups(A: torch.Tensor, B: torch.Tensor, nd: int) -> int:
    """The ``groups`` of a conv LoRA pair, read from its shapes (``A`` [..., r, in, *k], ``B`` [..., out, r / g,
    1...]); stacked leaves have a leading axis."""
    r, rg = int(A.shape[-(nd + 2)]), int(B.shape[-(nd + 1)])
    return r // rg if rg else 1


# -- convolution kernels ----------------------------------------------------------------------------------
def _padded(x: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, Any]:
    """``x`` padded as the base pads it when its ``padding_mode`` is not "zeros" (then the conv pads nothing),
    and the ``padding`` argument the convolution gets."""
    m: Any = module
    if m.padding_mode != "zeros":
        return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), 0
    return x, m.padding


def conv_a(x: torch.Tensor, A: torch.Tensor, module: nn.Module, nd: int, groups: int = 1,
           padded: bool = False) -> torch.Tensor:
    """``A`` applied as a convolution with the base layer's geometry (stride, padding, dilation, padding mode):
    x [batch, in, *spatial], A [rows, in / groups, *k] -> [batch, rows, *spatial_out]. ``padded``: ``x`` is
    already padded by :func:`_padded` (then no padding is added)."""
    m: Any = module
    if padded:
        pad: Any = 0 if m.padding_mode != "zeros" else m.padding
    else:
        x, pad = _padded(x, module)
    return _CONV_FNS[nd](x, A, None, m.stride, pad, m.dilation, groups)


def conv_b(h: torch.Tensor, B: torch.Tensor, groups: int) -> torch.Tensor:
    """``B`` [out, r / groups, 1...] applied as a grouped 1x1 convolution to h [batch, r, *spatial], as a batched
    matrix product: [batch, out, *spatial]."""
    n, r = h.shape[0], h.shape[1]
    out = B.shape[0]
    sp = h.shape[2:]
    Bm = B.reshape(groups, out // groups, r // groups)
    y = torch.matmul(Bm, h.reshape(n, groups, r // groups, -1))  # [n, g, out/g, S]
    return y.reshape(n, out, *sp)


def conv_lowrank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, module: nn.Module, nd: int,
                 coef: torch.Tensor | None = None) -> torch.Tensor:
    """``B(A(x))`` of one adapter (unscaled; times ``coef`` when given, applied to the rank-r product)."""
    h = conv_a(x, A, module, nd)
    if coef is not None:
        h = h * coef.to(h.dtype)
    return conv_b(h, B, conv_groups(A, B, nd))


def conv_delta(A: torch.Tensor, B: torch.Tensor, nd: int) -> torch.Tensor:
    """The delta ``B . A`` as a conv weight [out, in, *k] (``groups=1``), computed as PEFT's
    ``get_delta_weight`` computes it (a 1x1 Conv2d: a matrix product; otherwise ``conv(A^T, B)^T``), so merged
    weights match PEFT's bit for bit.

    Example (``B(A(x))`` is the convolution of ``x`` with the delta, the base's geometry kept):

        >>> from torch import nn
        >>> conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2)
        >>> A, B = torch.randn(2, 3, 3, 3), torch.randn(5, 2, 1, 1)
        >>> x = torch.randn(4, 3, 9, 9)
        >>> delta = conv_delta(A, B, 2)
        >>> delta.shape
        torch.Size([5, 3, 3, 3])
        >>> lowrank = conv_lowrank(x, A, B, conv, 2)
        >>> torch.allclose(lowrank, conv._conv_forward(x, delta, None), atol=1e-5)
        True
    """
    if nd == 2 and tuple(A.shape[2:]) == (1, 1):
        return (B.flatten(1) @ A.flatten(1))[:, :, None, None]
    return _CONV_FNS[nd](A.transpose(0, 1), B).transpose(0, 1)


_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}


def weight_kernel_ok(call_base: Any, module: nn.Module, x: Any, *others: torch.Tensor, merges: int = 1) -> bool:
    """Whether a convolution's LoRA may run as one convolution with the weight ``W + s * B . A`` (see
    :func:`conv_with_delta`): ``call_base`` is the plain ``nn.ConvNd.forward`` of this exact module, inference
    (nothing needs autograd), no torch.func transform, torch.compile or autocast, one dtype throughout, and the
    delta is cheaper to form than the low-rank pair is to run (batch x output pixels above the output channels:
    forming ``B . A`` costs ``out * in * k * r``, running ``A`` then ``B`` costs ``rows * r * (in * k + out)``;
    ``merges``: how many deltas the call forms, one per adapter a routed batch uses)."""
    if getattr(call_base, "__self__", None) is not module or getattr(call_base, "__func__", None) not in _CONV_FORWARDS:
        return False
    if _transforming() or type(x) is not torch.Tensor:
        return False
    m: Any = module
    w = m.weight
    if type(w) not in (torch.Tensor, nn.Parameter) or m.groups != 1:
        return False
    dt = x.dtype
    if w.dtype != dt or any(t.dtype != dt for t in others) or (m.bias is not None and m.bias.dtype != dt):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or any(t.requires_grad for t in others)):
        return False
    if torch.is_autocast_enabled(x.device.type) or x.dim() < 2:
        return False
    k = w[0].numel()  # in * prod(kernel)
    out = int(w.shape[0])
    rows = x.numel() // max(1, int(x.shape[1]) * math.prod(m.stride))
    return rows * (k + out) > merges * out * k


def conv_with_delta(module: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """``module(x)`` with the weight ``W + s * B . A`` (one GEMM forms it: ``addmm(W, B, A, alpha=s)`` on the
    flattened [out, in * k] layout, ``groups=1``), in one convolution: what the merged model computes, without
    running the low-rank pair."""
    m: Any = module
    w = m.weight
    out = int(w.shape[0])
    merged = torch.addmm(w.reshape(out, -1), B.reshape(out, -1), A.reshape(A.shape[0], -1), alpha=s)
    return m._conv_forward(x, merged.view(w.shape), m.bias)


def conv_routed_merged(module: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                       route: torch.Tensor) -> torch.Tensor:
    """The ``merged`` route kernel (inference, ``groups=1``): the rows of each adapter used run one convolution
    with that adapter's ``W + s_j * B_j . A_j`` (rows routed to -1: with ``W``), so the whole batch costs one base
    convolution plus one ``B . A`` product per adapter used. A: [N, r, in, *k]. B: [N, out, r, 1...]. scale: [N]."""
    m: Any = module
    w = m.weight
    out, r = int(w.shape[0]), int(A.shape[1])
    rows = x.shape[0]
    idx = _row_index(route, rows)
    wf = w.reshape(out, -1)
    y: torch.Tensor | None = None
    for j in torch.unique(idx).tolist():
        sel = (idx == j).nonzero().squeeze(1)
        n, first = int(sel.numel()), int(sel[0])
        contiguous = int(sel[-1]) - first + 1 == n  # route="all" and sorted routes: slices, no gathers
        xs = x if n == rows else (x.narrow(0, first, n) if contiguous else x.index_select(0, sel))
        wj = w if j < 0 else torch.addmm(wf, B[j].reshape(out, r), A[j].reshape(r, -1),
                                         alpha=float(scale[j])).view(w.shape)
        yj = m._conv_forward(xs, wj, m.bias)
        if n == rows:
            return yj
        if y is None:
            y = yj.new_empty(rows, *yj.shape[1:])
        if contiguous:
            y.narrow(0, first, n).copy_(yj)
        else:
            y.index_copy_(0, sel, yj)
    assert y is not None
    return y


def _row_index(route: torch.Tensor, rows: int) -> torch.Tensor:
    """route [bsz] -> the adapter of each of ``rows`` leading rows (a module may see ``bsz * k`` rows, each batch
    row's ``k`` rows contiguous)."""
    bsz = route.shape[0]
    if rows % bsz:
        raise IncompatibleAdapterError(f"route has {bsz} entries but a convolution saw {rows} rows, not a multiple "
                                       f"of {bsz}")
    return route if rows == bsz else route.repeat_interleave(rows // bsz)


CONV_ROUTE_KERNELS = ("segment", "gather", "dense")


def _transforming() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None or torch.compiler.is_compiling()


def conv_lowrank_routed(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                        route: torch.Tensor, module: nn.Module, nd: int, kernel: str | None = None) -> torch.Tensor:
    """Per-row ``scale[j] * B_j(A_j(x_i))`` with ``j = route[i]`` (zero where ``route[i] == -1``).

    Arguments:
        x: [rows, in, *spatial] (``rows`` a multiple of ``route``'s length). A: [N, r, in, *k]. B: [N, out, r / g,
        1...]. scale: [N]. route: int64 [bsz]. module: the base convolution (its geometry). nd: spatial dims.
        kernel: "segment", "gather" or "dense" (see the module docstring); None picks one.

    Returns:
        [rows, out, *spatial_out].
    """
    n, r = int(A.shape[0]), int(A.shape[1])
    rows = x.shape[0]
    g = conv_groups(A, B, nd)
    out_ch = int(B.shape[1])
    idx = _row_index(route, rows)
    ic = idx.clamp(min=0)
    s = torch.where(idx >= 0, scale.to(x.dtype)[ic], torch.zeros((), dtype=x.dtype, device=x.device))  # [rows]
    xp, _ = _padded(x, module)
    if kernel is None:
        if _transforming():
            kernel = "dense" if n <= 2 else "gather"
        else:
            used = int(torch.unique(ic).numel())
            kernel = "segment" if used * 4 <= rows or used <= 2 else "gather"
    if kernel == "dense":
        h = conv_a(xp, A.reshape(n * r, *A.shape[2:]), module, nd, padded=True)  # [rows, N*r, *sp]
        sp = h.shape[2:]
        pick = (ic[:, None] == torch.arange(n, device=x.device)[None, :]).to(h.dtype) * s[:, None]  # [rows, N]
        hg = h.reshape(rows, n, g, r // g, -1) * pick[:, :, None, None, None]
        Bm = B.reshape(n, g, out_ch // g, r // g)
        y = torch.einsum("bngjs,ngoj->bgos", hg, Bm)
        return y.reshape(rows, out_ch, *sp)
    if kernel == "gather":
        Ar = A[ic]  # [rows, r, in, *k]
        m: Any = module
        pad: Any = 0 if m.padding_mode != "zeros" else m.padding
        h = _CONV_FNS[nd](xp.reshape(1, rows * xp.shape[1], *xp.shape[2:]), Ar.reshape(rows * r, *A.shape[2:]),
                          None, m.stride, pad, m.dilation, rows)  # [1, rows*r, *sp]
        sp = h.shape[2:]
        h = h.reshape(rows, g, r // g, -1) * s[:, None, None, None]
        Bm = B[ic].reshape(rows, g, out_ch // g, r // g)
        return torch.matmul(Bm, h).reshape(rows, out_ch, *sp)
    if kernel != "segment":
        raise ValueError(f"unknown conv route kernel {kernel!r}; one of {CONV_ROUTE_KERNELS}")
    y = None
    for j in torch.unique(ic).tolist():
        sel = ((ic == j) & (idx >= 0)).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        h = conv_a(xp.index_select(0, sel), A[j], module, nd, padded=True)
        h = h * scale.to(h.dtype)[j]
        d = conv_b(h, B[j], g)
        if y is None:
            y = d.new_zeros(rows, *d.shape[1:])
        y = y.index_add(0, sel, d)
    if y is None:  # every row routed to -1: the shape of the output, zeros
        with torch.no_grad():
            sp = conv_a(xp[:1], A[0, :1], module, nd, padded=True).shape[2:]
        y = torch.zeros(rows, out_ch, *sp, dtype=x.dtype, device=x.device)
    return y


def pad_grouped(t: torch.Tensor, r: int, groups: int, axis: int) -> torch.Tensor:
    """Zero-pad the rank axis ``axis`` of a conv LoRA leaf from its size to ``r`` (``A``: axis 0 holds ``r`` rows,
    ``B``: axis 1 holds ``r / groups``) keeping each group's rows together: group ``j`` of ``B`` reads rows
    ``j * r / g ...`` of ``A``, so each group is padded at its own end."""
    size = t.shape[axis]
    per = size // groups if axis == 0 else size
    want = r // groups
    if per == want:
        return t
    if axis == 0:
        v = t.reshape(groups, per, *t.shape[1:])
        pad = v.new_zeros(groups, want - per, *t.shape[1:])
        return torch.cat([v, pad], dim=1).reshape(r, *t.shape[1:])
    pad = t.new_zeros(t.shape[0], want - per, *t.shape[2:])
    return torch.cat([t, pad], dim=1)


def unpad_grouped(t: torch.Tensor, r: int, groups: int, axis: int) -> torch.Tensor:
    """The inverse of :func:`pad_grouped`: keep the first ``r / groups`` rank rows of each group."""
    want = r // groups
    if axis == 0:
        per = t.shape[0] // groups
        if per == want:
            return t
        return t.reshape(groups, per, *t.shape[1:])[:, :want].reshape(r, *t.shape[1:])
    return t[:, :want]


def channel_view(v: torch.Tensor, nd: int) -> torch.Tensor:
    """A flat per-channel vector [n] shaped [n, 1, ...] to scale the channel axis of [batch, n, *spatial]."""
    return v.reshape(-1, *([1] * nd))


# -- nn.MultiheadAttention ---------------------------------------------------------------------------------
def check_mha(path: str, module: nn.Module, method: str) -> None:
    """Raise :class:`IncompatibleAdapterError` for an ``nn.MultiheadAttention`` PEFT cannot adapt either: separate
    q/k/v projection weights (``kdim`` / ``vdim`` != ``embed_dim``), or an ``out_proj`` that is not an
    ``nn.Linear``."""
    m: Any = module
    if not getattr(m, "_qkv_same_embed_dim", True):
        raise IncompatibleAdapterError(
            f"target module {path!r} is an nn.MultiheadAttention with kdim/vdim != embed_dim (separate q/k/v "
            f"projection weights); {method} supports it with one packed in_proj_weight only (PEFT 0.21 refuses it too)")
    if not isinstance(m.out_proj, nn.Linear):
        raise IncompatibleAdapterError(
            f"target module {path!r} is an nn.MultiheadAttention whose out_proj is a {type(m.out_proj).__name__}, "
            f"not an nn.Linear; {method} cannot adapt it")


def mha_out_proj_of(path: str, modules: Mapping[str, nn.Module]) -> str | None:
    """The path of the ``nn.MultiheadAttention`` whose ``out_proj`` is the module at ``path``, or None. Its
    ``forward`` is never called (the attention reads ``out_proj.weight``), so an adapter on it alone would do
    nothing."""
    parent, _, last = path.rpartition(".")
    if last == "out_proj" and isinstance(modules.get(parent), nn.MultiheadAttention):
        return parent
    return None


def merge_weight_names(kind: str) -> tuple[str, ...]:
    """The module tensors a delta of this entry kind merges into (relative to the module's path)."""
    return ("in_proj_weight", "out_proj.weight") if kind == MHA else ("weight",)


def mha_call(module: nn.Module, call_base: Callable[[Any], Any], x: Any, w_in: torch.Tensor,
             w_out: torch.Tensor) -> Any:
    """``call_base(x)`` with the attention's ``in_proj_weight`` and ``out_proj.weight`` bound to ``w_in`` /
    ``w_out`` for this call only (``module`` is the caller thread's structural copy, never the user's)."""
    m: Any = module
    p_in, p_out = m._parameters, m.out_proj._parameters
    old_in, old_out = p_in["in_proj_weight"], p_out["weight"]
    p_in["in_proj_weight"], p_out["weight"] = w_in, w_out
    try:
        return call_base(x)
    finally:
        p_in["in_proj_weight"], p_out["weight"] = old_in, old_out


def _rows(t: Any, sel: torch.Tensor, dim: int) -> Any:
    return t.index_select(dim, sel) if isinstance(t, torch.Tensor) else t


def mha_routed(module: nn.Module, call_base: Any, x: torch.Tensor, route: torch.Tensor,
               weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """``nn.MultiheadAttention`` with per-row adapters: the rows of each adapter used (and of -1: the base) run
    the layer once, with ``weights(j)`` (the merged ``in_proj_weight`` and ``out_proj.weight`` of adapter ``j``),
    on their own ``query`` / ``key`` / ``value`` rows and mask rows; outputs are put back in row order.

    Arguments:
        module: the attention layer. call_base: its base forward, a :class:`ModuleCall` holding the other
            arguments. x: the query ([batch, L, E] with ``batch_first``, else [L, batch, E]). route: [bsz].
        weights: adapter index -> its merged weights.
    """
    m: Any = module
    if not isinstance(call_base, ModuleCall):
        raise IncompatibleAdapterError(
            f"route= on nn.MultiheadAttention {getattr(module, '_adaptfn_path', '')!r}: the layer is composed with "
            "another adapter on the same module; route one stack there at a time")
    if x.dim() != 3:
        raise IncompatibleAdapterError("route= on nn.MultiheadAttention needs a batched query ([batch, L, E] or "
                                       f"[L, batch, E]), got {shape_str(x.shape)}")
    bdim = 0 if m.batch_first else 1
    idx = _row_index(route, x.shape[bdim])
    names = ("key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
    bound = dict(zip(names, call_base.args))
    bound.update(call_base.kwargs)
    rows = x.shape[bdim]
    heads = m.num_heads
    key, value = bound.pop("key", None), bound.pop("value", None)
    outs: list[tuple[torch.Tensor, Any]] = []
    for j in torch.unique(idx).tolist():
        sel = (idx == j).nonzero().squeeze(1)
        q = x.index_select(bdim, sel)
        k2 = q if key is x else _rows(key, sel, bdim)
        v2 = q if value is x else (k2 if value is key else _rows(value, sel, bdim))
        kw = dict(bound)
        kw["key_padding_mask"] = _rows(bound.get("key_padding_mask"), sel, 0)
        am = bound.get("attn_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 3:  # [batch * heads, L, S]
            am = am.reshape(rows, heads, *am.shape[1:]).index_select(0, sel).reshape(-1, *am.shape[1:])
        kw["attn_mask"] = am
        call = ModuleCall(call_base.fn, (k2, v2), kw)
        res = call(q) if j < 0 else mha_call(module, call, q, *weights(j))
        outs.append((sel, res))
    # put the groups' outputs back in row order
    first = outs[0][1]
    attn = first[0].new_zeros(*x.shape[:-1], first[0].shape[-1])
    wts = None
    if first[1] is not None:
        wts = first[1].new_zeros(rows, *first[1].shape[1:])
    for sel, (o, w) in outs:
        attn = attn.index_copy(bdim, sel, o)
        if wts is not None:
            wts = wts.index_copy(0, sel, w)
    return attn, wts


def fan_in_uniform_(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(t, a=sqrt(5))`` (the default init of nn.Linear / nn.ConvNd weights)."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


def init_lora_pair(A: torch.Tensor, B: torch.Tensor, r: int, mode: Any, generator: torch.Generator | None) -> None:
    """PEFT's LoRA init in place (``mode``: ``init_lora_weights``): A kaiming-uniform (``"gaussian"``:
    N(0, 1/r)), B zeros; ``False``: both kaiming-uniform (the layers' default init)."""
    if isinstance(mode, str):
        nn.init.normal_(A, std=1 / r, generator=generator)
    else:
        fan_in_uniform_(A, generator)
    if mode is False:
        fan_in_uniform_(B, generator)
    else:
        B.zero_()


# -- targets -------------------------------------------------------------------------------------------------
def plan_targets(config: Any, model: nn.Module, method: str, kinds: frozenset[str] | set[str],
                 supported: str) -> tuple[Any, list[tuple[str, bool, str]]]:
    """The modules ``config`` targets, as ``(path, fan_in_fan_out, layer)`` with ``layer`` one of ``kinds``
    (``"linear"``: nn.Linear / transformers Conv1D; ``"conv1d"`` / ``"conv2d"`` / ``"conv3d"``; ``"mha"``). The
    config comes back with ``all-linear`` expanded and ``fan_in_fan_out`` set from the (last) linear module's
    type, as PEFT saves it. A target of another layer kind, or no match at all, raises
    :class:`IncompatibleAdapterError` naming the module's path and layer kind and what ``method`` supports."""
    config = expand_all_linear(config, model)
    found: list[tuple[str, bool, str]] = []
    fif = config.fan_in_fan_out
    for path, mod in model.named_modules():
        if not path or not is_target(config, path):
            continue
        layer: str | None
        if is_conv1d(mod):
            layer, fif = "linear", True
        elif isinstance(mod, nn.Linear):
            layer, fif = "linear", False
        else:
            layer = conv_kind(mod) or (MHA if is_mha(mod) else None)
        if layer is None or layer not in kinds:
            raise IncompatibleAdapterError(
                f"target module {path!r} is a {layer_name(mod)}; {method} supports {supported} (check "
                "target_modules / exclude_modules)")
        found.append((path, fif if layer == "linear" else False, layer))
    if not found:
        paths = [p for p, m in model.named_modules() if p and not list(m.children())][:4]
        raise IncompatibleAdapterError(
            f"{type(config).__name__}.target_modules={config.target_modules!r} matches no module of "
            f"{type(model).__name__} (module names look like {paths})")
    if fif != config.fan_in_fan_out:  # PEFT rewrites the field from the module type; so do we
        config = dataclasses.replace(config, fan_in_fan_out=fif)
    return config, found


def layer_option(entry: Any) -> str:
    """The layer kind an entry records in its options (``("layer", "conv2d")``), ``"linear"`` when none."""
    return entry.option("layer", "linear")
