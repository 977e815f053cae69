"""PEFT's ``LoraModel.add_weighted_adapter`` for adaptfn's LoRA adapters: the body of :func:`adaptfn.combine`.

What PEFT 0.21 does, and so what this does (per combination type ``how``; ``s_i`` is adapter ``i``'s scaling,
``w_i`` its weight; the new adapter has ``r = lora_alpha = R``, so its scaling is 1):

* ``cat``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]`` (ranks add up:
  ``R = sum_i r_i``, zero-padded where a module has fewer): exactly the weighted sum of the deltas.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the A's and the B's are merged
  separately (:mod:`adaptfn.methods.merging`) with weights ``sign(w_i s_i) sqrt|w_i s_i|`` for A and
  ``sqrt|w_i s_i|`` for B; ``B @ A`` then has cross terms ``B_i A_j``, so it is the weighted sum of the deltas
  only for a single adapter. Every adapter must have the same ``r`` (``R``).
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the deltas
  ``s_i B_i A_i`` are merged as full matrices and factored back by a truncated SVD of rank
  ``R = svd_rank`` (default: the largest ``r``).

Convolutions and ``nn.MultiheadAttention`` (PEFT 0.21's support, checked): ``cat`` and the non-svd merges work on
a convolution's ``lora_A`` [r, in, *k] / ``lora_B`` [out, r, 1, ...] as on a Linear's (``cat`` not for grouped
convolutions: PEFT concatenates their grouped ``lora_B`` as if ungrouped, which is not the weighted sum); the svd
types only on ``nn.Conv2d`` with ``groups=1`` (the delta flattened to [out, in * kh * kw], factors reshaped back;
PEFT fails on Conv1d / Conv3d / grouped ones): the rest raises :class:`IncompatibleAdapterError` naming the module
and its layer kind. An ``nn.MultiheadAttention`` entry is two pairs (in_proj, then out_proj), each combined as a
Linear's, in PEFT's order.

A single adapter always combines with ``linear`` (PEFT does the same). The new config is the first adapter's with
``r = lora_alpha = R`` (so the new scaling is 1; but, as in PEFT, ``R / sqrt(R)`` when the first adapter uses
rsLoRA, whose flag the new config keeps: then every type's result is ``sqrt(R)`` times what is said above), the
union of the ``target_modules`` (a list: the union; regex strings: ``"(t1)|(t2)"``) and empty ``rank_pattern`` /
``alpha_pattern`` (except where a ``linear``-type module's rank differs from ``R``: that module gets its own entry,
so the file reloads as it computes). Modules are visited in the model's order when it is known (``spec.order``,
PEFT's order) or else in natural path order; the dare types draw from ``spec.generator``, or (None) from torch's
global generator exactly as PEFT does, after the draws PEFT's creation of the new adapter's weights makes, so the
same ``torch.manual_seed`` gives PEFT's result bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from .._where import is_target
from ..adapter import GATE, Adapter, Entry, gate_on
from ..errors import ConfigError, IncompatibleAdapterError
from . import layers
from .base import CombineSpec
from .common import dropout_options
from .merging import MERGES, merge_tensors, svd_factors

__all__ = ["SVD_TYPES", "RANDOM_TYPES", "HOWS", "combine_lora", "visit_order", "union_targets", "own_replacements"]

SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
RANDOM_TYPES = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
HOWS = ("cat", *MERGES, *SVD_TYPES)
_SVD_MERGE = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare_linear", "dare_ties_svd": "dare_ties",
              "magnitude_prune_svd": "magnitude_prune"}


def visit_order(paths: Sequence[str], order: Sequence[str] | None) -> list[str]:
    """``paths`` in the model's module order (``order``), or in natural order (numbers compared as numbers)."""
    if order is None:
        def natural(p: str) -> tuple:
            return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in p.split("."))
        return sorted(paths, key=natural)
    index = {p: i for i, p in enumerate(order)}
    missing = [p for p in paths if p not in index]
    if missing:
        raise IncompatibleAdapterError(f"combine: the adapters target {missing[:3]}, which the model does not have")
    return sorted(paths, key=index.__getitem__)


def union_targets(configs: Sequence[Any], field: str = "target_modules") -> Any:
    """PEFT's union of the configs' ``field``: a list -> the sorted union; regex strings -> ``"(t1)|(t2)"``."""
    values = [getattr(c, field) for c in configs]
    if all(v is None for v in values):
        return None
    if all(isinstance(v, str) for v in values):
        return "|".join(f"({v})" for v in values)
    if all(isinstance(v, (list, tuple, set, frozenset)) for v in values):
        return sorted(set().union(*values))
    kinds = sorted({type(v).__name__ for v in values})
    raise ConfigError(f"combine: the adapters' {field} mix a regex str with lists ({kinds}); PEFT cannot combine "
                      f"them either: give every adapter the same kind of {field}")


