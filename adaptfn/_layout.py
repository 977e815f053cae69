"""Which way a base weight is stored, decided per module from the model (never from a file's single flag).

PEFT writes one ``fan_in_fan_out`` for a whole adapter, although a model may mix ``nn.Linear`` weights
([out, in]) with transformers' GPT-2 ``Conv1D`` weights ([in, out]); for a square weight only the module type
tells which way a delta goes. :func:`adaptfn.functional` records here, for every Linear / Conv1D weight of its
model (the user's tensor and the detached one it puts in ``params``), whether it is stored [in, out]; the
record is keyed by tensor identity and held weakly (a tensor that dies drops out), as :mod:`adaptfn.quant`
records quantized layers. :func:`adaptfn.merge` reads it through :func:`transposed`, and gives the weights it
returns the layout of the weights they replace, so a merge of a merge still knows. A tensor that never came
from a functional model (a hand-made params dict) falls back to the adapter entry's ``fan_in_fan_out``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["register", "transposed", "carry"]

_STORED_IN_OUT: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight tensor -> True: [in, out] (Conv1D)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def register(modules: Mapping[str, nn.Module], tensors: Mapping[int, torch.Tensor]) -> None:
    """Record the layout of every Linear / Conv1D weight of a model (called by :func:`adaptfn.functional`).

    Arguments:
        modules: the model's modules by path. tensors: ``id(model tensor) -> the tensor functional() puts in
            params`` (plain parameters are detached there): both are recorded.
    """
    for m in modules.values():
        conv = isinstance(m, nn.modules.conv._ConvNd)
        for p in m._parameters.values():  # 3-d parameters (MoE experts): [E, in, out] when is_transposed
            if not conv and isinstance(p, torch.Tensor) and p.dim() == 3:
                _STORED_IN_OUT[p] = bool(getattr(m, "is_transposed", False))
                twin = tensors.get(id(p))
                if twin is not None and twin is not p:
                    _STORED_IN_OUT[twin] = _STORED_IN_OUT[p]
        conv1d = _is_conv1d(m)
        if not (conv1d or isinstance(m, nn.Linear)):
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        _STORED_IN_OUT[w] = conv1d
        twin = tensors.get(id(w))
        if twin is not None and twin is not w:
            _STORED_IN_OUT[twin] = conv1d


def transposed(weight: torch.Tensor) -> bool | None:
    """The recorded layout of a weight.

    Arguments:
        weight: a tensor (from a ``params`` dict, a model, a merge).

    Returns:
        True for a GPT-2 ``Conv1D`` weight ([in, out]), False for an ``nn.Linear`` weight, None when it did not
        come from a model given to :func:`adaptfn.functional` (nor from a merge of one).

    Example:
        >>> from adaptfn import _layout
        >>> q = "model.decoder.layers.0.self_attn.q_proj.weight"                # a square nn.Linear weight
        >>> _layout.transposed(params[q]), _layout.transposed(params[q].clone())
        (False, None)
        >>> _layout.transposed(af.merge(params, adapter)[q])                    # merged weights keep it
        False
    """
    try:
        return _STORED_IN_OUT.get(weight)
    except TypeError:  # not a tensor
        return None


def carry(old: torch.Tensor | None, new: torch.Tensor) -> None:
    """Give ``new`` (a merged weight) the recorded layout of ``old`` (the weight it replaces), if any."""
    layout = None if old is None else transposed(old)
    if layout is not None and isinstance(new, torch.Tensor) and new is not old:
        _STORED_IN_OUT[new] = layout
