"""DoRA (``use_dora=True``) and ``lora_bias=True`` on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` against the real
``peft`` (0.21.2), both ways: PEFT-saved adapters give PEFT's outputs in adaptfn (inject on the inference and the
autograd paths, merge, merged weights equal to PEFT's ``merge_and_unload``, the file written back bit for bit, PEFT's
gradients of A, B and the magnitude); adaptfn-saved ones (``af.init``, trained) give adaptfn's outputs in PEFT;
``af.init``'s magnitudes are PEFT's. Single layers with odd channel counts, stride, padding, dilation and groups; a
model mixing Linear, Conv1d, Conv2d and Conv3d; a tiny diffusers UNet2DConditionModel (DoRA on its convs and
attention Linears) with vmap over a stack and ``route=``.

References as in ``test_conv_parity.py``: on a dilated base PEFT's unmerged forward builds ``lora_A`` without the
dilation (it fails or disagrees with its own merge), so adaptfn is compared with PEFT's merged model there; a grouped
base cannot merge (PEFT refuses too), so it is compared unmerged only.
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
from parity.test_conv_parity import UNET_TARGETS, One, _inputs, _out, build, peft_merged, perturb, tiny_unet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Mixed(nn.Module):
    """Conv1d (stride 2) -> Conv2d (padding 2) -> Conv3d -> Linear, odd channel counts."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(5, 7, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(7, 9, 3, padding=2)
        self.c3 = nn.Conv3d(9, 11, (1, 3, 3), padding=(0, 1, 1))
        self.lin = nn.Linear(11, 13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)  # [b, 7, 9]
        h = self.c2(h.view(h.shape[0], 7, 3, 3))  # [b, 9, 5, 5]
        h = self.c3(h.unsqueeze(2))  # [b, 11, 1, 5, 5]
        return self.lin(h.flatten(2).transpose(1, 2))


@dataclass(frozen=True)
class Case:
    id: str
    make: Any
    shape: tuple[int, ...]
    kw: dict[str, Any]
    peft_unmerged: bool = True
    mergeable: bool = True


def _one(factory: Any) -> Any:
    return lambda: One(factory())


CASES = [
    Case("conv1d-stride", _one(lambda: nn.Conv1d(5, 7, 3, stride=2, padding=1)), (2, 5, 11), dict(r=3, lora_alpha=5)),
    Case("conv2d-stride-rslora", _one(lambda: nn.Conv2d(7, 11, 3, stride=2, padding=1)), (2, 7, 9, 9),
         dict(r=3, lora_alpha=7, use_rslora=True)),
    Case("conv2d-1x1-nobias", _one(lambda: nn.Conv2d(5, 9, 1, bias=False)), (3, 5, 5, 5), dict(r=2, lora_alpha=3)),
    Case("conv3d", _one(lambda: nn.Conv3d(3, 5, (2, 3, 3), padding=(0, 1, 1))), (2, 3, 4, 5, 5),
         dict(r=2, lora_alpha=5)),
    Case("conv2d-dilated", _one(lambda: nn.Conv2d(5, 7, 3, dilation=2, padding=2)), (2, 5, 9, 9),
         dict(r=2, lora_alpha=3), peft_unmerged=False),
    Case("conv2d-groups", _one(lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3)), (2, 6, 5, 5),
         dict(r=3, lora_alpha=4), mergeable=False),
    Case("mixed-linear-conv", Mixed, (3, 5, 18), dict(r=3, lora_alpha=5, target_modules=["c1", "c2", "c3", "lin"],
                                                      rank_pattern={"c3": 2})),
]
IDS = [c.id for c in CASES]


def _kw(case: Case, **extra: Any) -> dict[str, Any]:
    return {"target_modules": ["m"], **case.kw, **extra}


def _x(case: Case) -> torch.Tensor:
    return torch.randn(case.shape, generator=torch.Generator().manual_seed(3))


def make_peft(make: Any, kw: dict[str, Any], seed: int = 1234) -> Any:
    """A PeftModel with random LoRA weights whose every trainable tensor (magnitudes, lora_B biases) is then moved."""
    return peft_model(build(make), peft.LoraConfig, dict(init_lora_weights=False, **kw), seed, move=True)


def from_pretrained(make: Any, folder: Any) -> Any:
    return peft_reload(build(make), folder)


VARIANTS = [dict(use_dora=True), dict(lora_bias=True)]
VIDS = ["dora", "lora_bias"]