def own_replacements(adapters: Sequence[Adapter]) -> dict[str, tuple[Entry, dict[str, torch.Tensor]]]:
    """The frozen replacements (PEFT's saved embedding matrices: copies of base tensors) of the adapters, per
    module, from the first adapter that has them; trained replacements raise (PEFT would give the combined
    adapter a fresh copy of the base module instead of a mix of them)."""
    out: dict[str, tuple[Entry, dict[str, torch.Tensor]]] = {}
    for i, a in enumerate(adapters):
        for path, e in a.entry_items:
            trained = [n for n in e.replaced if n not in e.frozen]
            if trained:
                raise IncompatibleAdapterError(
                    f"combine: adapter {i} replaces {path + '.' if path else ''}{trained[0]} (modules_to_save / a "
                    "trained bias); those cannot be mixed (PEFT's add_weighted_adapter gives the combined adapter a "
                    "fresh copy of the base module instead): combine af.select(adapter, <delta modules>)")
            if e.frozen and path not in out:
                leaves = a.leaves(path)
                out[path] = (e, {n: leaves[n] for n in e.frozen})
    return out


def _read_gate(leaves: Any, where: str) -> bool:
    on = gate_on(leaves[GATE])
    if not isinstance(on, bool):
        raise ConfigError(f"{where}: cannot read gates under a transform (vmap/grad/compile); combine outside them")
    return on


# the (A, B) pairs of an entry in its PEFT tensors, by kind: (part, A key, B key, A leaf, B leaf)
_PAIRS = {"embedding": (("", "lora_embedding_A", "lora_embedding_B", "lora_A", "lora_B"),),
          layers.MHA: (("", "lora_A.weight", "lora_B.weight", "lora_A", "lora_B"),
                       ("out", "base_layer.out_proj.lora_A.weight", "base_layer.out_proj.lora_B.weight", "out_lora_A",
                        "out_lora_B"))}
_LINEAR_PAIR = (("", "lora_A.weight", "lora_B.weight", "lora_A", "lora_B"),)


def _pairs(kind: str) -> tuple[tuple[str, str, str, str, str], ...]:
    return _PAIRS.get(kind, _LINEAR_PAIR)


def _views(method: Any, a: Adapter) -> dict[tuple[str, str], tuple[Entry, torch.Tensor, torch.Tensor]]:
    """Per delta module and pair (an nn.MultiheadAttention has two: ``""`` in_proj, ``"out"`` out_proj):
    (entry, A, B) as the adapter's PEFT file holds them (a masked module in its off form, a scale weight folded
    into B), detached and contiguous."""
    out = {}
    for path, e in a.entry_items:
        if not e.kind:
            continue
        leaves = a.leaves(path)
        on = _read_gate(leaves, "combine")
        d = method.to_peft(e, leaves if on else method.off(e, leaves))
        for part, a_key, b_key, _, _ in _pairs(e.kind):
            out[(path, part)] = (e, d[a_key].detach().contiguous(), d[b_key].detach().contiguous())
    return out


