"""``af.combine`` and ``AdapterModel.add_weighted_adapter`` against peft 0.21's ``add_weighted_adapter``, for every
combination type: the same adapters (made by PEFT, read by adaptfn) give the same new adapter, tensor for tensor
and bit for bit, the same config (r, lora_alpha, targets) and the same outputs; the random (dare) types with the
same ``torch.manual_seed`` before each. OPT (Linear), GPT-2 (Conv1D, fan_in_fan_out) and embedding targets; IA3."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import peft
import pytest
import torch
from conftest import assert_close, ids_for, tiny_gpt2, tiny_opt
from peft.utils import get_peft_model_state_dict

import adaptfn as af

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# different ranks, alphas, rsLoRA, rank_pattern and targets: cat and the svd types combine any ranks
DIFFERENT = [("x", dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"])),
             ("y", dict(r=4, lora_alpha=3, target_modules=["q_proj", "fc2"], rank_pattern={"fc2": 3})),
             ("z", dict(r=3, lora_alpha=7, target_modules=["v_proj", "fc1"], use_rslora=True))]
# one r (PEFT's rule for linear / ties / dare / magnitude_prune), different targets and alphas
SAME_R = [("x", dict(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"])),
          ("y", dict(r=3, lora_alpha=2, target_modules=["q_proj", "k_proj"])),
          ("z", dict(r=3, lora_alpha=7, target_modules=["v_proj", "fc1"], use_rslora=True))]
WEIGHTS = [0.7, -0.4, 0.5]
HOWS = ["cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
        "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


def build(model: torch.nn.Module, specs: list[tuple[str, dict[str, Any]]], method: str = "lora", seed: int = 0):
    """A PeftModel holding the named adapters (random weights), and the same adapters read by adaptfn."""
    pm = None
    for i, (name, kw) in enumerate(specs):
        cfg = (peft.LoraConfig(init_lora_weights=False, **kw) if method == "lora"
               else peft.IA3Config(init_ia3_weights=False, **kw))
        torch.manual_seed(seed + 17 * i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if pm is None:
                pm = peft.get_peft_model(copy.deepcopy(model), cfg, adapter_name=name)
            else:
                pm.add_adapter(name, cfg)
    ads = {name: af.from_state_dict(get_peft_model_state_dict(pm, adapter_name=name), pm.peft_config[name].to_dict())
           for name, _ in specs}
    return pm.eval(), ads


def compare(pm: peft.PeftModel, combined: af.Adapter, model: torch.nn.Module, name: str = "new") -> None:
    theirs = get_peft_model_state_dict(pm, adapter_name=name)
    ours = af.state_dict(combined)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]), k  # bit for bit
    cfg = pm.peft_config[name]
    assert (combined.config.r, combined.config.lora_alpha) == (cfg.r, cfg.lora_alpha)
    tm = cfg.target_modules
    assert combined.config.target_modules == (sorted(tm) if isinstance(tm, set) else tm)
    ids = ids_for(model)
    pm.set_adapter(name)
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    fn, params = af.functional(model)
    out = af.inject(fn, combined)(params, input_ids=ids).logits
    assert torch.equal(out, ref) or assert_close(out, ref) is None


def both(model, specs, how, weights=WEIGHTS, seed=123, **kw) -> tuple[peft.PeftModel, af.Adapter]:
    pm, ads = build(model, specs)
    names = [n for n, _ in specs]
    ws = weights[:len(names)]
    torch.manual_seed(seed)
    pm.add_weighted_adapter(names, ws, "new", combination_type=how, **kw)
    after_peft = torch.get_rng_state()
    torch.manual_seed(seed)
    combined = af.combine([ads[n] for n in names], ws, how=how, model=model, **kw)
    if how.startswith("dare"):  # the global generator is where PEFT leaves it (the others draw nothing)
        assert torch.equal(torch.get_rng_state(), after_peft)
    return pm, combined


@pytest.fixture(scope="module")
def opt():
    return tiny_opt()


@pytest.mark.parametrize("how", HOWS)
def test_every_combination_type_matches_peft(opt, how):
    specs = DIFFERENT if how == "cat" or how.endswith("svd") else SAME_R
    kw = {} if how in ("cat", "svd", "linear") else {"density": 0.6}
    pm, combined = both(opt, specs, how, **kw)
    compare(pm, combined, opt)


@pytest.mark.parametrize("how,kw", [
    ("svd", dict(svd_rank=2, svd_clamp=0.9, svd_full_matrices=False)),
    ("ties_svd", dict(density=0.3, majority_sign_method="frequency", svd_rank=5)),
    ("dare_ties", dict(density=0.5, majority_sign_method="frequency")),
    ("magnitude_prune", dict(density=1.0)),
], ids=["svd-clamp-reduced", "ties-svd-frequency", "dare-ties-frequency", "density-1"])
def test_options_match_peft(opt, how, kw):
    specs = DIFFERENT if how.endswith("svd") else SAME_R
    pm, combined = both(opt, specs, how, **kw)
    compare(pm, combined, opt)


def test_rslora_first_adapter_keeps_peft_scaling(opt):
    """PEFT copies the first adapter's config, use_rslora included: the combined scaling is R / sqrt(R), not 1."""
    pm, combined = both(opt, DIFFERENT[::-1], "cat")
    compare(pm, combined, opt)
    assert combined.config.use_rslora and combined.entries[combined.paths[0]].scaling == 9 / 9 ** 0.5


