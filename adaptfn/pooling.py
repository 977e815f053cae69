"""Adapter pools: many LoRA adapters resident for per-row serving, grown and shrunk one adapter at a time.

:func:`adaptfn.stack` pads every adapter to the largest rank and to the union of the targets: right for
``vmap`` and training, wasteful for a server holding a thousand adapters of ranks 4-64 with different
targets (padding a 4-64 mix to r=64 and the union of seven projections took 4.6x the adapters' own bytes in
bench scenario 9). An :class:`AdapterPool` stores each module's adapters in **rank buckets**:

* per module and bucket rank ``R`` (by default the next power of two above an adapter's rank), one capacity
  buffer ``A^T`` [capacity, in, R] and ``B^T`` [capacity, R, out] (the layouts both kernels below read);
* an adapter occupies one position of one bucket at each module it has (none where it lacks the module,
  rank padding only up to its bucket: zero for power-of-two ranks);
* a **slot** (an ``int``) names an adapter for ``route=``; slots stay stable when others are added or removed.

A call with ``af.inject(fn, pool, route=idx)`` runs the base layers once for the batch; at each adapted
module the rows are grouped by (bucket, position).

float32 inference on the CPU runs the **native** kernel where it could be built (:mod:`adaptfn._native`: C
compiled with the system's compiler on first use, cached; :func:`native_status` says whether and why not).
One call per bucket takes the rows in items of up to 16 tokens of one adapter, reads each item's adapter
once (not once per token), computes ``(x @ A^T) * scale @ B^T`` in registers and adds it into the base
output's rows: no gather of the inputs, no copy of any weight, no scatter of the outputs. Bench scenario 9
(N = 1,000, 64 rows x 16 tokens, 2 threads): 1.05-1.08 x the base forward, against 1.15-1.17 for the
portable kernels below.

Otherwise (no compiler, ``ADAPTFN_NATIVE=0``, :data:`NATIVE` False, other dtypes, CUDA, autograd, torch.func,
torch.compile) each bucket with rows runs one of the portable kernels, chosen by the tokens per used adapter
in that bucket (:data:`GATHER_TOKENS`, :data:`CPU_GATHER_TOKENS`):

* ``gather`` (few tokens per adapter: decode over many adapters): two ``embedding_bag`` sums straight from
  the buffers: the A side adds ``x[t, i] * A^T[pos, i, :]`` over ``i``, the B side ``h[t, j] * B^T[pos, j, :]``
  over ``j``. No weight is copied; each token reads its own adapter's rows.
* ``grouped`` (more tokens per adapter): the used adapters' A^T and B^T are copied once per call
  (``index_select``: the rows' own working set, nothing else) and two grouped GEMMs (``torch._grouped_mm``, on
  CUDA) run over them, one group per adapter. On the CPU (where ``torch._grouped_mm`` loops over the groups),
  under autograd or torch.func: two batched matmuls over the groups padded to the largest (``padded``).
* ``loop`` (on the CPU in inference, above :data:`CPU_GATHER_TOKENS` tokens per used adapter; below it the CPU
  runs ``gather``): two GEMMs per adapter straight from the buffers.

Nothing is padded to N adapters or to the union of targets. See :meth:`AdapterPool.memory` and
bench/README.md.

Purity. A pool is a value: :meth:`AdapterPool.add` and :meth:`AdapterPool.remove` return a new pool and
leave the old one unchanged, sharing every buffer. A buffer position is written only when no live pool
value maps it (reference counts per position, dropped when a pool value is garbage collected), so an old
pool, e.g. one an in-flight call holds, never sees a change; buffers grow by copying into a new, larger
one (old pools keep the old buffer). Writes preserve the buffers' version counters, as the values every
live pool can read are unchanged.

:class:`OffloadedPool` keeps the pool in host memory and a device cache of the adapters in use (S-LoRA's
unified paging, LRU): each call copies in the adapters its rows need that are not cached.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd import forward_ad as _fwad

from . import _native, routing
from .adapter import COEF, GATE, Adapter, Entry, coef_value
from .errors import ConfigError, IncompatibleAdapterError, shape_str
from .methods.common import is_conv1d, linear_dims

__all__ = ["AdapterPool", "OffloadedPool", "pool", "native_status", "BUCKETS", "GATHER_TOKENS", "CPU_GATHER_TOKENS",
           "PLAN_CACHE", "NATIVE"]

#: rank bucket policies: "pow2" (the next power of two), "exact" (one bucket per rank), or a tuple of bucket ranks
BUCKETS = ("pow2", "exact")
#: use the ``gather`` kernel (no weight copies) in a bucket whose used adapters have at most this many tokens
#: each on average; ``grouped`` above
GATHER_TOKENS = 4
#: on a CPU in inference: ``gather`` up to this many tokens per used adapter, ``loop`` (adapter by adapter) above;
#: ``padded`` is slower than both there (N = 1,000, 64 x 16 tokens, 2 threads: gather 1.17-1.18, loop 1.23-1.30,
#: padded 1.30-1.32 x the base; 1 thread: 1.149 / 1.135 / 1.231; bench/README.md, scenario 9)
CPU_GATHER_TOKENS = 24
#: a call whose adapted tokens times out features is at most this (decode: 64 rows x 2048) and whose buckets all run
#: ``gather`` scales the inputs once and adds every bucket's output with one ``index_add_`` (:func:`_gather_all`)
DECODE_ELEMENTS = 1 << 17
#: tests and benchmarks: force one kernel ("native", "gather", "loop", "grouped", "padded"); None: chosen per call
FORCE_KERNEL: str | None = None
#: use the compiled CPU kernel (:mod:`adaptfn._native`) for float32 inference on the CPU where it could be built
#: (``ADAPTFN_NATIVE=0`` in the environment keeps it from being built at all)
NATIVE = True
_NATIVE_TILE = 16  # tokens per item of the native kernel (its TB)
_LORA_LEAVES = frozenset({"lora_A", "lora_B", GATE, COEF})


def _bucket(r: int, policy: Any, item: int = 4) -> int:
    """The bucket rank of rank ``r`` (``item``: the dtype's size; "pow2" buckets start at 16 bytes of rank,
    the row alignment grouped GEMMs need)."""
    if policy == "exact":
        return r
    if policy == "pow2":
        return max(1 << max(0, (r - 1).bit_length()), max(1, 16 // item))
    for b in policy:  # sorted tuple of bucket ranks; a rank above the largest gets its own exact bucket
        if r <= b:
            return b
    return r


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_policy(buckets: Any) -> Any:
    if isinstance(buckets, str):
        if buckets not in BUCKETS:
            raise ConfigError(f"pool: buckets={buckets!r}; expected 'pow2', 'exact' or a tuple of ranks")
        return buckets
    try:
        out = tuple(sorted(int(b) for b in buckets))
    except (TypeError, ValueError):
        raise ConfigError(f"pool: buckets={buckets!r}; expected 'pow2', 'exact' or a tuple of ranks") from None
    if not out or out[0] < 1:
        raise ConfigError(f"pool: buckets={buckets!r}; bucket ranks must be positive")
    return out


class _Buffer:
    """Capacity storage of one (module, bucket rank R): ``At`` [cap, in, R] and ``Bt`` [cap, R, out], and per
    position the number of live occupancies (:class:`_Occ`) that map it. A position with no live occupancy
    may be (re)written."""

    __slots__ = ("At", "Bt", "refs", "lock", "__weakref__")

    def __init__(self, cap: int, R: int, n_in: int, n_out: int, dtype: torch.dtype, device: torch.device,
                 pin: bool = False) -> None:
        with torch.inference_mode(False):  # normal tensors even when made inside inference_mode (writable later)
            self.At = torch.empty(cap, n_in, R, dtype=dtype, device=device, pin_memory=pin)
            self.Bt = torch.empty(cap, R, n_out, dtype=dtype, device=device, pin_memory=pin)
        self.refs = [0] * cap
        self.lock = threading.Lock()

    @property
    def cap(self) -> int:
        return len(self.refs)

    def nbytes(self) -> int:
        return self.At.nbytes + self.Bt.nbytes

    def write(self, pos: int, At: torch.Tensor, Bt: torch.Tensor) -> None:
        """Write one adapter's A^T [in, r] and B^T [r, out] at ``pos`` (zeros up to R). The caller holds
        ``lock`` and knows that no live pool maps ``pos``: no value any pool can read changes, so the version
        counters shared by the buffers' views are kept (an old pool's caches stay valid)."""
        r = At.shape[1]
        with torch.inference_mode(False), torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(self.At), \
                torch.autograd._unsafe_preserve_version_counter(self.Bt):
            self.At[pos, :, :r].copy_(At, non_blocking=True)
            self.Bt[pos, :r].copy_(Bt, non_blocking=True)
            if r < self.Bt.shape[1]:
                self.At[pos, :, r:].zero_()
                self.Bt[pos, r:].zero_()

    def grown(self, cap: int) -> _Buffer:
        """A new buffer of capacity ``cap`` holding a copy of this one (positions keep their indices)."""
        new = _Buffer.__new__(_Buffer)
        n_in, R, n_out = self.At.shape[1], self.At.shape[2], self.Bt.shape[2]
        pin = self.At.is_pinned() if self.At.device.type == "cpu" else False
        with torch.inference_mode(False), torch.no_grad():
            new.At = torch.zeros(cap, n_in, R, dtype=self.At.dtype, device=self.At.device, pin_memory=pin)
            new.Bt = torch.zeros(cap, R, n_out, dtype=self.At.dtype, device=self.At.device, pin_memory=pin)
            new.At[: self.cap].copy_(self.At)
            new.Bt[: self.cap].copy_(self.Bt)
        new.refs = [0] * cap
        new.lock = threading.Lock()
        return new


class _Occ:
    """The positions of one buffer that some pool values map (shared by pool values while unchanged). Alive,
    it holds a reference count on each of its positions; collected, it releases them."""

    __slots__ = ("buf", "pos", "__weakref__")

    def __init__(self, buf: _Buffer, pos: tuple[int, ...]) -> None:
        self.buf, self.pos = buf, pos
        with buf.lock:
            refs = buf.refs
            for p in pos:
                refs[p] += 1

    def __del__(self) -> None:
        buf = getattr(self, "buf", None)
        if buf is None:
            return
        with buf.lock:
            refs = buf.refs
            for p in self.pos:
                refs[p] -= 1


@dataclasses.dataclass(frozen=True)
class _SlotInfo:
    """What a pool keeps of one adapter besides its weights: enough to give it back (:meth:`AdapterPool.get`)."""

    uid: int
    config: Any
    entries: tuple[tuple[str, Entry], ...]  # the adapter's LoRA entries
    coefs: tuple[tuple[str, float], ...]  # scale weights it had (folded into the stored scale)
    dims: tuple[tuple[str, int, int], ...]  # (path, in, out) of each entry


@dataclasses.dataclass(frozen=True)
class _Mod:
    """One module of a pool value: its dims, its buckets' occupancies, and where each slot's adapter is."""

    n_in: int
    n_out: int
    occ: Mapping[int, _Occ]  # bucket rank R -> occupancy (buffer + positions)
    loc: Mapping[int, tuple[int, int, float]]  # slot -> (R, position, scale)


class _Map:
    """Routing tensors of one module layout (shared by modules whose layout is equal, e.g. every layer's
    q_proj): bucket ranks, and per slot its bucket index (-1: absent), position and scale."""

    __slots__ = ("buckets", "bucket_of", "pos_of", "scale_of", "n", "__weakref__")

    def __init__(self, buckets: tuple[int, ...], bucket_of: list[int], pos_of: list[int], scale_of: list[float],
                 device: torch.device) -> None:
        self.buckets = buckets
        self.n = len(bucket_of)
        self.bucket_of = torch.tensor(bucket_of, dtype=torch.long, device=device)
        self.pos_of = torch.tensor(pos_of, dtype=torch.long, device=device)
        self.scale_of = torch.tensor(scale_of, dtype=torch.float64, device=device)  # cast per call


_UID = iter(range(1, 1 << 62))
_UID_LOCK = threading.Lock()


def _next_uid() -> int:
    with _UID_LOCK:
        return next(_UID)


def _adapter_parts(a: Adapter, where: str, uid: int | None = None
                   ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], _SlotInfo]:
    """``{path: (A^T [in, r], B^T [r, out], scale)}`` of a plain single LoRA adapter (typed errors otherwise),
    and what the pool keeps of it besides the weights. Frozen replacements (PEFT's saved embedding matrices)
    are dropped: a route= call never applies them."""
    if not isinstance(a, Adapter):
        raise ConfigError(f"{where}: expected an Adapter, got {type(a).__name__}")
    if a.method != "lora":
        raise ConfigError(f"{where}: an adapter pool holds LoRA adapters; this one is {a.method} (use af.stack and "
                          "route= for other methods)")
    if a.is_stacked:
        raise ConfigError(f"{where}: the adapter is stacked; add its adapters one by one (af.unstack)")
    parts: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    coefs: list[tuple[str, float]] = []
    kept: list[tuple[str, Entry]] = []
    dims: list[tuple[str, int, int]] = []
    for path, e in a.entry_items:
        leaves = a.leaves(path)
        live = [n for n in e.replaced if n not in e.frozen]
        if live:
            raise ConfigError(f"{where}: module {path!r} replaces {live} (modules_to_save / trained biases); a pool "
                              "holds per-row deltas only: af.select the delta modules first")
        if not e.kind:
            continue
        if e.kind != "linear":
            raise ConfigError(f"{where}: module {path!r} is a LoRA {e.kind}; a pool holds linear (nn.Linear / "
                              "Conv1D) LoRA modules only")
        extra = sorted(set(leaves) - _LORA_LEAVES - set(e.replaced))
        if extra:
            raise ConfigError(f"{where}: module {path!r} has leaves {extra} beyond LoRA's A and B (a LoRA variant); "
                              "a pool holds plain LoRA")
        gate = leaves[GATE]
        if gate.dim() != 0:
            raise ConfigError(f"{where}: module {path!r} has a gate of shape {shape_str(gate.shape)}; expected a "
                              "single adapter")
        A, B = leaves["lora_A"], leaves["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise IncompatibleAdapterError(f"{where}: module {path!r}: lora_A {shape_str(A.shape)} and lora_B "
                                           f"{shape_str(B.shape)} are not a rank-r pair")
        kept.append((path, dataclasses.replace(e, replaced=(), tied=(), frozen=())))
        dims.append((path, int(A.shape[1]), int(B.shape[0])))
        if not bool(gate != 0):
            continue  # masked: contributes nothing, so it is not stored
        c = leaves.get(COEF)
        cv = 1.0
        if c is not None:
            v = coef_value(c.detach())
            if v is None:
                raise ConfigError(f"{where}: module {path!r} has a scale weight that is not a concrete 0-d tensor")
            cv = v
            coefs.append((path, v))
        if cv == 0.0:
            continue
        parts[path] = (A.detach().T, B.detach().T, e.scaling * cv)
    info = _SlotInfo(_next_uid() if uid is None else uid, a.config, tuple(kept), tuple(coefs), tuple(dims))
    return parts, info


class AdapterPool:
    """Many LoRA adapters, resident, for ``route=`` serving; made by :func:`adaptfn.pool`.

    An immutable value: :meth:`add` and :meth:`remove` return new pools that share storage with this one
    (see the module docstring for the layout and the purity rule). Slots (``int``) name adapters for
    ``af.inject(fn, pool, route=idx)``: row ``i`` uses the adapter in slot ``idx[i]`` (-1: the base model).
    Slots stay stable: removing an adapter frees its slot; the others keep theirs.
    """

    __slots__ = ("_slots", "_mods", "_policy", "_dtype", "_device", "_pin", "_headroom", "_maps", "_live", "_plans",
                 "__weakref__")

    def __init__(self) -> None:
        raise TypeError("make a pool with af.pool([...])")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def _make(cls, slots: tuple[_SlotInfo | None, ...], mods: dict[str, _Mod], policy: Any, dtype: torch.dtype,
              device: torch.device, pin: bool, headroom: float) -> AdapterPool:
        self = object.__new__(cls)
        for k, v in (("_slots", slots), ("_mods", mods), ("_policy", policy), ("_dtype", dtype),
                     ("_device", device), ("_pin", pin), ("_headroom", headroom), ("_maps", None), ("_live", None),
                     ("_plans", _Plans())):
            object.__setattr__(self, k, v)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("AdapterPool is immutable; add / remove return new pools")

    # -- reading -----------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of slots (live and freed): valid route indices are ``0 .. size - 1``."""
        return len(self._slots)

    @property
    def slots(self) -> tuple[int, ...]:
        """The slots holding an adapter, in order."""
        return tuple(i for i, s in enumerate(self._slots) if s is not None)

    def __len__(self) -> int:
        return sum(1 for s in self._slots if s is not None)

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and 0 <= slot < len(self._slots) and self._slots[slot] is not None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def paths(self) -> tuple[str, ...]:
        """Module paths some adapter of the pool targets."""
        return tuple(sorted(p for p, m in self._mods.items() if m.loc))

    def _info(self, slot: int, where: str) -> _SlotInfo:
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise ConfigError(f"{where}: slot must be an int, got {type(slot).__name__}")
        if not 0 <= slot < len(self._slots) or self._slots[slot] is None:
            raise ConfigError(f"{where}: slot {slot} holds no adapter (slots: {_ranges(self.slots)})")
        return self._slots[slot]  # type: ignore[return-value]

    def get(self, slot: int) -> Adapter:
        """The adapter in ``slot`` (its config, entries and leaves; a copy of the pool's weights).

        Arguments:
            slot: a live slot of this pool.

        Returns:
            An :class:`Adapter` equal to the one added (a scale weight comes back as its ``coef`` leaf).

        Example:
            >>> p = af.pool([a1, a2])
            >>> back = p.get(1)
            >>> path = a2.paths[0]
            >>> torch.equal(back.leaves(path)["lora_B"], a2.leaves(path)["lora_B"])
            True
        """
        info = self._info(slot, "get")
        coefs = dict(info.coefs)
        dims = {p: (i, o) for p, i, o in info.dims}
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for path, e in info.entries:
            m = self._mods.get(path)
            loc = m.loc.get(slot) if m is not None else None
            d: dict[str, torch.Tensor] = {GATE: torch.ones((), dtype=torch.float32, device=self._device)}
            if loc is None:  # masked or weighted 0 when added: zeros, gate off (contributes nothing, as before)
                n_in, n_out = dims[path]
                d["lora_A"] = torch.zeros(e.r, n_in, dtype=self._dtype, device=self._device)
                d["lora_B"] = torch.zeros(n_out, e.r, dtype=self._dtype, device=self._device)
                d[GATE] = torch.zeros((), dtype=torch.float32, device=self._device)
            else:
                R, pos, _ = loc
                buf = m.occ[R].buf  # type: ignore[union-attr]
                d["lora_A"] = buf.At[pos, :, : e.r].T.clone()
                d["lora_B"] = buf.Bt[pos, : e.r].T.clone()
            if path in coefs:
                d[COEF] = torch.tensor(coefs[path], dtype=self._dtype, device=self._device)
            tensors[path] = d
        return Adapter("lora", info.config, dict(info.entries), tensors)

    def memory(self) -> dict[str, int]:
        """Bytes held by the pool.

        Returns:
            ``{"adapters": the live adapters' own A and B, "used": the positions they occupy (rank padding up to
            their buckets), "allocated": the buffers, capacity included}``.
        """
        own = used = 0
        bufs: dict[int, _Buffer] = {}
        item = torch.empty((), dtype=self._dtype).element_size()
        for s, info in enumerate(self._slots):
            if info is None:
                continue
            for path, e in info.entries:
                m = self._mods.get(path)
                if m is None or s not in m.loc:
                    continue
                R = m.loc[s][0]
                own += e.r * (m.n_in + m.n_out) * item
                used += R * (m.n_in + m.n_out) * item
        for m in self._mods.values():
            for o in m.occ.values():
                bufs[id(o.buf)] = o.buf
        return {"adapters": own, "used": used, "allocated": sum(b.nbytes() for b in bufs.values())}

    def layout(self) -> dict[str, dict[int, tuple[int, int]]]:
        """Per module path: ``{bucket rank: (adapters in it, buffer capacity)}``."""
        out: dict[str, dict[int, tuple[int, int]]] = {}
        for path in sorted(self._mods):
            m = self._mods[path]
            out[path] = {R: (len(o.pos), o.buf.cap) for R, o in sorted(m.occ.items()) if o.pos}
        return out

    def __repr__(self) -> str:
        mem = self.memory()
        buckets = sorted({R for m in self._mods.values() for R, o in m.occ.items() if o.pos})
        return (f"AdapterPool({len(self)} adapters in {self.size} slots, {len(self.paths)} modules, buckets r="
                f"{buckets}, {mem['allocated'] / 2**20:.1f} MiB {str(self._dtype).replace('torch.', '')} on "
                f"{self._device})")

    # -- growing and shrinking ---------------------------------------------------------------------
    def add(self, adapter: Adapter) -> tuple[AdapterPool, int]:
        """A new pool with ``adapter`` added, and its slot (the lowest free slot, else ``size``).

        Costs the adapter's own bytes (copied into the shared buffers at positions no live pool maps) plus
        bookkeeping per module it targets; a full buffer is copied into one twice its size (amortised). This
        pool is unchanged.

        Arguments:
            adapter: a single LoRA adapter on linear modules (the rules of :func:`adaptfn.pool`).

        Returns:
            ``(new_pool, slot)``.

        Example:
            >>> p1 = af.pool([a1])
            >>> p2, slot = p1.add(a2)
            >>> slot, len(p1), len(p2)
            (1, 1, 2)
        """
        parts, info = _adapter_parts(adapter, "AdapterPool.add")
        free = next((i for i, s in enumerate(self._slots) if s is None), len(self._slots))
        return self._with(free, info, parts), free

    def _with(self, slot: int, info: _SlotInfo, parts: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]
              ) -> AdapterPool:
        mods = dict(self._mods)
        for path, (At, Bt, scale) in parts.items():
            n_in, r, n_out = At.shape[0], At.shape[1], Bt.shape[1]
            m = mods.get(path)
            if m is None:
                m = _Mod(n_in, n_out, {}, {})
            elif (m.n_in, m.n_out) != (n_in, n_out):
                raise IncompatibleAdapterError(
                    f"AdapterPool.add: module {path!r} has lora_A {shape_str((r, n_in))} / lora_B "
                    f"{shape_str((n_out, r))} but the pool's adapters there are {m.n_in} -> {m.n_out}")
            R = _bucket(r, self._policy, _itemsize(self._dtype))
            occ = m.occ.get(R)
            buf = occ.buf if occ is not None else None
            with (buf.lock if buf is not None else _NULL_LOCK):
                pos = -1
                if buf is not None:
                    try:
                        pos = buf.refs.index(0)
                    except ValueError:
                        pos = -1
                if pos < 0:  # no free position: a new buffer (twice the size), old pools keep the old one
                    cap = max(4, 2 * buf.cap) if buf is not None else 4
                    new = buf.grown(cap) if buf is not None else _Buffer(cap, R, n_in, n_out, self._dtype,
                                                                          self._device, self._pin)
                    used = occ.pos if occ is not None else ()
                    taken = set(used)
                    pos = next(i for i in range(cap) if i not in taken)
                    buf = new
                else:
                    used = occ.pos  # type: ignore[union-attr]
                buf.write(pos, At.to(self._dtype), Bt.to(self._dtype))
                new_occ = _Occ.__new__(_Occ)
                new_occ.buf, new_occ.pos = buf, (*used, pos)
                for p in new_occ.pos:  # registered under the lock: no other add can take pos meanwhile
                    buf.refs[p] += 1
            occ_d = dict(m.occ)
            occ_d[R] = new_occ
            loc = dict(m.loc)
            loc[slot] = (R, pos, float(scale))
            mods[path] = _Mod(n_in, n_out, occ_d, loc)
        slots = list(self._slots)
        if slot == len(slots):
            slots.append(info)
        else:
            slots[slot] = info
        return AdapterPool._make(tuple(slots), mods, self._policy, self._dtype, self._device, self._pin,
                                 self._headroom)

    def remove(self, slot: int) -> AdapterPool:
        """A new pool without the adapter in ``slot``; its slot is freed (other slots keep their numbers) and
        its positions become reusable once no live pool maps them. This pool is unchanged.

        Arguments:
            slot: a live slot of this pool.

        Returns:
            A new :class:`AdapterPool`.

        Example:
            >>> p = af.pool([a1, a2, a3]).remove(1)
            >>> p.slots, p.size
            ((0, 2), 3)
        """
        self._info(slot, "AdapterPool.remove")
        mods = dict(self._mods)
        for path, m in self._mods.items():
            loc = m.loc.get(slot)
            if loc is None:
                continue
            R, pos, _ = loc
            occ = m.occ[R]
            rest = tuple(p for p in occ.pos if p != pos)
            occ_d = dict(m.occ)
            occ_d[R] = _Occ(occ.buf, rest)
            new_loc = dict(m.loc)
            del new_loc[slot]
            mods[path] = _Mod(m.n_in, m.n_out, occ_d, new_loc)
        slots = list(self._slots)
        slots[slot] = None
        while slots and slots[-1] is None:  # trailing freed slots are dropped (route indices stay valid below)
            slots.pop()
        return AdapterPool._make(tuple(slots), mods, self._policy, self._dtype, self._device, self._pin,
                                 self._headroom)

    def to(self, device: torch.device | str) -> AdapterPool:
        """The same adapters in the same slots, in new buffers on ``device``.

        Arguments:
            device: where the new buffers live.

        Returns:
            A new :class:`AdapterPool` (this one is unchanged).
        """
        dev = torch.device(device)
        out = _empty(self._policy, self._dtype, dev, False, self._headroom)
        return _fill(out, [(s, info, self._parts(s)) for s, info in enumerate(self._slots) if info is not None])

    def _parts(self, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Views of ``slot``'s weights in the buffers: ``{path: (A^T [in, r], B^T [r, out], scale)}``."""
        info = self._slots[slot]
        assert info is not None
        out = {}
        for path, e in info.entries:
            m = self._mods.get(path)
            loc = m.loc.get(slot) if m is not None else None
            if loc is None:
                continue
            R, pos, scale = loc
            buf = m.occ[R].buf  # type: ignore[union-attr]
            out[path] = (buf.At[pos, :, : e.r], buf.Bt[pos, : e.r], scale)
        return out

    # -- calls ----------------------------------------------------------------------------------------
    def _map_of(self, path: str) -> _Map:
        maps = self._maps
        if maps is None:
            maps = _build_maps(self)
            object.__setattr__(self, "_maps", maps)
        return maps[path]

    def live_mask(self) -> torch.Tensor:
        """Bool [size]: which slots hold an adapter (a route may name only those, or -1)."""
        live = self._live
        if live is None:
            live = torch.tensor([s is not None for s in self._slots], dtype=torch.bool)
            object.__setattr__(self, "_live", live)
        return live

    def bind(self, route: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, Any, Any, Any]]]:
        """For one call (used by :class:`adaptfn.FunctionalModel`): the route, and per adapted module
        ``(path, kernel, entry, leaves)`` to bind to the module's slot. The rows' grouping (a :class:`_Plan` per
        module layout) is kept for the last :data:`PLAN_CACHE` distinct routes: a decode loop calls with one
        route at every step."""
        plans = self._plans.get(route)
        items = []
        for path in self.paths:
            items.append((path, _KERNEL, None, _Binding(self._mods[path], self._map_of(path), plans)))
        return route, items


