"""Fuzzing the readers (hypothesis): random JSON values per config field, random key / shape / dtype
mutations of a state dict, random byte damage of both files. The only allowed outcomes are a valid
adapter (which then injects, runs, merges and round-trips through a save, or refuses with a typed error)
or an ``af.AdaptfnError``; any other exception, a hang or a silent non-finite output fails."""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import pytest
import torch
from conftest import gen, ids_for, tiny_opt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaptfn as af
from adaptfn import io as af_io

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# CI: a fixed set of examples. ADAPTFN_FUZZ=<n>: n times as many, freshly drawn (a longer hunt, by hand)
SCALE = int(os.environ.get("ADAPTFN_FUZZ", "0") or 0)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                derandomize=not SCALE)
STATS: collections.Counter = collections.Counter()
pytestmark = pytest.mark.filterwarnings("ignore:Casting complex values to real")


def examples(n: int) -> int:
    return n * SCALE if SCALE else n


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    yield
    print(f"\nfuzz outcomes: {dict(STATS)}")


@pytest.fixture(scope="module")
def world():
    model = tiny_opt()
    fn, params = af.functional(model)
    ads = {
        "lora": af.init(fn, af.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"],
                                          modules_to_save=["fc2"], init_lora_weights=False), generator=gen(0)),
        "ia3": af.init(fn, af.IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"],
                                        init_ia3_weights=False), generator=gen(1)),
        "adalora": af.init(fn, af.AdaLoraConfig(init_r=4, target_r=2, target_modules=["v_proj"], total_step=100,
                                                init_lora_weights=False), generator=gen(2)),
    }
    configs = {k: a.config.to_dict() for k, a in ads.items()}
    sds = {k: af.state_dict(a) for k, a in ads.items()}
    paths = [p for p, _ in model.named_modules() if p]
    return model, fn, params, ids_for(model, batch=1, seq=4), ads, configs, sds, paths


def _fields(kind):
    cls = {"lora": af.LoraConfig, "ia3": af.IA3Config, "adalora": af.AdaLoraConfig}[kind]
    names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
    return sorted(set(names) | set(cls.unsupported) | {"peft_type", "auto_mapping", "peft_version", "unknown_x"})


scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([10**400, -(10**300), 0, 1, 4])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["q_proj", "fc1", "fc2", ".*", "(", "[a-", "all-linear", "LORA", "IA3", "ADALORA",
                              "none", "all", "lora_only", "gaussian", "CAUSAL_LM", "layers"]))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.sampled_from(["q_proj", "fc1", "v_proj", "(", "x", "model.decoder.layers.0.self_attn.v_proj.lora_E"]), c,
    max_size=3), max_leaves=8)


def outcome(call):
    """("ok", value) or ("typed", error); anything else fails the test right here."""
    try:
        value = call()
    except af.AdaptfnError as e:
        STATS[type(e).__name__] += 1
        return "typed", e
    STATS["ok"] += 1
    return "ok", value


def use(world, adapter, tmp_path):
    """A valid adapter must inject, run (finite output or a typed refusal), merge, and survive a save."""
    model, fn, params, ids, *_ = world
    kind, g = outcome(lambda: af.inject(fn, adapter))
    if kind == "ok":
        with torch.inference_mode():
            kind, out = outcome(lambda: g(params, input_ids=ids).logits)
        if kind == "ok":
            assert out.shape[-1] == model.config.vocab_size
    kind, merged = outcome(lambda: af.merge(params, adapter))
    kind, folder = outcome(lambda: af.save(adapter, tmp_path / "rt"))
    if kind == "ok":
        back = af.load(folder)
        a, b = af.state_dict(adapter), af.state_dict(back)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert back.config == adapter.config


@settings(max_examples=examples(200), **SETTINGS)
@given(data=st.data())
def test_config_fields_fuzz(world, tmp_path_factory, data):
    *_, ads, configs, sds, _ = world
    kind = data.draw(st.sampled_from(sorted(ads)))
    cfg = dict(configs[kind])
    changes = data.draw(st.dictionaries(st.sampled_from(_fields(kind)), json_values, min_size=1, max_size=3))
    cfg.update(changes)
    raw = json.dumps(cfg).encode()
    got, value = outcome(lambda: af_io.parse_config(raw, "fuzz/" + CONFIG))
    if got == "ok":
        method, config = value
        assert method.config_cls is type(config)
    got, adapter = outcome(lambda: af.from_state_dict(sds[kind], cfg))
    if got == "ok":
        use(world, adapter, tmp_path_factory.mktemp("cfg"))


DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool, torch.uint8,
          torch.float8_e4m3fn, torch.complex64]
SUFFIXES = ["lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "ia3_l", "lora_E", "lora_A",
            "lora_B", "weight", "bias", "base_layer.weight", "base_layer.bias"]


@st.composite
def mutated(draw, world):
    *_, ads, configs, sds, paths = world
    kind = draw(st.sampled_from(sorted(ads)))
    sd = dict(sds[kind])
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(sd)
        op = draw(st.sampled_from(["drop", "rename_suffix", "rename_module", "strip_prefix", "shape", "dtype",
                                   "transpose", "add", "scalar", "empty"]))
        k = draw(st.sampled_from(keys)) if keys else None
        if k is None:
            op = "add"
        if op == "drop":
            del sd[k]
        elif op == "rename_suffix":
            head = k[: k.rfind(".lora_") if ".lora_" in k else k.rfind(".")]
            sd[f"{head}.{draw(st.sampled_from(SUFFIXES))}"] = sd.pop(k)
        elif op == "rename_module":
            tail = k.rsplit(".", 2)[-2:] if k.endswith(".weight") else k.rsplit(".", 1)[-1:]
            sd[PREFIX + draw(st.sampled_from(paths)) + "." + ".".join(tail)] = sd.pop(k)
        elif op == "strip_prefix":
            sd[k[len(PREFIX):] if k.startswith(PREFIX) else PREFIX + k] = sd.pop(k)
        elif op == "shape":
            shape = draw(st.lists(st.integers(0, 40), max_size=3))
            sd[k] = torch.zeros(shape)
        elif op == "dtype":
            sd[k] = sd[k].to(draw(st.sampled_from(DTYPES)))
        elif op == "transpose" and sd[k].dim() == 2:
            sd[k] = sd[k].T
        elif op == "add":
            name = PREFIX + draw(st.sampled_from(paths)) + "." + draw(st.sampled_from(SUFFIXES))
            sd[name] = torch.randn(draw(st.lists(st.integers(1, 40), min_size=1, max_size=2)))
        elif op == "scalar":
            sd[k] = torch.tensor(draw(st.floats(allow_nan=True, allow_infinity=True)))
        elif op == "empty":
            sd = {}
    return kind, sd


@settings(max_examples=examples(200), **SETTINGS)
@given(data=st.data())
def test_state_dict_mutations_fuzz(world, tmp_path_factory, data):
    *_, configs, _, _ = world
    kind, sd = data.draw(mutated(world))
    got, adapter = outcome(lambda: af.from_state_dict(sd, configs[kind]))
    if got == "ok":
        use(world, adapter, tmp_path_factory.mktemp("sd"))


@settings(max_examples=examples(100), **SETTINGS)
@given(data=st.data())
def test_file_bytes_damage_fuzz(world, tmp_path_factory, data):
    """Flip, cut or insert bytes of either file of a saved adapter; af.load must return an adapter or raise
    typed."""
    *_, ads, _, _, _ = world
    kind = data.draw(st.sampled_from(sorted(ads)))
    folder = tmp_path_factory.mktemp("bytes")
    af.save(ads[kind], folder)
    name = data.draw(st.sampled_from([CONFIG, WEIGHTS]))
    path = os.path.join(folder, name)
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        i = data.draw(st.integers(0, max(0, len(blob) - 1)))
        if op == "flip" and blob:
            blob[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del blob[i: i + data.draw(st.integers(1, 16))]
        elif op == "insert":
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del blob[i:]
    with open(path, "wb") as f:
        f.write(bytes(blob))
    got, adapter = outcome(lambda: af.load(folder))
    if got == "ok":
        use(world, adapter, tmp_path_factory.mktemp("bytes_ok"))
