"""Convolutions and nn.MultiheadAttention (adaptfn/methods/layers.py, lora_layers.py, ia3_conv.py): the per-row
kernels against a per-row reference, the grouped / strided / dilated conv LoRA against its definition written out
with F.conv*, gradients, stacks of grouped convs with different ranks, the weight kernel against the low-rank
pair, nn.MultiheadAttention's routing with masks, and every refusal naming the layer kind and the module path.
PEFT parity is in tests/parity/test_conv_parity.py."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from peft.utils import get_peft_model_state_dict
from torch import nn

import adaptfn as af
from adaptfn.methods import layers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Net(nn.Module):
    """The issue's layer: Conv2d(groups=2, stride=2, dilation=2), between a Conv1d and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2)
        self.lin = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)  # [b, 4, 25]
        h = self.c2(h.view(h.shape[0], 4, 5, 5))  # [b, 6, 3, 3]
        return self.lin(h.flatten(2).transpose(1, 2))


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def lora_by_hand(module: nn.Conv2d, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """The LoRA of a conv, written out: A with the base's stride / padding / dilation (groups=1), B a 1x1
    convolution with the base's groups."""
    h = F.conv2d(x, A, None, module.stride, module.padding, module.dilation, 1)
    return module(x) + s * F.conv2d(h, B, None, 1, 0, 1, module.groups)


def test_grouped_strided_dilated_conv_is_the_lora_it_describes(tmp_path) -> None:
    model = net()
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=4, lora_alpha=6, target_modules=["c2"], init_lora_weights=False), generator=gen(0))
    leaves = a.leaves("c2")
    assert tuple(leaves["lora_A"].shape) == (4, 4, 3, 3) and tuple(leaves["lora_B"].shape) == (6, 2, 1, 1)
    xs = torch.randn(2, 3, 25, generator=gen(2))
    seen = {"in": model.c1(xs).view(2, 4, 5, 5)}  # c2's input
    want = model.lin(lora_by_hand(model.c2, seen["in"], leaves["lora_A"], leaves["lora_B"], 6 / 4).flatten(2)
                     .transpose(1, 2))
    assert_close(af.inject(fn, a)(params, xs), want)
    # under autograd (the low-rank pair) and without (the same pair: a grouped conv has no weight kernel)
    g = torch.func.grad(lambda t: af.inject(fn, t)(params, xs).square().sum())(a)
    ref_A = leaves["lora_A"].clone().requires_grad_()
    ref_B = leaves["lora_B"].clone().requires_grad_()
    y = model.lin(lora_by_hand(model.c2, seen["in"], ref_A, ref_B, 6 / 4).flatten(2).transpose(1, 2))
    y.square().sum().backward()
    assert_close(g.leaves("c2")["lora_A"], ref_A.grad, "grad A")
    assert_close(g.leaves("c2")["lora_B"], ref_B.grad, "grad B")
    with pytest.raises(af.IncompatibleAdapterError, match=r"merge: module 'c2'.*groups=2"):
        af.merge(params, a)
    # PEFT's keys and shapes; PEFT loads the file
    af.save(a, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(net(), tmp_path)
    theirs = get_peft_model_state_dict(pm)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in af.state_dict(a).items()}