#: how many distinct routes' row groupings a pool keeps (each O(batch x tokens x in) index tensors)
PLAN_CACHE = 4


class _Plans:
    """A pool value's routing plans for its last :data:`PLAN_CACHE` distinct routes, by the route's values
    (read to the host: a plan reads them there anyway). Each is a dict ``{map: _Plan}`` its calls fill."""

    __slots__ = ("lru", "lock")

    def __init__(self) -> None:
        self.lru: collections.OrderedDict[tuple, dict] = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, route: torch.Tensor) -> dict:
        key = (route.device, route.dtype, tuple(route.shape), tuple(route.reshape(-1).tolist()))
        with self.lock:
            plans = self.lru.get(key)
            if plans is None:
                plans = self.lru[key] = {}
                while len(self.lru) > PLAN_CACHE:
                    self.lru.popitem(last=False)
            else:
                self.lru.move_to_end(key)
        return plans


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


_NULL_LOCK = _NullLock()


def _ranges(slots: Sequence[int]) -> str:
    if not slots:
        return "none"
    out, start, prev = [], slots[0], slots[0]
    for s in list(slots[1:]) + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ", ".join(out)


def _build_maps(p: AdapterPool) -> dict[str, _Map]:
    """Per module its :class:`_Map`; modules whose layouts are equal share one (and its cached groupings)."""
    n = len(p._slots)
    interned: dict[tuple, _Map] = {}
    out: dict[str, _Map] = {}
    for path, m in p._mods.items():
        buckets = tuple(sorted(m.occ))
        bi = {R: i for i, R in enumerate(buckets)}
        bucket_of, pos_of, scale_of = [-1] * n, [0] * n, [0.0] * n
        for s, (R, pos, scale) in m.loc.items():
            bucket_of[s], pos_of[s], scale_of[s] = bi[R], pos, scale
        key = (buckets, tuple(bucket_of), tuple(pos_of), tuple(scale_of))
        hit = interned.get(key)
        if hit is None:
            hit = interned[key] = _Map(buckets, bucket_of, pos_of, scale_of, p._device)
        out[path] = hit
    return out


