"""PEFT's ``init_lora_weights`` variants (PiSSA, pissa_niter_K, OLoRA, orthogonal, LoftQ, CorDA, EVA) against
the real ``peft`` (0.21.2): ``af.init``'s adapter tensors, changed base weights and outputs equal to
``get_peft_model``'s on a copy of the same model; random inits equal to PEFT's under the same seed (PEFT draws
from torch's global RNG); PEFT-saved files loaded and run (the residual base recomputed as PEFT's loading does);
adaptfn-saved files run by PEFT; PEFT's conversion to a plain LoRA (``path_initial_model_for_weight_conversion``)
both ways. Model: ``tests/mixed_model.py`` (Embedding, square Linear, square and non-square Conv1D, non-square
Linear; odd sizes)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import sys
import warnings
from typing import Any

import peft
import pytest
import torch
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from mixed_model import mixed, mixed_ids
from peft.tuners.lora.config import CordaConfig, EvaConfig
from peft.utils import get_peft_model_state_dict

import adaptfn as af
from adaptfn.methods import lora_init
from parity.peft_models import peft_reload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ALL = ["sq", "c_sq", "c_up", "down"]  # Linear and Conv1D targets (every init but OLoRA / LoftQ)
LINEAR = ["sq", "down"]


def preprocess_corda(*args: Any, **kw: Any) -> None:
    """PEFT's ``preprocess_corda``; its module imports ``attr.dataclass`` (the ``attrs`` package), which this
    environment may lack: a stand-in with the standard library's dataclass (what CorDA uses it for) then."""
    try:
        import attr  # noqa: F401
    except ImportError:
        import types

        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)  # type: ignore[assignment]
    from peft.tuners.lora.corda import preprocess_corda as run

    run(*args, **kw)


def peft_model(cfg: dict[str, Any], seed: int | None = None, **pre: Any) -> peft.PeftModel:
    model = mixed(0)
    if pre.get("corda"):
        preprocess_corda(model, peft.LoraConfig(**cfg), run_model=pre["corda"](model))
    if seed is not None:
        torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**cfg)).eval()


def af_init(cfg: dict[str, Any], seed: int = 0, **kw: Any) -> tuple[Any, dict, dict, Any]:
    model = mixed(0)
    fn, params = af.functional(model)
    before = {k: v.clone() for k, v in params.items()}
    p2, a = af.init(fn, af.LoraConfig(**cfg), params=params, generator=torch.Generator().manual_seed(seed), **kw)
    for k, v in params.items():  # the user's params and model are never modified
        assert torch.equal(v, before[k]) and model.state_dict()[k].equal(before[k]), k
    return fn, params, p2, a


def base_state(pm: peft.PeftModel) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v for k, v in pm.get_base_model().state_dict().items() if "lora_" not in k}


def compare_init(pm: peft.PeftModel, fn: Any, params: dict, p2: dict, a: Any, tol: float = 1e-5) -> None:
    ref = get_peft_model_state_dict(pm)
    sd = af.state_dict(a)
    assert sorted(sd) == sorted(ref)
    for k in ref:
        assert_close(sd[k], ref[k], k, tol)
    base = base_state(pm)
    for k, v in p2.items():
        assert_close(v, base[k], k, tol)
    ids = mixed_ids()
    with torch.no_grad():
        assert_close(af.inject(fn, a)(p2, ids), pm(ids), "outputs", tol)


# -- af.init-made == get_peft_model's --------------------------------------------------------------------------
@pytest.mark.parametrize("mode,targets", [("pissa", ALL), ("olora", LINEAR)])
def test_deterministic_init_matches_peft(mode: str, targets: list[str]) -> None:
    cfg = dict(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=mode, rank_pattern={"down": 2})
    fn, params, p2, a = af_init(cfg)
    compare_init(peft_model(cfg), fn, params, p2, a)
    ids = mixed_ids()
    with torch.no_grad():  # PiSSA / OLoRA start from the base model: base' + s B A == W
        assert_close(af.inject(fn, a)(p2, ids), fn(params, ids), "starts at the base", 1e-5)
    assert {k for k in p2 if p2[k] is not params[k]} == {f"{t}.weight" for t in targets}


