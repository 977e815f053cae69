"""Adapter algebra: ``scale`` (a differentiable weight per entry) and ``combine`` (PEFT's ``add_weighted_adapter``).

``scale(a, w)`` is an adapter whose contribution is ``w`` times ``a``'s. The weight is a leaf of the tree,
``coef`` ([] per entry, [N] in a stack), next to the ``gate``; the two differ on purpose:

* the gate switches an entry on or off: only ``gate != 0`` is read, so its gradient is always zero;
* the weight is a real multiplier: ``torch.func.grad`` with respect to ``w`` (or to the ``coef`` leaves)
  is the true derivative, so mixing weights can be learned.

What "``w`` times" means per method (each method declares the ``"scale"`` capability):

* LoRA / AdaLoRA: the delta is multiplied by ``w``: ``y = base(x) + w * scaling * B A x``; saved with the
  weight folded into ``lora_B`` (AdaLoRA: ``lora_E``), so PEFT computes the same.
* IA3: the vector moves from ones toward ``l``: ``l_w = 1 + w (l - 1)`` (``torch.lerp``, exact at ``w`` = 0
  and 1); saved as ``l_w``.
* DoRA (LoRA with ``use_dora=True``): the delta direction is weighted and the magnitude moves from the base
  weight's norm toward ``m``: ``m_w / ||W + w s B A||_c * (W + w s B A)``, ``m_w = lerp(||W||_c, m, w)`` (exact
  at 0 and 1); PEFT's file cannot hold ``m_w`` without the base weight, so saving a weight other than 1 raises
  (see :mod:`adaptfn.methods.dora`). ``lora_bias``: the bias of ``lora_B`` is weighted with the rest.
* A replacement (``modules_to_save``, a trained bias): ``base + w (replacement - base)`` (``torch.lerp``);
  PEFT's format cannot hold that without the base, so saving one with a weight other than 1 raises.

Identities: ``scale(a, 1)`` computes exactly what ``a`` does (bit for bit: the weight multiplies a rank-r
product, and ``x * 1 == x``); it is *not* ``a`` itself but ``a`` plus ``coef`` leaves of 1, so the tree's
structure never depends on the value of ``w`` (switching weights never recompiles, scaled adapters stack).
``scale(a, 0)`` gives the base model bit for bit (a concrete weight 0 skips the entry, as a gate does).
Weights compose by products: ``scale(scale(a, u), v) == scale(a, u * v)``, for every method.

``combine`` is PEFT's ``add_weighted_adapter`` as a pure function: a new, saveable adapter (LoRA: every
combination type; IA3: ``"linear"``; AdaLoRA: refused, as PEFT does), equal to what PEFT computes for the same
adapters, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._where import matcher
from .adapter import COEF, GATE, Adapter, AdapterSum, StackInfo, coef_dtype
from .errors import ConfigError, IncompatibleAdapterError, shape_str
from .methods import get_method, require
from .methods.base import COMBINE, SCALE, CombineSpec
from .methods.lora_combine import HOWS, SVD_TYPES

__all__ = ["scale", "combine", "HOWS"]

_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd", "dare_ties_svd",
            "magnitude_prune_svd")
_SIGN = ("total", "frequency")
_DRIVERS = ("gesvd", "gesvdj", "gesvda")


# -- scale ------------------------------------------------------------------------------------------------
def _key_matcher(key: Any) -> Any:
    """A ``{where: w}`` key as a predicate (a tuple of paths / suffixes stands for the list ``where``)."""
    return matcher(list(key) if isinstance(key, tuple) else key)


def _concrete(t: torch.Tensor) -> bool:
    return not (torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t))


def _weight(w: Any, n: int | None, dtype: torch.dtype, device: torch.device, arg: str) -> torch.Tensor:
    """A weight as a tensor of shape [] (single) or [n] (a stack of n), in ``dtype`` on ``device``."""
    if isinstance(w, bool) or w is None:
        raise ConfigError(f"scale: {arg} must be a number, a 0-d tensor or (for a stack) [N] weights, got {w!r}")
    if isinstance(w, (int, float)):
        if not math.isfinite(w):
            raise ConfigError(f"scale: {arg}={w!r} is not finite")
        return torch.full(() if n is None else (n,), float(w), dtype=dtype, device=device)
    if isinstance(w, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in w):
        w = torch.tensor([float(v) for v in w], dtype=dtype)
    if not isinstance(w, torch.Tensor):
        raise ConfigError(f"scale: {arg} must be a number, a 0-d tensor or (for a stack) [N] weights, got "
                          f"{type(w).__name__}")
    if not (w.is_floating_point() or w.dtype in (torch.int64, torch.int32)):
        raise ConfigError(f"scale: {arg} must be a real tensor, got dtype {w.dtype}")
    if w.dim() == 1 and n is None:
        raise ConfigError(f"scale: {arg} has shape {shape_str(w.shape)} (one weight per stacked adapter) but the "
                          "adapter is not stacked; give one weight")
    if w.dim() > 1 or (w.dim() == 1 and w.shape[0] != n):
        want = "[]" if n is None else f"[] or [{n}]"
        raise ConfigError(f"scale: {arg} has shape {shape_str(w.shape)}; expected {want}"
                          + (f" (one weight per adapter of the stack of {n})" if n is not None else ""))
    if _concrete(w) and not bool(torch.isfinite(w.detach()).all()):
        raise ConfigError(f"scale: {arg} holds NaN or infinite values: {w.detach().tolist()}")
    w = w.to(device=device, dtype=dtype)
    return w if n is None or w.dim() == 1 else w.expand(n)


def scale(adapter: Any, w: Any) -> Any:
    """An adapter whose contribution is ``w`` times ``adapter``'s; differentiable in ``w``.

    See :mod:`adaptfn.algebra` for what "times" means per method (LoRA / AdaLoRA: the delta times ``w``;
    IA3: ``1 + w (l - 1)``), for the identities and for how a weight differs from a gate.

    Arguments:
        adapter: an :class:`Adapter` (single or stacked) or an :class:`AdapterSum` (each part is scaled). Its
            method must declare the ``"scale"`` capability (LoRA, IA3, AdaLoRA do).
        w: the weight: a float or a 0-d tensor (differentiable: gradients flow to it); for a stacked adapter
            also an [N] tensor (or list), one weight per adapter of the stack; or a mapping ``{where: weight}``
            giving modules their own weights (diffusers' per-block ``set_adapters`` weights): each module takes
            the weight of the first ``where`` that matches it (a regex, a tuple of paths / suffixes, a callable
            ``path -> bool``), modules no key matches keep their weight. NaN / infinite weights, a key that
            matches no module and a wrong shape raise :class:`ConfigError` naming ``w``.

    Returns:
        A new adapter with a ``coef`` leaf on each weighted entry (an existing weight is multiplied by ``w``);
        its other leaves are the same tensor objects.

    Example:
        >>> logits = lambda a: af.inject(fn, a)(params, input_ids=ids).logits
        >>> torch.equal(logits(af.scale(adapter, 1.0)), logits(adapter))        # bit for bit
        True
        >>> torch.equal(logits(af.scale(adapter, 0.0)), fn(params, input_ids=ids).logits)   # the base
        True
        >>> q_half = af.scale(adapter, {r".*q_proj": 0.5})                     # per module
        >>> {p.rsplit(".", 1)[-1]: q_half.leaves(p).get("coef") for p in q_half.paths[:2]}   # v_proj keeps 1
        {'q_proj': tensor(0.5000), 'v_proj': None}
        >>> w = torch.tensor(0.7)
        >>> dw = torch.func.grad(lambda w: logits(af.scale(adapter, w)).square().mean())(w)   # a true derivative
        >>> bool(dw != 0)
        True
    """
    if isinstance(adapter, AdapterSum):  # each part; a {where: w} key must match a module of some part
        parts = adapter.parts
        if isinstance(w, Mapping):
            keys = {k: _key_matcher(k) for k in w}
            for key, keep in keys.items():
                if not any(keep(p) for a in parts.values() for p in a.paths):
                    raise ConfigError(f"scale: w[{key!r}] matches none of the adapters' modules")
            return AdapterSum({n: scale(a, {k: v for k, v in w.items() if any(map(keys[k], a.paths))})
                               for n, a in parts.items()})
        return AdapterSum({n: scale(a, w) for n, a in parts.items()})
    if not isinstance(adapter, Adapter):
        raise ConfigError(f"scale: expected an Adapter or AdapterSum, got {type(adapter).__name__}")
    require(get_method(adapter.method), SCALE, "af.scale", adapter.config)
    if isinstance(w, Mapping):
        rules = []
        for key, value in w.items():
            keep = _key_matcher(key)
            hits = [p for p in adapter.paths if keep(p)]
            if not hits:
                raise ConfigError(f"scale: w[{key!r}] matches none of the adapter's modules (e.g. "
                                  f"{list(adapter.paths)[:3]})")
            rules.append((keep, value, f"w[{key!r}]"))
        per_path = {p: next(((v, arg) for keep, v, arg in rules if keep(p)), None) for p in adapter.paths}
    else:
        per_path = {p: (w, "w") for p in adapter.paths}
    tensors: dict[str, Mapping[str, torch.Tensor]] = {}
    info = adapter.stack_info
    scaled: set[str] = set()
    for p, e in adapter.entry_items:
        leaves = adapter.leaves(p)
        rule = per_path[p]
        if rule is None:
            tensors[p] = leaves
            continue
        if COEF in e.replaced:
            raise ConfigError(f"scale: module {p!r} replaces a tensor named {COEF!r}, the name of the weight leaf")
        gate = leaves[GATE]
        n = int(gate.shape[0]) if gate.dim() == 1 else None  # a stack's gate is [N]; under vmap it looks single
        c = _weight(rule[0], n, coef_dtype(leaves), gate.device, rule[1])
        old = leaves.get(COEF)
        tensors[p] = {**leaves, COEF: c if old is None else old * c}
        scaled.add(p)
    if info is not None and info.leaf_names is not None:  # unstack gives the weight to each adapter with the module
        info = StackInfo(info.configs, info.entries, tuple(
            tuple((p, names + (COEF,) if p in scaled and COEF not in names else names) for p, names in own)
            for own in info.leaf_names))
    return Adapter(adapter.method, adapter.config, dict(adapter.entries), tensors, info)


# -- combine ----------------------------------------------------------------------------------------------
def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def combine(adapters: Any, weights: Any, how: str = "cat", density: float | None = None,
            majority_sign_method: str = "total", svd_rank: int | None = None, svd_clamp: float | None = None,
            svd_full_matrices: bool = True, svd_driver: str | None = None,
            generator: torch.Generator | None = None, *, model: Any = None) -> Adapter:
    """PEFT's ``add_weighted_adapter`` as a pure function: one new adapter from weighted adapters.

    The result equals what PEFT 0.21's ``add_weighted_adapter`` builds from the same adapters (its tensors,
    hence its outputs, bit for bit; its config), and is saved by :func:`adaptfn.save` in PEFT's format. LoRA
    supports every ``how`` (:mod:`adaptfn.methods.lora_combine` says what each computes); IA3 ``"linear"``
    (``sum_i w_i l_i``, PEFT's IA3 rule); AdaLoRA none (PEFT refuses it too). Scaled or masked adapters enter
    as their saved files would (weight folded in, masked modules off).

    Arguments:
        adapters: a non-empty list of single adapters of one method (or a mapping name -> adapter, in order).
            Ranks and target modules may differ where PEFT allows it (``cat`` and the svd types: any ranks;
            the others: one ``r``); the combined adapter targets the union.
        weights: one finite number per adapter (negative weights subtract).
        how: ``"cat"`` (exact: ranks add up), ``"linear"``, ``"svd"``, ``"ties"``, ``"ties_svd"``,
            ``"dare_linear"``, ``"dare_ties"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune"``,
            ``"magnitude_prune_svd"``. A single adapter always combines with ``"linear"``, as in PEFT.
        density: the kept fraction in (0, 1], required by the pruning types (ties, dare, magnitude_prune and
            their svd forms) and refused by the others.
        majority_sign_method: ``"total"`` or ``"frequency"`` (ties types).
        svd_rank: the rank of the svd types' result (default: the largest adapter rank); at most each module's
            ``min(out, in)``. svd_clamp: a quantile in [0, 1] to clip the factors to. svd_full_matrices,
            svd_driver: passed to ``torch.linalg.svd`` (a driver only for CUDA tensors). All svd types only.
        generator: the dare types' random draws come from it (reproducible). None: from torch's global
            generator, in PEFT's order, so ``torch.manual_seed(s)`` before ``af.combine`` and before PEFT's
            ``add_weighted_adapter`` give the same result bit for bit (PEFT's order is the model's module order:
            pass ``model`` when it is not the natural order of the paths, as in OPT's ``k, v, q`` projections).
        model: keyword only, optional: the model (an ``nn.Module`` or the ``fn`` of :func:`adaptfn.functional`)
            whose module order PEFT follows; nothing else of it is read.

    Returns:
        A new single :class:`Adapter` (LoRA: ``r = lora_alpha = R``, so its scaling is 1).

    Raises:
        ConfigError: bad arguments, each naming the argument (weights of the wrong length or not finite, an
            unknown ``how``, ``density`` outside (0, 1] or missing, ``svd_rank`` above a module's dimensions,
            a method without the ``"combine"`` capability). IncompatibleAdapterError: adapters PEFT cannot
            combine either (different methods, ranks for the non-svd merges, trained replacements), saying why.

    Example:
        >>> mix = af.combine([a1, a2], [0.7, 0.3], how="cat")          # ranks 2 + 3
        >>> mix.entries[mix.paths[0]].r, mix.config.lora_alpha
        (5, 5)
        >>> low = af.combine([a1, a2, a3], [0.5, 0.3, 0.2], how="ties_svd", density=0.5, svd_rank=2)
        >>> low.config.r
        2
        >>> _ = af.save(mix, "mixed")                                   # PEFT reloads it with the same outputs
    """
    if isinstance(adapters, Mapping):
        adapters = list(adapters.values())
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise ConfigError(f"combine: adapters must be a non-empty list of adapters, got {adapters!r:.80}")
    for i, a in enumerate(adapters):
        if not isinstance(a, Adapter):
            raise ConfigError(f"combine: adapters[{i}] is a {type(a).__name__}, not an Adapter")
        if a.is_stacked:
            raise ConfigError(f"combine: adapters[{i}] is stacked; combine the adapters of af.unstack(...)")
        if a.method != adapters[0].method:
            raise IncompatibleAdapterError(f"combine: adapters[{i}] is {a.method}, adapters[0] is "
                                           f"{adapters[0].method}; only adapters of one method combine")
    method = get_method(adapters[0].method)
    for a in adapters:  # a variant (DoRA, lora_bias) may lack what its method declares
        require(method, COMBINE, "af.combine", a.config)
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().tolist() if weights.dim() == 1 else weights
    if not isinstance(weights, (list, tuple)):
        raise ConfigError(f"combine: weights must be a list of numbers, one per adapter, got {type(weights).__name__}")
    if len(weights) != len(adapters):
        raise ConfigError(f"combine: weights has {len(weights)} entries for {len(adapters)} adapters")
    ws = []
    for i, w in enumerate(weights):
        if isinstance(w, torch.Tensor) and w.dim() == 0 and not isinstance(w, bool):
            w = w.item()
        if not _is_real(w):
            raise ConfigError(f"combine: weights[{i}]={w!r} is not a finite number")
        ws.append(float(w))
    if how not in HOWS:
        raise ConfigError(f"combine: how={how!r} is not a combination type; use one of {list(HOWS)}")
    if how in _PRUNING:
        if density is None:
            raise ConfigError(f"combine: how={how!r} prunes: pass density, the kept fraction in (0, 1]")
    elif density is not None:
        raise ConfigError(f"combine: density={density!r} is used only by the pruning types {list(_PRUNING)}, not "
                          f"how={how!r}")
    if density is not None and not (_is_real(density) and 0 < density <= 1):
        raise ConfigError(f"combine: density={density!r} must be a number in (0, 1]")
    if majority_sign_method not in _SIGN:
        raise ConfigError(f"combine: majority_sign_method={majority_sign_method!r}; use 'total' or 'frequency'")
    svd = how in SVD_TYPES
    for name, value in (("svd_rank", svd_rank), ("svd_clamp", svd_clamp), ("svd_driver", svd_driver)):
        if value is not None and not svd:
            raise ConfigError(f"combine: {name}={value!r} is used only by the svd types {list(SVD_TYPES)}, not "
                              f"how={how!r}")
    if svd_rank is not None and not (isinstance(svd_rank, int) and not isinstance(svd_rank, bool) and svd_rank >= 1):
        raise ConfigError(f"combine: svd_rank={svd_rank!r} must be a positive int (or None: the largest rank)")
    if svd_clamp is not None and not (_is_real(svd_clamp) and 0 <= svd_clamp <= 1):
        raise ConfigError(f"combine: svd_clamp={svd_clamp!r} must be a quantile in [0, 1] (or None)")
    if not isinstance(svd_full_matrices, bool):
        raise ConfigError(f"combine: svd_full_matrices must be True or False, got {svd_full_matrices!r}")
    if svd_driver is not None:
        if svd_driver not in _DRIVERS:
            raise ConfigError(f"combine: svd_driver={svd_driver!r}; use None or one of {list(_DRIVERS)}")
        cpu = [a for a in adapters if any(t.device.type != "cuda" for d in a.tensors.values() for t in d.values())]
        if cpu:
            raise ConfigError(f"combine: svd_driver={svd_driver!r} needs CUDA tensors (torch.linalg.svd); the "
                              "adapters are not on a CUDA device")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"combine: generator must be a torch.Generator or None, got {type(generator).__name__}")
    order = None
    if model is not None:
        module = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
        if not isinstance(module, nn.Module):
            raise ConfigError(f"combine: model must be an nn.Module or the fn of af.functional, got "
                              f"{type(model).__name__}")
        order = tuple(p for p, _ in module.named_modules(remove_duplicate=False))
    spec = CombineSpec(how=how, density=None if density is None else float(density),
                       majority_sign_method=majority_sign_method, svd_rank=svd_rank,
                       svd_clamp=None if svd_clamp is None else float(svd_clamp), svd_full_matrices=svd_full_matrices,
                       svd_driver=svd_driver, generator=generator, order=order)
    return method.combine(list(adapters), ws, spec)