@pytest.mark.parametrize("kind", ["conv1d", "conv2d-groups-reflect", "conv3d-dilated"])
@pytest.mark.parametrize("kernel", ["segment", "gather", "dense"])
def test_conv_route_kernels_equal_the_per_row_reference(kind: str, kernel: str) -> None:
    torch.manual_seed(0)
    if kind == "conv1d":
        m, x = nn.Conv1d(3, 5, 3, stride=2, padding=1), torch.randn(6, 3, 9)
    elif kind == "conv2d-groups-reflect":
        m, x = nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"), torch.randn(6, 4, 5, 5)
    else:
        m, x = nn.Conv3d(2, 3, 3, padding=2, dilation=2), torch.randn(6, 2, 4, 4, 4)
    nd = x.dim() - 2
    n, r, g = 3, 4, m.groups
    A = torch.randn(n, r, m.in_channels, *m.kernel_size)
    B = torch.randn(n, m.out_channels, r // g, *([1] * nd))
    scale = torch.tensor([0.5, 2.0, -1.0])
    route = torch.tensor([2, 0, -1])  # 3 batch rows, each seen as 2 module rows
    got = layers.conv_lowrank_routed(x, A, B, scale, route, m, nd, kernel=kernel)
    rows = route.repeat_interleave(2)
    for i, j in enumerate(rows.tolist()):
        want = torch.zeros_like(got[i]) if j < 0 else scale[j] * layers.conv_lowrank(x[i:i + 1], A[j], B[j], m, nd)[0]
        assert_close(got[i], want, f"{kernel} row {i}")
    if g == 1:  # the merged kernel (inference): one conv per adapter's rows with W + s B . A
        merged = layers.conv_routed_merged(m, x, A, B, scale, route)
        assert_close(merged, m(x) + got, "merged kernel")


def test_weight_kernel_equals_the_low_rank_pair_and_masks_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), nn.ReLU(), nn.Conv2d(7, 5, 1)).eval()
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=3, lora_alpha=5, target_modules=["0", "2"], init_lora_weights=False),
                generator=gen(0))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():  # inference: W + s B . A in one convolution
        fast = af.inject(fn, a)(params, x)
    slow = af.inject(fn, a)(params, x.requires_grad_())  # autograd: the low-rank pair
    assert_close(fast, slow.detach(), "weight kernel vs low-rank pair", tol=1e-6)
    with torch.no_grad():
        assert torch.equal(af.inject(fn, af.scale(a, 1.0))(params, x), fast), "scale(a, 1) is a, bit for bit"
        assert torch.equal(af.inject(fn, af.mask(a, False))(params, x), fn(params, x))
    off = af.stack([af.mask(a, False), a])
    out = torch.func.vmap(lambda s: af.inject(fn, s)(params, x))(off)
    assert torch.equal(out[0], fn(params, x).detach()), "a masked stack member is the base, bit for bit"


def test_stack_of_grouped_conv_adapters_with_different_ranks() -> None:
    """Rank padding keeps each group's rows together (B's group j reads A's rows j * r/g ...)."""
    model = net()
    fn, params = af.functional(model)
    a2 = af.init(fn, af.LoraConfig(r=2, target_modules=["c2"], init_lora_weights=False), generator=gen(1))
    a6 = af.init(fn, af.LoraConfig(r=6, lora_alpha=3, target_modules=["c2", "c1"], init_lora_weights=False),
                 generator=gen(2))
    stacked = af.stack([a2, a6])
    assert tuple(stacked.leaves("c2")["lora_A"].shape) == (2, 6, 4, 3, 3)
    assert tuple(stacked.leaves("c2")["lora_B"].shape) == (2, 6, 3, 1, 1)
    x = torch.randn(3, 3, 25, generator=gen(3))
    want = torch.stack([af.inject(fn, a)(params, x) for a in (a2, a6)])
    assert_close(torch.func.vmap(lambda s: af.inject(fn, s)(params, x))(stacked), want, "vmap")
    route = torch.tensor([1, 0, 1])
    assert_close(af.inject(fn, stacked, route=route)(params, x), torch.stack([want[j][i] for i, j in
                                                                               enumerate(route.tolist())]), "route")
    for orig, back in zip((a2, a6), af.unstack(stacked)):
        for p in orig.paths:
            for k, v in orig.leaves(p).items():
                assert torch.equal(back.leaves(p)[k], v), (p, k)


def test_route_gradients_reach_only_the_rows_adapter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16, 2)).eval()
    fn, params = af.functional(model)
    adapters = [af.init(fn, af.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), generator=gen(i))
                for i in range(3)]
    stacked = af.stack(adapters)
    x = torch.randn(2, 3, 4, 4)
    route = torch.tensor([2, 0])
    g = torch.func.grad(lambda s: af.inject(fn, s, route=route)(params, x).square().sum())(stacked)
    assert g.leaves("0")["lora_A"][1].abs().sum() == 0
    for j, i in ((2, 0), (0, 1)):
        xi = x[i:i + 1]
        gj = torch.func.grad(lambda a, xi=xi: af.inject(fn, a)(params, xi).square().sum())(adapters[j])
        assert_close(g.leaves("0")["lora_A"][j], gj.leaves("0")["lora_A"], f"adapter {j}")


