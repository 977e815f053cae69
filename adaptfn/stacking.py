"""``stack`` / ``unstack``: many adapters of one structure as one adapter with a leading axis ``N``.

A stacked adapter carries a leading axis ``N`` on every leaf, ranks zero-padded to the largest (the
method's ``pad``), plus a ``scaling`` leaf [N] per delta entry (each adapter's own scale), and a static
:class:`adaptfn.adapter.StackInfo` recording the adapters it was made of. Whether an adapter is stacked
is read from leaf shapes, so under ``torch.func.vmap`` a stacked adapter's leaves look like a single one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch

from .adapter import GATE, SCALING, Adapter, Entry, StackInfo
from .errors import ConfigError, IncompatibleAdapterError, shape_str
from .methods import get_method

__all__ = ["stack", "unstack"]


def stack(adapters: Sequence[Adapter]) -> Adapter:
    """Stack adapters of the same method and targets into one with a leading axis ``N`` on every leaf.

    Ranks are zero-padded to the largest (the padding contributes exactly nothing); each delta entry
    gets a ``scaling`` leaf [N], so adapters with different ranks and alphas stack.

    Arguments:
        adapters: a non-empty sequence of single (unstacked) adapters.

    Returns:
        A stacked :class:`Adapter`; ``af.unstack`` gives the originals back.

    Example:
        >>> stacked = af.stack([a1, a2, a3])                  # ranks 2, 3, 4: padded to 4
        >>> stacked.stack_size, stacked.leaves(stacked.paths[0])["lora_A"].shape   # [N, r, in]
        (3, torch.Size([3, 4, 22]))
        >>> outs = torch.func.vmap(lambda a: af.inject(fn, a)(params, input_ids=ids).logits)(stacked)
        >>> outs.shape                                         # [N, batch, seq, vocab]
        torch.Size([3, 2, 7, 61])
    """
    if isinstance(adapters, (Adapter, str, bytes)) or not isinstance(adapters, Iterable):
        raise ConfigError(f"stack: expected a list of adapters, got {type(adapters).__name__}")
    adapters = list(adapters)
    if not adapters:
        raise ConfigError("stack: needs at least one adapter")
    first = adapters[0]
    for i, a in enumerate(adapters):
        if not isinstance(a, Adapter):
            raise ConfigError(f"stack: item {i} is a {type(a).__name__}, not an Adapter")
        if a.is_stacked:
            raise ConfigError(f"stack: item {i} is already stacked; unstack it first")
        if a.method != first.method:
            raise IncompatibleAdapterError(f"stack: item {i} is {a.method}, item 0 is {first.method}")
        if a.paths != first.paths:
            diff = sorted(set(a.paths) ^ set(first.paths))
            raise IncompatibleAdapterError(f"stack: item {i} targets other modules than item 0: {diff[:8]}")
        for p in a.paths:
            e0, e = first.entries[p], a.entries[p]
            if (e.kind, e.replaced, e.tied, e.frozen) != (e0.kind, e0.replaced, e0.tied, e0.frozen):
                raise IncompatibleAdapterError(
                    f"stack: module {p!r} differs between item 0 ({e0.kind or 'replacement'} {e0.replaced}) "
                    f"and item {i} ({e.kind or 'replacement'} {e.replaced})")
    method = get_method(first.method)
    entries: dict[str, Entry] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for p in first.paths:
        e0 = first.entries[p]
        r = max(a.entries[p].r for a in adapters)
        fif = {a.entries[p].fan_in_fan_out for a in adapters} - {None}
        if len(fif) > 1:
            raise IncompatibleAdapterError(f"stack: module {p!r} has mixed fan_in_fan_out across adapters")
        entries[p] = dataclasses.replace(e0, r=r, fan_in_fan_out=next(iter(fif), None))
        padded = [method.pad(a.entries[p], a.leaves(p), r) if e0.kind else dict(a.leaves(p)) for a in adapters]
        leaf: dict[str, torch.Tensor] = {}
        for name in padded[0]:
            parts = [d[name] for d in padded]
            shapes = {tuple(t.shape) for t in parts}
            if len(shapes) > 1:
                raise IncompatibleAdapterError(
                    f"stack: leaf {p}.{name} has different shapes: "
                    + ", ".join(f"item {i}: {shape_str(t.shape)}" for i, t in enumerate(parts)))
            leaf[name] = torch.stack(parts)
        if e0.kind:
            g = leaf[GATE]
            ref = leaf.get("lora_A", g)
            sdt = torch.float64 if ref.dtype == torch.float64 else torch.float32
            leaf[SCALING] = torch.tensor([a.entries[p].scaling for a in adapters], dtype=sdt, device=g.device)
        tensors[p] = leaf
    info = StackInfo(tuple(a.config for a in adapters), tuple(tuple(a.entries.items()) for a in adapters))
    return Adapter(first.method, first.config, entries, tensors, info)


def unstack(stacked: Adapter) -> list[Adapter]:
    """Split a stacked adapter back into its adapters (ranks un-padded, static scaling restored).

    Slice ``i`` of the leaves is paired with the ``i``-th adapter given to :func:`stack` (its config,
    ranks, scaling). A stack whose leaves were sliced to another size raises; one reordered with
    ``af.tree.map`` at the same size cannot be told apart and is unstacked in the original order, so
    unstack first and stack the adapters in the order wanted."""
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
        tensors = {}
        for p, e in ent.items():
            d = {n: t[i] for n, t in stacked.leaves(p).items() if n != SCALING}
            tensors[p] = method.unpad(e, d, e.r) if e.kind else d
        out.append(Adapter(stacked.method, config, ent, tensors))
    return out
