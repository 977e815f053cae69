"""Community LoRA files (kohya-ss / A1111 / LyCORIS layout) read by ``af.load_kohya`` for a tiny diffusers UNet and
a CLIP text encoder built from configs: the same outputs as diffusers' own loading of the same file
(``lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder``, PEFT injection, no pipeline),
kohya's per-module ``alpha / r`` checked by hand where diffusers 0.42 loses it, LoHa / LoKr files against their
formulas, the saved PEFT folder reloaded by PEFT, and typed refusals for what is not read yet."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from conftest import gen, rel_err
from torch import nn

import adaptfn as af

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_unet(linear_projection: bool = True):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=2,
        use_linear_projection=linear_projection).eval()


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=12, intermediate_size=20, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=2)).eval()


def linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def kohya_name(prefix: str, path: str) -> str:
    # kohya names the text encoder's modules as transformers 4 did (text_model.encoder...)
    return f"{prefix}_{'text_model_' if prefix.startswith('lora_te') else ''}{path.replace('.', '_')}"


def lora_file(alphas: str = "uniform", seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoRA for every Linear of the UNet and the text encoder; ranks 2 and 3. alphas: "uniform" (2.0 on
    every module, kohya's usual file) or "mixed" (per module, some absent)."""
    g = gen(seed)
    sd = {}
    for prefix, model in (("lora_unet", tiny_unet()), ("lora_te", tiny_clip())):
        for i, (path, m) in enumerate(linears(model)):
            r = 2 + (i % 3 == 0)
            name = kohya_name(prefix, path)
            sd[f"{name}.lora_down.weight"] = 0.3 * torch.randn(r, m.in_features, generator=g)
            sd[f"{name}.lora_up.weight"] = 0.3 * torch.randn(m.out_features, r, generator=g)
            if alphas == "uniform":
                sd[f"{name}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
            elif i % 4:
                sd[f"{name}.alpha"] = torch.tensor(float(1 + i % 3), dtype=torch.float16)
    return sd


def inputs():
    g = gen(5)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 7]), torch.randint(0, 50, (2, 7), generator=g)


def save(sd: dict[str, torch.Tensor], path) -> str:
    import safetensors.torch

    safetensors.torch.save_file(sd, str(path))
    return str(path)


