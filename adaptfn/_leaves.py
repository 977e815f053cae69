"""Checks of an adapter's leaves that no method can skip: their dtypes (against each other and against the base
tensors they replace), and tensors made safe to write (no two keys sharing storage)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .adapter import GATE, SCALING, Adapter
from .errors import IncompatibleAdapterError

__all__ = ["check_leaves", "storage_safe", "COMPUTE_DTYPES"]

_FLOAT8 = frozenset(getattr(torch, n) for n in dir(torch) if n.startswith(("float8", "float4")))
COMPUTE_DTYPES = "float32, float64, float16 or bfloat16"


def _dtype_class(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.is_complex():
        return "complex"
    return "floating" if t.is_floating_point() else "integer"


def _name(t: Any) -> str:
    return str(t.dtype).replace("torch.", "") if isinstance(t, torch.Tensor) else type(t).__name__


def check_leaves(adapter: Any, where: str, params: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`IncompatibleAdapterError` naming ``where``, the module path, the leaf and its dtype unless:
    every leaf is a tensor; gates (and stacked scalings) are floating point; an entry's delta leaves are of one
    floating compute dtype (not float8: no kernel computes with it); and, given the model's ``params``, each
    replacement is of the same kind (floating / integer / bool) as the base tensor it replaces."""
    if not isinstance(adapter, Adapter):
        return
    for path, e in adapter.entry_items:
        leaves = adapter.leaves(path)
        for n, t in leaves.items():
            if not isinstance(t, torch.Tensor):
                raise IncompatibleAdapterError(f"{where}: module {path!r}: leaf {n!r} is a {type(t).__name__}, not a "
                                               "tensor")
        for n in (GATE, SCALING):
            t = leaves.get(n)
            if t is not None and not t.is_floating_point():
                raise IncompatibleAdapterError(
                    f"{where}: module {path!r}: the {n!r} leaf is {_name(t)}; it must be floating point")
        if e.kind:
            delta = {n: t for n, t in leaves.items() if n not in e.replaced and n not in (GATE, SCALING)}
            for n, t in delta.items():
                if not t.is_floating_point() or t.dtype in _FLOAT8:
                    raise IncompatibleAdapterError(
                        f"{where}: module {path!r}: leaf {n!r} is {_name(t)}; an adapter's delta leaves must be "
                        f"{COMPUTE_DTYPES} (e.g. af.tree.map(lambda t: t.float(), adapter) for float32)")
            dtypes = {t.dtype for t in delta.values()}
            if len(dtypes) > 1:
                shown = ", ".join(f"{n} {_name(t)}" for n, t in sorted(delta.items()))
                raise IncompatibleAdapterError(
                    f"{where}: module {path!r}: its delta leaves have different dtypes ({shown}); cast them to one")
        if params is not None:
            for n in e.replaced:
                base = params.get(f"{path}.{n}" if path else n)
                t = leaves[n]
                # quantized base weights (tensor subclasses) are checked by adaptfn.quant
                if isinstance(base, torch.Tensor) and type(base) in (torch.Tensor, torch.nn.Parameter) and (
                        _dtype_class(base) != _dtype_class(t)):
                    raise IncompatibleAdapterError(
                        f"{where}: module {path!r}: leaf {n!r} is {_name(t)} but the model's tensor it replaces is "
                        f"{_name(base)}; a replacement must be of the same kind ({_dtype_class(base)})")


def storage_safe(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, no two sharing storage (safetensors refuses shared storage; PEFT writes
    each key as its own tensor): a tensor sharing storage with an earlier one, or a view into a larger
    storage, is cloned."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in sd.items():
        v = v.detach()
        if v.device.type != "cpu":
            v = v.cpu()
        if v.numel() == 0:
            out[k] = v.contiguous()
            continue
        storage = v.untyped_storage()
        ptr = storage.data_ptr()
        whole = (v.is_contiguous() and v.storage_offset() == 0
                 and storage.nbytes() == v.numel() * v.element_size())
        if ptr in seen or not whole:
            v = v.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out
