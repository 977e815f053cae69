"""LoRA parity with the real ``peft`` package: PEFT's files read and written both ways, the same logits
(max relative error <= 1e-5 in float32), merge / mask exactness, config coverage, several active
adapters and greedy generation. Tiny models built from configs (see ``tests/conftest.py``)."""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
from conftest import assert_close, gen, ids_for, rel_err, shapes, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt
from peft.utils import get_peft_model_state_dict

import adaptfn as af
from parity.peft_models import peft_model, peft_reload

TOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def logits(out: Any) -> torch.Tensor:
    return out.logits.detach()


def make_peft(build, adapter_name: str = "default", seed: int = 1234, **kw) -> peft.PeftModel:
    """A PeftModel around a fresh base model, LoRA weights random (``init_lora_weights=False``)."""
    return peft_model(build(), peft.LoraConfig, dict(init_lora_weights=False, **kw), seed, adapter_name=adapter_name)


def perturb_peft(pm: torch.nn.Module, frozen_suffixes: tuple[str, ...] = (), seed: int = 5) -> None:
    """Move every trainable non-LoRA tensor (trained biases, modules_to_save copies) and the frozen tensors
    ending with ``frozen_suffixes`` away from the base, so replacements are really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if (p.requires_grad and "lora_" not in name) or name.endswith(frozen_suffixes):
                p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def perturb_af(a: Any, seed: int = 7) -> Any:
    """Noise on every non-scalar leaf (LoRA factors and replacements; the 0-d gates stay)."""
    g = torch.Generator().manual_seed(seed)
    return af.tree.map(lambda t: t + 0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype) if t.dim() else t, a)


def saved_config(folder: Any) -> dict[str, Any]:
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
        return json.load(f)


# -- the configurations ------------------------------------------------------------------------------
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Case:
    id: str
    build: Any
    kw: dict[str, Any]
    frozen: tuple[str, ...] = ()  # frozen PEFT tensors to perturb before saving (saved embedding matrices)
    peft_merge: bool = True  # PEFT's merge_and_unload agrees with its own forward (no tied LoRA target)


CASES = [
    Case("opt-attn", tiny_opt, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    Case("llama-attn-mlp", tiny_llama, dict(r=3, lora_alpha=5, target_modules=LLAMA_ALL)),
    Case("opt-regex", tiny_opt, dict(r=5, lora_alpha=7,
                                     target_modules=r".*decoder\.layers\.1\.(self_attn\.(k|out)_proj|fc1)")),
    Case("llama-all-linear", tiny_llama, dict(r=2, lora_alpha=3, target_modules="all-linear")),
    Case("llama-rank-alpha-pattern", tiny_llama, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"down_proj": 3, "q_proj": 11})),
    Case("opt-rslora", tiny_opt, dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "fc2"])),
    Case("opt-bias-all", tiny_opt, dict(r=3, lora_alpha=4, bias="all", target_modules=["v_proj", "fc1"])),
    Case("gpt2-conv1d-lora-only-bias", tiny_gpt2, dict(r=3, lora_alpha=9, bias="lora_only",
                                                       target_modules=["c_attn", "c_proj", "c_fc"])),
    Case("opt-modules-to-save-lm-head", tiny_opt, dict(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                       modules_to_save=["lm_head"])),
    Case("llama-layers-int", tiny_llama, dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                              layers_to_transform=1)),
    Case("opt3-layers-list-pattern", functools.partial(tiny_opt, layers=3),
         dict(r=3, lora_alpha=6, target_modules=["k_proj", "fc2"], layers_to_transform=[0, 2],
              layers_pattern="layers")),
    Case("llama3-layers-list", functools.partial(tiny_llama, layers=3),
         dict(r=2, lora_alpha=2, target_modules=["o_proj", "up_proj"], layers_to_transform=[1, 2])),
    # OPT's embed_tokens is tied to lm_head: PEFT merges the delta in place into the shared matrix (so its
    # merged lm_head differs from its unmerged forward); only the unmerged outputs are compared with PEFT.
    Case("opt-embedding-tied", tiny_opt, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
         frozen=("embed_tokens.base_layer.weight",), peft_merge=False),
    Case("llama-embedding", tiny_llama, dict(r=3, lora_alpha=5, target_modules=["embed_tokens", "v_proj"]),
         frozen=("embed_tokens.base_layer.weight",)),
]
CASE_IDS = [c.id for c in CASES]


def _ids(pm_or_model: Any) -> torch.Tensor:
    return ids_for(pm_or_model.get_base_model() if isinstance(pm_or_model, peft.PeftModel) else pm_or_model)


# -- 1. PEFT -> adaptfn ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peft_saved_adapter_gives_peft_outputs(case: Case, tmp_path):
    pm = make_peft(case.build, **case.kw)
    perturb_peft(pm, case.frozen)
    ids = _ids(pm)
    with torch.no_grad():
        ref = logits(pm(input_ids=ids))
    pm.save_pretrained(tmp_path)

    a = af.load(tmp_path)
    fn, params = af.functional(case.build())
    out = logits(af.inject(fn, a)(params, input_ids=ids))
    base = logits(fn(params, input_ids=ids))
    assert rel_err(base, ref) > 1e-3, "the adapter does not change the outputs: the comparison is vacuous"
    assert_close(out, ref)
    # the keys adaptfn would write back are the ones PEFT wrote
    with torch.no_grad():
        peft_sd = get_peft_model_state_dict(pm)
    assert shapes(af.state_dict(a)) == shapes(peft_sd)
    for k, v in af.state_dict(a).items():
        assert torch.equal(v, peft_sd[k]), k


# -- 2. adaptfn -> PEFT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_adaptfn_saved_adapter_gives_same_outputs_in_peft(case: Case, tmp_path):
    model = case.build()
    fn, params = af.functional(model)
    a = perturb_af(af.init(fn, af.LoraConfig(init_lora_weights=False, **case.kw), generator=gen(0)))
    ids = _ids(model)
    out = logits(af.inject(fn, a)(params, input_ids=ids))
    af.save(a, tmp_path)

    pm = peft_reload(case.build(), tmp_path)
    with torch.no_grad():
        ref = logits(pm(input_ids=ids))
    assert rel_err(logits(fn(params, input_ids=ids)), ref) > 1e-3, "vacuous comparison"
    assert_close(out, ref)

    # same key set and shapes as PEFT's own adapter for this config on this model
    peft_sd = get_peft_model_state_dict(make_peft(case.build, **case.kw))
    assert shapes(af.state_dict(a)) == shapes(peft_sd)


def test_adaptfn_state_dict_keys_match_peft_for_embedding_target():
    """PEFT saves the whole embedding matrix (``embed_tokens.base_layer.weight``) when embed_tokens is a
    target; adaptfn's fresh adapter must carry the same key, or PEFT files written by adaptfn lack it."""
    model = tiny_llama()
    kw = dict(r=2, lora_alpha=4, target_modules=["embed_tokens"])
    fn, _ = af.functional(model)
    a = af.init(fn, af.LoraConfig(init_lora_weights=False, **kw), generator=gen(0))
    peft_keys = set(get_peft_model_state_dict(make_peft(tiny_llama, **kw)))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in peft_keys
    assert set(af.state_dict(a)) == peft_keys


