"""LoRA on ``nn.Parameter``s (``target_parameters``, PEFT's ``ParamWrapper``), trainable tokens
(``trainable_token_indices``) and ``ensure_weight_tying``, against the real ``peft`` (0.21.2): PEFT's files read
by adaptfn (inject, merge, merged weights), adaptfn's files read by PEFT, ``af.init``-made adapters in PEFT, and
the functional invariants (merge == inject, mask off == base bit for bit, vmap over a stack == loop, gradients
shaped like the adapter, only on the trained rows). Models: a custom mixture-of-experts toy with 2-d and 3-d
parameters in both expert layouts and odd sizes, a tiny transformers Qwen3-MoE, and tiny Llama models with tied
and untied embeddings."""

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


# -- models ------------------------------------------------------------------------------------------------------
class Experts(nn.Module):
    """Expert weights as parameters: ``gate_up`` [E, out, in] (transformers' default layout), ``down`` [E, in, out]
    with ``is_transposed``... no: ``down`` [E, out, in] too, plus a 2-d ``mix`` [out, in]."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(3, 14, 11) / 4)
        self.down = nn.Parameter(torch.randn(3, 11, 7) / 3)
        self.mix = nn.Parameter(torch.randn(5, 11) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [batch, 11]
        h = torch.einsum("bi,eoi->beo", x, self.gate_up)
        h = torch.nn.functional.silu(h[..., :7]) * h[..., 7:]
        y = torch.einsum("beo,eio->bi", h, self.down)
        return y + (x @ self.mix.T).sum(-1, keepdim=True)


class TransposedExperts(nn.Module):
    """transformers' ``is_transposed`` layout [E, in, out], and a square expert weight [E, 11, 11]."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(3, 11, 19) / 4)
        self.sq = nn.Parameter(torch.randn(3, 11, 11) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bi,eio->beo", x, self.up)[..., :11]
        return torch.einsum("bei,eio->bo", h, self.sq)


class MoEToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(11, 11)
        self.experts = Experts()
        self.texperts = TransposedExperts()
        self.head = nn.Linear(11, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h = h + self.experts(h)
        h = h + self.texperts(h)
        return self.head(h)


def toy(seed: int = 0) -> MoEToy:
    torch.manual_seed(seed)
    return MoEToy().eval()


def toy_x(batch: int = 5) -> torch.Tensor:
    return torch.randn(batch, 11, generator=gen(3))


def tiny_qwen3_moe(seed: int = 0) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=67, hidden_size=24, intermediate_size=41, moe_intermediate_size=13,
                         num_experts=5, num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=12, max_position_embeddings=64, tie_word_embeddings=False,
                         experts_implementation="eager")
    m = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers leaves the expert tensors uninitialised (torch.empty)
        for n, p in m.named_parameters():
            if "experts" in n:
                p.copy_(torch.randn(p.shape) / 5)
    return m


def tiny_llama_tied(seed: int = 0, tied: bool = True) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=37, hidden_size=22, num_hidden_layers=1, intermediate_size=19,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def lm_ids(vocab: int = 37) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=gen(5))


def out_of(o: Any) -> torch.Tensor:
    return (o if isinstance(o, torch.Tensor) else o.logits).detach()


def make_peft(build, seed: int = 1234, **kw) -> peft.PeftModel:
    """A PeftModel with every trainable tensor moved off its init (LoRA factors and trainable token rows)."""
    return peft_model(build(), peft.LoraConfig, kw, seed, move=True)


def from_pretrained(build, folder) -> peft.PeftModel:
    return peft_reload(build(), folder)


def perturb(a: af.Adapter, seed: int = 7) -> af.Adapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {p: {n: (t if not t.dim() else t + 0.3 * torch.randn(t.shape, generator=g)) for n, t in
                   a.leaves(p).items()} for p in a.paths}
    return af.Adapter(a.method, a.config, dict(a.entries), tensors)


def run(build, inputs):
    def call(m):
        with torch.no_grad():
            return out_of(m(inputs) if isinstance(inputs, torch.Tensor) else m(input_ids=inputs))
    return call


def fcall(fn, params, inputs):
    with torch.no_grad():
        return out_of(fn(params, inputs) if isinstance(inputs, torch.Tensor) else fn(params, input_ids=inputs))


TOY_PARAMS = dict(r=2, lora_alpha=5, target_modules=["proj"],
                  target_parameters=["experts.gate_up", "experts.down", "mix", "texperts.up", "texperts.sq"])
