"""The :class:`Adapter` pytree: tensors are leaves, method / config / module specs are static.

An adapter holds, for each module path it touches, a small dict of tensors:

* **delta** leaves of its method (LoRA ``lora_A`` [r, in] and ``lora_B`` [out, r], ...): the base
  weight stays and something is added or scaled;
* **replacement** leaves named after the module's parameter (``weight``, ``bias``): the base tensor is
  swapped for the adapter's (``modules_to_save``, trained biases, PEFT's saved embedding matrices);
* ``gate``: a 0-d float tensor. The entry is on when ``gate != 0``. :func:`adaptfn.mask` sets it to 0.
  Only ``gate != 0`` is ever read, so the gate has zero gradient and multiplicative weight decay can
  never switch an entry on or off.

* ``coef`` (only after :func:`adaptfn.scale`): the entry's scale weight, a float tensor [] ([N] stacked).
  The entry contributes ``coef`` times what it did (each method defines "times", see
  :mod:`adaptfn.algebra`). Unlike the gate it is a real multiplier: ``torch.func.grad`` gives its true
  derivative. Absent means 1, so unscaled adapters keep their structure.

Stacked adapters (:func:`adaptfn.stack`, in :mod:`adaptfn.stacking`) carry a leading axis ``N`` on every
leaf, ranks zero-padded to the largest, plus a ``scaling`` leaf [N] per delta entry (the per-adapter
LoRA scale; read detached, so its gradient is zero: a weight to learn is a ``coef``). Whether an adapter
is stacked is read from leaf shapes against the static ranks, so under ``torch.func.vmap`` a stacked
adapter's leaves look, and run, like a single one.

This is a data module: it knows nothing of the methods (``adaptfn.methods``), which build on it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import optree
import torch
import torch.utils._pytree as torch_pytree

from .errors import ConfigError, IncompatibleAdapterError, shape_str

__all__ = ["NAMESPACE", "GATE", "SCALING", "COEF", "Entry", "StackInfo", "Adapter", "AdapterSum", "components",
           "gate_on", "coef_value", "coef_dtype", "replace"]

NAMESPACE = "adaptfn"
GATE = "gate"
SCALING = "scaling"
COEF = "coef"
_NON_PARAMETER_LEAVES = (GATE, SCALING, COEF)


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
        try:  # a scale that is not a finite float32 would turn every output it touches into inf / NaN
            ok = math.isfinite(self.scaling) and abs(self.scaling) <= 3.4028234663852886e38
        except (TypeError, OverflowError):
            ok = False
        if not ok:
            raise ConfigError(f"Entry.scaling={self.scaling!r} is not a finite number within float32's range (check "
                              "lora_alpha / alpha_pattern and r)")

    def option(self, name: str, default: Any = None) -> Any:
        for k, v in self.options:
            if k == name:
                return v
        return default


@dataclasses.dataclass(frozen=True)
class StackInfo:
    """Static record of the adapters a stacked adapter was made of (for :func:`unstack`).

    Attributes:
        configs: each adapter's config. entries: each adapter's own ``(path, Entry)`` pairs (a stack of
            adapters with different targets holds the union; each keeps its own here).
        leaf_names: each adapter's ``(path, leaf names)`` pairs (None: every adapter has the stack's leaves
            minus ``scaling``), so unstacking gives back exactly the leaves each adapter had.
    """

    configs: tuple[Any, ...]
    entries: tuple[tuple[tuple[str, Entry], ...], ...]
    leaf_names: tuple[tuple[tuple[str, tuple[str, ...]], ...], ...] | None = None

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

    __slots__ = ("_method", "_config", "_entries", "_tensors", "_view", "_stack", "_key", "_key_id", "__weakref__")

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
        # read-only views of _tensors for readers outside this module (made once: never mutated later)
        object.__setattr__(self, "_view", MappingProxyType({p: MappingProxyType(d) for p, d in self._tensors.items()}))
        object.__setattr__(self, "_stack", stack_info)
        object.__setattr__(self, "_key", (method, self._entries, tuple(
            (p, tuple(sorted(d))) for p, d in self._tensors.items())))
        # an int naming the structure: what caches are keyed by (torch.compile guards it by value)
        object.__setattr__(self, "_key_id", hash(self._key))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Adapter is immutable; use adaptfn's transforms or af.tree.map to make a new one")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Adapter is immutable; use adaptfn's transforms or af.tree.map to make a new one")

    def __reduce__(self) -> tuple:
        """Pickling and ``copy.deepcopy``: rebuilt from its parts (the tensors pickled as torch does)."""
        return (Adapter, (self._method, self._config, dict(self._entries),
                          {p: dict(d) for p, d in self._tensors.items()}, self._stack))

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
        return self._view

    def leaves(self, path: str) -> Mapping[str, torch.Tensor]:
        """{leaf name -> tensor} of the module at ``path`` (a read-only view)."""
        return self.tensors[path]

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
        scaled = sum(1 for d in self._tensors.values() if COEF in d)
        if scaled:
            parts.append(f"{scaled} scaled")
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


def coef_dtype(leaves: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype a scale weight (``coef``) of an entry gets: that of its first floating delta / replacement leaf."""
    for n, t in leaves.items():
        if n not in _NON_PARAMETER_LEAVES and isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def coef_value(t: torch.Tensor | None) -> float | None:
    """The value of a ``coef`` leaf when it can be read without a cost or a lost gradient (a concrete 0-d CPU
    tensor that needs no gradient, outside transforms and torch.compile); None otherwise (and for no leaf)."""
    if (
        t is None
        or t.dim() != 0
        or t.requires_grad
        or t.device.type != "cpu"
        or torch.compiler.is_compiling()
        or torch._C._functorch.is_functorch_wrapped_tensor(t)
    ):
        return None
    return float(t.item())


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

    def __reduce__(self) -> tuple:
        return (AdapterSum, (dict(zip(self._names, self._parts)),))

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
