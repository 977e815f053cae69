"""PEFT's ``lora_bias=True``: ``lora_B`` is a Linear *with* a bias, trained with the adapter, called from
:mod:`adaptfn.methods.lora` for entries that carry the ``lora_bias`` leaf.

``y = base(x) + s * (B A x + b)`` for a Linear / GPT-2 Conv1D target (PEFT refuses it on embeddings and with
DoRA); the leaf ``lora_bias`` [out] ([N, out] stacked) is PEFT's ``<path>.lora_B.bias``. Initialised as PEFT
does: zeros (``init_lora_weights=True``), else ``nn.Linear``'s default draw ``U(-1/sqrt(r), 1/sqrt(r))``.
``merge`` folds ``s * b`` into the base layer's bias (a base layer without a bias cannot be merged: PEFT refuses
it too). A scale weight ``w`` multiplies it with the rest of the delta (saved as ``b * w``); a masked entry is
written with zeros.

Example:
    >>> cfg = af.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False)
    >>> a = af.init(fn, cfg, generator=torch.Generator().manual_seed(0))
    >>> q = "model.decoder.layers.0.self_attn.q_proj"
    >>> tuple(a.leaves(q)["lora_bias"].shape), sorted(k.rsplit(".", 2)[-2] for k in af.state_dict(a) if q in k)
    ((22,), ['lora_A', 'lora_B', 'lora_B'])
    >>> merged = af.merge(params, a)                         # the bias takes scaling * b
    >>> bool((merged[q + ".bias"] != params[q + ".bias"]).any())
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import routing
from ..adapter import COEF, SCALING, Entry
from ..errors import IncompatibleAdapterError, shape_str

__all__ = ["LEAF", "PEFT_KEY", "init", "add", "add_routed", "merge_bias", "scale_of", "check"]

LEAF = "lora_bias"
PEFT_KEY = "lora_B.bias"


def init(out: int, r: int, random: bool, generator: torch.Generator | None, device: Any) -> torch.Tensor:
    """PEFT's initial ``lora_B.bias`` [out] (float32): zeros, or ``nn.Linear(r, out)``'s uniform draw."""
    b = torch.zeros(out, dtype=torch.float32, device=device)
    if random:
        bound = 1 / math.sqrt(r)
        b.uniform_(-bound, bound, generator=generator)
    return b


def _weight(leaves: Mapping[str, torch.Tensor]) -> torch.Tensor:
    b = leaves[LEAF]
    c = leaves.get(COEF)
    return b if c is None else b * c.to(b.dtype)


def add(out: torch.Tensor, leaves: Mapping[str, torch.Tensor], s: Any) -> torch.Tensor:
    """``out + s * w * b`` (``s``: the entry's scale, with the gate folded in under a transform; ``w``: the
    ``coef`` leaf, read here)."""
    b = _weight(leaves)
    return (out + b * s).to(out.dtype)


def add_routed(out: torch.Tensor, leaves: Mapping[str, torch.Tensor], s_all: torch.Tensor,
               route: torch.Tensor) -> torch.Tensor:
    """Row i gets adapter ``route[i]``'s ``s * w * b`` (nothing for rows routed to -1); ``s_all``: [N] scales
    with the weights and gates folded in."""
    b = leaves[LEAF]  # [N, out]
    ic, sr = routing.row_scale(s_all.to(b.dtype), route)
    term = b[ic] * sr[:, None]  # [bsz, out]
    bsz = route.shape[0]
    o = out.shape[-1]
    return (out.reshape(bsz, -1, o) + term[:, None, :]).reshape(out.shape).to(out.dtype)


def merge_bias(leaves: Mapping[str, torch.Tensor], on: Any, s: Any,
               tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"bias": bias + s * w * b}``, added in the wider dtype and rounded once."""
    bias = tensors.get("bias")
    if bias is None:
        raise IncompatibleAdapterError("the adapter has a lora_bias but the base layer has no bias to fold it into "
                                       "(PEFT cannot merge it either)")
    b = _weight(leaves) * s
    if on is not True:
        b = b * on
    return {"bias": (bias + b).to(bias.dtype)}


def scale_of(entry: Entry, leaves: Mapping[str, torch.Tensor]) -> Any:
    return leaves[SCALING].detach() if SCALING in leaves else entry.scaling


def check(path: str, leaves: Mapping[str, torch.Tensor], n_out: int) -> None:
    b = leaves[LEAF]
    stacked = leaves["lora_A"].dim() == 3
    if tuple(b.shape[1:] if stacked else b.shape) != (n_out,):
        raise IncompatibleAdapterError(f"module {path!r}: {LEAF} {shape_str(b.shape)} does not fit out={n_out} "
                                       f"(expected [{n_out}])")
