"""Convolutions and nn.MultiheadAttention against the real ``peft`` (0.21.2), both ways: PEFT-saved adapters give
PEFT's outputs in adaptfn (inject and merge, and the merged weights are PEFT's), adaptfn-saved ones (``af.init``,
trained or fresh) give adaptfn's outputs in PEFT, with the same keys and shapes PEFT writes; stacks of them run
under ``vmap`` and ``route=`` as the loop does. LoRA on Conv1d / Conv2d / Conv3d (stride, padding, "same", 1x1,
groups, dilation, padding modes) and nn.MultiheadAttention (batch first or not), IA3 on Conv2d / Conv3d, AdaLoRA
on Conv2d, PEFT's ``add_weighted_adapter`` on them, and real models built from tiny configs: a diffusers
UNet2DConditionModel (attention and conv layers), transformers' ResNet (a conv net) and ViT (conv patch embedding
and attention). Odd, distinct sizes everywhere; nothing is downloaded.

Where PEFT 0.21.2 itself is wrong the reference is stated: on a dilated base, or one with
``padding_mode != "zeros"``, PEFT's unmerged forward fails or zero-pads the LoRA branch, while its merge is the
LoRA the file describes, so adaptfn is compared with PEFT's merged model there (see adaptfn/methods/layers.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from conftest import assert_close, rel_err, shapes
from peft.utils import get_peft_model_state_dict
from torch import nn

import adaptfn as af
from parity.peft_models import peft_model, peft_reload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- models ------------------------------------------------------------------------------------------------------
class One(nn.Module):
    """One layer: ``m(x)`` (nn.MultiheadAttention: self-attention, the output only; x is [batch, L, E], transposed
    for an attention layer that puts the sequence first)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.m = layer
        self.attention = isinstance(layer, nn.MultiheadAttention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention:
            if not self.m.batch_first:
                t = x.transpose(0, 1)
                return self.m(t, t, t)[0].transpose(0, 1)
            return self.m(x, x, x)[0]
        return self.m(x)


class Mixed(nn.Module):
    """Conv1d + Conv2d(groups=2, stride=2) + Conv3d + Linear + MultiheadAttention in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2)
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))
        self.lin = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)  # [b, 6, 16]
        h = self.c2(h.view(h.shape[0], 6, 4, 4))  # [b, 8, 2, 2]
        h3 = self.c3(h.view(h.shape[0], 2, 4, 2, 2))  # [b, 4, 4, 2, 2]
        t = h.flatten(2).transpose(1, 2)  # [b, 4, 8]
        t = self.lin(t) + h3.reshape(t.shape[0], 8, 8)[:, :4]
        return self.mha(t, t, t)[0]


def build(make: Any, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make().eval()


@dataclass(frozen=True)
class Case:
    id: str
    make: Any  # () -> nn.Module
    shape: tuple[int, ...]  # input shape
    kw: dict[str, Any]
    peft_unmerged: bool = True  # PEFT's unmerged forward computes the file's LoRA (else compare with its merge)
    mergeable: bool = True  # groups == 1 everywhere


def _one(layer_factory: Any) -> Any:
    return lambda: One(layer_factory())


CASES = [
    Case("conv1d-stride", _one(lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1)), (2, 3, 11), dict(r=3, lora_alpha=5)),
    Case("conv2d-rslora", _one(lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1)), (2, 5, 9, 9),
         dict(r=4, lora_alpha=6, use_rslora=True)),
    Case("conv2d-1x1", _one(lambda: nn.Conv2d(5, 7, 1)), (2, 5, 6, 6), dict(r=2, lora_alpha=3)),
    Case("conv2d-same-rect", _one(lambda: nn.Conv2d(4, 6, (3, 5), padding="same", bias=False)), (3, 4, 7, 6),
         dict(r=3, lora_alpha=4)),
    Case("conv3d", _one(lambda: nn.Conv3d(3, 4, (2, 3, 3), padding=(0, 1, 1))), (2, 3, 4, 5, 5),
         dict(r=2, lora_alpha=5)),
    Case("conv2d-groups", _one(lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3)), (2, 6, 5, 5),
         dict(r=3, lora_alpha=4), mergeable=False),
    Case("conv2d-dilated", _one(lambda: nn.Conv2d(4, 6, 3, dilation=2, padding=2)), (2, 4, 9, 9),
         dict(r=2, lora_alpha=3), peft_unmerged=False),
    Case("conv2d-reflect", _one(lambda: nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect")), (2, 4, 6, 7),
         dict(r=2, lora_alpha=3), peft_unmerged=False),
    Case("mha", _one(lambda: nn.MultiheadAttention(10, 2, batch_first=True)), (2, 5, 10), dict(r=3, lora_alpha=7)),
    Case("mha-seq-first-bias-kv", _one(lambda: nn.MultiheadAttention(6, 3, add_bias_kv=True)), (3, 5, 6),
         dict(r=2, lora_alpha=2)),
    Case("mixed", Mixed, (3, 3, 16), dict(r=2, lora_alpha=4, target_modules=["c1", "c2", "c3", "lin", "mha"],
                                          rank_pattern={"c3": 4}, alpha_pattern={"mha": 3}), mergeable=False),
]
IDS = [c.id for c in CASES]


def _kw(case: Case) -> dict[str, Any]:
    return {"target_modules": ["m"], **case.kw}


def _x(case: Case, seed: int = 3) -> torch.Tensor:
    return torch.randn(case.shape, generator=torch.Generator().manual_seed(seed))


def make_peft(case_make: Any, kw: dict[str, Any], cls: Any = peft.LoraConfig, seed: int = 1234, **extra: Any) -> Any:
    init = {"init_ia3_weights": False} if cls is peft.IA3Config else {"init_lora_weights": False}
    return peft_model(build(case_make), cls, dict(**init, **kw, **extra), seed)


def peft_merged(pm: Any, *xs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """PEFT's merged model's output on ``xs`` and its parameters (``pm`` is merged in place)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model = pm.merge_and_unload()
        return model(*xs), {k: v.detach() for k, v in model.named_parameters()}


def perturb(a: Any, seed: int = 7) -> Any:
    g = torch.Generator().manual_seed(seed)
    return af.tree.map(lambda t: t + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype) if t.dim() else t, a)


