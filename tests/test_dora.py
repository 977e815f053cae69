"""DoRA (``use_dora=True``) and ``lora_bias=True`` inside adaptfn: masks and scale weights (exact at 0 and 1,
differentiable, merged as injected, refused by the file format where it cannot hold them), vmap / route= /
route="all" against the loop over adapters, the inference cache of the DoRA factor following in-place changes,
capabilities (no combine), and the checks. PEFT parity is tests/parity/test_dora_parity.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import gen, ids_for, rel_err, tiny_gpt2, tiny_llama, tiny_opt

import adaptfn as af
from adaptfn import routing

TARGETS = {"opt": (tiny_opt, ["q_proj", "v_proj", "fc2", "embed_tokens"]),
           "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "wte"])}


def _noisy(a: Any, seed: int) -> Any:
    """Noise on the delta leaves (the frozen embedding matrices PEFT saves stay the base's)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {p: {n: (t if (not t.dim() or n in e.frozen) else t + 0.3 * torch.randn(t.shape, generator=g,
                                                                                         dtype=t.dtype))
                   for n, t in a.leaves(p).items()} for p, e in a.entry_items}
    return af.Adapter(a.method, a.config, dict(a.entries), tensors)


def _adapters(name: str, n: int = 3, **kw: Any) -> tuple[Any, Any, dict, list]:
    build, tm = TARGETS[name]
    model = build()
    fn, params = af.functional(model)
    cfg = dict(lora_alpha=4, target_modules=tm, use_dora=True, init_lora_weights=False)
    cfg.update(kw)
    ads = [_noisy(af.init(fn, af.LoraConfig(r=2 + i, **cfg), generator=gen(i)), 10 + i) for i in range(n)]
    return model, fn, params, ads


def logits(g: Any, params: dict, ids: torch.Tensor) -> torch.Tensor:
    return g(params, input_ids=ids).logits


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mask_and_scale_are_exact_at_zero_and_one(name: str) -> None:
    model, fn, params, (a, *_) = _adapters(name, 1)
    ids = ids_for(model, batch=2, seq=4)
    with torch.no_grad():
        base = logits(fn, params, ids)
        full = logits(af.inject(fn, a), params, ids)
        assert rel_err(full, base) > 1e-2
        assert torch.equal(logits(af.inject(fn, af.mask(a, False)), params, ids), base)
        assert torch.equal(logits(af.inject(fn, af.scale(a, 0.0)), params, ids), base)
        assert torch.equal(logits(af.inject(fn, af.scale(a, 1.0)), params, ids), full)
    # the autograd path (no fused inference kernel, no cached factor) too
    assert torch.equal(logits(af.inject(fn, af.scale(a, 1.0)), params, ids).detach(),
                       logits(af.inject(fn, a), params, ids).detach())
    if name != "opt":
        return
    # under vmap: the gate and the weight are read as tensors, and still give the base exactly
    w = torch.tensor([0.0, 1.0, 0.5])
    with torch.no_grad():
        outs = torch.func.vmap(lambda w: logits(af.inject(fn, af.scale(a, w)), params, ids))(w)
        assert torch.equal(outs[0], base)
        assert rel_err(outs[1], full) <= 1e-6
        assert rel_err(outs[2], logits(af.inject(fn, af.scale(a, 0.5)), params, ids)) <= 1e-5
        masked = torch.func.vmap(lambda s: logits(af.inject(fn, s), params, ids))(af.stack([af.mask(a, False), a]))
        assert torch.equal(masked[0], base)


