"""Adapter algebra (adaptfn/algebra.py): ``af.scale`` (a differentiable weight per entry, per method), weighted
``af.select``, ``af.combine``'s checks, and stacks of adapters with different targets (adaptfn/stacking.py).
Parity of ``af.combine`` with PEFT is in tests/parity/test_combine_parity.py; hypothesis properties in
tests/test_algebra_properties.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen, ids_for, tiny_opt
from torch.utils.flop_counter import FlopCounterMode

import adaptfn as af
from adaptfn import methods
from adaptfn.methods import base

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def opt():
    model = tiny_opt()
    fn, params = af.functional(model)
    return model, fn, params, ids_for(model)


def lora(fn, seed=0, r=3, alpha=5.0, targets=QV, **kw):
    return af.init(fn, af.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw),
                   generator=gen(seed))


def ia3(fn, seed=0, targets=("k_proj", "fc2"), ff=("fc2",)):
    return af.init(fn, af.IA3Config(target_modules=list(targets), feedforward_modules=list(ff), init_ia3_weights=False),
                   generator=gen(seed))


def adalora(fn, seed=0, targets=QV):
    cfg = af.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6, target_modules=list(targets), total_step=10,
                           init_lora_weights=False)
    return af.init(fn, cfg, generator=gen(seed))


MAKERS = {"lora": lora, "ia3": ia3, "adalora": adalora}


def logits(fn, params, ids, a):
    return af.inject(fn, a)(params, input_ids=ids).logits


# -- scale: identities --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MAKERS)
def test_scale_one_is_bit_exact_and_zero_is_the_base(opt, kind):
    _, fn, params, ids = opt
    a = MAKERS[kind](fn)
    base = fn(params, input_ids=ids).logits
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with mode():
            assert torch.equal(logits(fn, params, ids, af.scale(a, 1.0)), logits(fn, params, ids, a)), mode
            assert torch.equal(logits(fn, params, ids, af.scale(a, torch.tensor(1.0))), logits(fn, params, ids, a))
            assert torch.equal(logits(fn, params, ids, af.scale(a, 0.0)), base), mode
    # merged: weight 1 folds in exactly as the adapter does, weight 0 leaves every tensor as it is
    m1, m = af.merge(params, af.scale(a, 1.0)), af.merge(params, a)
    assert all(torch.equal(m1[k], m[k]) for k in m)
    m0 = af.merge(params, af.scale(a, 0.0))
    assert all(m0[k] is params[k] for k in params)
    # the structure gains the weight leaves, whatever the value: weights switch without a new structure
    s1, s2 = af.scale(a, 1.0), af.scale(a, 0.25)
    assert s1.structure_key == s2.structure_key != a.structure_key
    assert all(s1.leaves(p)["coef"].shape == () for p in s1.paths)
    assert s1.num_parameters() == a.num_parameters()  # a weight is not a trainable parameter of the adapter
    assert "scaled" in repr(s2)


def test_scale_means_per_method(opt):
    """LoRA / AdaLoRA: the delta times w; IA3: the vector 1 + w (l - 1); checked on the merged weights."""
    _, fn, params, _ = opt
    w = -0.625
    for kind in ("lora", "adalora"):
        a = MAKERS[kind](fn)
        m, m1 = af.merge(params, af.scale(a, w)), af.merge(params, a)
        for p in a.paths:
            k = f"{p}.weight"
            torch.testing.assert_close(m[k] - params[k], w * (m1[k] - params[k]), atol=1e-6, rtol=1e-5)
    a = ia3(fn)
    m = af.merge(params, af.scale(a, w))
    for p, e in a.entries.items():
        v = a.leaves(p)["ia3_l"]
        k = f"{p}.weight"
        # v is [1, in] (feedforward: scales columns) or [out, 1] (scales rows, and the bias)
        torch.testing.assert_close(m[k], params[k] * (1 + w * (v - 1)), atol=1e-6, rtol=1e-5)
        if e.kind == "ia3_out":
            torch.testing.assert_close(m[f"{p}.bias"], params[f"{p}.bias"] * (1 + w * (v.flatten() - 1)))
    # weights compose by products, for every method
    for kind, make in MAKERS.items():
        a = make(fn)
        twice = af.scale(af.scale(a, 0.5), -3.0)
        once = af.scale(a, -1.5)
        assert all(torch.equal(twice.leaves(p)["coef"], once.leaves(p)["coef"]) for p in a.paths), kind


def test_scale_per_module_mapping(opt):
    _, fn, params, ids = opt
    a = lora(fn)
    q0 = "model.decoder.layers.0.self_attn.q_proj"
    s = af.scale(a, {r".*layers\.0\..*": 0.5, ("q_proj",): 2.0, (lambda p: "v_proj" in p): torch.tensor(-1.0)})
    got = {p: float(s.leaves(p)["coef"]) for p in s.paths}
    assert got[q0] == 0.5  # the first matching key wins
    assert got["model.decoder.layers.1.self_attn.q_proj"] == 2.0
    assert got["model.decoder.layers.1.self_attn.v_proj"] == -1.0
    # modules no key matches keep their weight (no leaf added)
    part = af.scale(a, {r".*q_proj": 3.0})
    assert all(("coef" in part.leaves(p)) == p.endswith("q_proj") for p in part.paths)
    torch.testing.assert_close(logits(fn, params, ids, af.scale(a, {r".*": 0.3})), logits(fn, params, ids,
                               af.scale(a, 0.3)), atol=0, rtol=0)
    with pytest.raises(af.ConfigError, match=r"w\['fc1'\] matches none"):
        af.scale(a, {"fc1": 0.5})
    # an AdapterSum: each part gets the keys that match its modules; a key must match some part
    fc = lora(fn, 1, targets=["fc1"])
    both = af.scale(af.select({"a": a, "b": fc}, ["a", "b"]), {r".*q_proj": 0.5, r".*fc1": 2.0})
    assert {n: sorted({float(x.leaves(p)["coef"]) for p in x.paths if "coef" in x.leaves(p)})
            for n, x in both.parts.items()} == {"a": [0.5], "b": [2.0]}
    with pytest.raises(af.ConfigError, match="matches none of the adapters"):
        af.scale(af.select({"a": a, "b": fc}, ["a", "b"]), {r".*k_proj": 0.5})


@pytest.mark.parametrize("w,match", [
    (math.nan, "not finite"), (math.inf, "not finite"), (True, "number"), ("0.5", "number"), (None, "number"),
    (torch.tensor(math.nan), "NaN or infinite"), (torch.tensor([0.5, 0.5]), "not stacked"),
    (torch.ones(2, 2), "shape"), (torch.tensor(1 + 1j), "real"),
], ids=["nan", "inf", "bool", "str", "none", "nan-tensor", "vector-on-single", "matrix", "complex"])
def test_scale_bad_weights_are_typed_errors_naming_w(opt, w, match):
    _, fn, _, _ = opt
    with pytest.raises(af.ConfigError, match=match) as e:
        af.scale(lora(fn), w)
    assert "w" in str(e.value) and isinstance(e.value, af.AdaptfnError)
    with pytest.raises(af.ConfigError, match=r"w\['q_proj'\]"):
        af.scale(lora(fn), {"q_proj": w})
    with pytest.raises(af.ConfigError, match="Adapter"):
        af.scale({"a": lora(fn)}, 0.5)


def test_scale_on_a_stack_wrong_length(opt):
    _, fn, _, _ = opt
    s = af.stack([lora(fn, 0), lora(fn, 1)])
    with pytest.raises(af.ConfigError, match=r"shape \[3\].*stack of 2"):
        af.scale(s, torch.ones(3))


# -- scale: gradients -----------------------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    """ids -> Embedding -> Linear/tanh blocks, all float64 (transformers' eager attention runs its softmax in
    float32 even for a float64 model, too coarse for finite differences). Module paths like OPT's layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(13, 9)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict(
            {"q_proj": torch.nn.Linear(9, 11), "k_proj": torch.nn.Linear(11, 9), "v_proj": torch.nn.Linear(9, 7),
             "fc1": torch.nn.Linear(7, 9), "fc2": torch.nn.Linear(9, 9)}) for _ in range(2))
        self.head = torch.nn.Linear(9, 5)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        for blk in self.layers:
            h = torch.tanh(blk["k_proj"](torch.tanh(blk["q_proj"](h))))
            h = torch.tanh(blk["fc2"](torch.tanh(blk["fc1"](torch.tanh(blk["v_proj"](h))))))
        return self.head(h)