def _empty(policy: Any, dtype: torch.dtype, device: torch.device, pin: bool, headroom: float) -> AdapterPool:
    return AdapterPool._make((), {}, policy, dtype, device, pin, headroom)


def _fill(p: AdapterPool, items: Sequence[tuple[int, _SlotInfo, Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]]]
          ) -> AdapterPool:
    """Bulk construction: every (slot, info, parts) into fresh buffers sized to the counts (plus headroom)."""
    counts: dict[tuple[str, int], int] = collections.Counter()
    dims: dict[str, tuple[int, int]] = {}
    for _, _, parts in items:
        for path, (At, Bt, _) in parts.items():
            d = (At.shape[0], Bt.shape[1])
            if dims.setdefault(path, d) != d:
                raise IncompatibleAdapterError(
                    f"pool: module {path!r} is {dims[path][0]} -> {dims[path][1]} in one adapter and {d[0]} -> {d[1]} "
                    "in another")
            counts[(path, _bucket(At.shape[1], p._policy, _itemsize(p._dtype)))] += 1
    bufs = {k: _Buffer(c + max(4, int(math.ceil(c * p._headroom))), k[1], *dims[k[0]], p._dtype, p._device, p._pin)
            for k, c in counts.items()}
    used: dict[tuple[str, int], list[int]] = {k: [] for k in counts}
    locs: dict[str, dict[int, tuple[int, int, float]]] = {path: {} for path in dims}
    n = max((s for s, _, _ in items), default=-1) + 1
    slots: list[_SlotInfo | None] = [None] * n
    for s, info, parts in items:
        slots[s] = info
        for path, (At, Bt, scale) in parts.items():
            R = _bucket(At.shape[1], p._policy, _itemsize(p._dtype))
            key = (path, R)
            pos = len(used[key])
            used[key].append(pos)
            bufs[key].write(pos, At.to(p._dtype), Bt.to(p._dtype))
            locs[path][s] = (R, pos, float(scale))
    mods: dict[str, _Mod] = {}
    for path, (n_in, n_out) in dims.items():
        occ = {R: _Occ(bufs[(q, R)], tuple(used[(q, R)])) for (q, R) in counts if q == path}
        mods[path] = _Mod(n_in, n_out, occ, locs[path])
    return AdapterPool._make(tuple(slots), mods, p._policy, p._dtype, p._device, p._pin, p._headroom)