class Attn(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(6, 2, batch_first=batch_first)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x if self.mha.batch_first else x.transpose(0, 1)
        out, w = self.mha(t, t, t, key_padding_mask=mask, need_weights=True, average_attn_weights=False)
        return (out if self.mha.batch_first else out.transpose(0, 1)), w


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_route_with_masks_and_weights(batch_first: bool) -> None:
    torch.manual_seed(0)
    model = Attn(batch_first).eval()
    fn, params = af.functional(model)
    adapters = [af.init(fn, af.LoraConfig(r=2, lora_alpha=3, target_modules=["mha"], init_lora_weights=False),
                        generator=gen(i)) for i in range(2)]
    stacked = af.stack(adapters)
    x = torch.randn(3, 4, 6)
    mask = torch.tensor([[False] * 4, [False, False, True, True], [False, True, False, False]])
    route = torch.tensor([1, -1, 0])
    out, w = af.inject(fn, stacked, route=route)(params, x, mask)
    for i, j in enumerate(route.tolist()):
        ref = fn(params, x, mask) if j < 0 else af.inject(fn, adapters[j])(params, x, mask)
        assert_close(out[i], ref[0][i], f"row {i}")
        assert_close(w[i], ref[1][i], f"attention weights of row {i}")
    # two adapters on one attention layer add (PEFT's multi-active adapters), as their merge does
    both = af.select({"a": adapters[0], "b": adapters[1]}, ["a", "b"])
    assert_close(af.inject(fn, both)(params, x, mask)[0], fn(af.merge(params, both), x, mask)[0], "sum vs merge")


def test_adapter_model_merges_attention_layers(tmp_path) -> None:
    torch.manual_seed(0)
    model = Attn(True).eval()
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=2, target_modules=["mha"], init_lora_weights=False), generator=gen(0))
    x, mask = torch.randn(2, 4, 6), torch.zeros(2, 4, dtype=torch.bool)
    want = af.inject(fn, a)(params, x, mask)[0]
    af.save(a, tmp_path)
    fresh = Attn(True).eval()
    fresh.load_state_dict(model.state_dict())
    am = af.AdapterModel(fresh)
    am.load_adapter(str(tmp_path), adapter_name="x")
    am.set_adapter("x")
    merged = am.merge_and_unload()
    with torch.no_grad():
        assert_close(merged(x, mask)[0], want)


# -- refusals ---------------------------------------------------------------------------------------------------
def test_unsupported_layers_are_named_with_their_path() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.LSTM(4, 4))
    fn, _ = af.functional(model)
    with pytest.raises(af.IncompatibleAdapterError, match=r"'0' is a ConvTranspose2d \(a transposed convolution\)"):
        af.init(fn, af.LoraConfig(target_modules=["0"]))
    with pytest.raises(af.IncompatibleAdapterError, match=r"'1' is a LSTM; LoRA supports"):
        af.init(fn, af.LoraConfig(target_modules=["1"]))
    c1 = nn.Sequential(nn.Conv1d(3, 4, 3))
    with pytest.raises(af.IncompatibleAdapterError, match=r"'0' is a Conv1d; IA3 supports .*nn\.Conv2d"):
        af.init(af.functional(c1)[0], af.IA3Config(target_modules=["0"], feedforward_modules=[]))
    with pytest.raises(af.IncompatibleAdapterError, match=r"'0' is a Conv1d; AdaLoRA supports"):
        af.init(af.functional(c1)[0], af.AdaLoraConfig(target_modules=["0"], total_step=10))
    g2 = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(af.IncompatibleAdapterError, match=r"'0' is a Conv2d with groups=2; AdaLoRA"):
        af.init(af.functional(g2)[0], af.AdaLoraConfig(target_modules=["0"], total_step=10))
    with pytest.raises(af.IncompatibleAdapterError, match=r"groups=2 and its LoRA rank is r=3"):
        af.init(af.functional(g2)[0], af.LoraConfig(r=3, target_modules=["0"]))


