"""PeftModels for the parity tests: made, perturbed and reloaded one way in every file."""

from __future__ import annotations

import warnings
from typing import Any

import peft
import torch
from torch import nn


def peft_model(model: nn.Module, cls: Any, kw: dict[str, Any], seed: int = 1234, move: bool = False,
               adapter_name: str = "default") -> Any:
    """``peft.get_peft_model(model, cls(**kw))`` in eval mode, PEFT's random adapter weights drawn from the
    global RNG seeded with ``seed`` (PEFT's warnings silenced). ``move``: then add ``0.3 * N(0, 1)`` (a generator
    seeded ``seed + 1``) to every trainable tensor, tied views once, so that tensors PEFT starts at fixed values
    (DoRA magnitudes, lora_B biases, trainable token rows) are moved off them too."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, cls(**kw), adapter_name=adapter_name)
    if move:
        g = torch.Generator().manual_seed(seed + 1)
        seen: set[int] = set()
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad and p.data_ptr() not in seen:
                    seen.add(p.data_ptr())
                    p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return pm.eval()


def peft_reload(model: nn.Module, folder: Any) -> Any:
    """``peft.PeftModel.from_pretrained(model, folder)`` in eval mode, PEFT's warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, folder).eval()