def pool(adapters: Iterable[Adapter] = (), *, buckets: Any = "pow2", dtype: torch.dtype | None = None,
         device: torch.device | str | None = None, headroom: float = 0.25, pin_memory: bool = False) -> AdapterPool:
    """Put LoRA adapters into an :class:`AdapterPool`: slot ``i`` holds ``adapters[i]``.

    Arguments:
        adapters: single LoRA adapters on linear modules (nn.Linear, GPT-2 Conv1D), of any ranks and targets.
            Modules that replace tensors (``modules_to_save``) and LoRA variants are refused; a masked module
            is not stored; a scale weight (:func:`adaptfn.scale`) is folded into the module's scale.
        buckets: how ranks share storage: ``"pow2"`` (default: each rank padded to the next power of two),
            ``"exact"`` (one bucket per distinct rank, no padding), or a tuple of bucket ranks (each rank
            padded to the next one listed; ``(64,)`` pads everything to 64 as :func:`adaptfn.stack` does).
        dtype: the pool's dtype (default: the first adapter's).
        device: where the buffers live (default: the first adapter's device).
        headroom: spare capacity per buffer, as a fraction of its adapters (at least 4 positions), so that
            :meth:`AdapterPool.add` rarely grows a buffer.
        pin_memory: page-locked host buffers (for :class:`OffloadedPool` copies to a GPU; needs CUDA).

    Returns:
        An :class:`AdapterPool`; use it with ``af.inject(fn, pool, route=idx)``.

    Example:
        >>> p = af.pool([a1, a2, a3])          # ranks 2, 3, 4: one bucket (float32 buckets start at r=4)
        >>> p
        AdapterPool(3 adapters in 3 slots, 4 modules, buckets r=[4], 0.0 MiB float32 on cpu)
        >>> out = af.inject(fn, p, route=torch.tensor([2, -1]))(params, input_ids=ids).logits
        >>> alone = af.inject(fn, a3)(params, input_ids=ids[:1]).logits[0]
        >>> torch.allclose(out[0], alone, atol=1e-5)
        True
    """
    policy = _check_policy(buckets)
    if isinstance(adapters, Adapter):
        raise ConfigError("pool: expected a list of adapters, got one Adapter (af.pool([adapter]))")
    adapters = list(adapters)
    if not isinstance(headroom, (int, float)) or isinstance(headroom, bool) or not 0 <= headroom <= 16:
        raise ConfigError(f"pool: headroom={headroom!r}; expected a number in [0, 16]")
    items = []
    first: torch.Tensor | None = None
    for i, a in enumerate(adapters):
        parts, info = _adapter_parts(a, f"pool: item {i}")
        items.append((i, info, parts))
        if first is None and parts:
            first = next(iter(parts.values()))[0]  # an A^T
    dt = dtype or (first.dtype if first is not None else torch.float32)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ConfigError(f"pool: dtype={dtype!r} is not a floating dtype")
    dev = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    if pin_memory and not torch.cuda.is_available():
        raise ConfigError("pool: pin_memory=True needs CUDA (page-locked memory is for copies to a GPU)")
    return _fill(_empty(policy, dt, dev, bool(pin_memory), float(headroom)), items)


