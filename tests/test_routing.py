"""route=: row i of a batch uses adapter idx[i] of a stack (-1: base); route="all": every adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILDERS, gen, ids_for
from hypothesis import given, settings
from hypothesis import strategies as hst
from torch import nn

import adaptfn as af
from adaptfn import routing

TARGETS = {
    "opt": ["q_proj", "v_proj", "fc1", "fc2", "embed_tokens"],  # OPT's MLP sees [batch * seq, d] rows
    "llama": ["q_proj", "o_proj", "down_proj", "gate_proj", "embed_tokens"],
    "gpt2": ["c_attn", "c_fc", "wte"],
}


def _stack(name: str, attn: str = "eager", n: int = 3):
    model = BUILDERS[name](attn=attn)
    fn, params = af.functional(model)
    ads = [af.init(fn, af.LoraConfig(r=2 + i, lora_alpha=3 + 2 * i, target_modules=TARGETS[name],
                                     init_lora_weights=False), generator=gen(i)) for i in range(n)]
    return model, fn, params, ads, af.stack(ads)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_route_equals_each_row_alone(name: str, attn: str) -> None:
    model, fn, params, ads, st = _stack(name, attn)
    ids = ids_for(model, batch=6, seq=5)
    idx = torch.tensor([2, -1, 0, 1, 0, 2])
    out = af.inject(fn, st, route=idx)(params, input_ids=ids).logits
    base = fn(params, input_ids=ids).logits
    for i, j in enumerate(idx.tolist()):
        alone = (af.inject(fn, ads[j]) if j >= 0 else fn)(params, input_ids=ids[i:i + 1]).logits[0]
        assert _rel(out[i], alone) <= 1e-5, (i, j)
    assert torch.equal(out[1], base[1])  # a base row gets exactly zero from the adapters


@pytest.mark.parametrize("kernel", ["dense", "gather"])
def test_both_kernels_agree(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = gen(3)
    x = torch.randn(4 * 3, 11, generator=g)  # [bsz * k, in], k = 3
    A, B = torch.randn(5, 7, 11, generator=g), torch.randn(5, 13, 7, generator=g)
    scale, idx = torch.tensor([0.5, 1.0, 2.0, 0.0, 3.0]), torch.tensor([4, -1, 0, 2])
    got = routing.lowrank(x, A, B, scale, idx, kernel=kernel)
    want = torch.zeros(12, 13)
    for i, j in enumerate(idx.tolist()):
        if j >= 0:
            want[3 * i:3 * i + 3] = scale[j] * x[3 * i:3 * i + 3] @ A[j].T @ B[j].T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[3:6]) == 0


def test_route_all_equals_loop_and_has_adapter_axis() -> None:
    model, fn, params, ads, st = _stack("llama", "sdpa")
    ids = ids_for(model, batch=2, seq=5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    out = af.inject(fn, st, route="all")(params, input_ids=ids, attention_mask=mask).logits
    assert out.shape[:2] == (3, 2)
    for k, a in enumerate(ads):
        assert _rel(out[k], af.inject(fn, a)(params, input_ids=ids, attention_mask=mask).logits) <= 1e-5


@pytest.mark.parametrize("name", ["opt", "llama"])
def test_route_through_generate_with_beams_and_return_sequences(name: str) -> None:
    model, fn, params, ads, st = _stack(name)
    ids = ids_for(model, batch=3, seq=4)
    idx = torch.tensor([1, -1, 2])
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
    toks = af.inject(fn, st, route=idx).generate(params, input_ids=ids, **kw)
    for i, j in enumerate(idx.tolist()):
        want = (af.inject(fn, ads[j]) if j >= 0 else fn).generate(params, input_ids=ids[i:i + 1], **kw)
        assert torch.equal(toks[2 * i:2 * i + 2], want), (i, j)


def test_route_training_gradients_reach_only_the_rows_adapter() -> None:
    model, fn, params, ads, st = _stack("opt")
    ids = ids_for(model, batch=3, seq=5)
    idx = torch.tensor([0, 2, 0])

    def loss(stacked):
        return af.inject(fn, stacked, route=idx)(params, input_ids=ids).logits.square().mean()

    grads = torch.func.grad(loss)(st)
    for path, leaves in grads.tensors.items():
        if "lora_A" not in leaves:
            continue
        gA = leaves["lora_A"]
        assert torch.count_nonzero(gA[1]) == 0, path  # adapter 1 serves no row
        assert torch.count_nonzero(gA[0]) > 0 and torch.count_nonzero(gA[2]) > 0, path
    # equals the gradient of the same loss computed row by row with each adapter alone
    def loss_rows(a0, a2):
        rows = [af.inject(fn, a)(params, input_ids=ids[i:i + 1]).logits for i, a in ((0, a0), (1, a2), (2, a0))]
        return torch.cat(rows).square().mean()

    g0, g2 = torch.func.grad(loss_rows, argnums=(0, 1))(ads[0], ads[2])
    p = "model.decoder.layers.1.fc1"
    r0, r2 = ads[0].entries[p].r, ads[2].entries[p].r
    torch.testing.assert_close(grads.tensors[p]["lora_A"][0, :r0], g0.tensors[p]["lora_A"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads.tensors[p]["lora_B"][2, :, :r2], g2.tensors[p]["lora_B"], rtol=1e-4, atol=1e-7)


def test_route_bad_input() -> None:
    model, fn, params, ads, st = _stack("opt")
    ids = ids_for(model, batch=3, seq=4)
    with pytest.raises(af.ConfigError, match="3 rows"):
        af.inject(fn, st, route=torch.tensor([0, 1]))(params, input_ids=ids)
    with pytest.raises(af.ConfigError, match=r"\[-1, 2\]"):
        af.inject(fn, st, route=torch.tensor([0, 3, 1]))
    with pytest.raises(af.ConfigError, match=r"\[-1, 2\]"):
        af.inject(fn, st, route=torch.tensor([0, -2, 1]))
    with pytest.raises(af.ConfigError, match="integer"):
        af.inject(fn, st, route=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(af.ConfigError, match="1-D"):
        af.inject(fn, st, route=torch.tensor([[0, 1, 2]]))
    with pytest.raises(af.ConfigError, match="unstacked"):
        af.inject(fn, ads[0], route=torch.tensor([0, 0, 0]))
    with pytest.raises(af.ConfigError, match="'all'"):
        af.inject(fn, st, route="some")
    # route="all" repeats the batch: another routed stack's route would no longer match the rows
    fc2 = af.stack([af.select(a, r".*fc2") for a in ads])
    with pytest.raises(af.ConfigError, match="cannot be combined with another routed stack"):
        af.inject(af.inject(fn, fc2, route=torch.tensor([0, 1, 2])), st, route="all")
    with pytest.raises(af.ConfigError, match="already has a route='all' stack"):
        af.inject(af.inject(fn, st, route="all"), fc2, route=torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("name", ["opt", "gpt2"])
def test_route_ia3(name: str) -> None:
    model = BUILDERS[name]()
    fn, params = af.functional(model)
    targets, ff = {"opt": (["k_proj", "v_proj", "fc2"], ["fc2"]),
                   "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}[name]
    ads = [af.init(fn, af.IA3Config(target_modules=targets, feedforward_modules=ff, init_ia3_weights=False),
                   generator=gen(i)) for i in range(3)]
    st = af.stack(ads)
    ids = ids_for(model, batch=4, seq=5)
    idx = torch.tensor([1, -1, 2, 0])
    out = af.inject(fn, st, route=idx)(params, input_ids=ids).logits
    base = fn(params, input_ids=ids).logits
    for i, j in enumerate(idx.tolist()):
        alone = (af.inject(fn, ads[j]) if j >= 0 else fn)(params, input_ids=ids[i:i + 1]).logits[0]
        assert _rel(out[i], alone) <= 1e-5, (i, j)
    assert torch.equal(out[1], base[1])


def test_dense_kernel_layout_cache_follows_in_place_changes() -> None:
    g = gen(5)
    x = torch.randn(3, 11, generator=g)
    A, B = torch.randn(4, 2, 11, generator=g), torch.randn(4, 9, 2, generator=g)
    scale, idx = torch.ones(4), torch.tensor([3, 0, 1])
    out0 = torch.zeros(3, 9)
    first = routing.lowrank_add(out0.clone(), x, A, B, scale, idx, kernel="dense")
    B.mul_(2.0)  # bumps B's version: the cached [out, N*r] layout must not be reused
    second = routing.lowrank_add(out0.clone(), x, A, B, scale, idx, kernel="dense")
    torch.testing.assert_close(second, 2 * first)


@pytest.mark.parametrize("name", ["opt", "llama", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vmap_with_padding_mask_equals_loop_and_route_all(name: str, attn: str) -> None:
    model, fn, params, ads, st = _stack(name, attn)
    ids = ids_for(model, batch=2, seq=5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = torch.func.vmap(lambda a: af.inject(fn, a)(params, input_ids=ids, attention_mask=mask).logits)(st)
    every = af.inject(fn, st, route="all")(params, input_ids=ids, attention_mask=mask).logits
    for k, a in enumerate(ads):
        want = af.inject(fn, a)(params, input_ids=ids, attention_mask=mask).logits
        assert _rel(out[k], want) <= 1e-5 and _rel(every[k], want) <= 1e-5


def test_route_cached_row_multipliers_follow_masks_and_routes() -> None:
    model, fn, params, ads, st = _stack("opt")
    ids = ids_for(model, batch=3, seq=1)  # 1 token per row: the dense kernel, whose row multipliers are cached
    base = fn(params, input_ids=ids).logits
    idx = torch.tensor([0, 1, 2])
    with torch.inference_mode():
        first = af.inject(fn, st, route=idx)(params, input_ids=ids).logits
        masked = af.inject(fn, af.mask(st, False), route=idx)(params, input_ids=ids).logits
        again = af.inject(fn, st, route=idx)(params, input_ids=ids).logits
        other = af.inject(fn, st, route=torch.tensor([2, -1, 0]))(params, input_ids=ids).logits
    assert torch.equal(masked, base) and torch.equal(again, first)
    assert torch.equal(other[1], base[1]) and not torch.equal(other[0], first[0])
    for i, j in enumerate([2, -1, 0]):
        alone = (af.inject(fn, ads[j]) if j >= 0 else fn)(params, input_ids=ids[i:i + 1]).logits[0]
        assert _rel(other[i], alone) <= 1e-5


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("kernel", ["dense", "gather", "grouped"])
def test_route_base_gemm_accumulating_equals_adding_after(name: str, kernel: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The routed kernels also let the base GEMM accumulate into the low-rank buffer in inference; with
    LoRA dropout (a generator) the base still reads the undropped input."""
    model, fn, params, ads, st = _stack(name)
    ads = [af.init(fn, af.LoraConfig(r=2 + i, lora_alpha=3, lora_dropout=0.3, target_modules=TARGETS[name],
                                     init_lora_weights=False), generator=gen(i)) for i in range(3)]
    st = af.stack(ads)
    ids = ids_for(model, batch=4, seq=5)
    idx = torch.tensor([1, -1, 2, 0])
    real = routing.lowrank_add
    seen = []
    monkeypatch.setattr(routing, "lowrank_add",
                        lambda *a, **k: seen.append(k["gemm"] is not None) or real(*a, **{**k, "kernel": kernel}))
    outs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(routing, "base_gemm", lambda *a: None)
        seen.clear()
        with torch.no_grad():
            outs.append(af.inject(fn, st, route=idx, generator=gen(7))(params, input_ids=ids).logits)
        assert seen and all(s is fused for s in seen)
    assert _rel(outs[0], outs[1]) <= 1e-5


