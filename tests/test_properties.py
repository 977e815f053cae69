"""Property tests (hypothesis) on small float64 models of nn.Linear / nn.Embedding with random odd, distinct sizes,
ranks, alphas, rsLoRA and random target subsets: the transforms agree with each other exactly or to float64
tolerance, whatever the shapes.
"""

from __future__ import annotations

import re
import tempfile

import torch
from conftest import gen
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adaptfn as af

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    print_blob=True)
ODD = st.integers(1, 10).map(lambda k: 2 * k + 1)  # 3..21
TOL = dict(atol=1e-10, rtol=1e-10)
# stacked adapters carry their per-adapter scale as a float32 leaf today, so a float64 stack under vmap is only
# float32-accurate in the scale; test_adapter.py::test_stacked_scaling_keeps_float64_precision checks that on its own
VMAP_TOL = dict(atol=1e-7, rtol=1e-6)


class EmbNet(nn.Module):
    """ids -> Embedding -> (Linear, Tanh)*; module paths "emb", "body.0", "body.2", ..."""

    def __init__(self, sizes):
        super().__init__()
        self.emb = nn.Embedding(sizes[0], sizes[1])
        layers = []
        for i, (a, b) in enumerate(zip(sizes[1:], sizes[2:])):
            layers += [nn.Linear(a, b, bias=i % 2 == 0), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, ids):
        return self.body(self.emb(ids))


def mlp(sizes):
    """A plain nn.Sequential: module paths "0", "2", ..."""
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


@st.composite
def problems(draw):
    """(fn, params, x, paths, base config kwargs, seed)."""
    kind = draw(st.sampled_from(["emb", "mlp"]))
    sizes = draw(st.lists(ODD, min_size=3, max_size=4, unique=True))
    seed = draw(st.integers(0, 2**16))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (EmbNet(sizes) if kind == "emb" else mlp(sizes)).double().eval()
        if kind == "emb":
            x = torch.randint(0, sizes[0], (2, 5), generator=gen(seed))
        else:
            x = torch.randn(2, 3, sizes[0], generator=gen(seed), dtype=torch.float64)
    fn, params = af.functional(model)
    paths = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    targets = draw(st.lists(st.sampled_from(paths), min_size=1, max_size=len(paths), unique=True))
    return fn, params, x, targets, seed


def config(draw, targets, r=None):
    r = r if r is not None else draw(st.integers(1, 5))
    alpha = draw(st.sampled_from([1, 2, 3.5, 8, 16.25]))
    rslora = draw(st.booleans())
    rank_pattern = {}
    if len(targets) > 1 and draw(st.booleans()):
        rank_pattern = {targets[-1]: draw(st.integers(1, 6))}
    return af.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=list(targets),
                         rank_pattern=rank_pattern, init_lora_weights=draw(st.sampled_from([False, "gaussian"])))


def randomize_b(a, seed):
    """init leaves lora_B at 0 for "gaussian"; make every B random so the deltas are not trivially zero."""
    g = gen(seed + 1)
    tensors = {p: {n: (torch.randn(t.shape, generator=g, dtype=t.dtype) if n == "lora_B" else t)
                   for n, t in d.items()} for p, d in a.tensors.items()}
    return af.Adapter(a.method, a.config, dict(a.entries), tensors)


def make_adapter(draw, fn, targets, seed, r=None):
    a = af.init(fn, config(draw, targets, r), generator=gen(seed))
    return randomize_b(a, seed)


def assert_same_leaves(a, b):
    assert a.paths == b.paths
    assert dict(a.entries) == dict(b.entries)
    for p in a.paths:
        assert a.tensors[p].keys() == b.tensors[p].keys()
        for n, t in a.tensors[p].items():
            u = b.tensors[p][n]
            assert t.dtype == u.dtype and t.shape == u.shape and torch.equal(t, u), (p, n)


@SETTINGS
@given(problems(), st.data())
def test_inject_equals_merge(problem, data):
    fn, params, x, targets, seed = problem
    a = make_adapter(data.draw, fn, targets, seed)
    out = af.inject(fn, a)(params, x)
    torch.testing.assert_close(fn(af.merge(params, a), x), out, **TOL)
    # by hand: each targeted weight moved by scaling * B @ A (embeddings: its transpose)
    merged = af.merge(params, a)
    for p, e in a.entries.items():
        w = params[f"{p}.weight"]
        d = e.scaling * (a.tensors[p]["lora_B"] @ a.tensors[p]["lora_A"])
        torch.testing.assert_close(merged[f"{p}.weight"], w + (d.T if e.kind == "embedding" else d), **TOL)
        r, alpha = a.config.rank_and_alpha(p)
        assert e.r == r == a.tensors[p]["lora_A"].shape[0]
        assert e.scaling == (alpha / r ** 0.5 if a.config.use_rslora else alpha / r)
    assert all(merged[k] is params[k] for k in params if k.rsplit(".", 1)[0] not in a.entries)


@SETTINGS
@given(problems(), st.data())
def test_mask_false_is_exact(problem, data):
    fn, params, x, targets, seed = problem
    a = make_adapter(data.draw, fn, targets, seed)
    off = af.mask(a, False)
    assert torch.equal(af.inject(fn, off)(params, x), fn(params, x))
    merged = af.merge(params, off)
    assert all(merged[k] is params[k] for k in params)
    assert off.structure_key == a.structure_key
    assert all(not bool(d["gate"]) for d in off.tensors.values())