def _double_net():
    model = _Net().double().eval()
    fn, params = af.functional(model)
    return fn, params, torch.randint(0, 13, (2, 5), generator=gen(8))


def _fd(f, w, h=1e-6):
    out = torch.zeros_like(w)
    for i in range(w.numel()):
        e = torch.zeros_like(w).view(-1)
        e[i] = h
        e = e.view(w.shape)
        out.view(-1)[i] = (f(w + e) - f(w - e)) / (2 * h)
    return out


@pytest.mark.parametrize("kind", MAKERS)
def test_grad_in_w_matches_finite_differences_float64(kind):
    fn, params, ids = _double_net()
    a = MAKERS[kind](fn)
    target = torch.randn(2, 5, 5, generator=gen(4), dtype=torch.float64)

    def loss(w):  # one weight for layer 0, one for the rest: a mapping of tensor weights
        s = af.scale(a, {r".*\.0\..*": w[0], r".*": w[1]})
        return (af.inject(fn, s)(params, input_ids=ids) - target).square().mean()

    w = torch.tensor([0.7, -0.4], dtype=torch.float64)
    g = torch.func.grad(loss)(w)
    fd = _fd(loss, w)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-9)
    assert (g != 0).all()
    w2 = w.clone().requires_grad_(True)  # plain autograd sees the same derivative
    loss(w2).backward()
    torch.testing.assert_close(w2.grad, g, rtol=1e-10, atol=1e-12)


