"""Adapter pools (af.pool, AdapterPool, OffloadedPool): a pool call equals each row's adapter injected alone,
whatever the ranks, targets, sizes and kernels; add / remove are pure and share storage; bad inputs give typed
errors naming the argument."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import gen, ids_for, tiny_gpt2, tiny_llama, tiny_opt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adaptfn as af
from adaptfn import pooling

LLAMA_SETS = (["q_proj", "v_proj"], ["gate_proj", "down_proj"], ["q_proj", "k_proj", "o_proj"], ["up_proj", "v_proj"],
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _lora(fn, r, targets, seed, **kw):
    cfg = af.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **kw)
    return af.init(fn, cfg, generator=gen(seed))


def _per_row(fn, params, adapters, route, **inputs):
    """Each row run alone with its own adapter (or the base for -1)."""
    outs = []
    for i, s in enumerate(route.tolist()):
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        g = fn if s < 0 else af.inject(fn, adapters[s])
        outs.append(g(params, **row).logits)
    return torch.cat(outs)


@pytest.fixture(scope="module")
def llama_pool():
    m = tiny_llama()
    fn, params = af.functional(m)
    ranks = (4, 5, 8, 13, 16, 64)
    ads = [_lora(fn, r, LLAMA_SETS[i % len(LLAMA_SETS)], i) for i, r in enumerate(ranks)]
    return m, fn, params, ads


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("seq", [1, 3, 9])
@pytest.mark.parametrize("native", [True, False])
def test_pool_equals_per_adapter_inject(kind, seq, native, monkeypatch) -> None:
    """Odd sizes (OPT hidden 22, ffn 37; GPT-2's Conv1D), ranks 3-17 across buckets, the native kernel or the
    portable ones (gather at 1 and 3 tokens, loop at 9): each row equals its adapter injected alone; -1 rows are
    the base."""
    monkeypatch.setattr(pooling, "NATIVE", native)
    m = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2}[kind]()
    fn, params = af.functional(m)
    sets = {"llama": LLAMA_SETS[:4], "opt": (["q_proj", "v_proj"], ["fc1", "fc2"], ["k_proj", "out_proj", "fc1"]),
            "gpt2": (["c_attn"], ["c_fc", "c_proj"], ["c_attn", "c_proj"])}[kind]
    ads = [_lora(fn, r, sets[i % len(sets)], i) for i, r in enumerate((3, 17, 6, 9))]
    p = af.pool(ads)
    route = torch.tensor([2, -1, 0, 3, 1, 2, 3])
    ids = ids_for(m, batch=len(route), seq=seq)
    with torch.no_grad():
        want = _per_row(fn, params, ads, route, input_ids=ids)
        got = af.inject(fn, p, route=route)(params, input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    with torch.inference_mode():
        again = af.inject(fn, p, route=route)(params, input_ids=ids).logits
    torch.testing.assert_close(again, want, atol=2e-5, rtol=1e-5)


def test_pool_heterogeneous_ranks_4_to_64_and_targets(llama_pool) -> None:
    m, fn, params, ads = llama_pool
    p = af.pool(ads)
    assert {R for lay in p.layout().values() for R in lay} == {4, 8, 16, 64}  # pow2 buckets: 5 -> 8, 13 -> 16
    route = torch.tensor([5, 0, 1, 2, 3, 4, 5, 0, -1])
    for seq in (1, 6):
        ids = ids_for(m, batch=len(route), seq=seq, seed=seq)
        with torch.no_grad():
            want = _per_row(fn, params, ads, route, input_ids=ids)
            got = af.inject(fn, p, route=route)(params, input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # stored without padding to N or to the union of targets: far less than af.stack's
    stacked = af.stack(ads)
    stack_bytes = sum(t.nbytes for q in stacked.paths for k, t in stacked.leaves(q).items() if k.startswith("lora"))
    mem = p.memory()
    assert mem["adapters"] <= mem["used"] < stack_bytes / 2
    for policy in ("exact", (64,)):
        q = af.pool(ads, buckets=policy)
        with torch.no_grad():
            torch.testing.assert_close(af.inject(fn, q, route=route)(params, input_ids=ids).logits, got,
                                       atol=2e-5, rtol=1e-5)
    assert af.pool(ads, buckets="exact").memory()["used"] == mem["adapters"]


def test_pool_under_autograd_matches(llama_pool) -> None:
    """With gradients on (the padded kernel), the output and the gradient with respect to the inputs'
    embeddings equal the per-row adapters'."""
    m, fn, params, ads = llama_pool
    p = af.pool(ads[:4])
    route = torch.tensor([1, 3, 0, -1])
    emb = m.get_input_embeddings()(ids_for(m, batch=4, seq=5)).detach().requires_grad_(True)
    got = af.inject(fn, p, route=route)(params, inputs_embeds=emb).logits
    (g1,) = torch.autograd.grad(got.square().sum(), emb)
    emb2 = emb.detach().requires_grad_(True)
    want = _per_row(fn, params, ads, route, inputs_embeds=emb2)
    (g2,) = torch.autograd.grad(want.square().sum(), emb2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)


def test_get_gives_the_adapter_back(llama_pool) -> None:
    _, fn, params, ads = llama_pool
    p = af.pool(ads)
    for s, a in enumerate(ads):
        back = p.get(s)
        assert back.paths == a.paths and back.config.r == a.config.r
        for q in a.paths:
            for k in ("lora_A", "lora_B"):
                assert torch.equal(back.leaves(q)[k], a.leaves(q)[k])


def test_add_remove_are_pure_and_share_storage(llama_pool) -> None:
    m, fn, params, ads = llama_pool
    leaf_versions = [{q: a.leaves(q)["lora_A"]._version for q in a.paths} for a in ads]
    p1 = af.pool(ads[:3])
    path = next(q for q in p1.paths if "q_proj" in q)
    bufs1 = {q: {R: o.buf for R, o in p1._mods[q].occ.items()} for q in p1.paths}
    versions = {q: {R: (b.At._version, b.Bt._version) for R, b in d.items()} for q, d in bufs1.items()}
    route = torch.tensor([0, 1, 2, -1])
    ids = ids_for(m, batch=4, seq=2)
    with torch.no_grad():
        before = af.inject(fn, p1, route=route)(params, input_ids=ids).logits
    p2, slot = p1.add(ads[3])
    assert slot == 3 and len(p1) == 3 and len(p2) == 4 and p1.size == 3
    # storage shared: untouched modules keep the same buffer objects (nothing re-stacked)
    for q in p1.paths:
        for R, b in bufs1[q].items():
            assert p2._mods[q].occ[R].buf is b or q in {x for x in p2.paths if any(t in x for t in LLAMA_SETS[3])}
    assert p2._mods[path].occ[4].buf is bufs1[path][4]
    p3 = p2.remove(1)
    assert p3.slots == (0, 2, 3) and p2.slots == (0, 1, 2, 3) and 1 not in p3
    p4, s4 = p3.add(ads[4])  # reuses slot 1; must not overwrite adapter 1's storage (p1, p2 still map it)
    assert s4 == 1
    with torch.no_grad():
        after = af.inject(fn, p1, route=route)(params, input_ids=ids).logits
        two = af.inject(fn, p2, route=torch.tensor([0, 1, 2, 3]))(params, input_ids=ids).logits
        four = af.inject(fn, p4, route=torch.tensor([0, 1, 2, 3]))(params, input_ids=ids).logits
        want2 = _per_row(fn, params, ads, torch.tensor([0, 1, 2, 3]), input_ids=ids)
        want4 = _per_row(fn, params, [ads[0], ads[4], ads[2], ads[3]], torch.tensor([0, 1, 2, 3]), input_ids=ids)
    assert torch.equal(before, after)  # the old pool is unchanged, bit for bit
    torch.testing.assert_close(two, want2, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(four, want4, atol=2e-5, rtol=1e-5)
    for q, d in bufs1.items():  # version counters untouched (writes go to positions no live pool maps)
        for R, b in d.items():
            assert (b.At._version, b.Bt._version) == versions[q][R]
    # the adapters themselves are untouched
    assert leaf_versions == [{q: a.leaves(q)["lora_A"]._version for q in a.paths} for a in ads]


def test_freed_positions_are_reused_only_when_no_pool_maps_them(llama_pool) -> None:
    _, fn, params, ads = llama_pool
    a, b, c = (_lora(fn, 4, ["q_proj"], s) for s in (50, 51, 52))
    path = "model.layers.0.self_attn.q_proj"
    p1 = af.pool([a, b], headroom=0)
    p2 = p1.remove(0)
    p3, _ = p2.add(c)
    pos_a = p1._mods[path].loc[0][1]
    assert p3._mods[path].loc[0][1] != pos_a  # p1 still maps a's position
    assert torch.equal(p1.get(0).leaves(path)["lora_A"], a.leaves(path)["lora_A"])
    del p1, p3
    gc.collect()
    p5, _ = p2.add(c)
    assert p5._mods[path].loc[0][1] == pos_a  # now free: reused, no growth
    assert torch.equal(p5.get(0).leaves(path)["lora_A"], c.leaves(path)["lora_A"])


def test_growth_copies_into_a_new_buffer_and_keeps_the_old(llama_pool) -> None:
    _, fn, _, _ = llama_pool
    ads = [_lora(fn, 4, ["v_proj"], s) for s in range(60, 70)]
    path = "model.layers.1.self_attn.v_proj"
    p = af.pool(ads[:4], headroom=0)
    cap0 = p.layout()[path][4][1]
    pools = [p]
    for a in ads[4:]:
        p, _ = p.add(a)
        pools.append(p)
    assert p.layout()[path][4][1] > cap0
    assert pools[0]._mods[path].occ[4].buf.cap == cap0  # the first pool keeps its buffer
    for k, q in enumerate(pools):
        for s in q.slots:
            assert torch.equal(q.get(s).leaves(path)["lora_B"], ads[s].leaves(path)["lora_B"]), (k, s)


def test_offloaded_pool_equals_resident(llama_pool) -> None:
    m, fn, params, ads = llama_pool
    host = af.pool(ads)
    off = af.OffloadedPool(host, device="cpu", capacity=3)
    ids = ids_for(m, batch=4, seq=3)
    with torch.no_grad():
        for route in (torch.tensor([0, 1, 0, -1]), torch.tensor([2, 3, 4, 2]), torch.tensor([5, 0, 1, 5]),
                      torch.tensor([2, 3, 4, 3])):
            want = af.inject(fn, host, route=route)(params, input_ids=ids).logits
            got = af.inject(fn, off, route=route)(params, input_ids=ids).logits
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    st_ = off.stats()
    assert st_["calls"] == 4 and st_["misses"] == 2 + 3 + 3 + 3 and st_["evictions"] == 8
    assert len(off.cached()) == 3 and off.memory()["device"] > 0
    # add / remove share the cache; a removed slot's adapter is never served
    off2, s = off.add(ads[0])
    assert s == 6 and len(off) == 6
    with torch.no_grad():
        got = af.inject(fn, off2, route=torch.tensor([6, 6, 0, 0]))(params, input_ids=ids).logits
        want = _per_row(fn, params, ads, torch.tensor([0, 0, 0, 0]), input_ids=ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    off3 = off2.remove(0)
    with pytest.raises(af.ConfigError, match="route"):
        af.inject(fn, off3, route=torch.tensor([0, 6, 6, 6]))
    with pytest.raises(af.ConfigError, match="capacity|cache"):
        with torch.no_grad():
            af.inject(fn, off, route=torch.tensor([0, 1, 2, 3]))(params, input_ids=ids)


def test_route_validation_names_the_argument(llama_pool) -> None:
    m, fn, params, ads = llama_pool
    p = af.pool(ads[:3])
    bad = [None, "all", [0, 1], torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]]), torch.tensor([0, 3]),
           torch.tensor([-2, 0]), torch.tensor([], dtype=torch.long)]
    for r in bad:
        with pytest.raises(af.ConfigError, match="route"):
            af.inject(fn, p, route=r)
    with pytest.raises(af.ConfigError, match="route.*slot 1|slot 1"):
        af.inject(fn, p.remove(1), route=torch.tensor([0, 1]))
    g = af.inject(fn, p, route=torch.tensor([0, 1, 2]))
    with pytest.raises(af.ConfigError, match="route"):
        g(params, input_ids=ids_for(m, batch=2, seq=2))
    with pytest.raises(af.ConfigError, match="generator"):
        af.inject(fn, p, route=torch.tensor([0]), generator=gen(0))
    with pytest.raises(af.ConfigError, match="route='all'"):  # either order
        af.inject(af.inject(fn, p, route=torch.tensor([0])), af.stack(ads[:2]), route="all")
    with pytest.raises(af.ConfigError, match="route='all'"):
        af.inject(af.inject(fn, af.stack(ads[:2]), route="all"), p, route=torch.tensor([0]))
    with pytest.raises(af.ConfigError, match="route"):
        af.inject(fn, af.pool([]), route=torch.tensor([0]))
    with torch.no_grad():  # an empty pool with an all -1 route is the base model
        ids = ids_for(m, batch=2, seq=2)
        assert torch.equal(af.inject(fn, af.pool([]), route=torch.tensor([-1, -1]))(params, input_ids=ids).logits,
                           fn(params, input_ids=ids).logits)


