"""DoRA (``use_dora=True``), ``lora_bias=True``, the per-module layout rule, task-type defaults and the
rounding of merges, against the real ``peft`` (0.21.2): PEFT's files read and written both ways with the same
outputs (max relative error <= 1e-5 in float32), merged weights equal to PEFT's ``merge_and_unload``, PEFT's
initialisation of the magnitude, PEFT's gradients (the detached weight norm), several DoRA adapters active
together. Models: tiny OPT, Llama (embedding), GPT-2 (Conv1D) and a model mixing every layer kind with odd
sizes (``tests/mixed_model.py``)."""

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
from mixed_model import TARGETS as MIXED_TARGETS
from mixed_model import mixed, mixed_ids
from peft.utils import get_peft_model_state_dict

import adaptfn as af
from parity.peft_models import peft_model, peft_reload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def out_of(o: Any) -> torch.Tensor:
    return (o if isinstance(o, torch.Tensor) else o.logits).detach()


def ids_of(model: Any) -> torch.Tensor:
    return ids_for(model) if hasattr(model, "config") and hasattr(model.config, "vocab_size") else mixed_ids()


def make_peft(build, seed: int = 1234, **kw) -> peft.PeftModel:
    """A PeftModel with random LoRA weights (``init_lora_weights=False``) whose every trainable tensor (the
    DoRA magnitudes and lora_B biases included) is then moved, so the magnitudes differ from the norms."""
    return peft_model(build(), peft.LoraConfig, dict(init_lora_weights=False, **kw), seed, move=True)


def from_pretrained(build, folder) -> peft.PeftModel:
    return peft_reload(build(), folder)


def perturb_af(a: Any, seed: int = 7) -> Any:
    """Noise on the delta leaves (LoRA factors, magnitudes, lora_B biases); gates and the frozen embedding
    matrices PEFT saves stay."""
    g = torch.Generator().manual_seed(seed)
    tensors = {p: {n: (t if (not t.dim() or n in e.frozen) else t + 0.3 * torch.randn(t.shape, generator=g))
                   for n, t in a.leaves(p).items()} for p, e in a.entry_items}
    return af.Adapter(a.method, a.config, dict(a.entries), tensors)


@dataclass(frozen=True)
class Case:
    id: str
    build: Any
    kw: dict[str, Any]


