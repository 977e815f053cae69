"""Invariants of docs/design.md section 2 for functional / init / inject / merge / select / mask / stack on tiny
OPT, Llama and GPT-2 models: purity (1), torch.compile without recompiles (3), torch.func (4), exactness (5).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as torch_pytree
from conftest import gen, ids_for, tiny_gpt2, tiny_llama, tiny_opt
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import adaptfn as af

BUILD = {"opt": tiny_opt, "llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"opt": ["q_proj", "v_proj", "fc1"], "llama": ["q_proj", "v_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj"]}
EMBED = {"opt": "embed_tokens", "llama": "embed_tokens", "gpt2": "wte"}


def setup(kind, attn="eager", **kw):
    model = BUILD[kind](attn=attn, **kw)
    fn, params = af.functional(model)
    return model, fn, params, ids_for(model)


def lora(fn, kind, seed=0, r=3, alpha=5, targets=None, **kw):
    cfg = af.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets or TARGETS[kind]),
                        init_lora_weights=kw.pop("init_lora_weights", False), **kw)
    return af.init(fn, cfg, generator=gen(seed))


def perturb(a, seed=0, scale=0.05):
    """Move every float leaf except the gates (e.g. replacement copies of base weights) off its init."""
    g = gen(seed)
    return af.tree.map(lambda t: t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype) if t.dim() else t, a)


def map_leaf(a, name, f):
    """A copy of ``a`` with ``f`` applied to the leaves called ``name``."""
    tensors = {p: {n: (f(t) if n == name else t) for n, t in d.items()} for p, d in a.tensors.items()}
    return af.Adapter(a.method, a.config, dict(a.entries), tensors)


def logits(g, params, x):
    return g(params, input_ids=x).logits


def lm_loss(out, x):
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1))


def leaf_items(a):
    return [((p, n), t) for p, d in a.tensors.items() for n, t in d.items()]


def close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# -- (1) purity ---------------------------------------------------------------------------------------
def _hook_dicts(m):
    return {k: list(v.items()) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict)}


def model_snapshot(model):
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "versions": {n: t._version for n, t in tensors},
        "ids": {n: id(t) for n, t in tensors},
        "requires_grad": {n: t.requires_grad for n, t in tensors},
        "grad": {n: t.grad is None for n, t in tensors},
        "modules": {p: (id(m), type(m), m.training, "forward" in vars(m), sorted(vars(m)), _hook_dicts(m))
                    for p, m in model.named_modules(remove_duplicate=False)},
        "config": model.config.to_dict() if hasattr(model, "config") else None,
        "generation_config": model.generation_config.to_dict() if getattr(model, "generation_config", None) else None,
        "global_hooks": [dict(d) for d in (nn.modules.module._global_forward_hooks,
                                           nn.modules.module._global_forward_pre_hooks,
                                           nn.modules.module._global_backward_hooks)],
    }


def assert_model_unchanged(before, model):
    after = model_snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    for key in ("versions", "ids", "requires_grad", "grad", "config", "generation_config", "global_hooks"):
        assert after[key] == before[key], key
    assert after["modules"].keys() == before["modules"].keys()
    for p, v in before["modules"].items():
        assert after["modules"][p] == v, p


def params_snapshot(params):
    return [(k, id(v), v._version, v.clone()) for k, v in params.items()]


def assert_params_unchanged(before, params):
    assert [k for k, *_ in before] == list(params)
    for k, i, ver, val in before:
        v = params[k]
        assert id(v) == i and v._version == ver and torch.equal(v, val), k


def adapter_snapshot(a):
    return (a.structure_key, [(k, id(t), t._version, t.clone()) for k, t in leaf_items(a)])


def assert_adapter_unchanged(before, a):
    key, items = before
    assert a.structure_key == key
    now = leaf_items(a)
    assert [k for k, _ in now] == [k for k, *_ in items]
    for (k, t), (_, i, ver, val) in zip(now, items):
        assert id(t) == i and t._version == ver and torch.equal(t, val), k


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_purity_of_every_public_function(kind, tmp_path):
    model = BUILD[kind]()
    model.lm_head.train()  # mixed training flags: a blanket .eval()/.train() would show
    x = ids_for(model)
    with torch.no_grad():
        ref = model(input_ids=x).logits.clone()
    before = model_snapshot(model)

    fn, params = af.functional(model)
    assert_model_unchanged(before, model)
    p_before = params_snapshot(params)
    a = lora(fn, kind, targets=TARGETS[kind] + [EMBED[kind]], bias="lora_only")
    b = lora(fn, kind, seed=1, r=2, targets=TARGETS[kind][:1], modules_to_save=["lm_head"])
    b = perturb(b)
    snaps = {"a": adapter_snapshot(a), "b": adapter_snapshot(b)}
    rng = torch.get_rng_state()

    # inject + call (forward, autograd backward, torch.func.grad, vmap), generate
    g = af.inject(fn, a)
    out = logits(g, params, x)
    logits(af.inject(fn, af.mask(a, False)), params, x)
    lm_loss(logits(af.inject(fn, b), params, x), x)
    leaves = af.tree.map(lambda t: t.detach().clone().requires_grad_(True), a)
    lm_loss(logits(af.inject(fn, leaves), params, x), x).backward()
    torch.func.grad(lambda ad: lm_loss(logits(af.inject(fn, ad), params, x), x))(b)
    d = lora(fn, kind, seed=2)  # deltas only (stacked replacements have a test of their own)
    s = af.stack([d, af.mask(d, ".*q_proj"), perturb(d, seed=3)])
    torch.func.vmap(lambda ad: logits(af.inject(fn, ad), params, x))(s)
    af.unstack(s)
    g.generate(params, input_ids=x, max_new_tokens=2, do_sample=False)
    fn.generate(params, input_ids=x, max_new_tokens=2, do_sample=False)
    af.inject(fn, b, generator=gen(4))(params, input_ids=x)
    # merge / select / mask / AdapterSum
    merged = af.merge(params, a)
    fn(merged, input_ids=x)
    af.merge(params, b)
    both = af.select({"a": a, "b": b}, ["a", "b"])
    af.inject(fn, both)(params, input_ids=x)
    af.merge(params, both)
    af.select(a, TARGETS[kind][:1])
    af.mask(a, TARGETS[kind][:1])
    af.mask(both, False)
    # files
    af.state_dict(a)
    af.save(a, tmp_path / "a")
    af.save({"default": af.select(b, TARGETS[kind][:1]), "other": a}, tmp_path / "many")
    loaded = af.load(tmp_path / "a")
    af.inject(fn, loaded)(params, input_ids=x)
    af.merge(params, loaded)

    assert torch.equal(torch.get_rng_state(), rng)  # no hidden draws from the global RNG
    assert_model_unchanged(before, model)
    assert_params_unchanged(p_before, params)
    assert_adapter_unchanged(snaps["a"], a)
    assert_adapter_unchanged(snaps["b"], b)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref)
    assert torch.equal(logits(fn, params, x), ref)
    assert torch.equal(logits(af.inject(fn, a), params, x), out)


def test_purity_detectors_catch_mutations():
    """Negative controls: each kind of mutation the purity test looks for is caught by its snapshot."""
    mutations = [
        lambda m: torch.no_grad()(m.model.decoder.final_layer_norm.weight.mul_)(1.0),  # same values, new _version
        lambda m: m.model.decoder.final_layer_norm.bias.data.add_(1e-3),  # values
        lambda m: m.lm_head.register_forward_hook(lambda *a: None),
        lambda m: m.model.decoder.layers[0].fc1.__dict__.__setitem__("forward", lambda x: x),
        lambda m: m.model.decoder.layers[1].train(),
        lambda m: setattr(m.model.decoder.layers[0], "fc2", nn.Linear(37, 22)),
        lambda m: m.model.decoder.layers[0].self_attn.__setattr__("__class__", type("X", (nn.Module,), {})),
        lambda m: m.model.decoder.embed_positions.weight.requires_grad_(False),
    ]
    for mutate in mutations:
        model = tiny_opt()
        before = model_snapshot(model)
        mutate(model)
        with pytest.raises(AssertionError):
            assert_model_unchanged(before, model)
    params = {"w": torch.ones(3)}
    snap = params_snapshot(params)
    params["w"].add_(0)
    with pytest.raises(AssertionError):
        assert_params_unchanged(snap, params)
    model, fn, params, x = setup("opt")
    a = lora(fn, "opt")
    snap = adapter_snapshot(a)
    a.tensors[a.paths[0]]["lora_A"].mul_(1)
    with pytest.raises(AssertionError):
        assert_adapter_unchanged(snap, a)


def test_call_with_other_params_leaves_model_and_fn_alone():
    model, fn, params, x = setup("opt")
    before = model_snapshot(model)
    base = logits(fn, params, x)
    other = {k: (v + 1.0 if v.is_floating_point() and k.endswith("fc1.weight") else v) for k, v in params.items()}
    a = lora(fn, "opt")
    g = af.inject(fn, a)
    o1 = logits(g, other, x)
    assert not torch.equal(o1, logits(g, params, x))
    # a call that raises midway leaves nothing behind either
    with pytest.raises(Exception):  # noqa: B017 - whatever the model raises on bad input
        g(params, input_ids=torch.full((1, 3), 10_000))
    assert_model_unchanged(before, model)
    assert torch.equal(logits(fn, params, x), base)
    assert torch.equal(logits(g, other, x), o1)


# -- (3) torch.compile ---------------------------------------------------------------------------------
class CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _switch_set(fn, kind):
    a = [lora(fn, kind, seed=i) for i in range(3)]
    return a + [af.mask(a[0], False), af.mask(a[1], ".*q_proj"), af.mask(a[2], TARGETS[kind][-1:])]


def test_compile_switching_adapters_no_recompiles():
    """A fresh fn compiled once; switching among adapters of one structure recompiles nothing."""
    kind = "llama"
    model, fn, params, x = setup(kind, layers=1)  # the cold first compile traces the structural copy: keep it small
    adapters = _switch_set(fn, kind)
    torch._dynamo.reset()
    backend = CountingBackend()

    @torch.compile(backend=backend)
    def step(ad, ids):
        return af.inject(fn, ad)(params, input_ids=ids).logits

    close(step(adapters[0], x), logits(af.inject(fn, adapters[0]), params, x))
    graphs = backend.graphs
    assert graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ad in adapters[1:] + adapters[:1]:
            got = step(ad, x)
            close(got, logits(af.inject(fn, ad), params, x))
    assert backend.graphs == graphs
    # the masked adapter computes the base model
    close(step(adapters[3], x), logits(fn, params, x))


def test_compile_fullgraph_single_graph_no_recompiles():
    """Once the structural copy exists, inject + call traces into one graph (no breaks) and switching adapters,
    masked ones included, reuses it."""
    model, fn, params, x = setup("opt")
    adapters = _switch_set(fn, "opt")
    af.inject(fn, adapters[0])(params, input_ids=x)  # warm: builds this structure's copy eagerly
    torch._dynamo.reset()
    backend = CountingBackend()

    @torch.compile(backend=backend, fullgraph=True)
    def step(ad, ids):
        return af.inject(fn, ad)(params, input_ids=ids).logits

    step(adapters[0], x)
    assert backend.graphs == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ad in adapters[1:] + adapters[:1]:
            close(step(ad, x), logits(af.inject(fn, ad), params, x))
    assert backend.graphs == 1
    # a different structure is a new graph (sanity check of the counter)
    step(lora(fn, "opt", r=2), x)
    assert backend.graphs == 2


# -- (4) torch.func ------------------------------------------------------------------------------------
def _ref_grads(fn, params, a, x):
    """torch.autograd reference: leaves as requires_grad tensors."""
    leaves, spec = torch_pytree.tree_flatten(a)
    req = [t.detach().clone().requires_grad_(True) for t in leaves]
    loss = lm_loss(logits(af.inject(fn, torch_pytree.tree_unflatten(req, spec)), params, x), x)
    grads = torch.autograd.grad(loss, req, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(req, grads)]
    return torch_pytree.tree_unflatten(grads, spec)


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_grad_is_adapter_shaped_and_matches_autograd(kind):
    model, fn, params, x = setup(kind)
    a = lora(fn, kind, targets=TARGETS[kind] + [EMBED[kind]])

    def loss(ad):
        return lm_loss(logits(af.inject(fn, ad), params, x), x)

    g = torch.func.grad(loss)(a)
    assert isinstance(g, af.Adapter)
    assert g.structure_key == a.structure_key
    assert torch_pytree.tree_structure(g) == torch_pytree.tree_structure(a)
    ref = _ref_grads(fn, params, a, x)
    for (k, t), (_, r) in zip(leaf_items(g), leaf_items(ref)):
        assert t.shape == r.shape, k
        if k[1] == "gate" or k[1] in a.entries[k[0]].frozen:
            # the gate is only read as gate != 0; frozen replacements (PEFT's saved embedding matrix) detached
            assert torch.count_nonzero(t) == 0 and torch.count_nonzero(r) == 0, k
        else:
            close(t, r, atol=1e-6, rtol=1e-4)
            assert t.abs().sum() > 0, k
    # grad + value
    gv, v = torch.func.grad_and_value(loss)(a)
    close(v, loss(a))


def test_grad_matches_finite_differences_float64():
    model = tiny_gpt2().double()  # GPT-2 eager runs all in float64 (Llama's RMSNorm, OPT's softmax upcast to fp32)
    fn, params = af.functional(model)
    x = ids_for(model)
    a = lora(fn, "gpt2", targets=["c_attn", "mlp.c_proj", "wte"])
    assert a.tensors[a.paths[0]]["lora_A"].dtype == torch.float64

    def loss(ad):
        return lm_loss(logits(af.inject(fn, ad), params, x), x)

    g = torch.func.grad(loss)(a)
    eps = 1e-6
    picks = [(p, n, idx) for p in a.paths for n, idx in (("lora_A", (1, 2)), ("lora_B", (3, 0)))]
    picks.append(("transformer.wte", "lora_A", (1, int(x[0, 0]))))  # an embedding row that is looked up
    for p, n, idx in picks:
        def shifted(delta, p=p, n=n, idx=idx):
            def f(t, key):
                if key != (p, n):
                    return t
                t = t.clone()
                t[idx] += delta
                return t
            tensors = {q: {m: f(t, (q, m)) for m, t in d.items()} for q, d in a.tensors.items()}
            return af.Adapter(a.method, a.config, dict(a.entries), tensors)

        fd = (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)
        assert abs(fd.item() - g.tensors[p][n][idx].item()) <= 1e-6 + 1e-5 * abs(fd.item()), (p, n, idx)


@pytest.mark.parametrize("kind", ["opt", "gpt2"])
def test_grad_of_masked_modules_is_exactly_zero(kind):
    model, fn, params, x = setup(kind)
    a = perturb(lora(fn, kind, modules_to_save=["lm_head"]))
    keep = TARGETS[kind][:1]
    m = af.mask(a, keep)

    def loss(ad):
        return lm_loss(logits(af.inject(fn, ad), params, x), x)

    g = torch.func.grad(loss)(m)
    on = [p for p in a.paths if p.endswith(tuple("." + t for t in keep))]
    assert on
    for (p, n), t in leaf_items(g):
        if p in on and n != "gate":
            assert t.abs().sum() > 0, (p, n)
        else:
            assert torch.count_nonzero(t) == 0, (p, n)  # masked delta and masked replacement (lm_head)
    # the unmasked leaves see the same gradient as the selected sub-adapter
    gs = torch.func.grad(loss)(af.select(a, keep))
    for p in on:
        for n in ("lora_A", "lora_B"):
            close(g.tensors[p][n], gs.tensors[p][n], atol=1e-6, rtol=1e-5)
    # and the replacement gets a gradient when on
    g_all = torch.func.grad(loss)(a)
    assert g_all.tensors["lm_head"]["weight"].abs().sum() > 0


VMAP_CASES = [("opt", "eager"), ("opt", "sdpa"), ("llama", "eager"), ("llama", "sdpa"), ("gpt2", "eager")]


def _mixed_adapters(fn, kind):
    a1 = lora(fn, kind, seed=0, r=2, alpha=3)
    a2 = lora(fn, kind, seed=1, r=4, alpha=7, use_rslora=True)
    a3 = af.mask(lora(fn, kind, seed=2, r=3, alpha=1), TARGETS[kind][:1])
    a4 = af.mask(lora(fn, kind, seed=3, r=1, alpha=2), False)
    return [a1, a2, a3, a4]


@pytest.mark.parametrize("kind,attn", VMAP_CASES)
def test_vmap_over_stacked_equals_loop(kind, attn):
    model, fn, params, x = setup(kind, attn=attn)
    ads = _mixed_adapters(fn, kind)
    out = torch.func.vmap(lambda ad: af.inject(fn, ad)(params, input_ids=x).logits)(af.stack(ads))
    loop = torch.stack([logits(af.inject(fn, ad), params, x) for ad in ads])
    assert out.shape == loop.shape
    close(out, loop)
    close(out[3], logits(fn, params, x))  # the fully masked row is the base model
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("kind,attn", [("opt", "sdpa"), ("llama", "eager"), ("gpt2", "eager")])
def test_vmap_of_grad_equals_loop(kind, attn):
    model, fn, params, x = setup(kind, attn=attn)
    ads = _mixed_adapters(fn, kind)

    def loss(ad):
        return lm_loss(logits(af.inject(fn, ad), params, x), x)

    stacked = af.stack(ads)
    gs = torch.func.vmap(torch.func.grad(loss))(stacked)
    assert isinstance(gs, af.Adapter) and gs.structure_key == stacked.structure_key
    for p in stacked.paths:  # padded rank slots get no gradient; the scaling leaf none either
        for i, ad in enumerate(ads):
            r = ad.entries[p].r
            assert torch.count_nonzero(gs.tensors[p]["lora_A"][i, r:]) == 0
            assert torch.count_nonzero(gs.tensors[p]["lora_B"][i, :, r:]) == 0
        assert torch.count_nonzero(gs.tensors[p]["scaling"]) == 0
    for ad, g in zip(ads, af.unstack(gs)):
        ref = torch.func.grad(loss)(ad)
        for (k, t), (k2, r) in zip(leaf_items(g), leaf_items(ref)):
            assert k == k2
            close(t, r, atol=1e-6, rtol=1e-4)
    assert all(torch.count_nonzero(t) == 0 for _, t in leaf_items(af.unstack(gs)[3]))


def test_vmap_over_stacked_replacements():
    """Stacked replacement entries (modules_to_save): each row swaps its own copy; a masked row the base."""
    model, fn, params, x = setup("opt")
    a = perturb(lora(fn, "opt", targets=["q_proj"], modules_to_save=["lm_head"]))
    b = perturb(lora(fn, "opt", seed=1, targets=["q_proj"], modules_to_save=["lm_head"]), seed=1)
    ads = [a, b, af.mask(b, False), af.mask(a, ".*q_proj"), af.mask(b, ["lm_head"])]
    out = torch.func.vmap(lambda ad: af.inject(fn, ad)(params, input_ids=x).logits)(af.stack(ads))
    for i, ad in enumerate(ads):
        close(out[i], logits(af.inject(fn, ad), params, x))
    close(out[2], logits(fn, params, x))


# -- (5) exactness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_mask_false_is_base_bit_for_bit(kind):
    model, fn, params, x = setup(kind)
    base = logits(fn, params, x)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, base)
    a = perturb(lora(fn, kind, targets=TARGETS[kind] + [EMBED[kind]], bias="all", modules_to_save=["lm_head"]))
    off = af.mask(a, False)
    assert torch.equal(logits(af.inject(fn, off), params, x), base)
    assert not torch.equal(logits(af.inject(fn, a), params, x), base)
    # merge of an all-off adapter hands back the very same tensors
    merged = af.merge(params, off)
    assert merged is not params and all(merged[k] is params[k] for k in params)
    # masking an AdapterSum, and injecting masked adapters on top of each other
    s = af.select({"x": a, "y": lora(fn, kind, seed=5, targets=TARGETS[kind][:1])}, ["x", "y"])
    assert torch.equal(logits(af.inject(fn, af.mask(s, False)), params, x), base)
    off2 = af.mask(lora(fn, kind, seed=6), False)
    assert torch.equal(logits(af.inject(af.inject(fn, off), off2), params, x), base)


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_merge_equals_inject(kind):
    model, fn, params, x = setup(kind)
    a = perturb(lora(fn, kind, targets=TARGETS[kind] + [EMBED[kind]], bias="lora_only"))
    out = logits(af.inject(fn, a), params, x)
    merged = af.merge(params, a)
    close(logits(fn, merged, x), out)
    assert not torch.allclose(out, logits(fn, params, x))
    # untouched entries are the same tensor objects; merged weights are new tensors
    deltas = {f"{p}.weight" for p, e in a.entries.items() if e.kind}
    replaced = {f"{p}.{n}" for p, e in a.entries.items() for n in e.replaced}
    replaced |= {k for k in params for r in replaced if params[k] is params[r]}  # tied aliases
    assert merged.keys() == params.keys()
    for k in params:
        if k in deltas:
            assert merged[k] is not params[k], k
        elif k not in replaced:
            assert merged[k] is params[k], k
    # merging a partly masked adapter equals injecting it
    m = af.mask(a, TARGETS[kind][:1])
    close(logits(fn, af.merge(params, m), x), logits(af.inject(fn, m), params, x))


def test_merge_on_gpt2_square_conv1d_after_save_load(tmp_path):
    """GPT-2's attn.c_proj is a square Conv1D ([in, out] == [out, in]): merge must transpose the delta even for
    an adapter read back from disk."""
    model, fn, params, x = setup("gpt2")
    a = lora(fn, "gpt2", targets=["c_proj"])
    af.save(a, tmp_path)
    b = af.load(tmp_path)
    out = logits(af.inject(fn, a), params, x)
    close(logits(af.inject(fn, b), params, x), out)
    close(logits(fn, af.merge(params, a), x), out)
    close(logits(fn, af.merge(params, b), x), out)


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_zero_lora_b_equals_base(kind):
    model, fn, params, x = setup(kind)
    a = lora(fn, kind, init_lora_weights=True)  # PEFT's init: B = 0
    assert all(not d["lora_B"].any() for d in a.tensors.values())
    assert torch.equal(logits(af.inject(fn, a), params, x), logits(fn, params, x))
    z = map_leaf(lora(fn, kind), "lora_B", torch.zeros_like)
    assert torch.equal(logits(af.inject(fn, z), params, x), logits(fn, params, x))


def test_modules_to_save_lm_head_unties_on_opt():
    model, fn, params, x = setup("opt")
    emb, head = "model.decoder.embed_tokens.weight", "lm_head.weight"
    assert params[head] is params[emb]
    a = perturb(lora(fn, "opt", targets=["q_proj"], modules_to_save=["lm_head"]))
    assert "lm_head" in a.entries and a.entries["lm_head"].replaced == ("weight",)
    assert not torch.equal(a.tensors["lm_head"]["weight"], params[head])
    merged = af.merge(params, a)
    assert merged[head] is not merged[emb]
    assert merged[emb] is params[emb]
    assert torch.equal(merged[head], a.tensors["lm_head"]["weight"])
    out = logits(af.inject(fn, a), params, x)
    close(logits(fn, merged, x), out)
    # reference: a copy of the model with lm_head untied by hand and the adapter merged in by hand
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.lm_head.weight = nn.Parameter(a.tensors["lm_head"]["weight"].clone())
        for p in a.paths:
            e = a.entries[p]
            if e.kind:
                mod = ref.get_submodule(p)
                mod.weight += e.scaling * a.tensors[p]["lora_B"] @ a.tensors[p]["lora_A"]
        assert ref.model.decoder.embed_tokens.weight is not ref.lm_head.weight
        close(ref(input_ids=x).logits, out)
    assert params[head] is params[emb]  # the input is still tied


def test_select_semantics():
    model, fn, params, x = setup("llama")
    a = perturb(lora(fn, "llama", targets=["q_proj", "v_proj", "down_proj", "embed_tokens"]))
    for where in (["q_proj"], r".*\.layers\.1\..*", lambda p: p.endswith("down_proj") or "embed" in p, True):
        s = af.select(a, where)
        pred = {
            str: lambda p, w=where: __import__("re").fullmatch(w, p) is not None,
            list: lambda p, w=where: any(p == e or p.endswith("." + e) for e in w),
            bool: lambda p: True,
        }.get(type(where), where)
        expect = [p for p in a.paths if pred(p)]
        assert list(s.paths) == expect and expect
        for p in expect:
            assert s.entries[p] == a.entries[p]
            assert all(s.tensors[p][n] is t for n, t in a.tensors[p].items())
        assert s.config == a.config and s.method == a.method
        # select == mask with the same where, bit for bit
        assert torch.equal(logits(af.inject(fn, s), params, x), logits(af.inject(fn, af.mask(a, where)), params, x))
        close(logits(fn, af.merge(params, s), x), logits(af.inject(fn, s), params, x))
    with pytest.raises(af.ConfigError):
        af.select(a, ["nothing_matches"])
    # select by name
    b = lora(fn, "llama", seed=3)
    assert af.select({"a": a, "b": b}, "b") is b
    with pytest.raises(af.ConfigError, match="zz"):
        af.select({"a": a, "b": b}, ["a", "zz"])


def test_mask_semantics_and_masked_replacement_is_base_tensor():
    model, fn, params, x = setup("opt")
    a = perturb(lora(fn, "opt", targets=["q_proj", "fc1"], modules_to_save=["lm_head"], bias="lora_only"))
    m = af.mask(a, ["q_proj"])
    assert m.structure_key == a.structure_key
    for p in a.paths:
        for n, t in a.tensors[p].items():
            if n == "gate":
                assert m.tensors[p][n].item() == (1.0 if p.endswith("q_proj") else 0.0)
            else:
                assert m.tensors[p][n] is t  # values kept, only the gate changes
    sel = af.select(a, ["q_proj"])
    out_m = logits(af.inject(fn, m), params, x)
    assert torch.equal(out_m, logits(af.inject(fn, sel), params, x))
    # the merged params: masked replacements (lm_head, fc1 bias) give back the base tensor objects
    merged = af.merge(params, m)
    assert merged["lm_head.weight"] is params["lm_head.weight"]
    for p in a.paths:
        if p.endswith("fc1"):
            assert merged[f"{p}.bias"] is params[f"{p}.bias"] and merged[f"{p}.weight"] is params[f"{p}.weight"]
    # mask composes: masking everything the other mask kept turns all off
    assert torch.equal(logits(af.inject(fn, af.mask(m, lambda p: not p.endswith("q_proj"))), params, x),
                       logits(fn, params, x))


def test_adapter_sum_is_base_plus_sum_of_deltas_single_layer():
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(5, 7)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = One().double()
    fn, params = af.functional(model)
    x = torch.randn(3, 5, generator=gen(1), dtype=torch.float64)
    a1 = af.init(fn, af.LoraConfig(r=2, lora_alpha=3, target_modules=["proj"], init_lora_weights=False),
                 generator=gen(2))
    a2 = af.init(fn, af.LoraConfig(r=4, lora_alpha=1, target_modules=["proj"], init_lora_weights=False,
                                   use_rslora=True), generator=gen(3))
    base = fn(params, x)
    d1 = af.inject(fn, a1)(params, x) - base
    d2 = af.inject(fn, a2)(params, x) - base
    s = af.select({"one": a1, "two": a2}, ["one", "two"])
    assert isinstance(s, af.AdapterSum)
    close(af.inject(fn, s)(params, x), base + d1 + d2, atol=1e-12, rtol=1e-12)
    close(fn(af.merge(params, s), x), base + d1 + d2, atol=1e-12, rtol=1e-12)
    close(af.inject(af.inject(fn, a1), a2)(params, x), base + d1 + d2, atol=1e-12, rtol=1e-12)
    # by hand
    hand = sum(e.scaling * (x @ a.tensors["proj"]["lora_A"].T @ a.tensors["proj"]["lora_B"].T)
               for a in (a1, a2) for e in [a.entries["proj"]])
    close(d1 + d2, hand, atol=1e-12, rtol=1e-12)
    # a masked part drops out
    s_half = af.select({"one": a1, "two": af.mask(a2, False)}, ["one", "two"])
    assert torch.equal(af.inject(fn, s_half)(params, x), af.inject(fn, a1)(params, x))


def test_adapter_sum_weight_deltas_add_on_opt():
    model, fn, params, x = setup("opt")
    a1 = lora(fn, "opt", targets=["q_proj", "fc1"])
    a2 = lora(fn, "opt", seed=1, r=2, alpha=9, targets=["q_proj", "v_proj"])
    s = af.select({"x": a1, "y": a2}, ["x", "y"])
    m1, m2, ms = af.merge(params, a1), af.merge(params, a2), af.merge(params, s)
    for k in params:
        close(ms[k] - params[k], (m1[k] - params[k]) + (m2[k] - params[k]), atol=1e-6, rtol=1e-5)
    out = logits(af.inject(fn, s), params, x)
    close(logits(fn, ms, x), out)
    close(logits(af.inject(af.inject(fn, a1), a2), params, x), out)
    # the stateless composition is order-free
    close(logits(af.inject(fn, af.select({"y": a2, "x": a1}, ["y", "x"])), params, x), out)
    # two adapters replacing the same tensor cannot add
    r1 = lora(fn, "opt", targets=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(af.ConfigError, match="lm_head"):
        af.select({"x": r1, "y": r1}, ["x", "y"])
    with pytest.raises(af.ConfigError, match="lm_head"):
        af.inject(af.inject(fn, r1), r1)


class MatmulShapes(TorchDispatchMode):
    """Records (op, input shapes, output shape) of every matrix product dispatched."""

    OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "einsum", "_unsafe_view"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.OPS - {"_unsafe_view"} and isinstance(out, torch.Tensor):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.seen.append((name, shapes, tuple(out.shape)))
        return out


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_inject_never_materialises_dense_delta(kind):
    """lorax-style: the unmerged forward (and its backward) computes B(A x), never B @ A of shape [out, in]."""
    model, fn, params, x = setup(kind)
    a = lora(fn, kind, targets=TARGETS[kind] + [EMBED[kind]], r=2)
    modules = dict(model.named_modules())
    dense = set()
    for p, e in a.entries.items():
        A, B = a.tensors[p]["lora_A"], a.tensors[p]["lora_B"]
        out_dim, in_dim = B.shape[0], A.shape[1]
        dense |= {(out_dim, in_dim), (in_dim, out_dim)}
        assert e.kind in ("linear", "embedding") and modules[p] is not None
    rows = x.numel()
    # the detector must not confuse activations with a delta
    assert all(rows not in d for d in dense)
    req = af.tree.map(lambda t: t.detach().clone().requires_grad_(True), a)
    with MatmulShapes() as rec:
        out = logits(af.inject(fn, req), params, x)
        lm_loss(out, x).backward()
    assert rec.seen, "no matrix product seen: the detector is broken"
    bad = [s for s in rec.seen if s[2][-2:] in dense]
    assert not bad, f"dense [out, in] products during inject: {bad[:5]}"
    d = af.select(a, [p for p in a.paths if not a.entries[p].replaced])  # (stacked replacements: own test)
    with MatmulShapes() as rec:
        torch.func.vmap(lambda ad: af.inject(fn, ad)(params, input_ids=x).logits)(af.stack([d, d]))
    bad = [s for s in rec.seen if s[2][-2:] in dense]
    assert not bad, f"dense [out, in] products under vmap: {bad[:5]}"
    # positive control: merge does form the dense delta, and the detector sees it
    with MatmulShapes() as rec:
        af.merge(params, a)
    assert any(s[2][-2:] in dense for s in rec.seen)


def test_dropout_needs_generator_and_is_deterministic():
    model, fn, params, x = setup("llama")
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    a = af.init(fn, af.LoraConfig(lora_dropout=0.5, **cfg), generator=gen(0))
    a0 = af.init(fn, af.LoraConfig(lora_dropout=0.0, **cfg), generator=gen(0))
    for (k, t), (_, u) in zip(leaf_items(a), leaf_items(a0)):
        assert torch.equal(t, u), k
    rng = torch.get_rng_state()
    no_gen = logits(af.inject(fn, a), params, x)
    assert torch.equal(no_gen, logits(af.inject(fn, a), params, x))  # without generator: no dropout
    assert torch.equal(no_gen, logits(af.inject(fn, a0), params, x))
    d1 = logits(af.inject(fn, a, generator=gen(7)), params, x)
    d2 = logits(af.inject(fn, a, generator=gen(7)), params, x)
    d3 = logits(af.inject(fn, a, generator=gen(8)), params, x)
    assert torch.equal(d1, d2)
    assert not torch.allclose(d1, no_gen)
    assert not torch.allclose(d1, d3)
    # the generator advances: a second call with the same generator draws new masks
    gg = gen(7)
    g = af.inject(fn, a, generator=gg)
    first, second = logits(g, params, x), logits(g, params, x)
    assert torch.equal(first, d1) and not torch.allclose(first, second)
    # dropout with p=0 or a generator on a no-dropout adapter is the plain forward
    assert torch.equal(logits(af.inject(fn, a0, generator=gen(7)), params, x), no_gen)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is never used
    # grad through dropout is deterministic for a seed too
    def loss(ad, seed):
        return lm_loss(logits(af.inject(fn, ad, generator=gen(seed)), params, x), x)

    g1, g2 = torch.func.grad(loss)(a, 3), torch.func.grad(loss)(a, 3)
    assert all(torch.equal(t, u) for (_, t), (_, u) in zip(leaf_items(g1), leaf_items(g2)))


def test_inject_checks_adapter_against_model():
    model, fn, params, x = setup("opt")
    fnl, _ = af.functional(tiny_llama())
    a = lora(fnl, "llama", targets=["q_proj"])
    with pytest.raises(af.IncompatibleAdapterError, match="model.layers.0.self_attn.q_proj"):
        af.inject(fn, a)
    b = lora(fn, "opt", targets=["q_proj"])
    wrong = map_leaf(b, "lora_A", lambda t: t[:, :-1])
    with pytest.raises(af.IncompatibleAdapterError, match=r"\[3, 21\]"):
        af.inject(fn, wrong)
    with pytest.raises(af.ConfigError):
        af.merge(params, af.stack([b, b]))


def test_many_structures_share_one_model_correctly():
    """Several adapters of different structures, interleaved calls: each call sees only its own adapter."""
    model, fn, params, x = setup("opt")
    ads = [lora(fn, "opt", seed=i, r=1 + i, targets=TARGETS["opt"][: 1 + i % 3]) for i in range(6)]
    refs = [logits(fn, af.merge(params, ad), x) for ad in ads]
    for i, j in itertools.product(range(len(ads)), repeat=2):
        if (i + 2 * j) % 5 == 0:
            close(logits(af.inject(fn, ads[i]), params, x), refs[i])
            close(logits(af.inject(fn, ads[j]), params, x), refs[j])
    assert torch.equal(logits(fn, params, x), model(input_ids=x).logits)
