"""IA3 parity with the real ``peft`` package on tiny OPT, Llama and GPT-2 (Conv1D) models: PEFT's files read
and written both ways with the same logits (max relative error <= 1e-5 in float32), the same keys and shapes,
merge (weights and biases) against PEFT's merge_and_unload, and exact masking."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from conftest import assert_close, gen, ids_for, rel_err, shapes, tiny_gpt2, tiny_llama, tiny_opt
from peft.utils import get_peft_model_state_dict

import adaptfn as af
from parity.peft_models import peft_model, peft_reload

TOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def make_peft(build, seed: int = 1234, **kw) -> peft.PeftModel:
    """A PeftModel with random IA3 vectors (``init_ia3_weights=False``: standard normal draws)."""
    return peft_model(build(), peft.IA3Config, dict(init_ia3_weights=False, **kw), seed)


@dataclass(frozen=True)
class Case:
    id: str
    build: Any
    kw: dict[str, Any]


CASES = [
    Case("opt-attn-ff", tiny_opt, dict(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"])),
    Case("opt-out-proj-fc1-no-ff", tiny_opt, dict(target_modules=["out_proj", "fc1"], feedforward_modules=[])),
    Case("llama-mlp-attn", tiny_llama, dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                            feedforward_modules=["down_proj"])),
    Case("llama-regex-ff", tiny_llama, dict(target_modules=r".*\.(k_proj|gate_proj|down_proj)",
                                            feedforward_modules=r".*\.1\.mlp\.(gate|down)_proj")),
    Case("gpt2-conv1d", tiny_gpt2, dict(target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"],
                                        feedforward_modules=["mlp.c_proj"])),
    Case("gpt2-conv1d-c-fc-ff", tiny_gpt2, dict(target_modules=["c_fc", "c_attn"], feedforward_modules=["c_fc"])),
    Case("opt-modules-to-save", tiny_opt, dict(target_modules=["q_proj", "fc2"], feedforward_modules=["fc2"],
                                               modules_to_save=["lm_head"])),
]
IDS = [c.id for c in CASES]


def _perturb_saved(pm: peft.PeftModel) -> None:
    """Move modules_to_save copies off the base, so the replacement is really exercised."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and "ia3_l" not in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_saved_adapter_gives_peft_outputs(case: Case, tmp_path) -> None:
    pm = make_peft(case.build, **case.kw)
    _perturb_saved(pm)
    ids = ids_for(pm.get_base_model())
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)

    a = af.load(tmp_path)
    assert a.method == "ia3"
    fn, params = af.functional(case.build())
    out = af.inject(fn, a)(params, input_ids=ids).logits
    base = fn(params, input_ids=ids).logits
    assert rel_err(base, ref) > 1e-3, "the adapter does not change the outputs: the comparison is vacuous"
    assert_close(out, ref)
    merged = af.merge(params, a)
    assert_close(fn(merged, input_ids=ids).logits, out, "merge vs inject")
    assert torch.equal(af.inject(fn, af.mask(a, False))(params, input_ids=ids).logits, base)
    with torch.no_grad():
        peft_sd = get_peft_model_state_dict(pm)
    assert shapes(af.state_dict(a)) == shapes(peft_sd)
    for k, v in af.state_dict(a).items():
        assert torch.equal(v, peft_sd[k]), k
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        unloaded = pm.merge_and_unload()
        ref_merged = unloaded(input_ids=ids).logits
        ref_params = dict(unloaded.state_dict())
    assert_close(fn(merged, input_ids=ids).logits, ref_merged, "merge vs PEFT merge_and_unload")
    for p, e in a.entry_items:  # the merged weights and biases themselves
        if not e.kind:
            continue
        for n in ("weight", "bias"):
            if f"{p}.{n}" in ref_params:
                assert torch.equal(merged[f"{p}.{n}"], ref_params[f"{p}.{n}"]), f"{p}.{n}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adaptfn_saved_adapter_gives_same_outputs_in_peft(case: Case, tmp_path) -> None:
    model = case.build()
    fn, params = af.functional(model)
    a = af.init(fn, af.IA3Config(init_ia3_weights=False, **case.kw), generator=gen(0))
    ids = ids_for(model)
    out = af.inject(fn, a)(params, input_ids=ids).logits
    af.save(a, tmp_path)
    pm = peft_reload(case.build(), tmp_path)
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    assert rel_err(fn(params, input_ids=ids).logits, ref) > 1e-3, "vacuous comparison"
    assert_close(out, ref)
    # the same keys/shapes and config PEFT writes for this config on this model
    fresh = make_peft(case.build, **case.kw)
    assert shapes(af.state_dict(a)) == shapes(get_peft_model_state_dict(fresh))
    fresh.save_pretrained(tmp_path / "peft")
    with open(tmp_path / "peft" / "adapter_config.json", encoding="utf-8") as f:
        theirs = json.load(f)
    with open(os.path.join(tmp_path, "adapter_config.json"), encoding="utf-8") as f:
        ours = json.load(f)
    for field in ("peft_type", "fan_in_fan_out", "init_ia3_weights", "modules_to_save"):
        assert ours[field] == theirs[field], field
    for field in ("target_modules", "feedforward_modules"):
        o, t = ours[field], theirs[field]
        assert (sorted(o) if isinstance(o, list) else o) == (sorted(t) if isinstance(t, list) else t), field


def test_masked_module_saved_as_ones_loads_in_peft(tmp_path) -> None:
    """A partly masked adapter is written in its "off" form (ones), which PEFT runs as adaptfn does."""
    kw = dict(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = tiny_llama()
    fn, params = af.functional(model)
    a = af.mask(af.init(fn, af.IA3Config(init_ia3_weights=False, **kw), generator=gen(3)), ["v_proj"])
    ids = ids_for(model)
    out = af.inject(fn, a)(params, input_ids=ids).logits
    af.save(a, tmp_path)
    pm = peft_reload(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert_close(out, pm(input_ids=ids).logits)


def test_two_peft_ia3_adapters_active_together(tmp_path) -> None:
    kw_a = dict(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"])
    kw_b = dict(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"])
    pm = make_peft(tiny_opt, **kw_a)
    torch.manual_seed(77)
    pm.add_adapter("b", peft.IA3Config(init_ia3_weights=False, **kw_b))
    pm.eval()
    ids = ids_for(pm.get_base_model())
    with torch.no_grad():
        pm.base_model.set_adapter(["default", "b"])
        ref_both = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    fn, params = af.functional(tiny_opt())
    both = af.select({"default": af.load(tmp_path), "b": af.load(tmp_path, adapter_name="b")}, ["default", "b"])
    assert_close(af.inject(fn, both)(params, input_ids=ids).logits, ref_both, "default*b")
    assert_close(fn(af.merge(params, both), input_ids=ids).logits, ref_both, "merged default*b")
