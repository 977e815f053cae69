"""Per-row routing kernels: batch row ``i`` uses adapter ``idx[i]`` of a stacked adapter (-1: none).

The base layer runs once for the whole batch; only the low-rank part is per row. A module may see its
batch reshaped: OPT's MLP gets ``[batch * seq, d]`` rows and ``generate`` repeats rows for beams
(``repeat_interleave``); in both cases the rows of one batch row are contiguous, so the leading dimension
is ``batch * k`` and the input is viewed as ``[batch, k * ..., d]``.

Two kernels, chosen per call from the sizes (see bench/README.md for the measurements):

* ``dense``: one GEMM with every adapter's A for every row (``[M, N * r]``), a per-row mask, one GEMM
  with every adapter's B. Wastes ``N`` x the A/B FLOPs but reads each adapter once and has no gathers:
  the fast choice when rows are few (decode, short prompts).
* ``gather``: ``A[idx]``, ``B[idx]`` per row and two batched matmuls: exact FLOPs, weights gathered
  per row; the choice for long rows.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .errors import ConfigError, IncompatibleAdapterError

# use the dense kernel while (rows * tokens-per-row * adapters) <= DENSE_LIMIT * rows
DENSE_LIMIT = 64


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


def base_gemm(call_base: Any, module: nn.Module, x: Any, *others: torch.Tensor) -> BaseGemm | None:
    """The base layer's GEMM when an adapter may run it itself, accumulating into a buffer that already
    holds the adapter's low-rank part (see :func:`accumulate_base`); None when it may not.

    It may when ``call_base`` is the class's own forward of this exact ``nn.Linear`` (or transformers
    ``Conv1D``), nothing needs autograd, no torch.func transform, torch.compile or autocast is active,
    and every tensor has one dtype and device. Otherwise the adapter calls ``call_base`` as usual."""
    func = getattr(call_base, "__func__", None)
    if getattr(call_base, "__self__", None) is not module:
        return None
    cls = type(module)
    if cls is nn.Linear and func is nn.Linear.forward:
        transposed = False
    elif func is cls.forward and cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        transposed = True
    else:
        return None
    w, b = module.weight, module.bias
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or type(w) not in (torch.Tensor, nn.Parameter):
        return None
    ts = (x, w, *others) if b is None else (x, w, b, *others)
    dt, dev = x.dtype, x.device
    if any(t.dtype != dt or t.device != dev for t in ts) or torch.is_autocast_enabled(dev.type):
        return None
    if torch.compiler.is_compiling() or any(_wrapped(t) for t in ts):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return None
    return BaseGemm(w, b, transposed)


def accumulate_base(z: torch.Tensor, x: torch.Tensor, gemm: BaseGemm) -> torch.Tensor:
    """``z + x @ W^T`` computed in place in ``z`` ([M, out], fresh; bias and low-rank part already in it):
    the base GEMM accumulates into the adapter's buffer, so the output is written once and read by no
    extra pass. Returns it shaped [*x.shape[:-1], out]."""
    w = gemm.weight
    z.addmm_(x.reshape(-1, x.shape[-1]), w if gemm.transposed else w.T)
    return z.view(*x.shape[:-1], z.shape[-1])


def _wrapped(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


_B_CAT: WeakIdKeyDictionary = WeakIdKeyDictionary()  # by tensor identity


def _b_cat(B: torch.Tensor) -> torch.Tensor:
    """Stacked B [N, out, r] laid out as [out, N * r] for one GEMM. Cached per (tensor, version) when no
    gradient flows through it (inference), so a fixed stack is re-laid out once, not at every call."""
    n, o, r = B.shape
    cacheable = not B.requires_grad and not torch._C._functorch.is_functorch_wrapped_tensor(B) \
        and not torch.compiler.is_compiling() and not torch.is_inference(B)
    if cacheable:
        hit = _B_CAT.get(B)
        if hit is not None and hit[0] == B._version:
            return hit[1]
    cat = B.permute(1, 0, 2).reshape(o, n * r)
    if cacheable:
        if cat._base is not None:  # a view would keep B alive through the cache
            cat = cat.clone()
        _B_CAT[B] = (B._version, cat)
    return cat


_PICK: WeakIdKeyDictionary = WeakIdKeyDictionary()  # route tensor -> {(sources, r, dtype): row multipliers}


def _dense_pick(scale: Any, idx: torch.Tensor, n: int, r: int, dtype: torch.dtype,
                sources: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """Row multipliers [bsz, N*r] of the dense kernel: the row's own adapter's scale on its r columns, 0
    elsewhere. They depend only on the route and the scaling/gate leaves, so in inference they are
    cached per (route, leaves, versions) and the per-module work is one GEMM, one multiply, one GEMM."""
    key = None
    if sources is not None and not any(torch.is_inference(t) for t in (idx, *sources)):  # those have no version
        key = (tuple((id(t), t._version) for t in sources), idx._version, r, dtype)
        hit = _PICK.get(idx, {}).get(key)
        if hit is not None and all(ref() is t for ref, t in zip(hit[0], sources)):
            return hit[1]
    s_all = scale() if callable(scale) else scale
    ic, s = row_scale(s_all.to(dtype), idx)
    pick = (ic[:, None] == torch.arange(n, device=ic.device)[None, :]).to(dtype) * s[:, None]
    pick = pick.repeat_interleave(r, dim=1)
    if key is not None:
        import weakref

        entry = _PICK.get(idx)
        if entry is None or len(entry) > 256:
            entry = _PICK[idx] = {}
        entry[key] = (tuple(weakref.ref(t) for t in sources), pick)  # type: ignore[union-attr]
    return pick


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
    if kernel is None:
        kernel = "dense" if xb.shape[1] * n <= DENSE_LIMIT else "gather"
    if gemm is None:
        assert out is not None
        if out.dtype != B.dtype or out.shape[:-1] != x.shape[:-1] or not in_place_ok(out, x, A, B, *(sources or ())):
            s_all = scale() if callable(scale) else scale
            return (out + lowrank(x, A, B, s_all, idx, kernel)).to(out.dtype)
    o, bias = B.shape[1], (gemm.bias if gemm is not None else None)
    if kernel == "dense":
        h = F.linear(xb, A.reshape(n * r, A.shape[-1]))  # [bsz, L, N*r]
        h = h * _dense_pick(scale, idx, n, r, h.dtype, sources)[:, None, :]
        h2, bt = h.reshape(-1, n * r), _b_cat(B).T
        if gemm is None:
            out.view(-1, o).addmm_(h2, bt)  # type: ignore[union-attr]
            return out  # type: ignore[return-value]
        z = torch.mm(h2, bt) if bias is None else torch.addmm(bias, h2, bt)
        return accumulate_base(z, x if base_input is None else base_input, gemm)
    s_all = scale() if callable(scale) else scale
    ic, s = row_scale(s_all.to(x.dtype), idx)
    h = torch.bmm(xb, A[ic].transpose(1, 2)) * s[:, None, None]  # [bsz, L, r]
    bt = B[ic].transpose(1, 2)  # [bsz, r, out]
    if gemm is None:
        out.view(bsz, -1, o).baddbmm_(h, bt)  # type: ignore[union-attr]
        return out  # type: ignore[return-value]
    z = torch.bmm(h, bt) if bias is None else torch.baddbmm(bias.expand(bsz, h.shape[1], o), h, bt)
    return accumulate_base(z.view(-1, o), x if base_input is None else base_input, gemm)


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
    ic, s = row_scale(scale.to(x.dtype), idx)
    if kernel is None:
        kernel = "dense" if xb.shape[1] * n <= DENSE_LIMIT else "gather"
    if kernel == "dense":
        h = F.linear(xb, A.reshape(n * r, A.shape[-1]))  # [bsz, L, N*r]
        pick = (ic[:, None] == torch.arange(n, device=ic.device)[None, :]).to(h.dtype) * s[:, None]  # [bsz, N]
        h = h * pick.repeat_interleave(r, dim=1)[:, None, :]
        delta = F.linear(h, _b_cat(B))
    else:
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
