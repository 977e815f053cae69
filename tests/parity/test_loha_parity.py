"""LoHa on convolutions with the real ``peft`` package (0.21.2): flat and CP (``use_effective_conv2d``) forms on
Conv1d / Conv2d with odd channel counts, strides, padding and groups, a model mixing Conv2d and Linear, and a tiny
diffusers UNet; both ways, merges, masks, stacks (see ``parity/lyco_conv.py``). Linear LoHa:
``test_more_methods_parity.py``."""

from __future__ import annotations

import peft
import pytest
from torch import nn

from parity.lyco_conv import Case, ConvLinear, check_both_ways, check_unet
from parity.test_conv_parity import _one as one

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CASES = [
    Case("conv2d-stride", one(lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1)), (3, 5, 9, 9), dict(r=2, alpha=3)),
    Case("conv2d-cp-rect", one(lambda: nn.Conv2d(4, 11, (3, 5), padding=(1, 2))), (3, 4, 7, 8),
         dict(r=3, alpha=5, use_effective_conv2d=True)),
    Case("conv1d-cp-groups", one(lambda: nn.Conv1d(6, 9, 3, padding=1, groups=3)), (3, 6, 11),
         dict(r=3, alpha=2, use_effective_conv2d=True)),
    Case("conv1d-flat", one(lambda: nn.Conv1d(5, 7, 3, stride=2)), (3, 5, 11), dict(r=4, alpha=3)),
    Case("conv2d-1x1-cp-ignored", one(lambda: nn.Conv2d(7, 19, 1)), (3, 7, 4, 5),
         dict(r=2, alpha=3, use_effective_conv2d=True)),
    Case("mixed-conv-linear", ConvLinear, (3, 3, 9, 9), dict(
        r=2, alpha=3, target_modules=["conv", "row", "point", "head"], use_effective_conv2d=True,
        rank_pattern={"row": 3}, alpha_pattern={"head": 7})),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_loha_conv_both_ways(case: Case, tmp_path) -> None:
    check_both_ways(case, peft.LoHaConfig, tmp_path)


def test_loha_unet(tmp_path) -> None:
    check_unet(peft.LoHaConfig, dict(r=2, alpha=4, use_effective_conv2d=True,
                                     target_modules=["to_q", "to_v", "conv1", "conv2", "conv_shortcut", "proj_in"]),
               tmp_path)