# -- PEFT -> adaptfn ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_saved_gives_peft_outputs_merges_and_round_trips(case: Case, variant: dict, tmp_path) -> None:
    pm = make_peft(case.make, _kw(case, **variant))
    x = _x(case)
    pm.save_pretrained(tmp_path)
    peft_sd = {k: v.clone() for k, v in get_peft_model_state_dict(pm).items()}
    key = "lora_magnitude_vector" if "use_dora" in variant else "lora_B.bias"
    assert any(k.endswith(key) for k in peft_sd)
    with torch.no_grad():
        ref_unmerged = pm(x) if case.peft_unmerged else None
    a = af.load(tmp_path)
    fn, params = af.functional(build(case.make))
    with torch.no_grad():
        out = af.inject(fn, a)(params, x)  # inference: the one-convolution path
    trained = af.tree.map(lambda t: t.clone().requires_grad_(t.is_floating_point() and t.dim() > 0), a)
    out_grad = af.inject(fn, trained)(params, x).detach()  # the autograd path (PEFT's form)
    assert_close(out_grad, out, "autograd path vs inference path")
    # the file adaptfn writes back is PEFT's, key for key and bit for bit
    ours = af.state_dict(a)
    assert shapes(ours) == shapes(peft_sd)
    assert all(torch.equal(v, peft_sd[k]) for k, v in ours.items())
    if ref_unmerged is not None:
        assert rel_err(fn(params, x), ref_unmerged) > 1e-2, "vacuous comparison"
        assert_close(out, ref_unmerged, "inject vs PEFT")
    if not case.mergeable:
        with pytest.raises(af.IncompatibleAdapterError, match="grouped"):
            af.merge(params, a)
        return
    if "lora_bias" in variant and any(getattr(m, "bias", 0) is None for m in build(case.make).modules()):
        with pytest.raises(af.IncompatibleAdapterError, match="no bias"):
            af.merge(params, a)
        return
    merged = af.merge(params, a)
    ref_merged, peft_params = peft_merged(pm, x)
    assert rel_err(fn(params, x), ref_merged) > 1e-2, "vacuous comparison"
    assert_close(fn(merged, x), out, "merge vs inject")
    assert_close(fn(merged, x), ref_merged, "merge vs PEFT's merge")
    changed = [k for k in merged if merged[k] is not params[k]]
    assert changed
    for k in changed:
        assert_close(merged[k], peft_params[k], k, tol=1e-6)


# -- adaptfn -> PEFT, and PEFT's initialisation ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("case", [c for c in CASES if c.peft_unmerged], ids=[c.id for c in CASES if c.peft_unmerged])
def test_adaptfn_saved_gives_the_same_outputs_in_peft(case: Case, variant: dict, tmp_path) -> None:
    fn, params = af.functional(build(case.make))
    cfg = af.LoraConfig(init_lora_weights=False, **_kw(case, **variant))
    a = perturb(af.init(fn, cfg, generator=torch.Generator().manual_seed(0)))
    x = _x(case)
    out = af.inject(fn, a)(params, x)
    af.save(a, tmp_path)
    with torch.no_grad():
        ref = from_pretrained(case.make, tmp_path)(x)
    assert rel_err(fn(params, x), ref) > 1e-2, "vacuous comparison"
    assert_close(out, ref, "adaptfn -> PEFT")
    assert shapes(af.state_dict(a)) == shapes(get_peft_model_state_dict(make_peft(case.make, _kw(case, **variant))))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_init_magnitude_is_peft_s(case: Case) -> None:
    """``init_lora_weights=True``: the magnitudes equal PEFT's fresh adapter's (the weights' norms) and the adapter is
    the base model; ``False``: PEFT's DoRA conv layer, initialised from adaptfn's random A and B, computes the same
    magnitudes (grouped convolutions included: PEFT's reading of B)."""
    from peft.tuners.lora.dora import DoraConv1dLayer, DoraConv2dLayer, DoraConv3dLayer

    model = build(case.make)
    fn, params = af.functional(model)
    kw = _kw(case, use_dora=True)
    a = af.init(fn, af.LoraConfig(**kw), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build(case.make), peft.LoraConfig(**kw))
    peft_sd = get_peft_model_state_dict(pm)
    mags = {k: v for k, v in af.state_dict(a).items() if k.endswith("lora_magnitude_vector")}
    assert mags and all(torch.equal(v, peft_sd[k]) for k, v in mags.items())
    x = _x(case)
    assert_close(af.inject(fn, a)(params, x), fn(params, x), "fresh adapter vs base", tol=1e-6)

    b = af.init(fn, af.LoraConfig(init_lora_weights=False, **kw), generator=torch.Generator().manual_seed(1))
    layers = {"conv1d": DoraConv1dLayer, "conv2d": DoraConv2dLayer, "conv3d": DoraConv3dLayer}
    modules = dict(model.named_modules())
    checked = 0
    for path, e in b.entry_items:
        if e.kind not in layers:
            continue
        leaves = b.leaves(path)
        layer = layers[e.kind](fan_in_fan_out=False)
        layer.update_layer(base_layer=modules[path], lora_A=leaves["lora_A"], lora_B=leaves["lora_B"],
                           scaling=e.scaling)
        assert leaves["lora_magnitude"].shape == layer.weight.shape
        assert_close(leaves["lora_magnitude"], layer.weight.detach(), f"{path} magnitude")
        checked += 1
    assert checked


