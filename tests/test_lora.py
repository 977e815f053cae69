"""LoRA method: config fields and errors, targeting, initialisation (PEFT's distributions), scaling."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen, ids_for, tiny_gpt2, tiny_llama, tiny_opt
from torch import nn

import adaptfn as af


def test_defaults_match_peft() -> None:
    import peft

    ours, theirs = af.LoraConfig(), peft.LoraConfig()
    for field in ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias",
                  "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
                  "rank_pattern", "alpha_pattern", "task_type", "base_model_name_or_path", "revision", "use_dora",
                  "lora_bias"):
        assert getattr(ours, field) == getattr(theirs, field), field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": 2.5}, "r"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"bias": "some"}, "bias"),
        ({"use_dora": "yes"}, "use_dora"),
        ({"lora_bias": True, "use_dora": True}, "lora_bias"),
        ({"lora_bias": True, "init_lora_weights": "gaussian"}, "lora_bias"),
        ({"kasa_config": {"k": 1}}, "kasa_config"),
        ({"target_parameters": "fc1.weight"}, "target_parameters"),
        ({"target_parameters": ["fc1.weight"], "lora_dropout": 0.1}, "lora_dropout"),
        ({"trainable_token_indices": [1, 1]}, "trainable_token_indices"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"alora_invocation_tokens": [5]}, "alora_invocation_tokens"),
        ({"a_typo": 1}, "a_typo"),
        ({"init_lora_weights": "mica"}, "init_lora_weights"),
        ({"init_lora_weights": "pissa_niter_"}, "init_lora_weights"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"target_modules": [1, 2]}, "target_modules"),
    ],
)
def test_bad_config_fields_are_named(kwargs: dict, field: str) -> None:
    with pytest.raises(af.ConfigError, match=field) as e:
        af.LoraConfig(**kwargs)
    assert isinstance(e.value, ValueError) and isinstance(e.value, af.AdaptfnError)


@pytest.mark.parametrize("field,value", [("loftq_config", {"loftq_bits": 4}), ("layer_replication", [[0, 1]]),
                                         ("alora_invocation_tokens", [1, 2]), ("velora_config", {"v": 1})])
def test_unsupported_peft_fields_from_json(field: str, value: object) -> None:
    with pytest.raises(af.ConfigError, match=field):
        af.LoraConfig.from_dict({"peft_type": "LORA", "r": 4, field: value})
    # their "off" values are accepted and kept for the round trip
    cfg = af.LoraConfig.from_dict({"peft_type": "LORA", "r": 4, field: None})
    assert cfg.to_dict()[field] is None


def test_unknown_fields_round_trip() -> None:
    d = {"peft_type": "LORA", "r": 4, "a_future_field": {"x": 1}}
    cfg = af.LoraConfig.from_dict(d)
    assert cfg.r == 4 and cfg.to_dict()["a_future_field"] == {"x": 1}


def test_targets_absent_and_unsupported_types() -> None:
    fn, _ = af.functional(tiny_opt())
    with pytest.raises(af.IncompatibleAdapterError, match="nope"):
        af.init(fn, af.LoraConfig(target_modules=["nope"]))
    with pytest.raises(af.IncompatibleAdapterError, match="LayerNorm"):
        af.init(fn, af.LoraConfig(target_modules=["final_layer_norm"]))
    with pytest.raises(af.IncompatibleAdapterError, match="modules_to_save"):
        af.init(fn, af.LoraConfig(target_modules=["q_proj"], modules_to_save=["no_such_head"]))


def test_target_rules() -> None:
    fn, _ = af.functional(tiny_llama(layers=3))
    a = af.init(fn, af.LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]))
    assert sorted(a.paths) == [f"model.layers.{i}.self_attn.{n}" for i in (0, 2) for n in ("q_proj", "v_proj")]
    a = af.init(fn, af.LoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj"))
    assert sorted(a.paths) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    excl = ["model.layers.0.self_attn.k_proj"]
    a = af.init(fn, af.LoraConfig(target_modules=["q_proj", "k_proj"], exclude_modules=excl))
    assert "model.layers.0.self_attn.k_proj" not in a.paths and "model.layers.1.self_attn.k_proj" in a.paths
    a = af.init(fn, af.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in a.paths and len(a.paths) == 3 * 7
    assert isinstance(a.config.target_modules, list)  # expanded, as PEFT saves it


def test_rank_alpha_pattern_and_rslora_scaling() -> None:
    fn, _ = af.functional(tiny_opt())
    cfg = af.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 6}, alpha_pattern={"layers.1.self_attn.q_proj": 3})
    a = af.init(fn, cfg)
    e = a.entries
    assert e["model.decoder.layers.0.self_attn.q_proj"].scaling == 2.0
    assert e["model.decoder.layers.0.self_attn.v_proj"].r == 6
    assert e["model.decoder.layers.0.self_attn.v_proj"].scaling == pytest.approx(8 / 6)
    assert e["model.decoder.layers.1.self_attn.q_proj"].scaling == pytest.approx(3 / 4)
    assert a.tensors["model.decoder.layers.1.self_attn.v_proj"]["lora_A"].shape == (6, 22)
    rs = af.init(fn, af.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True))
    assert rs.entries["model.decoder.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / math.sqrt(4))


def test_init_distributions_and_determinism() -> None:
    big = nn.Sequential(nn.Linear(301, 211), nn.Embedding(97, 43))
    fn, params = af.functional(big)
    a = af.init(fn, af.LoraConfig(r=16, target_modules=["0", "1"]), generator=gen(3))
    A, B = a.tensors["0"]["lora_A"], a.tensors["0"]["lora_B"]
    assert A.shape == (16, 301) and B.shape == (211, 16)
    bound = 1 / math.sqrt(301)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert A.abs().max() <= bound and A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(B) == 0
    eA, eB = a.tensors["1"]["lora_A"], a.tensors["1"]["lora_B"]
    assert eA.shape == (16, 97) and eB.shape == (43, 16)
    assert torch.count_nonzero(eA) == 0 and eB.std().item() == pytest.approx(1.0, rel=0.1)
    again = af.init(fn, af.LoraConfig(r=16, target_modules=["0", "1"]), generator=gen(3))
    for p in a.paths:
        for n, t in a.tensors[p].items():
            assert torch.equal(t, again.tensors[p][n])
    g = af.init(fn, af.LoraConfig(r=16, target_modules=["0"], init_lora_weights="gaussian"), generator=gen(4))
    assert g.tensors["0"]["lora_A"].std().item() == pytest.approx(1 / 16, rel=0.05)
    f = af.init(fn, af.LoraConfig(r=16, target_modules=["0"], init_lora_weights=False), generator=gen(5))
    fb = f.tensors["0"]["lora_B"]
    assert fb.abs().max() <= 1 / math.sqrt(16) and fb.std().item() == pytest.approx(0.25 / math.sqrt(3), rel=0.1)


def test_fresh_adapter_equals_base() -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    ids = ids_for(model)
    a = af.init(fn, af.LoraConfig(r=4, target_modules=["q_proj", "fc1", "embed_tokens"]), generator=gen(0))
    assert torch.equal(af.inject(fn, a)(params, input_ids=ids).logits, fn(params, input_ids=ids).logits)


def test_gpt2_conv1d_is_fan_in_fan_out() -> None:
    model = tiny_gpt2()
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=3, target_modules=["c_attn", "c_proj"], init_lora_weights=False), generator=gen(1))
    e = a.entries["transformer.h.0.attn.c_attn"]
    assert e.fan_in_fan_out is True
    assert a.tensors["transformer.h.0.attn.c_attn"]["lora_A"].shape == (3, 26)
    assert a.tensors["transformer.h.0.attn.c_attn"]["lora_B"].shape == (78, 3)
    ids = ids_for(model)
    torch.testing.assert_close(fn(af.merge(params, a), input_ids=ids).logits,
                               af.inject(fn, a)(params, input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_bf16_base_gets_float32_adapter() -> None:
    model = tiny_llama().to(torch.bfloat16)
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=4, target_modules=["q_proj"]), generator=gen(0))
    assert a.tensors["model.layers.0.self_attn.q_proj"]["lora_A"].dtype == torch.float32
    out = af.inject(fn, a)(params, input_ids=ids_for(model)).logits
    assert out.dtype == torch.bfloat16


LINEAR_TARGETS = {"opt": ["q_proj", "v_proj", "fc1", "fc2"], "llama": ["q_proj", "o_proj", "down_proj"],
                  "gpt2": ["c_attn", "c_fc", "c_proj"]}


@pytest.mark.parametrize("name", sorted(LINEAR_TARGETS))
@pytest.mark.parametrize("grad", ["no_grad", "inference_mode"])
def test_base_gemm_accumulating_into_lowrank_equals_adding_after(name: str, grad: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """In inference adaptfn computes bias + s (x A^T) B^T first and lets the base GEMM accumulate into it
    (OPT: Linear with bias, Llama: without, GPT-2: Conv1D). Same result as base(x) + delta, and the path
    is really taken for every targeted module call."""
    from adaptfn import routing

    builder = {"opt": tiny_opt, "llama": tiny_llama, "gpt2": tiny_gpt2}[name]
    model = builder()
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=3, lora_alpha=5, target_modules=LINEAR_TARGETS[name], init_lora_weights=False),
                generator=gen(0))
    ids = ids_for(model, batch=3, seq=5)
    g = af.inject(fn, a)
    ctx = torch.no_grad if grad == "no_grad" else torch.inference_mode
    calls = []
    real = routing.accumulate_base
    monkeypatch.setattr(routing, "accumulate_base", lambda *args: calls.append(1) or real(*args))
    with ctx():
        fused = g(params, input_ids=ids).logits
    assert len(calls) == len([p for p, e in a.entry_items if e.kind]) >= 2 * len(LINEAR_TARGETS[name])
    calls.clear()
    monkeypatch.setattr(routing, "base_gemm", lambda *args: None)
    with ctx():
        added = g(params, input_ids=ids).logits
    assert not calls
    base = fn(params, input_ids=ids).logits
    assert float((fused - added).abs().max()) <= 1e-5 * float(added.abs().max())
    assert float((fused - base).abs().max()) > 1e-3  # the adapter really changes the output


def test_base_gemm_is_not_used_where_it_could_be_wrong() -> None:
    """Autograd through the adapter, a subclass with its own forward, a dtype mix: the base forward runs."""
    from adaptfn import routing

    lin = nn.Linear(7, 5)
    x = torch.randn(2, 7)
    A, B = torch.randn(3, 7), torch.randn(5, 3)
    with torch.no_grad():
        assert routing.base_gemm(lin.forward, lin, x, A, B) is not None
        assert routing.base_gemm(lin.forward, nn.Linear(7, 5), x, A, B) is None  # another module's forward
        assert routing.base_gemm(lambda t: lin(t), lin, x, A, B) is None  # not the plain forward
        assert routing.base_gemm(lin.forward, lin, x.double(), A, B) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert routing.base_gemm(lin.forward, lin, x, A, B) is None

    class Mine(nn.Linear):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return super().forward(t) * 2

    mine = Mine(7, 5)
    with torch.no_grad():
        assert routing.base_gemm(mine.forward, mine, x, A, B) is None
    assert routing.base_gemm(lin.forward, lin, x, A.requires_grad_(), B) is None