def loop_ref(fn: Any, params: Any, adapters: list[Any], x: torch.Tensor) -> torch.Tensor:
    return torch.stack([af.inject(fn, a)(params, x) for a in adapters])


# -- LoRA: PEFT -> adaptfn -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_peft_saved_gives_peft_outputs_and_merges(case: Case, tmp_path) -> None:
    pm = make_peft(case.make, _kw(case))
    x = _x(case)
    with torch.no_grad():
        ref = pm(x) if case.peft_unmerged else None
    pm.save_pretrained(tmp_path)
    a = af.load(tmp_path)
    assert {e.kind for _, e in a.entry_items} <= {"conv1d", "conv2d", "conv3d", "mha", "linear"}
    with torch.no_grad():
        peft_sd = get_peft_model_state_dict(pm)
    assert shapes(af.state_dict(a)) == shapes(peft_sd)
    assert all(torch.equal(v, peft_sd[k]) for k, v in af.state_dict(a).items())

    fn, params = af.functional(build(case.make))
    out = af.inject(fn, a)(params, x)
    base = fn(params, x)
    if case.mergeable:
        merged_ref, peft_params = peft_merged(pm, x)
        ref = merged_ref if ref is None else ref
        assert_close(out, merged_ref, "inject vs PEFT's merged model")
        merged = af.merge(params, a)
        assert_close(fn(merged, x), out, "merge vs inject")
        changed = [k for k in merged if merged[k] is not params[k]]
        assert changed
        for k in changed:  # the merged weights are PEFT's (same delta computation)
            assert_close(merged[k], peft_params[k], f"merged {k}", tol=1e-6)
    else:
        with pytest.raises(af.IncompatibleAdapterError, match="groups"):
            af.merge(params, a)
    assert rel_err(base, ref) > 1e-3, "vacuous comparison"
    assert_close(out, ref)
    assert torch.equal(af.inject(fn, af.mask(a, False))(params, x), base)