DORA = [
    Case("opt-linear", tiny_opt, dict(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "fc1"])),
    Case("llama-embedding-rslora-pattern", tiny_llama, dict(
        r=3, lora_alpha=4, use_rslora=True, target_modules=["embed_tokens", "k_proj", "down_proj"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"k_proj": 7})),
    Case("gpt2-conv1d", tiny_gpt2, dict(r=2, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"])),
    Case("mixed-kinds-odd-sizes", mixed, dict(r=3, lora_alpha=4, target_modules=MIXED_TARGETS)),
]
IDS = [c.id for c in DORA]


def _weights(sd: dict[str, torch.Tensor], targets: list[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.endswith(".weight") and any(f".{t}." in f".{k}" for t in targets)}


# -- DoRA: PEFT -> adaptfn ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", DORA, ids=IDS)
def test_peft_dora_adapter_injects_and_merges_as_peft(case: Case, tmp_path) -> None:
    pm = make_peft(case.build, use_dora=True, **case.kw)
    ids = ids_of(pm.get_base_model())
    with torch.no_grad():
        ref = out_of(pm(input_ids=ids))
    pm.save_pretrained(tmp_path)
    peft_sd = {k: v.clone() for k, v in get_peft_model_state_dict(pm).items()}
    assert any(k.endswith("lora_magnitude_vector") for k in peft_sd)

    a = af.load(tmp_path)
    fn, params = af.functional(case.build())
    with torch.no_grad():
        base = out_of(fn(params, input_ids=ids))
        out = out_of(af.inject(fn, a)(params, input_ids=ids))
        merged = af.merge(params, a)
        out_merged = out_of(fn(merged, input_ids=ids))
    assert rel_err(base, ref) > 1e-2, "vacuous comparison"
    assert_close(out, ref, "inject vs PEFT")
    assert_close(out_merged, out, "merge vs inject")
    # the grad-recording path (no fused inference kernel, no cached factor) computes the same
    assert_close(out_of(af.inject(fn, a)(params, input_ids=ids)), ref, "autograd path vs PEFT")
    # merged weights: PEFT's merge_and_unload, weight by weight
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        peft_merged = pm.merge_and_unload().state_dict()
    targets = case.kw["target_modules"]
    for k, w in _weights(peft_merged, targets).items():
        assert_close(merged[k], w, f"merged {k}")
    # the file adaptfn writes back is PEFT's, key for key and bit for bit
    ours = af.state_dict(a)
    assert shapes(ours) == shapes(peft_sd)
    for k, v in ours.items():
        assert torch.equal(v, peft_sd[k]), k


# -- DoRA: adaptfn -> PEFT, and PEFT's initialisation ----------------------------------------------------
@pytest.mark.parametrize("case", DORA, ids=IDS)
def test_adaptfn_dora_adapter_gives_the_same_outputs_in_peft(case: Case, tmp_path) -> None:
    model = case.build()
    fn, params = af.functional(model)
    a = perturb_af(af.init(fn, af.LoraConfig(use_dora=True, init_lora_weights=False, **case.kw), generator=gen(0)))
    ids = ids_of(model)
    out = out_of(af.inject(fn, a)(params, input_ids=ids))
    af.save(a, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    pm = from_pretrained(case.build, tmp_path)
    with torch.no_grad():
        ref = out_of(pm(input_ids=ids))
    assert rel_err(out_of(fn(params, input_ids=ids)), ref) > 1e-2, "vacuous comparison"
    assert_close(out, ref)
    peft_sd = get_peft_model_state_dict(make_peft(case.build, use_dora=True, **case.kw))
    assert shapes(af.state_dict(a)) == shapes(peft_sd)


@pytest.mark.parametrize("case", DORA, ids=IDS)
def test_init_magnitude_is_peft_s(case: Case) -> None:
    """``init_lora_weights=True``: the magnitudes are the base weights' norms, equal to PEFT's fresh adapter's;
    ``False``: PEFT's DoRA layer, initialised from adaptfn's random A and B, computes the same magnitudes; and a
    fresh DoRA adapter computes what plain LoRA with the same A, B computes."""
    from peft.tuners.lora.dora import DoraEmbeddingLayer, DoraLinearLayer

    from adaptfn.methods.common import is_conv1d

    model = case.build()
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(use_dora=True, **case.kw), generator=gen(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(case.build(), peft.LoraConfig(use_dora=True, **case.kw))
    peft_sd = get_peft_model_state_dict(pm)
    mags = {k: v for k, v in af.state_dict(a).items() if k.endswith("lora_magnitude_vector")}
    assert mags and all(torch.equal(v, peft_sd[k]) for k, v in mags.items())

    b = af.init(fn, af.LoraConfig(use_dora=True, init_lora_weights=False, **case.kw), generator=gen(1))
    modules = dict(model.named_modules())
    for path, e in b.entry_items:
        if not e.kind:
            continue
        leaves = b.leaves(path)
        if e.kind == "embedding":
            layer = DoraEmbeddingLayer(fan_in_fan_out=True)
        else:
            layer = DoraLinearLayer(fan_in_fan_out=is_conv1d(modules[path]))
        layer.update_layer(base_layer=modules[path], lora_A=leaves["lora_A"], lora_B=leaves["lora_B"],
                           scaling=e.scaling)
        assert_close(leaves["lora_magnitude"], layer.weight.detach(), f"{path} magnitude")
    plain = af.Adapter(b.method, af.LoraConfig(init_lora_weights=False, **case.kw), dict(b.entries),
                       {p: {n: t for n, t in b.leaves(p).items() if n != "lora_magnitude"} for p in b.paths})
    ids = ids_of(model)
    assert_close(out_of(af.inject(fn, b)(params, input_ids=ids)), out_of(af.inject(fn, plain)(params, input_ids=ids)),
                 "fresh DoRA vs plain LoRA")


def test_dora_gradients_are_peft_s() -> None:
    """Training gradients of A, B and the magnitude (the weight norm detached, as PEFT and the paper do)."""
    kw = dict(r=3, lora_alpha=5, target_modules=["q_proj", "fc2", "embed_tokens"])
    pm = make_peft(tiny_opt, use_dora=True, **kw)
    ids = ids_for(pm.get_base_model())
    pm(input_ids=ids).logits.square().mean().backward()  # eval mode: the model's own dropout off
    grads = {}
    for name, p in pm.named_parameters():
        if p.requires_grad and p.grad is not None:
            grads[name.replace(".default", "")] = p.grad
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}

    model = tiny_opt()
    fn, params = af.functional(model)
    a = af.from_state_dict(sd, pm.peft_config["default"])

    def loss(ad: Any) -> torch.Tensor:
        return af.inject(fn, ad)(params, input_ids=ids).logits.square().mean()

    g = torch.func.grad(loss)(a)
    names = {"lora_A": ("lora_A.weight", "lora_embedding_A"), "lora_B": ("lora_B.weight", "lora_embedding_B"),
             "lora_magnitude": ("lora_magnitude_vector.weight",)}
    checked = 0
    for path, e in a.entry_items:
        if not e.kind:
            continue
        for leaf, keys in names.items():
            ref = next(grads[f"base_model.model.{path}.{k}"] for k in keys if f"base_model.model.{path}.{k}" in grads)
            assert_close(g.leaves(path)[leaf], ref, f"{path}.{leaf} grad")
            checked += 1
    assert checked == 3 * 5


def test_two_dora_adapters_active_together_and_merged(tmp_path) -> None:
    kw_a = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    kw_b = dict(r=3, lora_alpha=3, target_modules=["v_proj", "fc1"], use_dora=True)
    pm = make_peft(tiny_opt, **kw_a)
    torch.manual_seed(9)
    pm.add_adapter("b", peft.LoraConfig(init_lora_weights=False, **kw_b))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".b." in n or n.endswith(".b"):
                p.add_(0.2)
    pm.eval()
    ids = ids_for(pm.get_base_model())
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        pm.base_model.set_adapter(["default", "b"])
        ref = out_of(pm(input_ids=ids))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged_ref = pm.merge_and_unload(adapter_names=["default", "b"]).state_dict()
    fn, params = af.functional(tiny_opt())
    both = af.select({"default": af.load(tmp_path), "b": af.load(tmp_path, adapter_name="b")}, ["default", "b"])
    with torch.no_grad():
        assert_close(out_of(af.inject(fn, both)(params, input_ids=ids)), ref, "both active")
        merged = af.merge(params, both)
        assert_close(out_of(fn(merged, input_ids=ids)), ref, "merged both")
    for k, w in _weights(merged_ref, ["q_proj", "v_proj", "fc1"]).items():
        assert_close(merged[k], w, f"merged {k}")


# -- lora_bias --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,tm", [(tiny_opt, ["q_proj", "fc2"]), (tiny_gpt2, ["c_attn", "c_proj"])],
                         ids=["opt", "gpt2"])
def test_lora_bias_both_ways_and_merge_folds_the_bias(build, tm, tmp_path) -> None:
    kw = dict(r=3, lora_alpha=5, target_modules=tm, lora_bias=True)
    pm = make_peft(build, **kw)
    ids = ids_for(pm.get_base_model())
    with torch.no_grad():
        ref = out_of(pm(input_ids=ids))
    pm.save_pretrained(tmp_path / "peft")
    a = af.load(tmp_path / "peft")
    assert any("lora_bias" in a.leaves(p) for p in a.paths)
    fn, params = af.functional(build())
    with torch.no_grad():
        out = out_of(af.inject(fn, a)(params, input_ids=ids))
        merged = af.merge(params, a)
    assert rel_err(out_of(fn(params, input_ids=ids)), ref) > 1e-2, "vacuous comparison"
    assert_close(out, ref)
    assert_close(out_of(fn(merged, input_ids=ids)), out, "merge vs inject")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        peft_merged = pm.merge_and_unload().state_dict()
    for k in merged:
        if any(f".{t}." in k for t in tm) and k.endswith(".bias"):
            assert merged[k] is not params[k]
            assert_close(merged[k], peft_merged[k], k)

    b = perturb_af(af.init(fn, af.LoraConfig(init_lora_weights=False, **kw), generator=gen(2)))
    out_b = out_of(af.inject(fn, b)(params, input_ids=ids))
    af.save(b, tmp_path / "af")
    with torch.no_grad():
        assert_close(out_b, out_of(from_pretrained(build, tmp_path / "af")(input_ids=ids)), "adaptfn -> PEFT")
    assert shapes(af.state_dict(b)) == shapes(get_peft_model_state_dict(make_peft(build, **kw)))


# -- the layout of square weights: from the model, never from the file's flag ---------------------------------
def test_mixed_model_lora_merges_as_it_injects_whatever_the_file_says(tmp_path) -> None:
    pm = make_peft(mixed, r=3, lora_alpha=4, target_modules=MIXED_TARGETS)
    ids = mixed_ids()
    with torch.no_grad():
        ref = out_of(pm(input_ids=ids))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        peft_merged = pm.merge_and_unload().state_dict()
    fn, params = af.functional(mixed())
    for flag in (cfg["fan_in_fan_out"], not cfg["fan_in_fan_out"]):  # PEFT's own flag, and the other one
        cfg["fan_in_fan_out"] = flag
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        a = af.load(tmp_path)
        with torch.no_grad():
            out = out_of(af.inject(fn, a)(params, input_ids=ids))
            merged = af.merge(params, a)
            assert_close(out, ref, f"inject (fan_in_fan_out={flag})")
            assert_close(out_of(fn(merged, input_ids=ids)), out, f"merge vs inject (fan_in_fan_out={flag})")
            twice = af.merge(merged, a)  # merged weights keep their layout
            assert_close(out_of(fn(twice, input_ids=ids)), out_of(fn(af.merge(params, af.select(
                {"x": a, "y": a}, ["x", "y"])), input_ids=ids)), "merge of a merge")
        for k, w in _weights(peft_merged, MIXED_TARGETS).items():
            assert_close(merged[k], w, f"{k} (fan_in_fan_out={flag})")


@pytest.mark.parametrize("build,tm,flag", [(tiny_opt, ["q_proj", "out_proj", "fc1"], True),
                                           (tiny_gpt2, ["c_attn", "c_proj"], False)], ids=["opt-true", "gpt2-false"])
def test_a_wrong_fan_in_fan_out_in_the_file_changes_nothing(build, tm, flag, tmp_path) -> None:
    """PEFT resets the flag from the module type with a warning; adaptfn reads the layout from the model."""
    pm = make_peft(build, r=2, lora_alpha=4, target_modules=tm)
    ids = ids_for(pm.get_base_model())
    with torch.no_grad():
        ref = out_of(pm(input_ids=ids))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = flag
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    a = af.load(tmp_path)
    fn, params = af.functional(build())
    with torch.no_grad():
        assert_close(out_of(af.inject(fn, a)(params, input_ids=ids)), ref)
        assert_close(out_of(fn(af.merge(params, a), input_ids=ids)), ref, "merge")
        assert_close(out_of(from_pretrained(build, tmp_path)(input_ids=ids)), ref, "PEFT reading the edited file")
    cfg["fan_in_fan_out"] = "no"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(af.ConfigError, match="fan_in_fan_out"):
        af.load(tmp_path)


# -- merges of half-precision bases round once, as PEFT's ---------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "adalora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_merge_rounds_once_like_peft(method: str, dtype: torch.dtype, tmp_path) -> None:
    tm = ["q_proj", "fc1"]
    if method == "adalora":
        cfg = peft.AdaLoraConfig(init_r=3, target_r=2, total_step=10, lora_alpha=6, target_modules=tm,
                                 init_lora_weights=False)
    else:
        cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=tm, init_lora_weights=False,
                              use_dora=method == "dora")

    def build() -> torch.nn.Module:
        return tiny_opt().to(dtype)

    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build(), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and "lora_" in name:  # (PEFT's fp16 AdaLoRA makes ranknum a trainable copy)
                p.mul_(3.0)
    pm.save_pretrained(tmp_path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        peft_merged = pm.merge_and_unload().state_dict()
    fn, params = af.functional(build())
    merged = af.merge(params, af.load(tmp_path))
    for k, w in _weights(peft_merged, tm).items():
        assert merged[k].dtype == dtype
        base = params[k].float()
        err = ((merged[k].float() - w.float()).abs().max() / (w.float() - base).abs().max()).item()
        assert err <= 1e-6, f"{k}: {err:.3e}"


# -- PEFT's task types add their heads to modules_to_save ------------------------------------------------------
def _bert(task: str) -> torch.nn.Module:
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
    )

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=71, hidden_size=18, num_hidden_layers=2, intermediate_size=29, num_attention_heads=2,
                     max_position_embeddings=64, num_labels=2 if task == "QUESTION_ANS" else 3,
                     attn_implementation="eager")
    cls = {"SEQ_CLS": BertForSequenceClassification, "TOKEN_CLS": BertForTokenClassification,
           "QUESTION_ANS": BertForQuestionAnswering}[task]
    return cls(cfg).eval()


