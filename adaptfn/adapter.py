"""The :class:`Adapter` pytree: tensors are leaves, method / config / module specs are static.

An adapter holds, for each module path it touches, a small dict of tensors:

* **delta** leaves of its method (LoRA ``lora_A`` [r, in] and ``lora_B`` [out, r], ...): the base
  weight stays and something is added or scaled;
* **replacement** leaves named after the module's parameter (``weight``, ``bias``): the base tensor is
  swapped for the adapter's (``modules_to_save``, trained biases, PEFT's saved embedding matrices);
* ``gate``: a 0-d float tensor. The entry is on when ``gate != 0``. :func:`adaptfn.mask` sets it to 0.
  Only ``gate != 0`` is ever read, so the gate has zero gradient and multiplicative weight decay can
  never switch an entry on or off.

Stacked adapters (:func:`stack`) carry a leading axis ``N`` on every leaf, ranks zero-padded to the
largest, plus a ``scaling`` leaf [N] per delta entry (the per-adapter LoRA scale; read detached, so
its gradient is zero). Whether an adapter is stacked is read from leaf shapes against the static
ranks, so under ``torch.func.vmap`` a stacked adapter's leaves look, and run, like a single one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import optree
import torch
import torch.utils._pytree as torch_pytree

from .errors import ConfigError, IncompatibleAdapterError, shape_str

NAMESPACE = "adaptfn"
GATE = "gate"
SCALING = "scaling"
_NON_PARAMETER_LEAVES = (GATE, SCALING)


@dataclasses.dataclass(frozen=True)
class Entry:
    """Static description of what an adapter does to one module.

    Attributes:
        kind: the method's delta kind for this module ("linear", "embedding", ...); "" when the entry
            only replaces parameters.
        r: rank of the delta (0 when there is none).
        scaling: the delta's scale (LoRA ``lora_alpha / r``); stacked adapters use their ``scaling`` leaf.
        fan_in_fan_out: whether the base weight is stored [in, out] (GPT-2 ``Conv1D``); None when not
            known yet (an adapter read from a file before meeting a model).
        replaced: names of the module's tensors this entry replaces (leaves of the same name).
        tied: those of ``replaced`` that replace every alias of the base tensor (PEFT's
            ``base_layer.*`` keys are loaded into the shared tensor); the others untie.
        frozen: those of ``replaced`` that are carried for the file format only (PEFT's saved embedding
            matrices): read detached, so their gradient is zero, and not counted as trainable.
        options: method-specific static settings, as ``(name, value)`` pairs.
    """

    kind: str = ""
    r: int = 0
    scaling: float = 1.0
    fan_in_fan_out: bool | None = None
    replaced: tuple[str, ...] = ()
    tied: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    frozen: tuple[str, ...] = ()

    def __post_init__(self) -> None:  # one canonical order, whoever built the entry
        for name in ("replaced", "tied", "frozen"):
            object.__setattr__(self, name, tuple(sorted(getattr(self, name))))

    def option(self, name: str, default: Any = None) -> Any:
        for k, v in self.options:
            if k == name:
                return v
        return default


@dataclasses.dataclass(frozen=True)
class StackInfo:
    """Static record of the adapters a stacked adapter was made of (for :func:`unstack`)."""

    configs: tuple[Any, ...]
    entries: tuple[tuple[tuple[str, Entry], ...], ...]

    @property
    def n(self) -> int:
        return len(self.configs)


class Adapter:
    """An immutable adapter: static ``method``, ``config`` and per-module :class:`Entry`; tensor leaves.

    Build one with :func:`adaptfn.init` or :func:`adaptfn.load`; transform it with
    :func:`adaptfn.select`, :func:`adaptfn.mask`, :func:`adaptfn.stack`, ``af.tree.map``.

    Arguments:
        method: method name ("lora").
        config: the method's config (e.g. :class:`adaptfn.LoraConfig`).
        entries: module path -> :class:`Entry`.
        tensors: module path -> {leaf name -> tensor}; every entry has a ``gate`` leaf.
        stack_info: set on stacked adapters.
    """

    __slots__ = ("_method", "_config", "_entries", "_tensors", "_stack", "_key", "_key_id", "__weakref__")

    def __init__(
        self,
        method: str,
        config: Any,
        entries: Mapping[str, Entry],
        tensors: Mapping[str, Mapping[str, Any]],
        stack_info: StackInfo | None = None,
    ) -> None:
        paths = tuple(sorted(entries))  # one canonical order, whoever built the adapter
        if set(paths) != set(tensors):
            raise IncompatibleAdapterError(
                f"adapter entries and tensors disagree: {sorted(set(paths) ^ set(tensors))}"
            )
        object.__setattr__(self, "_method", method)
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_entries", tuple((p, entries[p]) for p in paths))
        object.__setattr__(self, "_tensors", {p: dict(tensors[p]) for p in paths})
        object.__setattr__(self, "_stack", stack_info)
        object.__setattr__(self, "_key", (method, self._entries, tuple(
            (p, tuple(sorted(d))) for p, d in self._tensors.items())))
        # an int naming the structure: what caches are keyed by (torch.compile guards it by value)
        object.__setattr__(self, "_key_id", hash(self._key))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Adapter is immutable; use adaptfn's transforms or af.tree.map to make a new one")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Adapter is immutable; use adaptfn's transforms or af.tree.map to make a new one")

    # -- static structure ------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self._method

    @property
    def config(self) -> Any:
        return self._config

    @property
    def entries(self) -> Mapping[str, Entry]:
        """module path -> :class:`Entry` (read-only)."""
        return MappingProxyType(dict(self._entries))

    @property
    def entry_items(self) -> tuple[tuple[str, Entry], ...]:
        """``(module path, Entry)`` pairs, in order."""
        return self._entries

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self._entries)

    @property
    def stack_info(self) -> StackInfo | None:
        return self._stack

    @property
    def tensors(self) -> Mapping[str, Mapping[str, torch.Tensor]]:
        """module path -> {leaf name -> tensor} (read-only views)."""
        return MappingProxyType({p: MappingProxyType(d) for p, d in self._tensors.items()})

    def leaves(self, path: str) -> Mapping[str, torch.Tensor]:
        return MappingProxyType(self._tensors[path])

    @property
    def structure_key(self) -> tuple:
        """Hashable static structure: what decides the code path."""
        return self._key

    @property
    def structure_id(self) -> int:
        """``hash(structure_key)``: equal for adapters of the same structure."""
        return self._key_id

    @property
    def is_stacked(self) -> bool:
        return self._stack is not None

    @property
    def stack_size(self) -> int:
        """How many adapters a stacked adapter holds, read from its leaves' leading axis (so a stack whose
        leaves were sliced, ``af.tree.map(lambda t: t[:4], stacked)``, reports 4). Raises
        :class:`ConfigError` when the adapter is not stacked or its leaves disagree."""
        if self._stack is None:
            raise ConfigError("stack_size: the adapter is not stacked (make one with af.stack)")
        sizes = self._leading_sizes()
        if None in sizes:
            raise ConfigError(f"stacked adapter: leaf {sizes[None]} is a scalar; it has no adapter axis")
        if len(sizes) != 1:
            raise ConfigError("stacked adapter: the leaves' leading (adapter) axes differ: "
                              + ", ".join(sizes.values()))
        return next(iter(sizes))  # type: ignore[return-value]

    def _leading_sizes(self) -> dict[int | None, str]:
        """Each distinct leading-axis size of the tensor leaves (None: a scalar leaf) -> the first leaf with
        it, as ``path.name [shape]``."""
        sizes: dict[int | None, str] = {}
        for p, d in self._tensors.items():
            for name, t in d.items():
                if isinstance(t, torch.Tensor):
                    sizes.setdefault(int(t.shape[0]) if t.dim() else None, f"{p}.{name} {shape_str(t.shape)}")
        return sizes

    # -- summaries -------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Number of trainable scalars (deltas and replacements; not gates or stacked scalings)."""
        return sum(
            t.numel()
            for p, e in self._entries
            for n, t in self._tensors[p].items()
            if n not in _NON_PARAMETER_LEAVES and n not in e.frozen and isinstance(t, torch.Tensor)
        )

    def __repr__(self) -> str:
        deltas = [p for p, e in self._entries if e.kind]
        replaced = [f"{p}.{n}" if p else n for p, e in self._entries for n in e.replaced]
        ranks = sorted({e.r for _, e in self._entries if e.kind})
        dtypes = sorted({str(t.dtype).replace("torch.", "") for d in self._tensors.values()
                         for n, t in d.items() if n not in _NON_PARAMETER_LEAVES and isinstance(t, torch.Tensor)})
        names: dict[str, int] = {}
        for p in deltas:
            last = p.rsplit(".", 1)[-1]
            names[last] = names.get(last, 0) + 1
        targets = ", ".join(f"{k}×{v}" if v > 1 else k for k, v in sorted(names.items()))
        off = sum(1 for d in self._tensors.values()
                  if isinstance(d.get(GATE), torch.Tensor) and d[GATE].dim() == 0 and not bool(d[GATE] != 0))
        n_st = next((k for k in self._leading_sizes() if k is not None), 0) if self._stack else 0
        parts = [f"{self._method}" + (f" ×{n_st} stacked" if self._stack else "")]
        parts.append(f"{len(deltas)} modules [{targets}]")
        if ranks:
            parts.append("r=" + (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"))
        alpha = getattr(self._config, "lora_alpha", None)
        if alpha is not None and not self._stack:
            parts.append(f"alpha={alpha:g}")
        if replaced:
            shown = ", ".join(replaced[:4]) + (f", +{len(replaced) - 4}" if len(replaced) > 4 else "")
            parts.append(f"replaces [{shown}]")
        if off:
            parts.append(f"{off} masked")
        parts.append(f"{self.num_parameters():,} params {'/'.join(dtypes) or '-'}")
        return "Adapter(" + ", ".join(parts) + ")"


# -- pytree registration ---------------------------------------------------------------------------
def _flatten(a: Adapter) -> tuple[list[dict[str, Any]], tuple]:
    return [dict(a._tensors[p]) for p, _ in a._entries], (a._method, a._config, a._entries, a._stack)


def _unflatten(children: Iterable[Any], context: tuple) -> Adapter:
    method, config, entries, stack_info = context
    entries_d = dict(entries)
    return Adapter(method, config, entries_d, dict(zip(entries_d, children)), stack_info)


def _flatten_with_keys(a: Adapter) -> tuple[list[tuple[Any, Any]], tuple]:
    children, ctx = _flatten(a)
    return [(torch_pytree.MappingKey(p), c) for (p, _), c in zip(a._entries, children)], ctx


torch_pytree.register_pytree_node(
    Adapter,
    _flatten,
    _unflatten,
    serialized_type_name="adaptfn.Adapter",
    flatten_with_keys_fn=_flatten_with_keys,
)

optree.register_pytree_node(
    Adapter,
    lambda a: (*_flatten(a), a.paths),
    lambda ctx, children: _unflatten(children, ctx),
    path_entry_type=optree.MappingEntry,
    namespace=NAMESPACE,
)


# -- helpers used by the transforms ----------------------------------------------------------------
def replace(a: Adapter, *, tensors: Mapping[str, Mapping[str, Any]] | None = None,
            entries: Mapping[str, Entry] | None = None, config: Any = None) -> Adapter:
    """A new adapter with some parts swapped (the others shared)."""
    return Adapter(
        a.method,
        a.config if config is None else config,
        a.entries if entries is None else entries,
        a._tensors if tensors is None else tensors,
        a.stack_info,
    )


def gate_on(t: torch.Tensor) -> bool | torch.Tensor:
    """``True``/``False`` for a concrete scalar gate (fast path, exact skipping), else the bool tensor
    ``gate != 0`` (under vmap, grad, torch.compile)."""
    if (
        t.dim() == 0
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
        and t.device.type == "cpu"
    ):
        return t.item() != 0
    return t != 0


def _method_of(a: Adapter) -> Any:
    from .methods import get_method

    return get_method(a.method)


def stack(adapters: Sequence[Adapter]) -> Adapter:
    """Stack adapters of the same method and targets into one with a leading axis ``N`` on every leaf.

    Ranks are zero-padded to the largest (the padding contributes exactly nothing); each delta entry
    gets a ``scaling`` leaf [N], so adapters with different ranks and alphas stack.

    Arguments:
        adapters: a non-empty sequence of single (unstacked) adapters.

    Returns:
        A stacked :class:`Adapter`; ``af.unstack`` gives the originals back.

    Example:
        >>> stacked = af.stack([a1, a2, a3])
        >>> outs = torch.func.vmap(lambda a: af.inject(fn, a)(params, x))(stacked)
    """
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
    method = _method_of(first)
    entries: dict[str, Entry] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for p in first.paths:
        e0 = first.entries[p]
        r = max(a.entries[p].r for a in adapters)
        fif = {a.entries[p].fan_in_fan_out for a in adapters} - {None}
        if len(fif) > 1:
            raise IncompatibleAdapterError(f"stack: module {p!r} has mixed fan_in_fan_out across adapters")
        entries[p] = dataclasses.replace(e0, r=r, fan_in_fan_out=next(iter(fif), None))
        padded = [method.pad(a.entries[p], a._tensors[p], r) if e0.kind else a._tensors[p] for a in adapters]
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
    info = stacked.stack_info
    if info is None:
        raise ConfigError("unstack: the adapter is not stacked (make one with af.stack)")
    if stacked.stack_size != info.n:
        raise ConfigError(
            f"unstack: the stack's leaves hold {stacked.stack_size} adapters but it was built from {info.n}; "
            "slicing its leaves loses which adapters' configs remain: unstack the whole stack, then "
            "af.stack the ones you want")
    method = _method_of(stacked)
    out = []
    for i, (config, entries) in enumerate(zip(info.configs, info.entries)):
        ent = dict(entries)
        tensors = {}
        for p, e in ent.items():
            d = {n: t[i] for n, t in stacked._tensors[p].items() if n != SCALING}
            tensors[p] = method.unpad(e, d, e.r) if e.kind else d
        out.append(Adapter(stacked.method, config, ent, tensors))
    return out


class AdapterSum:
    """Several adapters active at once: their deltas add (PEFT's multi-adapter ``set_adapter([...])``).

    Made by :func:`adaptfn.select` with a list of names; accepted wherever an adapter is (``inject``,
    ``merge``, ``mask``, ``select``). A pytree whose children are the named adapters.
    """

    __slots__ = ("_names", "_parts")

    def __init__(self, parts: Mapping[str, Adapter]) -> None:
        seen: dict[str, str] = {}
        for name, a in parts.items():
            if not isinstance(a, Adapter):
                raise ConfigError(f"AdapterSum: {name!r} is a {type(a).__name__}, not an Adapter")
            for path, e in a.entry_items:
                for leaf in e.replaced:
                    full = f"{path}.{leaf}"
                    if full in seen:
                        raise ConfigError(
                            f"adapters {seen[full]!r} and {name!r} both replace {full!r}; only deltas can add")
                    seen[full] = name
        object.__setattr__(self, "_names", tuple(parts))
        object.__setattr__(self, "_parts", tuple(parts[n] for n in parts))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("AdapterSum is immutable")

    @property
    def parts(self) -> Mapping[str, Adapter]:
        return MappingProxyType(dict(zip(self._names, self._parts)))

    def num_parameters(self) -> int:
        return sum(a.num_parameters() for a in self._parts)

    def __repr__(self) -> str:
        inner = ",\n  ".join(f"{n}: {a!r}" for n, a in zip(self._names, self._parts))
        return f"AdapterSum(\n  {inner})"


torch_pytree.register_pytree_node(
    AdapterSum,
    lambda s: (list(s._parts), s._names),
    lambda children, names: AdapterSum(dict(zip(names, children))),
    serialized_type_name="adaptfn.AdapterSum",
    flatten_with_keys_fn=lambda s: ([(torch_pytree.MappingKey(n), a) for n, a in zip(s._names, s._parts)], s._names),
)
optree.register_pytree_node(
    AdapterSum,
    lambda s: (list(s._parts), s._names, s._names),
    lambda names, children: AdapterSum(dict(zip(names, children))),
    path_entry_type=optree.MappingEntry,
    namespace=NAMESPACE,
)


def components(adapter: Any) -> tuple[Adapter, ...]:
    """The adapters inside an Adapter or AdapterSum."""
    if isinstance(adapter, Adapter):
        return (adapter,)
    if isinstance(adapter, AdapterSum):
        return adapter._parts
    raise ConfigError(f"expected an adaptfn Adapter or AdapterSum, got {type(adapter).__name__}")
