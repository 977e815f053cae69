"""LoHa, LoKr, OFT and VeRA parity with the real ``peft`` package (0.21.2) on tiny OPT, Llama and GPT-2 models:
PEFT's files read and written both ways with the same logits (max relative error <= 1e-5 in float32; measured:
0 for loading, <= 1e-6 for merges), merged weights equal to PEFT's ``merge_and_unload``, fresh adapters with
PEFT's tensor names and shapes, scale weights folded into the saved tensors, VeRA's shared projections saved or
regenerated from ``projection_prng_key`` as PEFT does, LyCORIS training dropouts drawn as PEFT draws them, and
adapters of several methods on one module composed in PeftMixedModel's order."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from conftest import assert_close, gen, ids_for, rel_err, shapes, tiny_gpt2, tiny_llama, tiny_opt
from peft.utils import get_peft_model_state_dict
from torch import nn

import adaptfn as af
from parity.peft_models import peft_model, peft_reload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

AF_CONFIG = {peft.LoHaConfig: af.LoHaConfig, peft.LoKrConfig: af.LoKrConfig, peft.OFTConfig: af.OFTConfig,
             peft.VeraConfig: af.VeraConfig}


@dataclass(frozen=True)
class Case:
    id: str
    build: Any
    cls: Any  # the peft config class
    kw: dict[str, Any]


CASES = [
    Case("loha-opt", tiny_opt, peft.LoHaConfig, dict(r=2, alpha=3, target_modules=["q_proj", "fc1"])),
    Case("loha-llama-patterns", tiny_llama, peft.LoHaConfig, dict(
        r=3, alpha=5, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 7})),
    Case("lokr-decompose-both-factor", tiny_opt, peft.LoKrConfig, dict(
        r=2, alpha=3, target_modules=["q_proj", "fc1", "fc2"], decompose_both=True, decompose_factor=11)),
    Case("lokr-llama-regex-full", tiny_llama, peft.LoKrConfig, dict(
        r=8, alpha=4, target_modules=r".*\.1\.(self_attn\.o_proj|mlp\.up_proj)", rank_pattern={"up_proj": 2})),
    Case("oft-llama-r-exact-cayley", tiny_llama, peft.OFTConfig, dict(
        r=4, oft_block_size=0, target_modules=["q_proj", "down_proj"], use_cayley_neumann=False)),
    Case("oft-llama-coft-share-embedding", tiny_llama, peft.OFTConfig, dict(
        oft_block_size=6, target_modules=["k_proj", "gate_proj", "embed_tokens"], coft=True, eps=0.05,
        block_share=True)),
    Case("oft-opt-neumann3-block-adjusted", tiny_opt, peft.OFTConfig, dict(
        oft_block_size=10, target_modules=["q_proj", "fc1", "fc2"], num_cayley_neumann_terms=3)),
    Case("vera-opt", tiny_opt, peft.VeraConfig, dict(r=4, target_modules=["q_proj", "fc1"])),
    Case("vera-gpt2-conv1d-key", tiny_gpt2, peft.VeraConfig, dict(r=5, target_modules=["c_attn", "c_fc"],
                                                                   projection_prng_key=7)),
    Case("vera-llama-no-projection", tiny_llama, peft.VeraConfig, dict(r=3, target_modules=["v_proj", "down_proj"],
                                                                      save_projection=False, d_initial=0.3)),
]
IDS = [c.id for c in CASES]


def make_peft(case: Case, seed: int = 1234, **extra: Any) -> peft.PeftModel:
    """A PeftModel with random adapter weights (``init_weights=False``) drawn from the global RNG."""
    return peft_model(case.build(), case.cls, {"init_weights": False, **case.kw, **extra}, seed)


def af_config(case: Case, **kw: Any) -> Any:
    return AF_CONFIG[case.cls](**{**case.kw, **kw})


def logits_of(m: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=ids).logits


def from_peft_folder(folder: Any, build: Any) -> peft.PeftModel:
    return peft_reload(build(), folder)


# -- 1. PEFT -> adaptfn: inject, merge ------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_saved_adapter_gives_peft_outputs_and_merges(case: Case, tmp_path) -> None:
    pm = make_peft(case)
    ids = ids_for(pm.get_base_model())
    ref = logits_of(pm, ids)
    pm.save_pretrained(tmp_path)

    model = case.build()
    fn, params = af.functional(model)
    a = af.load(tmp_path, model=fn)  # model= is needed only without saved VeRA projections
    assert a.method == case.cls.__name__.replace("Config", "").lower()
    base = fn(params, input_ids=ids).logits
    assert rel_err(base, ref) > 1e-3, "the adapter does not change the outputs: the comparison is vacuous"
    out = af.inject(fn, a)(params, input_ids=ids).logits
    assert_close(out, ref)
    merged = af.merge(params, a)
    assert_close(fn(merged, input_ids=ids).logits, ref, "merged")
    assert torch.equal(af.inject(fn, af.mask(a, False))(params, input_ids=ids).logits, base)
    # adaptfn writes back PEFT's keys and tensors
    peft_sd = get_peft_model_state_dict(pm)
    ours = af.state_dict(a)
    assert shapes(ours) == shapes(peft_sd)
    assert all(torch.equal(v, peft_sd[k]) for k, v in ours.items())
    # the merged weights are PEFT's merge_and_unload's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = pm.merge_and_unload().state_dict()
    for k, w in peft_merged.items():
        if k in merged and merged[k] is not params[k]:
            assert_close(merged[k], w, k, tol=1e-6)


# -- 2. adaptfn -> PEFT, and af.init -> PEFT --------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adaptfn_saved_adapter_gives_same_outputs_in_peft(case: Case, tmp_path) -> None:
    model = case.build()
    fn, params = af.functional(model)
    ids = ids_for(model)
    a = af.init(fn, af_config(case, init_weights=False), generator=gen(0))
    out = af.inject(fn, a)(params, input_ids=ids).logits
    af.save(a, tmp_path / "random")
    ref = logits_of(from_peft_folder(tmp_path / "random", case.build), ids)
    assert rel_err(fn(params, input_ids=ids).logits, ref) > 1e-3, "vacuous comparison"
    assert_close(out, ref)
    # a scale weight is folded into the saved tensors: PEFT computes the scaled adapter
    half = af.scale(a, 0.6)
    af.save(half, tmp_path / "scaled")
    assert_close(af.inject(fn, half)(params, input_ids=ids).logits,
                 logits_of(from_peft_folder(tmp_path / "scaled", case.build), ids), "scaled")
    # a fresh adapter (PEFT's init) has PEFT's tensor names and shapes, and PEFT computes what adaptfn does
    fresh = af.init(fn, af_config(case), generator=gen(0))
    pm_fresh = make_peft(case, init_weights=True)
    assert shapes(af.state_dict(fresh)) == shapes(get_peft_model_state_dict(pm_fresh))
    af.save(fresh, tmp_path / "fresh")
    out = af.inject(fn, fresh)(params, input_ids=ids).logits
    assert_close(out, logits_of(from_peft_folder(tmp_path / "fresh", case.build), ids), "fresh")
    assert_close(out, logits_of(pm_fresh, ids), "PEFT's own fresh adapter")


# -- VeRA's shared projections ----------------------------------------------------------------------------------
def test_vera_projections_are_peft_s_and_regenerated_only_with_the_model(tmp_path) -> None:
    case = CASES[IDS.index("vera-opt")]
    pm = make_peft(case, projection_prng_key=3, save_projection=False)
    pm.save_pretrained(tmp_path)
    with pytest.raises(af.AdapterFileError, match="save_projection=False.*pass model="):
        af.load(tmp_path)
    fn, params = af.functional(case.build())
    a = af.load(tmp_path, model=fn)
    p = a.paths[0]
    assert torch.equal(a.leaves(p)["vera_A"], pm.base_model.vera_A["default"])
    assert torch.equal(a.leaves(p)["vera_B"], pm.base_model.vera_B["default"])
    assert all(a.leaves(q)["vera_A"] is a.leaves(p)["vera_A"] for q in a.paths)  # one tensor, not a copy each
    assert "base_model.vera_A" not in af.state_dict(a)
    fresh = af.init(fn, af.VeraConfig(r=4, target_modules=["q_proj", "fc1"], projection_prng_key=3))
    assert torch.equal(fresh.leaves(p)["vera_A"], a.leaves(p)["vera_A"])
    sd = af.state_dict(fresh)
    assert torch.equal(sd["base_model.vera_B"], pm.base_model.vera_B["default"])
    # from_state_dict takes the shared keys too (and model= in the same way)
    b = af.from_state_dict(sd, fresh.config)
    assert b.entries == fresh.entries


# -- LyCORIS training dropouts ----------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 6))


@pytest.mark.parametrize("cfg", [
    peft.LoHaConfig(r=2, alpha=3, target_modules=["0", "2", "4"], init_weights=False, rank_dropout=0.4,
                    module_dropout=0.3),
    peft.LoKrConfig(r=2, alpha=3, target_modules=["0", "2", "4"], init_weights=False, rank_dropout=0.4,
                    module_dropout=0.3, rank_dropout_scale=True),
], ids=["loha", "lokr"])
def test_training_dropouts_draw_as_peft(cfg) -> None:
    """With the generator seeded as PEFT's global RNG, the module and rank dropouts drop the same things."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(_mlp(), cfg).train()
    a = af.from_state_dict(get_peft_model_state_dict(pm), cfg)
    fn, params = af.functional(_mlp().train())
    x = torch.randn(5, 12, generator=gen(9))
    eval_out = af.inject(fn, a)(params, x)
    differs = 0
    for seed in range(4):
        torch.manual_seed(seed)
        ref = pm(x)
        out = af.inject(fn, a, generator=gen(seed))(params, x)
        assert torch.equal(out, ref), seed
        differs += not torch.equal(out, eval_out)
    assert differs >= 3


