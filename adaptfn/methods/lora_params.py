"""LoRA on ``nn.Parameter``s (PEFT's ``target_parameters``, its ``lora.ParamWrapper``), e.g. the 3-d expert
weights of mixture-of-experts layers, called from :mod:`adaptfn.methods.lora` for entries of kind
:data:`KIND` (``"param"``).

There is no module forward to wrap: the targeted parameter ``W`` is replaced by ``W + s * delta`` for the call,
which is PEFT's computation (it parametrizes the parameter while the module runs). One entry per module holds
every targeted parameter of that module; its leaves are numbered by PEFT's nesting depth, outermost first:

* depth 0 (the parameter registered **last** on the module): ``lora_A`` / ``lora_B``, saved as
  ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``;
* depth ``d`` > 0: ``lora_A_<d>`` / ``lora_B_<d>``, saved as ``<module>.`` + ``base_layer.`` * ``d`` +
  ``lora_A.weight`` (PEFT nests one wrapper per parameter, the first registered innermost).

Shapes (PEFT's), for a parameter of shape:

* ``[out, in]``: ``lora_A`` [r, in], ``lora_B`` [out, r], ``delta = B @ A``;
* ``[E, d1, d2]`` (E experts): ``lora_A`` [r * E, in] and ``lora_B`` [out, r * E] with ``(out, in) = (d1, d2)``,
  or ``(d2, d1)`` when the module has ``is_transposed = True`` (transformers' experts stored [E, in, out]);
  rows of ``A`` are (expert, rank) ordered, columns of ``B`` (rank, expert) ordered, and expert ``e``'s delta
  is ``B[:, k * E + e] @ A[e * r + k]`` summed over ``k`` (transposed back to the parameter's layout).

The scale is ``lora_alpha / r`` (rsLoRA ``/ sqrt(r)``), from ``rank_pattern`` / ``alpha_pattern`` matched against
``<module>.<parameter>``; every parameter of one module must get the same ``(r, alpha)`` here. As in PEFT,
``lora_dropout``, ``fan_in_fan_out``, ``lora_bias`` and ``use_dora`` are refused, and a module cannot be both
a ``target_modules`` target and hold a targeted parameter. A scale weight (:func:`adaptfn.scale`) multiplies the
delta (written into ``lora_B`` when saved). ``route=`` is refused: the delta changes a weight the module's own
forward uses however it likes (an MoE layer's experts see tokens, not batch rows), so it is not per-row
separable in general; stack the adapters and ``torch.func.vmap`` over them instead.

Example:
    >>> from torch import nn
    >>> class Experts(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gate_up = nn.Parameter(torch.randn(3, 14, 11))   # [experts, out, in]
    ...         self.down = nn.Parameter(torch.randn(3, 11, 7))
    ...     def forward(self, x):                                     # x [batch, 11]
    ...         h = torch.einsum("bi,eoi->beo", x, self.gate_up)[..., :7]
    ...         return torch.einsum("beo,eio->bi", h, self.down)
    >>> net = nn.Sequential(nn.Linear(11, 11), Experts())
    >>> fn, params = af.functional(net)
    >>> cfg = af.LoraConfig(r=2, target_modules=["0"], target_parameters=["1.gate_up", "1.down"],
    ...                     init_lora_weights=False)
    >>> a = af.init(fn, cfg, generator=torch.Generator().manual_seed(0))
    >>> {k: list(v.shape) for k, v in af.state_dict(a).items() if ".1." in k}
    ... # doctest: +NORMALIZE_WHITESPACE
    {'base_model.model.1.lora_A.weight': [6, 7], 'base_model.model.1.lora_B.weight': [11, 6],
     'base_model.model.1.base_layer.lora_A.weight': [6, 11], 'base_model.model.1.base_layer.lora_B.weight': [14, 6]}
    >>> x = torch.randn(5, 11)
    >>> torch.allclose(af.inject(fn, a)(params, x), fn(af.merge(params, a), x), atol=1e-4)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import _layout
from .._where import is_target
from ..adapter import COEF, SCALING, Entry
from ..errors import AdapterFileError, ConfigError, IncompatibleAdapterError, shape_str, stacked_called_directly
from . import layers
from .common import adapter_dtype

__all__ = ["KIND", "FIELD", "leaf_names", "peft_suffixes", "matches", "plan", "init_leaves", "delta",
           "updated", "check", "to_peft", "from_peft", "pad", "unpad", "file_suffixes", "validate_config",
           "MAX_DEPTH"]

KIND = "param"
FIELD = "target_parameters"
MAX_DEPTH = 16
"""The deepest PEFT nesting read from a file (parameters targeted on one module)."""
_OPT = "params"  # Entry option: the names of the targeted parameters of the module (sorted)
_EXPERTS = "experts"  # Entry option: the number of experts (1 for a 2-d parameter) per nesting depth


def leaf_names(depth: int) -> tuple[str, str]:
    """The ``(A, B)`` leaf names of nesting depth ``depth`` (0: outermost, the parameter registered last)."""
    return ("lora_A", "lora_B") if depth == 0 else (f"lora_A_{depth}", f"lora_B_{depth}")


def peft_suffixes(depth: int) -> tuple[str, str]:
    """PEFT's key suffixes of nesting depth ``depth``: ``base_layer.`` once per wrapper outside it."""
    mid = "base_layer." * depth
    return f"{mid}lora_A.weight", f"{mid}lora_B.weight"