@pytest.mark.parametrize("task,head", [("SEQ_CLS", "classifier"), ("TOKEN_CLS", "classifier"),
                                       ("QUESTION_ANS", "qa_outputs")])
def test_task_type_heads_are_saved_as_peft_expects(task: str, head: str, tmp_path) -> None:
    model = _bert(task)
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type=task,
                                  init_lora_weights=False), generator=gen(0))
    assert head in a.config.modules_to_save and head in a.paths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_bert(task), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                              task_type=task))
    assert set(pm.peft_config["default"].modules_to_save) == set(a.config.modules_to_save)
    assert set(af.state_dict(a)) == set(get_peft_model_state_dict(pm))
    a = af.tree.map(lambda t: t + 0.1 if t.dim() else t, a)  # the head trained too
    ids = ids_for(model)
    out = af.inject(fn, a)(params, input_ids=ids)
    af.save(a, tmp_path)
    pm2 = from_pretrained(lambda: _bert(task), tmp_path)
    with torch.no_grad():
        ref = pm2(input_ids=ids)
    for key in ("logits",) if task != "QUESTION_ANS" else ("start_logits", "end_logits"):
        assert_close(getattr(out, key).detach(), getattr(ref, key), key)


# -- PEFT's config fields -------------------------------------------------------------------------------------
@pytest.mark.parametrize("peft_cls,af_cls", [(peft.LoraConfig, af.LoraConfig), (peft.AdaLoraConfig, af.AdaLoraConfig),
                                             (peft.IA3Config, af.IA3Config)], ids=["lora", "adalora", "ia3"])
