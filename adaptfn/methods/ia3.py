"""(IA)³: learned vectors that rescale a module's output, or its input for feedforward modules.

For a target Linear / GPT-2 Conv1D with ``in`` inputs and ``out`` outputs:

* an ordinary target: ``y = base(x) * l`` with ``ia3_l`` [out, 1] (PEFT's shape), broadcast over the
  last axis of the output;
* a feedforward target (matched by ``feedforward_modules``): ``y = base(x * l)`` with ``ia3_l`` [1, in].

``nn.Conv2d`` / ``nn.Conv3d`` targets scale channels, with ``ia3_l`` [1, n, 1, 1(, 1)]
(:mod:`adaptfn.methods.ia3_conv`).

Merging folds the vector into the weight (rows for an output vector, columns for an input vector; the
other way round for Conv1D's [in, out] weight) and, for ordinary targets, into the bias too:
``W' = W * l``, ``b' = b * l``. A masked-off entry contributes nothing: the vector is read as ones, so
the module computes its base output bit for bit.

A scale weight ``w`` (the ``coef`` leaf, :func:`adaptfn.scale`) moves the vector between ones (the base) and
``l``: ``l_w = 1 + w (l - 1)``, computed as ``torch.lerp(1, l, w)``, which is exact at both ends (``w = 0``:
ones, the base bit for bit; ``w = 1``: ``l`` itself) and linear in ``w``, so weights compose by products
(``scale(scale(a, u), v) == scale(a, u * v)``). Saving writes ``l_w``. :func:`adaptfn.combine` follows PEFT's
``IA3Model.add_weighted_adapter`` instead (``sum_i w_i l_i``, only ``how="linear"``): when the weights sum to 1
that is ``1 + sum_i w_i (l_i - 1)``, the scaled vectors' deviations from ones added up (injecting several
scaled IA3 adapters together multiplies their vectors instead).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .. import _layout, routing
from .._where import is_target
from ..adapter import COEF, Entry
from ..errors import AdapterFileError, IncompatibleAdapterError, shape_str, single_for_route, stacked_called_directly
from . import layers
from .base import COMBINE, ROUTE, SCALE, CallBase, PeftConfigBase, check_bool, check_names, need
from .common import adapter_dtype, is_conv1d, linear_dims, module_path, plan_replacements, require_targets
from .ia3_combine import combine_ia3
from .ia3_conv import CONV_IA3, IA3_CONV_KINDS

__all__ = ["IA3Config", "IA3", "OUT", "IN"]

OUT, IN = "ia3_out", "ia3_in"


@dataclasses.dataclass(frozen=True)
class IA3Config(PeftConfigBase):
    """(IA)³ config with PEFT's field names and defaults (``peft.IA3Config``).

    Arguments:
        target_modules: list of names/suffixes (a path equal to an entry or ending with ``"." + entry``),
            a regex (``re.fullmatch``) or ``"all-linear"``. Required here (PEFT falls back to a table of
            known architectures; adaptfn asks for it explicitly).
        exclude_modules: same rules, wins over targets.
        feedforward_modules: targets whose *input* is scaled (``ia3_l`` [1, in]); the other targets scale
            their output (``ia3_l`` [out, 1]). PEFT's rule: a str is ``re.fullmatch`` on the path, a list
            entry matches by plain suffix (``path.endswith(entry)``). A list must be a subset of a
            ``target_modules`` list. ``None`` is PEFT's default, but then PEFT picks feedforward modules
            from a per-architecture table; :func:`adaptfn.init` asks for an explicit value (``[]`` for none).
        fan_in_fan_out: base weight stored [in, out] (GPT-2 Conv1D). As PEFT does, :func:`adaptfn.init`
            sets it from the targeted module type (True for Conv1D, False for Linear).
        modules_to_save: modules trained in full (replacements).
        init_ia3_weights: True: vectors start at ones (the adapted model equals the base); False:
            standard normal draws (for tests).

    Example:
        >>> cfg = af.IA3Config(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"])
    """

    peft_type: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def validate(self) -> None:
        cls = type(self)
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            check_names(cls, name, getattr(self, name))
        check_names(cls, "modules_to_save", self.modules_to_save, regex=False)
        check_bool(cls, "fan_in_fan_out", self.fan_in_fan_out)
        check_bool(cls, "init_ia3_weights", self.init_ia3_weights)
        ff, tm = self.feedforward_modules, self.target_modules
        if ff is not None and tm is not None and not isinstance(ff, str) and not isinstance(tm, str):
            # PEFT's check: a set inclusion. Entries that are a suffix of a (full-path) target also pass,
            # so configs saved with expanded "all-linear" targets load back (PEFT itself rejects those).
            targets = set(tm)
            missing = [f for f in ff if f not in targets and not any(t.endswith("." + f) for t in targets)]
            need(not missing, cls, "feedforward_modules",
                 f"must be a subset of target_modules={sorted(targets)!r}; not there: {sorted(missing)!r}")

    def is_feedforward(self, path: str) -> bool:
        """PEFT's rule: a str is ``re.fullmatch`` on ``path``; a list entry matches by plain suffix."""
        ff = self.feedforward_modules
        if not ff:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, path) is not None
        return any(path.endswith(f) for f in ff)


