"""Convolutions for the dense-delta methods (LoHa, LoKr): which layers they cover, how a delta weight is applied to
one, and the geometry checks. The methods' formats stay in ``loha.py`` / ``lokr.py``.

PEFT 0.21.2 puts LoHa and LoKr on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (not ``nn.Conv3d``, not
transformers' ``Conv1D``). Both build one dense delta weight ``dW`` with the base weight's shape ([out, in / g,
*k] for a convolution with ``groups=g``) and add ``conv(x, dW)`` with the base's stride, padding, dilation and
groups to the base output (a Linear: ``x @ dW^T``); merging adds ``dW`` to the weight, so merged and unmerged agree.
The factors come in two forms, which is what an entry's ``kind`` records (it is read from the factors' shapes, so a
file read without the model and a fresh :func:`adaptfn.init` agree):

* ``"linear"``: flat 2-d factors, the delta made as an [out, in / g * prod(k)] matrix and reshaped to the weight
  (PEFT's form for Linear layers, for 1x1 / width-1 kernels and for convolutions without
  ``use_effective_conv2d``);
* ``"conv"``: factors with kernel axes (LoHa's ``hada_t1`` / ``hada_t2``, LoKr's ``lokr_t2`` or a full
  ``lokr_w2`` [b, d, *k]): only on a convolution.

Per-row routing of a stack on a convolution (``route=``) runs one grouped convolution: the batch folded into the
channels (``groups = batch * g``), each row with its own adapter's ``dW`` (zeros for rows routed to -1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import routing
from ..errors import IncompatibleAdapterError, single_for_route, stacked_called_directly
from . import layers
from .common import is_conv1d, module_kept, module_path, rank_keep

__all__ = ["LAYERS", "layer_of", "refuse_layer", "kernel", "flat_in", "forward_dense", "merged", "check_layer",
           "apply_delta", "apply_delta_rows", "effective_conv", "row_shape"]

LAYERS = "nn.Linear, nn.Conv1d and nn.Conv2d"
"""What PEFT 0.21.2's LoHa and LoKr (and so adaptfn's) cover."""


def layer_of(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` or ``"conv2d"`` for the layers LoHa / LoKr cover, else None (transformers'
    ``Conv1D`` and ``nn.Conv3d`` included: PEFT 0.21.2 has neither)."""
    if is_conv1d(module):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    kind = layers.conv_kind(module)
    return kind if kind in ("conv1d", "conv2d") else None


def refuse_layer(method: str, path: str, module: nn.Module) -> None:
    """Raise :class:`IncompatibleAdapterError` for a target LoHa / LoKr cannot adapt, saying why."""
    name = layers.layer_name(module)
    why = (f"PEFT's {method} (0.21.2) has no such layer, so its file would not load in PEFT"
           if is_conv1d(module) or isinstance(module, nn.Conv3d) else "check target_modules / exclude_modules")
    raise IncompatibleAdapterError(f"target module {path!r} is a {name}; {method} supports {LAYERS} ({why})")


def kernel(module: nn.Module) -> tuple[int, ...]:
    """The kernel size of a convolution, ``()`` for a Linear."""
    ks = getattr(module, "kernel_size", None)
    return tuple(int(k) for k in ks) if isinstance(module, nn.modules.conv._ConvNd) and ks is not None else ()


def flat_in(module: nn.Module) -> int:
    """The columns of the flat delta: ``in`` (Linear) or ``in / groups * prod(kernel)`` (a convolution)."""
    w = module.weight
    return int(math.prod(int(s) for s in w.shape[1:]))


def effective_conv(use_effective_conv2d: bool, module: nn.Module) -> bool:
    """PEFT's rule: the kernel-axis (CP) form only for a convolution whose kernel is not all ones."""
    k = kernel(module)
    return bool(use_effective_conv2d) and bool(k) and any(s != 1 for s in k)


def row_shape(module: nn.Module) -> tuple[int, ...]:
    """The delta weight's shape for ``module`` (its weight's)."""
    return tuple(int(s) for s in module.weight.shape)


