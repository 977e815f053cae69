"""Per-row routing kernels: batch row ``i`` uses adapter ``idx[i]`` of a stacked adapter (-1: none).

The base layer runs once for the whole batch; only the low-rank part is per row. A module may see its
batch reshaped: OPT's MLP gets ``[batch * seq, d]`` rows and ``generate`` repeats rows for beams
(``repeat_interleave``); in both cases the rows of one batch row are contiguous, so the leading dimension
is ``batch * k`` and the input is viewed as ``[batch, k * ..., d]``.

Four kernels, chosen per call from the sizes (see bench/README.md for the measurements):

* ``grouped``: the rows sorted by adapter into ``[G, k, ...]`` groups (G adapters that have rows, k slots
  each, zero-weighted padding), two batched matmuls over the groups, and the result gathered back to row
  order. Each used adapter's weights are read once and the FLOPs are the exact low-rank ones (plus the
  padding): the choice for short rows (decode, short prompts) in inference, and for any row length when
  the route is already sorted into equal groups (``route="all"``): then nothing is gathered at all. The
  grouping depends only on the route, so it is computed once per route and cached.
* ``shared`` (``route="all"`` only, see :func:`same_inputs`): while the adapters' copies of the batch are
  still equal at an adapted module (every module before the first adapted one's output), its base GEMM
  and the A side run once on one copy; only the B side is per adapter.
* ``dense``: one GEMM with every adapter's A for every row (``[M, N * r]``), a per-row mask, one GEMM
  with every adapter's B. Wastes ``N`` x the A/B FLOPs but has no gathers: for very few rows or
  adapters, and under torch.func transforms (no data-dependent shapes).
* ``gather``: ``A[idx]``, ``B[idx]`` per row and two batched matmuls: exact FLOPs, weights gathered
  per row; the choice for long rows.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, IncompatibleAdapterError

__all__ = ["DENSE_LIMIT", "GROUPED_TOKENS", "BaseGemm", "check_route", "rows_view", "row_scale", "in_place_ok",
           "base_gemm", "lowrank_then_base", "accumulate_base", "same_inputs", "lowrank_add", "lowrank",
           "embedding_lowrank"]

# use the dense kernel while (rows * tokens-per-row * adapters) <= DENSE_LIMIT * rows (transforms, autograd)
DENSE_LIMIT = 64
# inference: grouped when the rows are already grouped by adapter, or while tokens-per-row <= GROUPED_TOKENS
# and the groups' padding at most doubles the rows
GROUPED_TOKENS = 16


def check_route(route: torch.Tensor, n: int) -> torch.Tensor:
    """Validate a route vector against a stack of ``n`` adapters (typed errors)."""
    if not isinstance(route, torch.Tensor):
        raise ConfigError(f"route: expected a LongTensor[batch] or 'all', got {type(route).__name__}")
    if route.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ConfigError(f"route: expected an integer tensor, got dtype {route.dtype}")
    if route.dim() != 1:
        raise ConfigError(f"route: expected a 1-D tensor [batch], got shape {list(route.shape)}")
    if route.numel() == 0:
        raise ConfigError("route: empty")
    lo, hi = int(route.min()), int(route.max())
    if lo < -1 or hi >= n:
        raise ConfigError(f"route: indices must be in [-1, {n - 1}] for a stack of {n} adapters, got {lo}..{hi}")
    return route.long()


def rows_view(x: torch.Tensor, bsz: int) -> torch.Tensor:
    """``x`` [bsz * k, ..., d] -> [bsz, L, d] (rows of one batch row are contiguous)."""
    lead = x.shape[0]
    if lead % bsz:
        raise IncompatibleAdapterError(
            f"route has {bsz} entries but a module saw {lead} rows ({list(x.shape)}), not a multiple of {bsz}")
    return x.reshape(bsz, -1, x.shape[-1])


def row_scale(scale: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(clamped index, per-row scale with 0 for rows routed to -1)."""
    ic = idx.clamp(min=0)
    return ic, torch.where(idx >= 0, scale[ic], torch.zeros((), dtype=scale.dtype, device=scale.device))


