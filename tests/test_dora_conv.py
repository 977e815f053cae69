"""DoRA and ``lora_bias`` on convolutions inside adaptfn (adaptfn/methods/dora_conv.py): hypothesis properties on
random odd-sized conv nets (merge == inject, mask(a, False) and scale(a, 0) == base bit for bit, scale(a, 1) ==
the adapter bit for bit, vmap over a stack == the loop, route= / route="all" == the loop, grad gives an
Adapter-shaped gradient), the scale weight's lerp rule and its derivative, LoRA dropout against PEFT's DoRA conv
layer, the inference cache following in-place changes, and the refusals. PEFT parity:
tests/parity/test_dora_conv_parity.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import gen, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adaptfn as af


class Net(nn.Module):
    """Conv1d -> Conv2d (stride, dilation or groups) -> Conv3d -> Linear with the given odd channel counts."""

    def __init__(self, c: tuple[int, int, int], groups: int, dilation: int, bias: bool) -> None:
        super().__init__()
        c0, c1, c2 = c
        self.c1 = nn.Conv1d(3, c0 * groups, 3, stride=2, padding=1, bias=bias)
        self.c2 = nn.Conv2d(c0 * groups, c1 * groups, 3, padding=dilation, dilation=dilation, groups=groups)
        self.c3 = nn.Conv3d(c1 * groups, c2, (1, 3, 3), padding=(0, 1, 1))
        self.lin = nn.Linear(c2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)  # [b, c0 g, 9]
        h = self.c2(h.view(h.shape[0], h.shape[1], 3, 3))
        h = self.c3(h.unsqueeze(2))
        return self.lin(h.flatten(2).transpose(1, 2))


TARGETS = ["c1", "c2", "c3", "lin"]


def _setup(c: tuple[int, int, int] = (5, 7, 9), groups: int = 1, dilation: int = 1, bias: bool = True,
           n: int = 3, dtype: torch.dtype = torch.float64, **kw: Any) -> tuple[Any, dict, list, torch.Tensor]:
    torch.manual_seed(0)
    model = Net(c, groups, dilation, bias).to(dtype).eval()
    fn, params = af.functional(model)
    cfg = dict(r=groups * 2, lora_alpha=3, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    cfg.update(kw)
    ads = []
    for i in range(n):
        a = af.init(fn, af.LoraConfig(**cfg), generator=gen(i), dtype=dtype)
        g = gen(10 + i)
        ads.append(af.tree.map(lambda t, g=g: t + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype)
                               if t.dim() else t, a))
    x = torch.randn(4, 3, 18, generator=gen(99), dtype=dtype)
    return fn, params, ads, x


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(c=st.tuples(*[st.sampled_from([3, 5, 7, 11]) for _ in range(3)]), groups=st.sampled_from([1, 1, 3]),
       dilation=st.sampled_from([1, 2]), bias=st.booleans(), variant=st.sampled_from(["use_dora", "lora_bias"]))
def test_properties(c: tuple[int, int, int], groups: int, dilation: int, bias: bool, variant: str) -> None:
    kw = {"use_dora": variant == "use_dora", "lora_bias": variant == "lora_bias"}
    fn, params, ads, x = _setup(c, groups, dilation, bias, **kw)
    a = ads[0]
    with torch.no_grad():
        base = fn(params, x)
        full = af.inject(fn, a)(params, x)
        assert rel_err(full, base) > 1e-3
        assert torch.equal(af.inject(fn, af.mask(a, False))(params, x), base)
        assert torch.equal(af.inject(fn, af.scale(a, 0.0))(params, x), base)
        assert torch.equal(af.inject(fn, af.scale(a, 1.0))(params, x), full)
        if groups == 1 and (bias or variant == "use_dora"):
            assert rel_err(fn(af.merge(params, a), x), full) <= 1e-10
            half = af.scale(a, 0.5)
            assert rel_err(fn(af.merge(params, half), x), af.inject(fn, half)(params, x)) <= 1e-10
        else:  # a grouped conv (PEFT refuses too), or a lora_bias on a layer without a bias
            with pytest.raises(af.IncompatibleAdapterError, match="grouped|no bias"):
                af.merge(params, a)
        loop = torch.stack([af.inject(fn, b)(params, x) for b in ads])
        stack = af.stack(ads)
        assert rel_err(torch.func.vmap(lambda s: af.inject(fn, s)(params, x))(stack), loop) <= 1e-10
        assert rel_err(af.inject(fn, stack, route="all")(params, x), loop) <= 1e-10
        idx = torch.tensor([2, -1, 0, 1])
        routed = af.inject(fn, stack, route=idx)(params, x)
        for i, j in enumerate(idx.tolist()):
            assert rel_err(routed[i], loop[j, i] if j >= 0 else base[i]) <= 1e-10, (i, j)
        masked = torch.func.vmap(lambda s: af.inject(fn, s)(params, x))(af.stack([af.mask(a, False), a]))
        assert torch.equal(masked[0], base)
    # the autograd path: same outputs, and grad gives an Adapter of the adapter's shapes
    g = torch.func.grad(lambda ad: af.inject(fn, ad)(params, x).square().mean())(a)
    assert isinstance(g, af.Adapter) and set(g.paths) == set(a.paths)
    for p in a.paths:
        for n, t in a.leaves(p).items():
            if n in ("lora_A", "lora_B", "lora_magnitude", "lora_bias"):
                assert g.leaves(p)[n].shape == t.shape and bool(g.leaves(p)[n].abs().sum() > 0), (p, n)


def test_scale_follows_the_lerp_rule_and_differentiates() -> None:
    """``y = m_w / ||W + w s dW|| (W + w s dW) x + b``, ``m_w = lerp(||W||, m, w)``: checked on one conv directly,
    and d/dw against float64 central differences."""
    fn, params, (a, *_), x = _setup(n=1)
    p = "c2"
    w = 0.4
    one = af.select(a, [p])
    leaves = one.leaves(p)
    W = params[f"{p}.weight"]
    e = one.entries[p]
    dW = torch.nn.functional.conv2d(leaves["lora_A"].transpose(0, 1), leaves["lora_B"]).transpose(0, 1)
    V = W + w * e.scaling * dW
    n0, n = W.flatten(1).norm(dim=1), V.flatten(1).norm(dim=1)
    f = torch.lerp(n0, leaves["lora_magnitude"].flatten(), torch.tensor(w, dtype=W.dtype)) / n
    h = torch.randn(2, 5, 3, 3, dtype=W.dtype, generator=gen(5))
    conv = nn.Conv2d(5, 7, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(W)
        conv.bias.copy_(params[f"{p}.bias"])
        want = torch.nn.functional.conv2d(h, V * f[:, None, None, None], conv.bias, padding=1)
    wrap = nn.Sequential()
    wrap.add_module("c2", conv)
    fnw, pw = af.functional(wrap)
    got = af.inject(fnw, af.scale(one, w))(pw, h)
    assert rel_err(got.detach(), want) <= 1e-12
    assert rel_err(fnw(af.merge(pw, af.scale(one, w)), h), want) <= 1e-12

    def loss(wt: torch.Tensor) -> torch.Tensor:
        return af.inject(fn, af.scale(a, wt))(params, x).square().mean()

    w0, eps = torch.tensor(0.6, dtype=torch.float64), 1e-5
    fd = (loss(w0 + eps) - loss(w0 - eps)) / (2 * eps)
    assert abs(float(torch.func.grad(loss)(w0) - fd)) <= 1e-6 * max(1.0, abs(float(fd)))
    with pytest.raises(af.ConfigError, match="scale weight"):
        af.state_dict(af.scale(a, 0.5))


def test_dropout_is_peft_s() -> None:
    """With LoRA dropout (training), the base part is recomputed from the dropped-out input without bias, as PEFT's
    DoraConv2dLayer does with ``base_result=None``."""
    from peft.tuners.lora.dora import DoraConv2dLayer

    from adaptfn.methods.common import dropout

    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1).double()
    net = nn.Sequential()
    net.add_module("c", conv)
    fn, params = af.functional(net)
    a = af.init(fn, af.LoraConfig(r=3, lora_alpha=5, target_modules=["c"], use_dora=True, lora_dropout=0.3,
                                  init_lora_weights=False), generator=gen(0), dtype=torch.float64)
    a = af.tree.map(lambda t: t + 0.2 if t.dim() else t, a)
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64, generator=gen(1))
    out = af.inject(fn, a, generator=gen(7))(params, x)
    e, lv = a.entries["c"], a.leaves("c")
    xd = dropout(e, gen(7), x)  # the same draw
    lora_A = nn.Conv2d(5, 3, 3, stride=2, padding=1, bias=False).double()
    lora_B = nn.Conv2d(3, 7, 1, bias=False).double()
    with torch.no_grad():
        lora_A.weight.copy_(lv["lora_A"])
        lora_B.weight.copy_(lv["lora_B"])
    layer = DoraConv2dLayer(fan_in_fan_out=False)
    layer.weight = nn.Parameter(lv["lora_magnitude"].clone())
    with torch.no_grad():
        ref = conv(x) + layer(xd, lora_A=lora_A, lora_B=lora_B, scaling=e.scaling, base_layer=conv, base_result=None)
    assert rel_err(out.detach(), ref) <= 1e-12
    with torch.no_grad():
        assert rel_err(af.inject(fn, a)(params, x), conv(x) + layer(x, lora_A=lora_A, lora_B=lora_B,
                       scaling=e.scaling, base_layer=conv, base_result=conv(x))) <= 1e-12


def test_the_cached_weight_follows_in_place_changes() -> None:
    fn, params, (a, *_), x = _setup(n=1, dtype=torch.float32)
    g = af.inject(fn, a)
    with torch.no_grad():
        first = g(params, x)
        assert torch.equal(g(params, x), first)
        for leaf in ("lora_B", "lora_magnitude"):
            a.leaves("c2")[leaf].mul_(1.5)
            fresh = af.tree.map(lambda t: t.clone(), a)
            assert torch.equal(g(params, x), af.inject(fn, fresh)(params, x)), leaf
        params["c2.weight"].mul_(0.9)
        assert torch.equal(g(params, x), af.inject(fn, af.tree.map(lambda t: t.clone(), a))(params, x))


def test_refusals_name_the_layer_and_the_problem(tmp_path) -> None:
    mha = nn.Sequential()
    mha.add_module("attn", nn.MultiheadAttention(6, 2))
    fn, _ = af.functional(mha)
    for kw, what in ((dict(use_dora=True), "DoRA"), (dict(lora_bias=True), "lora_B.bias")):
        with pytest.raises(af.IncompatibleAdapterError, match=f"nn.MultiheadAttention.*{what}"):
            af.init(fn, af.LoraConfig(r=2, target_modules=["attn"], **kw))
    fn, params, (a, *_), x = _setup(n=1, dtype=torch.float32)
    bad = af.tree.map(lambda t: t, a)
    leaves = {p: dict(bad.leaves(p)) for p in bad.paths}
    leaves["c2"]["lora_magnitude"] = torch.ones(1, 6, 1, 1)
    with pytest.raises(af.IncompatibleAdapterError, match="c2.*lora_magnitude"):
        af.inject(fn, af.Adapter(a.method, a.config, dict(a.entries), leaves))(params, x)
    sd = af.state_dict(a)
    sd["base_model.model.c3.lora_magnitude_vector"] = torch.ones(1, 4, 1, 1, 1)
    with pytest.raises(af.ConfigError, match="c3.*lora_magnitude"):  # from_state_dict: the file's checks
        af.from_state_dict(sd, a.config)
    plain = af.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS)
    with pytest.raises(af.ConfigError, match="use_dora"):
        af.from_state_dict(af.state_dict(a), plain)
    nob = _setup(n=1, bias=False, dtype=torch.float32, use_dora=False, lora_bias=True)
    with pytest.raises(af.IncompatibleAdapterError, match="no bias"):
        af.merge(nob[1], nob[2][0])