def test_lora_file_gives_diffusers_outputs(tmp_path) -> None:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader

    sd = lora_file("uniform")
    file = save(sd, tmp_path / "style.safetensors")
    x, t, ids = inputs()
    ref_unet, ref_te = tiny_unet(), tiny_clip()
    logging.disable(logging.WARNING)
    try:
        dsd, alphas = Loader.lora_state_dict(dict(sd))
        Loader.load_lora_into_unet(dsd, alphas, ref_unet)
        Loader.load_lora_into_text_encoder(dsd, alphas, ref_te, prefix="text_encoder")
    finally:
        logging.disable(logging.NOTSET)
    with torch.no_grad():
        enc_ref = ref_te(input_ids=ids).last_hidden_state
        out_ref = ref_unet(x, t, encoder_hidden_states=enc_ref).sample

    unet, te = tiny_unet(), tiny_clip()
    fu, pu = af.functional(unet)
    fe, pe = af.functional(te)
    au = af.load_kohya(file, unet)  # the prefix is found from the model: lora_unet
    ae = af.load_kohya(file, fe)  # the fn works too; lora_te (transformers 5's CLIP has no text_model level)
    assert (au.method, len(au.paths), ae.method, len(ae.paths)) == ("lora", len(linears(unet)), "lora", 12)
    assert au.config.r == 2 and set(au.config.rank_pattern.values()) == {3} and au.config.alpha_pattern == {}
    enc = af.inject(fe, ae)(pe, input_ids=ids).last_hidden_state
    assert rel_err(fe(pe, input_ids=ids).last_hidden_state, enc_ref) > 1e-2, "vacuous comparison"
    assert rel_err(enc, enc_ref) <= 1e-5
    out = af.inject(fu, au)(pu, x, t, encoder_hidden_states=enc).sample
    assert rel_err(out, out_ref) <= 1e-5
    assert rel_err(fu(af.merge(pu, au), x, t, encoder_hidden_states=enc).sample, out_ref) <= 1e-5

    # saved in PEFT's layout, PEFT loads it into a fresh UNet with the same outputs
    import peft

    af.save(au, tmp_path / "unet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_unet(), tmp_path / "unet").eval()
    with torch.no_grad():
        assert rel_err(pm(x, t, encoder_hidden_states=enc).sample, out_ref) <= 1e-5


def test_per_module_alpha_is_kohya_s_alpha_over_rank(tmp_path) -> None:
    """Each module's scale is its own ``alpha / r`` (no alpha key: 1), as kohya and A1111 compute it. (diffusers
    0.42 loses per-module alphas: its alpha names do not reach attention modules, and a missing alpha takes the
    most common one, so this is checked against the formula.)"""
    sd = lora_file("mixed")
    te = tiny_clip()
    a = af.load_kohya(save(sd, tmp_path / "mixed.safetensors"), te, prefix="lora_te")
    fn, params = af.functional(te)
    merged = af.merge(params, a)
    for path, m in linears(te):
        name = kohya_name("lora_te", path)
        down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else down.shape[0]
        want = m.weight + up @ down * (alpha / down.shape[0])
        torch.testing.assert_close(merged[f"{path}.weight"], want)
    ids = inputs()[2]
    torch.testing.assert_close(af.inject(fn, a)(params, input_ids=ids).last_hidden_state,
                               fn(merged, input_ids=ids).last_hidden_state)
    assert len(a.config.alpha_pattern) > 0


def _lycoris_file(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    sd = {}
    for i, (path, m) in enumerate(linears(tiny_clip())):
        name = kohya_name("lora_te", path)
        out, inp = m.out_features, m.in_features
        if kind == "loha":
            r = 2 + i % 2
            for k, shape in (("hada_w1_a", (out, r)), ("hada_w1_b", (r, inp)), ("hada_w2_a", (out, r)),
                             ("hada_w2_b", (r, inp))):
                sd[f"{name}.{k}"] = 0.5 * torch.randn(shape, generator=g)
            sd[f"{name}.alpha"] = torch.tensor(1.0 + i % 3)
        else:  # LyCORIS LoKr, factor -1: 12 = 3 x 4, 20 = 4 x 5; w2 low-rank (r=1 < 2) or full (every 3rd)
            from adaptfn.methods.lokr import factorization

            a_, b_ = factorization(out)
            c_, d_ = factorization(inp)
            sd[f"{name}.lokr_w1"] = torch.randn(a_, c_, generator=g)
            if i % 3:
                sd[f"{name}.lokr_w2_a"] = 0.5 * torch.randn(b_, 1, generator=g)
                sd[f"{name}.lokr_w2_b"] = 0.5 * torch.randn(1, d_, generator=g)
            else:
                sd[f"{name}.lokr_w2"] = 0.5 * torch.randn(b_, d_, generator=g)
            sd[f"{name}.alpha"] = torch.tensor(3.0)
    return sd


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_loha_and_lokr_files(kind, tmp_path) -> None:
    import peft

    sd = _lycoris_file(kind)
    te = tiny_clip()
    a = af.load_kohya(save(sd, tmp_path / f"{kind}.safetensors"), te)
    assert a.method == kind
    fn, params = af.functional(te)
    merged = af.merge(params, a)
    for path, m in linears(te):
        name = kohya_name("lora_te", path)
        if kind == "loha":
            r = sd[f"{name}.hada_w1_b"].shape[0]
            delta = (sd[f"{name}.hada_w1_a"] @ sd[f"{name}.hada_w1_b"]) * (sd[f"{name}.hada_w2_a"] @
                                                                         sd[f"{name}.hada_w2_b"])
            delta = delta * float(sd[f"{name}.alpha"]) / r
        else:
            full = f"{name}.lokr_w2" in sd
            w2 = sd[f"{name}.lokr_w2"] if full else sd[f"{name}.lokr_w2_a"] @ sd[f"{name}.lokr_w2_b"]
            delta = torch.kron(sd[f"{name}.lokr_w1"], w2) * (1.0 if full else float(sd[f"{name}.alpha"]) / 1)
        torch.testing.assert_close(merged[f"{path}.weight"], m.weight + delta)
    ids = inputs()[2]
    out = af.inject(fn, a)(params, input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, fn(merged, input_ids=ids).last_hidden_state)
    af.save(a, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_clip(), tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel_err(pm(input_ids=ids).last_hidden_state, out) <= 1e-5


def test_what_is_not_read_is_refused_clearly(tmp_path) -> None:
    sd = lora_file("uniform")
    unet, te = tiny_unet(), tiny_clip()
    # LoCon's CP middle factor has no PEFT form
    mid = {**sd, kohya_name("lora_unet", "down_blocks.0.attentions.0.proj_in") + ".lora_mid.weight": torch.ones(1)}
    with pytest.raises(af.IncompatibleAdapterError, match="lora_mid"):
        af.from_kohya(mid, unet)
    # DoRA: one flag for the adapter in PEFT, one magnitude per output
    fc1 = kohya_name("lora_te", "encoder.layers.0.mlp.fc1")
    with pytest.raises(af.ConfigError, match="use_dora is one flag"):
        af.from_kohya({**sd, fc1 + ".dora_scale": torch.ones(20, 1)}, te)
    te_sd = {k: v for k, v in sd.items() if k.startswith("lora_te")}
    wide = {**te_sd, **{k.replace(".lora_down.weight", ".dora_scale"): torch.ones(1, v.shape[1])
                        for k, v in te_sd.items() if k.endswith("lora_down.weight")}}
    with pytest.raises(af.AdapterFileError, match="one magnitude per output"):
        af.from_kohya(wide, te)
    # SGM / LDM names on a model without a diffusers config stay unresolved, with the hint
    sgm = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(2, 8),
           "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(8, 2)}
    with pytest.raises(af.IncompatibleAdapterError, match="SGM"):
        af.from_kohya(sgm, nn.ModuleDict({"down_blocks": nn.ModuleList([nn.Linear(8, 8)])}))
    with pytest.raises(af.ConfigError, match="not a kohya-ss / A1111 network key"):
        af.from_kohya({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, unet)
    with pytest.raises(af.IncompatibleAdapterError, match="no network of the file names only modules"):
        af.from_kohya({k: v for k, v in sd.items() if k.startswith("lora_unet")}, te)
    with pytest.raises(af.ConfigError, match="prefix='lora_te2' has no keys"):
        af.from_kohya(sd, te, prefix="lora_te2")
    bad_lokr = {kohya_name("lora_te", "encoder.layers.0.mlp.fc1") + ".lokr_w1": torch.zeros(10, 2),
                kohya_name("lora_te", "encoder.layers.0.mlp.fc1") + ".lokr_w2": torch.zeros(2, 6)}
    with pytest.raises(af.ConfigError, match="decompose_factor"):
        af.from_kohya(bad_lokr, te)
    # af.load points at load_kohya for a single file
    file = save(sd, tmp_path / "x.safetensors")
    with pytest.raises(af.AdapterFileError, match="af.load_kohya"):
        af.load(file)


def conv_file(seed: int = 0, dora: bool = False) -> dict[str, torch.Tensor]:
    """kohya LoCon-style: every Linear and every Conv2d of an SD 1.x-style UNet (1x1 proj_in / proj_out, 3x3
    ResNet convolutions: a 3x3 down and a 1x1 up), ranks 2 / 3, alpha 2."""
    g = gen(seed)
    out = {}
    for i, (path, m) in enumerate((n, m) for n, m in tiny_unet(False).named_modules()
                                  if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in ("conv_in", "conv_out")):
        r = 2 + (i % 3 == 0)
        name = kohya_name("lora_unet", path)
        w = m.weight
        out[f"{name}.lora_down.weight"] = 0.2 * torch.randn(r, *w.shape[1:], generator=g)
        out[f"{name}.lora_up.weight"] = 0.2 * torch.randn(w.shape[0], r, *[1] * (w.dim() - 2), generator=g)
        out[f"{name}.alpha"] = torch.tensor(2.0)
    return out


def diffusers_unet(sd: dict[str, torch.Tensor], unet: nn.Module) -> nn.Module:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader

    logging.disable(logging.WARNING)
    try:
        dsd, alphas = Loader.lora_state_dict(dict(sd), unet_config=unet.config)
        Loader.load_lora_into_unet(dsd, alphas, unet)
    finally:
        logging.disable(logging.NOTSET)
    return unet


def test_conv_and_sgm_named_files_give_diffusers_outputs(tmp_path) -> None:
    sd = conv_file()
    x, t, _ = inputs()
    enc = torch.randn(2, 5, 12, generator=gen(8))
    with torch.no_grad():
        ref = diffusers_unet(sd, tiny_unet(False))(x, t, encoder_hidden_states=enc).sample
    unet = tiny_unet(False)
    fn, params = af.functional(unet)
    a = af.from_kohya(sd, unet)
    assert {e.kind for _, e in a.entry_items} == {"linear", "conv2d"}
    assert rel_err(fn(params, x, t, encoder_hidden_states=enc).sample, ref) > 1e-2, "vacuous comparison"
    out = af.inject(fn, a)(params, x, t, encoder_hidden_states=enc).sample
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(fn(af.merge(params, a), x, t, encoder_hidden_states=enc).sample, ref) <= 1e-5
    # SGM / LDM block names (kohya's SDXL UNet files) are renamed by diffusers' converter: the same adapter
    to_sgm = {"down_blocks_0_attentions_0": "input_blocks_1_1", "down_blocks_0_resnets_0": "input_blocks_1_0",
              "mid_block_resnets_0": "middle_block_0", "mid_block_attentions_0": "middle_block_1",
              "mid_block_resnets_1": "middle_block_2"}
    part = {k: v for k, v in sd.items() if any(n in k for n in to_sgm)}  # a file has one naming or diffusers
    sgm = {}  # drops the SGM keys
    for k, v in part.items():
        for a_name, b_name in to_sgm.items():
            k = k.replace(a_name, b_name)
        sgm[k] = v
    assert any("input_blocks" in k for k in sgm) and not any("down_blocks" in k for k in sgm)
    want, got = af.state_dict(af.from_kohya(part, unet)), af.state_dict(af.from_kohya(sgm, unet))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # saved in PEFT's layout, PEFT loads it with the same outputs
    import peft

    af.save(a, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_unet(False), tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel_err(pm(x, t, encoder_hidden_states=enc).sample, ref) <= 1e-5


def test_dora_scale_is_peft_s_magnitude(tmp_path) -> None:
    # diffusers 0.42 drops dora_scale from SD files ("not compatible in Diffusers at the moment"), so the reference
    # is PEFT's DoRA loading the saved folder
    import peft

    sd = {k: v for k, v in lora_file("uniform").items() if k.startswith("lora_te")}
    g = gen(4)
    for k, v in list(sd.items()):
        if k.endswith("lora_up.weight"):
            sd[k.replace(".lora_up.weight", ".dora_scale")] = 1 + 0.1 * torch.randn(v.shape[0], 1, generator=g)
    _, _, ids = inputs()
    te = tiny_clip()
    fe, pe = af.functional(te)
    a = af.from_kohya(sd, te)
    assert a.config.use_dora
    fc1 = "text_model.encoder.layers.0.mlp.fc1" if "text_model.encoder.layers.0.mlp.fc1" in a.paths else \
        "encoder.layers.0.mlp.fc1"
    assert torch.equal(a.leaves(fc1)["lora_magnitude"],
                       sd[kohya_name("lora_te", "encoder.layers.0.mlp.fc1") + ".dora_scale"].reshape(-1))
    af.save(a, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_clip(), tmp_path / "peft").eval()
    with torch.no_grad():
        ref = pm(input_ids=ids).last_hidden_state
    out = af.inject(fe, a)(pe, input_ids=ids).last_hidden_state
    assert rel_err(fe(pe, input_ids=ids).last_hidden_state, ref) > 1e-2, "vacuous comparison"
    assert rel_err(out, ref) <= 1e-5