# -- 3. merge and mask ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_merge_and_mask(case: Case, tmp_path):
    pm = make_peft(case.build, **case.kw)
    perturb_peft(pm, case.frozen)
    pm.save_pretrained(tmp_path)
    ids = _ids(pm)
    a = af.load(tmp_path)

    fn, params = af.functional(case.build())
    injected = logits(af.inject(fn, a)(params, input_ids=ids))
    merged = af.merge(params, a)
    assert_close(logits(fn(merged, input_ids=ids)), injected, "merge vs inject")
    base = fn(params, input_ids=ids).logits
    masked = af.inject(fn, af.mask(a, False))(params, input_ids=ids).logits
    assert torch.equal(masked, base), "mask(a, False) is not exactly the base model"
    if case.peft_merge:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ref = logits(pm.merge_and_unload()(input_ids=ids))
        assert_close(logits(fn(merged, input_ids=ids)), ref, "merge vs PEFT merge_and_unload")


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_opt], ids=["gpt2", "opt"])
def test_merge_after_adaptfn_save_load_roundtrip(build, tmp_path):
    """An adapter adaptfn saved and loaded back merges as it injects (GPT-2: square Conv1D attn.c_proj,
    where only ``fan_in_fan_out`` tells which way the delta goes)."""
    tm = ["c_attn", "c_proj"] if build is tiny_gpt2 else ["q_proj", "out_proj"]
    model = build()
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=3, lora_alpha=6, target_modules=tm, init_lora_weights=False), generator=gen(1))
    af.save(a, tmp_path)
    b = af.load(tmp_path)
    ids = ids_for(model)
    injected = logits(af.inject(fn, b)(params, input_ids=ids))
    assert_close(injected, logits(af.inject(fn, a)(params, input_ids=ids)), "loaded vs original")
    assert_close(logits(fn(af.merge(params, b), input_ids=ids)), injected, "merge vs inject after load")


