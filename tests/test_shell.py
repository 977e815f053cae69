"""AdapterModel (transformers' PeftAdapterMixin and PeftModel's API on the functional core) and
af.from_pretrained, each method checked against the real ``peft.PeftModel`` on the same tiny OPT and the
same adapter files, with the defaults users have."""

from __future__ import annotations

import copy
import inspect
import io
import os
import warnings

import pytest
import torch
from conftest import assert_close, gen, ids_for, rel_err, tiny_opt

import adaptfn as af

peft = pytest.importorskip("peft")


# -- helpers -------------------------------------------------------------------------------------------------
def _peft_dir(model, folder, seed: int, targets=("q_proj", "v_proj"), r: int = 4, alpha: int = 8, **kw) -> str:
    """Save a PEFT LoRA adapter with random A and B (and perturbed modules_to_save copies)."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **kw)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=gen(seed)) * 0.1)
    pm.save_pretrained(str(folder))
    return str(folder)


def _logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def _grad_names(am) -> set[str]:
    return {n for n, p in am.named_parameters() if p.requires_grad}


def _snapshot(am) -> tuple:
    """Everything a refused call must leave as it was."""
    return (list(am.peft_config), am.active_adapters(), sorted(_grad_names(am)), am.get_model_status().enabled,
            {k: v.clone() for k, v in am.state_dict().items()})


def _same_snapshot(a: tuple, b: tuple) -> None:
    assert a[:4] == b[:4]
    assert a[4].keys() == b[4].keys() and all(torch.equal(a[4][k], b[4][k]) for k in a[4])


def _status_fields(s, peft_names: bool = False) -> dict:
    d = {k: v for k, v in vars(s).items() if k != "adapter_model_type"}
    if peft_names:  # PEFT's layer names are the module path after its tuner's "model."
        d["name"] = d["name"].removeprefix("model.")
    return d


def _pair(model, dirs: dict[str, str], trainable: bool = False):
    """The same adapters loaded in PeftModel and in AdapterModel (first one active)."""
    names = list(dirs)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), dirs[names[0]], adapter_name=names[0],
                                        is_trainable=trainable).eval()
    am = af.AdapterModel(copy.deepcopy(model)).eval()
    for n in names:
        if n != names[0]:
            pm.load_adapter(dirs[n], adapter_name=n, is_trainable=trainable)
        am.load_adapter(dirs[n], adapter_name=n, is_trainable=trainable)
    return pm, am


# -- the per-base-class subclass: what the Trainer inspects ---------------------------------------------------
def test_forward_signature_at_instance_and_class_is_the_base_models() -> None:
    from transformers import BertConfig, BertForQuestionAnswering
    from transformers.utils.generic import can_return_loss, find_labels

    model = tiny_opt()
    am = af.AdapterModel(model)
    assert isinstance(am, af.AdapterModel) and type(am) is not af.AdapterModel
    assert "OPTForCausalLM" in type(am).__name__
    assert type(af.AdapterModel(tiny_opt(1))) is type(am)  # one cached subclass per base class
    assert inspect.signature(am.forward) == inspect.signature(model.forward)
    assert inspect.signature(type(am).forward) == inspect.signature(type(model).forward)
    assert find_labels(type(am)) == find_labels(type(model)) == ["labels"]
    assert can_return_loss(type(am)) == can_return_loss(type(model))
    assert am.accepts_loss_kwargs is True  # OPT's forward takes **kwargs, so the Trainer passes num_items_in_batch
    assert am.get_base_model() is model and am.config is model.config
    assert am.device == model.device and am.generation_config is model.generation_config  # read from the base
    qa = BertForQuestionAnswering(BertConfig(vocab_size=31, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=11, max_position_embeddings=16))
    qa_am = af.AdapterModel(qa)
    assert "QuestionAnswering" in type(qa_am).__name__
    assert find_labels(type(qa_am)) == find_labels(type(qa)) == ["start_positions", "end_positions"]
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"]))
    assert type(pm.get_base_model()) is type(am.get_base_model())


def test_deepcopy_and_pickle_keep_adapters_state_and_class() -> None:
    model = tiny_opt()
    ids = ids_for(model)
    am = af.AdapterModel(copy.deepcopy(model)).eval()
    am.add_adapter(af.LoraConfig(r=3, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
                   "x", generator=gen(0))
    am.add_adapter(af.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False), "y", generator=gen(1))
    am.set_adapter(["x", "y"])
    want = _logits(am, ids)
    am.merge_adapter(["y"])
    for other in (copy.deepcopy(am), _torch_roundtrip(am)):
        assert type(other) is type(am) and isinstance(other, af.AdapterModel)
        assert other.active_adapters() == ["x", "y"] and other.get_model_status().merged_adapters == ["y"]
        assert _grad_names(other) == _grad_names(am)
        torch.testing.assert_close(_logits(other, ids), want, rtol=1e-5, atol=1e-6)
        other.unmerge_adapter()  # the copy's own originals come back
        assert all(torch.equal(a, b) for a, b in zip(other.base_model.state_dict().values(),
                                                     model.state_dict().values()))
        assert am.get_model_status().merged_adapters == ["y"]  # the original is untouched


def _torch_roundtrip(am):
    buf = io.BytesIO()
    torch.save(am, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_module_conversions_reach_adapters_and_merged_state(tmp_path) -> None:
    model = tiny_opt()
    ids = ids_for(model)
    d = _peft_dir(model, tmp_path / "a", 1, targets=("q_proj", "fc1"), modules_to_save=["lm_head"])
    pm, am = _pair(model, {"a": d})
    am.add_adapter(af.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False), "head", generator=gen(2))
    am.set_adapter("a")
    am.merge_adapter(["head"])
    am.double()
    pm.double()
    out = _logits(am, ids)
    assert out.dtype == torch.float64 and {p.dtype for p in am.parameters()} == {torch.float64}
    assert_close(out, _logits(pm, ids))
    am.unmerge_adapter()  # the originals kept aside were converted too
    assert {t.dtype for t in am.base_model.state_dict().values() if t.is_floating_point()} == {torch.float64}
    assert all(torch.equal(v, model.state_dict()[k].double()) for k, v in am.base_model.state_dict().items())
    assert_close(_logits(am, ids), _logits(pm, ids))


# -- issue 1: save_pretrained writes the active adapter at the root ------------------------------------------
def test_save_pretrained_root_is_the_active_adapter(tmp_path) -> None:
    from transformers import OPTForCausalLM

    base_dir = str(tmp_path / "base")
    tiny_opt().save_pretrained(base_dir)
    model = OPTForCausalLM.from_pretrained(base_dir).eval()
    ids = ids_for(model)
    am = af.AdapterModel(copy.deepcopy(model)).eval()
    am.add_adapter(af.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False), "one", generator=gen(1))
    am.add_adapter(af.LoraConfig(r=2, target_modules=["v_proj", "fc2"], init_lora_weights=False), "two",
                   generator=gen(2))
    outs = {}
    for name in ("one", "two"):
        am.set_adapter(name)
        outs[name] = _logits(am, ids)
    am.set_adapter("two")
    am.save_pretrained(str(tmp_path / "s"))
    saved = tmp_path / "s"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(saved))
    assert [p for p in os.listdir(saved) if (saved / p).is_dir()] == ["one"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "s")).eval()
    assert_close(_logits(pm, ids), outs["two"])
    assert_close(_logits(af.from_pretrained(str(tmp_path / "s")), ids), outs["two"])
    sub = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "s"), subfolder="one").eval()
    assert_close(_logits(sub, ids), outs["one"])

    am.set_adapter(["one", "two"])
    with pytest.raises(af.ConfigError, match="^save_pretrained: several adapters are active"):
        am.save_pretrained(str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m")
    am.save_pretrained(str(tmp_path / "m"), selected_adapters=["one", "two"])
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "m")).eval()
    assert_close(_logits(pm, ids), outs["one"])
    assert_close(_logits(af.from_pretrained(str(tmp_path / "m"), subfolder="two"), ids), outs["two"])
    with pytest.raises(af.ConfigError, match="^save_pretrained: safe_serialization"):
        am.save_pretrained(str(tmp_path / "p"), selected_adapters=["one"], safe_serialization=False)
    with pytest.raises(af.ConfigError, match="^save_pretrained: selected_adapters"):
        am.save_pretrained(str(tmp_path / "p"), selected_adapters="one")
    with pytest.raises(af.ConfigError, match="^save_pretrained: unsupported argument.*max_shard_size"):
        am.save_pretrained(str(tmp_path / "p"), max_shard_size="1GB")
    assert not os.path.exists(tmp_path / "p")


# -- issue 2: the Trainer with its defaults ------------------------------------------------------------------
def test_trainer_with_default_arguments_trains_evaluates_and_saves(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    model = tiny_opt()
    am = af.AdapterModel(copy.deepcopy(model))
    am.add_adapter(af.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc1"],
                                 modules_to_save=["lm_head"]), generator=gen(8))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 20, (12,), generator=g) for _ in range(4)]  # a few sequences to memorise
    # a column the model does not take: the default remove_unused_columns=True must drop it, and only it
    train = [{"input_ids": seqs[i % 4], "labels": seqs[i % 4].clone(), "source": i} for i in range(32)]
    evals = [{"input_ids": s, "labels": s.clone()} for s in seqs]
    # TrainingArguments' defaults except where to write, no reporting, the CPU, and the run's sizes
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True,
                             per_device_train_batch_size=8, per_device_eval_batch_size=4, num_train_epochs=4,
                             learning_rate=1e-2, logging_steps=4)
    assert args.remove_unused_columns is True and args.label_names is None
    trainer = Trainer(model=am, args=args, train_dataset=train, eval_dataset=evals)
    assert trainer.label_names == ["labels"]
    assert trainer.model_accepts_loss_kwargs == Trainer(model=copy.deepcopy(model), args=args).model_accepts_loss_kwargs
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < losses[0] * 0.8, losses
    after = trainer.evaluate()
    assert after["eval_loss"] < before * 0.8
    am.eval()
    batch = {k: torch.stack([e[k] for e in evals]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        direct = am(**batch).loss.item()
    assert abs(after["eval_loss"] - direct) <= 1e-5 * abs(direct)
    # the Trainer's own checkpoint (safetensors of state_dict()) loads back into a fresh AdapterModel
    import safetensors.torch

    ckpts = sorted(p for p in os.listdir(tmp_path / "run") if p.startswith("checkpoint-"))
    sd = safetensors.torch.load_file(str(tmp_path / "run" / ckpts[-1] / "model.safetensors"))
    again = af.AdapterModel(copy.deepcopy(model)).eval()
    again.add_adapter(af.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc1"],
                                    modules_to_save=["lm_head"]), generator=gen(9))
    assert not again.load_state_dict(sd, strict=True).missing_keys
    ids = ids_for(model)
    assert_close(_logits(again, ids), _logits(am, ids))
    am.save_pretrained(str(tmp_path / "out"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "out")).eval()
    assert_close(_logits(pm, ids), _logits(am, ids))
    assert rel_err(_logits(am, ids), _logits(model, ids)) > 1e-3


# -- adding and loading --------------------------------------------------------------------------------------
def test_add_adapter_is_active_and_trainable_like_the_mixin(tmp_path) -> None:
    model = tiny_opt()
    ids = ids_for(model)
    am = af.AdapterModel(copy.deepcopy(model)).eval()
    am.add_adapter(af.LoraConfig(r=3, target_modules=["q_proj"], modules_to_save=["lm_head"]), "x", generator=gen(0))
    assert am.active_adapters() == ["x"] and am.active_adapter == "x"
    am.add_adapter(peft.LoraConfig(r=2, target_modules=["fc1"]), generator=gen(1))  # a peft config, name "default"
    assert am.active_adapters() == ["default"]
    assert {n.split(".")[1] for n in _grad_names(am)} == {"default"}
    assert not any(p.requires_grad for p in am.base_model.parameters())
    # PeftModel with the same adapters, the second one added and set active
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=3, target_modules=["q_proj"],
                                                                   modules_to_save=["lm_head"]), adapter_name="x")
    pm.add_adapter("default", peft.LoraConfig(r=2, target_modules=["fc1"]))
    pm.set_adapter("default")
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert torch.equal(_logits(am, ids), _logits(model, ids))  # fresh LoRA: B = 0
    with pytest.raises(af.ConfigError, match="^add_adapter: an adapter named 'x' exists"):
        am.add_adapter(af.LoraConfig(target_modules=["q_proj"]), "x")
    with pytest.raises(af.ConfigError, match="^add_adapter: adapter_config is the str"):
        am.add_adapter("z", af.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(af.ConfigError, match="^add_adapter: adapter_name must be a str"):
        am.add_adapter(af.LoraConfig(target_modules=["q_proj"]), 3)
    with pytest.raises(af.ConfigError, match="^add_adapter: generator"):
        am.add_adapter(af.LoraConfig(target_modules=["q_proj"]), "z", generator=0)
    assert list(am.peft_config) == ["x", "default"]


def test_load_adapter_is_frozen_unless_is_trainable(tmp_path) -> None:
    model = tiny_opt()
    da = _peft_dir(model, tmp_path / "a", 1, modules_to_save=["lm_head"])
    db = _peft_dir(model, tmp_path / "b", 2, targets=("fc1",))
    pm, am = _pair(model, {"a": da, "b": db})
    assert _grad_names(am) == set()
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert am.get_nb_trainable_parameters()[0] == 0
    am.set_adapter("b", inference_mode=True)
    pm.set_adapter("b", inference_mode=True)
    assert _grad_names(am) == set() and pm.get_nb_trainable_parameters()[0] == 0
    am.set_adapter("b")  # as PeftModel: activating an adapter makes it trainable unless inference_mode=True
    pm.set_adapter("b")
    assert _grad_names(am) and all(n.startswith("adapter_params.b.") for n in _grad_names(am))
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    am.set_requires_grad("b", False)
    pm.set_requires_grad("b", False)
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    am.set_requires_grad("b")
    pm.set_requires_grad("b")
    assert _grad_names(am) and all(n.startswith("adapter_params.b.") for n in _grad_names(am))
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    am.set_requires_grad(["a", "b"], False)
    pm.set_requires_grad(["a", "b"], False)
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    # is_trainable=True: trainable, with PeftModel's counts
    pm, am = _pair(model, {"a": da, "b": db}, trainable=True)
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    am.set_adapter("b")
    pm.set_adapter("b")
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert all(n.startswith("adapter_params.b.") for n in _grad_names(am))
    am.set_adapter("a", inference_mode=True)
    pm.set_adapter("a", inference_mode=True)
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert _grad_names(am) == set()
    with pytest.raises(af.ConfigError, match="^load_adapter: is_trainable must be True or False, got 'False'"):
        am.load_adapter(da, "c", is_trainable="False")
    assert "c" not in am.peft_config


def test_load_adapter_from_memory_and_state_dict_keys(tmp_path) -> None:
    model = tiny_opt()
    ids = ids_for(model)
    da = _peft_dir(model, tmp_path / "a", 3, targets=("q_proj", "fc2"), modules_to_save=["lm_head"])
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), da).eval()
    sd = peft.get_peft_model_state_dict(pm)
    am = af.AdapterModel(copy.deepcopy(model)).eval()
    am.load_adapter(peft_config=pm.peft_config["default"], adapter_state_dict=sd, adapter_name="mem")
    assert_close(_logits(am, ids), _logits(pm, ids))
    assert not any(t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                   for t in sd.values() for p in am.adapter_params.parameters())  # copied, not shared
    got = am.get_adapter_state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    assert not any(t.requires_grad for t in got.values())
    # transformers' form of the keys (no base_model.model. prefix) and a dict config
    bare = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    am.load_adapter(peft_config=am.peft_config["mem"].to_dict(), adapter_state_dict=bare, adapter_name="bare")
    am.set_adapter("bare")
    assert_close(_logits(am, ids), _logits(pm, ids))
    with pytest.raises(af.ConfigError, match="^load_adapter: loading from memory needs both"):
        am.load_adapter(adapter_state_dict=sd, adapter_name="half")
    with pytest.raises(af.ConfigError, match="^load_adapter: revision only apply"):
        am.load_adapter(peft_config=pm.peft_config["default"], adapter_state_dict=sd, adapter_name="r", revision="v1")
    with pytest.raises(af.ConfigError, match="^load_adapter: state_dict entries|^load_adapter: .*str -> Tensor"):
        am.load_adapter(peft_config=pm.peft_config["default"], adapter_state_dict={"x": 1}, adapter_name="bad")
    assert list(am.peft_config) == ["mem", "bare"]


def test_load_adapter_hotswap_replaces_weights_in_place(tmp_path) -> None:
    model = tiny_opt()
    ids = ids_for(model)
    d1 = _peft_dir(model, tmp_path / "1", 4)
    d2 = _peft_dir(model, tmp_path / "2", 5)
    d_rank = _peft_dir(model, tmp_path / "r", 6, r=8)
    d_targets = _peft_dir(model, tmp_path / "t", 7, targets=("q_proj",))
    am = af.AdapterModel(copy.deepcopy(model)).eval()
    am.load_adapter(d1)
    params = dict(am.adapter_params["default"].named_parameters())
    am.load_adapter(d2, hotswap=True)
    assert dict(am.adapter_params["default"].named_parameters()) == params  # the same objects, new values
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), d1).eval()
    from peft.utils.hotswap import hotswap_adapter

    hotswap_adapter(pm, d2, adapter_name="default")
    assert_close(_logits(am, ids), _logits(pm, ids))
    assert_close(_logits(am, ids), _logits(peft.PeftModel.from_pretrained(copy.deepcopy(model), d2).eval(), ids))
    before = _snapshot(am)
    with pytest.raises(af.ConfigError, match=r"^load_adapter: hotswap=True .* rank of .* differs \(4 vs 8\)"):
        am.load_adapter(d_rank, hotswap=True)
    with pytest.raises(af.ConfigError, match="^load_adapter: hotswap=True .* targets differ"):
        am.load_adapter(d_targets, hotswap=True)
    with pytest.raises(af.ConfigError, match="^load_adapter: hotswap=True .* no adapter named 'other'"):
        am.load_adapter(d2, "other", hotswap=True)
    _same_snapshot(before, _snapshot(am))


def test_load_adapter_device_map_and_inapplicable_arguments(tmp_path) -> None:
    model = tiny_opt()
    ids = ids_for(model)
    da = _peft_dir(model, tmp_path / "a", 8)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), da, low_cpu_mem_usage=True).eval()
    am = af.AdapterModel(copy.deepcopy(model)).eval()
    for i, dm in enumerate(("cpu", {"": "cpu"}, torch.device("cpu"), None, "auto")):  # "auto": where the module is
        am.load_adapter(da, f"d{i}", device_map=dm, low_cpu_mem_usage=True)
        am.set_adapter(f"d{i}")
        assert_close(_logits(am, ids), _logits(pm, ids))
        assert am.get_model_status().devices == {f"d{j}": ["cpu"] for j in range(i + 1)}
    before = _snapshot(am)
    bad = [
        (dict(device_map={"model.decoder": "cpu", "lm_head": "cpu"}), "device_map=.* several devices"),
        (dict(device_map="bogus"), "device_map='bogus' is not a usable device"),
        (dict(device_map=True), "device_map must be"),
        (dict(hotswap="yes"), "hotswap must be"),
        (dict(low_cpu_mem_usage=1), "low_cpu_mem_usage must be True or False"),
        (dict(local_files_only="no"), "local_files_only must be True or False"),
        (dict(revision=3), "revision must be a str"),
        (dict(autocast_adapter_dtype=False), "unsupported argument.*autocast_adapter_dtype"),
        (dict(adapter_kwargs={"force_download": True}), "adapter_kwargs: unsupported key.*force_download"),
        (dict(adapter_kwargs={"revision": "a"}, revision="b"), "revision is given twice"),
        (dict(adapter_name="d0"), "an adapter named 'd0' exists"),
        (dict(adapter_name="a.b"), "adapter_name='a.b' cannot name an adapter"),
        (dict(adapter_name=7), "adapter_name must be a str"),
        (dict(peft_model_id=None), "pass peft_model_id"),
        (dict(peft_model_id=str(tmp_path / "missing")), "not found|neither an adapter folder"),
    ]
    for kw, msg in bad:
        kw = {"peft_model_id": da, "adapter_name": "new", **kw}
        with pytest.raises(af.AdaptfnError, match="^load_adapter: .*(?:" + msg + ")"):
            am.load_adapter(**kw)
        _same_snapshot(before, _snapshot(am))
    am.load_adapter(model_id=da, adapter_name="peft_names", torch_device="cpu")  # PeftModel's argument names
    assert "peft_names" in am.peft_config


def test_incompatible_adapter_is_refused_before_any_change(tmp_path) -> None:
    model = tiny_opt()
    other = tiny_opt(hidden=26)
    d = _peft_dir(other, tmp_path / "o", 9)
    am = af.AdapterModel(copy.deepcopy(model))
    am.add_adapter(af.LoraConfig(target_modules=["q_proj"]), "x", generator=gen(0))
    before = _snapshot(am)
    with pytest.raises(af.IncompatibleAdapterError, match="^load_adapter: "):
        am.load_adapter(d, "o")
    with pytest.raises(af.IncompatibleAdapterError, match="^add_adapter: .*no_such_module"):
        am.add_adapter(af.LoraConfig(target_modules=["no_such_module"]), "n")
    _same_snapshot(before, _snapshot(am))


# -- switching, enabling, deleting ---------------------------------------------------------------------------
def test_stateful_flow_matches_peft(tmp_path) -> None:
    model = tiny_opt()
    ids = ids_for(model)
    # the same targets for all three: when the active adapter is deleted, PEFT picks the next one per layer
    da, db, dc = (_peft_dir(model, tmp_path / n, s, targets=("q_proj", "fc1")) for n, s in zip("abc", (1, 2, 3)))
    pm, am = _pair(model, {"a": da, "b": db, "c": dc})
    assert am.active_adapters() == ["a"] == pm.active_adapters and am.active_adapter == pm.active_adapter == "a"
    assert list(am.peft_config) == list(pm.peft_config)
    for n in am.peft_config:
        ours, theirs = am.peft_config[n].to_dict(), pm.peft_config[n].to_dict()
        assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
        assert (ours["r"], ours["lora_alpha"], ours["peft_type"]) == (theirs["r"], theirs["lora_alpha"], "LORA")

    def same():
        assert_close(_logits(am, ids), _logits(pm, ids))

    same()
    am.set_adapter("b")
    pm.set_adapter("b")
    same()
    am.set_adapter(["a", "b"])
    pm.base_model.set_adapter(["a", "b"])
    assert am.active_adapters() == ["a", "b"] == pm.active_adapters
    same()
    am.disable_adapters()
    with pm.disable_adapter():
        same()
    assert torch.equal(_logits(am, ids), _logits(model, ids))
    am.set_adapter("a")  # as PEFT: switching does not re-enable
    assert torch.equal(_logits(am, ids), _logits(model, ids))
    am.enable_adapters()
    pm.set_adapter("a")
    same()
    with am.disable_adapter(), pm.disable_adapter():
        same()
        assert torch.equal(_logits(am, ids), _logits(model, ids))
    same()
    # deleting: names checked first; the active one deleted -> the first remaining (sorted), as PEFT
    with pytest.raises(af.ConfigError, match="^delete_adapter: adapter_names: no adapter named 'zz'"):
        am.delete_adapter(["b", "zz"])
    assert list(am.peft_config) == ["a", "b", "c"]
    with pytest.warns(UserWarning, match="Adapter a was active which is now deleted. Setting active adapter to b"):
        am.delete_adapter("a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.delete_adapter("a")
    assert am.active_adapters() == ["b"]
    same()
    am.delete_adapter(["b", "c"])
    assert am.peft_config == {} and am.active_adapters() == []
    assert torch.equal(_logits(am, ids), _logits(model, ids))
    with pytest.raises(af.ConfigError, match="^set_adapter: adapter_name: no adapter named 'b'"):
        am.set_adapter("b")


def test_disable_adapter_context_restores_state_on_exceptions() -> None:
    am = af.AdapterModel(tiny_opt())
    am.add_adapter(af.LoraConfig(target_modules=["q_proj"]), "x", generator=gen(0))
    am.add_adapter(af.LoraConfig(target_modules=["v_proj"]), "y", generator=gen(1))
    am.set_requires_grad("x", True)  # a custom mix PEFT's set_adapter would not restore
    grads = _grad_names(am)
    with pytest.raises(RuntimeError, match="boom"), am.disable_adapter():
        assert _grad_names(am) == set() and am.get_model_status().enabled is False
        raise RuntimeError("boom")
    assert am.get_model_status().enabled is True and _grad_names(am) == grads
    am.disable_adapters()
    with am.disable_adapter():
        pass
    assert am.get_model_status().enabled is False  # was disabled before: stays disabled


# -- counting and status -------------------------------------------------------------------------------------
def test_trainable_parameter_counts_match_peft(tmp_path, capsys) -> None:
    model = tiny_opt()
    da = _peft_dir(model, tmp_path / "a", 1, modules_to_save=["lm_head"])
    cfg = dict(r=3, target_modules=["q_proj", "fc2"], modules_to_save=["lm_head"])
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), da)  # frozen, with a modules_to_save copy
    pm.add_adapter("new", peft.LoraConfig(**cfg))
    pm.set_adapter("new")
    am = af.AdapterModel(copy.deepcopy(model))
    am.load_adapter(da)
    am.add_adapter(af.LoraConfig(**cfg), "new", generator=gen(0))
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    trainable = {n for n in _grad_names(am)}
    assert trainable and all(n.startswith("adapter_params.new.") for n in trainable)
    am.print_trainable_parameters()
    pm.print_trainable_parameters()
    mine, theirs = capsys.readouterr().out.splitlines()
    assert mine == theirs and mine.startswith("trainable params: ")
    with am.disable_adapter(), pm.disable_adapter():
        assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("kw", [dict(bias="all"), dict(bias="lora_only"), dict(modules_to_save=["lm_head"]),
                                dict(bias="all", modules_to_save=["fc2"])], ids=["bias=all", "bias=lora_only",
                                                                            "mts=lm_head", "bias+mts"])
def test_counts_with_trained_biases_and_merges_match_peft(kw) -> None:
    """PEFT trains bias="all"/"lora_only" biases in the base layer (counted once) and keeps its total while
    merged (a merge that unties lm_head adds no parameter)."""
    model = tiny_opt()
    cfg = dict(r=2, target_modules=["q_proj", "v_proj"], **kw)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    am = af.AdapterModel(copy.deepcopy(model))
    am.add_adapter(af.LoraConfig(**cfg))
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    am.merge_adapter()
    pm.merge_adapter()
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()


def test_ia3_and_adalora_counts_and_layer_types_match_peft(tmp_path) -> None:
    model = tiny_opt()
    for cfg_cls, kw in ((peft.IA3Config, dict(target_modules=["q_proj", "fc2"], feedforward_modules=["fc2"])),
                        (peft.AdaLoraConfig, dict(target_modules=["q_proj", "fc2"], init_r=3, target_r=2,
                                                  total_step=10))):
        pm = peft.get_peft_model(copy.deepcopy(model), cfg_cls(**kw))
        pm.save_pretrained(str(tmp_path / cfg_cls.__name__))
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / cfg_cls.__name__),
                                            is_trainable=True)
        am = af.AdapterModel(copy.deepcopy(model))
        am.load_adapter(str(tmp_path / cfg_cls.__name__), is_trainable=True)
        assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters(), cfg_cls.__name__
        assert [s.module_type for s in am.get_layer_status()] == [s.module_type for s in pm.get_layer_status()]


def test_load_state_dict_assign_reties_and_refreshes(tmp_path) -> None:
    model = tiny_opt()
    ids = ids_for(model)
    am = af.AdapterModel(copy.deepcopy(model))
    am.add_adapter(af.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), generator=gen(0))
    other = af.AdapterModel(tiny_opt(seed=5))
    other.add_adapter(af.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), generator=gen(1))
    want = _logits(other, ids)
    for assign in (False, True):
        am.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=assign)  # strict
        base = am.get_base_model()
        assert base.lm_head.weight is base.model.decoder.embed_tokens.weight  # still tied
        torch.testing.assert_close(_logits(am, ids), want, rtol=0, atol=0)


def test_model_and_layer_status_match_peft(tmp_path) -> None:
    model = tiny_opt()
    da = _peft_dir(model, tmp_path / "a", 1, modules_to_save=["lm_head"])
    db = _peft_dir(model, tmp_path / "b", 2, targets=("q_proj", "fc1"))
    pm, am = _pair(model, {"a": da, "b": db}, trainable=True)

    def same():
        ours, theirs = am.get_model_status(), pm.get_model_status()
        assert ours.adapter_model_type == "AdapterModel" and theirs.adapter_model_type == "LoraModel"
        assert _status_fields(ours) == _status_fields(theirs)
        assert [_status_fields(s) for s in am.get_layer_status()] == [_status_fields(s, True)
                                                                      for s in pm.get_layer_status()]

    same()  # several adapters, one active
    am.set_adapter("b")
    pm.set_adapter("b")
    same()  # the modules_to_save layer lists no active adapter; the model's active_adapters reads "irregular"
    am.set_adapter(["a", "b"])
    pm.base_model.set_adapter(["a", "b"])
    same()
    with am.disable_adapter(), pm.disable_adapter():
        same()
    am.set_adapter("b")
    pm.set_adapter("b")
    am.merge_adapter()
    pm.merge_adapter()
    same()  # merged
    am.unmerge_adapter()
    pm.unmerge_adapter()
    same()
    # documented difference: a merged adapter's modules_to_save module is folded in here; PEFT keeps its copy
    am.set_adapter("a")
    am.merge_adapter()
    assert am.get_model_status().merged_adapters == ["a"]
    pm.set_adapter("a")
    pm.merge_adapter()
    assert pm.get_model_status().merged_adapters == "irregular"


def test_quantized_base_counts_status_and_trainer(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, OPTConfig, OPTForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)  # 128 wide: bitsandbytes' 4-bit blocks
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=128, num_hidden_layers=1, ffn_dim=256, num_attention_heads=2,
                             max_position_embeddings=32, word_embed_proj_dim=128)).save_pretrained(str(tmp_path / "b"))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return OPTForCausalLM.from_pretrained(str(tmp_path / "b"), quantization_config=q, device_map="cpu")

    cfg = dict(r=4, target_modules=["q_proj", "v_proj"])
    am = af.AdapterModel(load())
    am.add_adapter(af.LoraConfig(**cfg), generator=gen(0))
    pm = peft.get_peft_model(load(), peft.LoraConfig(**cfg))
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()  # Params4bit counted as PEFT does
    ours, theirs = am.get_model_status(), pm.get_model_status()
    # documented difference: the backend is named, as PEFT's docs describe the field; PEFT 0.21's LoRA layers
    # do not record it (only its OFT/BOFT/VeRA/MiSS/SHiRA layers do), so it reports None
    assert ours.quantization_backend == "bnb 4bit" and theirs.quantization_backend is None
    assert {s.quantization_backend for s in am.get_layer_status()} == {"bnb 4bit"}
    assert _status_fields(ours) | {"quantization_backend": None} == _status_fields(theirs)
    with pytest.raises(af.ConfigError, match="^merge_adapter: .*Params4bit"):
        am.merge_adapter()
    # the Trainer fine-tunes a quantized model only with adapters attached: it sees them here too
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, max_steps=2,
                             per_device_train_batch_size=2)
    data = [{"input_ids": torch.arange(8), "labels": torch.arange(8)}] * 4
    trainer = Trainer(model=am, args=args, train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 2


# -- merging -------------------------------------------------------------------------------------------------
def test_merge_adapter_and_unmerge_restore_the_exact_originals(tmp_path) -> None:
    model = tiny_opt()
    ids = ids_for(model)
    da = _peft_dir(model, tmp_path / "a", 1, targets=("q_proj", "fc2"))
    db = _peft_dir(model, tmp_path / "b", 2, targets=("fc1",), modules_to_save=["lm_head"])  # lm_head: tied
    pm, am = _pair(model, {"a": da, "b": db})
    original = {k: v.clone() for k, v in model.state_dict().items()}
    want = _logits(am, ids)
    am.merge_adapter()
    pm.merge_adapter()
    assert am.get_model_status().merged_adapters == ["a"]
    assert_close(_logits(am, ids), want)  # the merged delta is not added again
    assert_close(_logits(am, ids), _logits(pm, ids))
    assert not torch.equal(am.base_model.model.decoder.layers[0].fc2.weight, model.model.decoder.layers[0].fc2.weight)
    with am.disable_adapter():  # disabled while merged: the base model's original tensors
        assert torch.equal(_logits(am, ids), _logits(model, ids))
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        am.merge_adapter()
    am.unmerge_adapter()
    pm.unmerge_adapter()
    assert_close(_logits(am, ids), _logits(pm, ids))
    state = am.base_model.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in original)  # bit for bit, not by subtraction
    assert am.base_model.lm_head.weight is am.base_model.model.decoder.embed_tokens.weight  # tied again
    assert torch.equal(_logits(am, ids), want)
    with pytest.warns(UserWarning, match="Already unmerged"):
        am.unmerge_adapter()
    # named adapters, and several active with one of them merged
    am.set_adapter(["a", "b"])
    pm.base_model.set_adapter(["a", "b"])
    want2 = _logits(pm, ids)
    am.merge_adapter(["b"])
    pm.merge_adapter(["b"])
    assert_close(_logits(am, ids), want2)
    assert_close(_logits(am, ids), _logits(pm, ids))
    with pytest.warns(UserWarning, match="unmerging them first"):
        am.set_adapter("a")
    assert not am.get_model_status().merged_adapters
    with pytest.raises(af.ConfigError, match="^merge_adapter: adapter_names must be a list"):
        am.merge_adapter("a")
    with pytest.raises(af.ConfigError, match="^merge_adapter: safe_merge must be True or False"):
        am.merge_adapter(safe_merge="yes")
    am.merge_adapter(["b"])
    with pytest.raises(af.ConfigError, match=r"^delete_adapter: cannot delete \['b'\] while merged"):
        am.delete_adapter("b")
    am.unmerge_adapter()
    # LoRA on the tied lm_head: merged, lm_head gets its own tensor (PEFT would write through to embed_tokens
    # as well); unmerged, the two are the same tensor again
    am.add_adapter(af.LoraConfig(r=2, target_modules=["lm_head", "q_proj"], init_lora_weights=False), "head",
                   generator=gen(3))
    want = _logits(am, ids)
    am.merge_adapter()
    assert_close(_logits(am, ids), want)
    assert am.base_model.lm_head.weight is not am.base_model.model.decoder.embed_tokens.weight
    assert torch.equal(am.base_model.model.decoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight)
    am.unmerge_adapter()
    assert am.base_model.lm_head.weight is am.base_model.model.decoder.embed_tokens.weight
    assert all(torch.equal(v, original[k]) for k, v in am.base_model.state_dict().items())
    assert torch.equal(_logits(am, ids), want)


def test_safe_merge_refuses_nan_before_writing(tmp_path) -> None:
    model = tiny_opt()
    da = _peft_dir(model, tmp_path / "a", 1, targets=("q_proj", "v_proj"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), da)
    sd = peft.get_peft_model_state_dict(pm)
    key = next(k for k in sd if "layers.1.self_attn.v_proj.lora_B" in k)
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    am = af.AdapterModel(copy.deepcopy(model))
    am.load_adapter(peft_config=pm.peft_config["default"], adapter_state_dict=sd)
    before = {k: v.clone() for k, v in am.base_model.state_dict().items()}
    peft.set_peft_model_state_dict(pm, sd)
    with pytest.raises(ValueError, match="NaN"):  # PeftModel refuses it too (after merging the layers before it)
        pm.merge_adapter(safe_merge=True)
    for call in (lambda: am.merge_adapter(safe_merge=True), lambda: am.merge_and_unload(safe_merge=True)):
        with pytest.raises(af.IncompatibleAdapterError, match=r"^merge_(adapter|and_unload): .*NaN or Inf.*v_proj"):
            call()
        assert all(torch.equal(v, before[k]) for k, v in am.base_model.state_dict().items())
        assert am.get_model_status().merged_adapters == [] and list(am.peft_config) == ["default"]


def test_merge_and_unload_and_unload_match_peft(tmp_path) -> None:
    model = tiny_opt()
    ids = ids_for(model)
    da = _peft_dir(model, tmp_path / "a", 1, targets=("q_proj", "fc2"), modules_to_save=["lm_head"])
    db = _peft_dir(model, tmp_path / "b", 2, targets=("fc1",))
    for call, kwargs in (("merge_and_unload", {}), ("merge_and_unload", {"adapter_names": ["b"]}),
                         ("merge_and_unload", {"progressbar": True, "safe_merge": True}), ("unload", {})):
        pm, am = _pair(model, {"a": da, "b": db})
        want = _logits(am, ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = getattr(am, call)(**kwargs)
            theirs = getattr(pm, call)(**kwargs)
        assert ours is am.base_model and type(ours) is type(theirs)
        assert_close(_logits(ours, ids), _logits(theirs, ids))
        if call == "merge_and_unload" and not kwargs.get("adapter_names"):
            assert_close(_logits(ours, ids), want)
        # lm_head (modules_to_save of the active "a") no longer shares embed_tokens' tensor, as in PEFT
        assert ours.lm_head.weight is not ours.model.decoder.embed_tokens.weight
        assert torch.equal(ours.model.decoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight)
        assert am.peft_config == {} and am.active_adapters() == []
    assert ours.config.tie_word_embeddings is False


# -- generate and from_pretrained ----------------------------------------------------------------------------
def test_generate_matches_peft(tmp_path) -> None:
    model = tiny_opt()
    ids = ids_for(model, batch=1)
    d = _peft_dir(model, tmp_path, 5, targets=("fc1", "fc2", "q_proj"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), d).eval()
    am = af.AdapterModel(copy.deepcopy(model)).eval()
    am.load_adapter(d)
    kw = dict(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(am.generate(**kw), pm.generate(**kw))


def test_from_pretrained_loads_base_and_frozen_adapter(tmp_path) -> None:
    model = tiny_opt()
    base_dir = str(tmp_path / "base")
    model.save_pretrained(base_dir)
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False,
                                  base_model_name_or_path=base_dir, task_type="CAUSAL_LM"), generator=gen(7))
    af.save(a, str(tmp_path / "ad"))
    ids = ids_for(model)
    am = af.from_pretrained(str(tmp_path / "ad"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ad"))
    assert_close(_logits(am, ids), af.inject(fn, a)(params, input_ids=ids).logits)
    assert_close(_logits(am, ids), _logits(pm, ids))
    assert am.active_adapters() == ["default"] and not am.training
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters() and _grad_names(am) == set()
    am = af.from_pretrained(str(tmp_path / "ad"), adapter_name="mine", is_trainable=True)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ad"), is_trainable=True)
    assert am.active_adapters() == ["mine"]
    assert am.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    with pytest.raises(af.ConfigError, match="^from_pretrained: is_trainable must be True or False, got 'False'"):
        af.from_pretrained(str(tmp_path / "ad"), is_trainable="False")
    with pytest.raises(af.AdapterFileError, match="^from_pretrained: "):
        af.from_pretrained(str(tmp_path / "nothing"))
    # refused before the base model is loaded
    import transformers

    loads = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    class Spy:
        @staticmethod
        def from_pretrained(*a, **k):
            loads.append(1)
            return real(*a, **k)

    for kw, msg in ((dict(adapter_name="a.b"), "adapter_name='a.b' cannot name"),
                    (dict(adapter_name=""), "adapter_name='' cannot name"), (dict(token=5), "token must be"),
                    (dict(cache_dir=5), "cache_dir must be"), (dict(model_cls="x"), "model_cls must be")):
        with pytest.raises(af.ConfigError, match="^from_pretrained: " + msg):
            af.from_pretrained(str(tmp_path / "ad"), **{"model_cls": Spy, **kw})
    assert loads == []


# -- arguments: typed errors that name the method and the argument, before any change -------------------------
def test_bad_arguments_raise_typed_errors_before_any_change(tmp_path) -> None:
    am = af.AdapterModel(tiny_opt())
    with pytest.raises(af.ConfigError, match="^disable_adapters: no adapter loaded"):
        am.disable_adapters()
    with pytest.raises(af.ConfigError, match="^get_model_status: no adapter loaded"):
        am.get_model_status()
    am.add_adapter(af.LoraConfig(target_modules=["q_proj"]), "x", generator=gen(0))
    am.add_adapter(af.LoraConfig(target_modules=["v_proj"]), "y", generator=gen(1))
    before = _snapshot(am)
    calls = [
        (lambda: am.set_adapter([]), "set_adapter: adapter_name is empty"),
        (lambda: am.set_adapter(["x", "x"]), "set_adapter: adapter_name=.* names an adapter twice"),
        (lambda: am.set_adapter(3), "set_adapter: adapter_name must be"),
        (lambda: am.set_adapter("x", inference_mode="no"), "set_adapter: inference_mode must be True or False"),
        (lambda: am.set_requires_grad("x", requires_grad=1), "set_requires_grad: requires_grad must be"),
        (lambda: am.delete_adapter(None), "delete_adapter: adapter_names must be"),
        (lambda: am.get_adapter_state_dict("zz"), "get_adapter_state_dict: adapter_name: no adapter named 'zz'"),
        (lambda: am.get_adapter_state_dict(state_dict={}), "get_adapter_state_dict: state_dict is not supported"),
        (lambda: am.merge_adapter(["zz"]), "merge_adapter: adapter_names: no adapter named 'zz'"),
        (lambda: am.merge_and_unload(progressbar="no"), "merge_and_unload: progressbar must be True or False"),
        (lambda: am.merge_and_unload(adapter_names="x"), "merge_and_unload: adapter_names must be a list"),
        (lambda: am.save_pretrained(3), "save_pretrained: save_directory must be"),
        (lambda: am.save_pretrained(str(tmp_path), is_main_process="yes"), "save_pretrained: is_main_process"),
        (lambda: am.load_adapter(str(tmp_path), "x"), "load_adapter: an adapter named 'x' exists"),
    ]
    for call, msg in calls:
        with pytest.raises(af.ConfigError, match="^" + msg):
            call()
        _same_snapshot(before, _snapshot(am))
    with pytest.raises(af.ConfigError, match="^push_to_hub: private must be"):  # checked before any upload
        am.push_to_hub("user/repo", private="yes")  # (uploads: tests/test_hub.py)
    with pytest.raises(af.ConfigError, match="^enable_peft_hotswap: not supported"):
        am.enable_peft_hotswap(target_rank=16)
    open(tmp_path / "file", "w").close()
    with pytest.raises(af.ConfigError, match="^save_pretrained: save_directory=.* is a file"):
        am.save_pretrained(str(tmp_path / "file"))
    with pytest.raises(af.ConfigError, match="^AdapterModel: model must be a torch.nn.Module"):
        af.AdapterModel("opt")