# -- LoRA: adaptfn -> PEFT ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_adaptfn_saved_gives_same_outputs_in_peft(case: Case, tmp_path) -> None:
    model = build(case.make)
    fn, params = af.functional(model)
    x = _x(case)
    fresh = af.init(fn, af.LoraConfig(**_kw(case)), generator=torch.Generator().manual_seed(0))
    assert_close(af.inject(fn, fresh)(params, x), fn(params, x), "a fresh LoRA (B = 0) is the base", tol=1e-6)
    a = perturb(fresh)  # af.init's layout, trained-looking values
    out = af.inject(fn, a)(params, x)
    af.save(a, tmp_path)
    pm = peft_reload(build(case.make), tmp_path)
    with torch.no_grad():
        ref = pm(x) if case.peft_unmerged else peft_merged(pm, x)[0]
    assert rel_err(fn(params, x), ref) > 1e-3, "vacuous comparison"
    assert_close(out, ref)
    assert shapes(af.state_dict(a)) == shapes(get_peft_model_state_dict(make_peft(case.make, _kw(case))))
    # a random init (init_lora_weights=False) round-trips too
    b = af.init(fn, af.LoraConfig(init_lora_weights=False, **_kw(case)), generator=torch.Generator().manual_seed(1))
    af.save(b, tmp_path / "b")
    assert_close(af.inject(fn, af.load(tmp_path / "b"))(params, x), af.inject(fn, b)(params, x), "reloaded")


# -- LoRA: stacks ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_stack_vmap_and_route_equal_the_loop(case: Case) -> None:
    fn, params = af.functional(build(case.make))
    x = _x(case)
    kw = _kw(case)
    a = af.init(fn, af.LoraConfig(init_lora_weights=False, **kw), generator=torch.Generator().manual_seed(2))
    b = af.init(fn, af.LoraConfig(init_lora_weights=False, **{**kw, "lora_alpha": 9}),
                generator=torch.Generator().manual_seed(3))
    stacked = af.stack([a, af.scale(b, 0.5)])
    want = loop_ref(fn, params, [a, af.scale(b, 0.5)], x)
    got = torch.func.vmap(lambda s: af.inject(fn, s)(params, x))(stacked)
    assert_close(got, want, "vmap vs loop")
    route = torch.tensor([1, -1, 0][: x.shape[0]])
    routed = af.inject(fn, stacked, route=route)(params, x)
    base = fn(params, x)
    for i, j in enumerate(route.tolist()):
        assert_close(routed[i], (base if j < 0 else want[j])[i], f"row {i} (adapter {j})")


# -- IA3 and AdaLoRA -----------------------------------------------------------------------------------------------
IA3_CASES = [
    ("conv2d-out", _one(lambda: nn.Conv2d(5, 7, 3, padding=1)), (2, 5, 6, 6), []),
    ("conv2d-groups-ff", _one(lambda: nn.Conv2d(6, 9, 3, groups=3)), (2, 6, 5, 5), ["m"]),
    ("conv3d-ff", _one(lambda: nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))), (2, 3, 2, 5, 5), ["m"]),
]


@pytest.mark.parametrize("case", IA3_CASES, ids=[c[0] for c in IA3_CASES])
def test_ia3_conv_both_ways(case: Any, tmp_path) -> None:
    _, make, shape, ff = case
    kw = dict(target_modules=["m"], feedforward_modules=ff)
    pm = make_peft(make, kw, peft.IA3Config)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    fn, params = af.functional(build(make))
    a = af.load(tmp_path / "peft")
    out = af.inject(fn, a)(params, x)
    assert rel_err(fn(params, x), ref) > 1e-3
    assert_close(out, ref)
    merged = af.merge(params, a)
    assert_close(fn(merged, x), out, "merge vs inject")
    assert_close(fn(merged, x), peft_merged(pm, x)[0], "merge vs PEFT's merge")
    b = af.init(fn, af.IA3Config(init_ia3_weights=False, **kw), generator=torch.Generator().manual_seed(5))
    af.save(b, tmp_path / "af")
    pm2 = peft_reload(build(make), tmp_path / "af")
    with torch.no_grad():
        assert_close(af.inject(fn, b)(params, x), pm2(x), "adaptfn -> PEFT")
    stacked = af.stack([a, b])
    want = loop_ref(fn, params, [a, b], x)
    assert_close(torch.func.vmap(lambda s: af.inject(fn, s)(params, x))(stacked), want, "vmap")
    routed = af.inject(fn, stacked, route=torch.tensor([1, 0]))(params, x)
    assert_close(routed, torch.stack([want[1][0], want[0][1]]), "route")