QWEN_PARAMS = dict(r=3, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                   target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
CASES = {
    "toy": (toy, toy_x, TOY_PARAMS),
    "toy-rslora-pattern": (toy, toy_x, dict(TOY_PARAMS, use_rslora=True, rank_pattern={"texperts.up": 3,
                                                                                       "texperts.sq": 3},
                                            alpha_pattern={"experts.down": 3, "experts.gate_up": 3, "mix": 3})),
    "qwen3-moe": (tiny_qwen3_moe, lambda: lm_ids(67), QWEN_PARAMS),
    "tokens-list-tied": (tiny_llama_tied, lm_ids, dict(r=2, target_modules=["q_proj"],
                                                       trainable_token_indices=[1, 4, 30])),
    "tokens-dict-untied": (lambda: tiny_llama_tied(tied=False), lm_ids, dict(
        r=2, target_modules=["v_proj"], trainable_token_indices={"embed_tokens": [0, 5], "lm_head": [2, 36, 7]})),
    "tokens-dict-tied-mismatch": (tiny_llama_tied, lm_ids, dict(
        r=2, target_modules=["v_proj"], trainable_token_indices={"embed_tokens": [0, 5], "lm_head": [2, 36]})),
    "tokens-dict-tied-same-ewt": (tiny_llama_tied, lm_ids, dict(
        r=2, target_modules=["v_proj"], ensure_weight_tying=True,
        trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [3, 5]})),
    "tokens-and-params": (tiny_qwen3_moe, lambda: lm_ids(67), dict(QWEN_PARAMS, trainable_token_indices=[2, 9, 66])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_to_adaptfn(case: str, tmp_path) -> None:
    build, inputs, kw = CASES[case]
    x = inputs()
    pm = make_peft(build, init_lora_weights=False, **kw)
    want = run(build, x)(pm)
    pm.save_pretrained(tmp_path)
    a = af.load(tmp_path)
    fn, params = af.functional(build())
    got = fcall(af.inject(fn, a), params, x)
    assert_close(got, want)
    merged = af.merge(params, a)
    assert_close(fcall(fn, merged, x), want, "merged logits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pm.merge_and_unload().state_dict()
    if case == "tokens-dict-tied-mismatch":  # PEFT merges both modules' rows into its one tied tensor (so its
        return                                # merged model differs from its unmerged one); adaptfn keeps them apart
    for k, w in ref.items():
        assert rel_err(merged[k], w) <= 1e-5, k


@pytest.mark.parametrize("case", sorted(CASES))
def test_adaptfn_saved_to_peft(case: str, tmp_path) -> None:
    build, inputs, kw = CASES[case]
    x = inputs()
    fn, params = af.functional(build())
    cfg = af.LoraConfig(init_lora_weights=False, **kw)
    a = perturb(af.init(fn, cfg, generator=gen(11)))
    af.save(a, tmp_path)
    pm = from_pretrained(build, tmp_path)
    assert_close(fcall(af.inject(fn, a), params, x), run(build, x)(pm))


@pytest.mark.parametrize("case", ["toy", "qwen3-moe", "tokens-list-tied"])
def test_init_made_loads_in_peft(case: str, tmp_path) -> None:
    build, inputs, kw = CASES[case]
    x = inputs()
    fn, params = af.functional(build())
    a = af.init(fn, af.LoraConfig(**kw), generator=gen(2))
    base = fcall(fn, params, x)
    assert torch.equal(fcall(af.inject(fn, a), params, x), base)  # starts as the base model
    af.save(a, tmp_path)
    pm = from_pretrained(build, tmp_path)
    assert_close(run(build, x)(pm), base)
    sd = peft.utils.get_peft_model_state_dict(pm)
    mine = af.state_dict(a)
    assert sorted(sd) == sorted(mine)
    assert all(sd[k].shape == mine[k].shape for k in sd)


# -- the functional invariants --------------------------------------------------------------------------------------
def _adapters(build, kw: dict[str, Any], n: int = 3) -> tuple[Any, Any, list[af.Adapter]]:
    fn, params = af.functional(build())
    ads = [perturb(af.init(fn, af.LoraConfig(init_lora_weights=False, **dict(kw, r=r)), generator=gen(r)), seed=r)
           for r in (2, 3, 1)[:n]]
    return fn, params, ads


@pytest.mark.parametrize("case", ["toy", "tokens-list-tied"])
def test_merge_mask_vmap_grad(case: str) -> None:
    build, inputs, kw = CASES[case]
    x = inputs()
    fn, params, ads = _adapters(build, kw)
    a = ads[0]
    base = fcall(fn, params, x)
    # merge == inject, mask off == base bit for bit (also under vmap, where the gate is a tensor)
    assert rel_err(fcall(fn, af.merge(params, a), x), fcall(af.inject(fn, a), params, x)) <= 1e-6
    assert torch.equal(fcall(af.inject(fn, af.mask(a, False)), params, x), base)
    assert torch.equal(fcall(fn, af.merge(params, af.mask(a, False)), x), base)

    def logits(f, p):
        o = f(p, x) if isinstance(x, torch.Tensor) else f(p, input_ids=x)
        return o if isinstance(o, torch.Tensor) else o.logits

    # vmap over a stack (ranks 2, 3, 1 padded to 3) == the loop
    st = af.stack(ads)
    with torch.no_grad():
        vm = torch.func.vmap(lambda s: logits(af.inject(fn, s), params))(st)
        masked = torch.func.vmap(lambda s: logits(af.inject(fn, s), params))(af.stack([af.mask(a, False), a]))
    loop = torch.stack([fcall(af.inject(fn, b), params, x) for b in ads])
    assert rel_err(vm, loop) <= 1e-5
    assert rel_err(masked[0], base) <= 1e-6  # (vmap batches the base GEMMs too: not bit for bit)
    back = af.unstack(st)
    assert all(torch.equal(b.leaves(p)[n], c.leaves(p)[n]) for b, c in zip(back, ads, strict=True) for p in c.paths
               for n in c.leaves(p))
    # route= is refused, naming why
    with pytest.raises(af.ConfigError, match="route="):
        af.inject(fn, st, route=torch.zeros(x.shape[0], dtype=torch.long))
    # grad: an Adapter-shaped gradient, non-zero on the parameter / token leaves
    g = torch.func.grad(lambda b: logits(af.inject(fn, b), params).square().mean())(a)
    assert isinstance(g, af.Adapter) and g.paths == a.paths
    for p, e in a.entry_items:
        for n, t in a.leaves(p).items():
            assert g.leaves(p)[n].shape == t.shape
            if e.kind in ("param", "tokens") and n != "gate":
                assert float(g.leaves(p)[n].abs().sum()) > 0, (p, n)


def test_token_gradient_only_on_the_trained_rows() -> None:
    """Differentiating with respect to the embedding matrix itself: the trained rows are replaced, so only the
    other rows (frozen base rows) get a gradient from the base, and the trained rows' gradient goes to the leaf."""
    build, inputs, kw = CASES["tokens-list-tied"]
    ids = inputs()
    fn, params = af.functional(build())
    a = perturb(af.init(fn, af.LoraConfig(**kw), generator=gen(1)))
    g = af.inject(fn, a)
    key = "model.embed_tokens.weight"

    def loss(w):
        p = dict(params)
        p[key] = w
        p["lm_head.weight"] = w
        return g(p, input_ids=ids).logits.square().mean()

    gw = torch.func.grad(loss)(params[key])
    rows = [1, 4, 30]
    assert float(gw[rows].abs().sum()) == 0.0  # replaced for the call: the base rows do not matter
    assert float(gw.abs().sum()) > 0


# -- PEFT's refusals, as typed errors from every entry point ----------------------------------------------------------
BAD_FIELDS = [
    (dict(target_parameters="experts.down"), "target_parameters"),
    (dict(target_parameters=[3]), "target_parameters"),
    (dict(target_parameters=["mix"], lora_dropout=0.1), "lora_dropout"),
    (dict(target_parameters=["mix"], use_dora=True), "use_dora"),
    (dict(target_parameters=["mix"], lora_bias=True), "lora_bias"),
    (dict(trainable_token_indices=[1, 1]), "trainable_token_indices"),
    (dict(trainable_token_indices=[-1]), "trainable_token_indices"),
    (dict(trainable_token_indices=[]), "trainable_token_indices"),
    (dict(trainable_token_indices={"embed_tokens": "1"}), "trainable_token_indices"),
    (dict(trainable_token_indices={"embed_tokens": [1]}, modules_to_save=["embed_tokens"]), "trainable_token_indices"),
    (dict(ensure_weight_tying="yes"), "ensure_weight_tying"),
    (dict(layer_replication=[[0, 1]]), "layer_replication"),
    (dict(alora_invocation_tokens=[5]), "alora_invocation_tokens"),
    (dict(kasa_config={"k": 1}), "kasa_config"),
    (dict(velora_config={"v": 1}), "velora_config"),
    (dict(monteclora_config={"m": 1}), "monteclora_config"),
    (dict(use_bdlora={"b": 1}), "use_bdlora"),
    (dict(arrow_config={"a": 1}), "arrow_config"),
    (dict(use_qalora=True), "use_qalora"),
    (dict(megatron_config={"tp": 2}), "megatron_config"),
]


@pytest.mark.parametrize("bad,field", BAD_FIELDS, ids=[f for _, f in BAD_FIELDS])
def test_bad_fields_raise_config_error_everywhere(bad: dict[str, Any], field: str, tmp_path) -> None:
    kw = dict(r=2, target_modules=["proj"], **bad)
    with pytest.raises(af.ConfigError, match=field):
        af.LoraConfig(**kw)
    d = dict(af.LoraConfig(r=2, target_modules=["proj"]).to_dict(), **bad)
    with pytest.raises(af.ConfigError, match=field):
        af.LoraConfig.from_dict(d)
    fn, _ = af.functional(toy())
    af.save(af.init(fn, af.LoraConfig(r=2, target_modules=["proj"])), tmp_path)
    import json
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(bad)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(af.ConfigError, match=field):
        af.load(tmp_path)


def test_model_refusals_name_the_module() -> None:
    fn, _ = af.functional(toy())
    with pytest.raises(af.IncompatibleAdapterError, match="matches no parameter"):
        af.init(fn, af.LoraConfig(target_modules=["proj"], target_parameters=["nope"]))
    with pytest.raises(af.IncompatibleAdapterError, match="'experts'.*target_modules"):
        af.init(fn, af.LoraConfig(target_modules=["experts"], target_parameters=["experts.down"]))
    fn2, _ = af.functional(nn.ParameterDict({"w": nn.Parameter(torch.randn(3, 4))}))
    with pytest.raises(af.IncompatibleAdapterError, match="top-level"):
        af.init(fn2, af.LoraConfig(target_modules=[], target_parameters=["w"]))
    fn3, _ = af.functional(tiny_llama_tied())
    with pytest.raises(af.IncompatibleAdapterError, match="LoRA target too"):
        af.init(fn3, af.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[1]))
    with pytest.raises(af.ConfigError, match="ensure_weight_tying"):
        af.init(fn3, af.LoraConfig(target_modules=["q_proj"], ensure_weight_tying=True,
                                   trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}))
    with pytest.raises(af.IncompatibleAdapterError, match="rows"):
        af.init(fn3, af.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[99]))


