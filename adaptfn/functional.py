"""``functional(model) -> (fn, params)`` and the call machinery behind injected adapters.

How a call runs. Each thread keeps one **structural copy** of the model: new module objects sharing the
model's tensors, whose Linear / Embedding / Conv1D / ConvNd / MultiheadAttention modules get an instance
``forward`` (a slot) that
composes the base forward with whatever adapter methods are bound to it. An adapter's leaves are bound
to the slots of its target modules for the duration of one call (so they stay inputs of the call:
vmap, grad and torch.compile see them), and only the tensors that differ from what the copy already
holds (replacements, base tensors the caller replaced) are swapped in. The static plan of a call is
cached by adapter structure (:attr:`Adapter.structure_key`). The user's model is never touched;
threads never share a copy.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.utils._pytree as torch_pytree
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from . import _fsdp, _layout, quant, routing
from ._leaves import check_leaves
from .adapter import COEF, GATE, Adapter, coef_value, gate_on
from .errors import ConfigError, IncompatibleAdapterError, shape_str, stacked_called_directly
from .methods import get_method, trainable_tokens, weight_entries, weight_tying
from .methods.common import MODULE_PATH, is_conv1d
from .methods.layers import ModuleCall, conv_kind, is_mha

__all__ = ["FunctionalModel", "functional", "structural_copy"]


class _Slot:
    """Per adapted module of a structural copy: what to compose with its base forward this call."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active: list[tuple[Any, Any, Mapping[str, torch.Tensor], Any, Any]] = []


class _Copy:
    __slots__ = ("root", "mods", "slots", "busy", "swapped")

    def __init__(self, root: nn.Module, mods: dict[str, nn.Module], slots: dict[str, _Slot]) -> None:
        self.root, self.mods, self.slots, self.busy = root, mods, slots, False
        self.swapped: set[str] = set()  # names the running call replaced (FSDP's refresh leaves them alone)

    def slot(self, path: str) -> _Slot:
        """The adapter slot of a module (installed on first use for module kinds not prepared up front)."""
        s = self.slots.get(path)
        if s is None:
            s = self.slots[path] = _install(self.mods[path], path)
        return s


def _rebind(value: Any, old: nn.Module, new: nn.Module) -> Any:
    """Methods/partials of the old module stored on the instance (e.g. accelerate hooks) -> the copy."""
    if isinstance(value, types.MethodType) and value.__self__ is old:
        return types.MethodType(value.__func__, new)
    if isinstance(value, functools.partial) and value.args and value.args[0] is old:
        return functools.partial(value.func, new, *value.args[1:], **(value.keywords or {}))
    return value


def structural_copy(root: nn.Module, tensors: Mapping[int, torch.Tensor]) -> tuple[nn.Module, dict[str, nn.Module]]:
    """New module objects with the same classes, hooks and attributes; parameters and buffers are the
    tensors in ``tensors`` (by ``id`` of the original). Returns the copy and its modules by path."""
    memo: dict[int, nn.Module] = {}

    def visit(m: nn.Module) -> nn.Module:
        hit = memo.get(id(m))
        if hit is not None:
            return hit
        new = object.__new__(type(m))  # not type(m).__new__: FSDP2's classes re-run __init__ there
        new.__dict__.update(m.__dict__)
        memo[id(m)] = new
        d = new.__dict__
        for k, v in list(d.items()):
            if k.startswith("_") and type(v) in (dict, OrderedDict, set):
                d[k] = type(v)(v)
            else:
                d[k] = _rebind(v, m, new)
        d["_parameters"] = {k: (None if p is None else tensors.get(id(p), p)) for k, p in m._parameters.items()}
        d["_buffers"] = {k: (None if b is None else tensors.get(id(b), b)) for k, b in m._buffers.items()}
        d["_modules"] = {k: (None if c is None else visit(c)) for k, c in m._modules.items()}
        return new

    new_root = visit(root)
    return new_root, dict(new_root.named_modules(remove_duplicate=False))


class _Local(threading.local):
    """Per-thread state: this thread's structural copy of the model."""

    def __init__(self) -> None:
        self.copy: _Copy | None = None


