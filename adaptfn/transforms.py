"""The pure transforms: ``inject``, ``merge``, ``select``, ``mask``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import _fsdp, _layout, quant, routing
from . import pooling as pool_mod
from ._leaves import check_leaves
from ._where import Where, matcher
from .adapter import COEF, GATE, Adapter, AdapterSum, coef_value, components, gate_on, replace
from .algebra import scale
from .errors import ConfigError, IncompatibleAdapterError
from .functional import FunctionalModel
from .methods import get_method, require, weight_entries, weight_tying
from .methods.base import ROUTE
from .methods.layers import merge_weight_names

__all__ = ["inject", "merge", "select", "mask", "AdapterLike"]

AdapterLike = Adapter | AdapterSum


def inject(fn: FunctionalModel, adapter: AdapterLike | pool_mod.AdapterPool | pool_mod.OffloadedPool, *,
           generator: torch.Generator | None = None,
           route: torch.Tensor | str | None = None) -> FunctionalModel:
    """Return ``fn`` with ``adapter`` applied, unmerged: ``g(params, *args, **kwargs)``.

    Pure: nothing is mutated; the adapter's tensors are inputs of each call, so ``g`` composes with
    ``torch.func.grad`` / ``vmap`` over the adapter and ``torch.compile``. Injecting into an injected
    function adds the new adapter's deltas (as ``select`` with a list does).

    Arguments:
        fn: from :func:`adaptfn.functional` (or another ``inject``).
        adapter: an :class:`Adapter` or :class:`AdapterSum`, checked against the model now; or an adapter
            pool (with ``route=``).
        generator: enables the training dropouts (LoRA's ``lora_dropout``, LoHa / LoKr's ``module_dropout`` and
            ``rank_dropout``, VeRA's ``vera_dropout``), drawing from this generator. None (default): no dropout,
            the deterministic inference forward.
        route: with a stacked adapter (:func:`adaptfn.stack`): a LongTensor [batch], row ``i`` of the batch
            uses adapter ``route[i]`` (-1: the base model alone); the base layers run once for the whole
            batch, only the low-rank part is per row. ``"all"``: every adapter on the same inputs; the
            outputs get a leading adapter axis [N, batch, ...].
            With an adapter pool (:func:`adaptfn.pool`, :class:`adaptfn.OffloadedPool`): a LongTensor [batch]
            of the pool's slots (-1: none); required.

    Returns:
        A :class:`FunctionalModel` ``g`` with ``g.generate`` too.

    Example:
        >>> g = af.inject(fn, adapter)
        >>> out = g(params, input_ids=ids)         # adapter on
        >>> out0 = fn(params, input_ids=ids)       # adapter off: just use fn
    """
    if not isinstance(fn, FunctionalModel):
        raise ConfigError(f"inject: expected a FunctionalModel from af.functional, got {type(fn).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"inject: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if isinstance(adapter, (pool_mod.AdapterPool, pool_mod.OffloadedPool)):
        return pool_mod.inject_pool(fn, adapter, route, generator)
    parts = components(adapter)
    replaced: dict[str, int] = {}
    for a in fn.adapters + parts:
        for path, e in a.entry_items:
            for name in e.replaced:
                full = f"{path}.{name}"
                if full in replaced:
                    raise ConfigError(f"inject: two adapters replace {full!r}; only deltas can add")
                replaced[full] = 1
    for a in parts:
        fn.check(a)
    routes = (None,) * len(parts)
    if isinstance(route, str) and fn.pools:
        raise ConfigError("inject: route='all' repeats the batch once per adapter, but this function has an "
                          "adapter pool whose route names the batch's rows; inject the pool last")
    if route is not None:
        routes = (_check_route(parts, route, fn),)
    return fn.with_adapters(fn.adapters + parts, generator if generator is not None else fn.generator,
                            fn.routes + routes)


def _check_route(parts: tuple[Adapter, ...], route: torch.Tensor | str, fn: FunctionalModel) -> Any:
    if len(parts) != 1 or not parts[0].is_stacked:
        raise ConfigError("route= needs one stacked adapter (af.stack([...])); got "
                          + ("an AdapterSum" if len(parts) != 1 else "an unstacked adapter"))
    a = parts[0]
    for config in (a.stack_info.configs if a.stack_info is not None else (a.config,)):
        require(get_method(a.method), ROUTE, "route=", config)
    replaced = [f"{p}.{n}" for p, e in a.entry_items for n in e.replaced if n not in e.frozen]
    if replaced:
        raise ConfigError(f"route= applies per-row deltas only; this stack replaces tensors ({replaced[:3]}); "
                          "af.select the delta modules first")
    n = a.stack_size  # from the leaves: a sliced stack holds fewer adapters than it was built from
    if isinstance(route, str):
        if route != "all":
            raise ConfigError(f"route: expected a LongTensor[batch] or 'all', got {route!r}")
        if any(r is not None for r in fn.routes):
            raise ConfigError("route='all' repeats the batch once per adapter, so it cannot be combined with "
                              "another routed stack in one function (its route would no longer match the rows)")
        return route
    if any(isinstance(r, str) for r in fn.routes):
        raise ConfigError("route=: this function already has a route='all' stack, which repeats the batch once "
                          "per adapter; a second routed stack's route would not match the rows")
    return routing.check_route(route, n)


def merge(params: Mapping[str, torch.Tensor], adapter: AdapterLike, *,
          dequantize: bool = False) -> dict[str, torch.Tensor]:
    """Fold an adapter into a params dict: ``fn(merge(params, a), x) == inject(fn, a)(params, x)``.

    Pure: returns a new dict; replaced / merged entries are new tensors, every other entry is the same
    tensor object as in ``params``. A replacement that PEFT loads into a tied tensor (``base_layer.*``)
    replaces every name sharing that tensor; other replacements (``modules_to_save``) untie.

    Arguments:
        params: from :func:`adaptfn.functional` (or an earlier merge).
        adapter: an :class:`Adapter` or :class:`AdapterSum` (not stacked).
        dequantize: return every quantized (bitsandbytes) weight of ``params`` as a float tensor with the
            adapter folded in, instead of requantizing the merged ones into new quantized tensors (which
            emits an :class:`adaptfn.quant.RequantizationWarning` with the error); see :mod:`adaptfn.quant`.

    Returns:
        ``dict[str, Tensor]`` with LoRA weights ``W + scaling * B @ A`` (transposed for Conv1D).

    Example:
        >>> merged = af.merge(params, adapter)
        >>> out = fn(merged, input_ids=ids)
    """
    if not isinstance(params, Mapping):
        raise ConfigError(f"merge: params must be a mapping of parameter names to tensors, got {type(params).__name__}")
    parts = components(adapter)
    for a in parts:
        if a.is_stacked:
            raise ConfigError("merge: the adapter is stacked; merge each of af.unstack(...) or vmap over it")
        check_leaves(a, "merge", params)
    out = dict(params)
    qplan = quant.prepare_merge(out, parts, dequantize)  # quantized weights -> float stand-ins
    _merge_replacements(out, params, parts)
    _merge_deltas(out, parts)
    return quant.finish_merge(out, qplan)


def _merge_replacements(out: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                        parts: tuple[Adapter, ...]) -> None:
    """Write each replaced tensor into ``out``: under every name sharing the base tensor when the entry
    replaces it tied (PEFT's ``base_layer.*``), else under its own name only (the copy unties)."""
    for a in parts:
        for path, e in a.entry_items:
            leaves = a.leaves(path)
            on = gate_on(leaves[GATE])
            if on is False:
                continue
            c = leaves.get(COEF)
            cv = coef_value(c)
            if cv == 0.0:  # weight 0: the base tensor
                continue
            if cv == 1.0:
                c = None
            for name in e.replaced:
                full = f"{path}.{name}" if path else name
                if full not in params:
                    raise IncompatibleAdapterError(f"merge: adapter replaces {full!r}, which params does not have")
                base = params[full]
                targets = [k for k, v in params.items() if v is base] if name in e.tied else [full]
                v = leaves[name].to(base.dtype)
                if name in e.frozen:
                    v = v.detach()
                w = c if name not in e.frozen and base.is_floating_point() else None
                for t in targets:
                    vt = v if w is None else torch.lerp(out[t], v, w.to(base.dtype))  # base + w (v - base)
                    out[t] = vt if on is True else torch.where(on, vt, out[t])


def _merge_deltas(out: dict[str, torch.Tensor], parts: tuple[Adapter, ...]) -> None:
    """Fold each delta entry into its module's tensors in ``out`` (the method's ``merge``), in order. A method
    sees the module's current tensors and, as ``base_layer.<name>``, the ones before any delta of this merge
    (DoRA's weight norm is PEFT's: of the unmerged weight). Merged weights keep the layout
    (:mod:`adaptfn._layout`) of those they replace."""
    own: dict[str, list[str]] | None = None  # module path -> its tensor names, built on first use
    before = dict(out)  # the tensors before any delta (replacements and dequantized stand-ins included)
    for a in parts:
        method = get_method(a.method)
        for path, e in a.entry_items:
            if not e.kind:
                continue
            leaves = a.leaves(path)
            on = gate_on(leaves[GATE])
            if on is False or (on is True and coef_value(leaves.get(COEF)) == 0.0):
                continue
            weight_kind = e.kind in getattr(method, "weight_kinds", ())  # LoRA on parameters, trainable tokens
            for name in () if weight_kind else merge_weight_names(e.kind):  # "weight" (MHA: in_proj_weight, ...)
                key = f"{path}.{name}"
                if key not in out:
                    raise IncompatibleAdapterError(f"merge: adapter targets {path!r} but params has no {key!r}")
                if _fsdp.is_dtensor(out[key]):
                    raise IncompatibleAdapterError(
                        f"merge: {key} is sharded by FSDP (a DTensor); merge into the full weights (e.g. "
                        "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options="
                        "StateDictOptions(full_state_dict=True)))")
            if own is None:  # module path -> names of its tensors and of its children's ("out_proj.weight")
                own = {}
                for k in out:
                    mod, _, name = k.rpartition(".")
                    own.setdefault(mod, []).append(name)
                    parent, _, child = mod.rpartition(".")
                    if mod:
                        own.setdefault(parent, []).append(f"{child}.{name}")
            names = own.get(path, ())
            mine = {n: out[f"{path}.{n}"] for n in names}
            mine.update({f"base_layer.{n}": before[f"{path}.{n}"] for n in names})
            try:
                merged = method.merge(e, leaves, on, mine)
            except IncompatibleAdapterError as err:
                raise IncompatibleAdapterError(f"merge: module {path!r}: {err}") from None
            for n, t in merged.items():
                _layout.carry(mine.get(n), t)
                out[f"{path}.{n}"] = t
                if weight_kind:  # a tied input embedding's trained rows reach its tied modules (PEFT's tying)
                    for k in weight_entries.merge_targets(a, path, n, before):
                        out[k] = t
                for k in weight_tying.merge_targets(path, e, n, before):  # ensure_weight_tying: the tied modules
                    out[k] = t


def select(adapters: Any, where: Any) -> Any:
    """Pick adapters by name, or modules of one adapter.

    * ``select(adapters: Mapping[str, Adapter], "a1")`` -> that adapter;
    * ``select(adapters, ["a1", "a2"])`` -> an :class:`AdapterSum` whose deltas add (PEFT multi-active);
    * ``select(adapters, {"a1": 0.7, "a2": 0.3})`` -> an :class:`AdapterSum` of the weighted adapters: the
      weighted sum of their deltas (each part is ``af.scale(adapters[name], weight)``, so a weight may be a
      0-d tensor to differentiate, or a ``{where: weight}`` mapping; a weight that cannot be applied raises);
    * ``select(adapter, where)`` -> the sub-adapter of the modules matching ``where`` (a bool, a regex
      fullmatched on module paths, a list of paths/suffixes, or a callable ``path -> bool``).

    Example:
        >>> attn_only = af.select(adapter, r".*self_attn\\..*")
        >>> mix = af.select(adapters, {"a1": 0.7, "a2": 0.3})     # 0.7 * delta(a1) + 0.3 * delta(a2)
        >>> out = af.inject(fn, mix)(params, input_ids=ids)
    """
    if isinstance(adapters, Mapping) and not isinstance(adapters, (Adapter, AdapterSum)) and isinstance(where, Mapping):
        missing = [n for n in where if not isinstance(n, str) or n not in adapters]
        if missing:
            raise ConfigError(f"select: no adapter named {missing}; have {sorted(adapters)}")
        if not where:
            raise ConfigError("select: empty mapping of adapter names to weights")
        return AdapterSum({n: scale(adapters[n], w) for n, w in where.items()})
    if isinstance(adapters, Mapping) and not isinstance(adapters, (Adapter, AdapterSum)):
        if not isinstance(where, str) and not (isinstance(where, (list, tuple, set, frozenset, Mapping)) and all(
                isinstance(n, str) for n in where)):
            raise ConfigError(f"select: with a mapping of adapters, pick by name (a str) or a list of names; got "
                              f"{where!r}")
        names = [where] if isinstance(where, str) else list(where)
        missing = [n for n in names if n not in adapters]
        if missing:
            raise ConfigError(f"select: no adapter named {missing}; have {sorted(adapters)}")
        if isinstance(where, str):
            return adapters[where]
        if not names:
            raise ConfigError("select: empty list of adapter names")
        return AdapterSum({n: adapters[n] for n in names})
    if isinstance(adapters, AdapterSum):
        return AdapterSum({n: select(a, where) for n, a in adapters.parts.items()})
    if not isinstance(adapters, Adapter):
        raise ConfigError(
            f"select: expected an Adapter, AdapterSum or a mapping of them, got {type(adapters).__name__}")
    keep = matcher(where)
    paths = [p for p in adapters.paths if keep(p)]
    if not paths:
        raise ConfigError(f"select: {where!r} matches none of the adapter's modules (e.g. {list(adapters.paths)[:3]})")
    return replace(
        adapters,
        entries={p: adapters.entries[p] for p in paths},
        tensors={p: adapters.leaves(p) for p in paths},
    )


def mask(adapter: AdapterLike, where: Where) -> Any:
    """Turn off the modules **not** matching ``where``; same structure, shapes and values otherwise.

    A masked module contributes exactly nothing: its delta is skipped (or multiplied by zero under
    vmap/grad/compile) and its replacements give back the base tensor exactly. Its leaves keep their
    values and get zero gradient; only its ``gate`` leaf changes (to 0). ``where=False`` turns all off.

    Example:
        >>> base_like = af.inject(fn, af.mask(adapter, False))   # == fn, bit for bit
    """
    if isinstance(adapter, AdapterSum):
        return AdapterSum({n: mask(a, where) for n, a in adapter.parts.items()})
    if not isinstance(adapter, Adapter):
        raise ConfigError(f"mask: expected an Adapter or AdapterSum, got {type(adapter).__name__}")
    keep = matcher(where)
    tensors = {}
    for p, leaves in adapter.tensors.items():
        if keep(p):
            tensors[p] = leaves
        else:
            tensors[p] = {**leaves, GATE: torch.zeros_like(leaves[GATE])}
    return replace(adapter, tensors=tensors)

