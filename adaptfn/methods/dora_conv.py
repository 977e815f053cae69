"""PEFT's LoRA variants on convolutions (``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``): DoRA (``use_dora=True``,
PEFT's ``DoraConv{1,2,3}dLayer``), registered with :func:`adaptfn.methods.dora.register_kind`, and
``lora_bias=True`` (a bias on the ``lora_B`` 1x1 convolution). :mod:`adaptfn.methods.lora` hands conv entries
with a ``lora_magnitude`` or ``lora_bias`` leaf here; the plain conv LoRA is :mod:`adaptfn.methods.lora_layers`.

**DoRA.** ``y = f * (conv(x, W) - bias) + f * s * B(A(x)) + bias`` with ``f = m / ||W + s * dW||_c`` per output
channel, ``||.||_c`` the L2 norm over every axis of the conv weight [out, in / g, *k] but the output channel's,
**detached** as in PEFT (no gradient to ``A``, ``B`` or ``W``; ``m`` and the low-rank path get theirs). The
magnitude leaf ``lora_magnitude`` has PEFT's shape: [1, out, 1, ...] (one trailing 1 per spatial axis; stacked:
[N, 1, out, 1, ...]), PEFT key ``<path>.lora_magnitude_vector``. ``dW`` in the norm is computed as PEFT's
``get_lora_weight`` computes it: ``B.view(-1, r) @ A.view(r, -1)`` reshaped to the weight's shape. For
``groups=1`` that is the conv delta ``B . A`` (:func:`adaptfn.methods.layers.conv_delta`). For a grouped base
(``groups = g > 1``, ``lora_B`` [out, r / g, 1, ...]) PEFT 0.21.2 reads the same memory as an [out / g, r] matrix, so
its norm is not the norm of the layer's effective weight; adaptfn computes the same values (a file means the same in
both libraries, both ways; ``B = 0``, a fresh adapter, gives the base weight's norm either way). Grouped DoRA
convolutions run unmerged only: merging raises, as PEFT's does.

Paths: in inference (nothing needs a gradient, no torch.func transform or torch.compile, a plain ``nn.ConvNd``,
``groups=1``) the layer runs as **one convolution** with ``f * (W + s dW)`` and the base bias, that weight cached
per (weight, A, B, m) tensor and version (the merged model's cost); otherwise (training, transforms, grouped,
dropout) PEFT's form above, the base output reused (with LoRA dropout the base part is recomputed from the
dropped-out input, without bias, as PEFT does). ``route=``: every adapter's factor at once (cached in inference),
row ``i`` scaled by adapter ``route[i]``'s (1 for rows routed to -1), the low-rank part by
:func:`adaptfn.methods.layers.conv_lowrank_routed`. A scale weight ``w`` (:func:`adaptfn.scale`) follows the
Linear DoRA rule: the delta weighted, the magnitude moved from ``||W||_c`` toward ``m`` (``torch.lerp``).

``merge``: ``f * (W + s dW)``, ``dW`` as PEFT's ``get_delta_weight`` (``conv(A^T, B)^T``), the norm of the
unmerged weight, computed in the wider dtype and rounded once.

**lora_bias.** PEFT gives the ``lora_B`` convolution a bias: ``y = base(x) + s * (B(A(x)) + b)``, ``b`` [out]
broadcast over the spatial axes (leaf ``lora_bias``, PEFT key ``<path>.lora_B.bias``); initialised to zeros, or
(``init_lora_weights=False``) the conv default ``U(-1/sqrt(r / g), 1/sqrt(r / g))``; ``merge`` folds ``s * b`` into
the base bias (a base without a bias cannot merge it: PEFT refuses too).

``nn.MultiheadAttention``: PEFT 0.21.2 refuses DoRA on it, and with ``lora_bias`` it saves an ``in_proj``
``lora_B.bias`` its forward never applies; adaptfn refuses both, naming the layer.

Example:
    >>> from torch import nn
    >>> conv = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Conv2d(5, 7, 3, dilation=2))
    >>> fn, params = af.functional(conv)
    >>> cfg = af.LoraConfig(r=2, target_modules=["0", "1"], use_dora=True)
    >>> d = af.init(fn, cfg, generator=torch.Generator().manual_seed(0))
    >>> tuple(d.leaves("1")["lora_magnitude"].shape)              # PEFT's [1, out, 1, 1]
    (1, 7, 1, 1)
    >>> w = params["1.weight"]                                     # [7, 5, 3, 3]
    >>> torch.allclose(d.leaves("1")["lora_magnitude"].flatten(), w.flatten(1).norm(dim=1))
    True
    >>> x = torch.randn(2, 3, 11, 11)
    >>> y = af.inject(fn, d)(params, x)                            # [2, 7, 2, 2]: a fresh adapter is the base
    >>> y.shape, torch.allclose(y, fn(params, x), atol=1e-5)
    (torch.Size([2, 7, 2, 2]), True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import routing
from ..adapter import COEF, GATE, SCALING, Entry
from ..errors import AdapterFileError, IncompatibleAdapterError, shape_str, single_for_route, stacked_called_directly
from . import dora, layers, lora_bias, lora_layers
from .common import dropout, module_path

__all__ = ["ConvDora", "SPECS", "init_variants", "add_bias", "check_variants", "to_peft", "from_peft",
           "refuse_on_mha"]

_FACTORS = routing._DerivedCache()


def _spatial_view(v: torch.Tensor, ndim: int, nd: int) -> torch.Tensor:
    """[..., C] per-channel values shaped to scale the channel axis of a conv output with ``ndim`` axes whose
    last ``nd`` are spatial (the leading axes of ``v`` are the output's batch axes, or none)."""
    return v.reshape(*v.shape[:-1], *([1] * (ndim - nd - 1 - (v.dim() - 1))), v.shape[-1], *([1] * nd))


class ConvDora:
    """DoRA on ``nn.Conv{nd}d`` (see the module docstring): the :class:`adaptfn.methods.dora.DoraKind` of the
    LoRA kind ``conv{nd}d``."""

    def __init__(self, nd: int) -> None:
        self.nd = nd
        self.kind = f"conv{nd}d"

    # -- the DoraKind pieces -------------------------------------------------------------------------------
    def delta(self, A: torch.Tensor, B: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """PEFT's ``get_lora_weight``: ``B.view(-1, r) @ A.view(r, -1)`` reshaped to ``shape`` (the weight's), a
        leading stack axis kept. A: [(N,) r, in, *k]. B: [(N,) out, r / g, 1, ...]."""
        nd = self.nd
        r = int(A.shape[-(nd + 2)])
        lead = tuple(A.shape[:-(nd + 2)])
        return (B.reshape(*lead, -1, r) @ A.reshape(*lead, r, -1)).reshape(*lead, *shape)

    def merge_delta(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return layers.conv_delta(A, B, self.nd)

    def merge_check(self, entry: Entry, leaves: Mapping[str, torch.Tensor], weight: torch.Tensor) -> None:
        A, B = leaves["lora_A"], leaves["lora_B"]
        g = layers.conv_groups(A, B, self.nd)
        if g != 1 or tuple(weight.shape[1:2]) != tuple(A.shape[1:2]):
            raise IncompatibleAdapterError(
                f"the weight {shape_str(weight.shape)} is a grouped convolution's (groups={g}); a DoRA delta on it "
                "cannot be merged (PEFT refuses too); run it unmerged with af.inject")

    def spec(self) -> dora.DoraKind:
        nd = self.nd
        return dora.DoraKind(
            orient=lambda w, transposed: w, delta=self.delta, out_axis=1,
            magnitude_shape=lambda c: (1, c, *([1] * nd)), channels=lambda B: int(B.shape[-(nd + 2)]),
            lowrank=self._lowrank, forward=self.forward, merge_delta=self.merge_delta, merge_check=self.merge_check)

    def _lowrank(self, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module,
                 h: torch.Tensor) -> torch.Tensor:
        return layers.conv_lowrank(h, leaves["lora_A"], leaves["lora_B"], module, self.nd)

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, lora: Any, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: Any, module: nn.Module, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        """The DoRA conv output for x [batch, in, *spatial] (or unbatched [in, *spatial]): [batch, out,
        *spatial_out]; ``route``: int64 [batch], row ``i`` uses adapter ``route[i]`` of a stack (-1: none)."""
        nd = self.nd
        A, m = leaves["lora_A"], leaves[dora.MAGNITUDE]
        if route is not None:
            if A.dim() != nd + 3:
                raise single_for_route()
            return self._routed(entry, leaves, on, generator, call_base, module, x, route)
        if A.dim() != nd + 2 or m.dim() != nd + 2:
            raise stacked_called_directly(module_path(module))
        if x.dim() == nd + 1:  # an unbatched input: a batch of one
            return self.forward(lora, entry, leaves, on, generator, call_base, module, x.unsqueeze(0))[0]
        spec = dora.KINDS[self.kind]
        B = leaves["lora_B"]
        c = leaves.get(COEF)
        s = dora._raw_scale(entry, leaves)
        dropping = dora._dropping(entry, generator)
        if (not dropping and on is True and type(s) is float and layers.conv_groups(A, B, nd) == 1
                and layers.weight_kernel_ok(call_base, module, x, A, B, m, *(() if c is None else (c,)), merges=0)):
            # inference: one convolution with f * (W + s dW) (forming it is what the factor's norm costs anyway)
            keys = dora._cache_keys(module, leaves, s, on)
            w = _FACTORS.memo(keys, ("merged", self.kind, s, x.dtype), lambda: self._merged(module, A, B, m, s, c))
            mod: Any = module
            return mod._conv_forward(x, w, mod.bias)
        f = dora._factor_cached(spec, entry, module, leaves, s, on, False)  # [out]
        result = call_base(x)
        h = dropout(entry, generator, x if x.dtype == A.dtype else x.to(A.dtype))
        low = layers.conv_lowrank(h, A, B, module, nd, c)
        fv = _spatial_view(f, result.dim(), nd)
        base = self._base_part(module, result, h, dropping)
        out = result + ((fv - 1) * base + fv * low * dora._lora_scale(s, c, on))
        return out.to(result.dtype)

    def _merged(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, s: float,
                c: torch.Tensor | None) -> torch.Tensor:
        """``f * (W + w s dW)`` in the weight's dtype (``f`` as :func:`adaptfn.methods.dora._factor`)."""
        W = dora._weight(module, A.dtype)
        D = self.delta(A, B, W.shape) * s
        if c is not None:
            D = D * c.to(D.dtype)
        V = W + D
        n = dora._channel_norm(V, 0)
        mv = m.reshape(-1)
        if c is not None:
            mv = torch.lerp(dora._channel_norm(W, 0), mv, c.to(mv.dtype))
        w: Any = module.weight
        return (V * (mv / n).reshape(-1, *([1] * (V.dim() - 1)))).to(w.dtype)

    def _base_part(self, module: nn.Module, result: torch.Tensor, h: torch.Tensor, dropping: bool) -> torch.Tensor:
        """``base(x) - bias``; with LoRA dropout, as PEFT: the base weight on the dropped-out input, no bias."""
        mod: Any = module
        if dropping:
            return mod._conv_forward(h, dora._weight(module, h.dtype), None)
        bias = mod.bias
        return result if bias is None else result - _spatial_view(bias, result.dim(), self.nd)

    def _routed(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any, call_base: Any,
                module: nn.Module, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        nd = self.nd
        spec = dora.KINDS[self.kind]
        A, B, m = leaves["lora_A"], leaves["lora_B"], leaves[dora.MAGNITUDE]
        c = leaves.get(COEF)
        n_ad = A.shape[0]
        s = leaves[SCALING].detach() if SCALING in leaves else torch.full(
            (n_ad,), entry.scaling, dtype=torch.float32, device=A.device)
        sources = None
        if SCALING in leaves and not torch.compiler.is_compiling():
            sources = (module.weight, A, B, m, leaves[SCALING], leaves[GATE]) + (() if c is None else (c,))
        fs = _FACTORS.memo(sources, ("stack", self.kind, A.dtype), lambda: dora._stack_factors(
            spec, dora._weight(module, A.dtype), A, B, m, s, c, on))  # [N, out]
        sl = s.to(A.dtype) if c is None else s.to(A.dtype) * c.to(A.dtype)
        if on is not True:
            sl = sl * on
        result = call_base(x)
        idx = layers._row_index(route, result.shape[0])
        ic = idx.clamp(min=0)
        rows = torch.where((idx >= 0)[:, None], fs[ic], torch.ones((), dtype=fs.dtype, device=fs.device))
        fr = _spatial_view(rows, result.dim(), nd)  # [rows, out, 1, ...]
        dropping = dora._dropping(entry, generator)
        h = dropout(entry, generator, x if x.dtype == A.dtype else x.to(A.dtype))
        low = layers.conv_lowrank_routed(h, A, B, sl, route, module, nd)
        base = self._base_part(module, result, h, dropping)
        return (result + ((fr - 1) * base + fr * low)).to(result.dtype)


SPECS: dict[str, ConvDora] = {k: ConvDora(nd) for k, nd in layers.CONV_KINDS.items()}
"""LoRA conv kind -> its DoRA handler (registered with :func:`adaptfn.methods.dora.register_kind`)."""
for _kind, _h in SPECS.items():
    dora.register_kind(_kind, _h.spec())


# -- what lora.py calls for conv entries ------------------------------------------------------------------
def refuse_on_mha(config: Any, path: str) -> None:
    """DoRA / lora_bias on an ``nn.MultiheadAttention`` target: refused, naming the layer (PEFT 0.21.2 refuses
    DoRA on it, and never applies the ``in_proj`` ``lora_B.bias`` it would save)."""
    if config.use_dora:
        raise IncompatibleAdapterError(
            f"target module {path!r} is an nn.MultiheadAttention: use_dora=True is not supported on it (PEFT 0.21.2 "
            "does not support DoRA on nn.MultiheadAttention either); exclude it (exclude_modules) or target "
            "Linear / convolution layers")
    if config.lora_bias:
        raise IncompatibleAdapterError(
            f"target module {path!r} is an nn.MultiheadAttention: lora_bias=True is not supported on it (PEFT 0.21.2 "
            "saves an in_proj lora_B.bias there that its forward never applies); exclude it (exclude_modules)")


def init_variants(config: Any, entry: Entry, module: nn.Module, leaves: dict[str, torch.Tensor],
                  generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """``leaves`` (a conv entry's fresh ``lora_A``, ``lora_B``) with PEFT's ``lora_bias`` [out] and DoRA
    magnitude [1, out, 1, ...] added where the config asks for them."""
    if entry.kind not in SPECS:
        return leaves
    A, B = leaves["lora_A"], leaves["lora_B"]
    dt = A.dtype
    out = dict(leaves)
    if config.lora_bias:
        n_out, rg = int(B.shape[0]), int(B.shape[1])  # the lora_B conv's fan-in is r / groups
        out[lora_bias.LEAF] = lora_bias.init(n_out, rg, config.init_lora_weights is False, generator,
                                             A.device).to(dt)
    if config.use_dora:
        out[dora.MAGNITUDE] = dora.init_magnitude(entry, module, A, B).to(dt)
    return out


def add_bias(entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, out: torch.Tensor,
             route: torch.Tensor | None) -> torch.Tensor:
    """A conv LoRA output plus ``s * w * b`` on its channel axis (routed: row ``i`` gets adapter ``route[i]``'s;
    rows routed to -1 nothing)."""
    nd = layers.CONV_KINDS[entry.kind]
    b = leaves[lora_bias.LEAF]
    if route is None:
        s: Any = dora._raw_scale(entry, leaves)
        if on is not True:
            s = s * on
        c = leaves.get(COEF)
        term = b * s if c is None else b * c.to(b.dtype) * s
        return (out + _spatial_view(term, out.dim(), nd)).to(out.dtype)
    n_ad = b.shape[0]
    s_all = lora_layers._routed_scale(entry, leaves, on, n_ad, b.device)
    idx = layers._row_index(route, out.shape[0])
    ic = idx.clamp(min=0)
    sr = torch.where(idx >= 0, s_all.to(b.dtype)[ic], torch.zeros((), dtype=b.dtype, device=b.device))
    term = b[ic] * sr[:, None]  # [rows, out]
    return (out + _spatial_view(term, out.dim(), nd)).to(out.dtype)


def check_variants(path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
    """The magnitude and lora_B bias of a conv entry fit the layer ([1, out, 1, ...] and [out])."""
    if entry.kind not in SPECS:
        return
    if dora.MAGNITUDE in leaves:
        dora.check(path, entry, leaves)
    if lora_bias.LEAF in leaves:
        b = leaves[lora_bias.LEAF]
        n_out = int(module.out_channels)  # type: ignore[arg-type]
        stacked = leaves["lora_A"].dim() == layers.CONV_KINDS[entry.kind] + 3
        if tuple(b.shape[1:] if stacked else b.shape) != (n_out,):
            raise IncompatibleAdapterError(f"module {path!r}: {lora_bias.LEAF} {shape_str(b.shape)} does not fit "
                                           f"{layers.layer_name(module)} with out={n_out} (expected [{n_out}])")


def to_peft(entry: Entry, leaves: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``out`` (a conv entry's PEFT ``lora_A`` / ``lora_B`` tensors) with its magnitude and lora_B bias added."""
    if dora.MAGNITUDE in leaves:
        out[dora.PEFT_KEY] = dora.to_peft(entry, leaves)
    if lora_bias.LEAF in leaves:
        b = leaves[lora_bias.LEAF]
        c = leaves.get(COEF)
        out[lora_bias.PEFT_KEY] = b if c is None else b * c.to(b.dtype)
    return out


def from_peft(config: Any, path: str, found: Mapping[str, torch.Tensor], source: str,
              layer: str) -> tuple[Entry, dict[str, torch.Tensor]]:
    """A conv / nn.MultiheadAttention module of a PEFT file, its DoRA magnitude and lora_B bias included."""
    handler = lora_layers.KINDS[layer]
    if layer not in SPECS:  # nn.MultiheadAttention
        extra = sorted(set(found) - {"lora_A.weight", "lora_B.weight", *lora_layers.MHA_SUFFIXES})
        if extra:
            raise AdapterFileError(f"{source}: module {path!r} is an nn.MultiheadAttention LoRA with {extra}: DoRA / "
                                   "lora_bias are not supported on nn.MultiheadAttention (PEFT 0.21.2 refuses DoRA "
                                   "there and never applies its in_proj lora_B.bias)")
        return handler.from_peft(config, path, found, source)
    wanted = {dora.PEFT_KEY: bool(config.use_dora), lora_bias.PEFT_KEY: bool(config.lora_bias)}
    for k, on in wanted.items():
        if on and k not in found:
            raise AdapterFileError(f"{source}: module {path!r} ({layer} LoRA) has {sorted(found)} but no {k!r} "
                                   "(the config says use_dora / lora_bias)")
    extra = sorted(set(found) - {"lora_A.weight", "lora_B.weight"} - {k for k, on in wanted.items() if on})
    if extra:
        raise AdapterFileError(f"{source}: module {path!r} ({layer} LoRA) has {extra} but the config has use_dora="
                               f"{config.use_dora}, lora_bias={config.lora_bias}")
    entry, leaves = handler.from_peft(config, path, {k: found[k] for k in ("lora_A.weight", "lora_B.weight")}, source)
    leaves = dict(leaves)
    try:
        if dora.PEFT_KEY in found:
            leaves[dora.MAGNITUDE] = found[dora.PEFT_KEY]
            dora.check(path, entry, leaves)
        if lora_bias.PEFT_KEY in found:
            b = found[lora_bias.PEFT_KEY]
            n_out = int(leaves["lora_B"].shape[0])
            if tuple(b.shape) != (n_out,):
                raise IncompatibleAdapterError(f"module {path!r}: lora_B.bias {shape_str(b.shape)} does not fit "
                                               f"lora_B {shape_str(leaves['lora_B'].shape)} (expected [{n_out}])")
            leaves[lora_bias.LEAF] = b
    except IncompatibleAdapterError as e:
        raise AdapterFileError(f"{source}: {e}") from None
    return entry, leaves