# -- 4. config details ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build,task_type",
    [(tiny_llama, None), (tiny_gpt2, None), (tiny_opt, None), (tiny_bert, "SEQ_CLS")],
    ids=["llama", "gpt2", "opt", "bert-seq-cls"],
)
def test_all_linear_expands_like_peft(build, task_type, tmp_path):
    kw = dict(r=2, target_modules="all-linear", task_type=task_type)
    pm = make_peft(build, **kw)
    pm.save_pretrained(tmp_path)
    peft_targets = saved_config(tmp_path)["target_modules"]

    fn, _ = af.functional(build())
    a = af.init(fn, af.LoraConfig(**kw), generator=gen(0))
    assert set(a.config.target_modules) == set(peft_targets)
    assert {p for p, e in a.entry_items if e.kind} == set(peft_targets)
    af.save(a, tmp_path / "af")
    assert set(saved_config(tmp_path / "af")["target_modules"]) == set(peft_targets)


def test_opt_modules_to_save_lm_head_unties(tmp_path):
    """OPT ties lm_head to embed_tokens; modules_to_save=["lm_head"] replaces lm_head only (PEFT trains a
    copy), embed_tokens stays the base matrix — in inject and in merge."""
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    pm = make_peft(tiny_opt, **kw)
    perturb_peft(pm)
    pm.save_pretrained(tmp_path)
    ids = ids_for(pm.get_base_model())
    with torch.no_grad():
        ref = logits(pm(input_ids=ids))
        peft_embed = pm.get_base_model().model.decoder.embed_tokens.weight.clone()
        peft_head = pm.get_base_model().lm_head.modules_to_save["default"].weight.clone()
    assert not torch.equal(peft_embed, peft_head)

    model = tiny_opt()
    fn, params = af.functional(model)
    a = af.load(tmp_path)
    assert_close(logits(af.inject(fn, a)(params, input_ids=ids)), ref)
    merged = af.merge(params, a)
    assert torch.equal(merged["lm_head.weight"], peft_head)
    assert merged["model.decoder.embed_tokens.weight"] is params["model.decoder.embed_tokens.weight"]
    assert torch.equal(merged["model.decoder.embed_tokens.weight"], peft_embed)
    assert torch.equal(model.lm_head.weight, model.model.decoder.embed_tokens.weight), "user's model changed"


def test_bert_sequence_classifier_modules_to_save(tmp_path):
    kw = dict(r=3, lora_alpha=6, target_modules=["query", "value"], modules_to_save=["classifier"],
              task_type="SEQ_CLS")
    # PEFT -> adaptfn
    pm = make_peft(tiny_bert, **kw)
    perturb_peft(pm)
    ids = ids_for(pm.get_base_model())
    with torch.no_grad():
        ref = logits(pm(input_ids=ids))
    pm.save_pretrained(tmp_path / "peft")
    model = tiny_bert()
    fn, params = af.functional(model)
    a = af.load(tmp_path / "peft")
    assert "classifier" in a.paths
    out = logits(af.inject(fn, a)(params, input_ids=ids))
    assert rel_err(logits(fn(params, input_ids=ids)), ref) > 1e-3, "vacuous comparison"
    assert_close(out, ref)
    assert_close(logits(fn(af.merge(params, a), input_ids=ids)), out, "merge vs inject")

    # adaptfn -> PEFT
    b = perturb_af(af.init(fn, af.LoraConfig(init_lora_weights=False, **kw), generator=gen(3)))
    out_b = logits(af.inject(fn, b)(params, input_ids=ids))
    af.save(b, tmp_path / "af")
    pm_b = peft_reload(tiny_bert(), tmp_path / "af")
    assert isinstance(pm_b, peft.PeftModelForSequenceClassification)
    with torch.no_grad():
        assert_close(out_b, logits(pm_b(input_ids=ids)))
    assert shapes(af.state_dict(b)) == shapes(get_peft_model_state_dict(make_peft(tiny_bert, **kw)))


