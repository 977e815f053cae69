"""IA3 method: config fields and errors, PEFT's targeting / feedforward rules, initialisation, the forward
(output or input scaling), merge (weight and bias), mask, stack/vmap/grad, PEFT keys and shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import gen, ids_for, tiny_gpt2, tiny_llama, tiny_opt
from torch import nn

import adaptfn as af

OPT_KW = dict(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"])


def random_ia3(fn, seed=0, **kw):
    return af.init(fn, af.IA3Config(init_ia3_weights=False, **(kw or OPT_KW)), generator=gen(seed))


def test_defaults_match_peft() -> None:
    import peft

    ours, theirs = af.IA3Config(), peft.IA3Config()
    for field in ("target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "modules_to_save",
                  "init_ia3_weights", "task_type", "base_model_name_or_path", "revision", "inference_mode"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.to_dict()["peft_type"] == "IA3"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_modules": ["k_proj"], "feedforward_modules": ["fc2"]}, "feedforward_modules"),
        ({"target_modules": ["k_proj", "fc1"], "feedforward_modules": ["fc1", "fc2"]}, "feedforward_modules"),
        ({"target_modules": [1, 2]}, "target_modules"),
        ({"feedforward_modules": [3]}, "feedforward_modules"),
        ({"init_ia3_weights": "yes"}, "init_ia3_weights"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
    ],
)
def test_bad_config_fields_are_named(kwargs: dict, field: str) -> None:
    with pytest.raises(af.ConfigError, match=field) as e:
        af.IA3Config(**kwargs)
    assert isinstance(e.value, ValueError) and isinstance(e.value, af.AdaptfnError)


def test_subset_rule_only_between_lists() -> None:
    # PEFT checks the subset only when both are lists; a regex on either side is not checked
    af.IA3Config(target_modules=r".*(k_proj|fc2)", feedforward_modules=["fc2"])
    af.IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=r".*fc2")
    # a feedforward name that is the suffix of a full-path target passes (expanded "all-linear" configs)
    af.IA3Config(target_modules=["model.decoder.layers.0.fc2"], feedforward_modules=["fc2"])


def test_none_targets_or_feedforward_are_asked_for() -> None:
    fn, _ = af.functional(tiny_opt())
    with pytest.raises(af.ConfigError, match="target_modules"):
        af.init(fn, af.IA3Config(feedforward_modules=[]))
    with pytest.raises(af.ConfigError, match="feedforward_modules"):
        af.init(fn, af.IA3Config(target_modules=["k_proj"]))
    with pytest.raises(af.IncompatibleAdapterError, match="LayerNorm"):
        af.init(fn, af.IA3Config(target_modules=["final_layer_norm"], feedforward_modules=[]))
    with pytest.raises(af.IncompatibleAdapterError, match="nope"):
        af.init(fn, af.IA3Config(target_modules=["nope"], feedforward_modules=[]))


def test_targets_kinds_and_shapes() -> None:
    fn, _ = af.functional(tiny_opt())
    a = random_ia3(fn)
    assert sorted(a.paths) == sorted(f"model.decoder.layers.{i}.{n}" for i in (0, 1)
                                     for n in ("self_attn.k_proj", "self_attn.v_proj", "fc2"))
    for p, e in a.entry_items:
        assert e.r == 0
        v = a.tensors[p]["ia3_l"]
        if p.endswith("fc2"):
            assert e.kind == "ia3_in" and v.shape == (1, 37)  # [1, in] for feedforward modules
        else:
            assert e.kind == "ia3_out" and v.shape == (22, 1)  # [out, 1]
    assert a.num_parameters() == 4 * 22 + 2 * 37


def test_feedforward_list_is_plain_suffix_and_str_is_fullmatch() -> None:
    net = nn.ModuleDict({"fc": nn.Linear(5, 7), "xfc": nn.Linear(5, 9), "other": nn.Linear(5, 3)})
    fnet, _ = af.functional(net)
    # "fc" is a plain suffix of "xfc" too: both are feedforward (PEFT's rule, no "." boundary)
    a = af.init(fnet, af.IA3Config(target_modules=["fc", "xfc", "other"], feedforward_modules=["fc"]))
    assert {p: e.kind for p, e in a.entry_items} == {"fc": "ia3_in", "xfc": "ia3_in", "other": "ia3_out"}
    fn, _ = af.functional(tiny_llama())
    b = af.init(fn, af.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=r".*\.1\.mlp\.down_proj"))
    kinds = {p: e.kind for p, e in b.entry_items}
    assert kinds["model.layers.1.mlp.down_proj"] == "ia3_in"
    assert kinds["model.layers.0.mlp.down_proj"] == "ia3_out"
    assert b.tensors["model.layers.0.mlp.down_proj"]["ia3_l"].shape == (24, 1)
    assert b.tensors["model.layers.1.mlp.down_proj"]["ia3_l"].shape == (1, 41)


def test_init_ones_is_exactly_the_base_and_random_init_is_normal() -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    ids = ids_for(model)
    ones = af.init(fn, af.IA3Config(**OPT_KW))
    assert all(torch.equal(d["ia3_l"], torch.ones_like(d["ia3_l"])) for d in ones.tensors.values())
    assert torch.equal(af.inject(fn, ones)(params, input_ids=ids).logits, fn(params, input_ids=ids).logits)
    big = nn.Sequential(nn.Linear(211, 307))
    fb, _ = af.functional(big)
    r = af.init(fb, af.IA3Config(target_modules=["0"], feedforward_modules=[], init_ia3_weights=False),
                generator=gen(2))
    v = r.tensors["0"]["ia3_l"]
    assert v.shape == (307, 1) and abs(v.mean().item()) < 0.2 and v.std().item() == pytest.approx(1.0, rel=0.15)
    again = af.init(fb, af.IA3Config(target_modules=["0"], feedforward_modules=[], init_ia3_weights=False),
                    generator=gen(2))
    assert torch.equal(again.tensors["0"]["ia3_l"], v)


def test_forward_scales_output_or_input() -> None:
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    fn, params = af.functional(model)
    a = af.init(fn, af.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"], init_ia3_weights=False),
                generator=gen(1))
    l0, l2 = a.tensors["0"]["ia3_l"], a.tensors["2"]["ia3_l"]
    x = torch.randn(4, 5, generator=gen(3))
    h = torch.relu(model[0](x) * l0.flatten())
    want = model[2](h * l2.flatten())
    torch.testing.assert_close(af.inject(fn, a)(params, x), want, rtol=0, atol=0)


@pytest.mark.parametrize("build,kw", [
    (tiny_opt, OPT_KW),
    (tiny_llama, dict(target_modules=["q_proj", "o_proj", "down_proj"], feedforward_modules=["down_proj"])),
    (tiny_gpt2, dict(target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
], ids=["opt", "llama", "gpt2"])
def test_merge_equals_inject_and_mask_is_exact(build, kw) -> None:
    model = build()
    fn, params = af.functional(model)
    ids = ids_for(model)
    a = random_ia3(fn, **kw)
    out = af.inject(fn, a)(params, input_ids=ids).logits
    base = fn(params, input_ids=ids).logits
    assert (out - base).abs().max() > 1e-2
    merged = af.merge(params, a)
    torch.testing.assert_close(fn(merged, input_ids=ids).logits, out, rtol=1e-5, atol=1e-6)
    assert torch.equal(af.inject(fn, af.mask(a, False))(params, input_ids=ids).logits, base)
    # untouched tensors are the same objects; merged ones are new and the inputs are unchanged
    touched = {f"{p}.{n}" for p in a.paths for n in ("weight", "bias")}
    for k, v in params.items():
        if k not in touched:
            assert merged[k] is v, k
    for p, e in a.entry_items:
        w = merged[f"{p}.weight"]
        assert w is not params[f"{p}.weight"]
        bias = params.get(f"{p}.bias")
        if bias is not None:
            if e.kind == "ia3_out":  # output scaling: PEFT merges the bias too
                v = a.tensors[p]["ia3_l"].flatten()
                assert torch.equal(merged[f"{p}.bias"], bias * v)
            else:
                assert merged[f"{p}.bias"] is bias


def test_gpt2_fan_in_fan_out_and_square_conv1d_merge() -> None:
    model = tiny_gpt2()
    fn, params = af.functional(model)
    cfg = af.IA3Config(target_modules=["attn.c_proj"], feedforward_modules=[], init_ia3_weights=False)
    assert cfg.fan_in_fan_out is False
    a = af.init(fn, cfg, generator=gen(4))
    assert a.config.fan_in_fan_out is True  # as PEFT saves it for Conv1D targets
    p = "transformer.h.0.attn.c_proj"
    assert a.entries[p].fan_in_fan_out is True
    w = params[f"{p}.weight"]
    assert w.shape == (26, 26)  # square: only fan_in_fan_out tells the output axis
    v = a.tensors[p]["ia3_l"]
    merged = af.merge(params, a)
    assert torch.equal(merged[f"{p}.weight"], w * v.reshape(1, -1))  # Conv1D [in, out]: scale columns
    ids = ids_for(model)
    torch.testing.assert_close(fn(merged, input_ids=ids).logits, af.inject(fn, a)(params, input_ids=ids).logits,
                               rtol=1e-5, atol=1e-6)


def test_partial_mask_and_select() -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    ids = ids_for(model)
    a = random_ia3(fn)
    only_fc2 = af.inject(fn, af.mask(a, ["fc2"]))(params, input_ids=ids).logits
    selected = af.inject(fn, af.select(a, ["fc2"]))(params, input_ids=ids).logits
    assert torch.equal(only_fc2, selected)
    assert af.mask(a, False).tensors[a.paths[0]]["ia3_l"] is a.tensors[a.paths[0]]["ia3_l"]
    # a masked entry is written as ones: the file computes what the adapter computes
    sd = af.state_dict(af.mask(a, ["fc2"]))
    k = "base_model.model.model.decoder.layers.0.self_attn.k_proj.ia3_l"
    assert torch.equal(sd[k], torch.ones(22, 1))


def test_two_adapters_multiply() -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    ids = ids_for(model)
    a, b = random_ia3(fn, 1), random_ia3(fn, 2)
    prod = af.tree.map(lambda x, y: x * y if x.dim() else x, a, b)
    both = af.select({"a": a, "b": b}, ["a", "b"])
    want = af.inject(fn, prod)(params, input_ids=ids).logits
    torch.testing.assert_close(af.inject(fn, both)(params, input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fn(af.merge(params, both), input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_stack_vmap_and_grad() -> None:
    model = tiny_llama()
    fn, params = af.functional(model)
    ids = ids_for(model)
    kw = dict(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    adapters = [random_ia3(fn, s, **kw) for s in (1, 2, 3)]
    stacked = af.stack(adapters)
    assert stacked.tensors["model.layers.0.self_attn.v_proj"]["ia3_l"].shape == (3, 12, 1)  # GQA: one kv head of 12
    outs = torch.func.vmap(lambda a: af.inject(fn, a)(params, input_ids=ids).logits)(stacked)
    for i, a in enumerate(adapters):
        torch.testing.assert_close(outs[i], af.inject(fn, a)(params, input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    for x, y in zip(af.unstack(stacked), adapters):
        for p in y.paths:
            assert torch.equal(x.tensors[p]["ia3_l"], y.tensors[p]["ia3_l"])
    with pytest.raises(af.IncompatibleAdapterError, match="stacked"):
        af.inject(fn, stacked)(params, input_ids=ids)
    # grad: Adapter-shaped, zero for a masked module, nonzero otherwise
    masked = af.mask(adapters[0], ["v_proj"])
    g = torch.func.grad(lambda a: af.inject(fn, a)(params, input_ids=ids).logits.square().mean())(masked)
    assert isinstance(g, af.Adapter) and g.paths == masked.paths
    for p, d in g.tensors.items():
        nz = d["ia3_l"].abs().max() > 0
        assert bool(nz) == p.endswith("v_proj"), p


def test_modules_to_save_and_state_dict_keys(tmp_path) -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    a = af.init(fn, af.IA3Config(modules_to_save=["lm_head"], **OPT_KW))
    sd = af.state_dict(a)
    assert "base_model.model.lm_head.weight" in sd
    assert sd["base_model.model.model.decoder.layers.1.fc2.ia3_l"].shape == (1, 37)
    assert sd["base_model.model.model.decoder.layers.1.self_attn.v_proj.ia3_l"].shape == (22, 1)
    af.save(a, tmp_path)
    b = af.load(tmp_path)
    assert b.method == "ia3" and b.config == a.config
    assert {p: e.kind for p, e in b.entry_items} == {p: e.kind for p, e in a.entry_items}


def test_file_shape_disagreeing_with_feedforward_modules(tmp_path) -> None:
    fn, _ = af.functional(tiny_opt())
    a = random_ia3(fn)
    af.save(a, tmp_path)
    cfg = dataclasses.replace(a.config, feedforward_modules=[])  # fc2 vectors are [1, in] in the file
    (tmp_path / "adapter_config.json").write_text(cfg.to_json_string())
    with pytest.raises(af.AdapterFileError, match="fc2"):
        af.load(tmp_path)


def test_adapter_for_another_model_is_refused() -> None:
    fn, _ = af.functional(tiny_opt())
    a = random_ia3(fn)
    fn2, _ = af.functional(tiny_opt(hidden=20, ffn=31))
    with pytest.raises(af.IncompatibleAdapterError, match=r"\[22, 1\]|\[1, 37\]"):
        af.inject(fn2, a)


class _CountingBackend:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compile_switching_adapters_no_recompiles() -> None:
    """Adapters of one structure (masked ones included) share one compiled graph; masked = base."""
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    fn, params = af.functional(model)
    cfg = af.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"], init_ia3_weights=False)
    adapters = [af.init(fn, cfg, generator=gen(i)) for i in range(2)]
    adapters += [af.mask(adapters[0], False), af.mask(adapters[1], ["2"])]
    x = torch.randn(4, 5, generator=gen(9))
    torch._dynamo.reset()
    backend = _CountingBackend()

    @torch.compile(backend=backend)
    def step(ad, inp):
        return af.inject(fn, ad)(params, inp)

    step(adapters[0], x)
    graphs = backend.graphs
    assert graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ad in adapters[1:] + adapters[:1]:
            torch.testing.assert_close(step(ad, x), af.inject(fn, ad)(params, x), rtol=0, atol=0)
    assert backend.graphs == graphs
    assert torch.equal(step(adapters[2], x), model(x))