def test_grad_of_stack_weights_through_route_and_vmap_float64():
    fn, params, ids = _double_net()
    ads = [lora(fn, 0, r=2), lora(fn, 1, r=3, targets=["q_proj", "fc1"]), lora(fn, 2, r=1, targets=["k_proj"])]
    stacked = af.stack(ads)
    route = torch.tensor([2, 0])

    def loss_route(w):
        return af.inject(fn, af.scale(stacked, w), route=route)(params, input_ids=ids).square().mean()

    def loss_vmap(w):
        out = torch.func.vmap(lambda a: af.inject(fn, a)(params, input_ids=ids))(af.scale(stacked, w))
        return out.square().mean()

    w = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
    for f in (loss_route, loss_vmap):
        g = torch.func.grad(f)(w)
        torch.testing.assert_close(g, _fd(f, w), rtol=1e-6, atol=1e-9)
    assert torch.func.grad(loss_route)(w)[1] == 0  # adapter 1 has no row: no gradient
    # the stack's detached scaling leaf still gets none; the weight is what learns
    gs = torch.func.grad(lambda s: af.inject(fn, s, route=route)(params, input_ids=ids).sum())(af.scale(stacked, w))
    p = "layers.0.q_proj"
    assert not gs.leaves(p)["scaling"].any() and gs.leaves(p)["coef"][0] != 0