@pytest.mark.parametrize("kw", [dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
                                dict(target_modules=["q_proj", "embed_tokens"])], ids=["modules_to_save", "lora"])
def test_ensure_weight_tying_of_saved_or_lora_embeddings(kw: dict[str, Any], tmp_path) -> None:
    """The modules_to_save / LoRA part of ensure_weight_tying on a tied model is implemented (the full matrix is in
    test_weight_tying_parity.py): af.init ties lm_head to the input embedding; untied models ignore the flag, as
    PEFT does (it only warns)."""
    fn, params = af.functional(tiny_llama_tied())
    a = af.init(fn, af.LoraConfig(r=2, ensure_weight_tying=True, **kw))
    assert a.entries["model.embed_tokens"].option("tied_modules") == ("lm_head",)
    fn2, params2 = af.functional(tiny_llama_tied(tied=False))
    a = perturb(af.init(fn2, af.LoraConfig(r=2, ensure_weight_tying=True, init_lora_weights=False, **kw)))
    assert not any(e.option("tied_modules") for e in a.entries.values())
    af.save(a, tmp_path / "untied")
    ids = lm_ids()
    assert_close(fcall(af.inject(fn2, a), params2, ids),
                 run(None, ids)(from_pretrained(lambda: tiny_llama_tied(tied=False), tmp_path / "untied")))


_TOY = af.functional(toy())


@settings(max_examples=12, deadline=None)
@given(r=st.integers(1, 4), alpha=st.integers(1, 9), which=st.sets(st.sampled_from(
    ["experts.gate_up", "experts.down", "mix", "texperts.up", "texperts.sq"]), min_size=1), seed=st.integers(0, 99),
    w=st.floats(-2, 2))
def test_property_merge_equals_inject_and_mask_is_base(r: int, alpha: int, which: set[str], seed: int,
                                                       w: float) -> None:
    fn, params = _TOY
    cfg = af.LoraConfig(r=r, lora_alpha=alpha, target_modules=[], target_parameters=sorted(which),
                        init_lora_weights=False)
    a = af.scale(perturb(af.init(fn, cfg, generator=gen(seed)), seed=seed), w)
    x = toy_x(3)
    with torch.no_grad():
        assert rel_err(fn(af.merge(params, a), x), af.inject(fn, a)(params, x)) <= 1e-5
        assert torch.equal(af.inject(fn, af.mask(a, False))(params, x), fn(params, x))