def _reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:
    bsz = idx.shape[0]
    xb = x.reshape(bsz, -1, x.shape[-1])
    want = torch.zeros(*xb.shape[:2], B.shape[1], dtype=torch.float64)
    for i, j in enumerate(idx.tolist()):
        if j >= 0:
            want[i] = scale[j].double() * xb[i].double() @ A[j].double().T @ B[j].double().T
    return want.reshape(*x.shape[:-1], B.shape[1])


@given(bsz=hst.integers(1, 9), tokens=hst.integers(1, 5), n=hst.integers(1, 6), r=hst.integers(1, 4),
       seed=hst.integers(0, 2**16), kernel=hst.sampled_from([None, "dense", "gather", "grouped"]),
       fused=hst.booleans())
@settings(max_examples=60, deadline=None)
def test_inference_kernels_equal_the_per_row_reference(bsz: int, tokens: int, n: int, r: int, seed: int,
                                                       kernel: str | None, fused: bool) -> None:
    """Every kernel, adding into the base output or with the base GEMM accumulating into it, on random
    routes (-1 rows, adapters with no rows, skewed groups) equals the per-row float64 reference."""
    g = gen(seed)
    d_in, d_out = 11, 7
    x = torch.randn(bsz * tokens, d_in, generator=g)  # [bsz * k, in], like OPT's flattened MLP input
    A, B = torch.randn(n, r, d_in, generator=g), torch.randn(n, d_out, r, generator=g)
    scale = torch.rand(n, generator=g) + 0.5
    idx = torch.randint(-1, n, (bsz,), generator=g)
    lin = nn.Linear(d_in, d_out)
    want = _reference(x, A, B, scale, idx) + (x @ lin.weight.T + lin.bias).double().detach()
    with torch.no_grad():
        if fused:
            gemm = routing.base_gemm(lin.forward, lin, x, A, B)
            assert gemm is not None
            got = routing.lowrank_add(None, x, A, B, scale, idx, kernel=kernel, gemm=gemm)
        else:
            got = routing.lowrank_add(lin(x), x, A, B, scale, idx, kernel=kernel)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_grouping_cache_follows_the_route_and_its_changes() -> None:
    """The grouped kernel's row grouping is cached per route tensor; an in-place change to the route is a
    new grouping, and an inference-mode route (no version counter) is grouped afresh every call."""
    g = gen(9)
    x = torch.randn(6, 2, 11, generator=g)
    A, B = torch.randn(3, 2, 11, generator=g), torch.randn(3, 5, 2, generator=g)
    scale = torch.tensor([1.0, 2.0, 3.0])
    idx = torch.tensor([0, 2, 2, -1, 1, 0])
    with torch.no_grad():
        first = routing.lowrank_add(torch.zeros(6, 2, 5), x, A, B, scale, idx, kernel="grouped")
        idx[1] = 0  # same tensor, new version
        second = routing.lowrank_add(torch.zeros(6, 2, 5), x, A, B, scale, idx, kernel="grouped")
    old = torch.tensor([0, 2, 2, -1, 1, 0])
    torch.testing.assert_close(first.double(), _reference(x, A, B, scale, old), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.double(), _reference(x, A, B, scale, idx), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        frozen = torch.tensor([1, 1, 1, 1, 1, 1])
        third = routing.lowrank_add(torch.zeros(6, 2, 5), x, A, B, scale, frozen, kernel="grouped")
        frozen[0] = 2
        fourth = routing.lowrank_add(torch.zeros(6, 2, 5), x, A, B, scale, frozen, kernel="grouped")
    torch.testing.assert_close(third.double(), _reference(x, A, B, scale, torch.tensor([1] * 6)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fourth.double(), _reference(x, A, B, scale, frozen.clone()), rtol=1e-5, atol=1e-5)


def test_sorted_equal_groups_need_no_gathers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A route already sorted into equal groups (what route="all" builds) takes the grouped kernel at any
    row length, with no index_select at all, and equals the per-row reference."""
    g = gen(11)
    x = torch.randn(6 * 40, 11, generator=g)  # 40 tokens per row: longer than GROUPED_TOKENS
    A, B = torch.randn(3, 4, 11, generator=g), torch.randn(3, 7, 4, generator=g)
    scale = torch.tensor([0.5, 2.0, 1.5])
    idx = torch.tensor([0, 0, 1, 1, 2, 2])
    lin = nn.Linear(11, 7)
    calls = []
    real = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a, **k: calls.append(1) or real(*a, **k))
    grouped = routing._grouped
    used = []
    monkeypatch.setattr(routing, "_grouped", lambda *a: used.append(1) or grouped(*a))
    with torch.no_grad():
        gemm = routing.base_gemm(lin.forward, lin, x, A, B)
        got = routing.lowrank_add(None, x, A, B, scale, idx, gemm=gemm)
        want = _reference(x, A, B, scale, idx) + (x @ lin.weight.T + lin.bias).double()
    assert routing._groups(idx, 3).identity and used and not calls
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_non_contiguous_stack_and_inference_made_caches() -> None:
    """A strided sub-stack (non-contiguous leaves) routes correctly in inference; caches filled under
    inference_mode are not handed to a later autograd call (it trains and gets gradients)."""
    import optree

    model, fn, params, ads, st = _stack("llama", n=4)
    sub = optree.tree_map(lambda t: t[::2], st, namespace="adaptfn")  # adapters 0 and 2
    ids = ids_for(model, batch=3, seq=2)
    route = torch.tensor([1, 0, -1])
    with torch.no_grad():
        out = af.inject(fn, sub, route=route)(params, input_ids=ids).logits
        for i, j in enumerate([2, 0, -1]):
            alone = (af.inject(fn, ads[j]) if j >= 0 else fn)(params, input_ids=ids[i:i + 1]).logits[0]
            assert _rel(out[i], alone) <= 1e-5
    g = af.inject(fn, st, route=torch.tensor([0, 3, 1]))
    ids1 = ids_for(model, batch=3, seq=1)
    emb = model.get_input_embeddings().weight[ids1].detach()
    with torch.inference_mode():
        first = g(params, inputs_embeds=emb).logits
    emb = emb.clone().requires_grad_()
    out = g(params, inputs_embeds=emb).logits
    out.sum().backward()
    assert emb.grad is not None and _rel(out.detach(), first) <= 1e-5


SHARED_TARGETS = {  # no embedding LoRA: the adapters' copies of the batch stay equal up to layer 0's attention
    "opt": (["q_proj", "k_proj", "v_proj", "out_proj", "fc1"], 3),  # q, k, v of layer 0 share
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], 3),
    "gpt2": (["c_attn", "c_fc"], 1),  # one fused Conv1D q/k/v
}


def _spy_shared(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, per call of the shared kernel, whether it was taken (True) or its check declined (False)."""
    real = routing._shared
    seen: list[bool] = []
    monkeypatch.setattr(routing, "_shared", lambda *a: seen.append((res := real(*a)) is not None) or res)
    return seen


@pytest.mark.parametrize("name", sorted(SHARED_TARGETS))
def test_route_all_runs_the_shared_prefix_once(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """route="all" in inference: the adapted modules that see equal copies of the batch (layer 0's q/k/v)
    run their base GEMM and A side once; the first module whose copies differ ends the checks; the
    outputs equal each adapter alone. With LoRA dropout the copies are not shared."""
    targets, n_shared = SHARED_TARGETS[name]
    model = BUILDERS[name]()
    fn, params = af.functional(model)
    ads = [af.init(fn, af.LoraConfig(r=2 + i, lora_alpha=3 + 2 * i, target_modules=targets, lora_dropout=0.2,
                                     init_lora_weights=False), generator=gen(i)) for i in range(3)]
    st = af.stack(ads)
    ids = ids_for(model, batch=2, seq=5)
    seen = _spy_shared(monkeypatch)
    with torch.inference_mode():
        out = af.inject(fn, st, route="all")(params, input_ids=ids).logits
    assert seen == [True] * n_shared + [False]
    for k, a in enumerate(ads):
        assert _rel(out[k], af.inject(fn, a)(params, input_ids=ids).logits) <= 1e-5
    seen.clear()
    with torch.no_grad():
        af.inject(fn, st, route="all", generator=gen(5))(params, input_ids=ids)
    assert not seen  # dropout: each copy's low-rank input differs


def test_shared_kernel_checks_the_copies_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside same_inputs, equal copies take the shared kernel; copies differing in one element (the last
    one) do not, end the checks for the call, and every result equals the per-row reference."""
    g = gen(13)
    n, bsz, tokens = 3, 2, 4
    x0 = torch.randn(bsz * tokens, 11, generator=g)
    A, B = torch.randn(n, 5, 11, generator=g), torch.randn(n, 7, 5, generator=g)
    scale = torch.tensor([0.5, 2.0, 1.5])
    idx = torch.arange(n).repeat_interleave(bsz)
    lin = nn.Linear(11, 7)
    diff = x0.repeat(n, 1)
    diff[-1, -1] += 1.0
    seen = _spy_shared(monkeypatch)
    with torch.no_grad():
        def run(x: torch.Tensor) -> torch.Tensor:
            got = routing.lowrank_add(None, x, A, B, scale, idx, gemm=routing.base_gemm(lin.forward, lin, x, A, B))
            want = _reference(x, A, B, scale, idx) + (x @ lin.weight.T + lin.bias).double()
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
            return got

        with routing.same_inputs(idx):
            call = routing._ALL.call
            run(x0.repeat(n, 1))
            assert call.open
            run(diff)
            assert not call.open
            run(x0.repeat(n, 1))  # checks ended: the grouped kernel
        run(x0.repeat(n, 1))  # outside the block: never shared
        assert getattr(routing._ALL, "call", None) is None
    assert seen == [True, False]


def test_a_sliced_stack_routes_by_its_leaves() -> None:
    """Slicing a stack's leaves (af.tree.map) gives a stack of fewer adapters: route="all" and route=
    count them from the leaves; unstack, which needs each adapter's config, and leaves that disagree
    raise typed errors naming what is wrong."""
    model, fn, params, ads, st = _stack("opt", n=4)
    sub = af.tree.map(lambda t: t[1:3], st)
    assert sub.stack_size == 2 and "×2 stacked" in repr(sub)
    ids = ids_for(model, batch=2, seq=3)
    with torch.no_grad():
        out = af.inject(fn, sub, route="all")(params, input_ids=ids).logits
        assert out.shape[0] == 2
        for k, j in enumerate((1, 2)):
            assert _rel(out[k], af.inject(fn, ads[j])(params, input_ids=ids).logits) <= 1e-5
    with pytest.raises(af.ConfigError, match=r"\[-1, 1\] for a stack of 2"):
        af.inject(fn, sub, route=torch.tensor([0, 2]))
    with pytest.raises(af.ConfigError, match="hold 2 adapters but it was built from 4"):
        af.unstack(sub)
    path = sub.paths[0]
    tensors = {p: ({**d, "lora_A": d["lora_A"][:1]} if p == path else dict(d)) for p, d in sub.tensors.items()}
    bad = af.Adapter(sub.method, sub.config, sub.entries, tensors, sub.stack_info)  # one leaf sliced differently
    with pytest.raises(af.ConfigError, match=f"leading .adapter. axes differ: .*{path}"):
        af.inject(fn, bad, route="all")
