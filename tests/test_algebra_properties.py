"""Property tests (hypothesis) of the adapter algebra on small float64 models (nn.Linear / nn.Embedding) with odd,
distinct sizes, random ranks, alphas, rsLoRA, targets and weights: scale is linear, combine's types agree with
each other and with the weighted select where the maths says they should."""

from __future__ import annotations

import math

import torch
from conftest import gen
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adaptfn as af

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
ODD = st.integers(2, 9).map(lambda k: 2 * k + 1)  # 5..19: every module is wider than the ranks added up below
TOL = dict(atol=1e-9, rtol=1e-9)
WEIGHT = st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 1e-3)


class Net(nn.Module):
    """ids -> Embedding -> (Linear, Tanh)*: module paths "emb", "body.0", "body.2", ..."""

    def __init__(self, sizes):
        super().__init__()
        self.emb = nn.Embedding(sizes[0], sizes[1])
        layers = []
        for a, b in zip(sizes[1:], sizes[2:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, ids):
        return self.body(self.emb(ids))


@st.composite
def problems(draw):
    sizes = draw(st.lists(ODD, min_size=3, max_size=4, unique=True))
    seed = draw(st.integers(0, 2**16))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Net(sizes).double().eval()
    fn, params = af.functional(model)
    x = torch.randint(0, sizes[0], (2, 3), generator=gen(seed))
    paths = ["emb"] + [f"body.{2 * i}" for i in range(len(sizes) - 2)]
    return fn, params, x, paths, seed


def lora(draw, fn, paths, seed, r=None):
    targets = draw(st.lists(st.sampled_from(paths), min_size=1, max_size=len(paths), unique=True))
    r = r if r is not None else draw(st.integers(1, 2))
    cfg = af.LoraConfig(r=r, lora_alpha=draw(st.sampled_from([1, 3.5, 8])), use_rslora=draw(st.booleans()),
                        target_modules=targets, init_lora_weights=False)
    return af.init(fn, cfg, generator=gen(seed))


def run(fn, params, x, a):
    return af.inject(fn, a)(params, x)


@SETTINGS
@given(problems(), st.data(), WEIGHT, WEIGHT, st.sampled_from(["lora", "ia3"]))
def test_scale_is_linear_in_w(problem, data, u, v, kind):
    fn, params, x, paths, seed = problem
    if kind == "lora":
        a = lora(data.draw, fn, paths, seed)
    else:
        lin = paths[1:]
        a = af.init(fn, af.IA3Config(target_modules=lin, feedforward_modules=lin[:1], init_ia3_weights=False),
                    generator=gen(seed))
    twice, once = af.scale(af.scale(a, u), v), af.scale(a, u * v)
    torch.testing.assert_close(run(fn, params, x, twice), run(fn, params, x, once), **TOL)
    # and linear in the merged weights: W(w) - W is w times the adapter's change (IA3: of the vector's deviation)
    m, m1 = af.merge(params, once), af.merge(params, a)
    for p in a.paths:
        k = f"{p}.weight"
        if kind == "lora":
            torch.testing.assert_close(m[k] - params[k], u * v * (m1[k] - params[k]), **TOL)


@SETTINGS
@given(problems(), st.data(), st.lists(WEIGHT, min_size=2, max_size=3))
def test_combine_cat_equals_the_weighted_select(problem, data, ws):
    fn, params, x, paths, seed = problem
    ads = {f"a{i}": lora(data.draw, fn, paths, seed + i) for i in range(len(ws))}
    cat = af.combine(list(ads.values()), ws, how="cat")
    # the combined adapter's scaling is lora_alpha / r = 1, except (as in PEFT, whose config it copies) when the
    # first adapter uses rsLoRA: then R / sqrt(R), and cat is that times the weighted sum
    s = cat.config.scaling(cat.config.r, cat.config.lora_alpha)
    assert s == (cat.config.r / math.sqrt(cat.config.r) if ads["a0"].config.use_rslora else 1.0)
    mix = af.select(ads, {n: w * s for n, w in zip(ads, ws)})
    torch.testing.assert_close(run(fn, params, x, cat), run(fn, params, x, mix), **TOL)
    merged_cat, merged_mix = af.merge(params, cat), af.merge(params, mix)
    for k in merged_mix:
        torch.testing.assert_close(merged_cat[k], merged_mix[k], **TOL)


@SETTINGS
@given(problems(), st.data(), st.lists(WEIGHT, min_size=1, max_size=3), st.integers(1, 2))
def test_combine_linear_mixes_a_and_b_separately(problem, data, ws, r):
    """PEFT's ``linear``: A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i, so B A has cross
    terms B_i A_j: it equals the weighted select (sum_i w_i s_i B_i A_i) for a single adapter only."""
    fn, params, x, paths, seed = problem
    ads = [lora(data.draw, fn, paths, seed + i, r=r) for i in range(len(ws))]
    c = af.combine(ads, ws, how="linear")
    for p in c.paths:
        have = [(w, a) for w, a in zip(ws, ads) if p in a.entries]
        # PEFT holds these weights in a float32 tensor (torch.tensor of Python floats), so do we
        wa = torch.tensor([math.copysign(math.sqrt(abs(w * a.entries[p].scaling)), w) for w, a in have]).double()
        wb = torch.tensor([math.sqrt(abs(w * a.entries[p].scaling)) for w, a in have]).double()
        A = sum(x_ * a.leaves(p)["lora_A"] for x_, (_, a) in zip(wa, have))
        B = sum(y_ * a.leaves(p)["lora_B"] for y_, (_, a) in zip(wb, have))
        torch.testing.assert_close(c.leaves(p)["lora_A"], A, **TOL)
        torch.testing.assert_close(c.leaves(p)["lora_B"], B, **TOL)
        assert c.entries[p].scaling == (r / math.sqrt(r) if ads[0].config.use_rslora else 1.0)  # PEFT's config: see cat
    if len(ws) == 1 and not ads[0].config.use_rslora:  # no cross terms: the weighted adapter itself
        torch.testing.assert_close(run(fn, params, x, c), run(fn, params, x, af.scale(ads[0], ws[0])), atol=1e-6,
                                   rtol=1e-6)  # to float32 (the weights' precision)


@SETTINGS
@given(problems(), st.data(), st.lists(WEIGHT, min_size=2, max_size=2))
def test_combine_svd_at_full_rank_reproduces_cat(problem, data, ws):
    fn, params, x, paths, seed = problem
    ads = [lora(data.draw, fn, paths, seed + i) for i in range(2)]
    full = sum(a.config.r for a in ads)  # >= the rank of every module's weighted sum; <= 4 < every size
    cat = af.combine(ads, ws, how="cat")
    want = run(fn, params, x, cat)
    # the weighted sum enters torch.linalg.svd as float32 (as in PEFT), so the factors are exact to float32
    # rounding of the delta, not of the float64 outputs: the tolerance is 64 float32 epsilons of the largest
    # change the adapters make (a fixed 1e-6 failed at 2.5e-6 on a change of 0.17: 21 epsilons)
    delta = float((want - fn(params, x)).abs().max())
    atol = 64 * torch.finfo(torch.float32).eps * max(delta, 1e-3)
    for full_matrices in (True, False):
        svd = af.combine(ads, ws, how="svd", svd_rank=full, svd_full_matrices=full_matrices)
        assert svd.config.r == full
        torch.testing.assert_close(run(fn, params, x, svd), want, atol=atol, rtol=0)


@SETTINGS
@given(problems(), st.data(), st.lists(WEIGHT, min_size=2, max_size=3), st.sampled_from(["total", "frequency"]))
def test_pruning_types_at_density_one_are_their_unpruned_forms(problem, data, ws, sign):
    fn, params, x, paths, seed = problem
    ads = [lora(data.draw, fn, paths, seed + i, r=2) for i in range(len(ws))]

    def sd(how, **kw):
        return af.state_dict(af.combine(ads, ws, how=how, **kw))

    def same(s1, s2):
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)

    same(sd("magnitude_prune", density=1.0), sd("linear"))
    same(sd("magnitude_prune_svd", density=1.0), sd("svd"))
    same(sd("dare_linear", density=1.0), sd("linear"))
    same(sd("dare_ties", density=1.0, majority_sign_method=sign), sd("ties", density=1.0, majority_sign_method=sign))
    same(sd("dare_linear_svd", density=1.0), sd("svd"))
    # TIES without trimming: per element, the weighted tensors whose sign agrees with the elected one, averaged
    ties = af.combine(ads, ws, how="ties", density=1.0, majority_sign_method=sign)
    for p in ties.paths:
        have = [(w, a) for w, a in zip(ws, ads) if p in a.entries]
        for leaf, root in (("lora_A", True), ("lora_B", False)):
            ts = torch.stack([a.leaves(p)[leaf] for _, a in have])
            wts = torch.tensor([math.sqrt(abs(w * a.entries[p].scaling)) * (math.copysign(1, w) if root else 1)
                                for w, a in have], dtype=torch.float32).to(ts.dtype)
            votes = ts.sum(0) if sign == "total" else ts.sign().sum(0)
            agree = ts.sign() == torch.where(votes >= 0, 1.0, -1.0)
            weighted = ts * wts.view(-1, 1, 1)
            want = (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
            torch.testing.assert_close(ties.leaves(p)[leaf], want, **TOL)
