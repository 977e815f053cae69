"""LoKr on convolutions with the real ``peft`` package (0.21.2): full ``lokr_w2`` with kernel axes, the CP form
(``use_effective_conv2d``), flat factors, ``decompose_both`` and ``decompose_factor``, on Conv1d / Conv2d with odd
channel counts, strides, padding and groups, a model mixing Conv2d and Linear, and a tiny diffusers UNet; both ways,
merges, masks, stacks (see ``parity/lyco_conv.py``); ``rank_dropout`` on a convolution drawn as PEFT draws it.
Linear LoKr: ``test_more_methods_parity.py``."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import assert_close
from torch import nn

import adaptfn as af
from parity.lyco_conv import Case, ConvLinear, build, check_both_ways, check_unet, make_peft, x_of
from parity.test_conv_parity import _one as one

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CASES = [
    Case("conv2d-flat", one(lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1)), (3, 5, 9, 9), dict(r=2, alpha=3)),
    Case("conv2d-cp", one(lambda: nn.Conv2d(12, 18, 3, padding=1)), (3, 12, 5, 6),
         dict(r=1, alpha=3, use_effective_conv2d=True, decompose_both=True)),
    Case("conv2d-cp-rect-factor", one(lambda: nn.Conv2d(4, 6, (3, 5), padding=1)), (3, 4, 7, 8),
         dict(r=1, alpha=2, use_effective_conv2d=True, decompose_factor=2)),
    Case("conv1d-full-w2-groups", one(lambda: nn.Conv1d(6, 9, 3, padding=1, groups=3)), (3, 6, 11),
         dict(r=3, alpha=3)),
    # PEFT 0.21.2's Conv1d CP form fails at r=1 (torch.kron on its einsum's strides), so r=2 here
    Case("conv1d-cp", one(lambda: nn.Conv1d(16, 25, 3, stride=2)), (3, 16, 11),
         dict(r=2, alpha=3, use_effective_conv2d=True, decompose_both=True)),
    Case("conv2d-1x1-full", one(lambda: nn.Conv2d(12, 18, 1)), (3, 12, 4, 5), dict(r=8, alpha=3)),
    Case("mixed-conv-linear", ConvLinear, (3, 3, 9, 9), dict(
        r=2, alpha=3, target_modules=["conv", "row", "point", "head"], use_effective_conv2d=True,
        decompose_both=True, rank_pattern={"head": 1})),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lokr_conv_both_ways(case: Case, tmp_path) -> None:
    check_both_ways(case, peft.LoKrConfig, tmp_path)


def test_lokr_unet(tmp_path) -> None:
    check_unet(peft.LoKrConfig, dict(r=2, alpha=4, use_effective_conv2d=True, decompose_both=True,
                                     target_modules=["to_k", "to_out.0", "conv1", "conv2", "conv_shortcut"]),
               tmp_path)


def test_lokr_conv_rank_dropout_draws_as_peft() -> None:
    case = CASES[1]
    kw = dict(case.kw, rank_dropout=0.5, rank_dropout_scale=True, module_dropout=0.2)
    pm = make_peft(case.make, peft.LoKrConfig, kw)
    pm.train()
    x = x_of(case)
    fn, params = af.functional(build(case.make))
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        a = af.load(d)
    torch.manual_seed(5)
    ref = torch.stack([pm(x).detach() for _ in range(4)])
    g = torch.Generator().manual_seed(5)
    ours = torch.stack([af.inject(fn, a, generator=g)(params, x) for _ in range(4)])
    assert_close(ours, ref, "training draws")
