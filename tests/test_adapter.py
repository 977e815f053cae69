"""The Adapter type: immutability, summaries, pytree registration (torch and optree), stack/unstack.

Invariant 2 of docs/design.md: tensors are leaves keyed by module path then leaf name; method, config and
entries are static structure. Adapters of the same structure have equal tree specs.
"""

from __future__ import annotations

import dataclasses
import re

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from conftest import gen, tiny_llama, tiny_opt

import adaptfn as af

TARGETS = ["q_proj", "v_proj", "fc1"]


@pytest.fixture(scope="module")
def opt_fn():
    model = tiny_opt()
    fn, params = af.functional(model)
    return model, fn, params


def make(fn, seed=0, r=3, alpha=5, targets=TARGETS, **kw):
    return af.init(fn, af.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                                     **kw), generator=gen(seed))


def leaf_names(a):
    return {p: sorted(d) for p, d in a.tensors.items()}


def assert_same_adapter(a, b, *, exact=True):
    assert type(a) is type(b) is af.Adapter
    assert a.method == b.method
    assert a.config == b.config
    assert dict(a.entries) == dict(b.entries)
    assert leaf_names(a) == leaf_names(b)
    for p, d in a.tensors.items():
        for n, t in d.items():
            u = b.tensors[p][n]
            assert t.dtype == u.dtype and t.shape == u.shape, (p, n)
            if exact:
                assert torch.equal(t, u), (p, n)


# -- immutability ---------------------------------------------------------------------------------------
def test_setattr_raises(opt_fn):
    _, fn, _ = opt_fn
    a = make(fn)
    for name in ("foo", "_tensors", "_config", "method", "config"):
        with pytest.raises(AttributeError):
            setattr(a, name, 1)
    assert not hasattr(a, "__dict__")  # no back door through a plain instance dict
    assert a.method == "lora"


def test_delattr_raises_attribute_error(opt_fn):
    _, fn, _ = opt_fn
    a = make(fn)
    for name in ("_tensors", "_method", "foo"):
        with pytest.raises(AttributeError):
            delattr(a, name)
    assert a.method == "lora" and len(a.paths) == 6


def test_tensors_entries_are_read_only(opt_fn):
    _, fn, _ = opt_fn
    a = make(fn)
    path = a.paths[0]
    before = {p: dict(d) for p, d in a.tensors.items()}
    with pytest.raises(TypeError):
        a.tensors[path] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        a.tensors[path]["lora_A"] = torch.zeros(1)  # type: ignore[index]
    with pytest.raises(TypeError):
        del a.tensors[path]["gate"]  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        a.entries[path] = af.Entry()  # type: ignore[index]
    with pytest.raises(TypeError):
        a.leaves(path)["lora_B"] = torch.zeros(1)  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.entries[path].r = 99  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.config.r = 99  # type: ignore[misc]
    assert {p: dict(d) for p, d in a.tensors.items()} == before
    assert all(before[p][n] is t for p, d in a.tensors.items() for n, t in d.items())


def test_constructor_copies_its_mappings(opt_fn):
    _, fn, _ = opt_fn
    a = make(fn)
    entries = dict(a.entries)
    tensors = {p: dict(d) for p, d in a.tensors.items()}
    b = af.Adapter("lora", a.config, entries, tensors)
    path = a.paths[0]
    tensors[path]["lora_A"] = torch.zeros(1)
    tensors[path]["extra"] = torch.zeros(1)
    del tensors[a.paths[1]]
    entries.pop(path)
    assert b.paths == a.paths
    assert b.tensors[path]["lora_A"] is a.tensors[path]["lora_A"]
    assert set(b.tensors[path]) == {"lora_A", "lora_B", "gate"}