def test_scale_weights_compose_merge_and_differentiate() -> None:
    model, fn, params, (a, *_) = _adapters("gpt2", 1)
    ids = ids_for(model, batch=1, seq=4)
    with torch.no_grad():
        for w in (0.3, -0.7, 1.6):
            s = af.scale(a, w)
            out = logits(af.inject(fn, s), params, ids)
            assert rel_err(logits(fn, af.merge(params, s), ids), out) <= 1e-5, w
        assert rel_err(logits(af.inject(fn, af.scale(af.scale(a, 0.5), 0.6)), params, ids),
                       logits(af.inject(fn, af.scale(a, 0.3)), params, ids)) <= 1e-5
    # d/dw is the true derivative (the norm keeps its path to w): float64 central differences
    m64 = tiny_gpt2().double()
    fn64, p64 = af.functional(m64)
    a64 = af.tree.map(lambda t: t.double(), a)

    def f(w: torch.Tensor) -> torch.Tensor:
        return af.inject(fn64, af.scale(a64, w))(p64, input_ids=ids).logits.square().mean()

    w0, eps = torch.tensor(0.6, dtype=torch.float64), 1e-5
    fd = (f(w0 + eps) - f(w0 - eps)) / (2 * eps)
    assert abs(float(torch.func.grad(f)(w0) - fd)) <= 1e-6 * max(1.0, abs(float(fd)))


def test_files_cannot_hold_a_weighted_or_masked_dora_module(tmp_path) -> None:
    _, fn, params, (a, *_) = _adapters("opt", 1)
    af.save(af.scale(a, 1.0), tmp_path / "one")  # a weight of 1 is the adapter itself
    with pytest.raises(af.ConfigError, match="scale weight"):
        af.state_dict(af.scale(a, 0.5))
    with pytest.raises(af.ConfigError, match="masked"):
        af.save(af.mask(a, r".*q_proj"), tmp_path / "masked")
    af.save(af.select(a, r".*q_proj"), tmp_path / "selected")  # dropping the module works
    merged = af.merge(params, af.scale(a, 0.5))  # merging works
    assert any(merged[k] is not params[k] for k in params)


def test_dora_and_lora_bias_do_not_combine() -> None:
    _, fn, _, (a, b) = _adapters("opt", 2)
    with pytest.raises(af.ConfigError, match="DoRA"):
        af.combine([a, b], [0.5, 0.5])
    _, fn, _, (c,) = _adapters("gpt2", 1, use_dora=False, lora_bias=True, target_modules=["c_attn"])
    with pytest.raises(af.ConfigError, match="lora_bias"):
        af.combine([c], [1.0])


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_vmap_route_and_route_all_equal_the_loop(name: str) -> None:
    model, fn, params, ads = _adapters(name)
    ids = ids_for(model, batch=5, seq=3)
    st = af.stack(ads)
    with torch.no_grad():
        loop = torch.stack([logits(af.inject(fn, a), params, ids) for a in ads])
        assert rel_err(torch.func.vmap(lambda a: logits(af.inject(fn, a), params, ids))(st), loop) <= 1e-5
        assert rel_err(af.inject(fn, st, route="all")(params, input_ids=ids).logits, loop) <= 1e-5
        base = logits(fn, params, ids)
        idx = torch.tensor([2, -1, 0, 1, 0])
        for kernel_limit in (routing.DENSE_LIMIT, 0):  # the dense kernel, then the gather kernel
            old, routing.DENSE_LIMIT = routing.DENSE_LIMIT, kernel_limit
            try:
                out = af.inject(fn, st, route=idx)(params, input_ids=ids).logits
            finally:
                routing.DENSE_LIMIT = old
            for i, j in enumerate(idx.tolist()):
                want = loop[j, i] if j >= 0 else base[i]
                assert rel_err(out[i], want) <= 1e-5, (kernel_limit, i, j)
            assert torch.equal(out[1], base[1])  # a base row gets exactly nothing


def test_route_with_different_targets_weights_and_gradients() -> None:
    model, fn, params, (a, b, c) = _adapters("opt")
    ids = ids_for(model, batch=3, seq=4)
    q_only = af.select(a, r".*q_proj")
    st = af.scale(af.stack([q_only, af.mask(b, r".*fc2"), c]), torch.tensor([0.5, 1.0, 2.0]))
    want = [af.scale(q_only, 0.5), af.scale(af.mask(b, r".*fc2"), 1.0), af.scale(c, 2.0)]
    idx = torch.tensor([1, 0, 2])
    with torch.no_grad():
        out = af.inject(fn, st, route=idx)(params, input_ids=ids).logits
        for i, j in enumerate(idx.tolist()):
            assert rel_err(out[i], logits(af.inject(fn, want[j]), params, ids[i:i + 1])[0]) <= 1e-5, i
    # training: each row's adapter gets the gradient of its rows only; magnitudes included
    g = torch.func.grad(lambda s: af.inject(fn, s, route=torch.tensor([0, 0, 2]))(params, input_ids=ids)
                        .logits.square().mean())(af.stack([a, b, c]))
    p = "model.decoder.layers.0.self_attn.v_proj"
    mag = g.leaves(p)["lora_magnitude"]
    assert mag[1].abs().sum() == 0 and mag[0].abs().sum() > 0 and mag[2].abs().sum() > 0