def test_adalora_conv2d_both_ways(tmp_path) -> None:
    make = _one(lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2))  # PEFT's SVDConv2d keeps the geometry
    kw = dict(target_modules=["m"], init_r=4, target_r=2, total_step=10, lora_alpha=3)
    pm = make_peft(make, kw, peft.AdaLoraConfig)
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    fn, params = af.functional(build(make))
    a = af.load(tmp_path / "peft")
    out = af.inject(fn, a)(params, x)
    assert rel_err(fn(params, x), ref) > 1e-3
    assert_close(out, ref)
    merged = af.merge(params, a)
    assert_close(fn(merged, x), out, "merge vs inject")
    assert_close(fn(merged, x), peft_merged(pm, x)[0], "merge vs PEFT's merge")
    b = af.init(fn, af.AdaLoraConfig(init_lora_weights=False, **kw), generator=torch.Generator().manual_seed(5))
    af.save(b, tmp_path / "af")
    pm2 = peft_reload(build(make), tmp_path / "af")
    with torch.no_grad():
        assert_close(af.inject(fn, b)(params, x), pm2(x), "adaptfn -> PEFT")
    stacked = af.stack([a, b])
    want = loop_ref(fn, params, [a, b], x)
    assert_close(torch.func.vmap(lambda s: af.inject(fn, s)(params, x))(stacked), want, "vmap")
    routed = af.inject(fn, stacked, route=torch.tensor([1, 0]))(params, x)
    assert_close(routed, torch.stack([want[1][0], want[0][1]]), "route")


# -- combine (PEFT's add_weighted_adapter) ------------------------------------------------------------------------
COMBINE_LAYERS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3), (2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3), (2, 4, 7, 7)),
    "conv2d-1x1": (lambda: nn.Conv2d(4, 6, 1), (2, 4, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3), (2, 4, 5, 5, 5)),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 7, 7)),
    "mha": (lambda: nn.MultiheadAttention(8, 2, batch_first=True), (2, 5, 8)),
}
# what PEFT 0.21.2 supports (checked): svd only on Conv2d with groups=1; cat not on grouped convs (PEFT runs it,
# but its result is not the weighted sum there); the element-wise merges everywhere
REFUSED = {("conv1d", "svd"), ("conv3d", "svd"), ("conv2d-groups", "svd"), ("conv2d-groups", "cat")}


@pytest.mark.parametrize("layer", list(COMBINE_LAYERS))
def test_combine_conv_and_mha_equals_peft_bit_for_bit(layer: str, tmp_path) -> None:
    make_layer, shape = COMBINE_LAYERS[layer]
    make = _one(make_layer)
    base = build(make)
    pm = make_peft(make, dict(r=2, target_modules=["m"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=5, target_modules=["m"], init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    a0, a1 = af.load(tmp_path), af.load(tmp_path, adapter_name="b")
    fn, params = af.functional(base)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    for how in ("cat", "linear", "svd", "dare_ties"):
        density = 0.5 if how == "dare_ties" else None
        if (layer, how) in REFUSED:
            with pytest.raises(af.IncompatibleAdapterError, match=r"nn\.Conv"):
                af.combine([a0, a1], [0.6, 0.4], how=how, density=density)
            continue
        name = f"c_{how}"
        torch.manual_seed(11)  # dare draws from the global RNG, in PEFT's order
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.add_weighted_adapter(["default", "b"], [0.6, 0.4], name, combination_type=how, density=density)
        torch.manual_seed(11)
        c = af.combine([a0, a1], [0.6, 0.4], how=how, density=density, model=base)
        theirs = {k.replace(f".{name}.", "."): v for k, v in pm.state_dict().items() if f".{name}." in k}
        mine = af.state_dict(c)
        assert set(mine) == set(theirs), how
        for k, v in mine.items():
            assert torch.equal(v, theirs[k]), f"{how}: {k}"
        pm.set_adapter(name)
        with torch.no_grad():
            assert_close(af.inject(fn, c)(params, x), pm(x), f"{how}: outputs")


# -- real models ------------------------------------------------------------------------------------------------------
def tiny_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 12),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=10, attention_head_dim=2, norm_num_groups=4)


def tiny_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 12],
                                                     depths=[1, 1], layer_type="basic", num_labels=3))