def _check_layer(how: str, p: str, kind: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """Refuse what PEFT's add_weighted_adapter cannot do (or does wrong) for a convolution."""
    nd = layers.CONV_KINDS.get(kind)
    if nd is None:
        return
    g = layers.conv_groups(A, B, nd)
    if how == "cat" and g > 1:
        raise IncompatibleAdapterError(
            f"combine: module {p!r} is an nn.Conv{nd}d with groups={g}; how='cat' concatenates the ranks, which for a "
            "grouped lora_B [out, r / groups, 1...] is not the weighted sum of the deltas (PEFT computes it anyway); "
            "use a non-svd merge type ('linear', 'ties', ...)")
    if how in SVD_TYPES and (nd != 2 or g > 1):
        raise IncompatibleAdapterError(
            f"combine: module {p!r} is an nn.Conv{nd}d" + (f" with groups={g}" if g > 1 else "")
            + f"; how={how!r} (an SVD of the delta) is defined for nn.Conv2d with groups=1 only (PEFT 0.21 fails on "
            "this layer); use 'cat' or a non-svd merge type")


def _rank_of(config: Any) -> int:
    """PEFT's per-adapter rank: ``r``, or the largest of ``r`` and ``rank_pattern``'s values."""
    rp = config.rank_pattern or {}
    return max(config.r, *rp.values()) if rp else config.r


def _replay_init(kind: str, r: int, A: torch.Tensor, B: torch.Tensor, init: Any) -> None:
    """Draw from torch's global generator what PEFT's creation of one pair of new LoRA weights (rank ``r``, shaped
    like ``A`` / ``B`` but for the rank) draws (the values are not used: PEFT zeroes them): the layers
    (nn.Linear(in, r), nn.Linear(r, out); convolutions: the conv A and the 1x1 conv B) initialise themselves, then
    PEFT re-initialises A (embeddings: two randn, then B re-drawn)."""
    n_in, n_out = int(A.shape[1]), int(B.shape[0])
    if kind == "embedding":
        torch.randn((r, n_in))
        torch.randn((n_out, r))
        if init:
            torch.empty(n_out, r).normal_()
        return
    nd = layers.CONV_KINDS.get(kind)
    g = layers.conv_groups(A, B, nd) if nd else 1
    a_shape, b_shape = (r, *A.shape[1:]), (n_out, r // g, *B.shape[2:])
    torch.empty(a_shape).uniform_()
    torch.empty(b_shape).uniform_()
    if init is True:
        torch.empty(a_shape).uniform_()
    elif init:
        torch.empty(a_shape).normal_()


def combine_lora(method: Any, adapters: Sequence[Adapter], weights: Sequence[float], spec: CombineSpec) -> Adapter:
    """The combined adapter (see the module docstring); arguments checked by :func:`adaptfn.combine`."""
    how = "linear" if len(adapters) == 1 else spec.how
    configs = [a.config for a in adapters]
    frozen = own_replacements(adapters)
    views = [_views(method, a) for a in adapters]
    ranks = [_rank_of(c) for c in configs]
    if how in MERGES:
        if len(set(ranks)) != 1:
            raise IncompatibleAdapterError(
                f"combine: how={how!r} merges the A's and the B's separately, so every adapter needs the same r; "
                f"got r={ranks} (use how='cat' or an svd type for different ranks)")
        new_rank = ranks[0]
    elif how == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = spec.svd_rank or max(ranks)
    new_config = dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank,
                                     target_modules=union_targets(configs), alpha_pattern={}, rank_pattern={})
    s0 = new_config.scaling(new_rank, new_rank)
    paths = visit_order(sorted({p for v in views for p, _ in v}), spec.order)
    subs: dict[str, list[str]] = {}
    for v in views:
        for p, part in v:
            if part not in subs.setdefault(p, []):
                subs[p].append(part)
    plan = []
    for p, part in [(q, pt) for q in paths for pt in sorted(subs[q])]:
        if not is_target(new_config, p):
            raise IncompatibleAdapterError(
                f"combine: module {p!r} of one adapter is not a target of the combined config (the first adapter's "
                f"config with target_modules={new_config.target_modules!r}: its exclude_modules / "
                "layers_to_transform rule it out; PEFT would drop it silently)")
        parts = [(float(w), *v[(p, part)]) for w, v in zip(weights, views) if (p, part) in v]
        kinds = {e.kind for _, e, _, _ in parts}
        fifs = {e.fan_in_fan_out for _, e, _, _ in parts} - {None}
        if len(kinds) > 1 or len(fifs) > 1:
            raise IncompatibleAdapterError(f"combine: module {p!r} is adapted differently by the adapters "
                                           f"(kinds {sorted(kinds)}, fan_in_fan_out {sorted(fifs)})")
        _, e, A, B = parts[0]
        _check_layer(how, p, e.kind, A, B)
        n_in, n_out = int(A[0].numel()), int(B.shape[0])  # a convolution's: in * prod(kernel)
        if how in SVD_TYPES and new_rank > min(n_in, n_out):
            raise ConfigError(
                f"combine: svd_rank={spec.svd_rank} (None: the largest adapter rank, {max(ranks)}) gives rank "
                f"{new_rank}, above module {p!r}'s dimensions min(out={n_out}, in={n_in}) = {min(n_in, n_out)}; "
                "pass a smaller svd_rank")
        if how in MERGES and len({int(a.shape[0]) for _, _, a, _ in parts}) > 1:
            raise IncompatibleAdapterError(
                f"combine: how={how!r} needs the same rank at each module; module {p!r} has ranks "
                f"{[int(a.shape[0]) for _, _, a, _ in parts]} (use how='cat' or an svd type)")
        plan.append((p, part, e.kind, next(iter(fifs), None), A, B, parts))
    if how in RANDOM_TYPES and spec.generator is None:  # PEFT creates the new adapter's weights first
        for _, _, kind, _, A, B, _ in plan:
            _replay_init(kind, new_rank, A, B, new_config.init_lora_weights)
    entries: dict[str, Entry] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for p, part, kind, fif, A0, B0, parts in plan:
        if how == "cat":
            A_cat = torch.cat([A * w * e.scaling for w, e, A, _ in parts], dim=0)
            B_cat = torch.cat([B for _, _, _, B in parts], dim=1)
            A_new = A_cat.new_zeros(new_rank, *A_cat.shape[1:])
            B_new = B_cat.new_zeros(B_cat.shape[0], new_rank, *B_cat.shape[2:])
            A_new[: A_cat.shape[0]] = A_cat
            B_new[:, : B_cat.shape[1]] = B_cat
        elif how in SVD_TYPES:
            flip = bool(fif) or kind == "embedding"  # PEFT's delta is laid out as the base weight, then flipped back
            if kind == "conv2d":  # PEFT's conv delta (a conv weight), flattened to [out, in * kh * kw]
                deltas = [(layers.conv_delta(A, B, 2) * e.scaling).flatten(1) for _, e, A, B in parts]
            else:
                deltas = [((B @ A).T if flip else B @ A) * e.scaling for _, e, A, B in parts]
            wt = torch.tensor([w for w, _, _, _ in parts]).to(deltas[0].device)
            merged = merge_tensors(_SVD_MERGE[how], deltas, wt, spec.density, spec.majority_sign_method,
                                   spec.generator)
            A_new, B_new = svd_factors(merged.T if flip else merged, new_rank, spec.svd_clamp, spec.svd_full_matrices,
                                       spec.svd_driver)
            if kind == "conv2d":
                A_new, B_new = A_new.reshape(new_rank, *A0.shape[1:]), B_new.reshape(B0.shape[0], new_rank, 1, 1)
        else:
            wa, wb = [], []
            for w, e, _, _ in parts:
                ws = w * e.scaling
                wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
                wb.append(math.sqrt(abs(ws)))
            dev, dt = parts[0][2].device, parts[0][2].dtype
            A_new = merge_tensors(how, [A for _, _, A, _ in parts], torch.tensor(wa).to(dev), spec.density,
                                  spec.majority_sign_method, spec.generator).to(dt)
            B_new = merge_tensors(how, [B for _, _, _, B in parts], torch.tensor(wb).to(dev), spec.density,
                                  spec.majority_sign_method, spec.generator).to(dt)
        r = int(A_new.shape[0])
        alpha = float(new_rank)
        if r != new_rank:  # a module of another rank (rank_pattern in the adapters): keep PEFT's scaling of 1
            key = re.escape(p)
            alpha = s0 * (math.sqrt(r) if new_config.use_rslora else r)
            rank_pattern[key], alpha_pattern[key] = r, alpha
        scaling = s0 if r == new_rank else new_config.scaling(r, alpha)
        a_leaf, b_leaf = next((al, bl) for pt, _, _, al, bl in _pairs(kind) if pt == part)
        if part and p in tensors:  # a module's later pair (nn.MultiheadAttention's out_proj)
            tensors[p][a_leaf], tensors[p][b_leaf] = A_new, B_new
            continue
        entry = Entry(kind=kind, r=r, scaling=scaling, fan_in_fan_out=fif, options=dropout_options(new_config))
        leaves = {a_leaf: A_new, b_leaf: B_new, GATE: torch.ones((), dtype=torch.float32, device=A_new.device)}
        if p in frozen:
            fe, fl = frozen[p]
            entry = dataclasses.replace(entry, replaced=fe.frozen, tied=tuple(n for n in fe.tied if n in fe.frozen),
                                        frozen=fe.frozen)
            leaves.update(fl)
        entries[p], tensors[p] = entry, leaves
    for p, (fe, fl) in frozen.items():  # frozen replacements of modules without a delta (none in PEFT's layouts)
        if p not in entries:
            entries[p] = Entry(replaced=fe.frozen, tied=tuple(n for n in fe.tied if n in fe.frozen), frozen=fe.frozen)
            tensors[p] = {**fl, GATE: torch.ones((), dtype=torch.float32, device=next(iter(fl.values())).device)}
    if rank_pattern:
        new_config = dataclasses.replace(new_config, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return Adapter(method.name, new_config, entries, tensors)