@SETTINGS
@given(problems(), st.data())
def test_select_and_mask_agree(problem, data):
    fn, params, x, targets, seed = problem
    a = make_adapter(data.draw, fn, targets, seed)
    chosen = data.draw(st.lists(st.sampled_from(list(a.paths)), unique=True), label="chosen")
    rest = [p for p in a.paths if p not in chosen]
    base = fn(params, x)
    full = af.inject(fn, a)(params, x)
    m = af.mask(a, chosen)
    # where as a list, a regex, a callable give the same mask
    for where in ("|".join(map(re.escape, chosen)) if chosen else False,
                  lambda p: p in chosen, tuple(chosen)):
        mw = af.mask(a, where)
        assert [bool(d["gate"]) for d in mw.tensors.values()] == [p in chosen for p in a.paths]
    out_m = af.inject(fn, m)(params, x)
    if chosen:
        s = af.select(a, chosen)
        assert list(s.paths) == [p for p in a.paths if p in chosen]
        assert torch.equal(af.inject(fn, s)(params, x), out_m)
        ms, mm = af.merge(params, s), af.merge(params, m)
        assert all(torch.equal(ms[k], mm[k]) for k in params)
    else:
        assert torch.equal(out_m, base)
    if chosen and rest:
        # the two halves together are the whole adapter, exactly: each module is on in one of them
        both = af.select({"w": af.select(a, chosen), "c": af.select(a, rest)}, ["w", "c"])
        assert torch.equal(af.inject(fn, both)(params, x), full)
        assert torch.equal(af.inject(af.inject(fn, m), af.mask(a, rest))(params, x), full)
        torch.testing.assert_close(fn(af.merge(params, both), x), full, **TOL)
    # masking the complement of what is on turns everything off
    assert torch.equal(af.inject(fn, af.mask(m, rest))(params, x), base)


@st.composite
def stacks(draw):
    fn, params, x, targets, seed = draw(problems())
    n = draw(st.integers(2, 3))
    ranks = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
    ads = [make_adapter(draw, fn, targets, seed + 7 * i, r=ranks[i]) for i in range(n)]
    paths = list(ads[0].paths)
    ads = [af.mask(ad, draw(st.lists(st.sampled_from(paths), unique=True)) if draw(st.booleans()) else True)
           for ad in ads]
    return fn, params, x, ads


@SETTINGS
@given(stacks())
def test_stack_unstack_identity(problem):
    fn, params, x, ads = problem
    s = af.stack(ads)
    assert s.is_stacked and s.stack_info.n == len(ads)
    for p in s.paths:
        assert s.entries[p].r == max(ad.entries[p].r for ad in ads)
    back = af.unstack(s)
    assert len(back) == len(ads)
    for ad, b in zip(ads, back):
        assert b.config == ad.config and b.structure_key == ad.structure_key
        assert_same_leaves(ad, b)
    # and through a pytree round trip of the stacked adapter
    again = af.unstack(af.tree.map(lambda t: t.clone(), s))
    for ad, b in zip(ads, again):
        assert_same_leaves(ad, b)


@SETTINGS
@given(stacks())
def test_stack_vmap_equals_loop(problem):
    fn, params, x, ads = problem
    out = torch.func.vmap(lambda ad: af.inject(fn, ad)(params, x))(af.stack(ads))
    loop = torch.stack([af.inject(fn, ad)(params, x) for ad in ads])
    torch.testing.assert_close(out, loop, **VMAP_TOL)
    merged = torch.stack([fn(af.merge(params, ad), x) for ad in ads])
    torch.testing.assert_close(loop, merged, **TOL)


@SETTINGS
@given(problems(), st.data())
def test_save_load_round_trip(problem, data):
    fn, params, x, targets, seed = problem
    a = make_adapter(data.draw, fn, targets, seed)
    with tempfile.TemporaryDirectory() as d:
        af.save(a, d)
        b = af.load(d)
    sa, sb = af.state_dict(a), af.state_dict(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    assert b.config == a.config
    assert dict(b.entries) == dict(a.entries)
    for p in a.paths:
        for n in ("lora_A", "lora_B"):
            assert torch.equal(b.tensors[p][n], a.tensors[p][n])
    # (outputs to float64 rounding only: safetensors hands back 8-byte aligned tensors, on which BLAS may round
    # the last bit differently than on the 64-byte aligned originals)
    torch.testing.assert_close(af.inject(fn, b)(params, x), af.inject(fn, a)(params, x), atol=1e-12, rtol=1e-12)
    # a masked adapter is written in its "off" form: the file computes what the adapter computes
    part = data.draw(st.lists(st.sampled_from(list(a.paths)), unique=True), label="on")
    m = af.mask(a, part)
    with tempfile.TemporaryDirectory() as d:
        af.save(m, d)
        c = af.load(d)
    torch.testing.assert_close(af.inject(fn, c)(params, x), af.inject(fn, m)(params, x), atol=1e-12, rtol=1e-12)
    if not part:
        assert torch.equal(af.inject(fn, c)(params, x), fn(params, x))  # all lora_B written as zeros