def test_the_cached_factor_follows_in_place_changes() -> None:
    model, fn, params, (a, *_) = _adapters("opt", 1)
    ids = ids_for(model)
    g = af.inject(fn, a)
    p = "model.decoder.layers.1.self_attn.q_proj"
    with torch.no_grad():
        first = logits(g, params, ids)
        assert torch.equal(logits(g, params, ids), first)  # the cached factor gives the same result
        for leaf in ("lora_B", "lora_magnitude"):
            a.leaves(p)[leaf].mul_(1.5)  # an in-place update (an optimiser step under no_grad)
            fresh = af.Adapter(a.method, a.config, dict(a.entries),
                               {q: {n: t.clone() for n, t in a.leaves(q).items()} for q in a.paths})
            assert torch.equal(logits(g, params, ids), logits(af.inject(fn, fresh), params, ids)), leaf


def test_training_updates_the_magnitude_and_direction() -> None:
    model, fn, params, (a, *_) = _adapters("opt", 1)
    ids = ids_for(model, batch=2, seq=4)
    opt = af.optim.adamw(lr=1e-2)
    state = opt.init(a)

    def loss(ad: Any) -> torch.Tensor:
        return af.inject(fn, ad)(params, input_ids=ids, labels=ids).loss

    before = float(loss(a))
    for _ in range(2):
        grads = torch.func.grad(loss)(a)
        a, state = opt.update(grads, state, a)
    assert float(loss(a)) < before
    assert a.num_parameters() == sum(t.numel() for p in a.paths for n, t in a.leaves(p).items()
                                     if n in ("lora_A", "lora_B", "lora_magnitude"))


def test_checks_name_the_problem() -> None:
    model, fn, params, (a, *_) = _adapters("opt", 1)
    plain = af.init(fn, af.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), generator=gen(0))
    with pytest.raises(af.IncompatibleAdapterError, match="leaves"):
        af.stack([af.select(a, r".*q_proj"), plain])
    p = "model.decoder.layers.0.self_attn.q_proj"
    bad = af.Adapter(a.method, a.config, dict(a.entries),
                     {q: ({**a.leaves(q), "lora_magnitude": torch.ones(5)} if q == p else dict(a.leaves(q)))
                      for q in a.paths})
    with pytest.raises(af.IncompatibleAdapterError, match="lora_magnitude"):
        af.inject(fn, bad)
    with pytest.raises(af.IncompatibleAdapterError, match="lora_bias"):
        af.init(fn, af.LoraConfig(target_modules=["embed_tokens"], lora_bias=True))
    with pytest.raises(af.ConfigError, match="lora_bias"):
        af.LoraConfig(use_dora=True, lora_bias=True)