def test_every_peft_field_at_its_default_is_accepted(peft_cls, af_cls) -> None:
    import dataclasses
    import enum

    kw = {"total_step": 10} if peft_cls is peft.AdaLoraConfig else {}
    ref = peft_cls(**kw)
    fields = {f.name: getattr(ref, f.name) for f in dataclasses.fields(peft_cls)}
    fields = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in fields.items()}
    cfg = af_cls(**fields)
    assert cfg.to_dict()["peft_type"] == ref.peft_type.value
    for name in getattr(af_cls, "unsupported", {}):
        assert name in cfg.to_dict()  # kept for the round trip


def test_from_state_dict_takes_a_peft_dora_config_object() -> None:
    pm = make_peft(tiny_opt, r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    a = af.from_state_dict(get_peft_model_state_dict(pm), pm.peft_config["default"])
    assert a.config.use_dora and all("lora_magnitude" in a.leaves(p) for p in a.paths)
    with pytest.raises(af.ConfigError, match="kasa_config"):
        af.from_state_dict(get_peft_model_state_dict(pm), {**pm.peft_config["default"].to_dict(),
                                                           "peft_type": "LORA", "kasa_config": {"k": 1}})


def test_saved_adapter_config_names_use_dora(tmp_path) -> None:
    fn, _ = af.functional(tiny_opt())
    af.save(af.init(fn, af.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), generator=gen(0)), tmp_path)
    cfg = json.loads(open(os.path.join(tmp_path, "adapter_config.json")).read())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA"
