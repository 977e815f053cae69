"""af.optim: pure optimisers on adapter trees, checked against torch.optim on the same tensors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen, ids_for, tiny_llama, tiny_opt

import adaptfn as af

PEAK = 1e-2


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(model, **cfg):
    fn, params = af.functional(model)
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **cfg}
    adapter = af.init(fn, af.LoraConfig(**cfg), generator=gen(0))
    return fn, params, adapter


def _keys(adapter) -> list[tuple[str, str]]:
    return [(p, n) for p, d in af.optim.trainable(adapter).items() for n in d]


def _with(adapter, new: dict[tuple[str, str], torch.Tensor]):
    """The adapter with some leaves swapped (e.g. for nn.Parameters), built with the public constructor."""
    tensors = {p: dict(d) for p, d in adapter.tensors.items()}
    for (p, n), t in new.items():
        tensors[p][n] = t
    return af.Adapter(adapter.method, adapter.config, adapter.entries, tensors, adapter.stack_info)


def _leaf(adapter, key):
    return adapter.tensors[key[0]][key[1]]


def _train_both(make_af, make_torch, model, steps: int, **cfg):
    """`steps` of af.optim (grads from torch.func.grad) and of torch.optim (nn.Parameters + backward)."""
    fn, params, a0 = _setup(model, **cfg)
    ids = ids_for(model, batch=4, seq=9)

    def loss(a, ids):
        return af.inject(fn, a)(params, input_ids=ids, labels=ids).loss

    keys = _keys(a0)
    ps = {k: torch.nn.Parameter(_leaf(a0, k).clone()) for k in keys}
    ref = _with(a0, ps)
    topt, sched = make_torch(list(ps.values()))
    opt = make_af()
    a, state = a0, opt.init(a0)
    for i in range(steps):
        g = torch.func.grad(loss)(a, ids[i % 2 * 2: i % 2 * 2 + 2])
        a, state = opt.update(g, state, a)
        topt.zero_grad()
        loss(ref, ids[i % 2 * 2: i % 2 * 2 + 2]).backward()
        topt.step()
        if sched is not None:
            sched.step()
    assert int(state.count) == steps
    return a0, a, ps


def _assert_close_to_torch(a0, a, ps):
    moved = 0.0
    for k, p in ps.items():
        torch.testing.assert_close(_leaf(a, k), p.detach(), rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
        moved = max(moved, (p.detach() - _leaf(a0, k)).abs().max().item())
    assert moved > 1e-3  # it trained


def _linear(step: int) -> float:
    return af.optim.linear_warmup_decay(PEAK, 10, 100)(step)


@pytest.mark.parametrize("variant", ["plain", "weight_decay+schedule"])
def test_adamw_matches_torch_adamw(variant):
    if variant == "plain":
        def make_af():
            return af.optim.adamw(lr=PEAK, weight_decay=0.0)

        def make_torch(ps):
            return torch.optim.AdamW(ps, lr=PEAK, weight_decay=0.0), None
    else:
        def make_af():
            return af.optim.adamw(lr=af.optim.linear_warmup_decay(PEAK, 10, 100), betas=(0.8, 0.99), eps=1e-6,
                                  weight_decay=0.1)

        def make_torch(ps):
            o = torch.optim.AdamW(ps, lr=PEAK, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
            return o, torch.optim.lr_scheduler.LambdaLR(o, lambda s: _linear(s) / PEAK)

    # LoRA deltas plus a trainable replacement (modules_to_save lm_head)
    _assert_close_to_torch(*_train_both(make_af, make_torch, tiny_opt(), 100, modules_to_save=["lm_head"]))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_sgd(nesterov):
    def make_af():
        return af.optim.sgd(af.optim.cosine(0.5, total_steps=100, warmup_steps=5), momentum=0.9,
                            weight_decay=0.01, nesterov=nesterov)

    def make_torch(ps):
        o = torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
        sched = af.optim.cosine(0.5, total_steps=100, warmup_steps=5)
        return o, torch.optim.lr_scheduler.LambdaLR(o, lambda s: sched(s) / 0.5)

    _assert_close_to_torch(*_train_both(make_af, make_torch, tiny_opt(), 100 if not nesterov else 40,
                                        init_lora_weights=False))


def test_same_grads_give_torch_result_bit_for_bit():
    """Given identical gradients, af.optim runs torch's own kernels: the results are equal, not just close."""
    _, _, a0 = _setup(tiny_opt(), init_lora_weights=False)
    keys = _keys(a0)
    g = torch.Generator().manual_seed(3)
    grads_seq = [{k: torch.randn(_leaf(a0, k).shape, generator=g) for k in keys} for _ in range(6)]
    for make_af, make_torch in [
        (lambda: af.optim.adamw(af.optim.cosine(0.1, 6, 2), weight_decay=0.05),
         lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.05)),
        (lambda: af.optim.sgd(0.1, momentum=0.5, nesterov=True, weight_decay=0.1),
         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.1)),
    ]:
        ps = {k: torch.nn.Parameter(_leaf(a0, k).clone()) for k in keys}
        topt = make_torch(list(ps.values()))
        sched = None
        if isinstance(topt, torch.optim.AdamW):
            cos = af.optim.cosine(0.1, 6, 2)
            sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s, cos=cos: cos(s) / 0.1)
        opt = make_af()
        a, state = a0, opt.init(a0)
        for grads in grads_seq:
            a, state = opt.update(_with(a0, grads), state, a)
            for k in keys:
                ps[k].grad = grads[k].clone()
            topt.step()
            if sched is not None:
                sched.step()
        for k in keys:
            assert torch.equal(_leaf(a, k), ps[k].detach()), k