def file_suffixes() -> tuple[str, ...]:
    """The nested suffixes a file may hold (depth >= 1, deepest first so the longest match wins)."""
    return _FILE_SUFFIXES


_FILE_SUFFIXES = tuple(s for d in range(MAX_DEPTH, 0, -1) for s in peft_suffixes(d))
_NESTED = frozenset(_FILE_SUFFIXES)


def validate_config(cfg: Any) -> None:
    """``target_parameters``: None or a list of parameter names (PEFT refuses a str); and PEFT's refusals of
    the options its ParamWrapper cannot compute."""
    tp = cfg.target_parameters
    cls = type(cfg).__name__
    if tp is None:
        return
    if not (isinstance(tp, (list, tuple, set, frozenset)) and all(isinstance(t, str) and t for t in tp)):
        raise ConfigError(f"{cls}.{FIELD}: must be a list of parameter names (non-empty str) or None, got {tp!r}")
    if not tp:
        return
    for field, bad in (("lora_dropout", cfg.lora_dropout != 0), ("fan_in_fan_out", cfg.fan_in_fan_out),
                       ("lora_bias", cfg.lora_bias), ("use_dora", cfg.use_dora)):
        if bad:
            raise ConfigError(f"{cls}.{field}={getattr(cfg, field)!r} cannot be used with {FIELD} (LoRA on an "
                              f"nn.Parameter: PEFT refuses it too)")


def matches(targets: Sequence[str], module_path: str, name: str) -> bool:
    """PEFT's rule: ``<module>.<name>`` equals a target or ends with ``.<target>``."""
    key = f"{module_path}.{name}"
    return any(key == t or key.endswith("." + t) for t in targets)


def _order(names: Sequence[str], module_names: Sequence[str]) -> list[str]:
    """The targeted names in the module's registration order (PEFT nests them in it: first innermost)."""
    want = set(names)
    return [n for n in module_names if n in want]


def _dims(shape: Sequence[int], transposed: bool) -> tuple[int, int, int]:
    """``(E, in, out)`` of a parameter shape as PEFT reads it."""
    if len(shape) == 2:
        return 1, int(shape[1]), int(shape[0])
    e, d1, d2 = (int(s) for s in shape)
    return (e, d1, d2) if transposed else (e, d2, d1)