def test_one_adapter_combines_linearly_as_in_peft(opt):
    pm, combined = both(opt, DIFFERENT[:1], "svd", weights=[-0.8])
    compare(pm, combined, opt)
    assert combined.config.r == 2


def test_rank_pattern_modules_keep_their_rank_and_reload_in_peft(opt, tmp_path):
    """Adapters with one r but a rank_pattern module: PEFT's combined module keeps that module's rank (under a
    config saying r); adaptfn gives the same tensors and a config that says so, so the file reloads."""
    specs = [(n, {**kw, "rank_pattern": {"v_proj": 2}}) for n, kw in SAME_R]
    pm, combined = both(opt, specs, "linear")
    theirs = get_peft_model_state_dict(pm, adapter_name="new")
    ours = af.state_dict(combined)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert set(combined.config.rank_pattern.values()) == {2}
    af.save(combined, tmp_path / "c")
    re = peft.PeftModel.from_pretrained(tiny_opt(), tmp_path / "c").eval()
    ids = ids_for(opt)
    fn, params = af.functional(opt)
    with torch.no_grad():
        assert_close(af.inject(fn, combined)(params, input_ids=ids).logits, re(input_ids=ids).logits)


@pytest.mark.parametrize("how", ["cat", "svd", "dare_ties_svd", "ties"])
def test_gpt2_conv1d_matches_peft(how):
    model = tiny_gpt2()
    specs = [("x", dict(r=2, lora_alpha=5, target_modules=["c_attn"])),
             ("y", dict(r=2, lora_alpha=3, target_modules=["c_attn", "c_fc"]))]
    kw = {} if how in ("cat", "svd") else {"density": 0.6}
    pm, combined = both(model, specs, how, **kw)
    compare(pm, combined, model)


@pytest.mark.parametrize("how", ["cat", "svd", "dare_linear"])
def test_embedding_targets_match_peft(how):
    model = tiny_opt()
    specs = [("x", dict(r=2, lora_alpha=5, target_modules=["embed_tokens", "q_proj"])),
             ("y", dict(r=2, lora_alpha=3, target_modules=["embed_tokens"]))]
    kw = {} if how in ("cat", "svd") else {"density": 0.6}
    pm, combined = both(model, specs, how, **kw)
    compare(pm, combined, model)


