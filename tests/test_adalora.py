"""AdaLoRA method: config fields and errors, initialisation, PEFT's formula and scaling, merge / mask /
stack, the orthogonality regulariser, the rank allocator's schedule and masking, pruning for saving."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen, ids_for, tiny_gpt2, tiny_llama, tiny_opt
from torch import nn

import adaptfn as af

KW = dict(init_r=5, target_r=2, lora_alpha=7, total_step=20, target_modules=["q_proj", "v_proj", "fc1"])


def rand_ada(fn, seed=0, **kw):
    return af.init(fn, af.AdaLoraConfig(init_lora_weights=False, **(kw or KW)), generator=gen(seed))


def test_defaults_match_peft() -> None:
    import peft

    ours, theirs = af.AdaLoraConfig(total_step=10), peft.AdaLoraConfig(total_step=10)
    for field in ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                  "total_step", "rank_pattern", "r", "lora_alpha", "lora_dropout", "target_modules",
                  "exclude_modules", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "init_lora_weights",
                  "layers_to_transform", "layers_pattern", "alpha_pattern", "use_dora", "lora_bias", "task_type",
                  "base_model_name_or_path", "revision", "inference_mode"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.to_dict()["peft_type"] == "ADALORA"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "total_step"),
        ({"total_step": 0}, "total_step"),
        ({"total_step": -3}, "total_step"),
        ({"total_step": 10, "init_r": 4, "target_r": 6}, "init_r"),
        ({"total_step": 10, "init_r": 0}, "init_r"),
        ({"total_step": 10, "target_r": -1}, "target_r"),
        ({"total_step": 10, "tinit": 6, "tfinal": 4}, "tinit"),
        ({"total_step": 10, "tfinal": -1}, "tfinal"),
        ({"total_step": 10, "deltaT": 0}, "deltaT"),
        ({"total_step": 10, "beta1": 1.0}, "beta1"),
        ({"total_step": 10, "beta2": 0}, "beta2"),
        ({"total_step": 10, "orth_reg_weight": -0.1}, "orth_reg_weight"),
        ({"total_step": 10, "use_dora": True}, "use_dora"),
        ({"total_step": 10, "bias": "some"}, "bias"),
        ({"total_step": 10, "lora_dropout": 1.0}, "lora_dropout"),
        ({"total_step": 10, "rank_pattern": {"q_proj.lora_E": [1, 0]}}, "rank_pattern"),
        ({"total_step": 10, "target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
def test_bad_config_fields_are_named(kwargs: dict, field: str) -> None:
    with pytest.raises(af.ConfigError, match=field) as e:
        af.AdaLoraConfig(**kwargs)
    assert isinstance(e.value, ValueError) and isinstance(e.value, af.AdaptfnError)


def test_unsupported_peft_fields_from_json() -> None:
    with pytest.raises(af.ConfigError, match="loftq_config"):
        af.AdaLoraConfig.from_dict({"peft_type": "ADALORA", "total_step": 5, "loftq_config": {"loftq_bits": 4}})
    cfg = af.AdaLoraConfig.from_dict({"peft_type": "ADALORA", "total_step": 5, "a_future_field": 3})
    assert cfg.to_dict()["a_future_field"] == 3


def test_targets_and_errors() -> None:
    fn, _ = af.functional(tiny_opt())
    with pytest.raises(af.ConfigError, match="target_modules"):
        af.init(fn, af.AdaLoraConfig(total_step=5))
    with pytest.raises(af.IncompatibleAdapterError, match="Embedding"):
        af.init(fn, af.AdaLoraConfig(total_step=5, target_modules=["embed_tokens"]))
    a = rand_ada(fn)
    assert len(a.paths) == 6 and {e.kind for e in a.entries.values()} == {"svd"}
    t = a.tensors["model.decoder.layers.1.fc1"]
    assert t["lora_A"].shape == (5, 22) and t["lora_E"].shape == (5, 1) and t["lora_B"].shape == (37, 5)


def test_init_matches_peft_distributions_and_starts_at_base() -> None:
    big = nn.Sequential(nn.Linear(301, 211))
    fn, params = af.functional(big)
    a = af.init(fn, af.AdaLoraConfig(init_r=16, total_step=5, target_modules=["0"]), generator=gen(3))
    A, E, B = (a.tensors["0"][n] for n in ("lora_A", "lora_E", "lora_B"))
    assert torch.count_nonzero(E) == 0
    assert A.std().item() == pytest.approx(0.02, rel=0.05) and B.std().item() == pytest.approx(0.02, rel=0.05)
    x = torch.randn(3, 301, generator=gen(1))
    assert torch.equal(af.inject(fn, a)(params, x), big(x))
    r = af.init(fn, af.AdaLoraConfig(init_r=16, total_step=5, target_modules=["0"], init_lora_weights=False),
                generator=gen(3))
    assert r.tensors["0"]["lora_E"].std().item() == pytest.approx(1.0, rel=0.5)
    assert r.tensors["0"]["lora_A"].std().item() == pytest.approx(1.0, rel=0.05)


def test_forward_formula_and_scaling() -> None:
    lin = nn.Linear(7, 5)
    net = nn.Sequential(lin)
    fn, params = af.functional(net)
    a = af.init(fn, af.AdaLoraConfig(init_r=3, target_r=1, lora_alpha=11, total_step=5, target_modules=["0"],
                                     init_lora_weights=False), generator=gen(0))
    e = a.entries["0"]
    assert e.r == 3 and e.scaling == pytest.approx(11 / (3 + 1e-5))
    A, E, B = (a.tensors["0"][n] for n in ("lora_A", "lora_E", "lora_B"))
    x = torch.randn(4, 7, generator=gen(1))
    want = lin(x) + (x @ (A * E).T @ B.T) * 11 / (torch.tensor([3.0]) + 1e-5)
    torch.testing.assert_close(af.inject(fn, a)(params, x), want, rtol=0, atol=0)
    # lora_alpha <= 0: PEFT scales by the rank instead
    z = af.init(fn, af.AdaLoraConfig(init_r=3, lora_alpha=0, target_r=1, total_step=5, target_modules=["0"]))
    assert z.entries["0"].scaling == pytest.approx(3 / (3 + 1e-5))


@pytest.mark.parametrize("build,targets", [
    (tiny_opt, ["q_proj", "v_proj", "fc1"]),
    (tiny_llama, ["k_proj", "o_proj", "up_proj"]),
    (tiny_gpt2, ["c_attn", "c_proj"]),
], ids=["opt", "llama", "gpt2"])
def test_merge_equals_inject_and_mask_is_exact(build, targets) -> None:
    model = build()
    fn, params = af.functional(model)
    ids = ids_for(model)
    a = rand_ada(fn, 1, init_r=4, target_r=2, lora_alpha=5, total_step=9, target_modules=targets)
    out = af.inject(fn, a)(params, input_ids=ids).logits
    base = fn(params, input_ids=ids).logits
    assert (out - base).abs().max() > 1e-2
    torch.testing.assert_close(fn(af.merge(params, a), input_ids=ids).logits, out, rtol=1e-5, atol=1e-5)
    assert torch.equal(af.inject(fn, af.mask(a, False))(params, input_ids=ids).logits, base)
    if build is tiny_gpt2:
        assert a.config.fan_in_fan_out is True and all(e.fan_in_fan_out for e in a.entries.values())


def test_stack_with_different_ranks_vmap() -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    ids = ids_for(model)
    kw = dict(target_r=1, lora_alpha=5, total_step=9, target_modules=["q_proj", "fc1"])
    adapters = [rand_ada(fn, 1, init_r=3, **kw), rand_ada(fn, 2, init_r=5, **kw)]
    stacked = af.stack(adapters)
    assert stacked.tensors["model.decoder.layers.0.fc1"]["lora_E"].shape == (2, 5, 1)
    outs = torch.func.vmap(lambda a: af.inject(fn, a)(params, input_ids=ids).logits)(stacked)
    for i, a in enumerate(adapters):
        torch.testing.assert_close(outs[i], af.inject(fn, a)(params, input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    back = af.unstack(stacked)
    assert back[0].tensors["model.decoder.layers.0.fc1"]["lora_B"].shape == (37, 3)
    assert back[0].entries == adapters[0].entries


@pytest.mark.parametrize("build,targets", [(tiny_opt, ["q_proj", "fc1"]), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_route_gives_each_row_its_adapter(build, targets) -> None:
    """route= on an AdaLoRA stack (ranks 3 and 5, different alphas; OPT Linear and GPT-2 Conv1D): row i equals
    adapter route[i] alone, -1 rows are the base bit for bit, route="all" equals each adapter, gates hold,
    and gradients flow to the stacked leaves."""
    model = build()
    fn, params = af.functional(model)
    ids = ids_for(model, batch=4)
    kw = dict(target_r=1, total_step=9, target_modules=targets)
    adapters = [rand_ada(fn, 1, init_r=3, lora_alpha=5, **kw), rand_ada(fn, 2, init_r=5, lora_alpha=11, **kw)]
    stacked = af.stack(adapters)
    route = torch.tensor([1, -1, 0, 1])
    with torch.no_grad():
        out = af.inject(fn, stacked, route=route)(params, input_ids=ids).logits
        base = fn(params, input_ids=ids).logits
        each = [af.inject(fn, a)(params, input_ids=ids).logits for a in adapters]
        for i, j in enumerate(route.tolist()):
            if j < 0:
                assert torch.equal(out[i], base[i])
            else:
                torch.testing.assert_close(out[i], each[j][i], rtol=1e-5, atol=1e-5)
        assert (each[0] - base).abs().max() > 1e-3  # the adapters do something
        alls = af.inject(fn, stacked, route="all")(params, input_ids=ids).logits
        for j in range(2):
            torch.testing.assert_close(alls[j], each[j], rtol=1e-5, atol=1e-5)
        half = af.mask(stacked, f".*{targets[0]}")  # only the first target kind on, in both adapters
        out_m = af.inject(fn, half, route=route)(params, input_ids=ids).logits
        for i, j in enumerate(route.tolist()):
            if j >= 0:
                want = af.inject(fn, af.mask(adapters[j], f".*{targets[0]}"))(params, input_ids=ids).logits[i]
                torch.testing.assert_close(out_m[i], want, rtol=1e-5, atol=1e-5)

    def loss(st: af.Adapter) -> torch.Tensor:
        return af.inject(fn, st, route=route)(params, input_ids=ids, labels=ids).loss

    g = torch.func.grad(loss)(stacked)
    leaf = g.leaves(stacked.paths[0])["lora_E"]
    assert leaf.shape == (2, 5, 1) and leaf[0, :3].abs().max() > 0 and leaf[1].abs().max() > 0
    assert torch.equal(leaf[0, 3:], torch.zeros_like(leaf[0, 3:]))  # rank padding gets no gradient


def test_orth_reg_value_and_grad() -> None:
    fn, _ = af.functional(tiny_opt())
    a = rand_ada(fn, 3)
    want = 0.0
    for d in a.tensors.values():
        A, B = d["lora_A"], d["lora_B"]
        want += torch.linalg.matrix_norm(A @ A.T - torch.eye(5)).item()
        want += torch.linalg.matrix_norm(B.T @ B - torch.eye(5)).item()
    want /= 2 * len(a.paths)
    assert af.adalora.orth_reg(a).item() == pytest.approx(0.5 * want, rel=1e-5)  # default orth_reg_weight
    assert af.adalora.orth_reg(a, weight=1.0).item() == pytest.approx(want, rel=1e-5)
    g = torch.func.grad(af.adalora.orth_reg)(a)
    for d in g.tensors.values():
        assert d["lora_A"].abs().max() > 0 and d["lora_B"].abs().max() > 0
        assert torch.count_nonzero(d["lora_E"]) == 0
    with pytest.raises(af.ConfigError, match="AdaLoRA"):
        af.adalora.orth_reg(af.init(fn, af.LoraConfig(target_modules=["q_proj"])))


def test_budget_schedule_is_cubic() -> None:
    cfg = af.AdaLoraConfig(init_r=6, target_r=2, total_step=20, tinit=3, tfinal=5, deltaT=2, target_modules=["q"])
    alloc = af.adalora.rank_allocator(cfg)
    init_bgt, target_bgt = 24, 8
    assert alloc.budget_schedule(0, init_bgt, target_bgt) == (24, False)
    assert alloc.budget_schedule(3, init_bgt, target_bgt) == (24, False)
    for step in range(4, 16):
        want = int((24 - 8) * (1 - (step - 3) / 12) ** 3 + 8)
        assert alloc.budget_schedule(step, init_bgt, target_bgt) == (want, step % 2 == 0)
    assert alloc.budget_schedule(15, init_bgt, target_bgt)[0] == 8
    assert alloc.budget_schedule(16, init_bgt, target_bgt) == (8, True)


def _fake_grads(a, scores):
    """Gradients making each triplet's importance equal to ``scores[path][i]`` ordering (|w * g| large for
    the triplets meant to be kept)."""
    out = {}
    for p, d in a.tensors.items():
        s = scores[p]
        out[p] = {"lora_A": s.view(-1, 1) / d["lora_A"].abs().clamp_min(1e-3) * torch.sign(d["lora_A"]),
                  "lora_E": s.view(-1, 1) / d["lora_E"].abs().clamp_min(1e-3) * torch.sign(d["lora_E"]),
                  "lora_B": s.view(1, -1) / d["lora_B"].abs().clamp_min(1e-3) * torch.sign(d["lora_B"]),
                  "gate": torch.zeros(())}
    return out


def test_allocator_masks_least_important_triplets_keeping_shapes() -> None:
    net = nn.ModuleDict({"a": nn.Linear(7, 5), "b": nn.Linear(7, 9)})
    fn, _ = af.functional(net)
    cfg = af.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=3, total_step=8, tinit=0, tfinal=2, deltaT=1,
                           beta1=0.5, beta2=0.5, target_modules=["a", "b"], init_lora_weights=False)
    a = af.init(fn, cfg, generator=gen(0))
    alloc = af.adalora.rank_allocator(cfg)
    state = alloc.init(a)
    assert state.rank_pattern is None and alloc.rank_pattern(state) is None
    g = torch.Generator().manual_seed(5)
    noise = {p: torch.rand(4, generator=g) for p in a.paths}  # a fixed importance ordering
    scores = {"a": torch.tensor([4.0, 3.0, 0.2, 2.0]) + 0.01 * noise["a"],
              "b": torch.tensor([0.1, 5.0, 0.3, 0.4]) + 0.01 * noise["b"]}
    grads = _fake_grads(a, scores)
    shapes = {p: {n: t.shape for n, t in d.items()} for p, d in a.tensors.items()}
    step0 = a
    # step 0 <= tinit: EMAs are updated, nothing is masked
    a, state = alloc.update(a, grads, state, 0)
    assert a is step0 and state.rank_pattern is None
    kept_counts = []
    for step in range(1, 7):
        before = a
        snap = {p: (d["lora_E"].clone(), d["lora_E"]._version) for p, d in before.tensors.items()}
        a, state = alloc.update(a, grads, state, step)
        for p, (v, ver) in snap.items():  # pure: the input adapter is untouched
            assert torch.equal(before.tensors[p]["lora_E"], v) and before.tensors[p]["lora_E"]._version == ver
        assert {p: {n: t.shape for n, t in d.items()} for p, d in a.tensors.items()} == shapes
        for p in a.paths:
            assert a.tensors[p]["lora_A"] is before.tensors[p]["lora_A"]  # only E changes
        kept_counts.append(sum(int(m.sum()) for m in state.rank_pattern.values()))
    budget = [alloc.budget_schedule(s, 8, 4)[0] for s in range(1, 7)]
    assert kept_counts == budget[:5] + [4]  # step 6 == total_step - tfinal: the target budget
    rp = alloc.rank_pattern(state)
    assert rp == {"a.lora_E": [True, True, False, True], "b.lora_E": [False, True, False, False]}
    for p, key in (("a", "a.lora_E"), ("b", "b.lora_E")):
        E = a.tensors[p]["lora_E"].flatten()
        keep = torch.tensor(rp[key])
        assert torch.count_nonzero(E[~keep]) == 0 and torch.count_nonzero(E[keep]) == int(keep.sum())
    # after the final allocation the EMAs are reset and the masks are re-applied every step
    assert all(torch.count_nonzero(t) == 0 for d in state.exp_avg_ipt.values() for t in d.values())
    revived = af.tree.map(lambda t: t + 1.0 if t.dim() == 2 and t.shape[1] == 1 else t, a)
    again, state2 = alloc.update(revived, grads, state, 7)
    for p, key in (("a", "a.lora_E"), ("b", "b.lora_E")):
        E = again.tensors[p]["lora_E"].flatten()
        assert torch.count_nonzero(E[~torch.tensor(rp[key])]) == 0
    assert alloc.rank_pattern(state2) == rp


def test_allocator_works_under_torch_func_grads() -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    ids = ids_for(model)
    cfg = af.AdaLoraConfig(init_r=3, target_r=1, lora_alpha=4, total_step=4, tinit=0, tfinal=1,
                           target_modules=["q_proj", "fc1"], init_lora_weights=False)
    a = af.init(fn, cfg, generator=gen(1))
    alloc = af.adalora.rank_allocator(cfg)
    state = alloc.init(a)

    def loss(ad):
        return af.inject(fn, ad)(params, input_ids=ids, labels=ids).loss + af.adalora.orth_reg(ad)

    for step in range(4):
        grads = torch.func.grad(loss)(a)
        a = af.tree.map(lambda t, gt: t - 0.05 * gt if t.dim() else t, a, grads)
        a, state = alloc.update(a, grads, state, step)
    rp = alloc.rank_pattern(state)
    assert sum(sum(m) for m in rp.values()) == 1 * len(a.paths)
    for p in a.paths:
        assert a.tensors[p]["lora_E"].shape == (3, 1)


def test_prune_and_save_round_trip(tmp_path) -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    ids = ids_for(model)
    a = rand_ada(fn, 4)
    paths = list(a.paths)
    masks = {f"{p}.lora_E": [i % (k + 2) != 0 for i in range(5)] for k, p in enumerate(paths)}
    masks[f"{paths[0]}.lora_E"] = [False] * 5  # a module pruned to rank 0
    # zero the pruned singular values: the pruned adapter then computes the same function
    keep = {p: torch.tensor(masks[f"{p}.lora_E"]) for p in paths}
    zeroed = af.Adapter(a.method, a.config, dict(a.entries), {
        p: {**d, "lora_E": d["lora_E"] * keep[p].view(-1, 1)} for p, d in a.tensors.items()})
    pruned = af.adalora.prune(zeroed, masks)
    assert pruned.config.rank_pattern == masks
    for p in paths:
        k = sum(masks[f"{p}.lora_E"])
        assert pruned.entries[p].r == k
        assert pruned.tensors[p]["lora_A"].shape[0] == k and pruned.tensors[p]["lora_B"].shape[1] == k
        assert pruned.entries[p].scaling == a.entries[p].scaling  # ranknum stays init_r
    want = af.inject(fn, zeroed)(params, input_ids=ids).logits
    torch.testing.assert_close(af.inject(fn, pruned)(params, input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
    af.save(pruned, tmp_path)
    back = af.load(tmp_path)
    assert back.config.rank_pattern == masks
    assert {p: e.r for p, e in back.entry_items} == {p: e.r for p, e in pruned.entry_items}
    torch.testing.assert_close(af.inject(fn, back)(params, input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fn(af.merge(params, back), input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    # af.init with a rank_pattern config gives the pruned shapes directly
    fresh = af.init(fn, back.config)
    assert {p: e.r for p, e in fresh.entry_items} == {p: e.r for p, e in back.entry_items}
    with pytest.raises(af.ConfigError, match="already pruned"):
        af.adalora.prune(back, masks)
    with pytest.raises(af.ConfigError, match="names no AdaLoRA module"):
        af.adalora.prune(a, {"nope.lora_E": [True] * 5})
    with pytest.raises(af.ConfigError, match="rank 5"):
        af.adalora.prune(a, {f"{paths[1]}.lora_E": [True] * 4})


def test_file_rank_disagreeing_with_config(tmp_path) -> None:
    fn, _ = af.functional(tiny_opt())
    a = rand_ada(fn, 2)
    af.save(a, tmp_path)
    import dataclasses

    cfg = dataclasses.replace(a.config, init_r=6)
    (tmp_path / "adapter_config.json").write_text(cfg.to_json_string())
    with pytest.raises(af.AdapterFileError, match="rank 5"):
        af.load(tmp_path)


def test_dropout_needs_a_generator() -> None:
    lin = nn.Sequential(nn.Linear(9, 11))
    fn, params = af.functional(lin)
    a = af.init(fn, af.AdaLoraConfig(init_r=3, target_r=1, total_step=5, lora_dropout=0.5, target_modules=["0"],
                                     init_lora_weights=False), generator=gen(0))
    x = torch.randn(6, 9, generator=gen(2))
    plain = af.inject(fn, a)(params, x)
    assert torch.equal(plain, af.inject(fn, a)(params, x))
    d1 = af.inject(fn, a, generator=gen(7))(params, x)
    d2 = af.inject(fn, a, generator=gen(7))(params, x)
    assert torch.equal(d1, d2) and not torch.allclose(d1, plain)
    assert math.isfinite(d1.sum().item())


class _CountingBackend:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compile_switching_adapters_no_recompiles() -> None:
    """Adapters of one structure (masked and allocator-pruned ones included) share one compiled graph."""
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    fn, params = af.functional(model)
    cfg = af.AdaLoraConfig(init_r=3, target_r=1, lora_alpha=4, total_step=5, target_modules=["0", "2"],
                           init_lora_weights=False)
    adapters = [af.init(fn, cfg, generator=gen(i)) for i in range(2)]
    zero_e = af.tree.map(lambda t: t * torch.tensor([[1.0], [0.0], [1.0]]) if t.shape == (3, 1) else t, adapters[1])
    adapters += [af.mask(adapters[0], False), zero_e]
    x = torch.randn(4, 5, generator=gen(9))
    torch._dynamo.reset()
    backend = _CountingBackend()

    @torch.compile(backend=backend)
    def step(ad, inp):
        return af.inject(fn, ad)(params, inp)

    step(adapters[0], x)
    graphs = backend.graphs
    assert graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ad in adapters[1:] + adapters[:1]:
            torch.testing.assert_close(step(ad, x), af.inject(fn, ad)(params, x), rtol=1e-6, atol=1e-6)
    assert backend.graphs == graphs
    assert torch.equal(step(adapters[2], x), model(x))