def test_bad_inputs_give_typed_errors(llama_pool) -> None:
    m, fn, params, ads = llama_pool
    with pytest.raises(af.ConfigError, match="list"):
        af.pool(ads[0])
    with pytest.raises(af.ConfigError, match="item 1"):
        af.pool([ads[0], "x"])
    ia3 = af.init(fn, af.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
                  generator=gen(0))
    with pytest.raises(af.ConfigError, match="ia3"):
        af.pool([ia3])
    with pytest.raises(af.ConfigError, match="stacked"):
        af.pool([af.stack(ads[:2])])
    mts = _lora(fn, 4, ["q_proj"], 3, modules_to_save=["lm_head"])
    with pytest.raises(af.ConfigError, match="modules_to_save"):
        af.pool([mts])
    with pytest.raises(af.ConfigError, match="buckets"):
        af.pool(ads, buckets="big")
    with pytest.raises(af.ConfigError, match="buckets"):
        af.pool(ads, buckets=(0, 8))
    with pytest.raises(af.ConfigError, match="headroom"):
        af.pool(ads, headroom=-1)
    with pytest.raises(af.ConfigError, match="dtype"):
        af.pool(ads, dtype=torch.int32)
    p = af.pool(ads[:2])
    with pytest.raises(af.ConfigError, match="slot"):
        p.remove(7)
    with pytest.raises(af.ConfigError, match="slot"):
        p.get("0")  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        p._slots = ()
    with pytest.raises(TypeError):
        af.AdapterPool()
    with pytest.raises(af.ConfigError, match="capacity"):
        af.OffloadedPool(p, device="cpu", capacity=0)
    with pytest.raises(af.ConfigError, match="host"):
        af.OffloadedPool(ads[0], device="cpu", capacity=2)
    with pytest.raises(af.ConfigError, match="device"):
        af.OffloadedPool(p, device="nope", capacity=2)
    # a pool made for another model: shape mismatch named at inject, before any call
    other = tiny_llama(hidden=20)
    fn2, _ = af.functional(other)
    with pytest.raises(af.IncompatibleAdapterError, match=r"24 in the pool"):
        af.inject(fn2, p, route=torch.tensor([0]))
    # an adapter whose module disagrees with the pool's shapes
    a20 = _lora(fn2, 4, ["q_proj"], 0)
    with pytest.raises(af.IncompatibleAdapterError, match="q_proj"):
        p.add(a20)
    with pytest.raises(af.IncompatibleAdapterError, match="q_proj"):
        af.pool([ads[0], a20])