class _Base:
    """What all FunctionalModels of one model share: tensors, aliases, module info, per-thread copies."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        by_id: dict[int, torch.Tensor] = {}
        params: dict[str, torch.Tensor] = {}
        groups: dict[int, list[str]] = {}
        named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
        for name, t in named:
            if id(t) not in by_id:
                # plain Parameters are detached (the base is frozen by construction); parameter subclasses
                # (bitsandbytes' Params4bit / Int8Params) carry quantisation state and are kept as they are
                by_id[id(t)] = t.detach() if type(t) is nn.Parameter else t
            params[name] = by_id[id(t)]
            groups.setdefault(id(t), []).append(name)
        self.tensors = by_id
        self.params = params
        self.aliases = {n: tuple(g) for g in groups.values() for n in g}
        self.modules = dict(model.named_modules(remove_duplicate=False))
        # fn runs in the mode the model had when functional() was called, whatever the user does later
        self.training = {p: m.training for p, m in self.modules.items()}
        # transformers' gradient checkpointing recomputes layers in backward, after a call has unbound its
        # adapter: the recomputation would run without it, so adapters refuse such a model (see inject)
        self.checkpointing = [p for p, m in self.modules.items()
                              if getattr(m, "gradient_checkpointing", False) is True and m.training]
        self.local = _Local()
        self.checked: weakref.WeakSet[Adapter] = weakref.WeakSet()  # adapters already checked against the model
        self.plans: dict[tuple, tuple] = {}  # call plans by adapter structure
        quant.register(model, self.modules, by_id)  # quantized layers: see adaptfn/quant.py
        _layout.register(self.modules, by_id)  # which weights are stored [in, out]: see adaptfn/_layout.py
        trainable_tokens.register(model, by_id)  # a tied input embedding: see adaptfn/methods/trainable_tokens.py

    def copy(self) -> _Copy:
        """This thread's structural copy (one per thread, whatever the adapters: every module an adapter
        method can target gets a slot up front, so nothing about the copy depends on the adapter and
        torch.compile sees one stable object). A re-entrant call gets a fresh, uncached copy."""
        cp = self.local.copy
        if cp is None:
            cp = self.local.copy = self._build()
        elif cp.busy:
            cp = self._build()
        return cp

    def _build(self) -> _Copy:
        root, mods = structural_copy(self.model, self.tensors)
        for p, m in mods.items():
            m.training = self.training.get(p, m.training)
        quant.install(self.model, mods)  # pure forward on the copy's quantized layers (before adapter slots)
        slots = {p: _install(m, p) for p, m in mods.items() if p and _adaptable(m)}
        cp = _Copy(root, mods, slots)
        _fsdp.install(self.modules, mods, cp.swapped)  # FSDP2-sharded bases: full parameters during forward
        return cp


def _adaptable(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Embedding)) or is_conv1d(m) or conv_kind(m) is not None or is_mha(m)


def _install(module: nn.Module, path: str) -> _Slot:
    slot = _Slot()
    module.__dict__[MODULE_PATH] = path  # read by error messages (see methods.common.module_path)
    base_forward = module.forward
    first = _first_input(type(module))

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not slot.active:
            return base_forward(*args, **kwargs)
        if args:
            x, args = args[0], args[1:]
        else:  # the first input passed by name (mha(query=q, key=k, value=v))
            x = kwargs.pop(first)

        # the bound forward itself when x is the only argument (lets a method recognise a plain base layer); with
        # more arguments (nn.MultiheadAttention's key, value, masks) a ModuleCall, which also holds them
        f: Any = ModuleCall(base_forward, args, kwargs) if args or kwargs else base_forward
        if len(slot.active) == 1:  # the common case, without building partials
            method, entry, leaves, on, gen, route = slot.active[0]
            return method.forward(entry, leaves, on, gen, f, module, x, route)
        fn: Any = base_forward
        for method, entry, leaves, on, gen, route in slot.active:
            fn = functools.partial(_forward_with, (method, entry, leaves, on, gen, fn, module, route))
        return fn(x, *args, **kwargs)

    module.__dict__["forward"] = forward
    return slot


@functools.cache
def _first_input(cls: type) -> str:
    """The name of the first argument of ``cls.forward`` after ``self`` (``input``, ``query``, ...)."""
    try:
        params = list(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return "input"
    return params[1] if len(params) > 1 else "input"


def _forward_with(spec: tuple, x: Any, /, *args: Any, **kwargs: Any) -> Any:
    """One method composed over an inner forward (several adapters on one module: each wraps the previous),
    called with the module's arguments; ``spec``: (method, entry, leaves, on, generator, inner, module, route)."""
    method, entry, leaves, on, gen, inner, module, route = spec
    call_base = ModuleCall(inner, args, kwargs) if args or kwargs else inner
    return method.forward(entry, leaves, on, gen, call_base, module, x, route)


