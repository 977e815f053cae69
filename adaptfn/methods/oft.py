"""OFT (orthogonal finetuning, PEFT 0.21's parameterisation): a block-diagonal rotation ``R`` of the input,
``y = base(x @ R)`` on ``nn.Linear`` modules (merged: ``W' = W @ R^T``), and of the output on ``nn.Embedding``
modules (``y = base(ids) @ R``, merged: ``W' = W @ R``).

Leaves: ``oft_R`` [r, b (b - 1) / 2]: per block, the upper triangle of a skew-symmetric ``Q`` [b, b]; the layer's
``in`` features (an embedding's ``embedding_dim``) are ``r`` blocks of size ``b`` (set one of ``r`` /
``oft_block_size``; a value that does not divide ``in`` is adjusted as PEFT does, with its warning). With
``block_share`` one block ([1, ...]) serves every block. Each block's rotation is the Cayley transform
``R = (I - Q)(I + Q)^-1``, or with ``use_cayley_neumann`` (PEFT's default) its Neumann series
``I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1)`` (``n = num_cayley_neumann_terms``). ``coft`` (constrained OFT)
projects each ``Q`` onto the ball of radius ``eps / sqrt(blocks)`` before use; PEFT overwrites its parameter
with the projection, adaptfn keeps the leaf and uses its projection (the gradient passes straight through, as it
does in PEFT), and PEFT projects a saved leaf on its first forward, so both compute the same. ``module_dropout``
is kept in the config but, as in PEFT 0.21 (which builds the dropout layer and never calls it), has no effect.

A scale weight ``w`` (``coef``) multiplies the generator: ``R(w Q)`` (``w = 0``: the identity, the base model;
``w = 1``: ``R``); saved as ``w * oft_R``. Capabilities: ``route`` (row ``i`` rotated by its adapter's ``R``,
the identity for -1) and ``scale``; not ``combine`` (PEFT has no ``add_weighted_adapter`` for OFT).
Several adapters on one module compose: OFT rotates the input of whatever it wraps (PEFT's mixed-model order:
an OFT added after a LoRA rotates the LoRA's input too).

``nn.Conv2d`` with a 1x1 kernel (``groups=1``, any stride / padding): the input channels are rotated,
``y = base(x rotated over its channel axis)`` (merged: ``W' = W @ R^T`` on the [out, in] view of the weight); an
entry has kind ``"linear"`` there too (PEFT's file does not tell the two apart). PEFT 0.21.2's Conv2d OFT with a
larger kernel is refused (:class:`adaptfn.IncompatibleAdapterError` saying why): its unmerged forward unfolds the
input into overlapping patches, rotates them and sums them back with ``F.fold``, which is not the base model at
``oft_R = 0`` (every pixel is multiplied by the number of patches covering it) and disagrees with its own merge
(which rotates the flattened [out, in * k * k] filters), so no single meaning of the file exists to be computed.
PEFT has no OFT for ``nn.Conv1d``, ``nn.Conv3d`` or transformers' GPT-2 ``Conv1D``, and refuses dilation > 1;
adaptfn refuses them too.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .. import routing
from .._where import is_target
from ..adapter import COEF, Entry
from ..errors import AdapterFileError, IncompatibleAdapterError, shape_str, single_for_route, stacked_called_directly
from . import layers
from .base import ROUTE, SCALE, CallBase, PeftConfigBase, check_bool, check_int, is_real, need
from .common import (
    check_targeting,
    module_path,
    plan_embedding_saves,
    plan_replacements,
    targeted,
)

__all__ = ["OFTConfig", "OFT", "adjust_oft_parameters", "rotation"]

_SUFFIX = {"linear": "oft_R.weight", "embedding": "oft_embedding_R.weight"}


@dataclasses.dataclass(frozen=True)
class OFTConfig(PeftConfigBase):
    """OFT config with PEFT's field names and defaults (``peft.OFTConfig``).

    Arguments:
        r: number of blocks per layer, or 0 to derive it from ``oft_block_size`` (exactly one of the two is
            non-zero). oft_block_size: the block size (default 32). use_cayley_neumann / num_cayley_neumann_terms:
            the Neumann-series Cayley transform and its number of terms (else the exact one, a matrix solve).
            coft / eps: constrained OFT and its radius. block_share: one block shared by all blocks.
            module_dropout: kept for the round trip; no effect (as in PEFT 0.21). target_modules,
            exclude_modules, layers_to_transform, layers_pattern, modules_to_save: PEFT's targeting rules.
            fan_in_fan_out: False (PEFT sets it so for nn.Linear). bias: "none", "all" or "oft_only" (the biases
            of the targeted modules are trained). init_weights: True (``oft_R`` zeros: the identity) or False
            (``N(0, 0.1)``: for tests).

    Example:
        >>> cfg = af.OFTConfig(oft_block_size=11, target_modules=["q_proj", "fc1"], init_weights=False)
        >>> oft = af.init(fn, cfg, generator=torch.Generator().manual_seed(0))
        >>> oft.leaves("model.decoder.layers.0.fc1")["oft_R"].shape          # in=22: 2 blocks of 11
        torch.Size([2, 55])
    """

    peft_type: ClassVar[str] = "OFT"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        cls = type(self)
        check_int(cls, "r", self.r, 0)
        check_int(cls, "oft_block_size", self.oft_block_size, 0)
        need((self.r != 0) != (self.oft_block_size != 0), cls, "r",
             f"set exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) to a non-zero value "
             "(r x oft_block_size == in_features)")
        need(is_real(self.module_dropout) and 0 <= self.module_dropout < 1, cls, "module_dropout",
             f"must be a number in [0, 1), got {self.module_dropout!r}")
        need(self.bias in ("none", "all", "oft_only"), cls, "bias",
             f"must be 'none', 'all' or 'oft_only', got {self.bias!r}")
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            check_bool(cls, name, getattr(self, name))
        need(is_real(self.eps) and self.eps >= 0, cls, "eps", f"must be a finite number >= 0, got {self.eps!r}")
        check_int(cls, "num_cayley_neumann_terms", self.num_cayley_neumann_terms, 0)
        check_targeting(self)

    def options(self, block_size: int) -> tuple[tuple[str, Any], ...]:
        """The static ``Entry.options`` of a module with blocks of ``block_size``."""
        return (("block_size", block_size), ("block_share", self.block_share), ("coft", self.coft),
                ("eps", float(self.eps)), ("neumann", self.num_cayley_neumann_terms if self.use_cayley_neumann else 0))


def adjust_oft_parameters(in_features: int, value: int) -> int:
    """PEFT's replacement for an ``r`` / ``oft_block_size`` that does not divide ``in_features``: the nearest
    divisor (the lower one on a tie), or ``in_features`` when ``value`` exceeds it."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def _skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """[..., b (b - 1) / 2] upper triangles -> skew-symmetric [..., b, b]."""
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    lead = vec.shape[:-1]
    z = vec.new_zeros(b * b, *lead).index_copy(0, rows * b + cols, vec.movedim(-1, 0))
    z = z.movedim(0, -1).reshape(*lead, b, b)
    return z - z.transpose(-1, -2)


def _project(q: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """COFT's projection of each block's ``Q`` (given by its upper triangle ``q`` [..., blocks, n]) onto the
    Frobenius ball of radius ``eps / sqrt(blocks)``; returned as upper triangles again."""
    z = _skew(q, b)
    radius = eps * 1 / torch.sqrt(torch.tensor(q.shape[-2]))
    norm = torch.norm(z, dim=(-2, -1), keepdim=True)
    out = torch.where(norm <= radius, z, radius.to(z.dtype) * (z / norm))
    rows, cols = torch.triu_indices(b, b, 1, device=q.device)
    return out[..., rows, cols]


def rotation(entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any) -> torch.Tensor:
    """The blocks' rotations [..., blocks, b, b] (``blocks`` = 1 with ``block_share``) of one entry, with its scale
    weight and gate applied to the generator (a stacked entry: a leading ``N``)."""
    q = leaves["oft_R"]
    c = leaves.get(COEF)
    stacked = q.dim() == 3
    if c is not None:
        c = c.to(q.dtype)
        q = q * (c[:, None, None] if stacked and c.dim() == 1 else c)
    if on is not True:
        q = q * (on[:, None, None] if stacked and on.dim() == 1 else on)
    b = entry.option("block_size")
    if entry.option("coft"):  # the projection's value, the leaf's gradient (PEFT projects the parameter in place)
        q = _project(q.detach(), b, entry.option("eps")) + (q - q.detach())
    z = _skew(q, b)
    terms = entry.option("neumann")
    eye = torch.eye(b, dtype=z.dtype, device=z.device).expand(z.shape)
    if terms:
        r = eye
        if terms > 1:
            r = torch.add(r, z, alpha=2.0)
            if terms > 2:
                power = z @ z
                r = torch.add(r, power, alpha=2.0)
                for _ in range(3, terms - 1):
                    power = power @ z
                    r = torch.add(r, power, alpha=2.0)
                r = r + power @ z
        return r.contiguous() if r is eye else r
    return torch.linalg.solve(eye + z, eye - z, left=False)


def _rotate(h: torch.Tensor, rot: torch.Tensor, b: int) -> torch.Tensor:
    """``h`` [..., d] times the block-diagonal rotation ``rot`` [blocks, b, b] (one block repeated when shared)."""
    n = h.shape[-1] // b
    if rot.shape[-3] != n:
        rot = rot.expand(n, b, b)
    hr = h.reshape(*h.shape[:-1], n, b)
    return torch.einsum("...rk,rkc->...rc", hr, rot).reshape(h.shape)


def _rotate_rows(h: torch.Tensor, rot: torch.Tensor, b: int, bsz: int) -> torch.Tensor:
    """Per batch row: ``h`` [bsz * k, ..., d], ``rot`` [bsz, blocks, b, b]."""
    hb = routing.rows_view(h, bsz)
    n = hb.shape[-1] // b
    if rot.shape[-3] != n:
        rot = rot.expand(bsz, n, b, b)
    out = torch.einsum("blrk,brkc->blrc", hb.reshape(bsz, hb.shape[1], n, b), rot)
    return out.reshape(h.shape)


def _conv_ok(path: str, mod: nn.Module) -> None:
    """Refuse a Conv2d OFT other than PEFT 0.21.2's well-defined one (1x1, groups=1, dilation 1), saying why."""
    m: Any = mod
    if tuple(m.kernel_size) != (1, 1):
        raise IncompatibleAdapterError(
            f"module {path!r} is a Conv2d with kernel {list(m.kernel_size)}: OFT on a convolution is supported with "
            "a 1x1 kernel only. PEFT 0.21.2's Conv2d OFT with a larger kernel sums overlapping rotated patches in its "
            "unmerged forward (F.fold), which is not the base model at oft_R = 0 and disagrees with its own merge, "
            "so such a file has no single meaning to compute")
    if m.groups != 1 or tuple(m.dilation) != (1, 1):
        raise IncompatibleAdapterError(
            f"module {path!r} is a {layers.layer_name(mod)} with dilation {list(m.dilation)}: OFT needs groups=1 "
            "(PEFT's merge views the weight as [out, in]) and dilation 1 (PEFT refuses dilation > 1)")


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1)


