"""``stack`` / ``unstack``: many adapters of one method as one adapter with a leading axis ``N``.

A stacked adapter carries a leading axis ``N`` on every leaf, ranks zero-padded to the largest (the
method's ``pad``), plus a ``scaling`` leaf [N] per delta entry (each adapter's own scale), and a static
:class:`adaptfn.adapter.StackInfo` recording the adapters it was made of. Whether an adapter is stacked
is read from leaf shapes, so under ``torch.func.vmap`` a stacked adapter's leaves look like a single one.

Adapters may target different modules: the stack holds the union of their modules. Where an adapter lacks
a module, its slice of that module's leaves is zeros and its ``gate`` is 0 (gates are per entry and
adapter: a stacked gate is [N]), so it contributes exactly nothing there, under ``vmap``, ``grad`` and
``route=`` alike; the zeros are padding, as rank padding is, and cost what padding costs. Scale weights
(``coef`` leaves, :func:`adaptfn.scale`) stack too: an adapter without one gets 1 (0 where it lacks the
module). :func:`unstack` gives back each adapter's own modules, entries and leaves. A frozen leaf
(``Entry.frozen``) that every adapter holds as the same tensor object (VeRA's shared projections) is stacked as
an expanded view of that one tensor (no copies).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence

import torch

from .adapter import COEF, GATE, SCALING, Adapter, Entry, StackInfo, coef_dtype
from .errors import ConfigError, IncompatibleAdapterError, shape_str
from .methods import get_method

__all__ = ["stack", "unstack"]


def stack(adapters: Sequence[Adapter]) -> Adapter:
    """Stack adapters of one method into one with a leading axis ``N`` on every leaf.

    Ranks are zero-padded to the largest (the padding contributes exactly nothing); each delta entry
    gets a ``scaling`` leaf [N], so adapters with different ranks and alphas stack. Targets may differ:
    the stack holds the union of the modules, and an adapter contributes exactly zero at a module it
    lacks (zero leaves, gate 0 for it). Adapters of different methods (LoRA with IA3) do not stack: inject
    them together as an :class:`adaptfn.AdapterSum` instead.

    Arguments:
        adapters: a non-empty sequence of single (unstacked) adapters of one method. Where two of them
            have the same module, they must agree on its kind (linear / embedding / ...) and on which
            tensors it replaces.

    Returns:
        A stacked :class:`Adapter`; ``af.unstack`` gives the originals back (same paths, entries, leaves).

    Example:
        >>> stacked = af.stack([a1, a2, a3])                  # ranks 2, 3, 4: padded to 4
        >>> stacked.stack_size, stacked.leaves(stacked.paths[0])["lora_A"].shape   # [N, r, in]
        (3, torch.Size([3, 4, 22]))
        >>> outs = torch.func.vmap(lambda a: af.inject(fn, a)(params, input_ids=ids).logits)(stacked)
        >>> outs.shape                                         # [N, batch, seq, vocab]
        torch.Size([3, 2, 7, 61])

        Different targets stack as the union; a module an adapter lacks is off for it:

        >>> q_only = af.select(a1, r".*q_proj")
        >>> mixed = af.stack([q_only, a2])
        >>> len(q_only.paths), len(mixed.paths), mixed.leaves("model.decoder.layers.0.self_attn.v_proj")["gate"]
        (2, 4, tensor([0., 1.]))
        >>> [len(a.paths) for a in af.unstack(mixed)]
        [2, 4]
    """
    if isinstance(adapters, (Adapter, str, bytes)) or not isinstance(adapters, Iterable):
        raise ConfigError(f"stack: expected a list of adapters, got {type(adapters).__name__}")
    adapters = list(adapters)
    if not adapters:
        raise ConfigError("stack: needs at least one adapter")
    for i, a in enumerate(adapters):
        if not isinstance(a, Adapter):
            raise ConfigError(f"stack: item {i} is a {type(a).__name__}, not an Adapter")
        if a.is_stacked:
            raise ConfigError(f"stack: item {i} is already stacked; unstack it first")
    first = adapters[0]
    for i, a in enumerate(adapters):
        if a.method != first.method:
            raise IncompatibleAdapterError(
                f"stack: item {i} is {a.method}, item 0 is {first.method}; a stack holds one method (inject "
                "adapters of different methods together as an AdapterSum: af.select({...}, [names]))")
    method = get_method(first.method)
    paths = sorted({p for a in adapters for p in a.paths})
    entries: dict[str, Entry] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for p in paths:
        have = [i for i, a in enumerate(adapters) if p in a.entries]
        i0 = have[0]
        e0 = adapters[i0].entries[p]
        for i in have[1:]:
            e = adapters[i].entries[p]
            if (e.kind, e.replaced, e.tied, e.frozen) != (e0.kind, e0.replaced, e0.tied, e0.frozen):
                raise IncompatibleAdapterError(
                    f"stack: module {p!r} differs between item {i0} ({e0.kind or 'replacement'} {e0.replaced}) "
                    f"and item {i} ({e.kind or 'replacement'} {e.replaced})")
        r = max(adapters[i].entries[p].r for i in have)
        fif = {adapters[i].entries[p].fan_in_fan_out for i in have} - {None}
        # files disagree (PEFT writes one flag per adapter): the layout is then the model's (adaptfn._layout)
        entries[p] = dataclasses.replace(e0, r=r, fan_in_fan_out=next(iter(fif)) if len(fif) == 1 else None)
        padded: dict[int, dict[str, torch.Tensor]] = {
            i: method.pad(adapters[i].entries[p], adapters[i].leaves(p), r) if e0.kind else dict(adapters[i].leaves(p))
            for i in have}
        weighted = any(COEF in d for d in padded.values())
        names = [n for n in padded[i0] if n != COEF]
        for i in have[1:]:
            other = [n for n in padded[i] if n != COEF]
            if sorted(other) != sorted(names):
                raise IncompatibleAdapterError(
                    f"stack: module {p!r} has leaves {sorted(names)} in item {i0} but {sorted(other)} in item {i}")
        if weighted:
            names.append(COEF)
        ref = padded[i0]
        gate0 = ref[GATE]
        leaf: dict[str, torch.Tensor] = {}
        for name in names:
            parts = []
            for i in range(len(adapters)):
                d = padded.get(i)
                if d is None:  # the adapter lacks this module: zeros, gate 0 (and weight 0)
                    like = ref[name] if name in ref else gate0
                    parts.append(torch.zeros_like(like))
                elif name == COEF and COEF not in d:
                    parts.append(torch.ones((), dtype=coef_dtype(d), device=gate0.device))
                else:
                    parts.append(d[name])
            if name == COEF and len({t.dtype for t in parts}) > 1:  # weights of mixed dtypes: the widest
                dt = functools.reduce(torch.promote_types, [t.dtype for t in parts])
                parts = [t.to(dt) for t in parts]
            shapes = {tuple(t.shape) for t in parts}
            if len(shapes) > 1:
                raise IncompatibleAdapterError(
                    f"stack: leaf {p}.{name} has different shapes: "
                    + ", ".join(f"item {i}: {shape_str(t.shape)}" for i, t in enumerate(parts)))
            if name in e0.frozen and all(t is parts[0] for t in parts[1:]):
                # one frozen tensor every adapter shares (VeRA's projections): a view, not N copies
                leaf[name] = parts[0].unsqueeze(0).expand(len(parts), *parts[0].shape)
            else:
                leaf[name] = torch.stack(parts)
        if e0.kind:
            lead = leaf.get("lora_A", gate0)
            sdt = torch.float64 if lead.dtype == torch.float64 else torch.float32
            leaf[SCALING] = torch.tensor([a.entries[p].scaling if p in a.entries else 0.0 for a in adapters],
                                         dtype=sdt, device=gate0.device)
        tensors[p] = leaf
    info = StackInfo(tuple(a.config for a in adapters), tuple(tuple(a.entries.items()) for a in adapters),
                     tuple(tuple((p, tuple(a.leaves(p))) for p in a.paths) for a in adapters))
    return Adapter(first.method, first.config, entries, tensors, info)


def unstack(stacked: Adapter) -> list[Adapter]:
    """Split a stacked adapter back into its adapters (ranks un-padded, static scaling restored).

    Slice ``i`` of the leaves is paired with the ``i``-th adapter given to :func:`stack` (its config,
    modules, ranks, scaling, leaves). A stack whose leaves were sliced to another size raises; one reordered
    with ``af.tree.map`` at the same size cannot be told apart and is unstacked in the original order, so
    unstack first and stack the adapters in the order wanted. A scale weight given to the whole stack
    (``af.scale(stacked, w)``) comes back as a ``coef`` leaf of each adapter that has the module."""
    if not isinstance(stacked, Adapter):
        raise ConfigError(f"unstack: expected a stacked Adapter (from af.stack), got {type(stacked).__name__}")
    info = stacked.stack_info
    if info is None:
        raise ConfigError("unstack: the adapter is not stacked (make one with af.stack)")
    if stacked.stack_size != info.n:
        raise ConfigError(
            f"unstack: the stack's leaves hold {stacked.stack_size} adapters but it was built from {info.n}; "
            "slicing its leaves loses which adapters' configs remain: unstack the whole stack, then "
            "af.stack the ones you want")
    method = get_method(stacked.method)
    out = []
    for i, (config, entries) in enumerate(zip(info.configs, info.entries)):
        ent = dict(entries)
        own = dict(info.leaf_names[i]) if info.leaf_names is not None else None
        tensors = {}
        for p, e in ent.items():
            leaves = stacked.leaves(p)
            keep = [n for n in leaves if n != SCALING]
            if own is not None:
                mine = set(own[p])
                keep = [n for n in keep if n in mine]
            d = {n: leaves[n][i] for n in keep}
            tensors[p] = method.unpad(e, d, e.r) if e.kind else d
        out.append(Adapter(stacked.method, config, ent, tensors))
    return out