def forward_dense(delta: Callable[[], torch.Tensor], stacked: bool, entry: Any, generator: Any, call_base: Any,
                  module: nn.Module, x: torch.Tensor, route: torch.Tensor | None, *, normalize: bool,
                  keep_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The forward of a method whose delta is a dense weight (LoHa, LoKr): ``base(x)`` plus the layer's output for
    ``dW = delta()`` ([(N,) out, in(, *kernel)] flat or not), its output rows scaled by the rank-dropout mask
    (``normalize``: PEFT's rescaling; drawn in ``keep_dtype``, default dW's) and by the module-dropout gate;
    with ``route`` (a stack: ``stacked``), each batch row through its own adapter's delta. Rounded to the base
    output's dtype."""
    if stacked != (route is not None):
        raise single_for_route() if route is not None else stacked_called_directly(module_path(module))
    out = call_base(x)
    kept = module_kept(entry, generator)
    if kept is False:
        return out
    shape = row_shape(module)
    dw = delta()
    dw = dw.reshape(dw.shape[0], *shape) if stacked else dw.reshape(shape)
    keep = rank_keep(entry, generator, shape[0], keep_dtype or dw.dtype, dw.device, normalize=normalize)
    if keep is not None:
        dw = dw * keep.to(dw.dtype).reshape(shape[0], *[1] * (len(shape) - 1))
    if kept is not True:
        dw = dw * kept.to(dw.dtype)
    extra = apply_delta_rows(module, x, dw, route) if route is not None else apply_delta(module, x, dw)
    return (out + extra).to(out.dtype)


def merged(tensors: Mapping[str, torch.Tensor], dw: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"weight": W + dW}`` (``dW`` reshaped to the weight, in the weight's dtype)."""
    weight = tensors["weight"]
    return {"weight": weight + dw.reshape(weight.shape).to(weight.dtype)}


def check_layer(method: str, path: str, conv_only: bool, module: nn.Module) -> str:
    """``module``'s layer kind (:func:`layer_of`); raise :class:`IncompatibleAdapterError` unless it is a layer the
    method's entry fits: a convolution (``conv_only``: the entry has kernel factors) or also an nn.Linear."""
    layer = layer_of(module)
    if layer is None or (conv_only and layer == "linear"):
        want = "a convolution" if conv_only else "an nn.Linear or a convolution"
        raise IncompatibleAdapterError(
            f"module {path!r}: the adapter has a {method} delta for {want} but the model has a "
            f"{type(module).__name__}")
    return layer


def apply_delta(module: nn.Module, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """``x @ dW^T`` (Linear) or the convolution of ``x`` with ``dW`` (the base's geometry and groups; the base's
    padding mode): the delta's contribution to the output. ``dW`` has the base weight's shape."""
    xin = x if x.dtype == dw.dtype else x.to(dw.dtype)
    if dw.dim() == 2:
        return F.linear(xin, dw)
    nd = dw.dim() - 2
    return layers.conv_a(xin, dw, module, nd, groups=int(module.groups))  # type: ignore[arg-type]


def apply_delta_rows(module: nn.Module, x: torch.Tensor, dw: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """Per batch row ``i``: the contribution of ``dW[route[i]]`` (``dw`` [N, *weight], zero for -1)."""
    if dw.dim() == 3:
        return routing.dense_rows(x, dw, route)
    m: Any = module
    nd = dw.dim() - 3
    bsz = int(route.shape[0])
    rows = int(x.shape[0])
    if rows % bsz:
        raise IncompatibleAdapterError(
            f"route has {bsz} entries but a module saw {rows} rows ({list(x.shape)}), not a multiple of {bsz}")
    idx = route.repeat_interleave(rows // bsz) if rows != bsz else route
    w = routing.pick_rows(dw, idx)  # [rows, out, in / g, *k]
    xin = x if x.dtype == dw.dtype else x.to(dw.dtype)
    xp, pad = layers._padded(xin, module)
    folded = xp.reshape(1, rows * xp.shape[1], *xp.shape[2:])
    y = layers.conv_fn(nd)(folded, w.reshape(rows * w.shape[1], *w.shape[2:]), None, m.stride, pad, m.dilation,
                           rows * int(m.groups))
    return y.reshape(rows, w.shape[1], *y.shape[2:])