# -- several methods on one module: PeftMixedModel's order -----------------------------------------------------
MIXED = {"lora": peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "fc1"], init_lora_weights=False),
         "loha": peft.LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj"], init_weights=False),
         "oft": peft.OFTConfig(oft_block_size=11, target_modules=["q_proj", "fc1"], init_weights=False),
         "lokr": peft.LoKrConfig(r=2, alpha=3, target_modules=["q_proj"], init_weights=False)}


@pytest.mark.parametrize("order", [["lora", "loha", "oft"], ["oft", "lora", "lokr"]], ids="-".join)
def test_mixed_methods_compose_in_peft_mixed_order(order) -> None:
    """PeftMixedModel wraps each module in its adapters in the order they were added (the later one outermost;
    an OFT rotates the input of what it wraps). An AdapterSum composes its parts in order, the first innermost:
    the parts in PEFT's order give PEFT's outputs, inject and merge alike; another order differs (OFT)."""
    torch.manual_seed(0)
    base = tiny_opt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, MIXED[order[0]], adapter_name=order[0], mixed=True)
        for n in order[1:]:
            pm.add_adapter(n, MIXED[n])
    pm.set_adapter(order)
    pm.eval()
    ids = ids_for(base)
    ref = logits_of(pm, ids)

    def sd(name: str) -> dict[str, torch.Tensor]:  # the mixed model nests base layers: strip them from the keys
        return {re.sub(r"(\.base_layer)+\.(?=(lora_|hada_|oft_|lokr_))", ".", k): v
                for k, v in get_peft_model_state_dict(pm, adapter_name=name).items()}

    adapters = {n: af.from_state_dict(sd(n), pm.peft_config[n]) for n in order}
    fn, params = af.functional(tiny_opt())
    both = af.select(adapters, order)
    assert_close(af.inject(fn, both)(params, input_ids=ids).logits, ref)
    assert_close(fn(af.merge(params, both), input_ids=ids).logits, ref, "merged")
    assert rel_err(af.inject(fn, af.select(adapters, order[::-1]))(params, input_ids=ids).logits, ref) > 1e-2