class IA3:
    """The (IA)³ method (see the module docstring). Entries: ``kind`` ``"ia3_out"`` (``ia3_l`` [out, 1])
    or ``"ia3_in"`` (feedforward, ``ia3_l`` [1, in]); ``r`` is 0 (no rank: stacking pads nothing)."""

    name = "ia3"
    peft_type = "IA3"
    config_cls = IA3Config
    capabilities = frozenset({ROUTE, SCALE, COMBINE})

    # -- planning and init -------------------------------------------------------------------------
    def plan(self, config: IA3Config, model: nn.Module) -> tuple[IA3Config, dict[str, Entry]]:
        """Which modules ``config`` targets in ``model``, each with its :class:`Entry`.

        Arguments:
            config: the user's config; ``"all-linear"`` is expanded to module names and ``fan_in_fan_out``
                is set from the module type, as PEFT saves them.
            model: the base model.

        Returns:
            ``(config, entries)``: module path -> Entry, the ``modules_to_save`` replacements included.
        """
        require_targets(config)
        if config.feedforward_modules is None:
            need(False, IA3Config, "feedforward_modules",
                 "is None; PEFT would pick them from a per-architecture table, adaptfn asks you to name them "
                 "([] when no target is a feedforward module)")
        config, found = layers.plan_targets(
            config, model, "IA3", {"linear", *IA3_CONV_KINDS},
            "nn.Linear, transformers Conv1D, nn.Conv2d and nn.Conv3d (PEFT 0.21's IA3 layers)")
        entries = {path: Entry(kind=IN if config.is_feedforward(path) else OUT, r=0, scaling=1.0, fan_in_fan_out=fif,
                               options=() if layer == "linear" else (("layer", layer),))
                   for path, fif, layer in found}
        return config, plan_replacements(config, model, entries)

    def init_leaves(self, config: IA3Config, path: str, entry: Entry, module: nn.Module,
                    generator: torch.Generator | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """``ia3_l``: ones ([out, 1], or [1, in] for feedforward), or standard normal with
        ``init_ia3_weights=False`` (PEFT's draws)."""
        if entry.options:  # a convolution
            return CONV_IA3.init_leaves(config, entry, module, generator, dtype)
        w = module.weight
        n_in, n_out = linear_dims(module)
        shape = (1, n_in) if entry.kind == IN else (n_out, 1)
        if config.init_ia3_weights:
            v = torch.ones(shape, dtype=torch.float32, device=w.device)
        else:
            v = torch.randn(shape, generator=generator, dtype=torch.float32, device=w.device)
        return {"ia3_l": v.to(dtype or adapter_dtype(w))}

    # -- compute -----------------------------------------------------------------------------------
    @staticmethod
    def _vector(leaves: Mapping[str, torch.Tensor], on: Any, module: nn.Module | None = None,
                dims: int = 2) -> torch.Tensor:
        """The flat vector [n], moved toward ones by a scale weight; ones where the gate is off (under
        vmap/grad/compile). ``dims``: a single adapter's ``ia3_l`` dimensions (a convolution's: 4 or 5)."""
        v = leaves["ia3_l"]
        if v.dim() != dims:
            raise stacked_called_directly(None if module is None else module_path(module))
        v = v.flatten()
        c = leaves.get(COEF)
        if c is not None:
            v = torch.lerp(torch.ones_like(v), v, c.to(v.dtype))
        if on is not True:
            v = torch.where(on, v, torch.ones_like(v))
        return v

    def _routed(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, call_base: CallBase,
                x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """Row i of the batch is scaled by adapter ``route[i]``'s vector (-1: by ones, the base exactly)."""
        stack = leaves["ia3_l"]
        if stack.dim() != 3:
            raise single_for_route()
        vs = stack.flatten(1)  # [N, n]
        c = leaves.get(COEF)
        if c is not None:  # [N] scale weights
            vs = torch.lerp(torch.ones_like(vs), vs, c.to(vs.dtype)[:, None])
        if on is not True:
            vs = torch.where(on[:, None], vs, torch.ones_like(vs))
        rows = torch.where((route >= 0)[:, None], vs[route.clamp(min=0)], torch.ones_like(vs[:1]))  # [bsz, n]

        def scale(t: torch.Tensor) -> torch.Tensor:
            tb = routing.rows_view(t.to(rows.dtype), route.shape[0])
            return (tb * rows[:, None, :]).reshape(t.shape)

        if entry.kind == IN:
            return call_base(scale(x).to(x.dtype))
        out = call_base(x)
        return scale(out).to(out.dtype)

    def forward(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: nn.Module, x: torch.Tensor,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """``base(x) * l`` [..., out], or ``base(x * l)`` for a feedforward entry (``x`` [..., in]).

        Arguments:
            entry, leaves: this module's entry and ``{"ia3_l": [out, 1] or [1, in], "gate": []}``.
            on: ``True``, or a bool tensor (the gate under a transform). call_base: the base forward.
            generator, module: unused (no dropout in IA3).
            x: the module input [..., in].
            route: per-row adapter indices into a stacked adapter (see :func:`adaptfn.inject`).

        Returns:
            The module output [..., out], in the base output's dtype.
        """
        if entry.options:  # a convolution
            return CONV_IA3.forward(self, entry, leaves, on, call_base, module, x, route)
        if route is not None:
            return self._routed(entry, leaves, on, call_base, x, route)
        v = self._vector(leaves, on, module)
        if entry.kind == IN:
            prev = x.dtype
            return call_base((x.to(v.dtype) * v).to(prev))
        out = call_base(x)
        return (out * v).to(out.dtype)

    def _axis(self, entry: Entry, w_shape: tuple[int, ...], n: int, weight: torch.Tensor | None = None) -> int:
        """Which axis of the stored weight the vector scales (0 or 1); for a square weight the layout recorded
        from the model (:mod:`adaptfn._layout`), else the entry's ``fan_in_fan_out``."""
        scales_out = entry.kind == OUT
        fits = [ax for ax in (0, 1) if w_shape[ax] == n]
        if not fits:
            raise IncompatibleAdapterError(
                f"ia3_l of length {n} fits no axis of weight {shape_str(w_shape)}")
        if len(fits) == 1:
            return fits[0]
        known = _layout.transposed(weight) if weight is not None else None
        fif = bool(entry.fan_in_fan_out) if known is None else known  # square weight: only the layout tells
        out_axis = 1 if fif else 0
        return out_axis if scales_out else 1 - out_axis

    def merge(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold the vector into the module's weight and, for an output vector, its bias (PEFT's IA3 merge).

        Arguments:
            entry, leaves, on: as in :meth:`forward`.
            tensors: the module's tensors by name (``weight`` [out, in] or Conv1D [in, out],
                ``bias`` [out] when present).

        Returns:
            ``{"weight": W * l}`` plus ``{"bias": b * l}`` for non-feedforward modules with a bias.

        Example:
            >>> ia3 = af.init(fn, af.IA3Config(target_modules=["v_proj", "fc2"], feedforward_modules=["fc2"]))
            >>> merged = af.merge(params, ia3)   # calls this for every IA3 entry
            >>> sorted(k for k in merged if merged[k] is not params[k])[:3]  # v_proj: weight and bias
            ['model.decoder.layers.0.fc2.weight', 'model.decoder.layers.0.self_attn.v_proj.bias',
             'model.decoder.layers.0.self_attn.v_proj.weight']
        """
        if entry.options:  # a convolution
            return CONV_IA3.merge(self, entry, leaves, on, tensors)
        v = self._vector(leaves, on)
        w = tensors["weight"]
        ax = self._axis(entry, tuple(w.shape), v.numel(), w)
        vb = v.reshape(-1, 1) if ax == 0 else v.reshape(1, -1)
        out = {"weight": (w * vb).to(w.dtype)}
        b = tensors.get("bias")
        if entry.kind == OUT and b is not None:
            out["bias"] = (b * v.reshape(b.shape)).to(b.dtype)
        return out

    def off(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Ones: the module's base output (how a masked-off entry is written to a file)."""
        return {**leaves, "ia3_l": torch.ones_like(leaves["ia3_l"])}

    # -- checks against a model -------------------------------------------------------------------
    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        if entry.options:  # a convolution
            return CONV_IA3.check(path, entry, leaves, module)
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise IncompatibleAdapterError(
                f"module {path!r}: the adapter has an IA3 vector for an nn.Linear but the model has a "
                f"{layers.layer_name(module)}")
        n_in, n_out = linear_dims(module)
        v = leaves["ia3_l"]
        want = (1, n_in) if entry.kind == IN else (n_out, 1)
        if tuple(v.shape[-2:]) != want:
            what = "feedforward (input) vector [1, in]" if entry.kind == IN else "output vector [out, 1]"
            raise IncompatibleAdapterError(
                f"module {path!r}: ia3_l {shape_str(v.shape)} does not fit {type(module).__name__} with "
                f"in={n_in}, out={n_out} (expected the {what} {shape_str(want)})")

    # -- PEFT files ------------------------------------------------------------------------------
    def delta_suffixes(self) -> tuple[str, ...]:
        return ("ia3_l",)

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's tensor; a scale weight is folded in (``lerp(1, l, w)``)."""
        v = leaves["ia3_l"]
        c = leaves.get(COEF)
        return {"ia3_l": v if c is None else torch.lerp(torch.ones_like(v), v, c.to(v.dtype))}

    def combine(self, adapters: Any, weights: Any, spec: Any) -> Any:
        """PEFT's ``IA3Model.add_weighted_adapter``: ``l = sum_i w_i l_i`` per module (see :func:`adaptfn.combine`)."""
        return combine_ia3(self, adapters, weights, spec)

    def from_peft(self, config: IA3Config, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
        v = found["ia3_l"]
        if not is_target(config, path):
            raise AdapterFileError(
                f"{source}: key {path}.ia3_l is for module {path!r}, which adapter_config.json's "
                f"target_modules={config.target_modules!r} does not target")
        kind = IN if config.is_feedforward(path) else OUT
        layer = CONV_IA3.file_layer(v, path, source)
        if layer is not None:
            if layer not in IA3_CONV_KINDS:
                raise AdapterFileError(f"{source}: module {path!r}: ia3_l {shape_str(v.shape)} is an nn.Conv"
                                       f"{layer[4]}d's vector, which IA3 does not support")
            return Entry(kind=kind, r=0, scaling=1.0, fan_in_fan_out=False, options=(("layer", layer),)), {"ia3_l": v}
        if v.dim() != 2 or (kind == IN and v.shape[0] != 1) or (kind == OUT and v.shape[1] != 1):
            want = "[1, in] (a feedforward module)" if kind == IN else "[out, 1] (not a feedforward module)"
            raise AdapterFileError(
                f"{source}: module {path!r}: ia3_l is {shape_str(v.shape)} but feedforward_modules="
                f"{config.feedforward_modules!r} makes it {want}")
        return Entry(kind=kind, r=0, scaling=1.0, fan_in_fan_out=bool(config.fan_in_fan_out)), {"ia3_l": v}

    # -- stacking: no rank, nothing to pad ------------------------------------------------------
    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        return dict(leaves)

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        return dict(leaves)

