"""A tiny model mixing every layer kind LoRA targets, with odd sizes: an ``nn.Embedding``, a square ``nn.Linear``,
a square and a non-square transformers ``Conv1D`` (GPT-2's [in, out] weights) and a non-square ``nn.Linear``.
PEFT records one ``fan_in_fan_out`` for all of them (the last module it wraps decides), so a square weight's
layout can only come from the model."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, DIM, HIDDEN = 29, 13, 17
TARGETS = ["embed", "sq", "c_sq", "c_up", "down"]


class Mixed(nn.Module):
    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.sq = nn.Linear(DIM, DIM)
        self.c_sq = Conv1D(DIM, DIM)
        self.c_up = Conv1D(HIDDEN, DIM)
        self.down = nn.Linear(HIDDEN, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        x = torch.tanh(self.sq(x))
        x = torch.tanh(self.c_sq(x))
        x = torch.tanh(self.c_up(x))
        return self.head(self.down(x))


def mixed(seed: int = 0) -> Mixed:
    """The model with weights and biases of unit-order scale (Conv1D's default init is tiny)."""
    torch.manual_seed(seed)
    m = Mixed()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    return m.eval()


def mixed_ids(batch: int = 3, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
