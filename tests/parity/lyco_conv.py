"""Shared checks of LoHa, LoKr and OFT on convolutions against the real ``peft`` package (0.21.2), used by
``test_loha_parity.py``, ``test_lokr_parity.py`` and ``test_oft_parity.py``: single layers with odd channel counts,
strides, padding and groups, a model mixing Conv2d and Linear, and a tiny diffusers UNet2DConditionModel.

Each case is checked both ways (PEFT-saved -> adaptfn: inject, merge, merged weights equal to PEFT's
``merge_and_unload``, PEFT's keys and tensors written back; adaptfn-saved -> PEFT; ``af.init`` -> PEFT, same names,
shapes and outputs), ``mask(a, False)`` gives the base bit for bit, merge == inject, and a stack under ``vmap`` and
``route=`` equals the loop."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import peft
import torch
from conftest import assert_close, rel_err, shapes
from peft.utils import get_peft_model_state_dict
from torch import nn

import adaptfn as af
from parity.peft_models import peft_model, peft_reload
from parity.test_conv_parity import _inputs, _out, build, tiny_unet

AF = {peft.LoHaConfig: af.LoHaConfig, peft.LoKrConfig: af.LoKrConfig, peft.OFTConfig: af.OFTConfig}


class ConvLinear(nn.Module):
    """Conv2d(3 -> 11, 3x3, stride 2) -> Conv1d over rows (11 -> 7, groups 1) -> 1x1 Conv2d -> Linear(19 -> 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 11, 3, stride=2, padding=1)
        self.row = nn.Conv1d(11, 7, 3, padding=2)
        self.point = nn.Conv2d(7, 19, 1)
        self.head = nn.Linear(19, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # [b, 11, 5, 5]
        h = self.row(h.flatten(2))  # [b, 7, 27]
        h = self.point(h[..., :25].reshape(h.shape[0], 7, 5, 5))  # [b, 19, 5, 5]
        return self.head(h.mean((2, 3)))


@dataclass(frozen=True)
class Case:
    id: str
    make: Any  # () -> nn.Module
    shape: tuple[int, ...]  # input shape
    kw: dict[str, Any]


def x_of(case: Case) -> torch.Tensor:
    return torch.randn(case.shape, generator=torch.Generator().manual_seed(3))


def make_peft(make: Any, cls: Any, kw: dict[str, Any], seed: int = 1234, **extra: Any) -> Any:
    return peft_model(build(make), cls, {"target_modules": ["m"], "init_weights": False, **kw, **extra}, seed)


def peft_load(make: Any, folder: Any) -> Any:
    return peft_reload(build(make), folder)


def af_config(cls: Any, kw: dict[str, Any], **extra: Any) -> Any:
    return AF[cls](**{"target_modules": ["m"], **kw, **extra})


def check_both_ways(case: Case, cls: Any, tmp_path: Any) -> None:
    x = x_of(case)
    pm = make_peft(case.make, cls, case.kw)
    with torch.no_grad():
        ref = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    model = build(case.make)
    fn, params = af.functional(model)
    a = af.load(tmp_path / "peft")
    base = fn(params, x)
    assert rel_err(base, ref) > 1e-3, "the adapter does not change the outputs: the comparison is vacuous"
    out = af.inject(fn, a)(params, x)
    assert_close(out, ref, "PEFT -> adaptfn")
    assert torch.equal(af.inject(fn, af.mask(a, False))(params, x), base)
    merged = af.merge(params, a)
    assert_close(fn(merged, x), out, "merge vs inject")
    peft_sd = get_peft_model_state_dict(pm)
    ours = af.state_dict(a)
    assert shapes(ours) == shapes(peft_sd)
    assert all(torch.equal(v, peft_sd[k]) for k, v in ours.items())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        merged_model = pm.merge_and_unload()
        assert_close(fn(merged, x), merged_model(x), "merge vs PEFT's merge")
        peft_params = dict(merged_model.named_parameters())
    changed = [k for k in merged if merged[k] is not params[k]]
    assert changed
    for k in changed:
        assert_close(merged[k], peft_params[k].detach(), k, tol=1e-6)

    b = af.init(fn, af_config(cls, case.kw, init_weights=False), generator=torch.Generator().manual_seed(0))
    af.save(b, tmp_path / "af")
    with torch.no_grad():
        assert_close(af.inject(fn, b)(params, x), peft_load(case.make, tmp_path / "af")(x), "adaptfn -> PEFT")
    half = af.scale(b, 0.6)
    af.save(half, tmp_path / "half")
    with torch.no_grad():
        assert_close(af.inject(fn, half)(params, x), peft_load(case.make, tmp_path / "half")(x), "scaled")
    fresh = af.init(fn, af_config(cls, case.kw), generator=torch.Generator().manual_seed(0))
    pm_fresh = make_peft(case.make, cls, case.kw, init_weights=True)
    assert shapes(af.state_dict(fresh)) == shapes(get_peft_model_state_dict(pm_fresh))
    af.save(fresh, tmp_path / "fresh")
    with torch.no_grad():
        assert_close(af.inject(fn, fresh)(params, x), peft_load(case.make, tmp_path / "fresh")(x), "fresh")
        assert_close(af.inject(fn, fresh)(params, x), base, "fresh is the base")

    stacked = af.stack([a, b])
    want = torch.stack([out, af.inject(fn, b)(params, x)])
    got = torch.func.vmap(lambda s: af.inject(fn, s)(params, x))(stacked)
    assert_close(got, want, "vmap vs loop")
    route = torch.tensor([1, -1, 0][: x.shape[0]])
    routed = af.inject(fn, stacked, route=route)(params, x)
    rows = [want[1][0], base[1], want[0][2]][: x.shape[0]]
    assert_close(routed, torch.stack(rows), "route")
    g = torch.func.grad(lambda ad: af.inject(fn, ad)(params, x).square().sum())(a)
    assert af.tree.structure(g) == af.tree.structure(a)


def check_unet(cls: Any, kw: dict[str, Any], tmp_path: Any) -> None:
    xs = _inputs("unet", batch=2)
    pm = make_peft(tiny_unet, cls, kw)
    with torch.no_grad():
        ref = _out("unet", pm(*xs))
    pm.save_pretrained(tmp_path / "peft")
    fn, params = af.functional(build(tiny_unet))
    a = af.load(tmp_path / "peft")
    base = _out("unet", fn(params, *xs))
    assert rel_err(base, ref) > 1e-3, "vacuous comparison"
    out = _out("unet", af.inject(fn, a)(params, *xs))
    assert_close(out, ref, "PEFT -> adaptfn")
    merged = af.merge(params, a)
    assert_close(_out("unet", fn(merged, *xs)), out, "merge vs inject")
    assert any(merged[k].dim() == 4 and merged[k] is not params[k] for k in merged)
    b = af.init(fn, AF[cls](**kw, init_weights=False), generator=torch.Generator().manual_seed(1))
    af.save(b, tmp_path / "af")
    with torch.no_grad():
        theirs = _out("unet", peft_load(tiny_unet, tmp_path / "af")(*xs))
        assert_close(_out("unet", af.inject(fn, b)(params, *xs)), theirs, "adaptfn -> PEFT")