# -- the per-module kernel -----------------------------------------------------------------------------
class _Binding:
    """What one adapted module needs for one call: its layout, its routing map, the call's plan cache."""

    __slots__ = ("mod", "map", "plans")

    def __init__(self, mod: _Mod, map_: _Map, plans: dict) -> None:
        self.mod, self.map, self.plans = mod, map_, plans


class _Plan:
    """The rows of one route grouped for one module layout: per bucket with rows, the rows sorted by
    position, their positions, the used positions and the rows per position; token-level indices are made
    per (tokens per row, in features) and kept."""

    __slots__ = ("groups", "_tok")

    def __init__(self, route: torch.Tensor, m: _Map) -> None:
        idx = route.to(m.bucket_of.device)
        ok = (idx >= 0) & (idx < m.n)
        ic = torch.where(ok, idx, torch.zeros((), dtype=idx.dtype, device=idx.device))
        b = torch.where(ok, m.bucket_of[ic], torch.full((), -1, dtype=torch.long, device=idx.device))
        rows = (b >= 0).nonzero().squeeze(1)
        self.groups: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._tok: dict[tuple, tuple[torch.Tensor, torch.Tensor, list]] = {}
        if rows.numel() == 0:
            return
        width = int(m.pos_of.max()) + 1 if m.n else 1
        key = b[rows] * width + m.pos_of[ic[rows]]
        key, order = torch.sort(key, stable=True)
        rows = rows[order]
        uniq, counts = torch.unique_consecutive(key, return_counts=True)
        ub = uniq // width
        per_bucket = torch.bincount(ub, minlength=len(m.buckets)).tolist()
        rows_per_bucket = torch.zeros(len(m.buckets), dtype=torch.long, device=ub.device).index_add_(
            0, ub, counts).tolist()
        scale = m.scale_of[ic[rows]]
        pos_rows = key % width
        g0 = r0 = 0
        for j, (ng, nr) in enumerate(zip(per_bucket, rows_per_bucket)):
            if ng:
                self.groups.append((m.buckets[j], rows[r0:r0 + nr], pos_rows[r0:r0 + nr], uniq[g0:g0 + ng] % width,
                                    counts[g0:g0 + ng], scale[r0:r0 + nr]))
            g0 += ng
            r0 += nr

    def tokens(self, L: int, n_in: int, kernels: tuple[str, ...], dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[Any, ...]]]:
        """``(every bucket's token rows one after the other [T_all], their scales [T_all, 1], per bucket)`` (the
        first two None, and token scales None, when the buckets run native).

        Per bucket with rows (``kernels``: each one's kernel): ``(R, start, end, token rows [T], token scales
        [T, 1] in dtype, *kernel operands)``, its tokens being ``start:end`` of the first; the operands are, for
        gather, (A indices [T * in], A offsets [T], B indices [T * R], B offsets [T]); for loop, (used positions,
        token bounds) as lists; for grouped / padded, (used positions [G], offsets [G] int32); for native, per item
        of at most 16 tokens of one adapter (first token [I], tokens [I], position [I], scale [I] float32)."""
        key = (L, n_in, kernels, dtype)
        got = self._tok.get(key)
        if got is None:
            hit: list[tuple[Any, ...]] = []
            at = 0
            for (R, rows, pos_rows, used, counts, scale), kernel in zip(self.groups, kernels):
                dev = rows.device
                tok = rows if L == 1 else (rows[:, None] * L + torch.arange(L, device=dev)).reshape(-1)
                T = tok.shape[0]
                if kernel == "native":  # items of <= 16 tokens of one adapter (tokens are sorted by adapter);
                    per = counts * L  # no per-token scales or positions: the kernel takes them per item
                    ni = (per + _NATIVE_TILE - 1) // _NATIVE_TILE
                    g = torch.repeat_interleave(torch.arange(len(per), device=dev), ni)
                    k = torch.arange(g.shape[0], device=dev) - (torch.cumsum(ni, 0) - ni)[g]
                    start = (torch.cumsum(per, 0) - per)[g] + k * _NATIVE_TILE
                    ops: tuple = (start, torch.clamp(per[g] - k * _NATIVE_TILE, max=_NATIVE_TILE), used[g],
                                  scale[torch.cumsum(counts, 0) - counts][g].to(torch.float32))
                    ts_col = None
                else:
                    ts, pos_t = (scale, pos_rows) if L == 1 else (scale.repeat_interleave(L),
                                                                  pos_rows.repeat_interleave(L))
                    ts_col = ts.to(dtype)[:, None]
                if kernel == "gather":
                    ia = (pos_t[:, None] * n_in + torch.arange(n_in, device=dev)).reshape(-1)
                    ib = (pos_t[:, None] * R + torch.arange(R, device=dev)).reshape(-1)
                    ops = (ia, torch.arange(T, device=dev) * n_in, ib, torch.arange(T, device=dev) * R)
                elif kernel == "loop":
                    ops = (used.tolist(), [0, *torch.cumsum(counts * L, 0).tolist()])
                elif kernel != "native":
                    ops = (used, torch.cumsum(counts * L, 0).to(torch.int32))
                hit.append((R, at, at + T, tok, ts_col, *ops))
                at += T
            if kernels[0] == "native":  # (every bucket native: the kernel reads the rows in place)
                got = self._tok[key] = (None, None, hit)
            else:
                one = len(hit) == 1
                every = hit[0][3] if one else torch.cat([h[3] for h in hit])
                scales = hit[0][4] if one else torch.cat([h[4] for h in hit])
                got = self._tok[key] = (every, scales, hit)
        return got