# -- 5. several adapters -------------------------------------------------------------------------------
def test_two_peft_adapters_active_together(tmp_path):
    kw_a = dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"])
    kw_b = dict(r=5, lora_alpha=4, target_modules=["v_proj", "o_proj", "down_proj"])
    pm = make_peft(tiny_llama, **kw_a)
    torch.manual_seed(99)
    pm.add_adapter("b", peft.LoraConfig(init_lora_weights=False, **kw_b))
    pm.eval()
    ids = ids_for(pm.get_base_model())
    with torch.no_grad():
        pm.base_model.set_adapter(["default", "b"])
        assert list(pm.base_model.active_adapters) == ["default", "b"]
        ref_both = logits(pm(input_ids=ids))
        pm.base_model.set_adapter("b")
        ref_b = logits(pm(input_ids=ids))
        pm.base_model.set_adapter("default")
        ref_a = logits(pm(input_ids=ids))
    pm.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "b" / "adapter_model.safetensors")

    fn, params = af.functional(tiny_llama())
    a = af.load(tmp_path)
    b = af.load(tmp_path, adapter_name="b")
    assert b.config.r == 5 and a.config.r == 3
    assert_close(logits(af.inject(fn, a)(params, input_ids=ids)), ref_a, "default")
    assert_close(logits(af.inject(fn, b)(params, input_ids=ids)), ref_b, "b")
    both = af.select({"default": a, "b": b}, ["default", "b"])
    assert_close(logits(af.inject(fn, both)(params, input_ids=ids)), ref_both, "default+b")
    assert_close(logits(fn(af.merge(params, both), input_ids=ids)), ref_both, "merged default+b")


def test_adaptfn_saves_two_adapters_peft_loads_both(tmp_path):
    model = tiny_opt()
    fn, params = af.functional(model)
    a1 = af.init(fn, af.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"], init_lora_weights=False),
                 generator=gen(0))
    a2 = af.init(fn, af.LoraConfig(r=4, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                 generator=gen(1))
    af.save({"default": a1, "other": a2}, tmp_path)
    assert os.path.isfile(tmp_path / "adapter_config.json")
    assert os.path.isfile(tmp_path / "other" / "adapter_config.json")
    ids = ids_for(model)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_opt(), tmp_path).eval()
        pm.load_adapter(str(tmp_path / "other"), adapter_name="other")
    pm.eval()
    with torch.no_grad():
        ref_default = logits(pm(input_ids=ids))
        pm.base_model.set_adapter(["default", "other"])
        ref_both = logits(pm(input_ids=ids))
    assert_close(logits(af.inject(fn, a1)(params, input_ids=ids)), ref_default, "default")
    both = af.select({"default": a1, "other": a2}, ["default", "other"])
    assert_close(logits(af.inject(fn, both)(params, input_ids=ids)), ref_both, "default+other")
    # adaptfn reads its own two-adapter layout back too
    assert shapes(af.state_dict(af.load(tmp_path, adapter_name="other"))) == shapes(af.state_dict(a2))


# -- 6. generation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_opt, tiny_llama], ids=["opt", "llama"])
def test_greedy_generation_matches_peft(build, tmp_path):
    pm = make_peft(build, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "out_proj", "o_proj"])
    pm.save_pretrained(tmp_path)
    ids = ids_for(pm.get_base_model(), batch=2, seq=5, seed=3)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=mask)
    with torch.no_grad():
        ref = pm.generate(input_ids=ids, **kw)

    fn, params = af.functional(build())
    g = af.inject(fn, af.load(tmp_path))
    out = g.generate(params, input_ids=ids, **kw)
    assert out.shape == ref.shape and out.shape[1] > ids.shape[1]
    assert torch.equal(out, ref), f"adaptfn {out.tolist()} != peft {ref.tolist()}"