def test_scale_weights_and_masks_are_folded(llama_pool) -> None:
    m, fn, params, ads = llama_pool
    a = af.scale(ads[0], 0.5)
    b = af.mask(ads[1], "model.layers.0.*")
    p = af.pool([a, b])
    route = torch.tensor([0, 1])
    ids = ids_for(m, batch=2, seq=2)
    with torch.no_grad():
        torch.testing.assert_close(af.inject(fn, p, route=route)(params, input_ids=ids).logits,
                                   _per_row(fn, params, [a, b], route, input_ids=ids), atol=2e-5, rtol=1e-5)


class Net(nn.Module):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.body = nn.ModuleList(nn.Linear(a, b, bias=i % 2 == 0) for i, (a, b) in enumerate(zip(sizes, sizes[1:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.body:
            x = torch.tanh(lin(x))
        return x


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
@given(data=st.data())
def test_property_pool_equals_per_row(data) -> None:
    """Random odd sizes, ranks 1-40, random target subsets, buckets, tokens per row and routes (float64)."""
    sizes = data.draw(st.lists(st.integers(1, 12).map(lambda k: 2 * k + 1), min_size=2, max_size=4))
    torch.manual_seed(data.draw(st.integers(0, 99)))
    net = Net(sizes).double()
    fn, params = af.functional(net)
    paths = [f"body.{i}" for i in range(len(sizes) - 1)]
    n = data.draw(st.integers(1, 5))
    ads = []
    for i in range(n):
        targets = data.draw(st.lists(st.sampled_from(paths), min_size=1, unique=True))
        r = data.draw(st.integers(1, 40))
        cfg = af.LoraConfig(r=r, lora_alpha=data.draw(st.sampled_from([1, 8, 16])), target_modules=targets,
                            init_lora_weights=False)
        ads.append(af.init(fn, cfg, generator=gen(i), dtype=torch.float64))
    buckets = data.draw(st.sampled_from(["pow2", "exact", (8, 32)]))
    p = af.pool(ads, buckets=buckets)
    bsz = data.draw(st.integers(1, 6))
    route = torch.tensor(data.draw(st.lists(st.integers(-1, n - 1), min_size=bsz, max_size=bsz)))
    L = data.draw(st.sampled_from([1, 2, 5]))
    x = torch.randn(bsz, L, sizes[0], dtype=torch.float64)
    with torch.no_grad():
        got = af.inject(fn, p, route=route)(params, x)
        want = torch.cat([(fn if s < 0 else af.inject(fn, ads[s]))(params, x[i:i + 1])
                          for i, s in enumerate(route.tolist())])
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    if n > 1:  # removing one adapter leaves the others' rows unchanged
        q = p.remove(0)
        keep = torch.where(route == 0, torch.full_like(route, -1), route)
        with torch.no_grad():
            got2 = af.inject(fn, q, route=keep)(params, x)
            want2 = torch.cat([(fn if s < 0 else af.inject(fn, ads[s]))(params, x[i:i + 1])
                               for i, s in enumerate(keep.tolist())])
        torch.testing.assert_close(got2, want2, atol=1e-10, rtol=1e-9)


def test_bucket_policy() -> None:
    assert pooling._bucket(3, "pow2") == 4 and pooling._bucket(5, "pow2") == 8 and pooling._bucket(64, "pow2") == 64
    assert pooling._bucket(1, "pow2", item=2) == 8  # 16 bytes of rank at bf16
    assert pooling._bucket(5, "exact") == 5
    assert pooling._bucket(5, (8, 32)) == 8 and pooling._bucket(40, (8, 32)) == 40


@pytest.mark.parametrize("kernel", ["native", "gather", "padded", "loop"])
@pytest.mark.parametrize("seq", [5, 37])
def test_forced_kernels_agree(llama_pool, kernel, seq, monkeypatch) -> None:
    """Every kernel, at 5 tokens a row and at 37 (the native kernel's items of 16 tokens, and a remainder)."""
    m, fn, params, ads = llama_pool
    p = af.pool(ads)
    route = torch.tensor([5, 0, 1, 2, 3, 4, 5, -1])
    ids = ids_for(m, batch=len(route), seq=seq)
    with torch.no_grad():
        want = _per_row(fn, params, ads, route, input_ids=ids)
        monkeypatch.setattr(pooling, "FORCE_KERNEL", kernel)
        got = af.inject(fn, p, route=route)(params, input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_pools_made_and_paged_under_inference_mode(llama_pool) -> None:
    """Buffers made inside torch.inference_mode stay normal tensors: a pool built there grows outside it, and an
    offloaded pool pages inside it."""
    m, fn, params, ads = llama_pool
    ids = ids_for(m, batch=3, seq=2)
    route = torch.tensor([0, 2, 1])
    with torch.inference_mode():
        p = af.pool(ads[:2], headroom=0)
        off = af.OffloadedPool(af.pool(ads), device="cpu", capacity=2)
        got = af.inject(fn, off, route=torch.tensor([0, 2, 0]))(params, input_ids=ids).logits
        want = af.inject(fn, af.pool(ads), route=torch.tensor([0, 2, 0]))(params, input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    p2, _ = p.add(ads[2])
    with torch.no_grad():
        torch.testing.assert_close(af.inject(fn, p2, route=route)(params, input_ids=ids).logits,
                                   _per_row(fn, params, ads, route, input_ids=ids), atol=2e-5, rtol=1e-5)


def test_pool_composes_with_an_injected_adapter(llama_pool) -> None:
    """A pool injected over a function that already has an adapter: each row gets both deltas."""
    m, fn, params, ads = llama_pool
    shared = _lora(fn, 3, ["o_proj", "up_proj"], 77)
    p = af.pool(ads[:3])
    route = torch.tensor([2, -1, 0])
    ids = ids_for(m, batch=3, seq=4)
    base = af.inject(fn, shared)
    with torch.no_grad():
        got = af.inject(base, p, route=route)(params, input_ids=ids).logits
        want = torch.cat([(base if s < 0 else af.inject(base, ads[s]))(params, input_ids=ids[i:i + 1]).logits
                          for i, s in enumerate(route.tolist())])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_kernel_choice_cpu_and_other_devices():
    """On the CPU: gather up to CPU_GATHER_TOKENS tokens per used adapter, loop above; elsewhere gather up to
    GATHER_TOKENS and the call's GEMM kernel above (loop is a CPU kernel); under autograd / transforms always
    the GEMM kernel."""
    from adaptfn import pooling as P

    assert P._bucket_kernel(True, P.CPU_GATHER_TOKENS * 3, 3, "padded", cpu=True) == "gather"
    assert P._bucket_kernel(True, P.CPU_GATHER_TOKENS * 3 + 1, 3, "padded", cpu=True) == "loop"
    assert P._bucket_kernel(True, 100, 2, "padded", cpu=False) == "padded"
    assert P._bucket_kernel(True, 100, 2, "grouped", cpu=False) == "grouped"
    assert P._bucket_kernel(True, P.GATHER_TOKENS * 2, 2, "grouped", cpu=False) == "gather"
    assert P._bucket_kernel(False, 1, 2, "padded", cpu=True) == "padded"


def test_row_groupings_are_kept_per_route_values(llama_pool, monkeypatch) -> None:
    """A decode loop calls with one route at every step: its rows' grouping is made once. A route whose values
    change (in place, or a new tensor) gets its own; the pool keeps the last PLAN_CACHE routes' only."""
    m, fn, params, ads = llama_pool
    p = af.pool(ads)
    made = []
    real = pooling._Plan.__init__

    def spy(self, route, m_):
        made.append(tuple(route.tolist()))
        real(self, route, m_)

    monkeypatch.setattr(pooling._Plan, "__init__", spy)
    route = torch.tensor([5, 0, 1, -1, 3])
    g = af.inject(fn, p, route=route)
    with torch.no_grad():
        for seq in (1, 1, 3):
            ids = ids_for(m, batch=len(route), seq=seq, seed=seq)
            torch.testing.assert_close(g(params, input_ids=ids).logits,
                                       _per_row(fn, params, ads, route, input_ids=ids), atol=2e-5, rtol=1e-5)
        layouts = len(made)
        assert layouts == len({id(p._map_of(q)) for q in p.paths})  # one per module layout, for three calls
        route[:] = torch.tensor([2, 2, 4, 0, -1])  # the same tensor, new values: grouped again, not stale
        ids = ids_for(m, batch=len(route), seq=2)
        torch.testing.assert_close(g(params, input_ids=ids).logits,
                                   _per_row(fn, params, ads, route, input_ids=ids), atol=2e-5, rtol=1e-5)
        assert len(made) == 2 * layouts
        for i in range(pooling.PLAN_CACHE + 3):
            af.inject(fn, p, route=torch.tensor([i % 6, -1, 0, 1, 2]))(params, input_ids=ids)
    assert len(p._plans.lru) == pooling.PLAN_CACHE


def test_decode_sized_calls_take_one_pass_and_agree(llama_pool, monkeypatch) -> None:
    """At decode sizes (DECODE_ELEMENTS) every bucket's gather output is added with one index_add_, the scales
    applied to the inputs; the result equals the bucket-by-bucket path and each row's adapter alone."""
    m, fn, params, ads = llama_pool
    monkeypatch.setattr(pooling, "NATIVE", False)  # the portable kernels' path
    p = af.pool(ads)
    route = torch.tensor([5, 0, 1, 2, 3, 4, 5, -1, 2])
    ids = ids_for(m, batch=len(route), seq=1, seed=4)
    calls = []
    real = pooling._gather_all
    monkeypatch.setattr(pooling, "_gather_all", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = af.inject(fn, p, route=route)(params, input_ids=ids).logits
        assert calls, "the decode path was not taken"
        monkeypatch.setattr(pooling, "DECODE_ELEMENTS", 0)
        n = len(calls)
        slow = af.inject(fn, af.pool(ads), route=route)(params, input_ids=ids).logits
        assert len(calls) == n
        want = _per_row(fn, params, ads, route, input_ids=ids)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, want, atol=2e-5, rtol=1e-5)


@pytest.fixture
def native_calls(monkeypatch) -> list[int]:
    """The native kernel's calls (one entry each), counted by wrapping ``adaptfn._native.lora_rows``; the kernel
    must be built here (scripts/env.sh installs a C compiler)."""
    from adaptfn import _native

    assert _native.kernel() is not None, _native.status()
    calls: list[int] = []
    real = _native.lora_rows
    monkeypatch.setattr(_native, "lora_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_native_kernel_serves_float32_cpu_inference_only(llama_pool, native_calls, monkeypatch) -> None:
    """float32 inference on the CPU runs the native kernel (when built); autograd, other dtypes and NATIVE=False
    run the portable kernels; all agree with each row's adapter alone, and the native call leaves the inputs and
    an out-of-place base output untouched."""
    m, fn, params, ads = llama_pool
    calls = native_calls
    p = af.pool(ads)
    route = torch.tensor([3, 3, 1, -1, 5, 0, 3])
    ids = ids_for(m, batch=len(route), seq=19, seed=9)
    with torch.no_grad():
        want = _per_row(fn, params, ads, route, input_ids=ids)
    for mode in (torch.no_grad, torch.inference_mode):
        calls.clear()
        with mode():
            got = af.inject(fn, p, route=route)(params, input_ids=ids).logits
        assert calls
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    calls.clear()
    g = af.inject(fn, p, route=route)
    trainable = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in params.items()}
    out = g(trainable, input_ids=ids).logits  # under autograd: the padded kernel
    assert not calls and out.requires_grad
    torch.testing.assert_close(out.detach(), want, atol=2e-5, rtol=1e-5)
    monkeypatch.setattr(pooling, "NATIVE", False)
    with torch.no_grad():
        off = af.inject(fn, p, route=route)(params, input_ids=ids).logits
    assert not calls
    torch.testing.assert_close(off, want, atol=2e-5, rtol=1e-5)
    monkeypatch.setattr(pooling, "NATIVE", True)
    p16 = af.pool(ads, dtype=torch.float64)
    with torch.no_grad():
        af.inject(fn, p16, route=route)(params, input_ids=ids)
    assert not calls  # float64 pool: portable kernels


def test_native_kernel_on_a_base_output_it_may_not_overwrite(native_calls, monkeypatch) -> None:
    """A base output that may not be updated in place: the native path adds into a copy and leaves the base
    layer's own output tensor as it was."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(13, 11), nn.Tanh(), nn.Linear(11, 19))
    fn, params = af.functional(net)
    ads = [_lora(fn, r, ["0", "2"], r) for r in (3, 9)]
    p = af.pool(ads)
    x = torch.randn(3, 17, 13)
    route = torch.tensor([1, 0, -1])
    from adaptfn import routing

    seen, calls = [], native_calls
    real_linear = torch.nn.functional.linear

    def keep(*a, **k):  # the base layers' outputs, and a copy of each as it was made
        out = real_linear(*a, **k)
        seen.append((out, out.clone()))
        return out

    monkeypatch.setattr(routing, "in_place_ok", lambda *a: False)
    monkeypatch.setattr(torch.nn.functional, "linear", keep)
    with torch.no_grad():
        got = af.inject(fn, p, route=route)(params, x)
    monkeypatch.setattr(torch.nn.functional, "linear", real_linear)
    assert calls and len(seen) >= 2
    for out, before in seen:
        assert torch.equal(out, before)  # not written into
    with torch.no_grad():
        want = torch.cat([af.inject(fn, ads[1])(params, x[:1]), af.inject(fn, ads[0])(params, x[1:2]),
                          fn(params, x[2:])])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_native_kernel_is_not_used_where_its_writes_would_be_invisible(native_calls) -> None:
    """Forward-mode AD does not see a C call: there the portable kernels run; torch.jit.trace of a pool call is
    refused with a typed error (a trace would keep one route's grouping); a pool whose buffers are not on the CPU
    never reaches the kernel (an error, not a crash)."""
    import torch.autograd.forward_ad as fwAD

    calls = native_calls
    x = torch.randn(4, 3, 24)
    net = nn.Sequential(nn.Linear(24, 24), nn.Linear(24, 24))
    torch.manual_seed(0)
    fn2, params2 = af.functional(net)
    ads2 = [_lora(fn2, r, ["0", "1"], r) for r in (3, 8)]
    p2 = af.pool(ads2)
    g = af.inject(fn2, p2, route=torch.tensor([1, 0, -1, 1]))
    with torch.no_grad():
        g(params2, x)
    assert calls
    calls.clear()
    with torch.no_grad(), pytest.raises(af.ConfigError, match="torch.jit.trace"):
        torch.jit.trace(lambda t: g(params2, t), (x,), check_trace=False)
    assert not calls
    with torch.no_grad(), fwAD.dual_level():
        try:
            g(params2, fwAD.make_dual(x, torch.ones_like(x)))
        except (NotImplementedError, RuntimeError):
            pass  # the portable kernels may not support forward AD: that is their typed answer, not wrong numbers
    assert not calls
    meta = af.pool(ads2, device="meta")
    with torch.no_grad(), pytest.raises((RuntimeError, NotImplementedError, af.AdaptfnError)):
        af.inject(fn2, meta, route=torch.tensor([1, 0, -1, 1]))(params2, x)
    assert not calls
