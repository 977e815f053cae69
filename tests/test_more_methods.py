"""Properties of the LoHa, LoKr, OFT and VeRA methods (PEFT parity is in tests/parity/test_more_methods_parity.py):
``grad`` gives an Adapter-shaped gradient, ``vmap`` over a stack and ``route=`` equal the loop, ``mask(a, False)``
is the base bit for bit, merge == inject, ``af.scale``'s identities, no recompiles when switching adapters under
torch.compile, declared capabilities (``af.combine`` refused naming the method), config checks, VeRA's shared
projections, and PEFT's shape rules (LoKr's factorization, OFT's block adjustment) checked with hypothesis."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from conftest import gen, ids_for, tiny_gpt2, tiny_opt
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adaptfn as af
from adaptfn import methods
from adaptfn.methods import base
from adaptfn.methods.lokr import factorization, lokr_shapes
from adaptfn.methods.oft import adjust_oft_parameters

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# configs on tiny OPT (hidden 22, ffn 37); each method's three adapters differ in rank where it has one
CONFIGS = {
    "loha": lambda r: af.LoHaConfig(r=r, alpha=3, target_modules=["q_proj", "fc1"], init_weights=False),
    "lokr": lambda r: af.LoKrConfig(r=r, alpha=3, target_modules=["q_proj", "fc1"], init_weights=False),
    "oft": lambda r: af.OFTConfig(oft_block_size=11, target_modules=["q_proj", "fc1", "embed_tokens"],
                                  init_weights=False, coft=True, eps=0.3),
    "vera": lambda r: af.VeraConfig(r=r + 2, target_modules=["q_proj", "fc1"], init_weights=False),
}
NAMES = list(CONFIGS)


@pytest.fixture(scope="module")
def opt_setup():
    model = tiny_opt()
    fn, params = af.functional(model)
    return model, fn, params, ids_for(model)


def three(fn, name):
    return [af.init(fn, CONFIGS[name](r), generator=gen(i)) for i, r in enumerate((2, 3, 2))]


def logits(fn, params, a, ids):
    return af.inject(fn, a)(params, input_ids=ids).logits


@pytest.mark.parametrize("name", NAMES)
def test_grad_is_adapter_shaped(opt_setup, name) -> None:
    _, fn, params, ids = opt_setup
    a = af.mask(three(fn, name)[0], lambda p: "layers.1" not in p)
    g = torch.func.grad(lambda ad: logits(fn, params, ad, ids).square().mean())(a)
    assert isinstance(g, af.Adapter) and g.paths == a.paths and g.entries == a.entries
    for p in a.paths:
        assert set(g.leaves(p)) == set(a.leaves(p))
        for n, t in g.leaves(p).items():
            assert t.shape == a.leaves(p)[n].shape
            frozen = n == "gate" or n in a.entries[p].frozen or "layers.1" in p
            assert bool(t.abs().sum() == 0) == frozen or (n in a.entries[p].replaced), (p, n)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_route_and_unstack_equal_the_loop(opt_setup, name) -> None:
    _, fn, params, ids = opt_setup
    adapters = three(fn, name)
    stacked = af.stack(adapters)
    loop = torch.stack([logits(fn, params, a, ids) for a in adapters])
    torch.testing.assert_close(torch.func.vmap(lambda a: logits(fn, params, a, ids))(stacked), loop)
    torch.testing.assert_close(af.inject(fn, stacked, route="all")(params, input_ids=ids).logits, loop)
    rows = torch.cat([ids, ids[:1]])
    route = torch.tensor([2, -1, 0])
    got = af.inject(fn, stacked, route=route)(params, input_ids=rows).logits
    base = fn(params, input_ids=rows).logits
    want = torch.stack([base[i] if j < 0 else logits(fn, params, adapters[j], rows[i:i + 1])[0]
                        for i, j in enumerate(route.tolist())])
    torch.testing.assert_close(got, want)
    for a, b in zip(adapters, af.unstack(stacked)):
        assert b.entries == a.entries and all(torch.equal(b.leaves(p)[n], t) for p in a.paths
                                              for n, t in a.leaves(p).items())


@pytest.mark.parametrize("name", NAMES)
def test_mask_merge_and_scale_identities(opt_setup, name) -> None:
    _, fn, params, ids = opt_setup
    a = three(fn, name)[0]
    base = fn(params, input_ids=ids).logits
    out = logits(fn, params, a, ids)
    assert not torch.allclose(out, base)
    assert torch.equal(logits(fn, params, af.mask(a, False), ids), base)
    part = r".*layers\.0\..*"
    torch.testing.assert_close(logits(fn, params, af.mask(a, part), ids), logits(fn, params, af.select(a, part), ids),
                               rtol=0, atol=0)
    torch.testing.assert_close(fn(af.merge(params, a), input_ids=ids).logits, out)
    assert torch.equal(logits(fn, params, af.scale(a, 1.0), ids), out)
    assert torch.equal(logits(fn, params, af.scale(a, 0.0), ids), base)
    s = af.scale(a, 0.4)
    torch.testing.assert_close(logits(fn, params, af.scale(af.scale(a, 0.5), 0.8), ids), logits(fn, params, s, ids))
    torch.testing.assert_close(fn(af.merge(params, s), input_ids=ids).logits, logits(fn, params, s, ids))
    # the weight is a true multiplier: differentiable, moving the output away from the base
    w = torch.tensor(0.3)
    dw = torch.func.grad(lambda w: logits(fn, params, af.scale(a, w), ids).square().mean())(w)
    assert dw.abs() > 0


@pytest.mark.parametrize("name", NAMES)
def test_capabilities_are_declared_and_combine_is_refused(opt_setup, name) -> None:
    _, fn, _, _ = opt_setup
    m = methods.get_method(name)
    assert isinstance(m, base.Method) and m.capabilities == {base.ROUTE, base.SCALE}
    assert isinstance(m, base.SharedTensors) == (name == "vera")
    a1, a2, _ = three(fn, name)
    with pytest.raises(af.ConfigError, match=f"af.combine is not supported for {name} adapters"):
        af.combine([a1, a2], [0.5, 0.5])
    assert methods.method_for_peft_type(name.upper(), "x") is m
    assert methods.method_for_config(CONFIGS[name](2)) is m


@pytest.mark.parametrize("name", NAMES)
def test_saved_and_loaded_adapter_has_the_fresh_structure(opt_setup, name, tmp_path) -> None:
    """A loaded adapter is the same pytree as the one saved (entries, leaf names and order), so the two stack,
    tree-map together and share compiled code."""
    _, fn, params, ids = opt_setup
    a = three(fn, name)[0]
    af.save(a, tmp_path)
    b = af.load(tmp_path)
    assert b.entries == a.entries and b.structure_key == a.structure_key
    assert af.tree.structure(b) == af.tree.structure(a)
    assert all(list(b.leaves(p)) == list(a.leaves(p)) for p in a.paths)
    assert torch.equal(logits(fn, params, b, ids), logits(fn, params, a, ids))
    af.stack([a, b])


class _CountingBackend:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


MLP_CONFIGS = {
    "loha": af.LoHaConfig(r=2, alpha=3, target_modules=["0", "2"], init_weights=False),
    "lokr": af.LoKrConfig(r=2, alpha=3, target_modules=["0", "2"], init_weights=False),
    "oft": af.OFTConfig(oft_block_size=4, target_modules=["0", "2"], init_weights=False),
    "vera": af.VeraConfig(r=4, target_modules=["0", "2"], init_weights=False),
}


@pytest.mark.parametrize("name", NAMES)
def test_compile_switching_adapters_no_recompiles(name) -> None:
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8)).eval()
    fn, params = af.functional(model)
    adapters = [af.init(fn, MLP_CONFIGS[name], generator=gen(i)) for i in range(2)]
    adapters += [af.mask(adapters[0], False), af.mask(adapters[1], ["2"]), af.scale(adapters[0], 1.0)]
    x = torch.randn(3, 12, generator=gen(9))
    torch._dynamo.reset()
    backend = _CountingBackend()

    @torch.compile(backend=backend)
    def step(ad, inp):
        return af.inject(fn, ad)(params, inp)

    step(adapters[0], x)
    graphs = backend.graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ad in adapters[1:4] + adapters[:1]:
            torch.testing.assert_close(step(ad, x), af.inject(fn, ad)(params, x))
    assert backend.graphs == graphs
    torch.testing.assert_close(step(adapters[2], x), model(x))


def test_mixed_methods_add_and_weight(opt_setup) -> None:
    """LoRA + LoHa on the same module add their deltas; a weighted select scales each part."""
    _, fn, params, ids = opt_setup
    lora = af.init(fn, af.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), generator=gen(1))
    loha = three(fn, "loha")[0]
    base = fn(params, input_ids=ids).logits
    both = logits(fn, params, af.select({"lora": lora, "loha": loha}, ["lora", "loha"]), ids)
    torch.testing.assert_close(fn(af.merge(af.merge(params, lora), loha), input_ids=ids).logits, both)
    weighted = af.select({"lora": lora, "loha": loha}, {"lora": 0.0, "loha": 1.0})
    assert torch.equal(logits(fn, params, weighted, ids), logits(fn, params, loha, ids))
    assert not torch.allclose(both, base)


def test_vera_projections_are_shared_frozen_and_stacked_once(opt_setup) -> None:
    _, fn, params, ids = opt_setup
    a1, a2, _ = (af.init(fn, af.VeraConfig(r=4, target_modules=["q_proj", "fc1"], init_weights=False),
                         generator=gen(i)) for i in range(3))
    p = a1.paths[0]
    assert all(a1.leaves(q)["vera_A"] is a1.leaves(p)["vera_A"] for q in a1.paths)
    assert a1.leaves(p)["vera_A"] is a2.leaves(p)["vera_A"]  # same key, same dims: one tensor
    assert a1.num_parameters() == sum(t.numel() for q in a1.paths for n, t in a1.leaves(q).items()
                                      if n.startswith("vera_lambda"))
    stacked = af.stack([a1, a2])
    assert stacked.leaves(p)["vera_A"].stride(0) == 0  # an expanded view, no copies
    loop = [logits(fn, params, a, ids) for a in (a1, a2)]
    torch.testing.assert_close(torch.func.vmap(lambda a: logits(fn, params, a, ids))(stacked), torch.stack(loop))
    routed = af.inject(fn, stacked, route=torch.tensor([1, 0]))(params, input_ids=ids).logits
    torch.testing.assert_close(routed, torch.stack([loop[1][0], loop[0][1]]))
    opt = af.optim.adamw(lr=0.1)
    g = torch.func.grad(lambda a: logits(fn, params, a, ids).square().mean())(a1)
    new, _ = opt.update(g, opt.init(a1), a1)
    assert new.leaves(p)["vera_A"] is a1.leaves(p)["vera_A"]
    assert not torch.equal(new.leaves(p)["vera_lambda_d"], a1.leaves(p)["vera_lambda_d"])
    # a projection that no longer agrees across modules cannot be saved as PEFT's one shared tensor
    bad = af.Adapter(a1.method, a1.config, dict(a1.entries), {
        q: {**a1.leaves(q), "vera_A": a1.leaves(q)["vera_A"] + (q == p)} for q in a1.paths})
    with pytest.raises(af.ConfigError, match="holds another vera_A"):
        af.state_dict(bad)


@pytest.mark.parametrize("cls", [af.LoHaConfig, af.LoKrConfig, af.OFTConfig])
def test_gpt2_conv1d_is_refused_as_peft_does(cls) -> None:
    fn, _ = af.functional(tiny_gpt2())
    with pytest.raises(af.IncompatibleAdapterError, match="Conv1D.*PEFT's"):
        af.init(fn, cls(target_modules=["c_attn"]))


BAD = [
    (af.LoHaConfig, "r", 0), (af.LoHaConfig, "alpha", math.nan), (af.LoHaConfig, "rank_dropout", 1.0),
    (af.LoHaConfig, "module_dropout", -0.1), (af.LoHaConfig, "init_weights", "lycoris"),
    (af.LoHaConfig, "rank_pattern", {"q": 0}), (af.LoHaConfig, "alpha_pattern", {"q": "1"}),
    (af.LoHaConfig, "use_effective_conv2d", 1), (af.LoHaConfig, "target_modules", "(bad"),
    (af.LoKrConfig, "decompose_factor", 0), (af.LoKrConfig, "decompose_both", "yes"),
    (af.LoKrConfig, "init_weights", "pissa"), (af.LoKrConfig, "rank_dropout_scale", None),
    (af.OFTConfig, "r", -1), (af.OFTConfig, "oft_block_size", 2.5), (af.OFTConfig, "bias", "lora_only"),
    (af.OFTConfig, "eps", math.inf), (af.OFTConfig, "num_cayley_neumann_terms", -1), (af.OFTConfig, "coft", 0),
    (af.VeraConfig, "r", 0), (af.VeraConfig, "projection_prng_key", -1), (af.VeraConfig, "vera_dropout", 1.5),
    (af.VeraConfig, "bias", "lora_only"), (af.VeraConfig, "save_projection", "true"),
    (af.VeraConfig, "layers_to_transform", [-1]),
]


@pytest.mark.parametrize("cls,field,value", BAD, ids=[f"{c.__name__}.{f}={v!r}" for c, f, v in BAD])
def test_config_fields_are_checked(cls, field, value) -> None:
    with pytest.raises(af.ConfigError, match=rf"{cls.__name__}\.{field}"):
        cls(**{field: value})


def test_oft_r_and_block_size_are_exclusive() -> None:
    with pytest.raises(af.ConfigError, match="exactly one of r"):
        af.OFTConfig(r=4, oft_block_size=8)
    with pytest.raises(af.ConfigError, match="exactly one of r"):
        af.OFTConfig(r=0, oft_block_size=0)


@pytest.mark.parametrize("cls", [af.LoHaConfig, af.LoKrConfig, af.OFTConfig, af.VeraConfig])
def test_configs_round_trip_and_keep_unknown_fields(cls) -> None:
    cfg = cls(target_modules=["q_proj"])
    raw = {**cfg.to_dict(), "from_the_future": 1}
    back = cls.from_dict(raw)
    assert back.to_dict() == raw and dataclasses.replace(back, extra={}) == cfg


# -- PEFT's shape rules, for any dimensions (hypothesis) ----------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(dim=st.integers(1, 600), factor=st.one_of(st.just(-1), st.integers(1, 40)))
def test_factorization_is_peft_s(dim, factor) -> None:
    from peft.tuners.lokr.layer import factorization as peft_factorization

    assert factorization(dim, factor) == peft_factorization(dim, factor)


@settings(max_examples=20, deadline=None)
@given(n_out=st.integers(1, 48), n_in=st.integers(1, 48), r=st.integers(1, 12), both=st.booleans(),
       factor=st.sampled_from([-1, 2, 3, 4]))
def test_lokr_leaves_are_the_ones_peft_creates(n_out, n_in, r, both, factor) -> None:
    import peft

    cfg = peft.LoKrConfig(r=r, decompose_both=both, decompose_factor=factor, target_modules=["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = peft.tuners.lokr.layer.Linear(nn.Linear(n_in, n_out), "default", config=cfg, r=r, alpha=r)
    want = {n: tuple(getattr(layer, n)["default"].shape) for n in layer.adapter_layer_names
            if "default" in getattr(layer, n)}
    assert lokr_shapes(n_out, n_in, r, both, factor) == want


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), value=st.integers(1, 320))
def test_oft_adjustment_is_peft_s(n, value) -> None:
    from peft.tuners.oft.layer import OFTLayer

    assert adjust_oft_parameters(n, value) == OFTLayer.adjust_oft_parameters(None, n, value)