def in_place_ok(out: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether ``out`` (a fresh base-layer output) may be updated in place: a plain contiguous tensor, not a
    view, not inside a torch.func transform or torch.compile, and no autograd graph that could need it."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if torch.compiler.is_compiling() or wrapped(out) or any(wrapped(t) for t in others):
        return False
    if out._base is not None or not out.is_contiguous():
        return False
    return not (torch.is_grad_enabled() and (out.requires_grad or any(t.requires_grad for t in others)))


class BaseGemm(NamedTuple):
    """The GEMM of a plain ``nn.Linear`` / transformers ``Conv1D`` base layer: ``x @ w^T + bias``
    (``w`` stored [in, out] when ``transposed``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transposed: bool


_LINEAR_FORWARD = nn.Linear.forward
_transform_active = torch._C._functorch.peek_interpreter_stack  # not None inside vmap / grad / jvp


def base_gemm(call_base: Any, module: nn.Module, x: Any, *others: torch.Tensor) -> BaseGemm | None:
    """The base layer's GEMM when an adapter may run it itself, accumulating into a buffer that already
    holds the adapter's low-rank part (see :func:`accumulate_base`); None when it may not.

    It may when ``call_base`` is the class's own forward of this exact ``nn.Linear`` (or transformers
    ``Conv1D``), nothing needs autograd, no torch.func transform, torch.compile or autocast is active,
    and every tensor has one dtype. Otherwise the adapter calls ``call_base`` as usual. (Runs once per
    adapted module and call, so it is kept to cheap checks.)"""
    if getattr(call_base, "__self__", None) is not module:
        return None
    cls = type(module)
    if cls is nn.Linear:
        if call_base.__func__ is not _LINEAR_FORWARD:
            return None
        transposed = False
    elif call_base.__func__ is cls.forward and cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        transposed = True
    else:
        return None
    if _transform_active() is not None or torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return None
    w, b = module.weight, module.bias
    if type(w) is not torch.Tensor and type(w) is not nn.Parameter:
        return None
    dt = x.dtype
    if w.dtype != dt or (b is not None and b.dtype != dt) or x.dim() < 1:
        return None
    for t in others:
        if t.dtype != dt:
            return None
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)
                                    or any(t.requires_grad for t in others)):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    return BaseGemm(w, b, transposed)


def lowrank_then_base(h: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: Any,
                      gemm: BaseGemm, coef: torch.Tensor | None = None) -> torch.Tensor:
    """One LoRA module in inference: ``bias + s * ((h A^T) * coef) B^T`` into a fresh buffer, then the base
    GEMM ``x W^T`` accumulates into it. h, x: [..., in] (h is x after dropout). A: [r, in]. B: [out, r].
    s: float or 0-d tensor. coef: None or a 0-d tensor of A's dtype (a scale weight: multiplying the rank-r
    product by 1 is exact, so a weight of 1 gives the unweighted result bit for bit). Returns [..., out]."""
    h2 = F.linear(h, A).view(-1, A.shape[0])  # [M, r], fresh
    if coef is not None:
        h2.mul_(coef)
    bias = gemm.bias
    if type(s) is float and bias is not None:
        z = torch.addmm(bias, h2, B.T, alpha=s)
    else:
        if type(s) is not float or s != 1.0:
            h2.mul_(s)
        z = torch.mm(h2, B.T) if bias is None else torch.addmm(bias, h2, B.T)
    return accumulate_base(z, x, gemm)


def accumulate_base(z: torch.Tensor, x: torch.Tensor, gemm: BaseGemm) -> torch.Tensor:
    """``z + x @ W^T`` computed in place in ``z`` ([M, out], fresh; bias and low-rank part already in it):
    the base GEMM accumulates into the adapter's buffer, so the output is written once and read by no
    extra pass. Returns it shaped [*x.shape[:-1], out]."""
    w = gemm.weight
    z.addmm_(x.reshape(-1, x.shape[-1]), w if gemm.transposed else w.T)
    return z.view(*x.shape[:-1], z.shape[-1])


class _DerivedCache:
    """Tensors derived from other tensors (a re-laid-out B, row multipliers), keyed by those tensors'
    identities and version counters: an in-place change misses (writes through ``.data`` bypass version
    counters and are not seen, as with autograd), and an entry is dropped when one of its tensors dies.
    A hit is one dict lookup; nothing is cached for inference tensors (no version counter), tensors that
    need gradients, or under torch.func transforms / torch.compile; a value made under inference_mode is
    not returned to a call that records autograd."""

    def __init__(self) -> None:
        self._d: dict[tuple, tuple] = {}

    @staticmethod
    def usable(tensors: tuple[torch.Tensor, ...]) -> bool:
        if _transform_active() is not None or torch.compiler.is_compiling():
            return False
        return not any(t.requires_grad or t.is_inference() for t in tensors)

    def get(self, tensors: tuple[torch.Tensor, ...], extra: tuple = ()) -> torch.Tensor | None:
        hit = self._d.get((*map(id, tensors), *extra))
        if hit is None:
            return None
        refs, versions, value = hit
        if _transform_active() is not None or torch.compiler.is_compiling():
            return None
        for ref, t, v in zip(refs, tensors, versions):
            if ref() is not t or t._version != v or t.requires_grad:
                return None
        if (isinstance(value, torch.Tensor) and value.is_inference() and torch.is_grad_enabled()
                and not torch.is_inference_mode_enabled()):
            return None  # made under inference_mode: autograd may not save it (recomputed, not cached)
        return value

    def put(self, tensors: tuple[torch.Tensor, ...], extra: tuple, value: torch.Tensor) -> None:
        if not self.usable(tensors):
            return
        key = (*map(id, tensors), *extra)
        d = self._d

        def drop(_: Any, key: tuple = key) -> None:
            d.pop(key, None)

        d[key] = (tuple(weakref.ref(t, drop) for t in tensors), tuple(t._version for t in tensors), value)

    def memo(self, tensors: tuple[torch.Tensor, ...] | None, extra: tuple, make: Any) -> Any:
        """``make()``, cached under ``tensors`` (None: not cached)."""
        if tensors is None:
            return make()
        hit = self.get(tensors, extra)
        if hit is None:
            hit = make()
            self.put(tensors, extra, hit)
        return hit


_B_CAT = _DerivedCache()


def _b_cat(B: torch.Tensor) -> torch.Tensor:
    """Stacked B [N, out, r] as the [N * r, out] operand of one GEMM (a transposed view of an [out, N * r]
    layout). Cached per (tensor, version) when no
    gradient flows through it (inference), so a fixed stack is re-laid out once, not at every call."""
    hit = _B_CAT.get((B,))
    if hit is not None:
        return hit
    n, o, r = B.shape
    cat = B.permute(1, 0, 2).reshape(o, n * r)
    if _B_CAT.usable((B,)):
        if cat._base is not None:  # a view would keep B alive through the cache
            cat = cat.clone()
        _B_CAT.put((B,), (), cat.T)
    return cat.T


_PICK = _DerivedCache()


def _dense_pick(scale: Any, idx: torch.Tensor, n: int, r: int, dtype: torch.dtype,
                sources: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """Row multipliers [bsz, 1, N*r] of the dense kernel: the row's own adapter's scale on its r columns, 0
    elsewhere. They depend only on the route and the scaling/gate leaves, so in inference they are
    cached per (route, leaves, versions) and the per-module work is one GEMM, one multiply, one GEMM."""
    def make() -> torch.Tensor:
        s_all = scale() if callable(scale) else scale
        ic, s = row_scale(s_all.to(dtype), idx)
        pick = (ic[:, None] == torch.arange(n, device=ic.device)[None, :]).to(dtype) * s[:, None]
        return pick.repeat_interleave(r, dim=1)[:, None, :]

    return _PICK.memo((idx, *sources) if sources is not None else None, (r, dtype), make)


class _Groups:
    """The rows of a route grouped by adapter (see the ``grouped`` kernel). Row-level and cached per route
    tensor; token-level indices are derived per tokens-per-row ``L`` and kept here."""

    __slots__ = ("used", "g", "k", "rows", "slot", "valid", "identity", "_tokens")

    def __init__(self, idx: torch.Tensor, n: int) -> None:
        bsz, dev = idx.shape[0], idx.device
        ic = idx.clamp(min=0)  # rows routed to -1 ride along in adapter 0's group with weight 0
        counts = torch.bincount(ic, minlength=n)
        has = counts > 0
        self.g, self.k = int(has.sum()), int(counts.max())
        self.used = None if self.g == n else has.nonzero().squeeze(1)  # adapters with rows
        gid = ic if self.used is None else (torch.cumsum(has, 0) - 1)[ic]  # group of each row
        order = torch.argsort(gid, stable=True)
        cnt = counts[has]
        gs = gid[order]
        sorted_slot = gs * self.k + torch.arange(bsz, device=dev) - (torch.cumsum(cnt, 0) - cnt)[gs]
        self.slot = torch.empty_like(sorted_slot).index_copy_(0, order, sorted_slot)  # [bsz] slot of each row
        self.rows = torch.zeros(self.g * self.k, dtype=torch.long, device=dev).index_copy_(
            0, self.slot, torch.arange(bsz, device=dev))  # [G*k] row held by each slot (0: padding)
        self.valid = torch.zeros(self.g * self.k, device=dev).index_copy_(
            0, self.slot, (idx >= 0).float()).view(self.g, self.k)  # [G, k] 1: a routed row, 0: padding / -1
        # rows already sorted by adapter in equal groups (route="all", sorted routes): no gathers at all
        self.identity = self.g * self.k == bsz and bool((self.slot == torch.arange(bsz, device=dev)).all())
        self._tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokens(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token row held by each slot [G*k*L], slot of each token row [bsz*L]) for L tokens per row."""
        hit = self._tokens.get(L)
        if hit is None:
            ar = torch.arange(L, device=self.rows.device)
            hit = self._tokens[L] = ((self.rows[:, None] * L + ar).view(-1), (self.slot[:, None] * L + ar).view(-1))
        return hit


