"""VeRA (vector-based random matrix adaptation): frozen random projections shared by every module, and two
trainable vectors per module:

``y = base(x) + lambda_b * ((lambda_d * (x @ A[:, :in]^T)) @ B[:out, :]^T)``

on ``nn.Linear`` and transformers ``Conv1D`` modules. Leaves: ``vera_lambda_b`` [out], ``vera_lambda_d`` [r], and
the shared projections ``vera_A`` [r, max_in] and ``vera_B`` [max_out, r] (``max_*``: the largest dimensions over
the targeted modules; each module uses their leading slices). Every entry holds the *same* ``vera_A`` / ``vera_B``
tensor objects (no copy), listed in ``Entry.frozen``: read detached (zero gradient), not counted by
``num_parameters``, passed through by ``af.optim``. :func:`adaptfn.stack` keeps a tensor every stacked adapter
shares as one (an expanded view), so a stack of VeRA adapters of one ``projection_prng_key`` holds one copy.

The projections are PEFT's: kaiming-uniform draws from a CPU generator seeded with ``projection_prng_key`` (first
``vera_A``, then ``vera_B``). PEFT's file holds them once, as ``base_model.vera_A`` / ``base_model.vera_B``, when
``save_projection`` (the default); without them, :func:`adaptfn.load` regenerates them from the key as PEFT does,
which needs the model's dimensions: pass ``model=``.

Init (PEFT's): ``lambda_b`` zeros and ``lambda_d`` filled with ``d_initial``; ``init_weights=False``: ``lambda_b``
ones and ``lambda_d`` standard normal. ``vera_dropout`` drops the input of the delta in training (an explicit
generator, as LoRA's dropout).

A scale weight ``w`` (``coef``) multiplies the delta; saved folded into ``vera_lambda_b``. Capabilities: ``route``
(per-row vectors; the projections are gathered per row only when the stacked adapters' differ) and ``scale``; not
``combine`` (PEFT has no ``add_weighted_adapter`` for VeRA). PEFT's mixed-adapter model does not take VeRA.
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
from ..adapter import COEF, GATE, Entry
from ..errors import (
    AdapterFileError,
    ConfigError,
    IncompatibleAdapterError,
    shape_str,
    single_for_route,
    stacked_called_directly,
)
from . import layers
from .base import ROUTE, SCALE, CallBase, PeftConfigBase, check_bool, check_int, is_int, is_real, need
from .common import (
    adapter_dtype,
    check_targeting,
    dropout,
    is_conv1d,
    linear_dims,
    module_path,
    plan_replacements,
    require_targets,
    weight_needs_transpose,
)

__all__ = ["VeraConfig", "Vera", "projections"]

KIND = "linear"
SHARED = ("vera_A", "vera_B")
KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


@dataclasses.dataclass(frozen=True)
class VeraConfig(PeftConfigBase):
    """VeRA config with PEFT's field names and defaults (``peft.VeraConfig``).

    Arguments:
        r: the projections' inner dimension (default 256: VeRA trains only ``r + out`` numbers per module).
        target_modules, layers_to_transform, layers_pattern, modules_to_save: PEFT's targeting rules (nn.Linear
            and transformers Conv1D). projection_prng_key: the seed of the shared projections. save_projection:
            write them into the file (else they are regenerated from the key when loaded). vera_dropout: dropout on
            the delta's input (with an explicit generator). d_initial: ``lambda_d``'s initial value.
            fan_in_fan_out: set from the module type (True for Conv1D). bias: "none", "all" or "vera_only".
            init_weights: True (``lambda_b`` zeros: the base model) or False (random: for tests).

    Example:
        >>> vera = af.init(fn, af.VeraConfig(r=16, target_modules=["q_proj", "fc1"]))
        >>> leaves = vera.leaves("model.decoder.layers.0.self_attn.q_proj")
        >>> {k: list(v.shape) for k, v in leaves.items()}      # fc1 is [37, 22]: max_out 37, max_in 22
        {'vera_lambda_b': [22], 'vera_lambda_d': [16], 'vera_A': [16, 22], 'vera_B': [37, 16], 'gate': []}
        >>> vera.num_parameters() == 2 * (22 + 16) + 2 * (37 + 16)    # the vectors only (2 layers)
        True
    """

    peft_type: ClassVar[str] = "VERA"

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    exclude_modules: ClassVar[None] = None  # PEFT's VeraConfig has no exclude_modules

    def validate(self) -> None:
        cls = type(self)
        check_int(cls, "r", self.r, 1)
        need(is_int(self.projection_prng_key) and 0 <= self.projection_prng_key < 2**64, cls, "projection_prng_key",
             f"must be an int seed in [0, 2**64), got {self.projection_prng_key!r}")
        for name in ("save_projection", "fan_in_fan_out", "init_weights"):
            check_bool(cls, name, getattr(self, name))
        need(is_real(self.vera_dropout) and 0 <= self.vera_dropout < 1, cls, "vera_dropout",
             f"must be a number in [0, 1), got {self.vera_dropout!r}")
        need(is_real(self.d_initial), cls, "d_initial", f"must be a finite number, got {self.d_initial!r}")
        need(self.bias in ("none", "all", "vera_only"), cls, "bias",
             f"must be 'none', 'all' or 'vera_only', got {self.bias!r}")
        check_targeting(self)


_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def projections(key: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's shared projections: ``vera_A`` [r, max_in] then ``vera_B`` [max_out, r], each uniform in
    ``+-sqrt(3) * sqrt(2) / sqrt(fan_in)`` (kaiming-uniform), drawn from a CPU generator seeded with ``key``
    (float32; made once per arguments and shared).

    Example:
        >>> from adaptfn.methods.vera import projections
        >>> A, B = projections(0, 4, 22, 37)
        >>> A.shape, B.shape, projections(0, 4, 22, 37)[0] is A
        (torch.Size([4, 22]), torch.Size([37, 4]), True)
    """
    k = (key, r, max_in, max_out)
    hit = _CACHE.get(k)
    if hit is None:
        g = torch.Generator(device="cpu").manual_seed(key)
        out = []
        for shape in ((r, max_in), (max_out, r)):
            std = math.sqrt(2) / math.sqrt(shape[1])
            bound = math.sqrt(3.0) * std
            out.append(torch.empty(shape).uniform_(-bound, bound, generator=g))
        if len(_CACHE) > 8:
            _CACHE.clear()
        hit = _CACHE[k] = (out[0], out[1])
    return hit


