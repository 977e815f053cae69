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

Convolutions (``nn.Conv1d``, ``nn.Conv2d``; :mod:`adaptfn.methods.lycoris_conv`): ``in`` is ``in_channels /
groups``, ``dW`` is reshaped to the weight [out, in, *k] and added as ``conv(x, dW)`` with the base's geometry.
``w2`` carries the kernel: full ``lokr_w2`` [b, d, *k] when ``r >= max(b, d) / 2``; else, with
``use_effective_conv2d`` and a kernel larger than 1, PEFT's CP form ``lokr_t2`` [r, r, k1, k2] (Conv1d: [r, r, k,
1]), ``lokr_w2_a`` [r, b], ``lokr_w2_b`` [r, d], ``w2 = einsum("ijkl,ip,jr->prkl", t2, w2_a, w2_b)``; else the flat
``lokr_w2_a`` [b, r], ``lokr_w2_b`` [r, d * prod(k)]. ``dW = kron(w1, w2) * alpha / r`` with PEFT's ``torch.kron``
rules (a 4-d ``w2`` meets ``w1`` [a, c, 1, 1]; a 3-d one meets ``w1`` as [1, a, c], as PEFT computes it), then
reshaped to the weight. Entries with factors with kernel axes have kind ``"conv"``, flat ones ``"linear"``.
``route=`` on a convolution runs one grouped convolution with each row's ``dW``. PEFT 0.21.2 has no LoKr for
``nn.Conv3d`` or transformers' ``Conv1D``, nor adaptfn.
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
from .base import ROUTE, SCALE, CallBase, check_bool, is_int, need
from .common import (
    LycorisFamilyConfig,
    adapter_dtype,
    plan_replacements,
    targeted,
)

__all__ = ["LoKrConfig", "LoKr", "factorization", "lokr_shapes", "kron"]

KIND = "linear"
CONV_KIND = "conv"
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


def lokr_shapes(n_out: int, n_in: int, r: int, decompose_both: bool, decompose_factor: int,
                kernel: tuple[int, ...] = (), effective: bool = False) -> dict[str, tuple[int, ...]]:
    """The leaves PEFT creates for an [out, in] weight (a convolution: ``in`` = in_channels / groups, ``kernel`` its
    kernel size, ``effective``: the CP form applies): name -> shape, in PEFT's initialisation order."""
    a, b = factorization(n_out, decompose_factor)
    c, d = factorization(n_in, decompose_factor)
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and r < max(a, c) / 2:
        shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
    else:
        shapes["lokr_w1"] = (a, c)
    if not r < max(b, d) / 2:
        shapes["lokr_w2"] = (b, d, *kernel)
    elif kernel and effective:
        k2 = kernel if len(kernel) == 2 else (kernel[0], 1)
        shapes.update(lokr_w2_a=(r, b), lokr_w2_b=(r, d), lokr_t2=(r, r, *k2))
    else:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
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

    def entry(self, path: str, kind: str = KIND) -> Entry:
        r, alpha = self.rank_and_alpha(path)
        opts = self.dropout_options()
        if self.rank_dropout and self.rank_dropout_scale:
            opts += (("rank_dropout_scale", True),)
        return Entry(kind=kind, r=r, scaling=alpha / r, fan_in_fan_out=False, options=opts)


def kron(w1: torch.Tensor, w2: torch.Tensor, lead: int = 0) -> torch.Tensor:
    """``torch.kron(w1, w2)`` over all but the first ``lead`` axes (those batched: a stack's ``N``); the tensor with
    fewer axes gets leading ones, as torch.kron does. Every entry is one product, so the values are torch.kron's
    exactly."""
    d = max(w1.dim(), w2.dim()) - lead
    s1, s2 = w1.shape[lead:], w2.shape[lead:]
    s1 = (1,) * (d - len(s1)) + tuple(s1)
    s2 = (1,) * (d - len(s2)) + tuple(s2)
    front = tuple(w1.shape[:lead])
    x1 = w1.reshape(*front, *[v for s in s1 for v in (s, 1)])
    x2 = w2.reshape(*tuple(w2.shape[:lead]), *[v for s in s2 for v in (1, s)])
    return (x1 * x2).reshape(*(x1 * x2).shape[:lead], *[p * q for p, q in zip(s1, s2)])


