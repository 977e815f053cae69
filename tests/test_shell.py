"""AdapterModel (PeftAdapterMixin's API on the functional core) and af.from_pretrained, vs real peft."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import gen, ids_for, tiny_opt

import adaptfn as af


def _peft_adapter(model, folder: str, seed: int, targets=("q_proj", "v_proj")) -> None:
    import peft

    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(model), cfg).save_pretrained(folder)


def test_stateful_flow_matches_peft(tmp_path) -> None:
    import peft

    model = tiny_opt()
    ids = ids_for(model)
    _peft_adapter(model, str(tmp_path / "a"), 1)
    _peft_adapter(model, str(tmp_path / "b"), 2, targets=("fc1",))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a"), adapter_name="a").eval()
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    am = af.AdapterModel(copy.deepcopy(model)).eval()
    am.load_adapter(str(tmp_path / "a"), adapter_name="a")
    am.load_adapter(str(tmp_path / "b"), adapter_name="b")
    assert am.active_adapters() == ["a"]

    def same():
        torch.testing.assert_close(am(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-6)

    same()
    am.set_adapter("b")
    pm.set_adapter("b")
    same()
    am.set_adapter(["a", "b"])
    pm.base_model.set_adapter(["a", "b"])
    same()
    am.disable_adapters()
    with pm.disable_adapter():
        torch.testing.assert_close(am(input_ids=ids).logits, pm(input_ids=ids).logits)
    assert torch.equal(am(input_ids=ids).logits, model(input_ids=ids).logits)
    am.enable_adapters()
    am.set_adapter("a")
    pm.set_adapter("a")
    same()
    am.delete_adapter("b")
    assert sorted(am.peft_config) == ["a"]
    with pytest.raises(af.ConfigError, match="'b'"):
        am.set_adapter("b")


def test_trainable_parameters_are_the_active_adapters_leaves() -> None:
    am = af.AdapterModel(tiny_opt())
    am.add_adapter(af.LoraConfig(r=3, target_modules=["q_proj"], modules_to_save=["lm_head"]), adapter_name="x",
                   generator=gen(0))
    am.add_adapter(af.LoraConfig(r=2, target_modules=["fc1"]), adapter_name="y", generator=gen(1))
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    a = am.adapter("x")
    assert len(trainable) == sum(len([k for k in d if k != "gate"]) for d in a.tensors.values())
    assert all(n.startswith("adapter_params.x.") for n in trainable)
    assert not any(p.requires_grad for p in am.base_model.parameters())
    am.set_adapter("y")
    assert all(n.startswith("adapter_params.y.") for n, p in am.named_parameters() if p.requires_grad)


def test_save_pretrained_layout_loads_in_peft(tmp_path) -> None:
    import peft

    model = tiny_opt()
    ids = ids_for(model)
    am = af.AdapterModel(copy.deepcopy(model)).eval()
    am.add_adapter(af.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False), generator=gen(3))
    am.add_adapter(af.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), adapter_name="other",
                   generator=gen(4))
    am.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "other" / "adapter_config.json")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    pm.load_adapter(str(tmp_path / "other"), adapter_name="other")
    for name in ("default", "other"):
        am.set_adapter(name)
        pm.set_adapter(name)
        torch.testing.assert_close(am(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    sd = am.get_adapter_state_dict("other")
    assert set(sd) == set(peft.get_peft_model_state_dict(pm, adapter_name="other"))


def test_generate_matches_peft(tmp_path) -> None:
    import peft

    model = tiny_opt()
    ids = ids_for(model, batch=1)
    _peft_adapter(model, str(tmp_path), 5, targets=("fc1", "fc2", "q_proj"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    am = af.AdapterModel(copy.deepcopy(model)).eval()
    am.load_adapter(str(tmp_path))
    kw = dict(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(am.generate(**kw), pm.generate(**kw))


def test_merge_and_unload_equals_injected(tmp_path) -> None:
    model = tiny_opt()
    ids = ids_for(model)
    am = af.AdapterModel(copy.deepcopy(model)).eval()
    am.add_adapter(af.LoraConfig(r=3, target_modules=["q_proj", "fc2"], init_lora_weights=False), generator=gen(6))
    want = am(input_ids=ids).logits
    merged = am.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)


def test_from_pretrained_loads_base_and_adapter(tmp_path) -> None:
    model = tiny_opt()
    base_dir = str(tmp_path / "base")
    model.save_pretrained(base_dir)
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False,
                                  base_model_name_or_path=base_dir, task_type="CAUSAL_LM"), generator=gen(7))
    af.save(a, str(tmp_path / "ad"))
    am = af.from_pretrained(str(tmp_path / "ad"))
    ids = ids_for(model)
    torch.testing.assert_close(am(input_ids=ids).logits, af.inject(fn, a)(params, input_ids=ids).logits)
    assert am.active_adapters() == ["default"]


def test_trainer_trains_and_peft_loads_result(tmp_path) -> None:
    import peft
    from transformers import Trainer, TrainingArguments

    model = tiny_opt()
    am = af.AdapterModel(copy.deepcopy(model))
    am.add_adapter(af.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc1"],
                                 modules_to_save=["lm_head"]), generator=gen(8))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 20, (12,), generator=g) for _ in range(4)]  # a few sequences to memorise
    data = [{"input_ids": seqs[i % 4]} for i in range(32)]
    for d in data:
        d["labels"] = d["input_ids"].clone()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, num_train_epochs=4,
                             learning_rate=1e-2, logging_steps=4, report_to=[], save_strategy="no",
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=am, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < losses[0] * 0.8, losses
    am.eval()
    am.save_pretrained(str(tmp_path / "out"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "out")).eval()
    ids = ids_for(model)
    torch.testing.assert_close(am(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert not torch.equal(am(input_ids=ids).logits, model(input_ids=ids).logits)