def _entry(config: VeraConfig, fif: bool | None) -> Entry:
    opts = (("dropout", float(config.vera_dropout)),) if config.vera_dropout else ()
    return Entry(kind=KIND, r=config.r, scaling=1.0, fan_in_fan_out=fif, options=opts, frozen=SHARED)


def _max_dims(shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """(max_in, max_out) over the modules' (in, out)."""
    return max(i for i, _ in shapes), max(o for _, o in shapes)


class Vera:
    """The VeRA method (see the module docstring). Entries of kind ``"linear"``, rank ``r``, with ``vera_A`` and
    ``vera_B`` in ``frozen``."""

    name = "vera"
    peft_type = "VERA"
    config_cls = VeraConfig
    capabilities = frozenset({ROUTE, SCALE})

    # -- planning and init -------------------------------------------------------------------------
    def plan(self, config: VeraConfig, model: nn.Module) -> tuple[VeraConfig, dict[str, Entry]]:
        require_targets(config)
        config, found = layers.plan_targets(config, model, "VeRA", {"linear"}, "nn.Linear and transformers Conv1D")
        entries = {path: _entry(config, fif) for path, fif, _ in found}
        return config, plan_replacements(config, model, entries)

    def _shared_for(self, config: VeraConfig, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The projections PEFT makes for ``model``: sized by the largest targeted (in, out)."""
        modules = dict(model.named_modules())
        _, entries = self.plan(config, model)
        dims = [linear_dims(modules[p]) for p, e in entries.items() if e.kind]
        max_in, max_out = _max_dims(dims)
        return projections(config.projection_prng_key, config.r, max_in, max_out)

    def init_leaves(self, config: VeraConfig, path: str, entry: Entry, module: nn.Module,
                    generator: torch.Generator | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """``vera_lambda_b`` zeros and ``vera_lambda_d`` = ``d_initial`` (``init_weights=False``: ones and standard
        normal draws), plus the shared projections (see :func:`adaptfn.init`: set by the adapter's first entry)."""
        w = module.weight
        n_in, n_out = linear_dims(module)
        dt = dtype or adapter_dtype(w)
        kw: dict[str, Any] = dict(dtype=torch.float32, device=w.device)
        if config.init_weights:
            lb, ld = torch.zeros(n_out, **kw), torch.full((config.r,), float(config.d_initial), **kw)
        else:
            lb, ld = torch.ones(n_out, **kw), torch.randn(config.r, generator=generator, **kw)
        return {"vera_lambda_b": lb.to(dt), "vera_lambda_d": ld.to(dt)}

    # -- shared projections (the SharedTensors part of the protocol) ---------------------------------
    def shared_keys(self) -> tuple[str, ...]:
        return tuple(KEYS.values())

    def shared_init(self, config: VeraConfig, model: nn.Module, entries: Mapping[str, Entry],
                    tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """Each delta entry's leaves plus the projections PEFT makes for ``model`` (one tensor object per dtype and
        device, shared by the entries)."""
        A, B = self._shared_for(config, model)
        out: dict[str, dict[str, torch.Tensor]] = {}
        conv: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for p, leaves in tensors.items():
            lb = leaves.get("vera_lambda_b")
            if lb is None:
                out[p] = dict(leaves)
                continue
            k = (lb.dtype, lb.device)
            if k not in conv:
                conv[k] = (A.to(device=lb.device, dtype=lb.dtype), B.to(device=lb.device, dtype=lb.dtype))
            rest = {n: t for n, t in leaves.items() if n != GATE}  # the gate stays last, as in a loaded adapter
            out[p] = {**rest, "vera_A": conv[k][0], "vera_B": conv[k][1],
                      **({GATE: leaves[GATE]} if GATE in leaves else {})}
        return out

    def shared_to_peft(self, config: VeraConfig, entries: Mapping[str, Entry],
                       tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``{"base_model.vera_A": A, "base_model.vera_B": B}`` when ``save_projection`` (else ``{}``); every
        entry must hold the same projections."""
        if not config.save_projection:
            return {}
        out: dict[str, torch.Tensor] = {}
        for name in SHARED:
            ref: torch.Tensor | None = None
            for p, e in entries.items():
                if not e.kind:
                    continue
                t = tensors[p][name]
                if ref is None:
                    ref = t
                elif t is not ref and (t.shape != ref.shape or not torch.equal(t, ref)):
                    raise ConfigError(
                        f"state_dict: VeRA module {p!r} holds another {name} than the others; PEFT's file has one "
                        "shared projection (map every entry's projection the same way, or rebuild the adapter)")
            if ref is not None:
                out[KEYS[name]] = ref
        return out

    def shared_from_peft(self, config: VeraConfig, shared: Mapping[str, torch.Tensor], entries: Mapping[str, Entry],
                         tensors: Mapping[str, Mapping[str, torch.Tensor]], source: str,
                         model: nn.Module | None) -> tuple[dict[str, Entry], dict[str, dict[str, torch.Tensor]]]:
        have = [k for k in KEYS.values() if k in shared]
        if len(have) == 1:
            raise AdapterFileError(f"{source}: has {have[0]} but not its partner "
                                   f"{sorted(set(KEYS.values()) - set(have))}")
        if have:
            A, B = shared[KEYS["vera_A"]], shared[KEYS["vera_B"]]
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != config.r or B.shape[1] != config.r:
                raise AdapterFileError(
                    f"{source}: base_model.vera_A {shape_str(A.shape)} / base_model.vera_B {shape_str(B.shape)} are "
                    f"not [r, max_in] / [max_out, r] with the config's r={config.r}")
            full = {p: {**d, "vera_A": A, "vera_B": B} if "vera_lambda_b" in d else dict(d) for p, d in tensors.items()}
        elif config.save_projection:
            raise AdapterFileError(
                f"{source}: the config says save_projection=True but the file has no base_model.vera_A / vera_B")
        elif model is None:
            raise AdapterFileError(
                f"{source}: this VeRA adapter was saved without its projections (save_projection=False); they are "
                "regenerated from projection_prng_key with the model's dimensions, as PEFT does: pass model= (the "
                "model or the fn of af.functional)")
        else:
            full = self.shared_init(config, model, entries, tensors)
        for p, d in full.items():
            if "vera_A" in d and d["vera_B"].shape[0] < d["vera_lambda_b"].shape[0]:
                raise AdapterFileError(
                    f"{source}: module {p!r}: vera_lambda_b {shape_str(d['vera_lambda_b'].shape)} is longer than the "
                    f"shared vera_B has rows ({shape_str(d['vera_B'].shape)})")
        return dict(entries), full

    # -- compute -----------------------------------------------------------------------------------
    @staticmethod
    def _b(leaves: Mapping[str, torch.Tensor], on: Any, stacked: bool) -> torch.Tensor:
        """``lambda_b`` times the scale weight and the gate ([out], stacked [N, out])."""
        lb = leaves["vera_lambda_b"]
        c = leaves.get(COEF)
        if c is not None:
            lb = lb * (c.to(lb.dtype)[:, None] if stacked and c.dim() == 1 else c.to(lb.dtype))
        if on is not True:
            lb = lb * (on[:, None] if stacked and on.dim() == 1 else on)
        return lb

    def forward(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: nn.Module, x: torch.Tensor,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """``base(x) + lambda_b * ((lambda_d * (x @ A^T)) @ B^T)`` with the projections' leading slices.

        Arguments:
            entry, leaves: this module's entry and ``{"vera_lambda_b": [out], "vera_lambda_d": [r], "vera_A":
                [r, max_in], "vera_B": [max_out, r], "gate": []}`` (stacked: a leading ``N``).
            on: ``True``, or a bool tensor (the gate under a transform). generator: ``vera_dropout`` (None: off).
            call_base, module: the base forward and module. x: the module input [..., in]. route: int64 [batch].
        """
        ld = leaves["vera_lambda_d"]
        if (ld.dim() == 2) != (route is not None):
            raise single_for_route() if route is not None else stacked_called_directly(module_path(module))
        A, B = leaves["vera_A"].detach(), leaves["vera_B"].detach()
        n_in = x.shape[-1]
        out = call_base(x)
        h = dropout(entry, generator, x if x.dtype == ld.dtype else x.to(ld.dtype))
        if route is None:
            lb = self._b(leaves, on, False)
            n_out = lb.shape[-1]
            delta = lb * F.linear(ld * F.linear(h, A[:, :n_in]), B[:n_out, :])
            return (out + delta).to(out.dtype)
        lb = self._b(leaves, on, True)
        n_out = lb.shape[-1]
        bsz = route.shape[0]
        hb = routing.rows_view(h, bsz)  # [bsz, L, in]
        # projections every stacked adapter shares (an expanded stack) are used once, not gathered per row
        if A.stride(0) == 0:
            z = F.linear(hb, A[0, :, :n_in])
        else:
            z = torch.bmm(hb, routing.pick_rows(A[:, :, :n_in], route).transpose(1, 2))
        z = z * routing.pick_rows(ld, route)[:, None, :]
        if B.stride(0) == 0:
            z = F.linear(z, B[0, :n_out, :])
        else:
            z = torch.bmm(z, routing.pick_rows(B[:, :n_out, :], route).transpose(1, 2))
        delta = z * routing.pick_rows(lb, route)[:, None, :]
        return (out + delta.reshape(*out.shape[:-1], n_out)).to(out.dtype)

    def merge(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"weight": W + (lambda_b B) @ (lambda_d A)}`` ([out, in]; transposed for Conv1D's [in, out])."""
        weight = tensors["weight"]
        lb = self._b(leaves, on, False)
        ld = leaves["vera_lambda_d"]
        A, B = leaves["vera_A"].detach(), leaves["vera_B"].detach()
        n_out = lb.shape[-1]
        n_in = weight.numel() // n_out
        delta = (lb[:, None] * B[:n_out, :]) @ (ld[:, None] * A[:, :n_in])
        if weight_needs_transpose(weight.shape, delta.shape, entry.fan_in_fan_out):
            delta = delta.T
        return {"weight": weight + delta.to(weight.dtype)}

    def off(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``vera_lambda_b`` zeros: no delta."""
        return {**leaves, "vera_lambda_b": torch.zeros_like(leaves["vera_lambda_b"])}

    # -- checks against a model -------------------------------------------------------------------
    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise IncompatibleAdapterError(
                f"module {path!r}: the adapter has a VeRA delta but the model has a {type(module).__name__}")
        if "vera_A" not in leaves:
            raise IncompatibleAdapterError(f"module {path!r}: the VeRA entry has no vera_A / vera_B projections")
        n_in, n_out = linear_dims(module)
        lb, ld, A, B = (leaves[n] for n in ("vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B"))
        r = ld.shape[-1]
        if lb.shape[-1] != n_out or A.shape[-1] < n_in or B.shape[-2] < n_out or A.shape[-2] != r or B.shape[-1] != r:
            raise IncompatibleAdapterError(
                f"module {path!r}: vera_lambda_b {shape_str(lb.shape)}, vera_lambda_d {shape_str(ld.shape)}, vera_A "
                f"{shape_str(A.shape)}, vera_B {shape_str(B.shape)} do not fit {type(module).__name__} with "
                f"in={n_in}, out={n_out} (expected [{n_out}], [r], [r, >= {n_in}], [>= {n_out}, r])")

    # -- PEFT files ------------------------------------------------------------------------------
    def delta_suffixes(self) -> tuple[str, ...]:
        return ("vera_lambda_b", "vera_lambda_d")

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-module vectors (the projections go once, by :meth:`shared_to_peft`); a scale weight is folded
        into ``vera_lambda_b``."""
        lb = leaves["vera_lambda_b"]
        c = leaves.get(COEF)
        return {"vera_lambda_b": lb if c is None else lb * c.to(lb.dtype), "vera_lambda_d": leaves["vera_lambda_d"]}

    def from_peft(self, config: VeraConfig, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
        for k in ("vera_lambda_b", "vera_lambda_d"):
            if k not in found:
                raise AdapterFileError(f"{source}: module {path!r} has {sorted(found)} but no {k!r}")
        lb, ld = found["vera_lambda_b"], found["vera_lambda_d"]
        if lb.dim() != 1 or ld.dim() != 1 or ld.shape[0] != config.r:
            raise AdapterFileError(
                f"{source}: module {path!r}: vera_lambda_b {shape_str(lb.shape)} / vera_lambda_d {shape_str(ld.shape)}"
                f" are not [out] / [r] with the config's r={config.r}")
        if not is_target(config, path):
            raise AdapterFileError(
                f"{source}: key {path}.vera_lambda_b is for module {path!r}, which adapter_config.json's "
                f"target_modules={config.target_modules!r} does not target")
        return _entry(config, bool(config.fan_in_fan_out)), {"vera_lambda_b": lb, "vera_lambda_d": ld}

    # -- stacking --------------------------------------------------------------------------------
    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        extra = r - leaves["vera_lambda_d"].shape[0]
        if extra == 0:
            return dict(leaves)
        return {**leaves, "vera_lambda_d": F.pad(leaves["vera_lambda_d"], (0, extra)),
                "vera_A": F.pad(leaves["vera_A"], (0, 0, 0, extra)), "vera_B": F.pad(leaves["vera_B"], (0, extra))}

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        return {**leaves, "vera_lambda_d": leaves["vera_lambda_d"][:r], "vera_A": leaves["vera_A"][:r],
                "vera_B": leaves["vera_B"][:, :r]}

