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

Convolutions (``nn.Conv1d``, ``nn.Conv2d``; :mod:`adaptfn.methods.lycoris_conv`): ``dW`` has the weight's shape
[out, in / g, *k] and is added as ``conv(x, dW)`` with the base's geometry. Flat factors (entry kind ``"linear"``):
``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in / g * prod(k)], the product reshaped to the weight. With
``use_effective_conv2d`` and a kernel larger than 1 (kind ``"conv"``, PEFT's CP form): ``hada_t1`` / ``hada_t2``
[r, r, k1, k2] (Conv1d: [r, r, k, 1]), ``hada_w1_a`` / ``hada_w2_a`` [r, out], ``hada_w1_b`` / ``hada_w2_b``
[r, in / g], and ``dW = einsum("ijkl,jr,ip->prkl", t1, w1_b, w1_a) * einsum(..., t2, w2_b, w2_a) * alpha / r``.
``route=`` on a convolution runs one grouped convolution with each row's ``dW``. PEFT 0.21.2 has no LoHa for
``nn.Conv3d`` or transformers' GPT-2 ``Conv1D``, so neither has adaptfn.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._where import is_target
from ..adapter import COEF, SCALING, Entry
from ..errors import AdapterFileError, IncompatibleAdapterError, shape_str
from . import lycoris_conv as lc
from .base import ROUTE, SCALE, CallBase, need
from .common import (
    LycorisFamilyConfig,
    adapter_dtype,
    plan_replacements,
    targeted,
)

__all__ = ["LoHaConfig", "LoHa"]

KIND = "linear"
CONV_KIND = "conv"
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


def _scale(entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, stacked: bool, nd: int = 2) -> Any:
    """alpha / r (a stack's ``scaling`` leaf, read detached), times the scale weight and the gate; a stack's
    per-adapter value shaped to broadcast over an ``nd``-d delta."""
    s: Any = leaves[SCALING].detach() if SCALING in leaves else entry.scaling
    c = leaves.get(COEF)
    if c is not None:
        s = s * c
    if on is not True:
        s = s * on
    if stacked and isinstance(s, torch.Tensor) and s.dim() == 1:
        s = s.reshape(-1, *[1] * nd)
    return s


class LoHa:
    """The LoHa method (see the module docstring). Entries of kind ``"linear"`` (flat factors: Linear, or a
    convolution without the CP form) or ``"conv"`` (the CP form), rank ``r``, scaling ``alpha / r``; options:
    the non-zero dropouts."""

    name = "loha"
    peft_type = "LOHA"
    config_cls = LoHaConfig
    capabilities = frozenset({ROUTE, SCALE})

    # -- planning and init -------------------------------------------------------------------------
    def plan(self, config: LoHaConfig, model: nn.Module) -> tuple[LoHaConfig, dict[str, Entry]]:
        config, found = targeted(config, model)
        entries: dict[str, Entry] = {}
        for path, mod in found:
            if lc.layer_of(mod) is None:
                lc.refuse_layer("LoHa", path, mod)
            r, alpha = config.rank_and_alpha(path)
            kind = CONV_KIND if lc.effective_conv(config.use_effective_conv2d, mod) else KIND
            entries[path] = Entry(kind=kind, r=r, scaling=alpha / r, fan_in_fan_out=False,
                                  options=config.dropout_options())
        if not entries:
            raise IncompatibleAdapterError(
                f"LoHaConfig.target_modules={config.target_modules!r} matches no module of {type(model).__name__}")
        return config, plan_replacements(config, model, entries)

    def init_leaves(self, config: LoHaConfig, path: str, entry: Entry, module: nn.Module,
                    generator: torch.Generator | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """PEFT's shapes and initialisation, in its order: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``
        kaiming-uniform (a = sqrt(5)) and ``hada_w2_b`` zeros (``init_weights=False``: kaiming-uniform too), then
        (CP form) ``hada_t1``, ``hada_t2`` kaiming-uniform."""
        w = module.weight
        n_out, n_in = int(w.shape[0]), lc.flat_in(module)
        r = entry.r
        if entry.kind == CONV_KIND:
            k = lc.kernel(module)
            k2 = k if len(k) == 2 else (k[0], 1)
            n_in = int(w.shape[1])
            shapes = {"hada_w1_a": (r, n_out), "hada_w1_b": (r, n_in), "hada_w2_a": (r, n_out),
                      "hada_w2_b": (r, n_in), "hada_t1": (r, r, *k2), "hada_t2": (r, r, *k2)}
        else:
            shapes = {"hada_w1_a": (n_out, r), "hada_w1_b": (r, n_in), "hada_w2_a": (n_out, r),
                      "hada_w2_b": (r, n_in)}
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
        """``dW`` with the scale, the weight and the gate applied: flat [out, in'] or, CP form, [out, in, k1, k2]
        (stacked: a leading ``N``)."""
        w1a, w1b, w2a, w2b = (leaves[n] for n in FACTORS)
        t1 = leaves.get("hada_t1")
        if t1 is None:
            dw = (w1a @ w1b) * (w2a @ w2b)
            return dw * _scale(entry, leaves, on, w1a.dim() == 3)
        t2 = leaves["hada_t2"]
        if t1.dim() == 5:
            eq = "nijkl,njr,nip->nprkl"
        else:
            eq = "ijkl,jr,ip->prkl"
        dw = torch.einsum(eq, t1, w1b, w1a) * torch.einsum(eq, t2, w2b, w2a)
        return dw * _scale(entry, leaves, on, t1.dim() == 5, 4)

    def forward(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: nn.Module, x: torch.Tensor,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """``base(x) + x @ dW^T`` (``x`` [..., in]; a convolution: ``base(x) + conv(x, dW)``, ``x`` [batch, in,
        *spatial]); row ``i`` uses adapter ``route[i]``'s ``dW`` when routed.

        Arguments:
            entry, leaves: this module's entry and ``{"hada_w1_a": [out, r], "hada_w1_b": [r, in],
                "hada_w2_a": [out, r], "hada_w2_b": [r, in], "gate": []}`` (the CP form: see the module docstring;
                stacked: a leading ``N``).
            on: ``True``, or a bool tensor (the gate under a transform). generator: training dropouts (None: off).
            call_base, module: the base forward and module. x: the module input. route: int64 [batch] or None.
        """
        return lc.forward_dense(lambda: self._delta(entry, leaves, on), leaves["hada_w1_a"].dim() == 3, entry,
                                generator, call_base, module, x, route, normalize=True)

    def merge(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"weight": W + dW}``."""
        return lc.merged(tensors, self._delta(entry, leaves, on))

    def off(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``hada_w2_b`` zeros: no delta."""
        return {**leaves, "hada_w2_b": torch.zeros_like(leaves["hada_w2_b"])}

    # -- checks against a model -------------------------------------------------------------------
    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        layer = lc.check_layer("LoHa", path, entry.kind == CONV_KIND, module)
        w1a, w1b, w2a, w2b = (leaves[n] for n in FACTORS)
        n_out = int(module.weight.shape[0])
        if entry.kind == CONV_KIND:
            n_in = int(module.weight.shape[1])
            k = lc.kernel(module)
            k2 = k if len(k) == 2 else (k[0], 1)
            t1, t2 = leaves["hada_t1"], leaves["hada_t2"]
            got = (w1a.shape[-1], w2a.shape[-1], w1b.shape[-1], w2b.shape[-1], tuple(t1.shape[-2:]),
                   tuple(t2.shape[-2:]))
            if got != (n_out, n_out, n_in, n_in, k2, k2):
                raise IncompatibleAdapterError(
                    f"module {path!r}: hada_t1 {shape_str(t1.shape)}, hada_w1_a {shape_str(w1a.shape)}, hada_w1_b "
                    f"{shape_str(w1b.shape)} (and the w2 factors) do not fit {lc.layers.layer_name(module)} with "
                    f"out={n_out}, in / groups={n_in}, kernel {list(k)} (expected [r, r, {k2[0]}, {k2[1]}], "
                    f"[r, {n_out}], [r, {n_in}])")
            return
        n_in = lc.flat_in(module)
        if (w1a.shape[-2], w2a.shape[-2], w1b.shape[-1], w2b.shape[-1]) != (n_out, n_out, n_in, n_in):
            what = "in" if layer == "linear" else "in / groups * kernel"
            raise IncompatibleAdapterError(
                f"module {path!r}: hada_w1_a {shape_str(w1a.shape)}, hada_w1_b {shape_str(w1b.shape)}, hada_w2_a "
                f"{shape_str(w2a.shape)}, hada_w2_b {shape_str(w2b.shape)} do not fit {type(module).__name__} with "
                f"{what}={n_in}, out={n_out} (expected [{n_out}, r], [r, {n_in}], [{n_out}, r], [r, {n_in}])")

    # -- PEFT files ------------------------------------------------------------------------------
    def delta_suffixes(self) -> tuple[str, ...]:
        return FACTORS + CONV_FACTORS

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's tensors; a scale weight is folded into ``hada_w1_a``."""
        out = {n: leaves[n] for n in FACTORS + CONV_FACTORS if n in leaves}
        c = leaves.get(COEF)
        if c is not None:
            out["hada_w1_a"] = out["hada_w1_a"] * c.to(out["hada_w1_a"].dtype)
        return out

    def from_peft(self, config: LoHaConfig, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
        cp = bool(set(found) & set(CONV_FACTORS))
        names = FACTORS + CONV_FACTORS if cp else FACTORS
        missing = [n for n in names if n not in found]
        if missing:
            raise AdapterFileError(f"{source}: module {path!r} has {sorted(found)} but no {missing}")
        w1a, w1b, w2a, w2b = (found[n] for n in FACTORS)
        shown = ", ".join(f"{n} {shape_str(found[n].shape)}" for n in names)
        if cp:
            t1, t2 = found["hada_t1"], found["hada_t2"]
            r = int(t1.shape[0]) if t1.dim() == 4 else -1
            ok = (t1.dim() == 4 and t1.shape == t2.shape and t1.shape[1] == r and all(
                t.dim() == 2 and t.shape[0] == r for t in (w1a, w1b, w2a, w2b)) and w1a.shape == w2a.shape
                and w1b.shape == w2b.shape)
            if not ok:
                raise AdapterFileError(
                    f"{source}: module {path!r}: {shown} are not PEFT's CP-form LoHa (hada_t [r, r, k1, k2], "
                    "hada_w_a [r, out], hada_w_b [r, in])")
        else:
            if w1a.dim() != 2:
                raise AdapterFileError(
                    f"{source}: module {path!r}: hada_w1_a is {shape_str(w1a.shape)}; a {w1a.dim()}-d LoHa factor "
                    "without hada_t1 / hada_t2 is not PEFT's layout")
            r = int(w1b.shape[0]) if w1b.dim() == 2 else -1
            ok = all(t.dim() == 2 for t in (w1b, w2a, w2b)) and w1a.shape == w2a.shape and (
                w1b.shape == w2b.shape) and w1a.shape[1] == r
            if not ok:
                raise AdapterFileError(
                    f"{source}: module {path!r}: {shown} are not two rank-r pairs ([out, r], [r, in])")
        if not is_target(config, path):
            raise AdapterFileError(
                f"{source}: key {path}.hada_w1_a is for module {path!r}, which adapter_config.json's "
                f"target_modules={config.target_modules!r} does not target")
        want, alpha = config.rank_and_alpha(path)
        if r != want:
            raise AdapterFileError(f"{source}: module {path!r} has rank {r} ({shown}) but the config says r={want} "
                                   "(r / rank_pattern)")
        e = Entry(kind=CONV_KIND if cp else KIND, r=r, scaling=alpha / r, fan_in_fan_out=False,
                  options=config.dropout_options())
        return e, {n: found[n] for n in names}

    # -- stacking --------------------------------------------------------------------------------
    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        extra = r - entry.r if entry.kind == CONV_KIND else r - leaves["hada_w1_b"].shape[0]
        if extra <= 0:
            return dict(leaves)
        if entry.kind == CONV_KIND:
            out = {**leaves, **{n: F.pad(leaves[n], (0, 0, 0, extra)) for n in FACTORS}}
            for n in CONV_FACTORS:
                out[n] = F.pad(leaves[n], (0, 0, 0, 0, 0, extra, 0, extra))
            return out
        return {**leaves, "hada_w1_a": F.pad(leaves["hada_w1_a"], (0, extra)),
                "hada_w2_a": F.pad(leaves["hada_w2_a"], (0, extra)),
                "hada_w1_b": F.pad(leaves["hada_w1_b"], (0, 0, 0, extra)),
                "hada_w2_b": F.pad(leaves["hada_w2_b"], (0, 0, 0, extra))}

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        if entry.kind == CONV_KIND:
            return {**leaves, **{n: leaves[n][:r] for n in FACTORS}, **{n: leaves[n][:r, :r] for n in CONV_FACTORS}}
        return {**leaves, "hada_w1_a": leaves["hada_w1_a"][:, :r], "hada_w2_a": leaves["hada_w2_a"][:, :r],
                "hada_w1_b": leaves["hada_w1_b"][:r], "hada_w2_b": leaves["hada_w2_b"][:r]}
