"""AdaLoRA training as pure functions (``af.adalora``), in the optax style.

* :func:`orth_reg` -- PEFT's orthogonality regulariser, to add to the loss;
* :func:`rank_allocator` -- PEFT's ``RankAllocator``: ``state = alloc.init(adapter)``, then after each
  optimiser step ``adapter, state = alloc.update(adapter, grads, state, step)``; pruning zeroes entries of
  ``lora_E`` (shapes never change), so the adapter keeps its structure (no recompiles, stackable);
* :func:`prune` -- drop the pruned triplets for saving: the result has PEFT's ``rank_pattern`` in its
  config and tensors of the kept rank, which PEFT's ``from_pretrained`` loads as it loads its own.

The schedule (PEFT's): steps ``<= tinit`` keep the full budget; between ``tinit`` and
``total_step - tfinal`` the total rank budget falls cubically from ``sum(init ranks)`` to
``target_r * modules`` and is re-allocated every ``deltaT`` steps. Each weight's score is
``s * u`` with ``s = EMA_beta1(|w * g|)`` (sensitivity) and ``u = EMA_beta2(||w * g| - s|)`` (its
uncertainty); a singular triplet scores its ``E`` entry's score plus the mean score of its ``A`` row and
of its ``B`` column, and the lowest-scoring triplets over all modules are pruned. At
``total_step - tfinal`` the final allocation is made (and the scores reset); later steps re-apply it.

Example:
    >>> alloc = af.adalora.rank_allocator(cfg)
    >>> state = alloc.init(adapter)
    >>> for step in range(cfg.total_step):
    ...     grads = torch.func.grad(loss_fn)(adapter, batch)         # loss_fn adds af.adalora.orth_reg(adapter)
    ...     adapter = sgd(adapter, grads)                             # any optimiser step
    ...     adapter, state = alloc.update(adapter, grads, state, step)
    >>> af.save(af.adalora.prune(adapter, alloc.rank_pattern(state)), "out")
    'out'

"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ..adapter import Adapter, Entry, replace
from ..errors import ConfigError
from .adalora import KIND, AdaLoraConfig, make_entry

_LEAVES = ("lora_A", "lora_E", "lora_B")
Tensors = dict[str, dict[str, torch.Tensor]]


def _check(adapter: Any, what: str) -> Adapter:
    if not isinstance(adapter, Adapter) or adapter.method != "adalora":
        got = adapter.method if isinstance(adapter, Adapter) else type(adapter).__name__
        raise ConfigError(f"{what}: expected an AdaLoRA adapter, got {got}")
    if adapter.is_stacked:
        raise ConfigError(f"{what}: the adapter is stacked; use one adapter (af.unstack) or vmap over the stack")
    return adapter


def _svd_paths(adapter: Adapter) -> list[str]:
    return [p for p, e in adapter.entry_items if e.kind == KIND]


# -- the regulariser ---------------------------------------------------------------------------------
def orth_reg(adapter: Adapter, weight: float | None = None) -> torch.Tensor:
    """PEFT's orthogonality regulariser: ``weight * mean(||A A^T - I||_F, ||B^T B - I||_F)`` over every
    module's ``A`` [r, in] and ``B`` [out, r] (PEFT adds exactly this to the loss when labels are given).

    Arguments:
        adapter: an AdaLoRA adapter (its tensors may be under ``torch.func.grad``).
        weight: the coefficient; ``None``: the config's ``orth_reg_weight``.

    Returns:
        A 0-d tensor, differentiable with respect to the adapter's leaves.

    Example:
        >>> def loss_fn(a, ids):
        ...     return af.inject(fn, a)(params, input_ids=ids, labels=ids).loss + af.adalora.orth_reg(a)
    """
    a = _check(adapter, "orth_reg")
    w = a.config.orth_reg_weight if weight is None else weight
    total: Any = 0
    n = 0
    for p in _svd_paths(a):
        leaves = a.leaves(p)
        A, B = leaves["lora_A"], leaves["lora_B"]
        for cov in (A @ A.T, B.T @ B):  # [r, r]
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            total = total + torch.norm(cov - eye, p="fro")
            n += 1
    if n == 0:
        return torch.zeros(())
    return w * (total / n)


# -- the rank allocator ------------------------------------------------------------------------------
class RankAllocatorState(NamedTuple):
    """The allocator's state (a pytree of tensors).

    Attributes:
        exp_avg_ipt: module path -> {"lora_A", "lora_E", "lora_B"} -> EMA of the sensitivity ``|w * g|``
            (each the leaf's shape).
        exp_avg_unc: same keys and shapes: EMA of the sensitivity's uncertainty.
        rank_pattern: None until the first allocation; then module path -> bool [r], True for the kept
            singular triplets (the latest allocation, PEFT's ``config.rank_pattern``).
    """

    exp_avg_ipt: Tensors
    exp_avg_unc: Tensors
    rank_pattern: dict[str, torch.Tensor] | None


@dataclasses.dataclass(frozen=True)
class RankAllocator:
    """PEFT's AdaLoRA ``RankAllocator`` as pure functions; make one with :func:`rank_allocator`."""

    config: AdaLoraConfig

    def init(self, adapter: Adapter) -> RankAllocatorState:
        """A fresh state for ``adapter``: zero EMAs, no allocation yet.

        Arguments:
            adapter: the AdaLoRA adapter to be trained.

        Returns:
            A :class:`RankAllocatorState`.
        """
        a = _check(adapter, "rank_allocator.init")
        zeros = {p: {n: torch.zeros_like(a.leaves(p)[n]).detach() for n in _LEAVES} for p in _svd_paths(a)}
        return RankAllocatorState(zeros, {p: dict(d) for p, d in zeros.items()}, None)

    def budgets(self, adapter: Adapter) -> tuple[int, int]:
        """``(initial, target)`` total rank budgets: the sum of the module ranks, and ``target_r`` per module."""
        paths = _svd_paths(adapter)
        return sum(int(adapter.leaves(p)["lora_A"].shape[0]) for p in paths), self.config.target_r * len(paths)

    def budget_schedule(self, step: int, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
        """PEFT's schedule: ``(budget, whether to re-allocate at this step)``.

        Full budget through ``tinit``; the target budget after ``total_step - tfinal``; in between the
        budget ``int((init - target) * (1 - (step - tinit) / (total_step - tfinal - tinit))**3 + target)``,
        re-allocated when ``step % deltaT == 0``.
        """
        c = self.config
        total = int(c.total_step)  # type: ignore[arg-type]
        if step <= c.tinit:
            return init_bgt, False
        if step > total - c.tfinal:
            return target_bgt, True
        mul = 1 - (step - c.tinit) / (total - c.tfinal - c.tinit)
        return int((init_bgt - target_bgt) * (mul**3) + target_bgt), step % c.deltaT == 0

    def update(self, adapter: Adapter, grads: Adapter | Mapping[str, Mapping[str, torch.Tensor]],
               state: RankAllocatorState, step: int) -> tuple[Adapter, RankAllocatorState]:
        """One allocator step (PEFT's ``update_and_allocate(step)``): call it after the optimiser step,
        with the gradients that step used.

        Arguments:
            adapter: the adapter after the optimiser step (leaves: ``lora_A`` [r, in], ``lora_E`` [r, 1],
                ``lora_B`` [out, r]).
            grads: the gradients of the loss with respect to the adapter (``torch.func.grad``'s
                Adapter-shaped result, or a mapping path -> {leaf name -> tensor}).
            state: from :meth:`init` or the previous :meth:`update`.
            step: the global step (0-based, as PEFT's loop counts).

        Returns:
            ``(adapter, state)``: the adapter with the pruned singular values set to zero (same shapes; other
            leaves are the same tensor objects), and the new state.
        """
        a = _check(adapter, "rank_allocator.update")
        c = self.config
        end = int(c.total_step) - c.tfinal  # type: ignore[arg-type]
        init_bgt, target_bgt = self.budgets(a)
        if step < end:
            state = self._update_ipt(a, _tensors_of(grads), state)
            budget, mask_now = self.budget_schedule(step, init_bgt, target_bgt)
            if mask_now:
                keep = self._allocate(a, state, init_bgt - budget)
                return _apply(a, keep), state._replace(rank_pattern=keep)
            return a, state
        if step == end:  # the final allocation, then the scores are reset (as PEFT does)
            keep = self._allocate(a, state, init_bgt - target_bgt)
            fresh = self.init(a)
            return _apply(a, keep), fresh._replace(rank_pattern=keep)
        if state.rank_pattern is not None:  # after the final allocation: re-apply it every step
            return _apply(a, state.rank_pattern), state
        return a, state

    def rank_pattern(self, state: RankAllocatorState) -> dict[str, list[bool]] | None:
        """The latest allocation in PEFT's ``rank_pattern`` format: ``{"<path>.lora_E": [bool] * r}``
        (None before the first allocation). Pass it to :func:`prune` before saving."""
        if state.rank_pattern is None:
            return None
        return {f"{p}.lora_E": [bool(b) for b in m.tolist()] for p, m in state.rank_pattern.items()}

    # -- internals -----------------------------------------------------------------------------
    def _update_ipt(self, a: Adapter, grads: Tensors, state: RankAllocatorState) -> RankAllocatorState:
        b1, b2 = self.config.beta1, self.config.beta2
        ipt_avg: Tensors = {}
        unc_avg: Tensors = {}
        with torch.no_grad():
            for p in _svd_paths(a):
                g = grads.get(p)
                if g is None:
                    raise ConfigError(f"rank_allocator.update: grads have no entry for module {p!r}")
                ipt_avg[p], unc_avg[p] = {}, {}
                for n in _LEAVES:
                    w = a.leaves(p)[n].detach()
                    ipt = (w * g[n].detach()).abs()
                    old_ipt = state.exp_avg_ipt.get(p, {}).get(n)
                    old_unc = state.exp_avg_unc.get(p, {}).get(n)
                    if old_ipt is None or old_unc is None:
                        old_ipt = old_unc = torch.zeros_like(w)
                    new_ipt = b1 * old_ipt + (1 - b1) * ipt
                    ipt_avg[p][n] = new_ipt
                    unc_avg[p][n] = b2 * old_unc + (1 - b2) * (ipt - new_ipt).abs()
        return state._replace(exp_avg_ipt=ipt_avg, exp_avg_unc=unc_avg)

    def _allocate(self, a: Adapter, state: RankAllocatorState, n_prune: int) -> dict[str, torch.Tensor]:
        """Keep-masks bool [r] per module: the ``n_prune`` least important triplets overall are dropped
        (every triplet scoring at or below the ``n_prune``-th smallest score, as PEFT's threshold does)."""
        scores: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for p in _svd_paths(a):
                ipt, unc = state.exp_avg_ipt[p], state.exp_avg_unc[p]
                s_a = (ipt["lora_A"] * unc["lora_A"]).mean(dim=1, keepdim=True)  # [r, 1]
                s_b = (ipt["lora_B"] * unc["lora_B"]).mean(dim=0).view(-1, 1)  # [r, 1]
                s_e = ipt["lora_E"] * unc["lora_E"]  # [r, 1]
                scores[p] = s_e.view(-1) + torch.cat([s_a, s_b], dim=1).sum(dim=1)
            if n_prune <= 0 or not scores:
                return {p: torch.ones_like(s, dtype=torch.bool) for p, s in scores.items()}
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=n_prune)[0].item()
            return {p: ~(s <= threshold) for p, s in scores.items()}


def _tensors_of(grads: Any) -> Tensors:
    if isinstance(grads, Adapter):
        return grads.tensors
    if isinstance(grads, Mapping):
        return {p: dict(d) for p, d in grads.items()}
    raise ConfigError(f"rank_allocator.update: grads must be an Adapter or a mapping, got {type(grads).__name__}")


def _apply(a: Adapter, keep: Mapping[str, torch.Tensor]) -> Adapter:
    """Zero the singular values outside ``keep`` (E [r, 1]); other leaves are shared."""
    tensors: dict[str, Any] = dict(a.tensors)
    for p, m in keep.items():
        leaves = dict(tensors[p])
        E = leaves["lora_E"]
        leaves["lora_E"] = E.detach().masked_fill(~m.view(-1, 1).to(E.device), 0.0)
        tensors[p] = leaves
    return replace(a, tensors=tensors)


def rank_allocator(config: AdaLoraConfig) -> RankAllocator:
    """PEFT's AdaLoRA rank allocator as an ``(init, update)`` pair of pure functions.

    Arguments:
        config: the adapter's :class:`adaptfn.AdaLoraConfig` (tinit, tfinal, total_step, deltaT,
            target_r, beta1, beta2 are read).

    Returns:
        A :class:`RankAllocator`: ``state = alloc.init(adapter)``; ``adapter, state = alloc.update(adapter,
        grads, state, step)`` after each optimiser step; ``alloc.rank_pattern(state)`` for :func:`prune`.

    Example:
        >>> alloc = af.adalora.rank_allocator(adapter.config)
        >>> state = alloc.init(adapter)
    """
    if not isinstance(config, AdaLoraConfig):
        raise ConfigError(f"rank_allocator: expected an AdaLoraConfig, got {type(config).__name__}")
    return RankAllocator(config)


def prune(adapter: Adapter, rank_pattern: Mapping[str, Any] | None) -> Adapter:
    """Drop the pruned singular triplets: the adapter PEFT saves after AdaLoRA training.

    Each module keeps the rows of ``lora_A`` [r, in] / ``lora_E`` [r, 1] and the columns of ``lora_B``
    [out, r] its mask keeps (rank ``k = sum(mask)``; the scale stays ``alpha / (init_r + 1e-5)``), and the
    config's ``rank_pattern`` records the masks, so ``af.save`` writes what PEFT's ``save_pretrained``
    writes and PEFT's ``from_pretrained`` resizes its modules to match.

    Arguments:
        adapter: an AdaLoRA adapter (not yet pruned: each module at its full rank).
        rank_pattern: ``{"<path>.lora_E": [bool] * r}`` (PEFT's format, from
            :meth:`RankAllocator.rank_pattern`) or ``{path: bool tensor [r]}``; None: nothing to drop.

    Returns:
        A new :class:`Adapter` (the same outputs wherever the dropped singular values were zero).

    Example:
        >>> alloc = af.adalora.rank_allocator(adapter.config)
        >>> state = alloc.init(adapter)
        >>> final = af.adalora.prune(adapter, alloc.rank_pattern(state))
        >>> af.save(final, "out")
        'out'

    """
    a = _check(adapter, "prune")
    if rank_pattern is None:
        return a
    masks: dict[str, list[bool]] = {}
    for k, v in rank_pattern.items():
        path = k[: k.index(".lora_E")] if ".lora_E" in k else k
        if path not in a.entries or a.entries[path].kind != KIND:
            raise ConfigError(f"prune: rank_pattern key {k!r} names no AdaLoRA module of the adapter")
        m = [bool(b) for b in (v.tolist() if isinstance(v, torch.Tensor) else v)]
        r = a.entries[path].r
        if a.config.mask_for(path) is not None:
            raise ConfigError(f"prune: module {path!r} is already pruned (its config has a rank_pattern mask)")
        if len(m) != r:
            raise ConfigError(f"prune: rank_pattern[{k!r}] has {len(m)} entries but module {path!r} has rank {r}")
        masks[path] = m
    config: AdaLoraConfig = a.config
    entries: dict[str, Entry] = dict(a.entries)
    tensors: dict[str, Any] = dict(a.tensors)
    for path, m in masks.items():
        leaves = dict(tensors[path])
        idx = torch.tensor([i for i, b in enumerate(m) if b], dtype=torch.long, device=leaves["lora_A"].device)
        leaves["lora_A"] = leaves["lora_A"].index_select(0, idx)
        leaves["lora_E"] = leaves["lora_E"].index_select(0, idx)
        leaves["lora_B"] = leaves["lora_B"].index_select(1, idx)
        tensors[path] = leaves
        old, new = entries[path], make_entry(config, len(idx), entries[path].fan_in_fan_out)
        entries[path] = dataclasses.replace(old, r=new.r, scaling=new.scaling, options=new.options)
    pattern = {f"{p}.lora_E": m for p, m in masks.items()}
    new_config = dataclasses.replace(config, rank_pattern={**(config.rank_pattern or {}), **pattern})
    return replace(a, config=new_config, entries=entries, tensors=tensors)


__all__ = ["orth_reg", "rank_allocator", "RankAllocator", "RankAllocatorState", "prune"]