@pytest.mark.parametrize("case", [c for c in CASES if c.peft_unmerged], ids=[c.id for c in CASES if c.peft_unmerged])
def test_gradients_are_peft_s(case: Case) -> None:
    """Training gradients of A, B and the magnitude (the weight norm detached, as PEFT does)."""
    pm = make_peft(case.make, _kw(case, use_dora=True))
    x = _x(case)
    pm(x).square().mean().backward()
    grads = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if p.grad is not None}
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    fn, params = af.functional(build(case.make))
    a = af.from_state_dict(sd, pm.peft_config["default"])
    g = torch.func.grad(lambda ad: af.inject(fn, ad)(params, x).square().mean())(a)
    names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector.weight"}
    checked = 0
    for path in a.paths:
        for leaf, key in names.items():
            assert_close(g.leaves(path)[leaf], grads[f"base_model.model.{path}.{key}"], f"{path}.{leaf} grad")
            checked += 1
    assert checked == 3 * len(a.paths)


# -- a diffusers UNet: DoRA on its convs and attention Linears -------------------------------------------------------
@pytest.fixture
def flush_denormals():
    """The perturbed UNet's activations reach float32 denormals, which make CPU convolutions ~10x slower."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def test_unet_dora_both_ways_vmap_and_route(tmp_path, flush_denormals) -> None:
    kw = dict(r=2, lora_alpha=4, target_modules=UNET_TARGETS, use_dora=True)
    xs = _inputs("unet")
    pm = make_peft(tiny_unet, kw)
    with torch.no_grad():
        ref = _out("unet", pm(*xs))
    pm.save_pretrained(tmp_path / "peft")
    fn, params = af.functional(build(tiny_unet))
    a = af.load(tmp_path / "peft")
    kinds = {e.kind for _, e in a.entry_items}
    assert {"conv2d", "linear"} <= kinds and all("lora_magnitude" in a.leaves(p) for p in a.paths)
    with torch.no_grad():
        out = _out("unet", af.inject(fn, a)(params, *xs))
        base = _out("unet", fn(params, *xs))
        merged = af.merge(params, a)
    assert rel_err(base, ref) > 1e-3, "vacuous comparison"
    assert_close(out, ref, "PEFT -> adaptfn")
    assert_close(_out("unet", fn(merged, *xs)), out, "merge vs inject")
    ref_merged, peft_params = peft_merged(pm, *xs)
    assert_close(_out("unet", fn(merged, *xs)), _out("unet", ref_merged), "merge vs PEFT's merge")
    for k in (k for k in merged if merged[k] is not params[k]):
        assert_close(merged[k], peft_params[k], k, tol=1e-6)

    b = perturb(af.init(fn, af.LoraConfig(**kw), generator=torch.Generator().manual_seed(1)), seed=3)
    out_b = _out("unet", af.inject(fn, b)(params, *xs))
    af.save(b, tmp_path / "af")
    with torch.no_grad():
        assert_close(out_b, _out("unet", from_pretrained(tiny_unet, tmp_path / "af")(*xs)), "adaptfn -> PEFT")

    stacked = af.stack([a, b])
    want = torch.stack([out, out_b])
    got = torch.func.vmap(lambda s: _out("unet", af.inject(fn, s)(params, *xs)))(stacked)
    assert_close(got, want, "vmap vs loop")
    routed = _out("unet", af.inject(fn, stacked, route=torch.tensor([1, -1, 0]))(params, *xs))
    assert_close(routed, torch.stack([want[1][0], base[1], want[0][2]]), "route (each row its own magnitude)")