@pytest.mark.parametrize("make", [lambda: af.optim.adamw(1e-2), lambda: af.optim.sgd(0.1, momentum=0.9)])
def test_update_is_pure(make):
    model = tiny_opt()
    fn, params, a0 = _setup(model, init_lora_weights=False)
    ids = ids_for(model)
    grads = torch.func.grad(lambda a: af.inject(fn, a)(params, input_ids=ids, labels=ids).loss)(a0)
    opt = make()
    state = opt.init(a0)
    a1, state1 = opt.update(grads, state, a0)  # one step, so the state holds non-zero tensors
    watched = [*af.tree.leaves(a1), *af.tree.leaves(grads), *af.tree.leaves(state1)]
    before = [(t._version, t.clone()) for t in watched]
    a2, state2 = opt.update(grads, state1, a1)
    for t, (v, c) in zip(watched, before):
        assert t._version == v
        assert torch.equal(t, c)
    # new tensors for what changed, and none of them aliases an input
    inputs = {t.data_ptr() for t in watched}
    for key in _keys(a1):
        assert _leaf(a2, key).data_ptr() not in inputs
        assert not torch.equal(_leaf(a2, key), _leaf(a1, key))
    assert not inputs & {t.data_ptr() for t in af.tree.leaves(state2)}
    assert int(state1.count) == 1 and int(state2.count) == 2
    assert not any(t.requires_grad for t in af.tree.leaves(a2))