def test_lora_bias_route_mask_scale_and_merge() -> None:
    model, fn, params, ads = _adapters("opt", use_dora=False, lora_bias=True, target_modules=["q_proj", "fc1"])
    ids = ids_for(model, batch=3)
    a = ads[0]
    assert all("lora_bias" in a.leaves(p) for p in a.paths if a.entries[p].kind)
    with torch.no_grad():
        base = logits(fn, params, ids)
        out = logits(af.inject(fn, a), params, ids)
        assert torch.equal(logits(af.inject(fn, af.mask(a, False)), params, ids), base)
        assert torch.equal(logits(af.inject(fn, af.scale(a, 0.0)), params, ids), base)
        assert rel_err(logits(fn, af.merge(params, a), ids), out) <= 1e-5
        half = af.scale(a, 0.5)
        assert rel_err(logits(fn, af.merge(params, half), ids), logits(af.inject(fn, half), params, ids)) <= 1e-5
        assert rel_err(logits(af.inject(fn, af.from_state_dict(af.state_dict(half), a.config)), params, ids),
                       logits(af.inject(fn, half), params, ids)) <= 1e-5
        st = af.stack(ads)
        idx = torch.tensor([2, -1, 0])
        routed = af.inject(fn, st, route=idx)(params, input_ids=ids).logits
        for i, j in enumerate(idx.tolist()):
            want = logits(af.inject(fn, ads[j]), params, ids[i:i + 1])[0] if j >= 0 else base[i]
            assert rel_err(routed[i], want) <= 1e-5, i
        vm = torch.func.vmap(lambda s: logits(af.inject(fn, s), params, ids))(st)
        assert rel_err(vm[1], logits(af.inject(fn, ads[1]), params, ids)) <= 1e-5
    # a base layer without a bias cannot take it in a merge (Llama's projections)
    lm = tiny_llama()
    fn2, p2 = af.functional(lm)
    b = af.init(fn2, af.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True), generator=gen(0))
    with pytest.raises(af.IncompatibleAdapterError, match="no bias"):
        af.merge(p2, b)


def test_merge_of_hand_made_params_falls_back_to_the_entry_flag() -> None:
    """A weight that never came from af.functional has no recorded layout: the entry's fan_in_fan_out decides
    for a square weight (GPT-2's attn.c_proj), the shape for the others."""
    model = tiny_gpt2()
    fn, params = af.functional(model)
    a = _noisy(af.init(fn, af.LoraConfig(r=2, target_modules=["c_attn", "c_proj"], init_lora_weights=False),
                       generator=gen(0)), 1)
    ids = ids_for(model)
    copies = {k: v.clone() for k, v in params.items()}  # new tensors: no record
    with torch.no_grad():
        want = logits(af.inject(fn, a), params, ids)
        assert rel_err(logits(fn, af.merge(copies, a), ids), want) <= 1e-5
        assert rel_err(logits(fn, af.merge(params, a), ids), want) <= 1e-5


def test_compiled_dora_switches_adapters_without_recompiling() -> None:
    model, fn, params, (a, b) = _adapters("opt", 2, target_modules=["q_proj", "fc1"])
    b = af.Adapter(b.method, a.config, dict(a.entries), {p: {n: t * 1.1 for n, t in a.leaves(p).items()}
                                                         for p in a.paths})  # a's structure, other values
    ids = ids_for(model, batch=2, seq=4)
    compiles = []

    def backend(gm: Any, example: Any) -> Any:
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(lambda ad: af.inject(fn, ad)(params, input_ids=ids).logits, fullgraph=True, backend=backend)
    with torch.no_grad():
        for ad in (a, b, a):
            assert rel_err(f(ad), logits(af.inject(fn, ad), params, ids)) <= 1e-5
    assert len(compiles) == 1


def test_fused_kernel_equals_the_autograd_path_with_zero_magnitudes() -> None:
    """The inference kernel starts its buffer with bias / f; a channel with f = 0 falls back to adding the bias."""
    model, fn, params, (a, *_) = _adapters("gpt2", 1)
    ids = ids_for(model, batch=2, seq=4)
    p = "transformer.h.0.attn.c_attn"
    m = a.leaves(p)["lora_magnitude"].clone()
    m[:5] = 0
    z = af.Adapter(a.method, a.config, dict(a.entries),
                   {q: ({**a.leaves(q), "lora_magnitude": m} if q == p else dict(a.leaves(q))) for q in a.paths})
    for ad in (a, z):
        with torch.no_grad():
            fused = logits(af.inject(fn, ad), params, ids)
        slow = logits(af.inject(fn, ad), params, ids).detach()  # nothing needs a gradient: fused too
        leaves = {q: {n: t.detach().clone().requires_grad_() if n == "lora_A" else t for n, t in ad.leaves(q).items()}
                  for q in ad.paths}
        grad_path = logits(af.inject(fn, af.Adapter(ad.method, ad.config, dict(ad.entries), leaves)), params, ids)
        assert torch.isfinite(fused).all()
        assert rel_err(fused, grad_path.detach()) <= 1e-5 and torch.equal(fused, slow)