# -- scale composes with select, stack, route, vmap, merge, save ----------------------------------------------------
def test_scaled_stack_route_vmap_merge_equal_the_loop(opt):
    _, fn, params, ids = opt
    ads = [lora(fn, 0, r=2), lora(fn, 1, r=4, alpha=2), lora(fn, 2, r=3)]
    w = torch.tensor([0.5, -2.0, 1.5])
    scaled = af.scale(af.stack(ads), w)
    loop = torch.stack([logits(fn, params, ids, af.scale(a, float(x))) for a, x in zip(ads, w)])
    vm = torch.func.vmap(lambda a: af.inject(fn, a)(params, input_ids=ids).logits)(scaled)
    torch.testing.assert_close(vm, loop, atol=1e-5, rtol=1e-5)
    route = torch.tensor([1, 2])
    routed = af.inject(fn, scaled, route=route)(params, input_ids=ids).logits
    torch.testing.assert_close(routed, torch.stack([loop[1, 0], loop[2, 1]]), atol=1e-5, rtol=1e-5)
    # stacking scaled adapters gives the same stack; unstack gives each its weight back
    also = af.stack([af.scale(a, float(x)) for a, x in zip(ads, w)])
    for p in also.paths:
        assert torch.equal(also.leaves(p)["coef"], scaled.leaves(p)["coef"])
    back = af.unstack(scaled)
    assert [float(b.leaves(b.paths[0])["coef"]) for b in back] == w.tolist()
    for a, b, x in zip(ads, back, w):
        merged = fn(af.merge(params, b), input_ids=ids).logits
        torch.testing.assert_close(merged, logits(fn, params, ids, af.scale(a, float(x))), atol=1e-5, rtol=1e-5)
    # vmap over the weight itself
    ws = torch.tensor([0.0, 0.5, 1.0])
    over_w = torch.func.vmap(lambda x: logits(fn, params, ids, af.scale(ads[0], x)))(ws)
    torch.testing.assert_close(over_w, torch.stack([logits(fn, params, ids, af.scale(ads[0], float(x))) for x in ws]),
                               atol=1e-5, rtol=1e-5)
    # select / mask keep the weight
    q = af.select(af.scale(ads[0], 0.5), r".*q_proj")
    assert all(float(q.leaves(p)["coef"]) == 0.5 for p in q.paths)