def test_gate_scaling_and_frozen_leaves_are_not_trained():
    model = tiny_llama()
    fn, params = af.functional(model)
    cfg = af.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"],
                        init_lora_weights=False)
    a0 = af.init(fn, cfg, generator=gen(0))
    a0 = af.mask(a0, lambda p: not p.endswith("layers.1.self_attn.q_proj"))  # one module masked (gate 0)
    emb = "model.embed_tokens"
    assert a0.entries[emb].frozen == ("weight",)
    # what the optimiser sees: exactly the trainable parameters
    seen = af.optim.trainable(a0)
    assert sum(t.numel() for d in seen.values() for t in d.values()) == a0.num_parameters()
    assert "gate" not in {n for d in seen.values() for n in d} and "weight" not in seen[emb]
    assert set(seen["lm_head"]) == {"weight"}
    # gradients that are non-zero everywhere, even on the non-trainable leaves
    grads = af.tree.map(lambda t: torch.ones_like(t), a0)
    for opt in (af.optim.adamw(0.1, weight_decay=0.1), af.optim.sgd(0.1, momentum=0.9, weight_decay=0.1)):
        state = opt.init(a0)
        assert all(t.shape == seen[p][n].shape for p, d in af.optim.trainable(state[1]).items()
                   for n, t in d.items())
        a, state = opt.update(grads, state, a0)
        a, state = opt.update(grads, state, a)
        for p in a0.paths:
            assert a.tensors[p]["gate"] is a0.tensors[p]["gate"]
        assert a.tensors[emb]["weight"] is a0.tensors[emb]["weight"]
        for p, d in seen.items():
            for n in d:
                assert not torch.equal(a.tensors[p][n], a0.tensors[p][n]), (p, n)
        assert float(a.tensors["model.layers.1.self_attn.q_proj"]["gate"]) == 0.0
        assert set(af.optim.trainable(state[1])) == set(seen)


def _stack_setup():
    model = tiny_opt()
    fn, params = af.functional(model)
    adapters = [af.init(fn, af.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False), generator=gen(i))
                for i, (r, alpha) in enumerate([(2, 4), (3, 3), (4, 16)])]
    ids = torch.stack([ids_for(model, batch=2, seq=6, seed=s) for s in range(3)])  # [3, 2, 6]: own data each

    def loss(a, ids):
        return af.inject(fn, a)(params, input_ids=ids, labels=ids).loss

    return adapters, ids, loss


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("which", ["adamw", "sgd"])
def test_stacked_adapter_gets_per_adapter_updates(which):
    adapters, ids, loss = _stack_setup()

    def make():
        sched = af.optim.linear_warmup_decay(0.05, 2, 10)
        if which == "adamw":
            return af.optim.adamw(sched, weight_decay=0.1)
        return af.optim.sgd(sched, momentum=0.9, nesterov=True, weight_decay=0.1)

    opt = make()
    stacked = af.stack(adapters)
    direct, s_direct = stacked, opt.init(stacked)
    mapped, s_mapped = stacked, torch.func.vmap(opt.init)(stacked)
    assert s_mapped.count.shape == (3,)
    singles = [(a, opt.init(a)) for a in adapters]
    for _ in range(3):
        g_stacked = torch.func.vmap(torch.func.grad(loss))(direct, ids)
        direct, s_direct = opt.update(g_stacked, s_direct, direct)
        g_mapped = torch.func.vmap(torch.func.grad(loss))(mapped, ids)
        mapped, s_mapped = torch.func.vmap(opt.update)(g_mapped, s_mapped, mapped)
        singles = [opt.update(torch.func.grad(loss)(a, x), s, a) for (a, s), x in zip(singles, ids)]
    assert s_mapped.count.tolist() == [3, 3, 3] and int(s_direct.count) == 3
    for p in stacked.paths:
        assert direct.tensors[p]["scaling"] is stacked.tensors[p]["scaling"]
        assert torch.equal(mapped.tensors[p]["scaling"], stacked.tensors[p]["scaling"])
        # rank padding (adapters 0 and 1 padded to r=4) stays exactly zero
        for out in (direct, mapped):
            assert not out.tensors[p]["lora_A"][0, 2:].any() and not out.tensors[p]["lora_B"][1, :, 3:].any()
    for out in (direct, mapped):
        for got, (want, _) in zip(af.unstack(out), singles):
            for p in want.paths:
                for n in ("lora_A", "lora_B"):
                    torch.testing.assert_close(got.tensors[p][n], want.tensors[p][n], rtol=1e-4, atol=1e-5)
    assert not torch.equal(direct.tensors[p]["lora_B"], stacked.tensors[p]["lora_B"])


