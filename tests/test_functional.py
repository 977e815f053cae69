"""af.functional: fn(params, ...) == model(...), params share storage, the model is never modified."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import BUILDERS, gen, ids_for, tiny_bert, tiny_opt
from torch import nn

import adaptfn as af


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "versions": {k: v._version for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "forward_attrs": {n: "forward" in m.__dict__ for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
    }


def _assert_same(model: nn.Module, snap: dict) -> None:
    now = _snapshot(model)
    for key in ("versions", "ids", "classes", "forward_attrs", "hooks", "training", "requires_grad"):
        assert now[key] == snap[key], key
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fn_equals_model_exactly(name: str, attn: str) -> None:
    model = BUILDERS[name](attn=attn)
    ids = ids_for(model)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    fn, params = af.functional(model)
    assert torch.equal(fn(params, input_ids=ids).logits, model(input_ids=ids).logits)
    assert torch.equal(fn(params, input_ids=ids, attention_mask=mask).logits,
                       model(input_ids=ids, attention_mask=mask).logits)


def test_params_share_storage_and_list_tied_names() -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    sd = model.state_dict()
    for k, v in sd.items():
        assert params[k].data_ptr() == v.data_ptr(), k
    # OPT ties lm_head to embed_tokens: both names are present and are the same tensor
    assert params["lm_head.weight"] is params["model.decoder.embed_tokens.weight"]
    assert not any(t.requires_grad for t in params.values())  # base frozen by construction


def test_untying_by_replacing_one_name() -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    ids = ids_for(model)
    new_head = params["lm_head.weight"] * 2
    out = fn({**params, "lm_head.weight": new_head}, input_ids=ids).logits
    hidden = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, hidden @ new_head.T)


def test_model_is_never_modified() -> None:
    model = tiny_opt()
    model.register_forward_hook(lambda m, i, o: None)
    snap = _snapshot(model)
    fn, params = af.functional(model)
    ids = ids_for(model)
    cfg = af.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "fc2", "embed_tokens"],
                        modules_to_save=["lm_head"], bias="lora_only", init_lora_weights=False)
    a = af.init(fn, cfg, generator=gen(0))
    g = af.inject(fn, a)
    g(params, input_ids=ids)
    g.generate(params, input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    fn(af.merge(params, a), input_ids=ids)
    torch.func.grad(lambda t: g(params, input_ids=ids).logits.sum())(a)
    _assert_same(model, snap)


def test_hooks_on_the_model_still_run() -> None:
    model = tiny_opt()
    seen: list[int] = []
    model.model.decoder.layers[0].register_forward_hook(lambda m, i, o: seen.append(1))
    fn, params = af.functional(model)
    fn(params, input_ids=ids_for(model))
    assert seen == [1]


def test_training_flag_is_a_snapshot() -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    ids = ids_for(model)
    model.train()  # the user's later change does not leak into fn, which was made in eval mode
    torch.manual_seed(0)
    a = fn(params, input_ids=ids).logits
    b = fn(params, input_ids=ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["opt", "llama", "gpt2"])
def test_generate_matches_model(name: str) -> None:
    model = BUILDERS[name]()
    fn, params = af.functional(model)
    ids = ids_for(model, batch=1)
    want = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    got = fn.generate(params, input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_generate_with_adapter_uses_it() -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    ids = ids_for(model, batch=1)
    a = af.init(fn, af.LoraConfig(r=4, lora_alpha=64, target_modules=["fc1", "fc2"], init_lora_weights=False),
                generator=gen(1))
    g = af.inject(fn, a)
    got = g.generate(params, input_ids=ids, max_new_tokens=8, do_sample=False)
    merged = fn.generate(af.merge(params, a), input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, merged)


def test_plain_module_and_buffers() -> None:
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).eval()
    fn, params = af.functional(model)
    assert "1.running_mean" in params
    x = torch.randn(4, 5)
    assert torch.equal(fn(params, x), model(x))
    p2 = {**params, "3.bias": torch.ones(3)}
    assert torch.equal(fn(p2, x), model[:3](x) @ model[3].weight.T + 1)


def test_rejects_non_modules() -> None:
    with pytest.raises(af.ConfigError):
        af.functional(lambda x: x)  # type: ignore[arg-type]


def test_seq_classifier_functional() -> None:
    model = tiny_bert()
    fn, params = af.functional(model)
    ids = ids_for(model)
    assert torch.equal(fn(params, input_ids=ids).logits, model(input_ids=ids).logits)


def test_threads_each_get_their_own_result() -> None:
    """Invariant 6: many threads, one base model, each with its own adapter, no lock across calls."""
    model = tiny_opt()
    fn, params = af.functional(model)
    cfg = af.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc1"],
                        modules_to_save=["lm_head"], init_lora_weights=False)
    n_threads, calls = 6, 25
    adapters = [af.init(fn, cfg, generator=gen(i)) for i in range(n_threads)]
    inputs = [ids_for(model, seed=10 + i) for i in range(n_threads)]
    want = [af.inject(fn, a)(params, input_ids=x).logits for a, x in zip(adapters, inputs)]
    base = [fn(params, input_ids=x).logits for x in inputs]
    errors: list[str] = []
    barrier = threading.Barrier(n_threads)

    def work(i: int) -> None:
        g = af.inject(fn, adapters[i])
        barrier.wait()
        for c in range(calls):
            if c % 5 == 4:  # interleave plain base calls on the same thread
                if not torch.equal(fn(params, input_ids=inputs[i]).logits, base[i]):
                    errors.append(f"thread {i} base call {c}")
            elif not torch.equal(g(params, input_ids=inputs[i]).logits, want[i]):
                errors.append(f"thread {i} call {c}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_bf16_autocast_with_adapter() -> None:
    from conftest import tiny_llama

    model = tiny_llama()
    fn, params = af.functional(model)
    ids = ids_for(model)
    a = af.init(fn, af.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), generator=gen(0))
    g = af.inject(fn, a)

    def loss(ad):
        return af.inject(fn, ad)(params, input_ids=ids).logits.float().square().mean()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = g(params, input_ids=ids).logits
        grads = torch.func.grad(loss)(a)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), g(params, input_ids=ids).logits, rtol=0.05, atol=0.05)
    ref = torch.func.grad(loss)(a)
    for p in a.paths:
        assert grads.tensors[p]["lora_A"].dtype == torch.float32
        torch.testing.assert_close(grads.tensors[p]["lora_B"], ref.tensors[p]["lora_B"], rtol=0.1, atol=1e-3)


def test_gradient_checkpointing_is_refused_clearly() -> None:
    from conftest import tiny_llama

    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=4, target_modules=["q_proj"]), generator=gen(0))
    with pytest.raises(af.ConfigError, match="gradient checkpointing"):
        af.inject(fn, a)
    model.eval()  # checkpointing only acts in training mode
    fn, params = af.functional(model)
    af.inject(fn, a)(params, input_ids=ids_for(model))