def plan(config: Any, model: nn.Module) -> dict[str, Entry]:
    """The ``"param"`` entries of ``config.target_parameters`` in ``model`` (one per module)."""
    targets = list(config.target_parameters or ())
    if not targets:
        return {}
    found: dict[str, list[str]] = {}
    for path, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if p is None or not matches(targets, path, name):
                continue
            if not path:
                raise IncompatibleAdapterError(
                    f"{FIELD}: parameter {name!r} is registered on the top-level module; PEFT cannot target it "
                    "there (it would wrap the module in itself), so adaptfn does not either")
            if is_target(config, path):
                raise IncompatibleAdapterError(
                    f"{FIELD}: module {path!r} holds the targeted parameter {name!r} and is a target_modules target "
                    "too; PEFT refuses that (exclude it from target_modules)")
            if p.dim() not in (2, 3):
                raise IncompatibleAdapterError(
                    f"{FIELD}: parameter {path}.{name} has shape {shape_str(p.shape)}; LoRA on an nn.Parameter "
                    "supports 2-d [out, in] and 3-d [experts, ., .] parameters (as PEFT)")
            found.setdefault(path, []).append(name)
    if not found:
        raise IncompatibleAdapterError(
            f"LoraConfig.{FIELD}={targets!r} matches no parameter of {type(model).__name__} (keys are "
            "'<module path>.<parameter name>', matched as equal or by suffix)")
    modules = dict(model.named_modules())
    out: dict[str, Entry] = {}
    for path, names in found.items():
        mod = modules[path]
        experts = tuple(_dims(mod._parameters[n].shape, False)[0] for n in reversed(names))  # type: ignore[union-attr]
        out[path] = _entry(config, path, names, experts, IncompatibleAdapterError)
    return out


def _entry(config: Any, path: str, names: Sequence[str], experts: tuple[int, ...], err: Any) -> Entry:
    ranks = {n: config.rank_and_alpha(f"{path}.{n}") for n in names}
    if len(set(ranks.values())) != 1:
        raise err(f"{FIELD}: the parameters of module {path!r} get different (r, lora_alpha) from rank_pattern / "
                  f"alpha_pattern ({ranks}); adaptfn needs one rank and alpha per module for LoRA on parameters")
    r, alpha = next(iter(ranks.values()))
    return Entry(kind=KIND, r=r, scaling=config.scaling(r, alpha), fan_in_fan_out=False,
                 options=((_OPT, tuple(sorted(names))), (_EXPERTS, experts)))


def _transposed(module: nn.Module) -> bool:
    return bool(getattr(module, "is_transposed", False))