def test_adapter_sum_and_nested_dict_grads():
    model = tiny_opt()
    fn, params, a1 = _setup(model, init_lora_weights=False)
    a2 = af.init(fn, af.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), generator=gen(5))
    both = af.select({"x": a1, "y": a2}, ["x", "y"])
    ids = ids_for(model)
    grads = torch.func.grad(lambda s: af.inject(fn, s)(params, input_ids=ids, labels=ids).loss)(both)
    opt = af.optim.adamw(1e-2)
    state = opt.init(both)
    assert set(state.mu) == {"x", "y"} and set(state.mu["y"]) == set(a2.paths)
    new, _ = opt.update(grads, state, both)
    assert isinstance(new, af.AdapterSum)
    # the nested dict of trainable leaves works as grads too, and gives the same step
    new2, _ = opt.update(af.optim.trainable(grads), state, both)
    for x, y in zip(af.tree.leaves(new), af.tree.leaves(new2)):
        assert torch.equal(x, y)
    # map_trainable touches only trainable leaves, keeping the rest as they are
    halved = af.optim.map_trainable(lambda t: t / 2, a1)
    for p in a1.paths:
        assert halved.tensors[p]["gate"] is a1.tensors[p]["gate"]
        assert torch.equal(halved.tensors[p]["lora_A"], a1.tensors[p]["lora_A"] / 2)


def test_schedules():
    lin = af.optim.linear_warmup_decay(1.0, 4, 12)
    assert [lin(s) for s in (0, 2, 4, 8, 12, 20)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    cos = af.optim.cosine(2.0, total_steps=14, warmup_steps=4, min_lr=0.5)
    assert cos(0) == 0.0 and cos(2) == 1.0 and cos(4) == 2.0 and cos(14) == 0.5 and cos(99) == 0.5
    assert math.isclose(cos(9), 0.5 + 1.5 * 0.5)
    assert af.optim.constant(0.3)(7) == 0.3
    for sched in (lin, cos):  # the tensor form (used under vmap / compile) agrees
        steps = torch.arange(25)
        assert torch.allclose(sched(steps), torch.tensor([sched(int(s)) for s in steps], dtype=torch.float64))
    nolinear = af.optim.linear_warmup_decay(1.0, 0, 10)
    assert nolinear(0) == 1.0 and nolinear(5) == 0.5


def test_bad_arguments_raise_config_errors():
    for bad in (lambda: af.optim.adamw(lr=-1.0), lambda: af.optim.adamw(betas=(0.9, 1.0)),
                lambda: af.optim.adamw(eps=-1), lambda: af.optim.adamw(weight_decay=-0.1),
                lambda: af.optim.sgd(0.1, momentum=1.5), lambda: af.optim.sgd(0.1, nesterov=True),
                lambda: af.optim.sgd("fast"), lambda: af.optim.linear_warmup_decay(1.0, 10, 5),
                lambda: af.optim.cosine(1.0, total_steps=-1)):
        with pytest.raises(af.ConfigError):
            bad()
    model = tiny_opt()
    fn, _, a = _setup(model)
    other = af.init(fn, af.LoraConfig(r=4, target_modules=["k_proj"]), generator=gen(1))
    opt = af.optim.adamw()
    with pytest.raises(af.IncompatibleAdapterError, match="q_proj"):
        opt.update(a, opt.init(other), a)
    with pytest.raises(af.IncompatibleAdapterError, match="grads has no leaf .*q_proj"):
        opt.update(other, opt.init(a), a)
    with pytest.raises(af.ConfigError, match="AdamWState"):
        opt.update(a, af.optim.sgd(0.1).init(a), a)
    with pytest.raises(af.ConfigError, match="Adapter"):
        opt.init([torch.zeros(2)])