class OFT:
    """The OFT method (see the module docstring). Entries of kind ``"linear"`` or ``"embedding"``; ``r`` is the
    number of rows of ``oft_R`` (blocks, or 1 with ``block_share``); options: the block size and the rotation's
    settings."""

    name = "oft"
    peft_type = "OFT"
    config_cls = OFTConfig
    capabilities = frozenset({ROUTE, SCALE})

    # -- planning and init -------------------------------------------------------------------------
    def plan(self, config: OFTConfig, model: nn.Module) -> tuple[OFTConfig, dict[str, Entry]]:
        config, found = targeted(config, model)
        entries: dict[str, Entry] = {}
        for path, mod in found:
            if isinstance(mod, nn.Embedding):
                kind, n_in = "embedding", mod.embedding_dim
            elif isinstance(mod, nn.Linear):
                kind, n_in = "linear", mod.in_features
            elif isinstance(mod, nn.Conv2d):
                _conv_ok(path, mod)
                kind, n_in = "linear", mod.in_channels
            else:
                raise IncompatibleAdapterError(
                    f"target module {path!r} is a {layers.layer_name(mod)}; OFT supports nn.Linear, nn.Embedding "
                    "and 1x1 nn.Conv2d (PEFT's OFT (0.21.2) has no other layer; check target_modules)")
            r, b = config.r, config.oft_block_size
            if r == 0:
                if n_in % b or b > n_in:
                    b2 = adjust_oft_parameters(n_in, b)
                    warnings.warn(f"OFT: module {path!r}: oft_block_size {b} does not divide in_features {n_in}; "
                                  f"adjusted to {b2} (as PEFT does)", UserWarning, stacklevel=3)
                    b = b2
                r = n_in // b
            else:
                if n_in % r or r > n_in:
                    r2 = adjust_oft_parameters(n_in, r)
                    warnings.warn(f"OFT: module {path!r}: r {r} does not divide in_features {n_in}; adjusted to {r2} "
                                  "(as PEFT does)", UserWarning, stacklevel=3)
                    r = r2
                b = n_in // r
            entries[path] = Entry(kind=kind, r=1 if config.block_share else r, scaling=1.0, fan_in_fan_out=False,
                                  options=config.options(b))
        if not entries:
            raise IncompatibleAdapterError(
                f"OFTConfig.target_modules={config.target_modules!r} matches no module of {type(model).__name__}")
        if config.fan_in_fan_out:
            config = dataclasses.replace(config, fan_in_fan_out=False)  # as PEFT records it for nn.Linear
        entries = plan_embedding_saves(config, model, plan_replacements(config, model, entries))
        return config, entries

    def init_leaves(self, config: OFTConfig, path: str, entry: Entry, module: nn.Module,
                    generator: torch.Generator | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """``oft_R`` [r, b (b - 1) / 2]: zeros (the identity rotation), or ``N(0, 0.1)`` with ``init_weights=False``."""
        w = module.weight
        b = entry.option("block_size")
        q = torch.zeros(entry.r, b * (b - 1) // 2, dtype=torch.float32, device=w.device)
        if not config.init_weights:
            q.normal_(0.0, 0.1, generator=generator)
        dt = dtype or (w.dtype if w.is_floating_point() and w.dtype not in (torch.float16, torch.bfloat16)
                       else torch.float32)
        return {"oft_R": q.to(dt)}

    # -- compute -----------------------------------------------------------------------------------
    def forward(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, generator: Any,
                call_base: CallBase, module: nn.Module, x: torch.Tensor,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """Linear: ``base(x @ R)`` (``x`` [..., in] rotated in blocks); embedding: ``base(ids) @ R``. Routed: row
        ``i`` by adapter ``route[i]``'s ``R`` (-1: not rotated).

        Arguments:
            entry, leaves: this module's entry and ``{"oft_R": [r, n], "gate": []}`` (stacked: a leading ``N``).
            on: ``True``, or a bool tensor (the gate under a transform). generator: unused (see module_dropout).
            call_base, module: the base forward and module. x: the module input. route: int64 [batch] or None.
        """
        q = leaves["oft_R"]
        if (q.dim() == 3) != (route is not None):
            raise single_for_route() if route is not None else stacked_called_directly(module_path(module))
        b = entry.option("block_size")
        rot = rotation(entry, leaves, on)
        if route is not None:
            eye = torch.eye(b, dtype=rot.dtype, device=rot.device)
            rot = routing.pick_rows(rot, route, eye)  # [bsz, blocks, b, b]; -1: the identity

            def turn(h: torch.Tensor) -> torch.Tensor:
                return _rotate_rows(h, rot, b, route.shape[0])
        else:
            def turn(h: torch.Tensor) -> torch.Tensor:
                return _rotate(h, rot, b)
        if entry.kind == "embedding":
            out = call_base(x)
            return turn(out.to(q.dtype)).to(out.dtype)
        if isinstance(module, nn.Conv2d):  # 1x1: rotate the channel axis of [batch, in, H, W]
            return call_base(turn(_channels_last(x.to(q.dtype))).movedim(-1, 1).to(x.dtype))
        return call_base(turn(x.to(q.dtype)).to(x.dtype))

    def merge(self, entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
              tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Linear: ``{"weight": W @ R^T}`` (``R`` the block-diagonal [in, in]); embedding: ``W @ R``."""
        weight = tensors["weight"]
        if weight.dim() == 4:  # a 1x1 Conv2d: its [out, in] view
            return {"weight": self.merge(entry, leaves, on, {"weight": weight.flatten(1)})["weight"].view(weight.shape)}
        rot = rotation(entry, leaves, on)
        dim = weight.shape[-1]
        b = entry.option("block_size")
        if rot.shape[-3] != dim // b:
            rot = rot.expand(dim // b, b, b)
        big = torch.block_diag(*rot.unbind(0))
        if entry.kind == "embedding":
            return {"weight": (weight.to(big.dtype) @ big).to(weight.dtype)}
        return {"weight": (big @ weight.t().to(big.dtype)).t().to(weight.dtype)}

    def off(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``oft_R`` zeros: the identity rotation."""
        return {**leaves, "oft_R": torch.zeros_like(leaves["oft_R"])}

    # -- checks against a model -------------------------------------------------------------------
    def check(self, path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        if entry.kind == "embedding":
            if not isinstance(module, nn.Embedding):
                raise IncompatibleAdapterError(
                    f"module {path!r}: the adapter has an embedding OFT but the model has a {type(module).__name__}")
            dim = module.embedding_dim
        elif isinstance(module, nn.Conv2d):
            _conv_ok(path, module)
            dim = module.in_channels
        else:
            if not isinstance(module, nn.Linear):
                raise IncompatibleAdapterError(
                    f"module {path!r}: the adapter has an OFT rotation for an nn.Linear (or a 1x1 nn.Conv2d) but the "
                    f"model has a {type(module).__name__}")
            dim = module.in_features
        q = leaves["oft_R"]
        b = entry.option("block_size")
        blocks = 1 if entry.option("block_share") else dim // b
        if dim % b or q.shape[-2] != blocks:
            raise IncompatibleAdapterError(
                f"module {path!r}: oft_R {shape_str(q.shape)} holds {q.shape[-2]} block(s) of size {b}, which do not "
                f"fit {type(module).__name__} with {dim} input features"
                + (" (block_share: one block)" if entry.option("block_share") else f" (expected {dim // b} blocks)"))

    # -- PEFT files ------------------------------------------------------------------------------
    def delta_suffixes(self) -> tuple[str, ...]:
        return tuple(_SUFFIX.values())

    def to_peft(self, entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's tensor; a scale weight is folded in (``w * oft_R``)."""
        q = leaves["oft_R"]
        c = leaves.get(COEF)
        return {_SUFFIX[entry.kind]: q if c is None else q * c.to(q.dtype)}

    def from_peft(self, config: OFTConfig, path: str, found: Mapping[str, torch.Tensor],
                  source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
        if len(found) != 1:
            raise AdapterFileError(f"{source}: module {path!r} mixes OFT kinds: {sorted(found)}")
        suffix, q = next(iter(found.items()))
        kind = "embedding" if suffix == _SUFFIX["embedding"] else "linear"
        n = int(q.shape[-1]) if q.dim() == 2 else -1
        b = (1 + math.isqrt(1 + 8 * n)) // 2 if n >= 0 else 0
        if q.dim() != 2 or b * (b - 1) // 2 != n or b < 1:
            raise AdapterFileError(
                f"{source}: module {path!r}: {suffix} {shape_str(q.shape)} is not [blocks, b (b - 1) / 2] "
                "(the upper triangles of skew-symmetric b x b blocks)")
        if config.block_share and q.shape[0] != 1:
            raise AdapterFileError(f"{source}: module {path!r}: {suffix} {shape_str(q.shape)} has {q.shape[0]} blocks "
                                   "but the config shares one block (block_share=True)")
        if not is_target(config, path):
            raise AdapterFileError(
                f"{source}: key {path}.{suffix} is for module {path!r}, which adapter_config.json's "
                f"target_modules={config.target_modules!r} does not target")
        return Entry(kind=kind, r=int(q.shape[0]), scaling=1.0, fan_in_fan_out=False, options=config.options(b)), {
            "oft_R": q}

    # -- stacking: no rank to pad (adapters with other block sizes have other shapes) --------------------
    def pad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        return dict(leaves)

    def unpad(self, entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        return dict(leaves)
