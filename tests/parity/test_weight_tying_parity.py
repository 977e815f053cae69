"""``ensure_weight_tying`` with the tied input embedding (or the output layer) in ``modules_to_save`` or
``target_modules``, against the real ``peft`` (0.21.2), on tiny tied Llama, OPT and GPT-2 models (odd vocabulary
and hidden sizes): PEFT's files read by adaptfn (inject, merge, merged weights), adaptfn's files read by PEFT,
``af.init``-made adapters in PEFT (same keys), ``ensure_weight_tying=False`` (the copies untie, as PEFT's do),
and the functional invariants (merge == inject, mask off == base bit for bit, vmap over a stack == loop, route=
== per-row loop, an Adapter-shaped gradient that reaches the one shared set of leaves)."""

from __future__ import annotations

import warnings
from typing import Any

import peft
import pytest
import torch
from conftest import assert_close, gen, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adaptfn as af
from parity.peft_models import peft_model, peft_reload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def llama(seed: int = 0, tied: bool = True) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=37, hidden_size=22, num_hidden_layers=1, intermediate_size=19,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def opt(seed: int = 0) -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=41, hidden_size=14, num_hidden_layers=1, ffn_dim=19, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=14, tie_word_embeddings=True)
    return OPTForCausalLM(cfg).eval()


def gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=43, n_embd=18, n_layer=1, n_head=2, n_positions=64, tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg).eval()


VOCAB = {llama: 37, opt: 41, gpt2: 43}


def ids_for(build, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB[build], (batch, 9), generator=gen(5))


def logits(o: Any) -> torch.Tensor:
    return o if isinstance(o, torch.Tensor) else o.logits


def call(fn, params, ids) -> torch.Tensor:
    with torch.no_grad():
        return logits(fn(params, input_ids=ids))


def peft_out(pm, ids) -> torch.Tensor:
    with torch.no_grad():
        return logits(pm(input_ids=ids))


def make_peft(build, seed: int = 1234, **kw) -> peft.PeftModel:
    """A PeftModel with every trainable tensor moved off its init (tied views move together)."""
    kw = {k: list(v) if isinstance(v, list) else v for k, v in kw.items()}  # PEFT edits the lists in place
    return peft_model(build(), peft.LoraConfig, kw, seed, move=True)


def from_pretrained(build, folder) -> peft.PeftModel:
    return peft_reload(build(), folder)


def perturb(a: af.Adapter, seed: int = 7) -> af.Adapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {p: {n: (t if not t.dim() or n in e.frozen else t + 0.3 * torch.randn(t.shape, generator=g))
                   for n, t in a.leaves(p).items()} for p, e in a.entry_items}
    return af.Adapter(a.method, a.config, dict(a.entries), tensors)