_GROUPS = _DerivedCache()


def _groups(idx: torch.Tensor, n: int) -> _Groups:
    return _GROUPS.memo((idx,), (n,), lambda: _Groups(idx, n))


def _group_scale(scale: Any, idx: torch.Tensor, grp: _Groups, dtype: torch.dtype,
                 sources: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """Slot multipliers [G, k, 1, 1] of the grouped kernel: the slot's adapter's scale, 0 for padding and
    rows routed to -1. Cached like the dense kernel's row multipliers (per route and scaling/gate leaves)."""
    def make() -> torch.Tensor:
        s_all = scale() if callable(scale) else scale
        if grp.used is not None:
            s_all = s_all.index_select(0, grp.used)
        return (grp.valid.to(dtype) * s_all.to(dtype)[:, None])[:, :, None, None]

    return _PICK.memo((idx, *sources) if sources is not None else None, ("grouped", dtype), make)


def _grouped(xb: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ss: torch.Tensor, grp: _Groups,
             bias: torch.Tensor | None) -> torch.Tensor:
    """The grouped kernel: ``bias + lowrank`` for xb [bsz, L, in] -> [bsz * L, out] (a fresh tensor); ss:
    the slot multipliers from :func:`_group_scale`."""
    L, d, o, r = xb.shape[1], xb.shape[2], B.shape[1], A.shape[1]
    g, k = grp.g, grp.k
    if grp.identity:
        xs = xb.reshape(g, k * L, d)
    else:
        take, back = grp.tokens(L)
        xs = xb.reshape(-1, d).index_select(0, take).view(g, k * L, d)
    if grp.used is not None:
        A, B = A.index_select(0, grp.used), B.index_select(0, grp.used)
    h = torch.bmm(xs, A.transpose(1, 2))  # [G, k*L, r]
    h.view(g, k, L, r).mul_(ss)
    bt = B.transpose(1, 2)
    zs = torch.bmm(h, bt) if bias is None else torch.baddbmm(bias.expand(g, k * L, o), h, bt)
    return zs.view(-1, o) if grp.identity else zs.view(-1, o).index_select(0, back)


def _grouped_ok(idx: torch.Tensor, n: int, L: int) -> _Groups | None:
    """The grouping when the grouped kernel suits this call, else None: rows already grouped (any length),
    or short rows with little padding."""
    if _transform_active() is not None or torch.compiler.is_compiling():
        return None
    grp = _groups(idx, n)
    if grp.identity or (L <= GROUPED_TOKENS and grp.g * grp.k <= 2 * idx.shape[0]):
        return grp
    return None


class _AllCall:
    """A ``route="all"`` call in progress on this thread: its route, and whether the adapters' copies of the
    batch may still be equal (False from the first adapted module whose input differs between them)."""

    __slots__ = ("route", "open")

    def __init__(self, route: torch.Tensor) -> None:
        self.route, self.open = route, True


_ALL = threading.local()


@contextlib.contextmanager
def same_inputs(route: torch.Tensor) -> Iterator[None]:
    """Within this block ``route`` routes a batch that repeats the same inputs once per adapter (``route="all"``
    builds it so). Until the first adapted module whose input differs between the copies, adapted plain
    Linear / Conv1D modules check (exactly, ``torch.equal``) that their input's copies are equal and then
    run the base GEMM and the A side on one copy (layer 0's q/k/v of a transformer: 1/N of their base
    FLOPs). A failed check ends the checks for the call; the output is the same either way."""
    prev = getattr(_ALL, "call", None)
    _ALL.call = _AllCall(route)
    try:
        yield
    finally:
        _ALL.call = prev


def _shared(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: Any, gemm: BaseGemm,
            call: _AllCall) -> torch.Tensor | None:
    """The ``shared`` kernel: x [N * T..., in] holds N equal copies of [T, in] (checked here; None and the
    call's checks end if not). Returns ``bias + x0 W^T + s_n (x0 A_n^T) B_n^T`` as [*x.shape[:-1], out]."""
    n, r, o = A.shape[0], A.shape[1], B.shape[1]
    xg = x.reshape(n, -1, x.shape[-1])
    x0 = xg[0]  # [T, in]
    # torch.equal stops at the first difference: a call whose copies differ pays for little of one read
    if not (torch.equal(xg[1], x0) and (n == 2 or torch.equal(xg[2:], x0.expand(n - 2, *x0.shape)))):
        call.open = False
        return None
    w = gemm.weight
    wt = w if gemm.transposed else w.T
    base0 = torch.mm(x0, wt) if gemm.bias is None else torch.addmm(gemm.bias, x0, wt)  # [T, out], once
    s_all = (scale() if callable(scale) else scale).to(x.dtype)
    h = torch.mm(x0, A.reshape(n * r, A.shape[-1]).T)  # [T, N*r]: every adapter's A in one GEMM
    hg = h.view(-1, n, r).transpose(0, 1) * s_all[:, None, None]  # [N, T, r]
    z = torch.baddbmm(base0.expand(n, *base0.shape), hg, B.transpose(1, 2))  # [N, T, out]
    return z.view(*x.shape[:-1], o)


def lowrank_add(out: torch.Tensor | None, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: Any,
                idx: torch.Tensor, kernel: str | None = None,
                sources: tuple[torch.Tensor, ...] | None = None, gemm: BaseGemm | None = None,
                base_input: torch.Tensor | None = None) -> torch.Tensor:
    """``out + lowrank(x, ...)``, accumulated into ``out`` in place when that is safe (inference).

    ``scale`` may be a callable returning the [N] scales (only called when needed); ``sources`` are the
    leaves the scales come from (scaling, gate), which lets the dense kernel reuse its row multipliers.
    With ``gemm`` (from :func:`base_gemm`; ``out`` is then None) the low-rank part is computed first, with
    the bias, and the base GEMM accumulates into it, reading ``base_input`` (default ``x``; they differ
    under LoRA dropout)."""
    bsz = idx.shape[0]
    xb = rows_view(x, bsz)
    n, r = A.shape[0], A.shape[1]
    if gemm is None:
        assert out is not None
        if out.dtype != B.dtype or out.shape[:-1] != x.shape[:-1] or not in_place_ok(out, x, A, B, *(sources or ())):
            s_all = scale() if callable(scale) else scale
            return (out + lowrank(x, A, B, s_all, idx, kernel)).to(out.dtype)
    o, bias = B.shape[1], (gemm.bias if gemm is not None else None)
    base_x = x if base_input is None else base_input
    if kernel == "grouped":
        grp: _Groups | None = _groups(idx, n)
    else:
        grp = _grouped_ok(idx, n, xb.shape[1]) if kernel is None and n * xb.shape[1] > 4 else None
    if grp is not None:
        call = getattr(_ALL, "call", None)
        if (call is not None and call.open and call.route is idx and gemm is not None and n > 1
                and not (x.is_cuda and torch.cuda.is_current_stream_capturing())  # torch.equal syncs
                and grp.identity and grp.used is None and (base_input is None or base_input is x)):
            shared = _shared(x, A, B, scale, gemm, call)
            if shared is not None:
                return shared
        z = _grouped(xb, A, B, _group_scale(scale, idx, grp, x.dtype, sources), grp, bias)
        if gemm is None:
            out.view(-1, o).add_(z)  # type: ignore[union-attr]
            return out  # type: ignore[return-value]
        return accumulate_base(z, base_x, gemm)
    if kernel is None:
        kernel = "dense" if xb.shape[1] * n <= DENSE_LIMIT else "gather"
    if kernel == "dense":
        h = F.linear(xb, A.reshape(n * r, A.shape[-1]))  # [bsz, L, N*r], fresh: scaled in place
        h2, bt = h.mul_(_dense_pick(scale, idx, n, r, h.dtype, sources)).view(-1, n * r), _b_cat(B)
        if gemm is None:
            out.view(-1, o).addmm_(h2, bt)  # type: ignore[union-attr]
            return out  # type: ignore[return-value]
        z = torch.mm(h2, bt) if bias is None else torch.addmm(bias, h2, bt)
        return accumulate_base(z, base_x, gemm)
    s_all = scale() if callable(scale) else scale
    ic, s = row_scale(s_all.to(x.dtype), idx)
    h = torch.bmm(xb, A[ic].transpose(1, 2)) * s[:, None, None]  # [bsz, L, r]
    bt = B[ic].transpose(1, 2)  # [bsz, r, out]
    if gemm is None:
        out.view(bsz, -1, o).baddbmm_(h, bt)  # type: ignore[union-attr]
        return out  # type: ignore[return-value]
    z = torch.bmm(h, bt) if bias is None else torch.baddbmm(bias.expand(bsz, h.shape[1], o), h, bt)
    return accumulate_base(z.view(-1, o), base_x, gemm)


def lowrank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor,
            kernel: str | None = None) -> torch.Tensor:
    """Per-row ``scale[j] * x_i @ A[j]^T @ B[j]^T`` with ``j = idx[i]`` (zero where ``idx[i] == -1``).

    Arguments:
        x: [bsz * k, ..., in]. A: [N, r, in]. B: [N, out, r]. scale: [N]. idx: [bsz] (int64).
        kernel: "dense" or "gather"; None picks by size.

    Returns:
        [*x.shape[:-1], out].
    """
    bsz = idx.shape[0]
    xb = rows_view(x, bsz)
    n, r = A.shape[0], A.shape[1]
    if kernel is None:
        kernel = "dense" if xb.shape[1] * n <= DENSE_LIMIT else "gather"
    if kernel == "dense":
        h = F.linear(xb, A.reshape(n * r, A.shape[-1]))  # [bsz, L, N*r]
        delta = (h * _dense_pick(scale, idx, n, r, h.dtype, None)) @ _b_cat(B)
    else:
        ic, s = row_scale(scale.to(x.dtype), idx)
        h = torch.bmm(xb, A[ic].transpose(1, 2)) * s[:, None, None]  # [bsz, L, r]
        delta = torch.bmm(h, B[ic].transpose(1, 2))  # [bsz, L, out]
    return delta.reshape(*x.shape[:-1], B.shape[1])


def embedding_lowrank(ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                      idx: torch.Tensor) -> torch.Tensor:
    """Per-row LoRA of an embedding: ``scale[j] * A[j][:, ids]^T @ B[j]^T``. ids: [bsz * k, ...]."""
    bsz = idx.shape[0]
    if ids.shape[0] % bsz:
        raise IncompatibleAdapterError(f"route has {bsz} entries but the embedding saw {ids.shape[0]} rows")
    ib = ids.reshape(bsz, -1)  # [bsz, L]
    ic, s = row_scale(scale.to(B.dtype), idx)
    h = A.transpose(1, 2)[ic[:, None], ib] * s[:, None, None]  # [bsz, L, r]
    delta = torch.bmm(h, B[ic].transpose(1, 2))
    return delta.reshape(*ids.shape, B.shape[1])
