"""(IA)³ on ``nn.Conv2d`` / ``nn.Conv3d`` (PEFT 0.21's IA3 convolution layers; PEFT has no IA3 ``nn.Conv1d``),
called by :class:`adaptfn.methods.ia3.IA3` for entries whose options name a convolution (``("layer", "conv2d")``).

``ia3_l`` is [1, n, 1, 1] (Conv3d: [1, n, 1, 1, 1]), PEFT's shape: ``n = out_channels`` for an ordinary target
(``y = base(x) * l`` over the channel axis), ``n = in_channels`` for a feedforward one (``y = base(x * l)``).
Merging scales the weight [out, in / groups, *k]: an output vector its rows (and the bias), an input vector its
columns (for ``groups > 1`` each output group reads its own input channels: the vector is laid out per group, as
PEFT does).

Example:

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.Conv3d(6, 4, 1))
    >>> cfg = af.IA3Config(target_modules=["0", "1"], feedforward_modules=["0"], init_ia3_weights=False)
    >>> a = af.init(af.functional(net)[0], cfg, generator=torch.Generator().manual_seed(0))
    >>> {p: list(a.leaves(p)["ia3_l"].shape) for p in a.paths}    # "0" scales its input, "1" its output
    {'0': [1, 3, 1, 1], '1': [1, 4, 1, 1, 1]}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..adapter import COEF, Entry
from ..errors import AdapterFileError, IncompatibleAdapterError, shape_str, single_for_route
from . import layers
from .common import adapter_dtype

__all__ = ["ConvIA3", "CONV_IA3", "IA3_CONV_KINDS"]

IA3_CONV_KINDS = frozenset({"conv2d", "conv3d"})


class ConvIA3:
    """IA3 on a convolution; ``kind`` is IA3's ``"ia3_out"`` / ``"ia3_in"``, the layer is in the entry's options."""

    def __init__(self, in_kind: str) -> None:
        self.in_kind = in_kind  # IA3's feedforward kind ("ia3_in")

    @staticmethod
    def nd(entry: Entry) -> int:
        return layers.conv_nd(layers.layer_option(entry))

    def init_leaves(self, config: Any, entry: Entry, module: nn.Module, generator: torch.Generator | None,
                    dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        w: Any = module.weight
        n_in, n_out, _, _ = layers.conv_dims(module)
        n = n_in if entry.kind == self.in_kind else n_out
        shape = (1, n, *([1] * self.nd(entry)))
        if config.init_ia3_weights:
            v = torch.ones(shape, dtype=torch.float32, device=w.device)
        else:
            v = torch.randn(shape, generator=generator, dtype=torch.float32, device=w.device)
        return {"ia3_l": v.to(dtype or adapter_dtype(w))}

    def forward(self, ia3: Any, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, call_base: Any,
                module: nn.Module, x: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
        nd = self.nd(entry)
        if route is not None:
            return self._routed(entry, leaves, on, call_base, x, route, nd)
        v = ia3._vector(leaves, on, module, dims=nd + 2)
        vc = layers.channel_view(v, nd)
        if entry.kind == self.in_kind:
            prev = x.dtype
            return call_base((x.to(v.dtype) * vc).to(prev))
        out = call_base(x)
        return (out * vc).to(out.dtype)

    def _routed(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, call_base: Any, x: torch.Tensor,
                route: torch.Tensor, nd: int) -> torch.Tensor:
        stack = leaves["ia3_l"]
        if stack.dim() != nd + 3:
            raise single_for_route()
        vs = stack.flatten(1)  # [N, n]
        c = leaves.get(COEF)
        if c is not None:
            vs = torch.lerp(torch.ones_like(vs), vs, c.to(vs.dtype)[:, None])
        if on is not True:
            vs = torch.where(on[:, None], vs, torch.ones_like(vs))
        rows = torch.where((route >= 0)[:, None], vs[route.clamp(min=0)], torch.ones_like(vs[:1]))  # [bsz, n]
        bsz = route.shape[0]

        def scale(t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] % bsz:
                raise IncompatibleAdapterError(f"route has {bsz} entries but a convolution saw {t.shape[0]} rows")
            tb = t.to(rows.dtype).reshape(bsz, t.shape[0] // bsz, t.shape[1], -1)
            return (tb * rows[:, None, :, None]).reshape(t.shape)

        if entry.kind == self.in_kind:
            return call_base(scale(x).to(x.dtype))
        out = call_base(x)
        return scale(out).to(out.dtype)

    def merge(self, ia3: Any, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        nd = self.nd(entry)
        v = ia3._vector(leaves, on, dims=nd + 2)
        w = tensors["weight"]
        n_out, n_in_g = int(w.shape[0]), int(w.shape[1])
        if entry.kind == self.in_kind:
            g = v.numel() // n_in_g
            if g * n_in_g != v.numel() or n_out % g:
                raise IncompatibleAdapterError(f"ia3_l of length {v.numel()} does not fit the input channels of "
                                               f"weight {shape_str(w.shape)}")
            # output group j reads input channels j * in/g ... (j + 1) * in/g: the vector laid out per group
            scale = v.reshape(g, 1, n_in_g).expand(g, n_out // g, n_in_g).reshape(n_out, n_in_g)
            out = {"weight": (w * scale.reshape(n_out, n_in_g, *([1] * nd))).to(w.dtype)}
            return out
        if v.numel() != n_out:
            raise IncompatibleAdapterError(f"ia3_l of length {v.numel()} does not fit the output channels of weight "
                                           f"{shape_str(w.shape)}")
        out = {"weight": (w * v.reshape(n_out, *([1] * (nd + 1)))).to(w.dtype)}
        b = tensors.get("bias")
        if b is not None:
            out["bias"] = (b * v.reshape(b.shape)).to(b.dtype)
        return out

    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        layer = layers.layer_option(entry)
        if layers.conv_kind(module) != layer:
            raise IncompatibleAdapterError(
                f"module {path!r}: the adapter has an IA3 vector for an nn.Conv{self.nd(entry)}d but the model has a "
                f"{layers.layer_name(module)}")
        n_in, n_out, _, _ = layers.conv_dims(module)
        n = n_in if entry.kind == self.in_kind else n_out
        nd = self.nd(entry)
        want = (1, n, *([1] * nd))
        v = leaves["ia3_l"]
        if tuple(v.shape[-(nd + 2):]) != want:
            what = "feedforward (input) vector" if entry.kind == self.in_kind else "output vector"
            raise IncompatibleAdapterError(
                f"module {path!r}: ia3_l {shape_str(v.shape)} does not fit {layers.layer_name(module)} with "
                f"in={n_in}, out={n_out} (expected the {what} {shape_str(want)})")

    @staticmethod
    def file_layer(v: torch.Tensor, path: str, source: str) -> str | None:
        """The convolution kind of a saved ``ia3_l`` ([1, n, 1, 1]: conv2d, [1, n, 1, 1, 1]: conv3d), None for a
        Linear's 2-d vector; other layouts raise, naming the layer kind they would be."""
        if v.dim() == 2:
            return None
        if v.dim() in (4, 5) and v.shape[0] == 1 and all(int(d) == 1 for d in v.shape[2:]):
            return f"conv{v.dim() - 2}d"
        if v.dim() == 3 and v.shape[0] == 1 and v.shape[2] == 1:
            raise AdapterFileError(
                f"{source}: module {path!r}: ia3_l {shape_str(v.shape)} is an nn.Conv1d's vector; IA3 supports "
                "nn.Linear, transformers Conv1D, nn.Conv2d and nn.Conv3d (PEFT 0.21 has no IA3 nn.Conv1d layer)")
        raise AdapterFileError(f"{source}: module {path!r}: ia3_l {shape_str(v.shape)} is not an IA3 vector of a "
                               "layer kind adaptfn (and PEFT) supports: [out, 1] / [1, in] (Linear, Conv1D), "
                               "[1, n, 1, 1] (nn.Conv2d), [1, n, 1, 1, 1] (nn.Conv3d)")


CONV_IA3 = ConvIA3("ia3_in")