def _factor(leaves: Mapping[str, torch.Tensor], i: int) -> torch.Tensor:
    full = leaves.get(f"lokr_w{i}")
    if full is not None:
        return full
    t = leaves.get(f"lokr_t{i}")
    if t is not None:  # PEFT's CP form: [r, r, k1, k2], [r, b], [r, d] -> [b, d, k1, k2]
        eq = "nijkl,nip,njr->nprkl" if t.dim() == 5 else "ijkl,ip,jr->prkl"
        return torch.einsum(eq, t, leaves[f"lokr_w{i}_a"], leaves[f"lokr_w{i}_b"])
    return leaves[f"lokr_w{i}_a"] @ leaves[f"lokr_w{i}_b"]


def _w1(leaves: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return leaves["lokr_w1"] if "lokr_w1" in leaves else leaves["lokr_w1_a"]


class LoKr:
    """The LoKr method (see the module docstring). Entries of kind ``"linear"`` (flat factors) or ``"conv"``
    (``w2`` with kernel axes), rank ``r``, scaling ``alpha / r``; options: the non-zero dropouts (and
    ``rank_dropout_scale``)."""

    name = "lokr"
    peft_type = "LOKR"
    config_cls = LoKrConfig
    capabilities = frozenset({ROUTE, SCALE})

    # -- planning and init -------------------------------------------------------------------------
    def plan(self, config: LoKrConfig, model: nn.Module) -> tuple[LoKrConfig, dict[str, Entry]]:
        config, found = targeted(config, model)
        entries: dict[str, Entry] = {}
        for path, mod in found:
            if lc.layer_of(mod) is None:
                lc.refuse_layer("LoKr", path, mod)
            e = config.entry(path)
            shapes = self._shapes(config, e, mod)
            if any(len(s) > 2 for s in shapes.values()):
                e = dataclasses.replace(e, kind=CONV_KIND)
            entries[path] = e
        if not entries:
            raise IncompatibleAdapterError(
                f"LoKrConfig.target_modules={config.target_modules!r} matches no module of {type(model).__name__}")
        return config, plan_replacements(config, model, entries)

    @staticmethod
    def _shapes(config: LoKrConfig, entry: Entry, module: nn.Module) -> dict[str, tuple[int, ...]]:
        w = module.weight
        return lokr_shapes(int(w.shape[0]), int(w.shape[1]), entry.r, config.decompose_both, config.decompose_factor,
                           lc.kernel(module), lc.effective_conv(config.use_effective_conv2d, module))

    def init_leaves(self, config: LoKrConfig, path: str, entry: Entry, module: nn.Module,
                    generator: torch.Generator | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """PEFT's shapes (:func:`lokr_shapes`) and initialisation, in its order: ``init_weights=True``: ``w1``
        zeros (decomposed: ``w1_a`` zeros, ``w1_b`` kaiming-uniform), ``w2`` kaiming-uniform; ``"lycoris"``:
        ``w1`` kaiming-uniform, ``w2`` zeros (decomposed: ``w2_b`` zeros, ``w2_a`` kaiming-uniform); False: all
        kaiming-uniform; ``lokr_t2`` (the CP form) kaiming-uniform, last."""
        w = module.weight
        shapes = self._shapes(config, entry, module)
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
        """``dW`` (``kron(w1, w2)``: [out, in] for flat factors, PEFT's shape for the conv forms; stacked: a
        leading ``N``) with the scale, the weight and the gate applied; reshape it to the weight."""
        w1, w2 = _factor(leaves, 1), _factor(leaves, 2)
        lead = w1.dim() - 2
        if w2.dim() - lead == 4:  # PEFT's make_kron: a 4-d w2 meets w1 [a, c, 1, 1]
            w1 = w1[..., None, None]
        dw = kron(w1, w2, lead)
        nd = dw.dim() - lead
        s: Any = leaves[SCALING].detach() if SCALING in leaves else entry.scaling
        if lead and isinstance(s, torch.Tensor) and s.dim() == 1:
            s = s.reshape(-1, *[1] * nd)
        dw = dw * s
        extra = leaves.get(COEF)  # the scale weight and the gate multiply PEFT's delta
        if on is not True:
            extra = on if extra is None else extra * on
        if extra is not None:
            extra = extra.to(dw.dtype)
            dw = dw * (extra.reshape(-1, *[1] * nd) if lead and extra.dim() == 1 else extra)
        return dw

    def forward(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: nn.Module, x: torch.Tensor,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """``base(x) + x @ dW^T`` (``x`` [..., in]; a convolution: ``base(x) + conv(x, dW)``); row ``i`` uses adapter
        ``route[i]``'s ``dW`` when routed."""
        return lc.forward_dense(lambda: self._delta(entry, leaves, on), _w1(leaves).dim() == 3, entry, generator,
                                call_base, module, x, route,
                                normalize=bool(entry.option("rank_dropout_scale", False)), keep_dtype=torch.float32)

    def merge(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"weight": W + dW}``."""
        return lc.merged(tensors, self._delta(entry, leaves, on))

    def off(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``w1`` zeros (``lokr_w1`` or ``lokr_w1_a``): no delta."""
        name = "lokr_w1" if "lokr_w1" in leaves else "lokr_w1_a"
        return {**leaves, name: torch.zeros_like(leaves[name])}

    # -- checks against a model -------------------------------------------------------------------
    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        lc.check_layer("LoKr", path, entry.kind == CONV_KIND, module)
        shape = lc.row_shape(module)
        w1 = leaves.get("lokr_w1")
        a, c = (w1.shape[-2], w1.shape[-1]) if w1 is not None else (leaves["lokr_w1_a"].shape[-2],
                                                                     leaves["lokr_w1_b"].shape[-1])
        lead = 1 if _w1(leaves).dim() == 3 else 0
        if "lokr_w2" in leaves:
            w2s = tuple(leaves["lokr_w2"].shape[lead:])
        elif "lokr_t2" in leaves:
            w2s = (leaves["lokr_w2_a"].shape[-1], leaves["lokr_w2_b"].shape[-1], *leaves["lokr_t2"].shape[-2:])
        else:
            w2s = (leaves["lokr_w2_a"].shape[-2], leaves["lokr_w2_b"].shape[-1])
        b, d, ks = w2s[0], w2s[1], tuple(int(k) for k in w2s[2:])
        k = lc.kernel(module)
        k2 = k if len(k) != 1 else (k[0], 1)
        ok = a * b == shape[0] and c * d * math.prod(ks) == math.prod(shape[1:]) and (
            not ks or (c * d == shape[1] and ks in (k, k2)))
        if not ok:
            shown = ", ".join(f"{n} {shape_str(t.shape)}" for n, t in leaves.items() if n in NAMES + CONV_NAMES)
            raise IncompatibleAdapterError(
                f"module {path!r}: the LoKr factors ({shown}) do not fit {lc.layers.layer_name(module)} with weight "
                f"{shape_str(shape)} (a * b must be out={shape[0]}, c * d the inputs per group, and w2's kernel axes "
                "the kernel)")

    # -- PEFT files ------------------------------------------------------------------------------
    def delta_suffixes(self) -> tuple[str, ...]:
        return NAMES + CONV_NAMES

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's tensors; a scale weight is folded into ``w1`` (``lokr_w1`` or ``lokr_w1_a``)."""
        out = {n: leaves[n] for n in NAMES + CONV_NAMES if n in leaves}
        c = leaves.get(COEF)
        if c is not None:
            name = "lokr_w1" if "lokr_w1" in out else "lokr_w1_a"
            out[name] = out[name] * c.to(out[name].dtype)
        return out

    def from_peft(self, config: LoKrConfig, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
        names = set(found)
        shown = ", ".join(f"{n} {shape_str(t.shape)}" for n, t in sorted(found.items()))
        ok1 = names & {"lokr_w1", "lokr_w1_a", "lokr_w1_b"} in ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
        two = names & {"lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
        ok2 = two in ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}, {"lokr_t2", "lokr_w2_a", "lokr_w2_b"})
        if not (ok1 and ok2):
            raise AdapterFileError(
                f"{source}: module {path!r} has {sorted(found)}; a LoKr module has lokr_w1 or lokr_w1_a + lokr_w1_b, "
                "and lokr_w2, lokr_w2_a + lokr_w2_b or lokr_t2 + lokr_w2_a + lokr_w2_b")
        if not is_target(config, path):
            raise AdapterFileError(
                f"{source}: key {path}.{sorted(found)[0]} is for module {path!r}, which adapter_config.json's "
                f"target_modules={config.target_modules!r} does not target")
        e = config.entry(path)
        w1 = found.get("lokr_w1")
        bad = w1 is not None and w1.dim() != 2
        if "lokr_w1_a" in found:
            fa, fb = found["lokr_w1_a"], found["lokr_w1_b"]
            bad |= fa.dim() != 2 or fb.dim() != 2 or fa.shape[1] != fb.shape[0] or fa.shape[1] != e.r
        if "lokr_t2" in found:
            t, fa, fb = found["lokr_t2"], found["lokr_w2_a"], found["lokr_w2_b"]
            bad |= t.dim() != 4 or tuple(t.shape[:2]) != (e.r, e.r) or fa.dim() != 2 or fb.dim() != 2 or (
                fa.shape[0] != e.r or fb.shape[0] != e.r)
        elif "lokr_w2_a" in found:
            fa, fb = found["lokr_w2_a"], found["lokr_w2_b"]
            bad |= fa.dim() != 2 or fb.dim() != 2 or fa.shape[1] != fb.shape[0] or fa.shape[1] != e.r
        else:
            bad |= found["lokr_w2"].dim() not in (2, 3, 4)
        if bad:
            raise AdapterFileError(
                f"{source}: module {path!r}: {shown} are not PEFT's LoKr factors of rank {e.r} (the config's r / "
                "rank_pattern): w1 [a, c] or [a, r] @ [r, c]; w2 [b, d, *k], [b, r] @ [r, d'] or the CP form "
                "lokr_t2 [r, r, k1, k2], lokr_w2_a [r, b], lokr_w2_b [r, d]")
        if "lokr_t2" in found or found.get("lokr_w2", torch.empty(0, 0)).dim() > 2:
            e = dataclasses.replace(e, kind=CONV_KIND)
        return e, {n: found[n] for n in NAMES + CONV_NAMES if n in found}

    # -- stacking --------------------------------------------------------------------------------
    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        out = dict(leaves)
        extra = r - entry.r
        if extra <= 0:
            return out
        if "lokr_w1_a" in leaves:
            out["lokr_w1_a"] = F.pad(leaves["lokr_w1_a"], (0, extra))
            out["lokr_w1_b"] = F.pad(leaves["lokr_w1_b"], (0, 0, 0, extra))
        if "lokr_t2" in leaves:
            out["lokr_t2"] = F.pad(leaves["lokr_t2"], (0, 0, 0, 0, 0, extra, 0, extra))
            out["lokr_w2_a"] = F.pad(leaves["lokr_w2_a"], (0, 0, 0, extra))
            out["lokr_w2_b"] = F.pad(leaves["lokr_w2_b"], (0, 0, 0, extra))
        elif "lokr_w2_a" in leaves:
            out["lokr_w2_a"] = F.pad(leaves["lokr_w2_a"], (0, extra))
            out["lokr_w2_b"] = F.pad(leaves["lokr_w2_b"], (0, 0, 0, extra))
        return out

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        out = dict(leaves)
        if "lokr_w1_a" in leaves:
            out["lokr_w1_a"] = leaves["lokr_w1_a"][:, :r]
            out["lokr_w1_b"] = leaves["lokr_w1_b"][:r]
        if "lokr_t2" in leaves:
            out["lokr_t2"] = leaves["lokr_t2"][:r, :r]
            out["lokr_w2_a"] = leaves["lokr_w2_a"][:r]
            out["lokr_w2_b"] = leaves["lokr_w2_b"][:r]
        elif "lokr_w2_a" in leaves:
            out["lokr_w2_a"] = leaves["lokr_w2_a"][:, :r]
            out["lokr_w2_b"] = leaves["lokr_w2_b"][:r]
        return out
