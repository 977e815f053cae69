"""OFT on 1x1 convolutions with the real ``peft`` package (0.21.2): ``r`` / ``oft_block_size`` (adjusted), ``coft``,
``block_share``, stride and padding, a model mixing Conv2d and Linear; both ways, merges, masks, stacks (see
``parity/lyco_conv.py``). PEFT's Conv2d OFT with a larger kernel is refused, and why is checked here. Linear and
embedding OFT: ``test_more_methods_parity.py``."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import adaptfn as af
from parity.lyco_conv import Case, ConvLinear, build, check_both_ways, make_peft, x_of
from parity.test_conv_parity import _one as one

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CASES = [
    Case("conv2d-1x1-stride-pad", one(lambda: nn.Conv2d(12, 7, 1, stride=2, padding=1)), (3, 12, 9, 9),
         dict(r=3, oft_block_size=0)),
    Case("conv2d-1x1-coft-share", one(lambda: nn.Conv2d(15, 7, 1)), (3, 15, 5, 6),
         dict(oft_block_size=5, coft=True, eps=0.05, block_share=True)),
    Case("conv2d-1x1-adjusted-exact", one(lambda: nn.Conv2d(14, 11, 1, bias=False)), (3, 14, 4, 3),
         dict(oft_block_size=6, use_cayley_neumann=False)),
    Case("mixed-point-linear", ConvLinear, (3, 3, 9, 9), dict(oft_block_size=7, target_modules=["point", "head"])),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_oft_conv_both_ways(case: Case, tmp_path) -> None:
    check_both_ways(case, peft.OFTConfig, tmp_path)


def test_oft_conv_kernel_larger_than_one_is_refused_saying_why(tmp_path) -> None:
    case = Case("k3", one(lambda: nn.Conv2d(4, 5, 3, padding=1)), (2, 4, 6, 6), dict(r=2, oft_block_size=0))
    pm = make_peft(case.make, peft.OFTConfig, case.kw, init_weights=True)
    x = x_of(case)
    with torch.no_grad():  # what is refused: PEFT's identity rotation is not the base model here
        assert not torch.allclose(pm(x), build(case.make)(x), atol=1e-3)
    pm.save_pretrained(tmp_path)
    fn, params = af.functional(build(case.make))
    with pytest.raises(af.IncompatibleAdapterError, match="1x1 kernel only.*F.fold"):
        af.init(fn, af.OFTConfig(target_modules=["m"], r=2, oft_block_size=0))
    a = af.load(tmp_path)  # the file itself is PEFT's layout; injecting it into the 3x3 conv is refused
    with pytest.raises(af.IncompatibleAdapterError, match="1x1 kernel only"):
        af.inject(fn, a)(params, x)
    fn1, _ = af.functional(nn.ModuleDict({"m": nn.Conv1d(4, 4, 1)}))
    with pytest.raises(af.IncompatibleAdapterError, match="OFT supports nn.Linear, nn.Embedding and 1x1 nn.Conv2d"):
        af.init(fn1, af.OFTConfig(target_modules=["m"], r=2, oft_block_size=0))