def test_entries_and_tensors_must_agree(opt_fn):
    _, fn, _ = opt_fn
    a = make(fn)
    tensors = {p: dict(d) for p, d in a.tensors.items()}
    tensors.pop(a.paths[-1])
    with pytest.raises(af.IncompatibleAdapterError, match=re.escape(a.paths[-1])):
        af.Adapter("lora", a.config, dict(a.entries), tensors)


# -- summaries -----------------------------------------------------------------------------------------
def test_repr_shows_method_modules_rank_params_dtype(opt_fn):
    _, fn, _ = opt_fn
    a = make(fn)
    text = repr(a)
    n = a.num_parameters()
    assert text.startswith("Adapter(lora")
    assert "6 modules" in text
    for t in TARGETS:
        assert t in text
    assert "r=3" in text
    assert f"{n:,}" in text and "params" in text
    assert "float32" in text
    # mixed ranks show a range; another dtype shows up
    b = af.init(fn, af.LoraConfig(r=2, target_modules=TARGETS, rank_pattern={"fc1": 5}), generator=gen(1),
                dtype=torch.float64)
    tb = repr(b)
    assert "r=2..5" in tb
    assert "float64" in tb and "float32" not in tb
    assert f"{b.num_parameters():,}" in tb
    # a masked adapter says so; a stacked one says stacked
    assert "6 masked" in repr(af.mask(a, False))
    assert "stacked" in repr(af.stack([a, a]))


def test_num_parameters_excludes_gate_and_scaling(opt_fn):
    model, fn, _ = opt_fn
    a = make(fn)
    expected = sum(t.numel() for d in a.tensors.values() for n, t in d.items() if n in ("lora_A", "lora_B"))
    assert a.num_parameters() == expected
    # by hand: q/v [3,22]+[22,3], fc1 [3,22]+[37,3], two layers
    assert expected == 2 * (2 * (3 * 22 + 22 * 3) + (3 * 22 + 37 * 3))
    assert all(d["gate"].dim() == 0 for d in a.tensors.values())
    # replacements count; gates still do not
    b = make(fn, targets=["q_proj"], modules_to_save=["lm_head"])
    lm = model.lm_head.weight.numel()
    assert b.num_parameters() == 2 * (3 * 22 + 22 * 3) + lm
    # stacked: the padded leaves count, the per-adapter scaling [N] and gates [N] do not
    s = af.stack([a, make(fn, seed=1, r=5)])
    total = sum(t.numel() for d in s.tensors.values() for n, t in d.items() if n not in ("gate", "scaling"))
    assert all("scaling" in d for d in s.tensors.values())
    assert s.num_parameters() == total
    assert af.mask(a, False).num_parameters() == a.num_parameters()


# -- pytrees -------------------------------------------------------------------------------------------
def test_torch_pytree_flatten_unflatten(opt_fn):
    _, fn, _ = opt_fn
    a = make(fn)
    leaves, spec = torch_pytree.tree_flatten(a)
    assert all(isinstance(t, torch.Tensor) for t in leaves)
    assert len(leaves) == sum(len(d) for d in a.tensors.values()) == 3 * len(a.paths)
    ids = {id(t) for d in a.tensors.values() for t in d.values()}
    assert {id(t) for t in leaves} == ids
    b = torch_pytree.tree_unflatten(leaves, spec)
    assert_same_adapter(a, b)
    assert b.structure_key == a.structure_key


def test_torch_pytree_tree_map(opt_fn):
    _, fn, _ = opt_fn
    a = make(fn)
    seen = []

    def f(t):
        seen.append(t)
        return t * 2

    b = torch_pytree.tree_map(f, a)
    assert isinstance(b, af.Adapter)
    assert all(isinstance(t, torch.Tensor) for t in seen)  # config, paths, entries never reach f
    assert b.config == a.config and dict(b.entries) == dict(a.entries) and b.paths == a.paths
    for p, d in a.tensors.items():
        for n, t in d.items():
            assert torch.equal(b.tensors[p][n], t * 2)
    # two trees at once
    c = torch_pytree.tree_map(lambda x, y: x - y, b, a)
    for p, d in a.tensors.items():
        for n, t in d.items():
            assert torch.equal(c.tensors[p][n], t)


