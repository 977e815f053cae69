"""AdaLoRA: an SVD-shaped low-rank delta whose rank is pruned during training.

For a target Linear / GPT-2 Conv1D with ``in`` inputs and ``out`` outputs, PEFT's shapes and formula:

* ``lora_A`` [r, in] (right singular vectors), ``lora_E`` [r, 1] (singular values), ``lora_B`` [out, r];
* ``y = base(x) + (x @ (A * E).T @ B.T) * alpha / (ranknum + 1e-5)``, with ``ranknum = init_r`` (the
  rank the adapter started with, never saved) and ``alpha = lora_alpha`` (``r`` when ``lora_alpha <= 0``);
* merge: ``W + B @ (A * E) * alpha / (ranknum + 1e-5)`` (transposed for Conv1D's [in, out] weight).

An ``nn.Conv2d`` target (``groups=1``; PEFT's ``SVDConv2d``) has ``lora_A`` [r, in * kh * kw]: ``B @ (A * E)``
reshaped to the weight [out, in, kh, kw] is the delta, computed unmerged as two convolutions (``A * E`` as an
[r, in, kh, kw] kernel with the base's geometry, then ``B`` as a 1x1); PEFT's AdaLoRA has no Conv1d / Conv3d
layers, and neither has adaptfn's.

Training prunes singular triplets by setting entries of ``E`` to zero (shapes never change); see
:mod:`adaptfn.methods.adalora_alloc` (``af.adalora``) for the regulariser and the rank allocator. A
pruned adapter saved by PEFT carries ``rank_pattern`` (per-module boolean masks, keys
``"<module path>.lora_E"``) and tensors of the kept rank only; :func:`adaptfn.adalora.prune` makes one.

A scale weight ``w`` (the ``coef`` leaf, :func:`adaptfn.scale`) multiplies the delta, as for LoRA; it is saved
folded into ``lora_E`` (``E * w``). AdaLoRA declares no ``"combine"``: PEFT's ``AdaLoraModel`` refuses
``add_weighted_adapter``, so :func:`adaptfn.combine` does too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import routing
from .._where import is_target
from ..adapter import COEF, SCALING, Entry
from ..errors import AdapterFileError, IncompatibleAdapterError, shape_str, single_for_route, stacked_called_directly
from . import layers
from .base import ROUTE, SCALE, CallBase, check_int, is_int, is_real, need
from .common import (
    LoraFamilyConfig,
    adapter_dtype,
    dropout,
    dropout_options,
    is_conv1d,
    linear_dims,
    module_path,
    plan_replacements,
    require_targets,
    weight_needs_transpose,
)

__all__ = ["AdaLoraConfig", "AdaLora", "make_entry", "KIND", "EPS"]

KIND = "svd"
EPS = 1e-5  # PEFT: ranknum + 1e-5


@dataclasses.dataclass(frozen=True)
class AdaLoraConfig(LoraFamilyConfig):
    """AdaLoRA config with PEFT's field names and defaults (``peft.AdaLoraConfig``, a LoraConfig subclass).

    Arguments:
        target_r: target average rank per module after pruning.
        init_r: every module's starting rank.
        tinit: warm-up steps without pruning.
        tfinal: final steps at the target budget (masks frozen).
        deltaT: steps between two re-allocations during the pruning phase.
        beta1: EMA factor of the sensitivity.
        beta2: EMA factor of its uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser (:func:`adaptfn.adalora.orth_reg`).
        total_step: total training steps (required, > tinit + tfinal).
        rank_pattern: ``None`` while training; for a pruned adapter, ``{"<path>.lora_E": [bool] * init_r}``
            (PEFT's format; the saved tensors then hold only the kept triplets).
        lora_alpha: scale numerator (a LoRA field, inherited in PEFT).
        lora_dropout: needs an explicit generator, see :func:`adaptfn.inject`.
        target_modules: PEFT's targeting rules, as for LoRA (also ``exclude_modules``,
            ``layers_to_transform``, ``layers_pattern``).
        fan_in_fan_out: set from the module type, as PEFT does.
        bias: "none", "all" or "lora_only"; modules_to_save as for LoRA.
        init_lora_weights: True: ``E`` zeros, ``A`` and ``B`` ~ N(0, 0.02); False: all standard normal.
        r: kept for the round trip but, as in PEFT, without effect on AdaLoRA (so are ``use_rslora``,
            ``alpha_pattern`` and ``lora_bias``: PEFT's AdaLoRA layers have no ``lora_B`` bias).
        use_dora: ``True`` raises :class:`adaptfn.ConfigError`, as in PEFT.

    Example:
        >>> cfg = af.AdaLoraConfig(init_r=12, target_r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
        ...                        total_step=1000, tinit=100, tfinal=200, deltaT=10)
    """

    peft_type: ClassVar[str] = "ADALORA"

    rank_pattern: dict[str, list[bool]] | None = None
    # AdaLoRA's own
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def validate(self) -> None:
        """The LoRA-family checks plus AdaLoRA's schedule fields (each raises naming the field)."""
        super().validate()
        cls = type(self)
        # PEFT's AdaLoRA refuses DoRA; its layers ignore lora_bias (accepted here too: no bias, as in PEFT)
        need(self.use_dora is False, cls, "use_dora", "AdaLoRA does not support DoRA (PEFT refuses it too)")
        need(is_int(self.total_step) and self.total_step > 0, cls, "total_step",  # type: ignore[operator]
             f"AdaLoRA needs the total number of training steps, a positive int; got {self.total_step!r}")
        check_int(cls, "init_r", self.init_r, 1)
        check_int(cls, "target_r", self.target_r, 0)
        need(self.init_r >= self.target_r, cls, "init_r",
             f"({self.init_r}) must be >= target_r ({self.target_r}): pruning only lowers ranks")
        for name in ("tinit", "tfinal"):
            check_int(cls, name, getattr(self, name), 0)
        need(self.tinit < self.total_step - self.tfinal, cls, "tinit",  # type: ignore[operator]
             f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no pruning phase "
             "(need tinit < total_step - tfinal)")
        check_int(cls, "deltaT", self.deltaT, 1)
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            need(is_real(v) and 0 < v < 1, cls, name, f"must be a number in (0, 1), got {v!r}")
        need(is_real(self.orth_reg_weight) and self.orth_reg_weight >= 0, cls, "orth_reg_weight",
             f"must be a finite number >= 0, got {self.orth_reg_weight!r}")

    def validate_rank_pattern(self) -> None:
        """``rank_pattern``: None, or PEFT's pruning masks ``{"<path>.lora_E": [bool] * init_r}``."""
        cls = type(self)
        if self.rank_pattern is None:
            return
        need(isinstance(self.rank_pattern, Mapping), cls, "rank_pattern",
             f"must be a dict '<path>.lora_E' -> list of bools, got {type(self.rank_pattern).__name__}")
        for k, v in self.rank_pattern.items():
            need(isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(b, bool) for b in v), cls,
                 "rank_pattern", f"{k!r} must map to a list of bools (kept singular values), got {v!r}")
            need(len(v) == self.init_r, cls, "rank_pattern",
                 f"the mask of {k!r} has {len(v)} entries; a pruning mask has one per initial rank (init_r="
                 f"{self.init_r})")

    # -- per-module static facts -----------------------------------------------------------------
    def mask_for(self, path: str) -> list[bool] | None:
        """The saved ``rank_pattern`` mask of the module at ``path`` (None when there is none)."""
        rp = self.rank_pattern
        if not rp:
            return None
        key = f"{path}.lora_E"
        if key in rp:
            return list(rp[key])
        for k, v in rp.items():  # keys still carrying an adapter name ("<path>.lora_E.default")
            if k.startswith(key + "."):
                return list(v)
        return None

    def rank_for(self, path: str) -> int:
        """The module's rank: the kept count of its ``rank_pattern`` mask, else ``init_r``."""
        m = self.mask_for(path)
        return self.init_r if m is None else sum(m)


