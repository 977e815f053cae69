"""FSDP2-sharded bases (``torch.distributed.fsdp.fully_shard``): what the structural copy needs.

``fully_shard`` swaps a module's class for a dynamic subclass (``FSDPOPTForCausalLM``, ...) and, around each
sharded module's forward, replaces the module's parameters by full (all-gathered) ones and back by its
shard: its forward pre-hook all-gathers and writes the full parameters into the *original* modules'
``_parameters``, its post-hook writes the shards back (and frees the full storage, which the backward
pre-hook fills again in place). The structural copy shares the original's hooks, so those run around the
copy's forward too; what the copy lacks is the full parameters, since the hooks write them into the
original modules. :func:`install` adds one forward pre-hook to each sharded module of the copy, run after
FSDP's own, that reads the now full parameters from the original modules into the copy's (detached: the
base stays frozen), except those the call itself replaced (an adapter's replacements, swapped params).

The adapter is not sharded: it is replicated, and its gradients are averaged across ranks by the caller
(``af.optim.map_trainable`` with ``torch.distributed.all_reduce``, see ``examples/distributed_train.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["is_sharded", "is_dtensor", "sharded_modules", "install"]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was given to ``fully_shard`` (its class is FSDP2's dynamic subclass)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FSDPModule)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed`` DTensor (an FSDP2 shard), without importing distributed."""
    return any(c.__name__ == "DTensor" and c.__module__.startswith("torch.distributed") for c in type(t).__mro__)


def sharded_modules(modules: Mapping[str, nn.Module]) -> list[str]:
    """Paths (in ``modules``' order) of the modules given to ``fully_shard``."""
    return [p for p, m in modules.items() if is_sharded(m)]


def install(originals: Mapping[str, nn.Module], copies: Mapping[str, nn.Module], skip: set[str]) -> None:
    """Add the parameter-refresh pre-hook to each sharded module of a structural copy.

    Arguments:
        originals: path -> the user's module. copies: path -> the structural copy's module.
        skip: full parameter names the running call has replaced (read by the hook at call time, so the
            caller fills and empties this set around each call).
    """
    roots = sharded_modules(originals)
    if not roots:
        return
    owner: dict[str, str] = {}  # module path -> the innermost sharded module holding it
    for path in originals:
        inside = [r for r in roots if r == "" or path == r or path.startswith(r + ".")]
        if inside:
            owner[path] = max(inside, key=len)
    for root in roots:
        group = [(p, originals[p], copies[p]) for p, r in owner.items() if r == root]
        copies[root].register_forward_pre_hook(_refresh_hook(group, skip))


def _refresh_hook(group: list[tuple[str, nn.Module, nn.Module]], skip: set[str]) -> Any:
    def hook(module: nn.Module, args: Any) -> None:
        for path, orig, cp in group:
            params = cp._parameters
            for name, p in orig._parameters.items():
                if p is not None and (f"{path}.{name}" if path else name) not in skip:
                    params[name] = p.detach()
        return None

    return hook