_GMM: dict[tuple[str, torch.dtype], bool] = {}  # (device type, dtype) -> torch._grouped_mm works there


def _gmm_ok(x: torch.Tensor) -> bool:
    key = (x.device.type, x.dtype)
    ok = _GMM.get(key)
    if ok is None:
        ok = False
        if hasattr(torch, "_grouped_mm"):
            try:
                a = torch.ones(3, 8, dtype=x.dtype, device=x.device)
                b = torch.ones(2, 8, 8, dtype=x.dtype, device=x.device)
                got = torch._grouped_mm(a, b, offs=torch.tensor([1, 3], dtype=torch.int32, device=x.device))
                ok = bool((got == 8).all())
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _GMM[key] = ok
    return ok


class _PoolKernel:
    """The per-module forward of a pool (bound to module slots like a method; see :meth:`AdapterPool.bind`)."""

    name = "pool"

    def forward(self, entry: Any, leaves: _Binding, on: Any, generator: Any, call_base: Any, module: nn.Module,
                x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():  # a trace would keep one route's grouping of the rows as constants
            raise ConfigError("inject: a call with an adapter pool cannot be traced with torch.jit.trace (how the "
                              "rows are grouped depends on the route's values); use torch.compile or call it eagerly")
        out = call_base(x)
        m = leaves.map
        plan = leaves.plans.get(m)  # (the plans of this route's values, see AdapterPool.bind; keyed by the map
        if plan is None:  # itself, held, so that no other map can take its id)
            plan = leaves.plans[m] = _Plan(route, m)
        if not plan.groups:
            return out
        bsz = route.shape[0]
        n_in = x.shape[-1]
        if x.shape[0] % bsz:
            raise IncompatibleAdapterError(f"route has {bsz} entries but a module saw {x.shape[0]} rows "
                                           f"({list(x.shape)}), not a multiple of {bsz}")
        L = x.numel() // (bsz * n_in)  # tokens per row (rows of one batch row are contiguous)
        x2 = x.reshape(-1, n_in)
        occ = leaves.mod.occ
        dt = occ[plan.groups[0][0]].buf.At.dtype
        if x2.dtype != dt:
            x2 = x2.to(dt)
        o_dim = out.shape[-1]
        plain = (not (torch.is_grad_enabled() and x.requires_grad) and routing._transform_active() is None
                 and not torch.compiler.is_compiling())
        if FORCE_KERNEL:
            kernels = (FORCE_KERNEL,) * len(plan.groups)
        elif plain and _native_ok(x, x2, out, occ[plan.groups[0][0]].buf):
            kernels = ("native",) * len(plan.groups)
        else:  # per bucket, from its tokens per used adapter: gather while few, else a GEMM kernel
            long = _gemm_kernel(plain, x2, n_in, o_dim)
            cpu = x2.device.type == "cpu"
            kernels = tuple(_bucket_kernel(plain, len(g[1]) * L, len(g[3]), long, cpu) for g in plan.groups)
        inplace = routing.in_place_ok(out, x)
        if kernels[0] == "native":  # every bucket at once: the kernel adds into the output's rows itself
            if not inplace:
                out = out.clone(memory_format=torch.contiguous_format)
            o2 = out.view(-1, o_dim)
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            for R, _a, _b, tok, _ts, start, length, pos, sc in plan.tokens(L, n_in, kernels, x2.dtype)[2]:
                buf = occ[R].buf
                # (CPU float32 plain tensors: _native_ok; unit column strides, contiguous buffers and indices:
                # made so here and in _Plan.tokens)
                _native.lora_rows(x2, o2, buf.At, buf.Bt, tok, start, length, pos, sc, check=False)
            return out
        o2 = out.reshape(-1, o_dim)
        every, scales, per_bucket = plan.tokens(L, n_in, kernels, x2.dtype)
        xs_all = x2.index_select(0, every)  # [T_all, in]: the tokens with an adapter, grouped by bucket
        if (plain and len(per_bucket) > 1 and every.shape[0] * o_dim <= DECODE_ELEMENTS
                and all(k == "gather" for k in kernels)):
            z = _gather_all(xs_all, scales, per_bucket, occ, o_dim).to(out.dtype)
            if inplace:
                o2.index_add_(0, every, z)
                return out
            return o2.index_add(0, every, z).view(out.shape)
        for (R, a, b, tok, ts, *ops), kernel in zip(per_bucket, kernels):
            buf = occ[R].buf
            xs = xs_all[a:b]  # this bucket's tokens (contiguous rows)
            if kernel == "gather":
                z = _gather(buf, R, o_dim, xs, ops, ts)
            elif kernel == "loop":
                z = _loop_groups(xs, buf.At, buf.Bt, *ops, ts)
            else:
                used, offs = ops
                # the used adapters only (the rows' working set); index_select over 2-D views: on a 3-D
                # tensor torch's CPU index_select takes a per-element path, ~1000x slower at these sizes
                cap = buf.At.shape[0]
                Au = buf.At.view(cap, -1).index_select(0, used).view(-1, n_in, R)  # [G, in, R]
                Bu = buf.Bt.view(cap, -1).index_select(0, used).view(-1, R, o_dim)  # [G, R, out]
                if kernel == "grouped" and (R * x2.element_size()) % 16 == 0:  # rows of a multiple of 16 bytes
                    h = torch._grouped_mm(xs, Au, offs=offs)  # [T, R]
                    h.mul_(ts)
                    z = torch._grouped_mm(h, Bu, offs=offs)  # [T, out]
                else:
                    z = _padded_groups(xs, Au, Bu, offs, ts)
            z = z.to(out.dtype)
            if inplace:
                o2.index_add_(0, tok, z)
            else:
                o2 = o2.index_add(0, tok, z)
        return out if inplace else o2.view(out.shape)


def _gather_all(xs: torch.Tensor, scales: torch.Tensor, per_bucket: list[tuple[Any, ...]], occ: Mapping[int, _Occ],
                o_dim: int) -> torch.Tensor:
    """A decode-sized call (at most :data:`DECODE_ELEMENTS` output elements) whose buckets all run ``gather``:
    the scales applied to the inputs once (``xs`` [T_all, in], a fresh copy, is scaled in place), each bucket's
    two ``embedding_bag`` sums, and their outputs concatenated so that the module adds them with one
    ``index_add_``. At these sizes the per-op costs are what counts. Returns [T_all, out]."""
    xs.mul_(scales)
    return torch.cat([_gather(occ[R].buf, R, o_dim, xs[a:b], ops) for R, a, b, _tok, _ts, *ops in per_bucket])


def _gather(buf: _Buffer, R: int, o_dim: int, xs: torch.Tensor, ops: Sequence[torch.Tensor],
            ts: torch.Tensor | None = None) -> torch.Tensor:
    """The ``gather`` kernel on one bucket: ``xs`` [T, in] (its tokens, contiguous rows), ``ops`` the A and B
    indices and offsets of :meth:`_Plan.tokens`, ``ts`` [T, 1] the scales (None: already in ``xs``). Two
    ``embedding_bag`` sums straight from the buffers (``torch.embedding_bag``: ``F.embedding_bag``'s checks cost
    more than these calls). Returns [T, out]."""
    ia, oa, ib, ob = ops
    h = torch.embedding_bag(buf.At.view(-1, R), ia, oa, False, 0, False, xs.reshape(-1))[0]  # [T, R]
    if ts is not None:
        h.mul_(ts)
    return torch.embedding_bag(buf.Bt.view(-1, o_dim), ib, ob, False, 0, False, h.view(-1))[0]


def native_status() -> str:
    """Whether pools run the compiled CPU kernel: ``"on: <library> (<flags>; <floats per vector>; <threads>)"``,
    or ``"off: <why>"`` (no C compiler, ``ADAPTFN_NATIVE=0``, a failed build) or ``"off: adaptfn.pooling.NATIVE
    is False"``. Builds the kernel if that was not tried yet (see the module docstring)."""
    if not NATIVE:
        return "off: adaptfn.pooling.NATIVE is False"
    return _native.status()


def _native_ok(x: torch.Tensor, x2: torch.Tensor, out: torch.Tensor, buf: _Buffer) -> bool:
    """Whether the native kernel serves this (plain: no autograd, torch.func or torch.compile) call: the inputs,
    output and pool buffers float32 plain tensors on the CPU, no forward-mode AD (which would not see the
    kernel's writes; torch.jit.trace is refused earlier), and the kernel built (:mod:`adaptfn._native`)."""
    if not NATIVE or x2.device.type != "cpu" or buf.At.device.type != "cpu":
        return False
    if x2.dtype != torch.float32 or out.dtype != torch.float32 or buf.At.dtype != torch.float32:
        return False
    if type(x) is not torch.Tensor or type(out) is not torch.Tensor:  # fake tensors, DTensor, other subclasses
        return False
    if _fwad.unpack_dual(x).tangent is not None:
        return False
    return _native.kernel() is not None


def _bucket_kernel(plain: bool, tokens: int, adapters: int, long: str, cpu: bool = True) -> str:
    """One bucket's kernel from its tokens and used adapters (``long``: the GEMM kernel of this call; ``cpu``:
    whether the call runs on the CPU)."""
    if not plain:
        return long
    if cpu:
        return "gather" if tokens <= CPU_GATHER_TOKENS * adapters else "loop"
    return "gather" if tokens <= GATHER_TOKENS * adapters else long


def _loop_groups(xs: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, used: list[int], bounds: list[int],
                 ts: torch.Tensor) -> torch.Tensor:
    """The low-rank part adapter by adapter, reading each one's ``A^T`` [in, R] and ``B^T`` [R, out] in place in
    the buffers (no copies, no padding): two GEMMs per adapter on its tokens' slice of ``xs`` (sorted by
    adapter; ``bounds``: the G + 1 token offsets). For few adapters with many tokens each. Returns [T, out]."""
    h = xs.new_empty(xs.shape[0], At.shape[2])
    for p, a, b in zip(used, bounds, bounds[1:]):
        torch.mm(xs[a:b], At[p], out=h[a:b])
    h.mul_(ts)
    z = xs.new_empty(xs.shape[0], Bt.shape[2])
    for p, a, b in zip(used, bounds, bounds[1:]):
        torch.mm(h[a:b], Bt[p], out=z[a:b])
    return z


def _gemm_kernel(plain: bool, x2: torch.Tensor, n_in: int, o_dim: int) -> str:
    """The GEMM kernel for buckets whose adapters have several tokens each (see the module docstring)."""
    if not plain or x2.device.type == "cpu":  # torch._grouped_mm on a CPU loops over the groups: slower than bmm
        return "padded"
    item = x2.element_size()
    if _gmm_ok(x2) and (n_in * item) % 16 == 0 and (o_dim * item) % 16 == 0:
        return "grouped"
    return "padded"


def _padded_groups(xs: torch.Tensor, Au: torch.Tensor, Bu: torch.Tensor, offs: torch.Tensor, ts: torch.Tensor
                   ) -> torch.Tensor:
    """The grouped GEMMs without ``torch._grouped_mm`` (autograd, torch.func, devices or dtypes without it):
    the tokens laid out as [G, k, in] (k: the largest group, zero padding), two batched matmuls, and the
    tokens taken back in order. Out of place, so gradients reach ``xs``. Au: [G, in, R]; Bu: [G, R, out]."""
    ends = offs.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    g, k = Au.shape[0], int(counts.max())
    grp = torch.repeat_interleave(torch.arange(g, device=xs.device), counts)  # [T] group of each token
    slot = grp * k + torch.arange(xs.shape[0], device=xs.device) - (ends - counts)[grp]  # [T] padded position
    xp = xs.new_zeros(g * k, xs.shape[1]).index_copy(0, slot, xs * ts).view(g, k, -1)
    z = torch.bmm(torch.bmm(xp, Au), Bu)  # [G, k, out]
    return z.view(g * k, -1).index_select(0, slot)


_KERNEL = _PoolKernel()


# -- checks and inject -------------------------------------------------------------------------------
def check_pool(p: Any, modules: Mapping[str, nn.Module], model_name: str) -> None:
    """Raise :class:`IncompatibleAdapterError` unless every module of the pool is a Linear / Conv1D of the
    model with the pool's in / out features."""
    mods = p._host._mods if isinstance(p, OffloadedPool) else p._mods
    for path in p.paths:
        m = mods[path]
        mod = modules.get(path)
        if mod is None:
            near = [q for q in modules if q.endswith(path.rsplit(".", 1)[-1])][:3]
            raise IncompatibleAdapterError(f"pool targets module {path!r}, which {model_name} does not have"
                                           + (f" (similar: {near})" if near else ""))
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            raise IncompatibleAdapterError(f"pool: module {path!r} is a {type(mod).__name__}; pools hold LoRA on "
                                           "nn.Linear / Conv1D modules")
        n_in, n_out = linear_dims(mod)
        if (n_in, n_out) != (m.n_in, m.n_out):
            raise IncompatibleAdapterError(f"pool: module {path!r} is {n_in} -> {n_out} in the model but "
                                           f"{m.n_in} -> {m.n_out} in the pool's adapters")


def check_pool_route(p: AdapterPool | OffloadedPool, route: Any) -> torch.Tensor:
    """A route for a pool: a LongTensor [batch] of live slots or -1 (typed errors)."""
    if isinstance(route, str) or route is None:
        raise ConfigError("inject: a pool needs route=LongTensor[batch] (row i uses slot route[i], -1: none); "
                          "route='all' is for af.stack")
    host = p._host if isinstance(p, OffloadedPool) else p
    r = routing.check_route(route, host.size) if host.size else _empty_route(route)
    ids = r[r >= 0].cpu()
    if ids.numel():
        live = host.live_mask()
        dead = ids[~live[ids]]
        if dead.numel():
            raise ConfigError(f"route: slot {int(dead[0])} holds no adapter in this pool (removed); live slots: "
                              f"{_ranges(host.slots)}")
    return r


def _empty_route(route: Any) -> torch.Tensor:
    r = routing.check_route(route, 1)
    if bool((r >= 0).any()):
        raise ConfigError("route: the pool is empty; every entry must be -1")
    return r


# -- host pool with a device cache ------------------------------------------------------------------
class _Cache:
    """An OffloadedPool's device cache: a device AdapterPool of at most ``capacity`` adapters, the adapters'
    uids in LRU order with their cache slots, and counters. Shared by the pools :meth:`OffloadedPool.add`
    / :meth:`OffloadedPool.remove` make (adapters are keyed by uid, which never repeats)."""

    def __init__(self, device: torch.device, capacity: int, dtype: torch.dtype, policy: Any) -> None:
        self.lock = threading.Lock()
        self.pool = _empty(policy, dtype, device, False, 0.0)
        self.lru: collections.OrderedDict[int, int] = collections.OrderedDict()  # uid -> cache slot
        self.capacity = capacity
        self.stats = {"calls": 0, "hits": 0, "misses": 0, "evictions": 0, "bytes_copied": 0}


class OffloadedPool:
    """An :class:`AdapterPool` kept in host memory with a device cache of the adapters in use (S-LoRA's
    unified paging): each call copies to the device the adapters its rows name that the cache lacks,
    evicting the least recently used ones, and runs on the cache.

    Arguments:
        host: the pool holding every adapter (on the CPU; ``af.pool(..., pin_memory=True)`` for fast copies
            to a GPU).
        device: where the calls run.
        capacity: how many adapters the device cache holds; a call may name at most that many distinct slots.

    Slots are the host pool's. :meth:`add` / :meth:`remove` return new offloaded pools sharing the cache (an
    adapter is cached under an id that no other adapter ever gets, so a reused slot never hits a stale
    entry). Results equal the resident pool's; the cache is state invisible in values.

    Example:
        >>> host = af.pool([a1, a2, a3])
        >>> off = af.OffloadedPool(host, device="cpu", capacity=2)
        >>> route = torch.tensor([2, 0])
        >>> out = af.inject(fn, off, route=route)(params, input_ids=ids).logits
        >>> torch.allclose(out, af.inject(fn, host, route=route)(params, input_ids=ids).logits, atol=1e-6)
        True
        >>> off.stats()["misses"], len(off.cached())
        (2, 2)
    """

    __slots__ = ("_host", "_cache", "__weakref__")

    def __init__(self, host: AdapterPool, device: torch.device | str, capacity: int) -> None:
        if not isinstance(host, AdapterPool):
            raise ConfigError(f"OffloadedPool: host must be an AdapterPool (af.pool), got {type(host).__name__}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"OffloadedPool: capacity={capacity!r}; expected a positive int (adapters)")
        try:
            dev = torch.device(device)
            torch.empty(0, device=dev)
        except (RuntimeError, TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"OffloadedPool: device={device!r} is not available here ({e})") from None
        object.__setattr__(self, "_host", host)
        object.__setattr__(self, "_cache", _Cache(dev, capacity, host.dtype, host._policy))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("OffloadedPool is immutable; add / remove return new pools")

    @property
    def host(self) -> AdapterPool:
        return self._host

    @property
    def device(self) -> torch.device:
        return self._cache.pool.device

    @property
    def capacity(self) -> int:
        return self._cache.capacity

    @property
    def size(self) -> int:
        return self._host.size

    @property
    def slots(self) -> tuple[int, ...]:
        return self._host.slots

    @property
    def paths(self) -> tuple[str, ...]:
        return self._host.paths

    def __len__(self) -> int:
        return len(self._host)

    def _with_host(self, host: AdapterPool) -> OffloadedPool:
        new = object.__new__(OffloadedPool)
        object.__setattr__(new, "_host", host)
        object.__setattr__(new, "_cache", self._cache)
        return new

    def add(self, adapter: Adapter) -> tuple[OffloadedPool, int]:
        """:meth:`AdapterPool.add` on the host pool (nothing is copied to the device until a call needs it)."""
        host, slot = self._host.add(adapter)
        return self._with_host(host), slot

    def remove(self, slot: int) -> OffloadedPool:
        """:meth:`AdapterPool.remove` on the host pool (a cached copy is evicted when space is needed)."""
        return self._with_host(self._host.remove(slot))

    def get(self, slot: int) -> Adapter:
        return self._host.get(slot)

    def stats(self) -> dict[str, int]:
        """Counters of the shared cache: calls, hits and misses (adapters per call), evictions, bytes copied."""
        with self._cache.lock:
            return dict(self._cache.stats)

    def cached(self) -> tuple[int, ...]:
        """The host slots of this pool whose adapters are in the device cache, least recently used first."""
        by_uid = {info.uid: s for s, info in enumerate(self._host._slots) if info is not None}
        with self._cache.lock:
            return tuple(by_uid[u] for u in self._cache.lru if u in by_uid)

    def memory(self) -> dict[str, int]:
        """Bytes: the host pool's (:meth:`AdapterPool.memory`) and ``"device"`` (the cache's buffers)."""
        with self._cache.lock:
            dev = self._cache.pool.memory()["allocated"]
        return {**self._host.memory(), "device": dev}

    def bind(self, route: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, Any, Any, Any]]]:
        """Page in the adapters ``route`` names, then bind the device cache with the route mapped to cache
        slots (see :meth:`AdapterPool.bind`)."""
        host, c = self._host, self._cache
        want = sorted(set(route[route >= 0].tolist()))  # noqa: C414 (sorted: a stable copy order)
        if len(want) > c.capacity:
            raise ConfigError(f"OffloadedPool: the batch names {len(want)} distinct adapters but the device cache "
                              f"holds {c.capacity}; split the batch or make a larger cache")
        uids = [host._slots[s].uid for s in want]  # type: ignore[union-attr]
        with c.lock:
            c.stats["calls"] += 1
            need = set(uids)
            for u in uids:
                if u in c.lru:
                    c.lru.move_to_end(u)
                    c.stats["hits"] += 1
            # the cache lets go of its pool value while it pages: positions an eviction frees are then
            # reusable at once (unless an in-flight call still holds that pool value: then they stay intact)
            cp, c.pool = c.pool, None
            try:
                for s, u in zip(want, uids):
                    if u in c.lru:
                        continue
                    c.stats["misses"] += 1
                    while len(c.lru) >= c.capacity:
                        victim = next(v for v in c.lru if v not in need)
                        cp = cp.remove(c.lru.pop(victim))
                        c.stats["evictions"] += 1
                    parts = host._parts(s)
                    c.stats["bytes_copied"] += sum(a.nbytes + b.nbytes for a, b, _ in parts.values())
                    free = next((i for i, x in enumerate(cp._slots) if x is None), len(cp._slots))
                    cp = cp._with(free, host._slots[s], parts)  # type: ignore[arg-type]
                    c.lru[u] = free
            finally:
                c.pool = cp
            lut = torch.full((max(host.size, 1),), -1, dtype=torch.long)
            for s, u in zip(want, uids):
                lut[s] = c.lru[u]
        dev_route = torch.where(route >= 0, lut[route.clamp(min=0).cpu()].to(route.device), route)
        return cp.bind(dev_route.to(cp.device))


def inject_pool(fn: Any, p: AdapterPool | OffloadedPool, route: Any, generator: Any) -> Any:
    """``af.inject(fn, pool, route=idx)`` (see :func:`adaptfn.inject`)."""
    if generator is not None:
        raise ConfigError("inject: an adapter pool serves inference; LoRA dropout (generator=) is not supported")
    r = check_pool_route(p, route)
    if any(isinstance(x, str) for x in fn.routes):
        raise ConfigError("inject: this function already has a route='all' stack, which repeats the batch once per "
                          "adapter; a pool's route would not match the rows")
    check_pool(p, fn.modules, type(fn.model).__name__)
    return fn.with_pools(((p, r),))