def test_flatten_with_path_keyed_by_module_then_leaf(opt_fn):
    _, fn, _ = opt_fn
    a = make(fn)
    pairs, _ = torch_pytree.tree_flatten_with_path(a)
    keys = set()
    for kp, leaf in pairs:
        assert len(kp) == 2, kp
        assert isinstance(kp[0], torch_pytree.MappingKey) and isinstance(kp[1], torch_pytree.MappingKey)
        path, name = kp[0].key, kp[1].key
        assert leaf is a.tensors[path][name]
        keys.add((path, name))
    assert keys == {(p, n) for p, d in a.tensors.items() for n in d}
    # keys do not depend on the order entries were given in
    rev = list(reversed(a.paths))
    b = af.Adapter("lora", a.config, {p: a.entries[p] for p in rev}, {p: a.tensors[p] for p in rev})
    pairs_b, _ = torch_pytree.tree_flatten_with_path(b)
    by_key_a = {tuple(k.key for k in kp): t for kp, t in pairs}
    by_key_b = {tuple(k.key for k in kp): t for kp, t in pairs_b}
    assert by_key_a.keys() == by_key_b.keys()
    assert all(by_key_a[k] is by_key_b[k] for k in by_key_a)
    # keystr names the module path
    s = torch_pytree.keystr(pairs[0][0])
    assert pairs[0][0][0].key in s


def test_optree_namespace(opt_fn):
    _, fn, _ = opt_fn
    a = make(fn)
    leaves = optree.tree_leaves(a, namespace="adaptfn")
    assert len(leaves) == 3 * len(a.paths) and all(isinstance(t, torch.Tensor) for t in leaves)
    # without the namespace optree sees an opaque leaf (optree refuses global registration)
    assert optree.tree_leaves(a) == [a]
    b = optree.tree_map(lambda t: t + 1, a, namespace="adaptfn")
    c = af.tree.map(lambda t: t + 1, a)
    for x in (b, c):
        assert isinstance(x, af.Adapter) and x.paths == a.paths and x.config == a.config
        for p, d in a.tensors.items():
            for n, t in d.items():
                assert torch.equal(x.tensors[p][n], t + 1)
    paths, pleaves, _ = optree.tree_flatten_with_path(a, namespace="adaptfn")
    for path, leaf in zip(paths, pleaves):
        assert len(path) == 2 and leaf is a.tensors[path[0]][path[1]]
    assert {tuple(p) for p in paths} == {(p, n) for p, d in a.tensors.items() for n in d}
    assert af.tree.structure(a) == optree.tree_structure(a, namespace="adaptfn")
    assert af.tree.leaves(a) == leaves or all(x is y for x, y in zip(af.tree.leaves(a), leaves))
    # AdapterSum is a node too
    s = af.select({"x": a, "y": make(fn, seed=3)}, ["x", "y"])
    assert len(af.tree.leaves(s)) == 2 * len(leaves)
    assert len(torch_pytree.tree_leaves(s)) == 2 * len(leaves)
    s2 = af.tree.map(lambda t: t * 0, s)
    assert isinstance(s2, af.AdapterSum) and list(s2.parts) == ["x", "y"]


def test_same_structure_equal_treespecs(opt_fn):
    _, fn, _ = opt_fn
    a, b = make(fn, seed=0), make(fn, seed=1)
    m = af.mask(a, ".*q_proj")
    assert not torch.equal(a.tensors[a.paths[0]]["lora_A"], b.tensors[b.paths[0]]["lora_A"])
    specs = [torch_pytree.tree_structure(x) for x in (a, b, m)]
    assert specs[0] == specs[1] == specs[2]
    ospecs = [optree.tree_structure(x, namespace="adaptfn") for x in (a, b, m)]
    assert ospecs[0] == ospecs[1] == ospecs[2]
    assert a.structure_key == b.structure_key == m.structure_key
    # other static structure -> other spec
    for other in (make(fn, r=4), make(fn, alpha=7), make(fn, targets=["q_proj"]),
                  make(fn, use_rslora=True)):
        assert torch_pytree.tree_structure(other) != specs[0]
        assert optree.tree_structure(other, namespace="adaptfn") != ospecs[0]