def test_mha_refusals() -> None:
    model = Attn(True)
    fn, _ = af.functional(model)
    with pytest.raises(af.IncompatibleAdapterError, match=r"'mha.out_proj' is the out_proj of nn.MultiheadAttention"):
        af.init(fn, af.LoraConfig(target_modules=["out_proj"]))
    odd = nn.Module()
    odd.mha = nn.MultiheadAttention(6, 2, kdim=4, vdim=4)
    with pytest.raises(af.IncompatibleAdapterError, match=r"'mha' is an nn.MultiheadAttention with kdim/vdim"):
        af.init(af.functional(odd)[0], af.LoraConfig(target_modules=["mha"]))


def test_files_of_unsupported_layouts_name_the_layer_kind() -> None:
    cfg = af.LoraConfig(r=2, target_modules=["m"])
    key = "base_model.model.m."
    bad = {key + "lora_A.weight": torch.zeros(2, 3, 1, 1, 1, 1), key + "lora_B.weight": torch.zeros(4, 2, 1, 1, 1, 1)}
    with pytest.raises(af.AdaptfnError, match=r"nn\.Conv1d/2d/3d"):
        af.from_state_dict(bad, cfg)
    half = {key + "lora_A.weight": torch.zeros(2, 3, 3, 3), key + "lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(af.AdaptfnError, match=r"nn\.Conv2d LoRA's but lora_B \[4, 2\] is not its 1x1"):
        af.from_state_dict(half, cfg)
    ia3 = af.IA3Config(target_modules=["m"], feedforward_modules=[])
    with pytest.raises(af.AdaptfnError, match=r"nn\.Conv1d's vector"):
        af.from_state_dict({key + "ia3_l": torch.ones(1, 4, 1)}, ia3)
    # a conv adapter on a model whose module is a Linear: both kinds named
    conv = af.from_state_dict({key + "lora_A.weight": torch.zeros(2, 3, 3, 3),
                               key + "lora_B.weight": torch.zeros(4, 2, 1, 1)}, cfg)
    lin = nn.Module()
    lin.m = nn.Linear(3, 4)
    with pytest.raises(af.IncompatibleAdapterError, match=r"'m': the adapter has a conv2d LoRA but the model has a "
                                                           r"Linear"):
        af.inject(af.functional(lin)[0], conv)


def test_combine_refusals_name_the_layer() -> None:
    g2 = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    fn, _ = af.functional(g2)
    a, b = (af.init(fn, af.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), generator=gen(i))
            for i in range(2))
    with pytest.raises(af.IncompatibleAdapterError, match=r"'0' is an nn\.Conv2d with groups=2; how='cat'"):
        af.combine([a, b], [0.5, 0.5], how="cat")
    with pytest.raises(af.IncompatibleAdapterError, match=r"how='svd'"):
        af.combine([a, b], [0.5, 0.5], how="svd")
    c = af.combine([a, b], [0.5, 0.5], how="linear")
    assert tuple(c.leaves("0")["lora_B"].shape) == (6, 1, 1, 1)


class KwAttn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(6, 2, batch_first=True)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mha(query=x, key=x, value=x, need_weights=False)[0]
        return self.conv(out[0].T).T[None]  # the conv sees an unbatched [C, L] input


def test_inputs_by_keyword_and_unbatched_inputs() -> None:
    torch.manual_seed(0)
    model = KwAttn().eval()
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=2, target_modules=["mha", "conv"], init_lora_weights=False), generator=gen(0))
    x = torch.randn(1, 5, 6)
    with torch.no_grad():
        assert_close(af.inject(fn, a)(params, x), fn(af.merge(params, a), x), "inject vs merge")
    assert_close(af.inject(fn, a)(params, x.requires_grad_()), fn(af.merge(params, a), x), "low-rank pair")