def init_leaves(config: Any, entry: Entry, module: nn.Module, generator: torch.Generator | None,
                dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """PEFT's init per parameter: ``lora_A`` kaiming-uniform (``"gaussian"``: N(0, 1/r)), ``lora_B`` zeros
    (``init_lora_weights=False``: both kaiming-uniform), in the module's registration order."""
    names = _order(entry.option(_OPT), list(module._parameters))
    out: dict[str, torch.Tensor] = {}
    mode = config.init_lora_weights
    r = entry.r
    for i, name in enumerate(names):
        p: Any = module._parameters[name]
        e, n_in, n_out = _dims(p.shape, _transposed(module))
        A = torch.empty(r * e, n_in, dtype=torch.float32, device=p.device)
        B = torch.empty(n_out, r * e, dtype=torch.float32, device=p.device)
        layers.init_lora_pair(A, B, r, mode, generator)
        dt = dtype or adapter_dtype(p)
        a_name, b_name = leaf_names(len(names) - 1 - i)
        out[a_name], out[b_name] = A.to(dt), B.to(dt)
    return out


def delta(A: torch.Tensor, B: torch.Tensor, shape: Sequence[int], transposed: bool | None) -> torch.Tensor:
    """The unscaled delta of one parameter of ``shape`` (see the module docstring).

    Arguments:
        A: ``lora_A`` [r * E, in]. B: ``lora_B`` [out, r * E]. shape: the parameter's shape, 2-d or 3-d.
        transposed: a 3-d parameter is stored [E, in, out] (the module's ``is_transposed``); None: read from the
            shapes (a square expert weight then raises).

    Returns:
        A tensor of ``shape``.
    """
    if A.dim() != 2:
        raise stacked_called_directly()
    if len(shape) == 2:
        return B @ A
    e, d1, d2 = (int(s) for s in shape)
    n_out, n_in = int(B.shape[0]), int(A.shape[1])
    if transposed is None:
        if d1 == d2:
            raise IncompatibleAdapterError(
                f"the expert weight {shape_str(shape)} is square and its layout is unknown (a params dict not from "
                "af.functional); merge with the params af.functional returned")
        transposed = (n_in, n_out) == (d1, d2)
    r = int(A.shape[0]) // e
    Am = A.reshape(e, r, n_in)
    Bm = B.reshape(n_out, r, e).permute(2, 0, 1)  # [E, out, r]
    d = Bm @ Am  # [E, out, in]
    return d.transpose(-2, -1) if transposed else d


def updated(entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any, tensors: Mapping[str, torch.Tensor],
            module: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """``{name: W + s * delta}`` for every targeted parameter of the module (its current tensors in
    ``tensors``, in registration order), computed in the adapter's dtype and rounded once to ``W``'s; ``s`` is
    the scale times the ``coef`` weight (and times the gate under a transform)."""
    names = _order(entry.option(_OPT), [n for n in tensors if "." not in n])
    s: Any = leaves[SCALING].detach() if SCALING in leaves else entry.scaling
    if on is not True:
        s = s * on
    c = leaves.get(COEF)
    out: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        a_name, b_name = leaf_names(len(names) - 1 - i)
        if a_name not in leaves:
            raise IncompatibleAdapterError(f"the adapter has no {a_name!r} for parameter {name!r} (nesting depth "
                                           f"{len(names) - 1 - i} of {len(names)} targeted parameters)")
        W = tensors[name]
        A, B = leaves[a_name], leaves[b_name]
        known = _transposed(module) if module is not None else _layout.transposed(W)
        d = delta(A, B, tuple(W.shape), known if W.dim() == 3 else False)
        if tuple(d.shape) != tuple(W.shape):
            raise IncompatibleAdapterError(f"parameter {name!r}: delta {shape_str(d.shape)} does not fit "
                                           f"{shape_str(W.shape)}")
        if c is not None:
            d = d * c.to(d.dtype)
        d = d * s
        out[name] = (W + d).to(W.dtype) if W.dtype != d.dtype else W + d
    return out


def check(path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
    """The module holds every targeted parameter, and each leaf pair fits its parameter."""
    names = _order(entry.option(_OPT), [n for n, p in module._parameters.items() if p is not None])
    depths = sum(1 for n in leaves if n == "lora_A" or n.startswith("lora_A_"))
    if len(names) != depths:
        raise IncompatibleAdapterError(
            f"module {path!r}: the adapter has LoRA for {depths} parameter(s) of it but {type(module).__name__} has "
            f"{len(names)} of the targeted {list(entry.option(_OPT))} ({list(module._parameters)})")
    for i, name in enumerate(names):
        p: Any = module._parameters[name]
        a_name, b_name = leaf_names(len(names) - 1 - i)
        A, B = leaves[a_name], leaves[b_name]
        if p.dim() not in (2, 3):
            raise IncompatibleAdapterError(f"module {path!r}: parameter {name!r} is {shape_str(p.shape)}, not 2-d "
                                           "or 3-d")
        e, n_in, n_out = _dims(p.shape, _transposed(module))
        ok = (A.shape[-1] == n_in and B.shape[-2] == n_out and A.shape[-2] == B.shape[-1]
              and A.shape[-2] % e == 0 and A.shape[-2] // e == entry.r)
        if not ok:
            raise IncompatibleAdapterError(
                f"module {path!r}: {a_name} {shape_str(A.shape)} / {b_name} {shape_str(B.shape)} do not fit parameter "
                f"{name!r} {shape_str(p.shape)} (expected [{entry.r} * {e}, {n_in}] / [{n_out}, {entry.r} * {e}])")


def to_peft(entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's tensors by nesting depth; a scale weight is folded into each ``lora_B``."""
    c = leaves.get(COEF)
    out: dict[str, torch.Tensor] = {}
    d = 0
    while leaf_names(d)[0] in leaves:
        a_name, b_name = leaf_names(d)
        a_key, b_key = peft_suffixes(d)
        B = leaves[b_name]
        out[a_key], out[b_key] = leaves[a_name], (B if c is None else B * c.to(B.dtype))
        d += 1
    return out


def from_peft(config: Any, path: str, found: Mapping[str, torch.Tensor],
              source: str) -> tuple[Entry, dict[str, torch.Tensor]] | None:
    """The entry of a module whose keys are LoRA on parameters (None: the module is not one of those)."""
    targets = list(getattr(config, FIELD, None) or ())
    nested = not _NESTED.isdisjoint(found)
    if not targets:
        if nested:
            raise AdapterFileError(f"{source}: module {path!r} has nested keys {sorted(found)} (PEFT's LoRA on "
                                   f"nn.Parameters) but adapter_config.json has no {FIELD}")
        return None
    if not nested and is_target(config, path):
        return None
    names = sorted({t.rpartition(".")[2] for t in targets if matches([t], path, t.rpartition(".")[2])})
    if not names:
        if nested:
            raise AdapterFileError(f"{source}: module {path!r} has nested LoRA keys but {FIELD}={targets!r} names "
                                   "no parameter of it")
        return None
    leaves: dict[str, torch.Tensor] = {}
    depth = 0
    while True:
        a_key, b_key = peft_suffixes(depth)
        if a_key not in found and b_key not in found:
            break
        if a_key not in found or b_key not in found:
            raise AdapterFileError(f"{source}: module {path!r} has {sorted(found)}: {a_key!r} and {b_key!r} come "
                                   "in pairs")
        A, B = found[a_key], found[b_key]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterFileError(f"{source}: module {path!r}: {a_key} {shape_str(A.shape)} and {b_key} "
                                   f"{shape_str(B.shape)} are not a pair [r * experts, in] / [out, r * experts]")
        a_name, b_name = leaf_names(depth)
        leaves[a_name], leaves[b_name] = A, B
        depth += 1
    extra = sorted(set(found) - {k for d in range(depth) for k in peft_suffixes(d)})
    if extra or depth == 0:
        raise AdapterFileError(f"{source}: module {path!r} has {sorted(found)}: not LoRA on parameters (expected "
                               "lora_A.weight / lora_B.weight, base_layer.-nested once per further parameter)")
    if depth > len(names):
        raise AdapterFileError(f"{source}: module {path!r} has LoRA for {depth} parameters but {FIELD}={targets!r} "
                               f"names only {names} on it")
    rows = [int(leaves[leaf_names(d)[0]].shape[0]) for d in range(depth)]
    # a target without a module part ("mix") names a parameter of every module: keep the candidates whose rank
    # fits the file's rows (the model decides at inject which of them the module has)
    fits = [n for n in names if not any(k % config.rank_and_alpha(f"{path}.{n}")[0] for k in rows)]
    if not fits:
        raise AdapterFileError(f"{source}: module {path!r}: lora_A rows {rows} are not multiples of the rank "
                               f"r / rank_pattern give its targeted parameters {names}")
    r = config.rank_and_alpha(f"{path}.{fits[0]}")[0]
    entry = _entry(config, path, fits, tuple(n // r for n in rows), lambda m: AdapterFileError(f"{source}: {m}"))
    return entry, leaves


def _resize(entry: Entry, leaves: Mapping[str, torch.Tensor], r_from: int, r_to: int) -> dict[str, torch.Tensor]:
    """Each pair's rank from ``r_from`` to ``r_to`` per expert (zero-padded, or cut): rows of A are (expert,
    rank) ordered, columns of B (rank, expert) ordered."""
    out = dict(leaves)
    for d, e in enumerate(entry.option(_EXPERTS, ())):
        a_name, b_name = leaf_names(d)
        A, B = leaves[a_name], leaves[b_name]
        Ar, Br = A.reshape(e, r_from, A.shape[-1]), B.reshape(B.shape[0], r_from, e)
        if r_to > r_from:
            Ar = torch.cat([Ar, Ar.new_zeros(e, r_to - r_from, A.shape[-1])], 1)
            Br = torch.cat([Br, Br.new_zeros(B.shape[0], r_to - r_from, e)], 1)
        else:
            Ar, Br = Ar[:, :r_to], Br[:, :r_to]
        out[a_name], out[b_name] = Ar.reshape(e * r_to, A.shape[-1]), Br.reshape(B.shape[0], r_to * e)
    return out


def pad(entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """Zero-pad every pair's rank to ``r`` (per expert)."""
    return dict(leaves) if r == entry.r else _resize(entry, leaves, entry.r, r)


def unpad(entry: Entry, leaves: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """Undo :func:`pad`: keep the first ``r`` ranks of each expert (the padded rank is read from the leaves)."""
    e0 = entry.option(_EXPERTS, (1,))[0]
    rp = int(leaves["lora_A"].shape[-2]) // e0
    return dict(leaves) if rp == r else _resize(entry, leaves, rp, r)
