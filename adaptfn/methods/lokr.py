"""LoKr (low-rank Kronecker product, LyCORIS): ``y = base(x) + x @ dW^T`` with

``dW = kron(w1, w2) * alpha / r``  ([out, in] = [a * b, c * d] for ``w1`` [a, c] and ``w2`` [b, d])

on ``nn.Linear`` modules. ``out = a * b`` and ``in = c * d`` are split by PEFT's ``factorization`` (two factors
near the square root, or ``decompose_factor`` and the rest; the smaller factors go to ``w1``). Each factor is a
full matrix or a rank-r product: ``w2`` is ``lokr_w2_a @ lokr_w2_b`` ([b, r] @ [r, d]) when ``r < max(b, d) / 2``,
else the full ``lokr_w2`` [b, d]; ``w1`` likewise (``lokr_w1_a`` [a, r], ``lokr_w1_b`` [r, c]) only with
``decompose_both`` and ``r < max(a, c) / 2``, else ``lokr_w1`` [a, c]. Which leaves an entry has is part of its
structure (adapters stack only with the same ones).

Training (an explicit generator, :func:`adaptfn.inject`): ``module_dropout`` and ``rank_dropout`` as in LoHa
(PEFT's draws), the kept rows divided by their mean only with ``rank_dropout_scale``.

A scale weight ``w`` (``coef``) multiplies ``dW``; saved folded into ``w1`` (``lokr_w1`` or ``lokr_w1_a``).
Capabilities: ``route`` (a dense ``dW`` per row, as LoHa) and ``scale``; not ``combine`` (PEFT has none for LoKr).

Convolutions (``lokr_t2``, ``use_effective_conv2d``, 3-d / 4-d factors) come with adaptfn's convolution support;
a file holding them is refused until then. PEFT has no LoKr for transformers' ``Conv1D``, nor adaptfn.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import routing
from .._where import is_target
from ..adapter import COEF, SCALING, Entry
from ..errors import AdapterFileError, IncompatibleAdapterError, shape_str, single_for_route, stacked_called_directly
from .base import ROUTE, SCALE, CallBase, check_bool, is_int, need
from .common import (
    LycorisFamilyConfig,
    adapter_dtype,
    expand_all_linear,
    module_kept,
    module_path,
    not_conv1d,
    plan_replacements,
    rank_keep,
)

__all__ = ["LoKrConfig", "LoKr", "factorization", "lokr_shapes"]

KIND = "linear"
NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
CONV_NAMES = ("lokr_t2",)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (and LyCORIS') split of ``dimension`` into ``(m, n)``, ``m * n == dimension``, ``m <= n``: ``factor``
    and the rest when ``factor`` divides it; else the divisor pair closest to the square root with ``m`` at most
    ``factor`` (``-1``: no bound).

    Example:
        >>> from adaptfn.methods.lokr import factorization
        >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
        ((16, 16), (8, 16), (1, 127), (4, 32))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    total = m + n
    while m < n:
        m2 = m + 1
        while dimension % m2:
            m2 += 1
        n2 = dimension // m2
        if m2 + n2 > total or m2 > bound:
            break
        m, n = m2, n2
    return (n, m) if m > n else (m, n)


def lokr_shapes(n_out: int, n_in: int, r: int, decompose_both: bool,
                decompose_factor: int) -> dict[str, tuple[int, int]]:
    """The leaves PEFT creates for an [out, in] weight: name -> shape."""
    a, b = factorization(n_out, decompose_factor)
    c, d = factorization(n_in, decompose_factor)
    shapes: dict[str, tuple[int, int]] = {}
    if decompose_both and r < max(a, c) / 2:
        shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
    else:
        shapes["lokr_w1"] = (a, c)
    if r < max(b, d) / 2:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d))
    else:
        shapes["lokr_w2"] = (b, d)
    return shapes


@dataclasses.dataclass(frozen=True)
class LoKrConfig(LycorisFamilyConfig):
    """LoKr config with PEFT's field names and defaults (``peft.LoKrConfig``): the LyCORIS fields
    (:class:`adaptfn.methods.common.LycorisFamilyConfig`) plus

    Arguments:
        decompose_both: also write ``w1`` as a rank-r product (when ``r < max(a, c) / 2``).
        decompose_factor: the factor the dimensions are split by (-1: near the square root).
        rank_dropout_scale: divide the rows rank dropout keeps by their mean.
        init_weights: True (``w1`` zeros: the adapted model starts equal to the base), ``"lycoris"`` (``w2``
            zeros instead, LyCORIS' way) or False (all random).

    Example:
        >>> cfg = af.LoKrConfig(r=2, alpha=4, target_modules=["q_proj"], decompose_factor=2)
        >>> lokr = af.init(fn, cfg, generator=torch.Generator().manual_seed(0))
        >>> {k: list(v.shape) for k, v in lokr.leaves("model.decoder.layers.0.self_attn.q_proj").items()}
        {'lokr_w1': [2, 2], 'lokr_w2_a': [11, 2], 'lokr_w2_b': [2, 11], 'gate': []}
    """

    peft_type: ClassVar[str] = "LOKR"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True

    def validate(self) -> None:
        super().validate()
        cls = type(self)
        check_bool(cls, "decompose_both", self.decompose_both)
        check_bool(cls, "rank_dropout_scale", self.rank_dropout_scale)
        need(is_int(self.decompose_factor) and (self.decompose_factor == -1 or self.decompose_factor > 0), cls,
             "decompose_factor", f"must be -1 or a positive int, got {self.decompose_factor!r}")
        need(isinstance(self.init_weights, bool) or self.init_weights == "lycoris", cls, "init_weights",
             f"must be True, False or 'lycoris', got {self.init_weights!r}")

    def entry(self, path: str) -> Entry:
        r, alpha = self.rank_and_alpha(path)
        opts = self.dropout_options()
        if self.rank_dropout and self.rank_dropout_scale:
            opts += (("rank_dropout_scale", True),)
        return Entry(kind=KIND, r=r, scaling=alpha / r, fan_in_fan_out=False, options=opts)


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``torch.kron`` of the last two axes (leading axes batched): every entry is one product, so the values are
    torch.kron's exactly."""
    a, c = w1.shape[-2:]
    b, d = w2.shape[-2:]
    lead = w1.shape[:-2]
    return (w1[..., :, None, :, None] * w2[..., None, :, None, :]).reshape(*lead, a * b, c * d)


def _factor(leaves: Mapping[str, torch.Tensor], i: int) -> torch.Tensor:
    full = leaves.get(f"lokr_w{i}")
    return full if full is not None else leaves[f"lokr_w{i}_a"] @ leaves[f"lokr_w{i}_b"]


class LoKr:
    """The LoKr method (see the module docstring). Entries of kind ``"linear"``, rank ``r``, scaling
    ``alpha / r``; options: the non-zero dropouts (and ``rank_dropout_scale``)."""

    name = "lokr"
    peft_type = "LOKR"
    config_cls = LoKrConfig
    capabilities = frozenset({ROUTE, SCALE})

    # -- planning and init -------------------------------------------------------------------------
    def plan(self, config: LoKrConfig, model: nn.Module) -> tuple[LoKrConfig, dict[str, Entry]]:
        if config.target_modules is None:
            need(False, type(config), "target_modules",
                 "is None; name the modules to adapt (PEFT guesses them per architecture, adaptfn does not)")
        config = expand_all_linear(config, model)
        entries: dict[str, Entry] = {}
        for path, mod in model.named_modules():
            if not path or not is_target(config, path):
                continue
            not_conv1d("LoKr", path, mod)
            if not isinstance(mod, nn.Linear):
                raise IncompatibleAdapterError(
                    f"target module {path!r} is a {type(mod).__name__}; adaptfn's LoKr supports nn.Linear (PEFT's "
                    "convolution LoKr comes with adaptfn's convolution support); check target_modules")
            entries[path] = config.entry(path)
        if not entries:
            raise IncompatibleAdapterError(
                f"LoKrConfig.target_modules={config.target_modules!r} matches no module of {type(model).__name__}")
        return config, plan_replacements(config, model, entries)

    def init_leaves(self, config: LoKrConfig, path: str, entry: Entry, module: nn.Module,
                    generator: torch.Generator | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """PEFT's shapes (:func:`lokr_shapes`) and initialisation, in its order: ``init_weights=True``: ``w1``
        zeros (decomposed: ``w1_a`` zeros, ``w1_b`` kaiming-uniform), ``w2`` kaiming-uniform; ``"lycoris"``:
        ``w1`` kaiming-uniform, ``w2`` zeros (decomposed: ``w2_b`` zeros, ``w2_a`` kaiming-uniform); False: all
        kaiming-uniform."""
        w = module.weight
        shapes = lokr_shapes(int(w.shape[0]), int(w.shape[1]), entry.r, config.decompose_both,
                             config.decompose_factor)
        mode = config.init_weights
        zero = ({"lokr_w1", "lokr_w1_a"} if mode is True else
                {"lokr_w2", "lokr_w2_b"} if mode == "lycoris" else set())
        out = {}
        for name, shape in shapes.items():
            t = torch.empty(shape, dtype=torch.float32, device=w.device)
            if name in zero:
                t.zero_()
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
            out[name] = t
        return {n: t.to(dtype or adapter_dtype(w)) for n, t in out.items()}

    # -- compute -----------------------------------------------------------------------------------
    @staticmethod
    def _delta(entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any) -> torch.Tensor:
        """``dW`` [out, in] (stacked: [N, out, in]) with the scale, the weight and the gate applied."""
        w1, w2 = _factor(leaves, 1), _factor(leaves, 2)
        stacked = w1.dim() == 3
        s: Any = leaves[SCALING].detach() if SCALING in leaves else entry.scaling
        dw = _kron(w1, w2) * (s[:, None, None] if stacked and isinstance(s, torch.Tensor) and s.dim() == 1 else s)
        extra = leaves.get(COEF)  # the scale weight and the gate multiply PEFT's delta
        if on is not True:
            extra = on if extra is None else extra * on
        if extra is not None:
            extra = extra.to(dw.dtype)
            dw = dw * (extra[:, None, None] if stacked and extra.dim() == 1 else extra)
        return dw

    def forward(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: nn.Module, x: torch.Tensor,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """``base(x) + x @ dW^T`` (``x`` [..., in]); row ``i`` uses adapter ``route[i]``'s ``dW`` when routed."""
        w1 = leaves.get("lokr_w1", leaves.get("lokr_w1_a"))
        if (w1.dim() == 3) != (route is not None):
            raise single_for_route() if route is not None else stacked_called_directly(module_path(module))
        out = call_base(x)
        kept = module_kept(entry, generator)
        if kept is False:
            return out
        dw = self._delta(entry, leaves, on)
        keep = rank_keep(entry, generator, dw.shape[-2], torch.float32, dw.device,
                         normalize=bool(entry.option("rank_dropout_scale", False)))
        if keep is not None:
            dw = dw * keep.to(dw.dtype)
        if kept is not True:
            dw = dw * kept.to(dw.dtype)
        if route is not None:
            return (out + routing.dense_rows(x, dw, route)).to(out.dtype)
        return (out + F.linear(x if x.dtype == dw.dtype else x.to(dw.dtype), dw)).to(out.dtype)

    def merge(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"weight": W + dW}``."""
        weight = tensors["weight"]
        return {"weight": weight + self._delta(entry, leaves, on).reshape(weight.shape).to(weight.dtype)}

    def off(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``w1`` zeros (``lokr_w1`` or ``lokr_w1_a``): no delta."""
        name = "lokr_w1" if "lokr_w1" in leaves else "lokr_w1_a"
        return {**leaves, name: torch.zeros_like(leaves[name])}

    # -- checks against a model -------------------------------------------------------------------
    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        if not isinstance(module, nn.Linear):
            raise IncompatibleAdapterError(
                f"module {path!r}: the adapter has a LoKr delta for an nn.Linear but the model has a "
                f"{type(module).__name__}")
        n_out, n_in = int(module.weight.shape[0]), int(module.weight.shape[1])
        w1 = leaves.get("lokr_w1")
        a, c = (w1.shape[-2], w1.shape[-1]) if w1 is not None else (leaves["lokr_w1_a"].shape[-2],
                                                                     leaves["lokr_w1_b"].shape[-1])
        w2 = leaves.get("lokr_w2")
        b, d = (w2.shape[-2], w2.shape[-1]) if w2 is not None else (leaves["lokr_w2_a"].shape[-2],
                                                                     leaves["lokr_w2_b"].shape[-1])
        if (a * b, c * d) != (n_out, n_in):
            shown = ", ".join(f"{n} {shape_str(t.shape)}" for n, t in leaves.items() if n in NAMES)
            raise IncompatibleAdapterError(
                f"module {path!r}: the LoKr factors ({shown}) make a [{a * b}, {c * d}] delta but "
                f"{type(module).__name__} has in={n_in}, out={n_out}")

    # -- PEFT files ------------------------------------------------------------------------------
    def delta_suffixes(self) -> tuple[str, ...]:
        return NAMES + CONV_NAMES

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's tensors; a scale weight is folded into ``w1`` (``lokr_w1`` or ``lokr_w1_a``)."""
        out = {n: leaves[n] for n in NAMES if n in leaves}
        c = leaves.get(COEF)
        if c is not None:
            name = "lokr_w1" if "lokr_w1" in out else "lokr_w1_a"
            out[name] = out[name] * c.to(out[name].dtype)
        return out

    def from_peft(self, config: LoKrConfig, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
        if "lokr_t2" in found or any(t.dim() > 2 for t in found.values()):
            raise AdapterFileError(
                f"{source}: module {path!r} has a convolution LoKr ({sorted(found)}, "
                f"{[shape_str(t.shape) for t in found.values()]}), which needs adaptfn's convolution support")
        names = set(found)
        ok1 = names & {"lokr_w1", "lokr_w1_a", "lokr_w1_b"} in ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
        ok2 = names & {"lokr_w2", "lokr_w2_a", "lokr_w2_b"} in ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})
        if not (ok1 and ok2):
            raise AdapterFileError(
                f"{source}: module {path!r} has {sorted(found)}; a LoKr module has lokr_w1 or lokr_w1_a + lokr_w1_b, "
                "and lokr_w2 or lokr_w2_a + lokr_w2_b")
        if not is_target(config, path):
            raise AdapterFileError(
                f"{source}: key {path}.{sorted(found)[0]} is for module {path!r}, which adapter_config.json's "
                f"target_modules={config.target_modules!r} does not target")
        e = config.entry(path)
        for i in (1, 2):
            if f"lokr_w{i}_a" in found:
                fa, fb = found[f"lokr_w{i}_a"], found[f"lokr_w{i}_b"]
                if fa.dim() != 2 or fb.dim() != 2 or fa.shape[1] != fb.shape[0] or fa.shape[1] != e.r:
                    raise AdapterFileError(
                        f"{source}: module {path!r}: lokr_w{i}_a {shape_str(fa.shape)} and lokr_w{i}_b "
                        f"{shape_str(fb.shape)} are not a rank-{e.r} pair (the config's r / rank_pattern)")
        return e, {n: found[n] for n in NAMES if n in found}

    # -- stacking --------------------------------------------------------------------------------
    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        out = dict(leaves)
        for i in (1, 2):
            a = leaves.get(f"lokr_w{i}_a")
            if a is not None and a.shape[1] < r:
                extra = r - a.shape[1]
                out[f"lokr_w{i}_a"] = F.pad(a, (0, extra))
                out[f"lokr_w{i}_b"] = F.pad(leaves[f"lokr_w{i}_b"], (0, 0, 0, extra))
        return out

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        out = dict(leaves)
        for i in (1, 2):
            if f"lokr_w{i}_a" in leaves:
                out[f"lokr_w{i}_a"] = leaves[f"lokr_w{i}_a"][:, :r]
                out[f"lokr_w{i}_b"] = leaves[f"lokr_w{i}_b"][:r]
        return out