def tiny_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=12,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                                               num_labels=3))


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "conv"]
REAL = {
    "unet": (tiny_unet, dict(r=4, lora_alpha=8, target_modules=UNET_TARGETS)),
    "resnet": (tiny_resnet, dict(r=2, lora_alpha=4, target_modules=["convolution"])),
    "vit": (tiny_vit, dict(r=3, lora_alpha=5, target_modules=["projection", "q_proj", "k_proj", "v_proj"])),
}


def _inputs(name: str, batch: int = 3) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(9)
    if name == "unet":
        return (torch.randn(batch, 3, 8, 8, generator=g), torch.tensor([1, 5, 9][:batch]),
                torch.randn(batch, 3, 10, generator=g))
    size = 16 if name == "resnet" else 8
    return (torch.randn(batch, 3, size, size, generator=g),)


def _out(name: str, o: Any) -> torch.Tensor:
    return (o.sample if name == "unet" else o.logits).detach()


@pytest.mark.parametrize("name", list(REAL))
def test_real_models_both_ways_vmap_and_route(name: str, tmp_path) -> None:
    make, kw = REAL[name]
    xs = _inputs(name)
    pm = make_peft(make, kw)
    with torch.no_grad():
        ref = _out(name, pm(*xs))
    pm.save_pretrained(tmp_path / "peft")
    base_model = build(make)
    fn, params = af.functional(base_model)
    a = af.load(tmp_path / "peft")
    assert any(e.kind == "conv2d" for _, e in a.entry_items)
    out = _out(name, af.inject(fn, a)(params, *xs))
    base = _out(name, fn(params, *xs))
    assert rel_err(base, ref) > 1e-3, "vacuous comparison"
    assert_close(out, ref, "PEFT -> adaptfn")
    merged = af.merge(params, a)
    assert_close(_out(name, fn(merged, *xs)), out, "merge vs inject")
    merged_ref, peft_params = peft_merged(pm, *xs)
    assert_close(_out(name, fn(merged, *xs)), _out(name, merged_ref), "merge vs PEFT's merge")
    changed = [k for k in merged if merged[k] is not params[k]]
    assert any(merged[k].dim() == 4 for k in changed)
    for k in changed:  # PEFT's merged conv and linear weights (same delta computations)
        assert_close(merged[k], peft_params[k], k, tol=1e-6)

    b = perturb(af.init(fn, af.LoraConfig(**kw), generator=torch.Generator().manual_seed(1)), seed=3)
    out_b = _out(name, af.inject(fn, b)(params, *xs))
    af.save(b, tmp_path / "af")
    pm2 = peft_reload(build(make), tmp_path / "af")
    with torch.no_grad():
        assert_close(out_b, _out(name, pm2(*xs)), "adaptfn -> PEFT")

    stacked = af.stack([a, b])
    want = torch.stack([out, out_b])
    got = torch.func.vmap(lambda s: _out(name, af.inject(fn, s)(params, *xs)))(stacked)
    assert_close(got, want, "vmap vs loop")
    route = torch.tensor([1, -1, 0])
    routed = _out(name, af.inject(fn, stacked, route=route)(params, *xs))
    assert_close(routed, torch.stack([want[1][0], base[1], want[0][2]]), "route")
    every = _out(name, af.inject(fn, stacked, route="all")(params, *xs))
    assert_close(every, want, "route='all'")
