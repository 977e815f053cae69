"""``af.optim``: optimisers for adapters in optax's shape, pure functions on trees.

An optimiser is a :class:`Optimizer` (a NamedTuple of two pure functions): the module-level step functions
(:func:`adamw_init` / :func:`adamw_update`, :func:`sgd_init` / :func:`sgd_update`) with the hyper-parameters
bound by ``functools.partial``, so each step is a named, testable function::

    opt = af.optim.adamw(lr=1e-3)
    state = opt.init(adapter)                              # an explicit pytree of tensors
    adapter, state = opt.update(grads, state, adapter)     # new adapter, new state; inputs untouched

The arithmetic is torch's own: the update runs ``torch.optim.adamw.adamw`` / ``torch.optim.sgd.sgd``
(the functional kernels behind ``torch.optim.AdamW`` / ``SGD``) on *copies* of the adapter's leaves and
of the state, so given the same gradients the result is the one ``torch.optim`` computes (bit for bit
in eager mode), and nothing the caller holds is modified.

What the optimiser sees of an adapter. Only **trainable leaves** are updated: LoRA/IA3/AdaLoRA delta
leaves (``lora_A``, ``lora_B``, ...) and trainable replacements (``modules_to_save`` copies, trained
biases). Four kinds of leaves are not parameters and pass through unchanged (the same tensor objects
come back) with no optimiser state: the ``gate`` leaf, the ``scaling`` leaf of stacked adapters, the scale
weights of :func:`adaptfn.scale` (``coef``: to learn one, differentiate the ``w`` given to ``scale``) and the
replacements named in ``Entry.frozen`` (PEFT's saved embedding matrices). Their gradients are ignored
(they are zero anyway). A *masked* module (``gate == 0``) is still updated like any parameter: its
gradient is zero, so SGD without weight decay leaves it where it is, but AdamW's decoupled weight
decay shrinks it and momentum carries on, as ``torch.optim`` does for a parameter whose gradient is
zero. To hold some modules fixed while training others, leave them out of the optimised tree: inject
the fixed part first (``g = af.inject(fn, fixed)``) and train the other part through ``g``.

The state keeps per-leaf tensors keyed by module path and leaf name (``{path: {leaf: tensor}}``, and
``{name: {path: {leaf: tensor}}}`` for an :class:`adaptfn.AdapterSum`), never by flatten order, plus a
``count`` of the updates done. It works for stacked adapters too, both directly (the updates are
elementwise, so each adapter of the stack gets its own) and under ``torch.func.vmap``
(``states = vmap(opt.init)(stacked)``; ``vmap(opt.update)(grads, states, stacked)``).

Learning rates are a float or a schedule ``step -> lr`` (``step``: the number of updates done before
this one, from 0, as ``torch.optim.lr_scheduler.LambdaLR`` counts). In eager mode a schedule gets a
Python ``int``; under ``vmap``/``grad``/``torch.compile`` it gets the count as a 0-d tensor, which the
built-in schedules (:func:`constant`, :func:`linear_warmup_decay`, :func:`cosine`) accept.

Example:
    >>> opt = af.optim.adamw(lr=af.optim.linear_warmup_decay(1e-3, 10, 100), weight_decay=0.01)
    >>> state = opt.init(adapter)
    >>> for batch in batches:
    ...     grads = torch.func.grad(loss_fn)(adapter, batch)
    ...     adapter, state = opt.update(grads, state, adapter)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch.optim.adamw import adamw as _adamw_kernel
from torch.optim.sgd import sgd as _sgd_kernel

from .adapter import _NON_PARAMETER_LEAVES, Adapter, AdapterSum, replace
from .errors import ConfigError, IncompatibleAdapterError, shape_str

Schedule = Callable[[Any], Any]
"""``step -> learning rate``: ``step`` an ``int`` (eager) or a 0-d integer tensor (under transforms)."""
Tree = Any  # an Adapter, an AdapterSum, or the nested dict of their trainable leaves
Key = tuple[str, ...]

__all__ = [
    "Optimizer", "AdamWState", "SGDState", "Schedule", "adamw", "adamw_init", "adamw_update", "sgd", "sgd_init",
    "sgd_update", "constant", "constant_at", "linear_warmup_decay", "linear_warmup_decay_at", "cosine", "cosine_at",
    "trainable", "map_trainable",
]


class Optimizer(NamedTuple):
    """A pair of pure functions (optax's ``GradientTransformation`` shape, returning the new adapter).

    Attributes:
        init: ``init(adapter) -> state``: a fresh state (a pytree of tensors).
        update: ``update(grads, state, adapter) -> (adapter, state)``: one step; ``grads`` is shaped like
            the adapter (what ``torch.func.grad`` returns) or the nested dict of :func:`trainable`.
    """

    init: Callable[[Tree], Any]
    update: Callable[[Tree, Any, Tree], tuple[Tree, Any]]


class AdamWState(NamedTuple):
    """State of :func:`adamw`.

    Attributes:
        count: int64 0-d tensor: updates done so far.
        mu: ``{path: {leaf: tensor}}``: first moments (``exp_avg``) of the trainable leaves.
        nu: same keys: second moments (``exp_avg_sq``).
    """

    count: torch.Tensor
    mu: dict[str, Any]
    nu: dict[str, Any]


class SGDState(NamedTuple):
    """State of :func:`sgd`.

    Attributes:
        count: int64 0-d tensor: updates done so far (read by a learning-rate schedule).
        momentum: ``{path: {leaf: tensor}}``: momentum buffers of the trainable leaves; None without
            momentum.
    """

    count: torch.Tensor
    momentum: dict[str, Any] | None


# -- trainable leaves ---------------------------------------------------------------------------------
def _items(tree: Tree, what: str) -> list[tuple[Key, torch.Tensor]]:
    """``(key, tensor)`` for every trainable leaf; keys are ``(path, leaf)`` or ``(name, path, leaf)``."""
    if isinstance(tree, AdapterSum):
        return [((name, *k), t) for name, a in tree.parts.items() for k, t in _items(a, what)]
    if isinstance(tree, Adapter):
        out = []
        for path, e in tree.entry_items:
            for name, t in tree.leaves(path).items():
                if name in _NON_PARAMETER_LEAVES or name in e.frozen:
                    continue
                out.append(((path, name), t))
        return out
    if isinstance(tree, Mapping):
        return _nested_items(tree, ())
    raise ConfigError(f"{what}: expected an adaptfn Adapter or AdapterSum, got {type(tree).__name__}")


def _nested_items(d: Mapping[str, Any], prefix: Key) -> list[tuple[Key, Any]]:
    out: list[tuple[Key, Any]] = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.extend(_nested_items(v, (*prefix, k)))
        else:
            out.append(((*prefix, k), v))
    return out


def _nest(items: list[tuple[Key, torch.Tensor]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, t in items:
        d = out
        for k in key[:-1]:
            d = d.setdefault(k, {})
        d[key[-1]] = t
    return out


def _with_leaves(tree: Tree, new: Mapping[Key, torch.Tensor]) -> Tree:
    """``tree`` with the leaves at ``new``'s keys replaced; every other leaf is the same object."""
    if isinstance(tree, AdapterSum):
        return AdapterSum({name: _with_leaves(a, {k[1:]: v for k, v in new.items() if k[0] == name})
                           for name, a in tree.parts.items()})
    if isinstance(tree, Adapter):
        tensors = {p: dict(d) for p, d in tree.tensors.items()}
        for (path, name), t in new.items():
            tensors[path][name] = t
        return replace(tree, tensors=tensors)
    return _nest(list(new.items()))


def _key_str(key: Key) -> str:
    return ".".join(k for k in key if k)


def _pick(source: Tree, keys: list[Key], like: list[torch.Tensor], what: str) -> list[torch.Tensor]:
    """The tensors of ``source`` at ``keys``, checked against the adapter's leaves ``like``."""
    have = dict(_items(source, what))
    missing = [_key_str(k) for k in keys if k not in have]
    if missing:
        raise IncompatibleAdapterError(
            f"{what} has no leaf {missing[0]!r} of the adapter ({len(missing)} missing); it belongs to an "
            "adapter of another structure")
    out = []
    for k, ref in zip(keys, like):
        t = have[k]
        if not isinstance(t, torch.Tensor):
            raise IncompatibleAdapterError(f"{what}: leaf {_key_str(k)!r} is a {type(t).__name__}, not a tensor")
        if t.shape != ref.shape:
            raise IncompatibleAdapterError(
                f"{what}: leaf {_key_str(k)!r} has shape {shape_str(t.shape)}, the adapter's is {shape_str(ref.shape)}")
        out.append(t)
    return out


def _leaves_and_grads(adapter: Tree, grads: Tree, who: str) -> tuple[list[Key], list[torch.Tensor],
                                                                     list[torch.Tensor]]:
    """The adapter's trainable leaves (keys, tensors) and the matching gradients, checked."""
    items = _items(adapter, who)
    keys = [k for k, _ in items]
    params = [t for _, t in items]
    return keys, params, _pick(grads, keys, params, f"{who}: grads")


def trainable(tree: Tree) -> dict[str, Any]:
    """The trainable leaves of an adapter (or of its gradient), as a nested dict keyed by module path.

    Arguments:
        tree: an :class:`adaptfn.Adapter` (stacked or not), an :class:`adaptfn.AdapterSum`, or a tree of
            the same shape such as the gradient ``torch.func.grad`` returns.

    Returns:
        ``{path: {leaf: tensor}}`` (``{name: {path: {leaf: tensor}}}`` for an AdapterSum): the leaves the
        optimisers update, the same tensor objects; no ``gate``, ``scaling`` or ``Entry.frozen`` leaves.

    Example:
        >>> n = sum(t.numel() for d in af.optim.trainable(adapter).values() for t in d.values())
        >>> assert n == adapter.num_parameters()
    """
    return _nest(_items(tree, "trainable"))


def map_trainable(f: Callable[[torch.Tensor], torch.Tensor], tree: Tree) -> Tree:
    """Apply ``f`` to every trainable leaf; the other leaves (gates, stacked scalings, frozen
    replacements) are kept as they are.

    Arguments:
        f: ``tensor -> tensor`` of the same shape (called once per leaf, in a fixed order: the same on
            every process, so collective operations such as ``torch.distributed.all_reduce`` line up).
        tree: an adapter, an AdapterSum, a gradient of one, or a nested dict from :func:`trainable`.

    Returns:
        A tree of the same structure.

    Example:
        >>> def mean_over_ranks(g):
        ...     g = g.clone(); torch.distributed.all_reduce(g); return g / torch.distributed.get_world_size()
        >>> grads = af.optim.map_trainable(mean_over_ranks, grads)
    """
    return _with_leaves(tree, {k: f(t) for k, t in _items(tree, "map_trainable")})


# -- learning rates -------------------------------------------------------------------------------------
def _check_lr(lr: float | Schedule, what: str) -> Schedule:
    if callable(lr):
        return lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ConfigError(f"{what}: lr must be a non-negative float or a schedule step -> lr, got {lr!r}")
    return constant(float(lr))


def _is_traced(tensors: list[torch.Tensor]) -> bool:
    """Whether we run under torch.compile or a torch.func transform (vmap, grad) of these tensors."""
    if torch.compiler.is_compiling():
        return True
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _lr_at(schedule: Schedule, count: torch.Tensor, traced: bool) -> float | torch.Tensor:
    lr = schedule(count if traced else int(count))
    if isinstance(lr, torch.Tensor) and not traced:
        lr = float(lr)
    return lr


def constant(lr: float) -> Schedule:
    """A constant learning rate.

    Arguments:
        lr: the value, >= 0.

    Returns:
        A schedule ``step -> lr`` (:func:`constant_at` with ``value`` bound).

    Example:
        >>> opt = af.optim.sgd(af.optim.constant(0.1))      # same as af.optim.sgd(0.1)
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ConfigError(f"constant: lr must be a non-negative float, got {lr!r}")
    return functools.partial(constant_at, value=float(lr))


def constant_at(step: Any, *, value: float) -> float:
    """The :func:`constant` schedule at ``step``: ``value``."""
    return value


def _check_steps(what: str, **steps: int) -> None:
    for name, v in steps.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{what}: {name} must be a non-negative int, got {v!r}")


def _check_peak(what: str, **values: float) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{what}: {name} must be a non-negative float, got {v!r}")


def linear_warmup_decay(peak: float, warmup_steps: int, total_steps: int) -> Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then linear decay to 0 at ``total_steps``
    (0 afterwards): the usual transformer fine-tuning schedule.

    Arguments:
        peak: the largest learning rate, reached at step ``warmup_steps``.
        warmup_steps: length of the warm-up (0: start at ``peak``).
        total_steps: the step at which the rate reaches 0; ``>= warmup_steps``.

    Returns:
        A schedule ``step -> lr``: ``peak * step / warmup_steps`` before ``warmup_steps``, then
        ``peak * max(0, (total_steps - step) / (total_steps - warmup_steps))``.

    Example:
        >>> opt = af.optim.adamw(lr=af.optim.linear_warmup_decay(5e-4, warmup_steps=10, total_steps=200))
    """
    _check_peak("linear_warmup_decay", peak=peak)
    _check_steps("linear_warmup_decay", warmup_steps=warmup_steps, total_steps=total_steps)
    if total_steps < warmup_steps:
        raise ConfigError(f"linear_warmup_decay: total_steps ({total_steps}) < warmup_steps ({warmup_steps})")
    return functools.partial(linear_warmup_decay_at, peak=float(peak), warmup_steps=warmup_steps,
                             total_steps=total_steps)


def linear_warmup_decay_at(step: Any, *, peak: float, warmup_steps: int, total_steps: int) -> Any:
    """The :func:`linear_warmup_decay` schedule at ``step`` (an int, or a 0-d tensor under transforms)."""
    up = max(1, warmup_steps)
    down = max(1, total_steps - warmup_steps)
    if isinstance(step, torch.Tensor):
        s = step.to(torch.float64)
        return peak * torch.where(s < warmup_steps, s / up, ((total_steps - s) / down).clamp(min=0.0))
    if step < warmup_steps:
        return peak * step / up
    return peak * max(0.0, (total_steps - step) / down)


def cosine(peak: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then a half cosine from ``peak`` down to
    ``min_lr`` at ``total_steps`` (``min_lr`` afterwards).

    Arguments:
        peak: the largest learning rate.
        total_steps: the step at which the rate reaches ``min_lr``; ``>= warmup_steps``.
        warmup_steps: length of the linear warm-up (default 0).
        min_lr: the final rate (default 0).

    Returns:
        A schedule ``step -> lr``: after warm-up,
        ``min_lr + (peak - min_lr) * (1 + cos(pi * progress)) / 2`` with ``progress`` going from 0 to 1.

    Example:
        >>> opt = af.optim.adamw(lr=af.optim.cosine(1e-3, total_steps=500, warmup_steps=20))
    """
    _check_peak("cosine", peak=peak, min_lr=min_lr)
    _check_steps("cosine", warmup_steps=warmup_steps, total_steps=total_steps)
    if total_steps < warmup_steps:
        raise ConfigError(f"cosine: total_steps ({total_steps}) < warmup_steps ({warmup_steps})")
    return functools.partial(cosine_at, peak=float(peak), total_steps=total_steps, warmup_steps=warmup_steps,
                             min_lr=float(min_lr))


def cosine_at(step: Any, *, peak: float, total_steps: int, warmup_steps: int, min_lr: float) -> Any:
    """The :func:`cosine` schedule at ``step`` (an int, or a 0-d tensor under transforms)."""
    up = max(1, warmup_steps)
    down = max(1, total_steps - warmup_steps)
    if isinstance(step, torch.Tensor):
        s = step.to(torch.float64)
        progress = ((s - warmup_steps) / down).clamp(0.0, 1.0)
        decayed = min_lr + (peak - min_lr) * 0.5 * (1.0 + torch.cos(math.pi * progress))
        return torch.where(s < warmup_steps, peak * s / up, decayed)
    if step < warmup_steps:
        return peak * step / up
    progress = min(1.0, (step - warmup_steps) / down)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -- optimisers -----------------------------------------------------------------------------------------
def _new_count(items: list[tuple[Key, torch.Tensor]]) -> torch.Tensor:
    device = items[0][1].device if items else None
    return torch.zeros((), dtype=torch.int64, device=device)


def _check_count(state: Any, cls: type, what: str) -> torch.Tensor:
    if not isinstance(state, cls):
        raise ConfigError(f"{what}: state must be the {cls.__name__} from this optimiser's init, "
                          f"got {type(state).__name__}")
    return state.count


def adamw(
    lr: float | Schedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> Optimizer:
    """AdamW (Adam with decoupled weight decay), as ``torch.optim.AdamW`` computes it.

    Each update runs ``torch.optim.adamw.adamw`` on copies of the trainable leaves and of the state. In
    eager mode it is the same call ``torch.optim.AdamW.step`` makes (same kernel choice, same result).
    Under ``vmap``/``grad``/``torch.compile`` the step count and a scheduled ``lr`` stay tensors: the
    kernel's tensor-step form gives the Adam direction and ``lr`` and the decay are applied to it, which
    agrees with the eager result to float rounding and is differentiable.

    Arguments:
        lr: learning rate, a float or a schedule ``step -> lr`` (see the module docstring).
        betas: ``(beta1, beta2)``, the moment decay rates, each in [0, 1).
        eps: added to the denominator.
        weight_decay: decoupled decay: each update first multiplies the leaves by ``1 - lr * weight_decay``.

    Returns:
        An :class:`Optimizer`; its state is an :class:`AdamWState`.

    Example:
        >>> opt = af.optim.adamw(lr=1e-3, weight_decay=0.0)
        >>> state = opt.init(adapter)
        >>> loss, grads = torch.func.grad_and_value(loss_fn)(adapter, batch)[::-1]
        >>> adapter, state = opt.update(grads, state, adapter)
    """
    schedule = _check_lr(lr, "adamw")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise ConfigError(f"adamw: betas must be two floats in [0, 1), got {betas!r}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ConfigError(f"adamw: eps must be a non-negative float, got {eps!r}")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ConfigError(f"adamw: weight_decay must be a non-negative float, got {weight_decay!r}")
    return Optimizer(adamw_init, functools.partial(adamw_update, lr=schedule, beta1=float(betas[0]),
                                                   beta2=float(betas[1]), eps=float(eps),
                                                   weight_decay=float(weight_decay)))


def adamw_init(adapter: Tree) -> AdamWState:
    """A fresh :class:`AdamWState` for ``adapter``: count 0, zero moments (:func:`adamw`'s ``init``)."""
    items = _items(adapter, "adamw.init")
    return AdamWState(_new_count(items), _nest([(k, torch.zeros_like(t)) for k, t in items]),
                      _nest([(k, torch.zeros_like(t)) for k, t in items]))


def adamw_update(grads: Tree, state: AdamWState, adapter: Tree, *, lr: Schedule, beta1: float, beta2: float,
                 eps: float, weight_decay: float) -> tuple[Tree, AdamWState]:
    """One AdamW step (:func:`adamw`'s ``update``, the hyper-parameters bound by it): ``(new adapter, new
    state)``; ``grads``, ``state`` and ``adapter`` are untouched."""
    count = _check_count(state, AdamWState, "adamw.update")
    keys, params, gs = _leaves_and_grads(adapter, grads, "adamw.update")
    mus = _pick(state.mu, keys, params, "adamw.update: state.mu")
    nus = _pick(state.nu, keys, params, "adamw.update: state.nu")
    hyper = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    step = _adamw_traced if _is_traced([count, *params, *gs, *mus, *nus]) else _adamw_eager
    new_p, new_m, new_v = step(params, gs, mus, nus, count, lr, **hyper)
    new_adapter = _with_leaves(adapter, dict(zip(keys, new_p)))
    return new_adapter, AdamWState(count + 1, _nest(list(zip(keys, new_m))), _nest(list(zip(keys, new_v))))


def _adamw_eager(params: list[torch.Tensor], gs: list[torch.Tensor], mus: list[torch.Tensor],
                 nus: list[torch.Tensor], count: torch.Tensor, schedule: Schedule, *, beta1: float, beta2: float,
                 eps: float, weight_decay: float) -> tuple[list[torch.Tensor], ...]:
    """The call ``torch.optim.AdamW.step`` makes, on copies (bit for bit its result)."""
    with torch.no_grad():
        lr_now = _lr_at(schedule, count, False)
        new_p = [p.detach().clone() for p in params]
        new_m = [m.detach().clone() for m in mus]
        new_v = [v.detach().clone() for v in nus]
        steps = [torch.tensor(float(int(count))) for _ in params]
        _adamw_kernel(new_p, [g.detach() for g in gs], new_m, new_v, [], steps, foreach=None, amsgrad=False,
                      beta1=beta1, beta2=beta2, lr=lr_now, weight_decay=weight_decay, eps=eps, maximize=False)
    return new_p, new_m, new_v


def _adamw_traced(params: list[torch.Tensor], gs: list[torch.Tensor], mus: list[torch.Tensor],
                  nus: list[torch.Tensor], count: torch.Tensor, schedule: Schedule, *, beta1: float, beta2: float,
                  eps: float, weight_decay: float) -> tuple[list[torch.Tensor], ...]:
    """Under vmap / grad / torch.compile: the step count (and a scheduled lr) may be batched tensors, so
    the kernel's tensor-step form runs with lr=1 from a zero start to get the Adam direction; then
    ``p * (1 - lr * wd) + lr * direction`` (a zero lr is fine)."""
    lr_now = _lr_at(schedule, count, True)
    new_m = [m.clone() for m in mus]
    new_v = [v.clone() for v in nus]
    step = count.to(torch.float32)
    steps = [step.clone() for _ in params]  # the kernel increments each one in place
    dirs = [torch.zeros_like(p) for p in params]
    _adamw_kernel(dirs, list(gs), new_m, new_v, [], steps, foreach=False, differentiable=True, amsgrad=False,
                  beta1=beta1, beta2=beta2, lr=1.0, weight_decay=0.0, eps=eps, maximize=False)
    lr_t = lr_now if isinstance(lr_now, torch.Tensor) else torch.tensor(lr_now, dtype=torch.float64)
    new_p = [(p * (1 - lr_t.to(p.dtype) * weight_decay) if weight_decay else p) + lr_t.to(p.dtype) * d
             for p, d in zip(params, dirs)]
    return new_p, new_m, new_v


def sgd(lr: float | Schedule, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> Optimizer:
    """Stochastic gradient descent with optional momentum and (L2) weight decay, as ``torch.optim.SGD``
    computes it (``dampening=0``).

    Runs ``torch.optim.sgd.sgd`` on copies of the trainable leaves and momentum buffers. The buffers
    start at zero, which gives exactly torch's first step (``buffer = gradient``).

    Arguments:
        lr: learning rate, a float or a schedule ``step -> lr`` (see the module docstring).
        momentum: momentum factor in [0, 1); 0 keeps no buffers.
        weight_decay: L2 penalty: ``weight_decay * leaf`` is added to the gradient.
        nesterov: Nesterov momentum (needs ``momentum > 0``).

    Returns:
        An :class:`Optimizer`; its state is an :class:`SGDState`.

    Example:
        >>> opt = af.optim.sgd(0.1, momentum=0.9)
        >>> state = opt.init(adapter)
        >>> adapter, state = opt.update(torch.func.grad(loss_fn)(adapter, batch), state, adapter)
    """
    schedule = _check_lr(lr, "sgd")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ConfigError(f"sgd: momentum must be a float in [0, 1), got {momentum!r}")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ConfigError(f"sgd: weight_decay must be a non-negative float, got {weight_decay!r}")
    if nesterov and momentum == 0:
        raise ConfigError("sgd: nesterov=True needs momentum > 0")
    momentum, weight_decay, nesterov = float(momentum), float(weight_decay), bool(nesterov)
    return Optimizer(functools.partial(sgd_init, momentum=momentum),
                     functools.partial(sgd_update, lr=schedule, momentum=momentum, weight_decay=weight_decay,
                                       nesterov=nesterov))


def sgd_init(adapter: Tree, *, momentum: float) -> SGDState:
    """A fresh :class:`SGDState` for ``adapter`` (:func:`sgd`'s ``init``): count 0, zero momentum buffers
    (None without momentum)."""
    items = _items(adapter, "sgd.init")
    bufs = _nest([(k, torch.zeros_like(t)) for k, t in items]) if momentum else None
    return SGDState(_new_count(items), bufs)


def sgd_update(grads: Tree, state: SGDState, adapter: Tree, *, lr: Schedule, momentum: float, weight_decay: float,
               nesterov: bool) -> tuple[Tree, SGDState]:
    """One SGD step (:func:`sgd`'s ``update``, the hyper-parameters bound by it): ``(new adapter, new
    state)``; ``grads``, ``state`` and ``adapter`` are untouched."""
    count = _check_count(state, SGDState, "sgd.update")
    keys, params, gs = _leaves_and_grads(adapter, grads, "sgd.update")
    if momentum:
        if state.momentum is None:
            raise ConfigError("sgd.update: state has no momentum buffers; make it with this optimiser's init")
        bufs_in = _pick(state.momentum, keys, params, "sgd.update: state.momentum")
    else:
        bufs_in = []
    traced = _is_traced([count, *params, *gs, *bufs_in])
    step = _sgd_traced if traced else _sgd_eager
    new_p, bufs = step(params, gs, bufs_in, count, lr, momentum=momentum, weight_decay=weight_decay,
                       nesterov=nesterov)
    new_state = SGDState(count + 1, _nest(list(zip(keys, bufs))) if momentum else None)  # type: ignore[arg-type]
    return _with_leaves(adapter, dict(zip(keys, new_p))), new_state


def _sgd_eager(params: list[torch.Tensor], gs: list[torch.Tensor], bufs_in: list[torch.Tensor], count: torch.Tensor,
               schedule: Schedule, *, momentum: float, weight_decay: float,
               nesterov: bool) -> tuple[list[torch.Tensor], list[Any]]:
    """The call ``torch.optim.SGD.step`` makes, on copies."""
    with torch.no_grad():
        lr_now = _lr_at(schedule, count, False)
        new_p = [p.detach().clone() for p in params]
        bufs: list[Any] = [b.detach().clone() for b in bufs_in] if momentum else [None] * len(params)
        _sgd_kernel(new_p, [g.detach() for g in gs], bufs, foreach=None, weight_decay=weight_decay, lr=lr_now,
                    momentum=momentum, dampening=0.0, nesterov=nesterov, maximize=False)
    return new_p, bufs


def _sgd_traced(params: list[torch.Tensor], gs: list[torch.Tensor], bufs_in: list[torch.Tensor], count: torch.Tensor,
                schedule: Schedule, *, momentum: float, weight_decay: float,
                nesterov: bool) -> tuple[list[torch.Tensor], list[Any]]:
    """Under vmap / grad / torch.compile. The kernel scales by lr through ``alpha=``, which takes a Python
    number, and a scheduled lr is a (possibly batched) tensor here: fold the L2 term into the gradient as
    the kernel does, let it compute the step with lr=1 from a zero start, and scale that step by lr."""
    lr_now = _lr_at(schedule, count, True)
    new_p = [p.clone() for p in params]
    bufs: list[Any] = [b.clone() for b in bufs_in] if momentum else [None] * len(params)
    kw = dict(momentum=momentum, dampening=0.0, nesterov=nesterov, maximize=False)
    if isinstance(lr_now, torch.Tensor):
        gs = [g.add(p, alpha=weight_decay) if weight_decay else g for g, p in zip(gs, new_p)]
        deltas = [torch.zeros_like(p) for p in new_p]
        _sgd_kernel(deltas, list(gs), bufs, foreach=False, weight_decay=0.0, lr=1.0, **kw)
        new_p = [p + lr_now.to(p.dtype) * d for p, d in zip(new_p, deltas)]
    else:
        _sgd_kernel(new_p, list(gs), bufs, foreach=False, weight_decay=weight_decay, lr=lr_now, **kw)
    return new_p, bufs