def test_the_model_order_is_what_makes_dare_bit_exact(opt):
    """PEFT draws per module in the model's order (OPT: k, v, q, out_proj); without ``model`` adaptfn visits the
    paths in natural order: the same draws, other modules, so other values (the same as each other when seeded)."""
    pm, ads = build(opt, SAME_R)
    torch.manual_seed(5)
    pm.add_weighted_adapter(["x", "y", "z"], WEIGHTS, "new", combination_type="dare_linear", density=0.5)
    theirs = get_peft_model_state_dict(pm, adapter_name="new")
    torch.manual_seed(5)
    ours = af.state_dict(af.combine(list(ads.values()), WEIGHTS, how="dare_linear", density=0.5))
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)
    fn, _ = af.functional(opt)
    torch.manual_seed(5)
    ours = af.state_dict(af.combine(list(ads.values()), WEIGHTS, how="dare_linear", density=0.5, model=fn))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_ia3_matches_peft(opt):
    specs = [("x", dict(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"])),
             ("y", dict(target_modules=["v_proj", "k_proj", "fc2"], feedforward_modules=["fc2"]))]
    pm, ads = build(opt, specs, method="ia3")
    pm.add_weighted_adapter(["x", "y"], [0.6, 0.7], "new")
    combined = af.combine(list(ads.values()), [0.6, 0.7], how="linear", model=opt)
    theirs = get_peft_model_state_dict(pm, adapter_name="new")
    ours = af.state_dict(combined)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert set(combined.config.target_modules) == set(pm.peft_config["new"].target_modules)
    assert set(combined.config.feedforward_modules) == set(pm.peft_config["new"].feedforward_modules)


@pytest.mark.parametrize("how,kw", [("svd", {}), ("cat", {}), ("dare_ties", dict(density=0.4))])
def test_adapter_model_add_weighted_adapter_matches_peft_model(opt, how, kw):
    specs = DIFFERENT if how != "dare_ties" else SAME_R
    pm, ads = build(opt, specs)
    m = af.AdapterModel(copy.deepcopy(opt))
    for name, a in ads.items():
        m.load_adapter(peft_config=a.config, adapter_state_dict=af.state_dict(a), adapter_name=name)
    names = list(ads)
    torch.manual_seed(9)
    pm.add_weighted_adapter(names, WEIGHTS, "new", combination_type=how, **kw)
    torch.manual_seed(9)
    if how == "svd":
        m.add_weighted_adapter(names, WEIGHTS, "new")  # PEFT's default combination_type
    else:
        m.add_weighted_adapter(names, WEIGHTS, "new", combination_type=how, **kw)
    theirs = get_peft_model_state_dict(pm, adapter_name="new")
    ours = m.get_adapter_state_dict("new")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert m.active_adapters() == [names[0]]  # as PEFT: added, frozen, not activated
    assert not any(p.requires_grad for p in m.adapter_params["new"].parameters())
    m.set_adapter("new")
    pm.set_adapter("new")
    ids = ids_for(opt)
    with torch.no_grad():
        assert_close(m(input_ids=ids).logits, pm(input_ids=ids).logits)
    with pytest.raises(af.ConfigError, match="add_weighted_adapter: .*exists already"):
        m.add_weighted_adapter(names, WEIGHTS, "new")
    with pytest.raises(af.ConfigError, match="add_weighted_adapter: .*weights has 2 entries"):
        m.add_weighted_adapter(names, WEIGHTS[:2], "other")


def test_adapter_model_ia3_combines_as_peft(opt):
    specs = [("x", dict(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"])),
             ("y", dict(target_modules=["k_proj", "fc1"], feedforward_modules=[]))]
    pm, ads = build(opt, specs, method="ia3")
    m = af.AdapterModel(copy.deepcopy(opt))
    for name, a in ads.items():
        m.load_adapter(peft_config=a.config, adapter_state_dict=af.state_dict(a), adapter_name=name)
    pm.add_weighted_adapter(["x", "y"], [0.3, 0.9], "new")
    m.add_weighted_adapter(["x", "y"], [0.3, 0.9], "new")
    theirs = get_peft_model_state_dict(pm, adapter_name="new")
    ours = m.get_adapter_state_dict("new")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with pytest.raises(af.ConfigError, match="IA3 adapters combine linearly"):
        m.add_weighted_adapter(["x", "y"], [0.3, 0.9], "other", combination_type="cat")