@pytest.mark.parametrize("mode", ["orthogonal", "pissa_niter_3"])
def test_random_init_matches_peft_under_the_same_seed(mode: str) -> None:
    cfg = dict(r=4, lora_alpha=7, target_modules=ALL, init_lora_weights=mode)
    fn, params, p2, a = af_init(cfg, seed=11)
    compare_init(peft_model(cfg, seed=11), fn, params, p2, a, 1e-5)
    for path in ALL:
        A, B = a.leaves(path)["lora_A"], a.leaves(path)["lora_B"]
        if mode == "orthogonal":  # the halves of one orthogonal matrix: B @ A == 0, the base unchanged
            assert (B @ A).abs().max() < 1e-6 and p2[f"{path}.weight"] is params[f"{path}.weight"]
        else:
            W = params[f"{path}.weight"]
            delta = a.entries[path].scaling * B @ A
            back = p2[f"{path}.weight"] + (delta.T if path.startswith("c_") else delta)
            assert torch.allclose(back, W, atol=1e-5)


def test_loftq_matches_peft_run_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's loftq_init computes on "cuda" (or "xpu") only; the test runs its own source with the device
    replaced by "cpu" (bitsandbytes quantises on the CPU)."""
    import peft.tuners.lora.layer as layer
    import peft.utils.loftq_utils as lu

    src = inspect.getsource(lu.loftq_init).replace('"xpu" if is_xpu_available() else "cuda"', '"cpu"')
    assert '"cpu"' in src
    ns: dict[str, Any] = dict(vars(lu))
    exec(compile(src.replace("@torch.no_grad()\n", ""), lu.__file__, "exec"), ns)
    monkeypatch.setattr(layer, "loftq_init", torch.no_grad()(ns["loftq_init"]))
    for bits, iters in ((4, 2), (8, 1)):
        cfg = dict(r=3, lora_alpha=3, target_modules=LINEAR, init_lora_weights="loftq",
                   loftq_config={"loftq_bits": bits, "loftq_iter": iters})
        fn, params, p2, a = af_init(cfg)
        compare_init(peft_model(cfg), fn, params, p2, a, 2e-5)
        for t in LINEAR:  # LoftQ fits the quantisation error: closer to W than the quantised weight alone
            W, Wq, A, B = params[f"{t}.weight"], p2[f"{t}.weight"], a.leaves(t)["lora_A"], a.leaves(t)["lora_B"]
            q = lora_init.nf4_roundtrip(W) if bits == 4 else lora_init.int8_roundtrip(W)
            assert (Wq + B @ A - W).norm() < (q - W).norm()


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft(method: str) -> None:
    batches = [mixed_ids(batch=1, seq=9, seed=s) for s in range(4)]

    def run(model: Any) -> Any:
        return lambda: [model(b) for b in batches]

    cfg = dict(r=3, lora_alpha=4, target_modules=ALL, init_lora_weights="corda",
               corda_config={"corda_method": method})
    fn, params, p2, a = af_init(cfg, data=batches)
    compare_init(peft_model(dict(cfg, corda_config=CordaConfig(corda_method=method)), corda=run),
                 fn, params, p2, a, 1e-4)
    ids = mixed_ids()
    with torch.no_grad():
        assert_close(af.inject(fn, a)(p2, ids), fn(params, ids), "starts at the base", 1e-5)


# -- files both ways -----------------------------------------------------------------------------------------
def perturbed(a: Any, seed: int = 3) -> Any:
    g = torch.Generator().manual_seed(seed)
    return af.tree.map(lambda t: t + 0.2 * torch.randn(t.shape, generator=g) if t.dim() == 2 else t, a)


@pytest.mark.parametrize("mode,targets", [("pissa", ALL), ("olora", LINEAR)])
def test_files_both_ways(mode: str, targets: list[str], tmp_path: Any) -> None:
    cfg = dict(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=mode)
    ids = mixed_ids()
    # PEFT-saved -> adaptfn: the file applies to the residual base, which af.init recomputes (as PEFT's loading does)
    pm = peft_model(cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.2 * torch.randn_like(p))
        ref = pm(ids)
    pm.save_pretrained(tmp_path / "peft")
    a = af.load(str(tmp_path / "peft"))
    assert a.config.init_lora_weights == mode
    fn, params = af.functional(mixed(0))
    p2, _ = af.init(fn, a.config, params=params)
    with torch.no_grad():
        assert_close(af.inject(fn, a)(p2, ids), ref, "PEFT file, inject")
        assert_close(fn(af.merge(p2, a), ids), ref, "PEFT file, merge")
    merged = pm.merge_and_unload().state_dict()
    for k, v in af.merge(p2, a).items():
        assert_close(v, merged[k], k)
    # adaptfn-saved -> PEFT (PEFT loads it onto the original model and recomputes the residual)
    fn, params, p2, a0 = af_init(cfg)
    b = perturbed(a0)
    af.save(b, tmp_path / "af")
    assert json.loads((tmp_path / "af" / "adapter_config.json").read_text())["init_lora_weights"] == mode
    back = peft_reload(mixed(0), str(tmp_path / "af"))
    with torch.no_grad():
        assert_close(back(ids), af.inject(fn, b)(p2, ids), "adaptfn file in PEFT")


def test_conversion_to_plain_lora_both_ways(tmp_path: Any) -> None:
    cfg = dict(r=3, lora_alpha=5, target_modules=ALL, init_lora_weights="pissa", rank_pattern={"down": 2})
    pm = peft_model(cfg)
    pm.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.2 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "trained")
    pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    a = af.load(str(tmp_path / "trained"))
    a0 = af.load(str(tmp_path / "init"))
    af.save(a, tmp_path / "af", convert_from=a0)
    # the same files PEFT writes
    ref_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "af" / "adapter_config.json").read_text())
    for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights"):
        assert our_cfg[k] == ref_cfg[k], k
    assert sorted(our_cfg["target_modules"]) == sorted(ref_cfg["target_modules"])
    ref_sd = af.load(str(tmp_path / "peft"))
    ours = af.load(str(tmp_path / "af"))
    for k, v in af.state_dict(ref_sd).items():
        assert torch.equal(af.state_dict(ours)[k], v), k
    # both run on the ORIGINAL base as the trained PiSSA adapter runs on the residual one
    fn, params = af.functional(mixed(0))
    p2, _ = af.init(fn, a.config, params=params)
    ids = mixed_ids()
    with torch.no_grad():
        want = af.inject(fn, a)(p2, ids)
        assert_close(af.inject(fn, ref_sd)(params, ids), want, "PEFT-converted file")
        assert_close(af.inject(fn, ours)(params, ids), want, "adaptfn-converted file")
        back = peft_reload(mixed(0), str(tmp_path / "af"))
        assert_close(back(ids), want, "adaptfn-converted file in PEFT")


def test_eva_files_load_and_run(tmp_path: Any) -> None:
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    cfg = dict(r=2, lora_alpha=2, target_modules=LINEAR, init_lora_weights="eva",
               eva_config=EvaConfig(rho=1.5, tau=0.9))
    pm = peft_model(cfg, seed=0)
    loader = [{"input_ids": mixed_ids(batch=4, seq=7, seed=s)} for s in range(6)]
    initialize_lora_eva_weights(pm, loader)
    pm.save_pretrained(tmp_path / "eva")
    a = af.load(str(tmp_path / "eva"))
    assert a.config.init_lora_weights == "eva" and a.config.extra["eva_config"]["rho"] == 1.5
    fn, params = af.functional(mixed(0))
    ids = mixed_ids()
    with torch.no_grad():
        assert_close(af.inject(fn, a)(params, ids), pm(ids), "EVA file")
    with pytest.raises(af.ConfigError, match="eva"):
        af.init(fn, a.config, params=params)


# -- refusals and properties ---------------------------------------------------------------------------------
def test_refusals() -> None:
    fn, params = af.functional(mixed(0))
    with pytest.raises(af.ConfigError, match="pair form"):
        af.init(fn, af.LoraConfig(r=2, target_modules=["sq"], init_lora_weights="pissa"))
    with pytest.raises(af.IncompatibleAdapterError, match="'embed'.*Linear"):
        af.init(fn, af.LoraConfig(r=2, target_modules=["embed"], init_lora_weights="pissa"), params=params)
    with pytest.raises(af.IncompatibleAdapterError, match="'c_up'.*Conv1D"):
        af.init(fn, af.LoraConfig(r=2, target_modules=["c_up"], init_lora_weights="olora"), params=params)
    with pytest.raises(af.ConfigError, match="even rank"):
        af.init(fn, af.LoraConfig(r=3, target_modules=["sq"], init_lora_weights="orthogonal"), params=params)
    with pytest.raises(af.IncompatibleAdapterError, match="r <= min"):
        af.init(fn, af.LoraConfig(r=14, target_modules=["sq"], init_lora_weights="pissa"), params=params)
    with pytest.raises(af.ConfigError, match="data="):
        af.init(fn, af.LoraConfig(r=2, target_modules=["sq"], init_lora_weights="pissa"), params=params, data=[1])
    with pytest.raises(af.ConfigError, match="calibration data"):
        af.init(fn, af.LoraConfig(r=2, target_modules=["sq"], init_lora_weights="corda"), params=params)
    for bad in ("pissa_niter_x", "mica", "lora_ga", "PISSA"):
        with pytest.raises(af.ConfigError, match="init_lora_weights"):
            af.LoraConfig(init_lora_weights=bad)
    with pytest.raises(af.ConfigError, match="loftq_config"):
        af.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(af.ConfigError, match="loftq_bits"):
        af.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3})
    with pytest.raises(af.ConfigError, match="corda_method"):
        af.LoraConfig(init_lora_weights="corda", corda_config={"corda_method": "x"})
    with pytest.raises(af.ConfigError, match="rho"):
        af.LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.5})
    with pytest.raises(af.ConfigError, match="init_lora_weights"):
        af.AdaLoraConfig(init_lora_weights="pissa", total_step=10)
    # the single-return form still works for the inits that keep the base
    a = af.init(fn, af.LoraConfig(r=2, target_modules=["sq"], init_lora_weights="orthogonal"), generator=None)
    assert isinstance(a, af.Adapter)
    p2, b = af.init(fn, af.LoraConfig(r=2, target_modules=["sq"]), params=params)
    assert all(p2[k] is params[k] for k in params) and p2 is not params


@settings(max_examples=15, deadline=None)
@given(out=st.integers(1, 9), inn=st.integers(1, 9), r=st.integers(1, 9), alpha=st.floats(0.5, 8),
       seed=st.integers(0, 2**16))
def test_pissa_olora_corda_keep_the_weight(out: int, inn: int, r: int, alpha: float, seed: int) -> None:
    r = min(r, out, inn)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inn, generator=g)
    x = torch.randn(13, inn, generator=g)
    for A, B, res in (lora_init.pissa(W, r, alpha / r), lora_init.pissa(W, r, alpha / r, 2, g),
                      lora_init.olora(W, r, alpha / r), lora_init.corda(W, x.T @ x / 13, r, alpha / r)):
        assert A.shape == (r, inn) and B.shape == (out, r)
        assert torch.allclose(res + alpha / r * B @ A, W, atol=1e-4)


def test_quantisers_match_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    W = torch.randn(19, 23) * 0.3  # 437 values: a partial last block
    q = bnb.nn.Params4bit(W.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
    assert torch.equal(lora_init.nf4_roundtrip(W), bnb.functional.dequantize_4bit(q.data, q.quant_state))
    q8 = bnb.nn.Int8Params(W.clone(), requires_grad=False).to("cpu")
    assert torch.equal(lora_init.int8_roundtrip(W), bnb.functional.int8_vectorwise_dequant(q8.data, q8.SCB))


def test_init_is_pure_for_the_copy() -> None:
    model = mixed(0)
    keep = copy.deepcopy(model.state_dict())
    fn, params = af.functional(model)
    versions = {k: v._version for k, v in params.items()}
    af.init(fn, af.LoraConfig(r=2, target_modules=ALL, init_lora_weights="corda"), params=params,
            data=[mixed_ids(batch=1, seq=5)])
    assert {k: v._version for k, v in params.items()} == versions
    assert all(torch.equal(v, keep[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert os.environ.get("HF_HUB_OFFLINE", "1") is not None