class FunctionalModel:
    """A pure function of ``(params, *args, **kwargs)`` that runs a model, optionally with adapters.

    Made by :func:`functional` and :func:`adaptfn.inject`; never mutates the model, the params or the
    adapters. ``fn(params, **inputs) == model(**inputs)``; ``fn.generate(params, **inputs)`` runs
    ``model.generate``.
    """

    def __init__(self, base: _Base, adapters: tuple[Adapter, ...] = (), generator: torch.Generator | None = None,
                 routes: tuple[Any, ...] | None = None, pools: tuple[tuple[Any, torch.Tensor], ...] = ()):
        self._base = base
        self._adapters = adapters
        self._generator = generator
        self._routes = routes if routes is not None else (None,) * len(adapters)
        self._pools = pools  # (adapter pool, route) pairs, bound per call (adaptfn.pooling)
        self._all = next((i for i, r in enumerate(self._routes) if isinstance(r, str)), None)
        self._all_n = adapters[self._all].stack_size if self._all is not None else 0
        self._key = tuple(a.structure_id for a in adapters)
        self._all_routes: dict[tuple, torch.Tensor] = {}
        compiling = torch.compiler.is_compiling()
        hit = None if compiling else base.plans.get(self._key)
        if hit is not None and hit[0] == tuple(a.structure_key for a in adapters):
            self._deltas, self._repl, self._weights = hit[1], hit[2], hit[3]
            return
        # Static plan of the call, from the adapters' structure only (their leaves are read per call):
        # deltas: (adapter index, path, method, entry); replacements: (adapter index, path, name, targets).
        deltas = []
        repl = []
        weights = []  # entries that change a module's tensors for the call (LoRA on parameters, trainable tokens)
        for i, a in enumerate(adapters):
            method = get_method(a.method)
            for path, e in a.entry_items:
                if e.kind and e.kind in getattr(method, "weight_kinds", ()):
                    weights.append((i, path, method, e) + weight_entries.call_plan(a, path, base.modules, base.params))
                elif e.kind:
                    deltas.append((i, path, method, e, path))
                    for p in weight_tying.call_partners(path, e, base.aliases):  # ensure_weight_tying: the tied
                        deltas.append((i, path, method, weight_tying.partner_entry(e), p))  # module, same leaves
                for name in e.replaced:
                    full = f"{path}.{name}" if path else name
                    targets = base.aliases.get(full, (full,)) if name in e.tied else (full,)
                    repl.append((i, path, name, targets, name in e.frozen))
        self._deltas = tuple(deltas)
        self._repl = tuple(repl)
        self._weights = tuple(weights)
        if not compiling:
            if len(base.plans) > 64:
                base.plans.clear()
            base.plans[self._key] = (tuple(a.structure_key for a in adapters), self._deltas, self._repl,
                                     self._weights)

    @property
    def model(self) -> nn.Module:
        """The model this function runs (read it, do not mutate it)."""
        return self._base.model

    @property
    def modules(self) -> Mapping[str, nn.Module]:
        """The model's modules by path (read them, do not mutate them)."""
        return self._base.modules

    @property
    def adapters(self) -> tuple[Adapter, ...]:
        return self._adapters

    @property
    def routes(self) -> tuple[Any, ...]:
        """Per injected adapter: its route (a LongTensor [batch], ``"all"``) or None."""
        return self._routes

    @property
    def generator(self) -> torch.Generator | None:
        """The generator LoRA dropout draws from (None: no dropout)."""
        return self._generator

    def with_adapters(self, adapters: tuple[Adapter, ...], generator: torch.Generator | None,
                      routes: tuple[Any, ...] | None = None) -> FunctionalModel:
        return FunctionalModel(self._base, adapters, generator, routes, self._pools)

    def with_pools(self, pools: tuple[tuple[Any, torch.Tensor], ...]) -> FunctionalModel:
        """This function with adapter pools added (``af.inject(fn, pool, route=idx)``): each is an object with
        ``bind(route) -> (route, [(path, kernel, entry, leaves), ...])``, bound to module slots per call."""
        return FunctionalModel(self._base, self._adapters, self._generator, self._routes, self._pools + pools)

    @property
    def pools(self) -> tuple[tuple[Any, torch.Tensor], ...]:
        """The adapter pools injected with their routes (:func:`adaptfn.pool`)."""
        return self._pools

    def __call__(self, params: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        if self._all is not None:
            return self._run_all(params, None, args, kwargs)
        return self._run(params, None, args, kwargs, self._check_routes(args, kwargs))

    def generate(self, params: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """``model.generate(*args, **kwargs)`` with ``params`` (and this function's adapters)."""
        if not hasattr(self._base.model, "generate"):
            raise ConfigError(f"{type(self._base.model).__name__} has no generate method")
        with torch.no_grad():
            if self._all is not None:
                return self._run_all(params, "generate", args, kwargs)
            return self._run(params, "generate", args, kwargs, self._check_routes(args, kwargs))

    def _check_routes(self, args: tuple, kwargs: dict) -> tuple[Any, ...]:
        routes = self._routes
        if any(r is not None for r in routes) or self._pools:
            bsz = _batch_size(args, kwargs)
            for r in routes + tuple(r for _, r in self._pools):
                if r is not None and bsz is not None and r.shape[0] != bsz:
                    raise ConfigError(f"route has {r.shape[0]} entries but the batch has {bsz} rows")
        return routes

    def _run_all(self, params: Mapping[str, torch.Tensor], attr: str | None, args: tuple, kwargs: dict) -> Any:
        """Every adapter of the stack on the same inputs: the batch is repeated per adapter and routed."""
        i = self._all
        n = self._all_n
        bsz = _batch_size(args, kwargs)
        if bsz is None:
            raise ConfigError("route='all' needs a tensor input with a batch dimension")

        def rep(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == bsz:
                return t.repeat(n, *([1] * (t.dim() - 1)))
            return t

        args2 = tuple(rep(a) for a in args)
        kwargs2 = {k: rep(v) for k, v in kwargs.items()}
        dev = next((t.device for t in list(args2) + list(kwargs2.values()) if isinstance(t, torch.Tensor)), None)
        route = self._all_route(n, bsz, dev)
        routes = tuple(route if j == i else r for j, r in enumerate(self._routes))
        with routing.same_inputs(route):
            out = self._run(params, attr, args2, kwargs2, routes)

        def split(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] % n == 0 and t.shape[0] >= n * bsz:
                return t.reshape(n, t.shape[0] // n, *t.shape[1:])
            return t

        return torch_pytree.tree_map(split, out)

    def _all_route(self, n: int, bsz: int, dev: Any) -> torch.Tensor:
        """[0]*bsz + [1]*bsz + ...: made once per (n, bsz, device) outside inference mode, so kernels can
        cache what they derive from it (an inference tensor has no version counter to validate a cache)."""
        if torch.compiler.is_compiling():
            return torch.arange(n, device=dev).repeat_interleave(bsz)
        key = (n, bsz, str(dev))
        hit = self._all_routes.get(key)
        if hit is None:
            with torch.inference_mode(False):
                hit = self._all_routes[key] = torch.arange(n, device=dev).repeat_interleave(bsz)
        return hit

    def __repr__(self) -> str:
        inner = ", ".join(repr(a) for a in self._adapters)
        return f"FunctionalModel({type(self._base.model).__name__}" + (f", {inner})" if inner else ")")

    def _run(self, params: Mapping[str, torch.Tensor], attr: str | None, args: tuple, kwargs: dict,
             routes: tuple[Any, ...]) -> Any:
        base = self._base
        if not isinstance(params, Mapping):
            raise ConfigError(f"params must be a mapping of parameter names to tensors (the dict af.functional "
                              f"returned), got {type(params).__name__}")
        cp = base.copy()
        held = base.params
        swaps: dict[str, torch.Tensor] = {}
        for k in params:
            v = params[k]
            if held.get(k) is not v:
                if not isinstance(v, torch.Tensor):
                    raise ConfigError(f"params[{k!r}] is a {type(v).__name__}, not a tensor")
                swaps[k] = v
        tensors = [a.tensors for a in self._adapters]
        for i, path, name, targets, frozen in self._repl:
            if routes[i] is not None:  # routed stacks carry only frozen copies of base tensors: not applied
                continue
            leaves = tensors[i][path]
            on = gate_on(leaves[GATE])
            if on is False:
                continue
            c = None if frozen else leaves.get(COEF)
            cv = coef_value(c)
            if cv == 0.0:  # weight 0: the base tensor, exactly
                continue
            if cv == 1.0:
                c = None
            v = leaves[name].detach() if frozen else leaves[name]
            for t in targets:
                cur = swaps[t] if t in swaps else held[t]
                if v.dim() != cur.dim():
                    raise stacked_called_directly(t)
                vt = v if v.dtype == cur.dtype else v.to(cur.dtype)
                if c is not None and cur.is_floating_point():  # a weighted replacement: base + w (v - base)
                    vt = torch.lerp(cur, vt, c.to(cur.dtype))
                swaps[t] = vt if on is True else torch.where(on, vt, cur)
        for i, path, method, e, names, targets in self._weights:
            weight_entries.swap_in(method, e, tensors[i][path], routes[i], path, names, targets, swaps, held)
        used: list[_Slot] = []
        gen = self._generator
        for i, path, method, e, at in self._deltas:
            leaves = tensors[i][path] if at == path else weight_tying.partner_leaves(tensors[i][path])
            on = gate_on(leaves[GATE])
            if on is True and coef_value(leaves.get(COEF)) == 0.0:  # weight 0: skipped, so the base bit for bit
                on = False
            if on is not False:
                slot = cp.slot(at)
                if not slot.active:
                    used.append(slot)
                slot.active.append((method, e, leaves, on, gen, routes[i]))
        for pool, route in self._pools:  # adapter pools: per-row LoRA from their own storage (adaptfn.pooling)
            route, bound = pool.bind(route)
            for path, kernel, entry, leaves in bound:
                slot = cp.slot(path)
                if not slot.active:
                    used.append(slot)
                slot.active.append((kernel, entry, leaves, True, None, route))
        cp.busy = True
        try:
            root = cp.root
            call = root if attr is None else getattr(root, attr)
            if swaps:
                cp.swapped.update(swaps)
                with _reparametrize_module(root, swaps, tie_weights=False, strict=False):
                    return call(*args, **kwargs)
            return call(*args, **kwargs)
        finally:
            cp.busy = False
            cp.swapped.clear()
            for slot in used:
                slot.active = []

    # -- used by inject/init ---------------------------------------------------------------------
    @property
    def params(self) -> dict[str, torch.Tensor]:
        """A new dict of the model's parameters and buffers (what :func:`functional` returned)."""
        return dict(self._base.params)

    def aliases(self, name: str) -> tuple[str, ...]:
        """Every name of the tensor ``params[name]`` (tied weights share one tensor); ``(name,)`` if untied."""
        return self._base.aliases.get(name, (name,))

    @contextlib.contextmanager
    def input_hooks(self, hooks: Mapping[str, Callable[[torch.Tensor], None]]) -> Iterator[None]:
        """Within the block, calls of this thread's structural copy pass each hooked module's first input to its
        hook (``path -> hook(x)``; used by data-driven inits, see :mod:`adaptfn.methods.lora_init`). The user's
        model is not touched."""
        cp = self._base.copy()

        def wrap(h: Callable[[torch.Tensor], None]) -> Callable[..., None]:
            return lambda module, args, kwargs: h(args[0] if args else next(iter(kwargs.values())))

        handles = [cp.mods[p].register_forward_pre_hook(wrap(h), with_kwargs=True) for p, h in hooks.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def check(self, adapter: Adapter) -> None:
        """Raise :class:`IncompatibleAdapterError` unless ``adapter`` fits this model (and
        :class:`ConfigError` for a delta adapter on a model with gradient checkpointing on)."""
        compiling = torch.compiler.is_compiling()
        if not compiling and adapter in self._base.checked:
            return
        checkpointing = self._base.checkpointing
        if checkpointing and any(e.kind for _, e in adapter.entry_items):
            raise ConfigError(
                f"inject: {type(self.model).__name__} has gradient checkpointing on (e.g. {checkpointing[0]!r}); its "
                "backward recomputes layers after the call has unbound the adapter, so the adapter's gradients "
                "would be wrong. Call model.gradient_checkpointing_disable() (or model.eval()) before "
                "af.functional.")
        method = get_method(adapter.method)
        mods = self._base.modules
        if not compiling:  # static checks; already done eagerly for this structure
            quant.check_adapter(self._base.model, adapter)
        check_leaves(adapter, "inject", self._base.params)  # dtypes: floating deltas, replacements of the base's kind
        for path, e in adapter.entry_items:
            mod = mods.get(path)
            if mod is None:
                near = [p for p in mods if p.endswith(path.rsplit(".", 1)[-1])][:3]
                raise IncompatibleAdapterError(
                    f"adapter targets module {path!r}, which {type(self._base.model).__name__} does not have"
                    + (f" (similar: {near})" if near else ""))
            leaves = adapter.leaves(path)
            if e.kind:
                method.check(path, e, leaves, mod)
            stacked = adapter.is_stacked
            for name in e.replaced:
                full = f"{path}.{name}" if path else name
                base_t = self._base.params.get(full)
                if base_t is None:
                    raise IncompatibleAdapterError(
                        f"adapter replaces {full!r}, which {type(self._base.model).__name__} does not have")
                if _fsdp.is_dtensor(base_t) or _fsdp.is_dtensor(leaves[name]):
                    raise IncompatibleAdapterError(
                        f"adapter replaces {full!r}, which FSDP shards (a DTensor): replacements "
                        "(modules_to_save, trained biases, saved embedding matrices) are not supported on an "
                        "FSDP-sharded base; leave that module out of fully_shard, or use a delta-only adapter")
                t = leaves[name]
                # stacked or single is read from the leaf's shape (under vmap a stacked leaf looks single)
                want = tuple(base_t.shape)
                if tuple(t.shape) != want and not (stacked and tuple(t.shape[1:]) == want):
                    raise IncompatibleAdapterError(
                        f"adapter replaces {full!r} with shape {shape_str(t.shape)} but the model's is "
                        f"{shape_str(want)}")
        if not compiling:
            self._base.checked.add(adapter)


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds", "input", "x"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return None


def functional(model: nn.Module) -> tuple[FunctionalModel, dict[str, torch.Tensor]]:
    """Turn a module into a pure function and its parameters.

    Arguments:
        model: any ``torch.nn.Module`` (transformers models included). It is never modified.

    Returns:
        ``(fn, params)``: ``fn(params, *args, **kwargs)`` equals ``model(*args, **kwargs)``;
        ``params`` maps every parameter and buffer path (tied ones under each name) to a tensor
        sharing storage with the model (parameters detached: the base is frozen by construction).

    Example:
        >>> fn, params = af.functional(model)
        >>> logits = fn(params, input_ids=ids).logits
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"functional: expected a torch.nn.Module, got {type(model).__name__}")
    base = _Base(model)
    base.copy()  # this thread's copy, built now rather than inside a first (possibly compiled) call
    return FunctionalModel(base), dict(base.params)