def _dims(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of the delta ``B @ (A * E)``: a Linear's / Conv1D's, or an nn.Conv2d's flattened kernel
    (``in = in_channels * kh * kw``)."""
    if isinstance(module, nn.Conv2d):
        n_in, n_out, _, k = layers.conv_dims(module)
        return n_in * k[0] * k[1], n_out
    return linear_dims(module)


def _kernel(AE: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``A * E`` [..., r, in * kh * kw] as a conv kernel [..., r, in, kh, kw]."""
    n_in, _, _, k = layers.conv_dims(module)
    return AE.reshape(*AE.shape[:-1], n_in, *k)


def make_entry(config: AdaLoraConfig, r: int, fan_in_fan_out: bool | None) -> Entry:
    """The :class:`Entry` of one module of rank ``r``: ``ranknum`` is ``init_r`` (PEFT keeps it through
    pruning); ``alpha`` is ``lora_alpha``, or the module's rank when ``lora_alpha <= 0`` (PEFT)."""
    alpha = float(config.lora_alpha) if config.lora_alpha > 0 else float(r)
    ranknum = float(config.init_r)
    opts: tuple[tuple[str, Any], ...] = (("alpha", alpha), ("ranknum", ranknum), *dropout_options(config))
    return Entry(kind=KIND, r=r, scaling=alpha / (ranknum + EPS), fan_in_fan_out=fan_in_fan_out, options=opts)


class AdaLora:
    """The AdaLoRA method (see the module docstring). Leaves: ``lora_A`` [r, in], ``lora_E`` [r, 1],
    ``lora_B`` [out, r]; entries of kind ``"svd"``."""

    name = "adalora"
    peft_type = "ADALORA"
    config_cls = AdaLoraConfig
    capabilities = frozenset({ROUTE, SCALE})

    # -- planning and init -------------------------------------------------------------------------
    def plan(self, config: AdaLoraConfig, model: nn.Module) -> tuple[AdaLoraConfig, dict[str, Entry]]:
        """Which modules ``config`` targets in ``model``, each with its :class:`Entry` (rank ``init_r``, or
        the kept count of a ``rank_pattern`` mask), plus the ``modules_to_save`` / bias replacements."""
        require_targets(config)
        config, found = layers.plan_targets(config, model, "AdaLoRA", {"linear", "conv2d"},
                                            "nn.Linear, transformers Conv1D and nn.Conv2d (PEFT 0.21's AdaLoRA layers)")
        modules = dict(model.named_modules())
        for path, _, layer in found:
            if layer == "conv2d" and layers.conv_dims(modules[path])[2] != 1:
                raise IncompatibleAdapterError(
                    f"target module {path!r} is a {layers.layer_name(modules[path])}; AdaLoRA supports nn.Conv2d "
                    "with groups=1 only (its delta B @ (A * E) is a full [out, in, kh, kw] kernel; PEFT's SVDConv2d "
                    "fails on grouped convolutions too)")
        entries = {path: make_entry(config, config.rank_for(path), fif) for path, fif, _ in found}
        return config, plan_replacements(config, model, entries)

    def init_leaves(self, config: AdaLoraConfig, path: str, entry: Entry, module: nn.Module,
                    generator: torch.Generator | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """PEFT's initialisation: ``E`` zeros, ``A`` [r, in] and ``B`` [out, r] ~ N(0, 0.02) (so the
        adapted model starts equal to the base); ``init_lora_weights=False``: all three standard normal."""
        w = module.weight
        n_in, n_out = _dims(module)
        r = entry.r
        kw: dict[str, Any] = dict(dtype=torch.float32, device=w.device)
        if config.init_lora_weights:
            A = torch.empty(r, n_in, **kw).normal_(0.0, 0.02, generator=generator)
            E = torch.zeros(r, 1, **kw)
            B = torch.empty(n_out, r, **kw).normal_(0.0, 0.02, generator=generator)
        else:
            A = torch.randn(r, n_in, generator=generator, **kw)
            E = torch.randn(r, 1, generator=generator, **kw)
            B = torch.randn(n_out, r, generator=generator, **kw)
        dt = dtype or adapter_dtype(w)
        return {"lora_A": A.to(dt), "lora_E": E.to(dt), "lora_B": B.to(dt)}

    # -- compute -----------------------------------------------------------------------------------
    @staticmethod
    def _scaled(entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, t: torch.Tensor) -> torch.Tensor:
        """``t * alpha / (ranknum + 1e-5)`` in PEFT's order (ranknum a float tensor [1]); a stacked
        adapter's ``scaling`` leaf when present; times the scale weight (``coef``) and the gate under a
        transform."""
        c = leaves.get(COEF)
        if c is not None:
            t = t * c.to(t.dtype)
        if SCALING in leaves:
            t = t * leaves[SCALING].detach()
        else:
            ranknum = torch.full((1,), entry.option("ranknum"), dtype=t.dtype, device=t.device) + EPS
            t = t * entry.option("alpha") / ranknum
        if on is not True:
            t = t * on
        return t

    def forward(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: nn.Module, x: torch.Tensor,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """``base(x) + (x @ (A * E).T @ B.T) * alpha / (ranknum + 1e-5)``.

        Arguments:
            entry, leaves: this module's entry and ``{"lora_A": [r, in], "lora_E": [r, 1],
                "lora_B": [out, r], "gate": []}``.
            on: ``True``, or a bool tensor (the gate under a transform).
            generator: dropout on the delta's input when the config has ``lora_dropout`` (else None: off).
            call_base, module: the base forward and module. x: the module input [..., in].
            route: per-row adapter indices [batch] into a stacked adapter (see :func:`adaptfn.inject`):
                row ``i`` gets adapter ``route[i]``'s delta (-1: none).

        Returns:
            The adapted output [..., out], in the base output's dtype.
        """
        A, E, B = leaves["lora_A"], leaves["lora_E"], leaves["lora_B"]
        if route is not None:
            return self._routed(entry, leaves, on, generator, call_base, module, x, route)
        if A.dim() != 2:
            raise stacked_called_directly(module_path(module))
        out = call_base(x)
        h = dropout(entry, generator, x if x.dtype == A.dtype else x.to(A.dtype))
        if isinstance(module, nn.Conv2d):  # (A * E) as an [r, in, kh, kw] kernel, then B as a 1x1
            delta = layers.conv_lowrank(h, _kernel(A * E, module), B[:, :, None, None], module, 2)
        else:
            delta = (h @ (A * E).T) @ B.T  # [..., out]
        return (out + self._scaled(entry, leaves, on, delta)).to(out.dtype)

    def _routed(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: nn.Module, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """Row i of the batch gets adapter ``route[i]``'s delta: ``A * E`` [N, r, in] and ``B`` [N, out, r]
        through the per-row low-rank kernels, scaled by the stack's ``scaling`` leaf [N] (0 where a gate is
        off or ``route[i] == -1``)."""
        A, E, B = leaves["lora_A"], leaves["lora_E"], leaves["lora_B"]
        if A.dim() != 3:
            raise single_for_route()
        s = leaves[SCALING].detach()
        c = leaves.get(COEF)
        if c is not None:
            s = s * c
        if on is not True:
            s = s * on
        out = call_base(x)
        h = dropout(entry, generator, x if x.dtype == A.dtype else x.to(A.dtype))
        if isinstance(module, nn.Conv2d):
            low = layers.conv_lowrank_routed(h, _kernel(A * E, module), B[..., None, None], s, route, module, 2)
            return (out + low).to(out.dtype)
        return (out + routing.lowrank(h, A * E, B, s, route)).to(out.dtype)

    def merge(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"weight": W + B @ (A * E) * alpha / (ranknum + 1e-5)}`` ([out, in]; transposed for Conv1D's
        [in, out])."""
        weight = tensors["weight"]
        A, E, B = leaves["lora_A"], leaves["lora_E"], leaves["lora_B"]
        delta = B @ (A * E)  # [out, in]
        if weight.dim() == 4:  # nn.Conv2d: [out, in * kh * kw] is the kernel, flattened (PEFT's SVDConv2d)
            if delta.numel() != weight.numel() or delta.shape[0] != weight.shape[0]:
                raise IncompatibleAdapterError(f"delta {shape_str(delta.shape)} does not fit the conv weight "
                                               f"{shape_str(weight.shape)}")
            # added in the wider dtype and rounded once, as PEFT's in-place ``weight += delta`` does
            return {"weight": (weight + self._scaled(entry, leaves, on, delta).reshape(weight.shape)).to(weight.dtype)}
        if weight_needs_transpose(weight, delta.shape, entry.fan_in_fan_out):
            delta = delta.T
        # added in the wider dtype and rounded once, as PEFT's in-place ``weight += delta`` does
        return {"weight": (weight + self._scaled(entry, leaves, on, delta)).to(weight.dtype)}

    def off(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``E`` zeros: no delta (how a masked-off entry is written to a file)."""
        return {**leaves, "lora_E": torch.zeros_like(leaves["lora_E"])}

    # -- checks against a model -------------------------------------------------------------------
    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        conv = layers.conv_kind(module)
        if not (isinstance(module, nn.Linear) or is_conv1d(module) or (conv == "conv2d" and module.groups == 1)):
            raise IncompatibleAdapterError(
                f"module {path!r}: the adapter has an AdaLoRA delta but the model has a {layers.layer_name(module)} "
                "(AdaLoRA adapts nn.Linear, transformers Conv1D and nn.Conv2d with groups=1)")
        n_in, n_out = _dims(module)
        A, E, B = leaves["lora_A"], leaves["lora_E"], leaves["lora_B"]
        if A.shape[-1] != n_in or B.shape[-2] != n_out:
            raise IncompatibleAdapterError(
                f"module {path!r}: lora_A {shape_str(A.shape)} / lora_E {shape_str(E.shape)} / lora_B "
                f"{shape_str(B.shape)} do not fit {type(module).__name__} with in={n_in}, out={n_out} "
                f"(expected lora_A [r, {n_in}], lora_E [r, 1], lora_B [{n_out}, r])")

    # -- PEFT files ------------------------------------------------------------------------------
    def delta_suffixes(self) -> tuple[str, ...]:
        return ("lora_A", "lora_E", "lora_B")

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's tensors; a scale weight is folded into ``lora_E`` (``E * w``)."""
        E = leaves["lora_E"]
        c = leaves.get(COEF)
        return {"lora_A": leaves["lora_A"], "lora_E": E if c is None else E * c.to(E.dtype), "lora_B": leaves["lora_B"]}

    def from_peft(self, config: AdaLoraConfig, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
        for k in ("lora_A", "lora_E", "lora_B"):
            if k not in found:
                raise AdapterFileError(f"{source}: module {path!r} has {sorted(found)} but no {k!r}")
        A, E, B = found["lora_A"], found["lora_E"], found["lora_B"]
        r = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or B.dim() != 2 or tuple(E.shape) != (r, 1) or B.shape[1] != r:
            raise AdapterFileError(
                f"{source}: module {path!r}: lora_A {shape_str(A.shape)}, lora_E {shape_str(E.shape)}, lora_B "
                f"{shape_str(B.shape)} are not a rank-r triplet ([r, in], [r, 1], [out, r])")
        if not is_target(config, path):
            raise AdapterFileError(
                f"{source}: key {path}.lora_A is for module {path!r}, which adapter_config.json's "
                f"target_modules={config.target_modules!r} does not target")
        want = config.rank_for(path)
        if r != want:
            why = "its rank_pattern mask keeps" if config.mask_for(path) is not None else "init_r is"
            raise AdapterFileError(
                f"{source}: module {path!r} has rank {r} (lora_A {shape_str(A.shape)}) but {why} {want}")
        return make_entry(config, r, bool(config.fan_in_fan_out)), {"lora_A": A, "lora_E": E, "lora_B": B}

    # -- stacking --------------------------------------------------------------------------------
    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        A, E, B = leaves["lora_A"], leaves["lora_E"], leaves["lora_B"]
        extra = r - A.shape[0]
        if extra == 0:
            return dict(leaves)
        return {**leaves, "lora_A": F.pad(A, (0, 0, 0, extra)), "lora_E": F.pad(E, (0, 0, 0, extra)),
                "lora_B": F.pad(B, (0, extra))}

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        return {**leaves, "lora_A": leaves["lora_A"][:r], "lora_E": leaves["lora_E"][:r],
                "lora_B": leaves["lora_B"][:, :r]}