def test_static_config_is_not_a_leaf(opt_fn):
    _, fn, _ = opt_fn
    a = make(fn)
    leaves, spec = torch_pytree.tree_flatten(a)
    assert not any(isinstance(x, (af.LoraConfig, af.Entry, str, float, int)) for x in leaves)
    # the scaling of a single adapter is static (in Entry), not a leaf
    assert all(set(d) == {"lora_A", "lora_B", "gate"} for d in a.tensors.values())
    # unflatten with arbitrary leaves keeps the config/entries from the spec
    b = torch_pytree.tree_unflatten([torch.zeros(()) for _ in leaves], spec)
    assert b.config is a.config and dict(b.entries) == dict(a.entries)
    # torch.func transforms see only tensors: vmap over a stacked adapter, grad over one
    s = af.stack([a, make(fn, seed=1)])
    sums = torch.func.vmap(lambda x: torch.stack([t.sum() for t in torch_pytree.tree_leaves(x)]))(s)
    assert sums.shape[0] == 2


def test_adaptersum_immutable_and_named(opt_fn):
    _, fn, _ = opt_fn
    s = af.select({"x": make(fn), "y": make(fn, seed=1)}, ["x", "y"])
    with pytest.raises(AttributeError):
        s.foo = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        s.parts["z"] = make(fn)  # type: ignore[index]
    assert s.num_parameters() == 2 * make(fn).num_parameters()
    assert "x:" in repr(s) and "y:" in repr(s)


# -- stack / unstack ----------------------------------------------------------------------------------
def test_stack_unstack_round_trip_mixed_ranks_and_alphas(opt_fn):
    _, fn, _ = opt_fn
    a1 = make(fn, seed=0, r=2, alpha=3)
    a2 = make(fn, seed=1, r=5, alpha=7.5, use_rslora=True)
    a3 = af.init(fn, af.LoraConfig(r=4, lora_alpha=1, target_modules=TARGETS, rank_pattern={"fc1": 1},
                                   init_lora_weights=False), generator=gen(2))
    a3 = af.mask(a3, ".*v_proj")
    s = af.stack([a1, a2, a3])
    assert s.is_stacked and s.stack_info.n == 3
    for p in s.paths:
        d = s.tensors[p]
        rmax = max(x.entries[p].r for x in (a1, a2, a3))
        assert s.entries[p].r == rmax
        assert d["lora_A"].shape[:2] == (3, rmax) and d["lora_B"].shape[0] == 3 and d["lora_B"].shape[2] == rmax
        assert d["gate"].shape == (3,)
        expected = torch.tensor([x.entries[p].scaling for x in (a1, a2, a3)], dtype=torch.float32)
        assert torch.equal(d["scaling"], expected)
        for i, x in enumerate((a1, a2, a3)):
            r = x.entries[p].r
            assert torch.equal(d["lora_A"][i, :r], x.tensors[p]["lora_A"])
            assert torch.equal(d["lora_B"][i, :, :r], x.tensors[p]["lora_B"])
            assert not d["lora_A"][i, r:].any() and not d["lora_B"][i, :, r:].any()  # zero padding
            assert torch.equal(d["gate"][i], x.tensors[p]["gate"])
    back = af.unstack(s)
    assert len(back) == 3
    for x, y in zip((a1, a2, a3), back):
        assert not y.is_stacked
        assert_same_adapter(x, y)
        assert y.structure_key == x.structure_key
    # stack is pure over a tree_map too: a stacked adapter maps like any other
    doubled = af.unstack(af.tree.map(lambda t: t * 2, s))
    for x, y in zip((a1, a2, a3), doubled):
        assert torch.equal(y.tensors[x.paths[0]]["lora_A"], x.tensors[x.paths[0]]["lora_A"] * 2)