def test_weighted_select_is_the_weighted_sum(opt):
    _, fn, params, ids = opt
    a1, a2 = lora(fn, 0, r=2), lora(fn, 1, r=3, targets=["q_proj", "fc1"])
    mix = af.select({"a": a1, "b": a2}, {"a": 0.7, "b": -0.3})
    assert isinstance(mix, af.AdapterSum) and list(mix.parts) == ["a", "b"]
    merged = af.merge(params, mix)
    for p in a1.paths:
        k = f"{p}.weight"
        want = params[k] + 0.7 * a1.entries[p].scaling * a1.leaves(p)["lora_B"] @ a1.leaves(p)["lora_A"]
        if p in a2.entries:
            want = want - 0.3 * a2.entries[p].scaling * a2.leaves(p)["lora_B"] @ a2.leaves(p)["lora_A"]
        torch.testing.assert_close(merged[k], want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(fn, params, ids, mix), fn(merged, input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    w = torch.tensor(0.25, requires_grad=True)  # a weight may be a tensor to learn
    logits(fn, params, ids, af.select({"a": a1, "b": a2}, {"a": w, "b": 1 - w})).sum().backward()
    assert w.grad is not None and w.grad != 0
    for bad, match in (({"c": 0.5}, "no adapter named"), ({}, "empty"), ({"a": math.nan}, "not finite"),
                       ({"a": "x"}, "number")):
        with pytest.raises(af.ConfigError, match=match):
            af.select({"a": a1, "b": a2}, bad)


def test_saved_scaled_adapters_reload_in_peft(opt, tmp_path):
    import peft

    model, fn, params, ids = opt
    cases = {
        "lora": af.scale(lora(fn, 0), {r".*q_proj": 0.5, r".*": -1.5}),
        "ia3": af.scale(ia3(fn, 1), 0.3),
        "lora-masked": af.scale(af.mask(lora(fn, 2), r".*q_proj"), 2.0),
    }
    for name, a in cases.items():
        out = tmp_path / name
        af.save(a, out)
        pm = peft.PeftModel.from_pretrained(tiny_opt(), out).eval()
        with torch.no_grad():
            theirs = pm(input_ids=ids).logits
        ours = logits(fn, params, ids, a)
        assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5, name
        back = af.load(out)  # the weight is folded into the tensors: no coef leaf in the file
        assert all("coef" not in back.leaves(p) for p in back.paths)
        torch.testing.assert_close(logits(fn, params, ids, back), ours, atol=1e-5, rtol=1e-5)


def test_scaled_replacements_interpolate_toward_the_base(opt):
    _, fn, params, ids = opt
    a = lora(fn, 0, modules_to_save=["lm_head"], bias="lora_only")
    a = af.tree.map(lambda t: t + 0.01 if t.dim() else t, a)  # move the replacements off the base
    base = fn(params, input_ids=ids).logits
    assert torch.equal(logits(fn, params, ids, af.scale(a, 1.0)), logits(fn, params, ids, a))
    assert torch.equal(logits(fn, params, ids, af.scale(a, 0.0)), base)
    half = af.merge(params, af.scale(a, 0.5))
    k = "lm_head.weight"
    torch.testing.assert_close(half[k], params[k] + 0.5 * (a.leaves("lm_head")["weight"] - params[k]))
    assert half["model.decoder.embed_tokens.weight"] is params["model.decoder.embed_tokens.weight"]  # untied
    torch.testing.assert_close(logits(fn, params, ids, af.scale(a, 0.5)), fn(half, input_ids=ids).logits,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(af.ConfigError, match="scale weight other than 1"):
        af.state_dict(af.scale(a, 0.5))
    assert af.state_dict(af.scale(a, 1.0)).keys() == af.state_dict(a).keys()


def test_methods_declare_scale_and_combine():
    lo, i3, ad = (methods.get_method(n) for n in ("lora", "ia3", "adalora"))
    assert {base.SCALE, base.COMBINE} <= lo.capabilities and {base.SCALE, base.COMBINE} <= i3.capabilities
    assert base.SCALE in ad.capabilities and base.COMBINE not in ad.capabilities


# -- combine: typed errors -------------------------------------------------------------------------------------
BAD = [
    (dict(weights=[0.5]), "weights has 1 entries for 2 adapters"),
    (dict(weights=[0.5, math.nan]), r"weights\[1\]"),
    (dict(weights=[math.inf, 0.5]), r"weights\[0\]"),
    (dict(weights="ab"), "weights must be a list"),
    (dict(how="average"), "how='average'"),
    (dict(how="ties"), "pass density"),
    (dict(how="ties", density=0.0), "density=0.0"),
    (dict(how="dare_linear", density=1.5), "density=1.5"),
    (dict(how="dare_ties", density=-0.2), "density=-0.2"),
    (dict(how="magnitude_prune", density=math.nan), "density=nan"),
    (dict(how="cat", density=0.5), "density=0.5 is used only"),
    (dict(how="svd", svd_rank=23), "svd_rank=23.*above module"),
    (dict(how="svd", svd_rank=0), "svd_rank=0"),
    (dict(how="cat", svd_rank=2), "svd_rank=2 is used only"),
    (dict(how="svd", svd_clamp=1.5), "svd_clamp=1.5"),
    (dict(how="svd", svd_driver="gesvdj"), "svd_driver='gesvdj' needs CUDA"),
    (dict(how="svd", svd_driver="lapack"), "svd_driver='lapack'"),
    (dict(how="ties", density=0.5, majority_sign_method="mean"), "majority_sign_method='mean'"),
    (dict(how="dare_ties", density=0.5, generator=0), "generator must be"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[m[:24] for _, m in BAD])
def test_combine_bad_arguments_are_typed_errors_naming_them(opt, kw, match):
    _, fn, _, _ = opt
    ads = [lora(fn, 0, r=3), lora(fn, 1, r=3)]
    kw = {"weights": [0.5, 0.5], **kw}
    with pytest.raises(af.ConfigError, match=match) as e:
        af.combine(ads, **kw)
    assert isinstance(e.value, af.AdaptfnError) and isinstance(e.value, ValueError)


def test_combine_refuses_what_peft_cannot_combine(opt):
    _, fn, _, _ = opt
    a, b = lora(fn, 0, r=2), lora(fn, 1, r=3)
    with pytest.raises(af.IncompatibleAdapterError, match="same r"):
        af.combine([a, b], [1, 1], how="linear")
    with pytest.raises(af.IncompatibleAdapterError, match="adapters\\[1\\] is ia3"):
        af.combine([a, ia3(fn)], [1, 1], how="linear")
    with pytest.raises(af.ConfigError, match="af.combine is not supported for adalora"):
        af.combine([adalora(fn), adalora(fn, 1)], [1, 1], how="linear")
    with pytest.raises(af.ConfigError, match="how='cat' is not defined for ia3"):
        af.combine([ia3(fn), ia3(fn, 1)], [1, 1])
    with pytest.raises(af.IncompatibleAdapterError, match="modules_to_save"):
        af.combine([a, lora(fn, 1, modules_to_save=["lm_head"])], [1, 1])
    regex = lora(fn, 1, targets=r".*\.q_proj")
    with pytest.raises(af.ConfigError, match="mix a regex str with lists"):
        af.combine([a, regex], [1, 1])
    layer0 = lora(fn, 1, r=2, targets=["fc1"], layers_to_transform=[1])
    with pytest.raises(af.IncompatibleAdapterError, match="not a target of the combined config"):
        af.combine([layer0, a], [1, 1])  # the first config's layers_to_transform rules a's layer 0 out
    with pytest.raises(af.ConfigError, match="stacked"):
        af.combine([af.stack([a, a])], [1])
    with pytest.raises(af.ConfigError, match="non-empty"):
        af.combine([], [])
    with pytest.raises(af.ConfigError, match="under a transform"):
        torch.func.grad(lambda x: af.combine([x, x], [1, 1]).leaves(a.paths[0])["lora_A"].sum())(a)


def test_combine_sees_scaled_and_masked_adapters_as_their_files(opt):
    _, fn, _, _ = opt
    a, b = lora(fn, 0, r=3), lora(fn, 1, r=3, targets=["q_proj", "fc1"])
    a2 = af.mask(af.scale(a, {r".*q_proj": 0.5, r".*": 2.0}), r".*layers\.0\..*")
    as_file = af.from_state_dict(af.state_dict(a2), a2.config)
    for how in ("cat", "svd", "linear"):
        x, y = af.combine([a2, b], [0.7, 0.3], how=how), af.combine([as_file, b], [0.7, 0.3], how=how)
        sx, sy = af.state_dict(x), af.state_dict(y)
        assert all(torch.equal(sx[k], sy[k]) for k in sx), how


def test_combine_with_a_generator_is_reproducible_and_leaves_the_global_one(opt):
    _, fn, _, _ = opt
    ads = [lora(fn, i, r=3) for i in range(3)]
    state = torch.get_rng_state()
    runs = [af.state_dict(af.combine(ads, [0.5, 0.3, 0.2], how="dare_ties", density=0.4, generator=gen(s)))
            for s in (1, 1, 2)]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_ia3_combine_is_linear_and_sums_scaled_deviations_when_weights_sum_to_one(opt):
    _, fn, params, ids = opt
    a, b = ia3(fn, 0), ia3(fn, 1, targets=("k_proj", "v_proj", "fc2"))
    c = af.combine([a, b], [0.75, 0.25], how="linear")
    assert sorted(c.config.target_modules) == ["fc2", "k_proj", "v_proj"] and c.config.feedforward_modules == ["fc2"]
    p = "model.decoder.layers.1.fc2"
    torch.testing.assert_close(c.leaves(p)["ia3_l"], 0.75 * a.leaves(p)["ia3_l"] + 0.25 * b.leaves(p)["ia3_l"])
    v = "model.decoder.layers.1.self_attn.v_proj"  # only b has it: 0.25 * l, as PEFT computes it
    torch.testing.assert_close(c.leaves(v)["ia3_l"], 0.25 * b.leaves(v)["ia3_l"])
    # weights summing to 1: sum_i w_i l_i == 1 + sum_i w_i (l_i - 1), the scaled vectors' deviations added up
    # (injecting scaled IA3 adapters together multiplies their vectors instead)
    both = ia3(fn, 2)
    c2 = af.combine([a, both], [0.75, 0.25], how="linear")
    sa, sb = af.state_dict(af.scale(a, 0.75)), af.state_dict(af.scale(both, 0.25))
    for k, v in af.state_dict(c2).items():
        torch.testing.assert_close(v, 1 + (sa[k] - 1) + (sb[k] - 1))


# -- stacks of adapters with different targets ----------------------------------------------------------------
def _hetero(fn):
    return [lora(fn, 0, r=2, alpha=3.0, targets=["q_proj", "v_proj"]),
            lora(fn, 1, r=4, alpha=2.0, targets=["fc1"], use_rslora=True),
            af.scale(lora(fn, 2, r=3, targets=["q_proj", "fc2"]), 0.5),
            af.mask(lora(fn, 3, r=1, targets=["k_proj", "fc1"]), r".*k_proj")]


def test_hetero_stack_layout_and_unstack_round_trip(opt):
    _, fn, _, _ = opt
    ads = _hetero(fn)
    s = af.stack(ads)
    assert set(s.paths) == {p for a in ads for p in a.paths}
    fc1 = "model.decoder.layers.0.fc1"
    d = s.leaves(fc1)
    # adapter 3 has fc1 masked off (its own gate 0): kept as it is
    assert d["gate"].tolist() == [0.0, 1.0, 0.0, 0.0] and d["scaling"][0] == 0 and "coef" not in d
    q = s.leaves("model.decoder.layers.0.self_attn.q_proj")  # adapter 2's weight; 1 for 0, 0 for the absent ones
    assert q["coef"].tolist() == [1.0, 0.0, 0.5, 0.0] and q["gate"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert not d["lora_A"][0].any() and not d["lora_B"][2].any()  # zeros where an adapter lacks the module
    for a, b in zip(ads, af.unstack(s)):
        assert b.structure_key == a.structure_key and dict(b.entries) == dict(a.entries)
        for p in a.paths:
            assert all(torch.equal(a.leaves(p)[n], b.leaves(p)[n]) for n in a.leaves(p))
    # scaling the stack afterwards gives every adapter a weight where it has the module
    back = af.unstack(af.scale(s, torch.tensor([1.0, 2.0, 3.0, 4.0])))
    assert [sorted({n for p in b.paths for n in b.leaves(p)}) for b in back][1] == ["coef", "gate", "lora_A", "lora_B"]
    assert float(back[2].leaves(back[2].paths[0])["coef"]) == 1.5


def test_hetero_stack_vmap_route_grad_equal_the_loop(opt):
    _, fn, params, ids = opt
    ads = _hetero(fn)
    s = af.stack(ads)
    loop = torch.stack([logits(fn, params, ids, a) for a in ads])
    vm = torch.func.vmap(lambda a: af.inject(fn, a)(params, input_ids=ids).logits)(s)
    torch.testing.assert_close(vm, loop, atol=1e-5, rtol=1e-5)
    ids4 = torch.cat([ids, ids])
    route = torch.tensor([3, 1, 2, 0])
    rows = af.inject(fn, s, route=route)(params, input_ids=ids4).logits
    torch.testing.assert_close(rows, torch.stack([loop[3, 0], loop[1, 1], loop[2, 0], loop[0, 1]]), atol=1e-5,
                               rtol=1e-5)
    with torch.inference_mode():  # the inference kernels (grouped / dense) too
        rows_inf = af.inject(fn, s, route=route)(params, input_ids=ids4).logits
    torch.testing.assert_close(rows_inf, rows, atol=1e-5, rtol=1e-5)
    # grad through route= reaches each adapter's own modules exactly as the loop's grads
    g = torch.func.grad(lambda st: af.inject(fn, st, route=route)(params, input_ids=ids4).logits.square().sum())(s)
    for i, a in enumerate(ads):
        rows_i = [j for j in range(4) if route[j] == i]
        gi = torch.func.grad(lambda x, rows=rows_i: sum(logits(fn, params, ids4[j:j + 1], x).square().sum()
                                                        for j in rows))(a)
        for p, e in a.entries.items():
            for n in ("lora_A", "lora_B"):
                got = g.leaves(p)[n][i]
                got = got[: e.r] if n == "lora_A" else got[:, : e.r]
                torch.testing.assert_close(got, gi.leaves(p)[n], atol=1e-4, rtol=1e-4)
        for p in set(s.paths) - set(a.paths):  # modules an adapter lacks: exactly no gradient
            assert not g.leaves(p)["lora_A"][i].any() and not g.leaves(p)["lora_B"][i].any()


def test_hetero_stack_costs_only_the_padding(opt):
    """A mixed batch over adapters with different targets does exactly the FLOPs of a same-target stack with
    the same union: an adapter's absent modules cost what rank padding costs, nothing more."""
    _, fn, params, ids = opt
    targets = [["q_proj", "v_proj"], ["fc1"], ["q_proj", "fc2"], ["k_proj", "fc1"]]
    union = sorted({t for ts in targets for t in ts})
    hetero = af.stack([lora(fn, i, r=2, targets=t) for i, t in enumerate(targets)])
    same = af.stack([lora(fn, i, r=2, targets=union) for i in range(4)])
    ids4 = torch.cat([ids, ids])
    route = torch.tensor([0, 1, 2, 3])
    flops = []
    for s in (hetero, same):
        g = af.inject(fn, s, route=route)
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            g(params, input_ids=ids4)
        flops.append(fc.get_total_flops())
    assert flops[0] == flops[1] > 0


@pytest.mark.parametrize("kind", ["ia3", "adalora"])
def test_hetero_stacks_of_other_methods(opt, kind):
    _, fn, params, ids = opt
    if kind == "ia3":
        ads = [ia3(fn, 0, targets=("q_proj", "v_proj"), ff=()), ia3(fn, 1, targets=("fc2", "v_proj"), ff=("fc2",))]
    else:
        ads = [adalora(fn, 0, targets=("q_proj", "v_proj")), adalora(fn, 1, targets=("v_proj", "fc1"))]
    s = af.stack([ads[0], af.scale(ads[1], 0.5)])
    loop = torch.stack([logits(fn, params, ids, ads[0]), logits(fn, params, ids, af.scale(ads[1], 0.5))])
    vm = torch.func.vmap(lambda a: af.inject(fn, a)(params, input_ids=ids).logits)(s)
    torch.testing.assert_close(vm, loop, atol=1e-5, rtol=1e-5)
    rows = af.inject(fn, s, route=torch.tensor([1, 0]))(params, input_ids=ids).logits
    torch.testing.assert_close(rows, torch.stack([loop[1, 0], loop[0, 1]]), atol=1e-5, rtol=1e-5)


def test_stacks_hold_one_method(opt):
    _, fn, _, _ = opt
    with pytest.raises(af.IncompatibleAdapterError, match="item 1 is ia3, item 0 is lora.*AdapterSum"):
        af.stack([lora(fn), ia3(fn)])
    emb = lora(fn, 1, targets=["embed_tokens", "q_proj"])
    q_linear_vs = af.stack([emb, lora(fn)])  # same kinds where they overlap: fine
    assert "model.decoder.embed_tokens" in q_linear_vs.paths


def test_scaled_adapters_switch_weights_without_recompiling():
    """The weight is a leaf, not structure: under torch.compile every weight (0 and 1 included) runs one graph."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).eval()
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False), generator=gen(0))
    x = torch.randn(4, 5, generator=gen(9))
    torch._dynamo.reset()

    @torch.compile(backend="eager", fullgraph=True)
    def step(ad, inp):
        return af.inject(fn, ad)(params, inp)

    step(af.scale(a, 0.5), x)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for w in (1.0, 0.0, -2.0, {"0": 3.0, "2": torch.tensor(0.25)}):  # (every module weighted: one structure)
            torch.testing.assert_close(step(af.scale(a, w), x), af.inject(fn, af.scale(a, w))(params, x))
