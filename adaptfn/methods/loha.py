"""LoHa (low-rank Hadamard product, FedPara / LyCORIS): ``y = base(x) + x @ dW^T`` with

``dW = ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / r``  ([out, in]; ``*`` elementwise)

on ``nn.Linear`` modules. Leaves (PEFT's names and shapes): ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in],
``hada_w2_a`` [out, r], ``hada_w2_b`` [r, in]. Two rank-r factors multiplied elementwise reach rank ``r**2``
with ``4 r (out + in) / 2`` parameters. ``r`` and ``alpha`` per module from ``rank_pattern`` / ``alpha_pattern``.

Training (an explicit generator, :func:`adaptfn.inject`): ``module_dropout`` skips the whole delta with that
probability (one ``rand(1)`` per module and call) and ``rank_dropout`` zeroes output rows of ``dW`` (then divides
by the kept fraction), drawn as PEFT draws them, in the same order.

A scale weight ``w`` (``coef``, :func:`adaptfn.scale`) multiplies ``dW``; saved folded into ``hada_w1_a``.
Capabilities: ``route`` (per-row ``dW`` of each row's adapter: the delta is dense, so a routed call gathers an
[out, in] weight per row) and ``scale``; not ``combine`` (PEFT has no ``add_weighted_adapter`` for LoHa).

Convolutions (PEFT's ``Conv1d`` / ``Conv2d`` LoHa, ``use_effective_conv2d``'s ``hada_t1`` / ``hada_t2``) come with
adaptfn's convolution support; a file holding them is refused until then. PEFT has no LoHa for transformers'
GPT-2 ``Conv1D``, so neither has adaptfn.
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
from .base import ROUTE, SCALE, CallBase, need
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

__all__ = ["LoHaConfig", "LoHa"]

KIND = "linear"
FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
CONV_FACTORS = ("hada_t1", "hada_t2")


@dataclasses.dataclass(frozen=True)
class LoHaConfig(LycorisFamilyConfig):
    """LoHa config with PEFT's field names and defaults (``peft.LoHaConfig``); the fields are
    :class:`adaptfn.methods.common.LycorisFamilyConfig`'s. ``init_weights``: True (``hada_w2_b`` zeros, the other
    factors kaiming-uniform: the adapted model starts equal to the base) or False (all four random).

    Example:
        >>> cfg = af.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
        >>> loha = af.init(fn, cfg, generator=torch.Generator().manual_seed(0))
        >>> {k: list(v.shape) for k, v in loha.leaves("model.decoder.layers.0.self_attn.q_proj").items()}
        {'hada_w1_a': [22, 4], 'hada_w1_b': [4, 22], 'hada_w2_a': [22, 4], 'hada_w2_b': [4, 22], 'gate': []}
        >>> torch.equal(af.inject(fn, loha)(params, input_ids=ids).logits, fn(params, input_ids=ids).logits)
        True
    """

    peft_type: ClassVar[str] = "LOHA"

    init_weights: bool = True

    def validate(self) -> None:
        super().validate()
        need(isinstance(self.init_weights, bool), type(self), "init_weights",
             f"must be True or False, got {self.init_weights!r}")


def _scale(entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, stacked: bool) -> Any:
    """alpha / r (a stack's ``scaling`` leaf, read detached), times the scale weight and the gate."""
    s: Any = leaves[SCALING].detach() if SCALING in leaves else entry.scaling
    c = leaves.get(COEF)
    if c is not None:
        s = s * c
    if on is not True:
        s = s * on
    if stacked and isinstance(s, torch.Tensor) and s.dim() == 1:
        s = s[:, None, None]
    return s


class LoHa:
    """The LoHa method (see the module docstring). Entries of kind ``"linear"``, rank ``r``, scaling
    ``alpha / r``; options: the non-zero dropouts."""

    name = "loha"
    peft_type = "LOHA"
    config_cls = LoHaConfig
    capabilities = frozenset({ROUTE, SCALE})

    # -- planning and init -------------------------------------------------------------------------
    def plan(self, config: LoHaConfig, model: nn.Module) -> tuple[LoHaConfig, dict[str, Entry]]:
        if config.target_modules is None:
            need(False, type(config), "target_modules",
                 "is None; name the modules to adapt (PEFT guesses them per architecture, adaptfn does not)")
        config = expand_all_linear(config, model)
        entries: dict[str, Entry] = {}
        for path, mod in model.named_modules():
            if not path or not is_target(config, path):
                continue
            not_conv1d("LoHa", path, mod)
            if not isinstance(mod, nn.Linear):
                raise IncompatibleAdapterError(
                    f"target module {path!r} is a {type(mod).__name__}; adaptfn's LoHa supports nn.Linear (PEFT's "
                    "convolution LoHa comes with adaptfn's convolution support); check target_modules")
            r, alpha = config.rank_and_alpha(path)
            entries[path] = Entry(kind=KIND, r=r, scaling=alpha / r, fan_in_fan_out=False,
                                  options=config.dropout_options())
        if not entries:
            raise IncompatibleAdapterError(
                f"LoHaConfig.target_modules={config.target_modules!r} matches no module of {type(model).__name__}")
        return config, plan_replacements(config, model, entries)

    def init_leaves(self, config: LoHaConfig, path: str, entry: Entry, module: nn.Module,
                    generator: torch.Generator | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """PEFT's initialisation, in its order: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a`` kaiming-uniform
        (a = sqrt(5)) and ``hada_w2_b`` zeros (``init_weights=False``: kaiming-uniform too)."""
        w = module.weight
        n_out, n_in = int(w.shape[0]), int(w.shape[1])
        r = entry.r
        shapes = {"hada_w1_a": (n_out, r), "hada_w1_b": (r, n_in), "hada_w2_a": (n_out, r), "hada_w2_b": (r, n_in)}
        out = {}
        for name, shape in shapes.items():
            t = torch.empty(shape, dtype=torch.float32, device=w.device)
            if name == "hada_w2_b" and config.init_weights:
                t.zero_()
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
            out[name] = t.to(dtype or adapter_dtype(w))
        return out

    # -- compute -----------------------------------------------------------------------------------
    @staticmethod
    def _delta(entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any) -> torch.Tensor:
        """``dW`` [out, in] (stacked: [N, out, in]) with the scale, the weight and the gate applied."""
        w1a, w1b, w2a, w2b = (leaves[n] for n in FACTORS)
        dw = (w1a @ w1b) * (w2a @ w2b)
        return dw * _scale(entry, leaves, on, w1a.dim() == 3)

    def forward(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: nn.Module, x: torch.Tensor,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """``base(x) + x @ dW^T`` (``x`` [..., in]); row ``i`` uses adapter ``route[i]``'s ``dW`` when routed.

        Arguments:
            entry, leaves: this module's entry and ``{"hada_w1_a": [out, r], "hada_w1_b": [r, in],
                "hada_w2_a": [out, r], "hada_w2_b": [r, in], "gate": []}`` (stacked: a leading ``N``).
            on: ``True``, or a bool tensor (the gate under a transform). generator: training dropouts (None: off).
            call_base, module: the base forward and module. x: the module input. route: int64 [batch] or None.
        """
        if (leaves["hada_w1_a"].dim() == 3) != (route is not None):
            raise single_for_route() if route is not None else stacked_called_directly(module_path(module))
        out = call_base(x)
        kept = module_kept(entry, generator)
        if kept is False:
            return out
        dw = self._delta(entry, leaves, on)
        keep = rank_keep(entry, generator, dw.shape[-2], dw.dtype, dw.device, normalize=True)
        if keep is not None:
            dw = dw * keep
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
        """``hada_w2_b`` zeros: no delta."""
        return {**leaves, "hada_w2_b": torch.zeros_like(leaves["hada_w2_b"])}

    # -- checks against a model -------------------------------------------------------------------
    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        if not isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            raise IncompatibleAdapterError(
                f"module {path!r}: the adapter has a LoHa delta for an nn.Linear but the model has a "
                f"{type(module).__name__}")
        n_out, n_in = int(module.weight.shape[0]), int(module.weight.shape[1])
        w1a, w1b, w2a, w2b = (leaves[n] for n in FACTORS)
        if (w1a.shape[-2], w2a.shape[-2], w1b.shape[-1], w2b.shape[-1]) != (n_out, n_out, n_in, n_in):
            raise IncompatibleAdapterError(
                f"module {path!r}: hada_w1_a {shape_str(w1a.shape)}, hada_w1_b {shape_str(w1b.shape)}, hada_w2_a "
                f"{shape_str(w2a.shape)}, hada_w2_b {shape_str(w2b.shape)} do not fit {type(module).__name__} with "
                f"in={n_in}, out={n_out} (expected [{n_out}, r], [r, {n_in}], [{n_out}, r], [r, {n_in}])")

    # -- PEFT files ------------------------------------------------------------------------------
    def delta_suffixes(self) -> tuple[str, ...]:
        return FACTORS + CONV_FACTORS

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's tensors; a scale weight is folded into ``hada_w1_a``."""
        out = {n: leaves[n] for n in FACTORS}
        c = leaves.get(COEF)
        if c is not None:
            out["hada_w1_a"] = out["hada_w1_a"] * c.to(out["hada_w1_a"].dtype)
        return out

    def from_peft(self, config: LoHaConfig, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
        conv = sorted(set(found) & set(CONV_FACTORS))
        if conv:
            raise AdapterFileError(
                f"{source}: module {path!r} has {conv}: a convolution LoHa (use_effective_conv2d), which needs "
                "adaptfn's convolution support")
        missing = [n for n in FACTORS if n not in found]
        if missing:
            raise AdapterFileError(f"{source}: module {path!r} has {sorted(found)} but no {missing}")
        w1a, w1b, w2a, w2b = (found[n] for n in FACTORS)
        if w1a.dim() != 2:
            raise AdapterFileError(
                f"{source}: module {path!r}: hada_w1_a is {shape_str(w1a.shape)}; a {w1a.dim()}-d LoHa factor is "
                "a convolution LoHa, which needs adaptfn's convolution support")
        r = int(w1b.shape[0]) if w1b.dim() == 2 else -1
        ok = all(t.dim() == 2 for t in (w1b, w2a, w2b)) and w1a.shape == w2a.shape and w1b.shape == w2b.shape and (
            w1a.shape[1] == r)
        if not ok:
            raise AdapterFileError(
                f"{source}: module {path!r}: hada_w1_a {shape_str(w1a.shape)}, hada_w1_b {shape_str(w1b.shape)}, "
                f"hada_w2_a {shape_str(w2a.shape)}, hada_w2_b {shape_str(w2b.shape)} are not two rank-r pairs "
                "([out, r], [r, in])")
        if not is_target(config, path):
            raise AdapterFileError(
                f"{source}: key {path}.hada_w1_a is for module {path!r}, which adapter_config.json's "
                f"target_modules={config.target_modules!r} does not target")
        want, alpha = config.rank_and_alpha(path)
        if r != want:
            raise AdapterFileError(f"{source}: module {path!r} has rank {r} (hada_w1_b {shape_str(w1b.shape)}) but "
                                   f"the config says r={want} (r / rank_pattern)")
        e = Entry(kind=KIND, r=r, scaling=alpha / r, fan_in_fan_out=False, options=config.dropout_options())
        return e, {n: found[n] for n in FACTORS}

    # -- stacking --------------------------------------------------------------------------------
    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        extra = r - leaves["hada_w1_b"].shape[0]
        if extra == 0:
            return dict(leaves)
        return {**leaves, "hada_w1_a": F.pad(leaves["hada_w1_a"], (0, extra)),
                "hada_w2_a": F.pad(leaves["hada_w2_a"], (0, extra)),
                "hada_w1_b": F.pad(leaves["hada_w1_b"], (0, 0, 0, extra)),
                "hada_w2_b": F.pad(leaves["hada_w2_b"], (0, 0, 0, extra))}

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        return {**leaves, "hada_w1_a": leaves["hada_w1_a"][:, :r], "hada_w2_a": leaves["hada_w2_a"][:, :r],
                "hada_w1_b": leaves["hada_w1_b"][:r], "hada_w2_b": leaves["hada_w2_b"][:r]}
