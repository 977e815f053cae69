"""PEFT's ``IA3Model.add_weighted_adapter`` for adaptfn's IA3 adapters: the body of :func:`adaptfn.combine`.

Per module, the new vector is ``l = sum_i w_i l_i`` over the adapters that have the module (a module only some
adapters have gets only their terms: a vector near 0 there, not near 1, as PEFT computes it). Only
``how="linear"`` exists for IA3. The new config is the first adapter's with the union of ``target_modules``
and of ``feedforward_modules``. With weights summing to 1 the vector is ``1 + sum_i w_i (l_i - 1)``: the
deviations from ones of the :func:`adaptfn.scale`-d vectors, added up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from .._where import is_target
from ..adapter import GATE, Adapter, Entry
from ..errors import ConfigError, IncompatibleAdapterError
from .base import CombineSpec
from .lora_combine import _read_gate, own_replacements, union_targets, visit_order

__all__ = ["combine_ia3"]


def combine_ia3(method: Any, adapters: Sequence[Adapter], weights: Sequence[float], spec: CombineSpec) -> Adapter:
    """The combined IA3 adapter (see the module docstring); arguments checked by :func:`adaptfn.combine`."""
    if spec.how != "linear":
        raise ConfigError(f"combine: how={spec.how!r} is not defined for ia3 adapters; PEFT's IA3 combination is "
                          "how='linear' (l = sum_i w_i l_i)")
    configs = [a.config for a in adapters]
    frozen = own_replacements(adapters)
    if frozen:
        raise IncompatibleAdapterError(f"combine: module {next(iter(frozen))!r} carries a replaced tensor")
    new_config = dataclasses.replace(configs[0], target_modules=union_targets(configs),
                                     feedforward_modules=union_targets(configs, "feedforward_modules"))
    views: list[dict[str, tuple[Entry, torch.Tensor]]] = []
    for a in adapters:
        v = {}
        for path, e in a.entry_items:
            if e.kind:
                leaves = a.leaves(path)
                on = _read_gate(leaves, "combine")
                v[path] = (e, method.to_peft(e, leaves if on else method.off(e, leaves))["ia3_l"].detach())
        views.append(v)
    entries: dict[str, Entry] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for p in visit_order(sorted({p for v in views for p in v}), spec.order):
        parts = [(float(w), *v[p]) for w, v in zip(weights, views) if p in v]
        kinds = {e.kind for _, e, _ in parts}
        want = "ia3_in" if new_config.is_feedforward(p) else "ia3_out"
        if not is_target(new_config, p) or kinds != {want}:
            raise IncompatibleAdapterError(
                f"combine: module {p!r} is {sorted(kinds)} in the adapters but {want} (or not a target) in the "
                f"combined config (target_modules={new_config.target_modules!r}, feedforward_modules="
                f"{new_config.feedforward_modules!r})")
        acc = torch.zeros_like(parts[0][2])
        for w, _, v in parts:
            acc += v * w
        e = parts[0][1]
        entries[p] = Entry(kind=e.kind, r=0, scaling=1.0, fan_in_fan_out=e.fan_in_fan_out, options=e.options)
        tensors[p] = {"ia3_l": acc, GATE: torch.ones((), dtype=torch.float32, device=acc.device)}
    return Adapter(method.name, new_config, entries, tensors)