SAVE_EMB = dict(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
SAVE_HEAD = dict(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
LORA_EMB = dict(r=2, lora_alpha=3, target_modules=["q_proj", "embed_tokens"])
LORA_HEAD = dict(r=3, target_modules=["v_proj", "lm_head"])
LORA_BOTH = dict(r=2, target_modules=["embed_tokens", "lm_head", "o_proj"])
CASES = {
    "llama-save-embed": (llama, SAVE_EMB),
    "llama-save-lm_head": (llama, SAVE_HEAD),
    "llama-save-both": (llama, dict(SAVE_EMB, modules_to_save=["embed_tokens", "lm_head"])),
    "llama-lora-embed": (llama, LORA_EMB),
    "llama-lora-lm_head": (llama, LORA_HEAD),
    "llama-lora-both": (llama, LORA_BOTH),
    "llama-lora-regex": (llama, dict(r=2, target_modules=r"embed_tokens|.*\.q_proj")),
    "llama-lora-rslora-dropout": (llama, dict(LORA_EMB, use_rslora=True, lora_dropout=0.1)),
    "opt-lora-embed": (opt, dict(r=2, target_modules=["q_proj", "fc1", "embed_tokens"])),
    "opt-save-lm_head": (opt, dict(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"])),
    "gpt2-save-lm_head": (gpt2, dict(r=2, target_modules=["c_proj"], modules_to_save=["lm_head"])),  # Conv1D, wte
}
GPT2 = {"gpt2-lora-lm_head": (gpt2, dict(r=3, target_modules=["c_attn", "lm_head"]))}  # refused (see below)
LORA_CASES = [c for c in CASES if "-lora-" in c]


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_to_adaptfn(case: str, tmp_path) -> None:
    build, kw = CASES[case]
    ids = ids_for(build)
    pm = make_peft(build, ensure_weight_tying=True, init_lora_weights=False, **kw)
    want = peft_out(pm, ids)
    pm.save_pretrained(tmp_path)
    a = af.load(tmp_path)
    emb = next(p for p, e in a.entry_items if e.option("tied_modules"))
    assert a.entries[emb].option("tied_modules") == ("lm_head",)
    fn, params = af.functional(build())
    assert_close(call(af.inject(fn, a), params, ids), want)
    merged = af.merge(params, a)
    assert_close(call(fn, merged, ids), want, "merged logits")
    assert merged["lm_head.weight"] is merged[f"{emb}.weight"]  # still one tensor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pm.merge_and_unload().state_dict()
    base = params[f"{emb}.weight"]
    for k, w in ref.items():
        if "-lora-" in case and k in (f"{emb}.weight", "lm_head.weight"):
            # PEFT merges the shared LoRA once per tied module into the one tensor: base + 2 delta (its merged
            # model differs from its unmerged one); af.merge adds it once, equal to PEFT's unmerged outputs
            assert rel_err(w - base, 2 * (merged[k] - base)) <= 1e-5, k
            continue
        assert rel_err(merged[k], w) <= 1e-5, k


@pytest.mark.parametrize("case", sorted(CASES))
def test_adaptfn_saved_and_init_made_to_peft(case: str, tmp_path) -> None:
    build, kw = CASES[case]
    ids = ids_for(build)
    fn, params = af.functional(build())
    a = af.init(fn, af.LoraConfig(ensure_weight_tying=True, **kw), generator=gen(2))
    base = call(fn, params, ids)
    assert torch.equal(call(af.inject(fn, a), params, ids), base)  # starts as the base model
    af.save(a, tmp_path / "init")
    pm = from_pretrained(build, tmp_path / "init")
    assert_close(peft_out(pm, ids), base)
    sd = peft.utils.get_peft_model_state_dict(pm)
    mine = af.state_dict(a)
    # (PEFT reloads GPT-2's tied lm_head through transformers' re-tying, not as a wrapper: no key of its own)
    assert sorted(sd) == sorted(mine) or set(mine) - set(sd) == {"base_model.model.lm_head.weight"}
    assert all(sd[k].shape == mine[k].shape for k in sd)
    # the same keys as PEFT's own adapter for this config
    ref = peft.utils.get_peft_model_state_dict(make_peft(build, ensure_weight_tying=True, **kw))
    assert sorted(ref) == sorted(mine)
    b = perturb(af.init(fn, af.LoraConfig(ensure_weight_tying=True, init_lora_weights=False, **kw),
                        generator=gen(3)))
    af.save(b, tmp_path / "trained")
    pm2 = from_pretrained(build, tmp_path / "trained")
    assert_close(call(af.inject(fn, b), params, ids), peft_out(pm2, ids))
    if build is gpt2:  # PEFT's reloaded GPT-2 has no lm_head wrapper, so its re-save lacks lm_head.weight
        return
    # and back: PEFT's save of what it loaded reads as the same adapter
    pm2.save_pretrained(tmp_path / "again")
    c = af.load(tmp_path / "again")
    assert c.entries == b.entries
    assert all(torch.equal(c.leaves(p)[n], t) for p in b.paths for n, t in b.leaves(p).items())


@pytest.mark.parametrize("case", ["llama-save-embed", "llama-save-lm_head", "llama-lora-embed", "gpt2-save-lm_head",
                                  "gpt2-lora-lm_head"])
def test_without_ensure_weight_tying_the_copies_untie(case: str, tmp_path) -> None:
    """ensure_weight_tying=False (the default): PEFT's modules_to_save copy / LoRA is on the named module only and
    its tied partner keeps the base weight; adaptfn's entries untie likewise, both ways."""
    build, kw = {**CASES, **GPT2}[case]
    ids = ids_for(build)
    pm = make_peft(build, init_lora_weights=False, **kw)
    pm.save_pretrained(tmp_path / "peft")
    a = af.load(tmp_path / "peft")
    assert not any(e.option("tied_modules") for e in a.entries.values())
    fn, params = af.functional(build())
    assert_close(call(af.inject(fn, a), params, ids), peft_out(pm, ids))
    b = perturb(af.init(fn, af.LoraConfig(init_lora_weights=False, **kw), generator=gen(4)))
    assert not any(e.option("tied_modules") for e in b.entries.values())
    af.save(b, tmp_path / "mine")
    assert_close(call(af.inject(fn, b), params, ids), peft_out(from_pretrained(build, tmp_path / "mine"), ids))
    assert rel_err(call(fn, af.merge(params, b), ids), call(af.inject(fn, b), params, ids)) <= 1e-5


def test_untied_model_ignores_the_flag(tmp_path) -> None:
    """On a model without tied weights PEFT only warns; adaptfn plans no tie, and a tied file's lm_head copies
    are not applied to an untied model (PEFT ignores those keys there too)."""
    ids = ids_for(llama)
    fn, params = af.functional(llama(tied=False))
    for kw in (SAVE_EMB, LORA_EMB):
        a = af.init(fn, af.LoraConfig(ensure_weight_tying=True, **kw))
        assert not any(e.option("tied_modules") for e in a.entries.values())
    pm = make_peft(llama, ensure_weight_tying=True, init_lora_weights=False, **LORA_EMB)
    pm.save_pretrained(tmp_path)
    a = af.load(tmp_path)
    untied = llama(tied=False)
    want = peft_out(peft_reload(untied, tmp_path), ids)
    fn2, params2 = af.functional(llama(tied=False))
    assert_close(call(af.inject(fn2, a), params2, ids), want)


# -- the functional invariants ------------------------------------------------------------------------------------
def _adapters(build, kw: dict[str, Any]) -> tuple[Any, Any, list[af.Adapter]]:
    fn, params = af.functional(build())
    ads = [perturb(af.init(fn, af.LoraConfig(ensure_weight_tying=True, init_lora_weights=False, **dict(kw, r=r)),
                           generator=gen(r)), seed=r) for r in (2, 3, 1)]
    return fn, params, ads


@pytest.mark.parametrize("case", ["llama-lora-embed", "opt-lora-embed", "llama-save-lm_head"])
def test_merge_mask_vmap_route_grad(case: str) -> None:
    build, kw = CASES[case]
    ids = ids_for(build, 3)
    fn, params, ads = _adapters(build, kw)
    a = ads[0]
    base = call(fn, params, ids)
    got = call(af.inject(fn, a), params, ids)
    assert rel_err(got, base) > 1e-3  # the tied adapter does something
    assert rel_err(call(fn, af.merge(params, a), ids), got) <= 1e-5
    assert torch.equal(call(af.inject(fn, af.mask(a, False)), params, ids), base)
    assert torch.equal(call(fn, af.merge(params, af.mask(a, False)), ids), base)
    w = 0.37
    assert rel_err(call(fn, af.merge(params, af.scale(a, w)), ids), call(af.inject(fn, af.scale(a, w)), params, ids)) \
        <= 1e-5
    # the tied module matters: with it cut off (an untied params dict), the output changes
    emb = next(p for p, e in a.entry_items if e.option("tied_modules"))
    if "-lora-" in case:
        sep = dict(params)
        sep["lm_head.weight"] = params[f"{emb}.weight"].clone()
        assert rel_err(call(af.inject(fn, a), sep, ids), got) <= 1e-6  # by name: the plan follows the model
    st_ = af.stack(ads)
    with torch.no_grad():
        vm = torch.func.vmap(lambda s: logits(af.inject(fn, s)(params, input_ids=ids)))(st_)
    loop = torch.stack([call(af.inject(fn, b), params, ids) for b in ads])
    assert rel_err(vm, loop) <= 1e-5
    if "-lora-" in case:  # route=: row i uses adapter route[i] (-1: the base)
        route = torch.tensor([1, -1, 2])
        routed = call(af.inject(fn, st_, route=route), params, ids)
        rows = [loop[1][0], base[1], loop[2][2]]
        for i, want in enumerate(rows):
            assert rel_err(routed[i], want) <= 1e-5, i
    g = torch.func.grad(lambda b: logits(af.inject(fn, b)(params, input_ids=ids)).square().mean())(a)
    assert isinstance(g, af.Adapter) and g.paths == a.paths
    for p in a.paths:
        for n, t in a.leaves(p).items():
            assert g.leaves(p)[n].shape == t.shape
    leaf = "lora_A" if "-lora-" in case else "weight"
    assert float(g.leaves(emb)[leaf].abs().sum()) > 0


def test_the_tied_module_gets_the_gradient_of_both_uses() -> None:
    """The one set of leaves is used by the embedding and by lm_head: its gradient is that of both uses, so it
    differs from the gradient of the same leaves as an untied embedding LoRA (the option removed)."""
    import dataclasses

    build, kw = CASES["llama-lora-embed"]
    ids = ids_for(build)
    fn, params, ads = _adapters(build, kw)
    a = ads[0]
    emb = "model.embed_tokens"
    e = a.entries[emb]
    plain = dataclasses.replace(e, options=tuple(o for o in e.options if o[0] != "tied_modules"))
    b = af.Adapter(a.method, a.config, {**a.entries, emb: plain}, {p: a.leaves(p) for p in a.paths})

    def loss(x):
        return logits(af.inject(fn, x)(params, input_ids=ids)).square().mean()

    assert rel_err(call(af.inject(fn, b), params, ids), call(af.inject(fn, a), params, ids)) > 1e-3
    g_both, g_emb = torch.func.grad(loss)(a).leaves(emb)["lora_B"], torch.func.grad(loss)(b).leaves(emb)["lora_B"]
    assert rel_err(g_both, g_emb) > 1e-3  # lm_head's use adds to it


# -- refusals ---------------------------------------------------------------------------------------------------
def test_refusals_name_the_field(tmp_path) -> None:
    fn, _ = af.functional(llama())
    with pytest.raises(af.ConfigError, match="use_dora"):
        af.init(fn, af.LoraConfig(ensure_weight_tying=True, use_dora=True, **LORA_EMB))
    with pytest.raises(af.ConfigError, match="rank_pattern"):
        af.init(fn, af.LoraConfig(ensure_weight_tying=True, **dict(LORA_EMB, rank_pattern={"lm_head": 4})))
    # a file whose lm_head LoRA is not the embedding's, transposed: not a tie, and not a target
    pm = make_peft(llama, ensure_weight_tying=True, init_lora_weights=False, **LORA_EMB)
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    f = tmp_path / "adapter_model.safetensors"
    sd = load_file(f)
    sd["base_model.model.lm_head.lora_A.weight"] = sd["base_model.model.lm_head.lora_A.weight"] + 1
    save_file(sd, f)
    with pytest.raises(af.AdapterFileError, match="lm_head"):
        af.load(tmp_path)


@pytest.mark.parametrize("case", sorted(GPT2))
def test_gpt2_wte_lora_is_refused_as_peft_does_not_reload_it(case: str, tmp_path) -> None:
    """GPT-2's input embedding is ``transformer.wte``: PEFT ties lm_head's LoRA to its LoRA when it builds the
    adapter, but the rewritten target_modules names ``transformer.wte`` (not embed_tokens / lm_head), so PEFT does not
    tie when it loads its own file and drops the lm_head keys: its reloaded model differs from its trained one.
    adaptfn refuses this sub-case at init and load, naming it (the evidence is checked here). The modules_to_save
    case on GPT-2 reloads tied in PEFT and is supported (``gpt2-save-lm_head`` above)."""
    build, kw = GPT2[case]
    ids = ids_for(build)
    pm = make_peft(build, ensure_weight_tying=True, init_lora_weights=False, **kw)
    pm.save_pretrained(tmp_path)
    assert rel_err(peft_out(from_pretrained(build, tmp_path), ids), peft_out(pm, ids)) > 1e-3  # PEFT's own gap
    fn, _ = af.functional(build())
    with pytest.raises(af.ConfigError, match="transformer.wte"):
        af.init(fn, af.LoraConfig(ensure_weight_tying=True, **kw))
    with pytest.raises(af.AdapterFileError, match="transformer.wte"):
        af.load(tmp_path)


_LLAMA = af.functional(llama())


@settings(max_examples=10, deadline=None)
@given(r=st.integers(1, 4), alpha=st.integers(1, 9), which=st.sampled_from(["embed_tokens", "lm_head"]),
       seed=st.integers(0, 99), w=st.floats(-2, 2), save=st.booleans())
def test_property_merge_equals_inject_and_mask_is_base(r: int, alpha: int, which: str, seed: int, w: float,
                                                       save: bool) -> None:
    fn, params = _LLAMA
    kw = dict(modules_to_save=[which], target_modules=["k_proj"]) if save else dict(target_modules=["k_proj", which])
    cfg = af.LoraConfig(r=r, lora_alpha=alpha, ensure_weight_tying=True, init_lora_weights=False, **kw)
    a = perturb(af.init(fn, cfg, generator=gen(seed)), seed=seed)
    if not save:
        a = af.scale(a, w)
    ids = ids_for(llama)
    assert rel_err(call(fn, af.merge(params, a), ids), call(af.inject(fn, a), params, ids)) <= 1e-5
    assert torch.equal(call(af.inject(fn, af.mask(a, False)), params, ids), call(fn, params, ids))