def test_stacked_scaling_keeps_float64_precision():
    """A float64 adapter keeps float64 precision when stacked: the per-adapter scaling leaf must not round
    lora_alpha / r to float32 (vmap over the stack would then differ from the loop at ~1e-8)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7)).double()
    fn, params = af.functional(model)
    ads = [af.init(fn, af.LoraConfig(r=r, lora_alpha=1, target_modules=["0"], init_lora_weights=False),
                   generator=gen(r)) for r in (3, 7)]
    s = af.stack(ads)
    for i, a in enumerate(ads):
        assert s.tensors["0"]["scaling"][i].item() == a.entries["0"].scaling  # 1/3, 1/7 exactly as float64
    x = torch.randn(4, 5, generator=gen(9), dtype=torch.float64)
    out = torch.func.vmap(lambda ad: af.inject(fn, ad)(params, x))(s)
    loop = torch.stack([af.inject(fn, a)(params, x) for a in ads])
    torch.testing.assert_close(out, loop, atol=1e-13, rtol=1e-13)


def test_stack_errors_name_what_differs(opt_fn):
    _, fn, _ = opt_fn
    a = make(fn)
    other_targets = make(fn, targets=["q_proj", "v_proj"])
    mixed = af.stack([a, other_targets])  # different targets stack as their union (tests/test_algebra.py)
    assert set(mixed.paths) == set(a.paths) and [x.paths for x in af.unstack(mixed)] == [a.paths, other_targets.paths]

    ia3_like = af.Adapter("ia3", a.config, dict(a.entries), {p: dict(d) for p, d in a.tensors.items()})
    with pytest.raises(af.IncompatibleAdapterError) as ei:
        af.stack([a, ia3_like])
    assert "ia3" in str(ei.value) and "lora" in str(ei.value)
    assert isinstance(ei.value, af.AdaptfnError) and isinstance(ei.value, ValueError)

    # same path, a replacement on one and not the other
    with_bias = make(fn, bias="lora_only")
    with pytest.raises(af.IncompatibleAdapterError) as ei:
        af.stack([a, with_bias])
    assert "bias" in str(ei.value) and re.search(r"model\.decoder\.layers\.\d\.", str(ei.value))

    # same paths, different shapes: a model with another hidden size
    fn2, _ = af.functional(tiny_opt(hidden=24))
    b = make(fn2)
    with pytest.raises(af.IncompatibleAdapterError) as ei:
        af.stack([a, b])
    msg = str(ei.value)
    assert "[3, 22]" in msg and "[3, 24]" in msg and "lora_A" in msg

    with pytest.raises(af.ConfigError):
        af.stack([])
    with pytest.raises(af.ConfigError, match="already stacked"):
        af.stack([af.stack([a, a]), af.stack([a, a])])
    with pytest.raises(af.ConfigError, match="item 1"):
        af.stack([a, {"not": "an adapter"}])
    with pytest.raises(af.ConfigError, match="not stacked"):
        af.unstack(a)


def test_stack_of_other_model_structure_is_refused_by_the_model(opt_fn):
    """Adapters of two models share no module: they stack (as a union of targets, like any adapters with
    different targets), and the model refuses the modules it lacks, naming them."""
    _, fn, _ = opt_fn
    a = make(fn)
    fnl, _ = af.functional(tiny_llama())
    b = make(fnl, targets=["q_proj", "v_proj"])
    s = af.stack([a, b])
    with pytest.raises(af.IncompatibleAdapterError, match=r"model\.layers\.\d\.self_attn"):
        af.inject(fn, s)
