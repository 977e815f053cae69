"""Entries that change a module's tensors for the call instead of wrapping its forward (a method lists their
kinds in ``weight_kinds``): LoRA on ``nn.Parameter``s (:mod:`adaptfn.methods.lora_params`) and trainable tokens
(:mod:`adaptfn.methods.trainable_tokens`).

For such an entry, :func:`adaptfn.inject` computes the method's ``merge`` of the module's current tensors inside
each call (so the leaves stay inputs of the call: grad, vmap and torch.compile see them) and swaps the results in
for the call, as :func:`adaptfn.merge` writes them: ``merge == inject`` by construction. A tied input
embedding's trained rows go to every alias of its weight (PEFT's tying, see
:func:`adaptfn.methods.trainable_tokens.write_targets`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..adapter import COEF, GATE, Adapter, Entry, coef_value, gate_on
from ..errors import ConfigError
from . import trainable_tokens

__all__ = ["call_plan", "swap_in", "merge_targets"]


def _kinds(adapter: Adapter) -> dict[str, str]:
    return {p: e.kind for p, e in adapter.entry_items}


def call_plan(adapter: Adapter, path: str, modules: Mapping[str, nn.Module],
              params: Mapping[str, torch.Tensor]) -> tuple[tuple[tuple[str, str], ...], dict[str, tuple[str, ...]]]:
    """The static part of one entry's swap: the module's own parameters ``(name, params key)`` in registration
    order, and where each updated tensor goes (``name -> params keys``)."""
    mod = modules[path]
    names = tuple((n, f"{path}.{n}") for n, t in mod._parameters.items() if t is not None)
    targets: dict[str, tuple[str, ...]] = {n: (k,) for n, k in names}
    e = adapter.entries[path]
    if e.kind == trainable_tokens.KIND and "weight" in targets:
        targets["weight"] = trainable_tokens.write_targets(path, _kinds(adapter), params)
    return names, targets


def swap_in(method: Any, entry: Entry, leaves: Mapping[str, torch.Tensor], route: Any, path: str,
            names: tuple[tuple[str, str], ...], targets: Mapping[str, tuple[str, ...]],
            swaps: dict[str, torch.Tensor], held: Mapping[str, torch.Tensor]) -> None:
    """Add the entry's updated tensors to ``swaps`` (the tensors the call runs with); nothing when it is off."""
    if route is not None:  # refused earlier (the variant declares no "route"); kept as a guard
        raise ConfigError(f"route=: module {path!r} has a {entry.kind!r} entry, which is not per-row separable")
    on = gate_on(leaves[GATE])
    if on is False or (on is True and coef_value(leaves.get(COEF)) == 0.0):
        return
    cur = {n: swaps[k] if k in swaps else held[k] for n, k in names}
    for n, t in method.merge(entry, leaves, on, cur).items():
        for k in targets.get(n, (f"{path}.{n}",)):
            swaps[k] = t


def merge_targets(adapter: Adapter, path: str, name: str, before: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The other keys of ``before`` that :func:`adaptfn.merge` writes the updated ``<path>.<name>`` to."""
    e = adapter.entries[path]
    if e.kind != trainable_tokens.KIND or name != "weight":
        return ()
    own = f"{path}.{name}"
    return tuple(k for k in trainable_tokens.write_targets(path, _kinds(adapter), before) if k != own)
