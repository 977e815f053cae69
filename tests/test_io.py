"""adaptfn.io: PEFT's adapter folder format, both ways (docs/design.md sections 1, 2 invariant 7 and 5).

Round trips, the safetensors metadata, unknown / unsupported config fields, dtype and device, every
kind of bad input (each a typed error naming the file / field / module / shapes, raised before any
work), atomic saves, and the multi-adapter layout read and written by PEFT too.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import pickle
import warnings

import pytest
import torch
from conftest import gen, ids_for, tiny_gpt2, tiny_opt
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptfn as af

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
CARD = "README.md"  # the model card af.save writes after the pair
BIN = "adapter_model.bin"
PREFIX = "base_model.model."
Q0 = "model.decoder.layers.0.self_attn.q_proj"  # a LoRA target of the default fixture adapter
K0 = "model.decoder.layers.0.self_attn.k_proj"  # not a target


# -- helpers -----------------------------------------------------------------------------------------
def lora(fn, seed=0, **kw):
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    cfg.update(kw)
    return af.init(fn, af.LoraConfig(**cfg), generator=gen(seed))


def sd_equal(a, b) -> bool:
    sa, sb = af.state_dict(a), af.state_dict(b)
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def edit_config(folder, **changes):
    cfg = read_json(os.path.join(folder, CONFIG))
    cfg.update(changes)
    write_json(os.path.join(folder, CONFIG), cfg)
    return cfg


def edit_weights(folder, add=None, drop=()):
    path = os.path.join(folder, WEIGHTS)
    sd = load_file(path)
    for k in drop:
        del sd[k]
    sd.update(add or {})
    save_file(sd, path, metadata={"format": "pt"})


def snapshot(folder):
    """{relative path: bytes} of every file under folder (temp files included)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = f.read()
    return out


def logits(g, params, ids):
    return g(params, input_ids=ids).logits


class Crash(RuntimeError):
    """Stands for a process interrupted in the middle of a save."""


@pytest.fixture
def setup():
    model = tiny_opt()
    fn, params = af.functional(model)
    return model, fn, params, ids_for(model)


@pytest.fixture
def saved(setup, tmp_path):
    """A good adapter saved in tmp_path/ad; returns (folder, adapter)."""
    _, fn, _, _ = setup
    a = lora(fn)
    folder = str(tmp_path / "ad")
    af.save(a, folder)
    return folder, a


@pytest.fixture
def no_weights_read(monkeypatch):
    """Records any read of a weights file; a config error must come before it."""
    import safetensors.torch as st

    calls = []
    real_load_file, real_torch_load = st.load_file, torch.load

    def spy_load_file(*a, **k):
        calls.append(("load_file", a))
        return real_load_file(*a, **k)

    def spy_torch_load(*a, **k):
        calls.append(("torch.load", a))
        return real_torch_load(*a, **k)

    monkeypatch.setattr(st, "load_file", spy_load_file)
    monkeypatch.setattr(torch, "load", spy_torch_load)
    return calls


# -- round trips -------------------------------------------------------------------------------------
def test_round_trip_identical_tensors_and_outputs(setup, tmp_path):
    _, fn, params, ids = setup
    a = lora(fn)
    out = af.save(a, tmp_path / "ad")
    assert os.path.samefile(out, tmp_path / "ad")
    assert sorted(os.listdir(tmp_path / "ad")) == [CARD, CONFIG, WEIGHTS]
    b = af.load(tmp_path / "ad")
    assert isinstance(b, af.Adapter)
    assert sd_equal(a, b)
    assert b.config == a.config
    assert dict(b.entries) == dict(a.entries)
    assert torch.equal(logits(af.inject(fn, b), params, ids), logits(af.inject(fn, a), params, ids))
    # and it really is adapted (init_lora_weights=False: B is not zero)
    assert not torch.equal(logits(af.inject(fn, b), params, ids), logits(fn, params, ids))


def test_file_layout_keys_shapes_and_metadata(saved):
    folder, a = saved
    with safe_open(os.path.join(folder, WEIGHTS), "pt") as f:
        # PEFT's {"format": "pt"}, plus the hash of the config it was saved with (PEFT ignores metadata)
        with open(os.path.join(folder, CONFIG), "rb") as c:
            assert f.metadata() == {"format": "pt", "adaptfn.config_sha256": hashlib.sha256(c.read()).hexdigest()}
        keys = set(f.keys())
        a_shape = f.get_tensor(f"{PREFIX}{Q0}.lora_A.weight").shape
        b_shape = f.get_tensor(f"{PREFIX}{Q0}.lora_B.weight").shape
    assert keys == set(af.state_dict(a))
    assert keys == {f"{PREFIX}model.decoder.layers.{i}.self_attn.{m}.lora_{x}.weight"
                    for i in (0, 1) for m in ("q_proj", "v_proj") for x in "AB"}
    assert tuple(a_shape) == (4, 22) and tuple(b_shape) == (22, 4)  # [r, in], [out, r]
    cfg = read_json(os.path.join(folder, CONFIG))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_round_trip_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D stores weights [in, out]; attn.c_proj is square, so only fan_in_fan_out tells the merge
    to transpose. The reloaded adapter must merge exactly as the saved one did."""
    model = tiny_gpt2()
    fn, params = af.functional(model)
    ids = ids_for(model)
    a = af.init(fn, af.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_proj"], init_lora_weights=False),
                generator=gen(3))
    af.save(a, tmp_path)
    b = af.load(tmp_path)
    assert sd_equal(a, b)
    want = logits(af.inject(fn, a), params, ids)
    assert torch.equal(logits(af.inject(fn, b), params, ids), want)
    torch.testing.assert_close(logits(fn, af.merge(params, a), ids), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(fn, af.merge(params, b), ids), want, rtol=1e-5, atol=1e-5)
    assert dict(b.entries) == dict(a.entries)


def test_round_trip_rank_alpha_pattern_and_modules_to_save(setup, tmp_path):
    _, fn, params, ids = setup
    a = lora(fn, seed=5, target_modules=["q_proj", "v_proj", "fc1"], rank_pattern={"fc1": 2},
             alpha_pattern={"v_proj": 3}, modules_to_save=["fc2"], use_rslora=True)
    af.save(a, tmp_path)
    keys = set(load_file(os.path.join(tmp_path, WEIGHTS)))
    assert f"{PREFIX}model.decoder.layers.1.fc2.weight" in keys
    assert load_file(os.path.join(tmp_path, WEIGHTS))[f"{PREFIX}model.decoder.layers.0.fc1.lora_A.weight"].shape[0] == 2
    b = af.load(tmp_path)
    assert sd_equal(a, b)
    assert b.entries["model.decoder.layers.0.fc1"].r == 2
    assert math.isclose(b.entries["model.decoder.layers.0.self_attn.v_proj"].scaling, 3 / math.sqrt(4))
    assert torch.equal(logits(af.inject(fn, b), params, ids), logits(af.inject(fn, a), params, ids))
    assert dict(b.entries) == dict(a.entries)


def test_reloaded_adapter_has_the_same_structure(setup, tmp_path):
    """Invariant 3: a saved-and-loaded adapter has the structure of the original, so the two stack (and
    switching between them under torch.compile does not recompile)."""
    _, fn, params, ids = setup
    a = lora(fn, modules_to_save=["fc2"])
    af.save(a, tmp_path)
    b = af.load(tmp_path)
    assert b.structure_key == a.structure_key
    other = lora(fn, seed=4, modules_to_save=["fc2"])
    stacked = af.stack([b, other])
    back = af.unstack(stacked)
    assert sd_equal(back[0], a) and sd_equal(back[1], other)


def test_save_overwrites_previous_adapter(setup, saved):
    _, fn, _, _ = setup
    folder, _ = saved
    new = lora(fn, seed=9)
    af.save(new, folder)
    assert sd_equal(af.load(folder), new)
    assert sorted(os.listdir(folder)) == [CARD, CONFIG, WEIGHTS]



def test_save_closes_every_file_it_opens(setup, tmp_path):
    _, fn, _, _ = setup
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        af.save(lora(fn), tmp_path / "ad")  # a new folder: the config is written (not kept)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]

# -- config fields -----------------------------------------------------------------------------------
def test_unknown_config_fields_are_kept_and_written_back(saved, tmp_path):
    folder, a = saved
    future = {"some_future_field": 3, "another_future_field": {"nested": [1, 2.5, None]}, "future_none": None}
    written = edit_config(folder, **future)
    b = af.load(folder)
    assert sd_equal(a, b)
    af.save(b, tmp_path / "again")
    again = read_json(tmp_path / "again" / CONFIG)
    for k, v in future.items():
        assert k in again and again[k] == v
    assert again == written  # nothing dropped, nothing changed
    # a second generation keeps them too
    af.save(af.load(tmp_path / "again"), tmp_path / "third")
    assert read_json(tmp_path / "third" / CONFIG) == written


def test_peft_written_config_round_trips_unchanged(tmp_path):
    import peft

    pm = peft.get_peft_model(tiny_opt(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    orig = read_json(tmp_path / "peft" / CONFIG)
    af.save(af.load(tmp_path / "peft"), tmp_path / "ours")
    assert read_json(tmp_path / "ours" / CONFIG) == orig


@pytest.mark.parametrize("field,value", [
    ("init_lora_weights", "mica"),
    ("init_lora_weights", "lora_ga"),
    ("layer_replication", [[0, 1]]),
    ("kasa_config", {"k": 1}),
])
def test_unsupported_numerics_fields_raise_config_error(saved, no_weights_read, field, value):
    folder, _ = saved
    edit_config(folder, **{field: value})
    with pytest.raises(af.ConfigError) as ei:
        af.load(folder)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, af.AdaptfnError)
    assert field in str(ei.value)
    assert no_weights_read == []


def test_supported_off_values_of_unsupported_fields_load(saved):
    folder, a = saved
    edit_config(folder, use_dora=False, layer_replication=None, init_lora_weights=True)
    assert sd_equal(af.load(folder), a)


# -- dtype / device ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_load_dtype(saved, dtype, tmp_path):
    folder, a = saved
    b = af.load(folder, dtype=dtype)
    ref = af.state_dict(a)
    got = af.state_dict(b)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == dtype
        assert torch.equal(got[k], ref[k].to(dtype))
    # and the dtype survives a save
    af.save(b, tmp_path / "d")
    assert {t.dtype for t in load_file(tmp_path / "d" / WEIGHTS).values()} == {dtype}
    assert {t.dtype for t in af.state_dict(af.load(tmp_path / "d")).values()} == {dtype}


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_load_device(saved, device):
    folder, a = saved
    b = af.load(folder, device=device)
    assert all(t.device == torch.device("cpu") for t in af.state_dict(b).values())
    assert sd_equal(a, b)


def test_load_dtype_keeps_outputs_close(setup, saved):
    _, fn, params, ids = setup
    folder, a = saved
    b = af.load(folder, dtype=torch.float64)
    torch.testing.assert_close(logits(af.inject(fn, b), params, ids), logits(af.inject(fn, a), params, ids),
                               rtol=1e-5, atol=1e-5)


# -- bad input: config -------------------------------------------------------------------------------
def test_missing_config(saved):
    folder, _ = saved
    os.remove(os.path.join(folder, CONFIG))
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    assert isinstance(ei.value, OSError)
    assert CONFIG in str(ei.value) and folder in str(ei.value)


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(af.AdapterFileError, match=CONFIG):
        af.load(tmp_path)
    missing = str(tmp_path / "does-not-exist")
    with pytest.raises(af.AdapterFileError, match="does-not-exist"):
        af.load(missing)


def test_missing_weights(saved):
    folder, _ = saved
    os.remove(os.path.join(folder, WEIGHTS))
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    assert WEIGHTS in str(ei.value) and folder in str(ei.value)


@pytest.mark.parametrize("text", ['{"peft_type": "LORA", "r": 4,', "not json at all", "", '{"r": 4} trailing'])
def test_malformed_json(saved, no_weights_read, text):
    folder, _ = saved
    with open(os.path.join(folder, CONFIG), "w") as f:
        f.write(text)
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    assert os.path.join(folder, CONFIG) in str(ei.value)
    assert no_weights_read == []


def test_json_not_an_object(saved, no_weights_read):
    folder, _ = saved
    write_json(os.path.join(folder, CONFIG), [1, 2])
    with pytest.raises(af.AdaptfnError) as ei:
        af.load(folder)
    assert isinstance(ei.value, (af.AdapterFileError, af.ConfigError))
    assert CONFIG in str(ei.value)
    assert no_weights_read == []


def test_missing_peft_type(saved, no_weights_read):
    folder, _ = saved
    cfg = read_json(os.path.join(folder, CONFIG))
    del cfg["peft_type"]
    write_json(os.path.join(folder, CONFIG), cfg)
    with pytest.raises(af.ConfigError) as ei:
        af.load(folder)
    assert "peft_type" in str(ei.value) and CONFIG in str(ei.value)
    assert no_weights_read == []


@pytest.mark.parametrize("peft_type", ["NOT_A_METHOD", None, 3])
def test_unknown_peft_type(saved, no_weights_read, peft_type):
    folder, _ = saved
    edit_config(folder, peft_type=peft_type)
    with pytest.raises(af.ConfigError) as ei:
        af.load(folder)
    assert "peft_type" in str(ei.value) and repr(peft_type) in str(ei.value) and CONFIG in str(ei.value)
    assert no_weights_read == []


@pytest.mark.parametrize("field,value", [("r", 0), ("r", "four"), ("lora_dropout", 1.5), ("bias", "some")])
def test_bad_field_values(saved, no_weights_read, field, value):
    folder, _ = saved
    edit_config(folder, **{field: value})
    with pytest.raises(af.ConfigError) as ei:
        af.load(folder)
    assert field in str(ei.value)
    assert no_weights_read == []


# -- bad input: weights ------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"\xff" * 64,
                                     (10 ** 6).to_bytes(8, "little") + b'{"x": 1}',
                                     (8).to_bytes(8, "little") + b"{garbage"])
def test_corrupt_safetensors(saved, content):
    folder, _ = saved
    path = os.path.join(folder, WEIGHTS)
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    assert path in str(ei.value)


@pytest.mark.parametrize("keep", [1, 8, 20, 0.5, -1])
def test_truncated_safetensors(saved, keep):
    folder, _ = saved
    path = os.path.join(folder, WEIGHTS)
    size = os.path.getsize(path)
    n = int(size * keep) if isinstance(keep, float) else (size + keep if keep < 0 else keep)
    with open(path, "r+b") as f:
        f.truncate(n)
    assert os.path.getsize(path) == n < size
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    assert path in str(ei.value)


def test_safetensors_with_wrong_key_prefix(saved):
    folder, a = saved
    sd = {k[len(PREFIX):]: v for k, v in af.state_dict(a).items()}
    save_file(sd, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    assert WEIGHTS in str(ei.value) and Q0 in str(ei.value)


def test_stray_lora_key_for_untargeted_module(saved):
    folder, _ = saved
    edit_weights(folder, add={f"{PREFIX}{K0}.lora_A.weight": torch.zeros(4, 22),
                              f"{PREFIX}{K0}.lora_B.weight": torch.zeros(22, 4)})
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    assert K0 in str(ei.value) and WEIGHTS in str(ei.value)


@pytest.mark.parametrize("key", ["model.decoder.layers.0.mystery.weight", f"{Q0}.lora_C.weight", "lm_head.weight"])
def test_stray_key_matching_no_target(saved, key):
    folder, _ = saved
    edit_weights(folder, add={PREFIX + key: torch.zeros(3)})
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    assert PREFIX + key in str(ei.value) and WEIGHTS in str(ei.value)


def test_half_a_lora_pair(saved):
    folder, _ = saved
    edit_weights(folder, drop=[f"{PREFIX}{Q0}.lora_B.weight"])
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    assert Q0 in str(ei.value) and "lora_B" in str(ei.value)


def test_lora_pair_shapes_disagree(saved):
    folder, _ = saved
    edit_weights(folder, add={f"{PREFIX}{Q0}.lora_B.weight": torch.zeros(22, 3)})
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    msg = str(ei.value)
    assert Q0 in msg and "[4, 22]" in msg and "[22, 3]" in msg


def test_rank_mismatch_with_r(saved):
    folder, _ = saved
    edit_config(folder, r=2)
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    msg = str(ei.value)
    assert "model.decoder.layers." in msg and "rank 4" in msg and "r=2" in msg


def test_rank_mismatch_with_rank_pattern(saved):
    folder, _ = saved
    edit_config(folder, rank_pattern={"v_proj": 3})
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    msg = str(ei.value)
    assert "v_proj" in msg and "rank 4" in msg and "r=3" in msg


# -- pickles ------------------------------------------------------------------------------------------
def to_bin(folder, obj):
    os.remove(os.path.join(folder, WEIGHTS))
    torch.save(obj, os.path.join(folder, BIN))


def test_bin_refused_without_allow_pickle(saved, no_weights_read):
    folder, a = saved
    to_bin(folder, af.state_dict(a))
    with pytest.raises(af.AdapterFileError) as ei:
        af.load(folder)
    assert BIN in str(ei.value) and "allow_pickle" in str(ei.value) and folder in str(ei.value)
    assert no_weights_read == []


def test_bin_loads_with_allow_pickle_via_weights_only(setup, saved, monkeypatch):
    _, fn, params, ids = setup
    folder, a = saved
    to_bin(folder, af.state_dict(a))
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    b = af.load(folder, allow_pickle=True)
    assert seen == [True]
    assert sd_equal(a, b)
    assert torch.equal(logits(af.inject(fn, b), params, ids), logits(af.inject(fn, a), params, ids))


def test_safetensors_preferred_over_bin(setup, saved):
    _, fn, _, _ = setup
    folder, a = saved
    torch.save(af.state_dict(lora(fn, seed=7)), os.path.join(folder, BIN))
    assert sd_equal(af.load(folder, allow_pickle=True), a)
    assert sd_equal(af.load(folder), a)


class _WritesMarker:
    """Unpickling this object would create a file: code execution."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("payload", ["code", "callable", "int", "string", "list", "nested"])
def test_unsafe_or_non_tensor_pickle_refused_even_with_allow_pickle(saved, tmp_path, payload):
    folder, a = saved
    marker = str(tmp_path / "pwned")
    key = f"{PREFIX}{Q0}.lora_A.weight"
    sd = dict(af.state_dict(a))
    sd[key] = {
        "code": _WritesMarker(marker),
        "callable": torch.nn.functional.relu,
        "int": 3,
        "string": "x",
        "list": [torch.zeros(4, 22)],
        "nested": {"w": torch.zeros(4, 22)},
    }[payload]
    to_bin(folder, sd)
    for allow in (False, True):
        with pytest.raises(af.AdapterFileError) as ei:
            af.load(folder, allow_pickle=allow)
        assert BIN in str(ei.value)
    assert not os.path.exists(marker)


def test_raw_pickle_with_reduce_refused(saved, tmp_path):
    folder, _ = saved
    marker = str(tmp_path / "pwned")
    os.remove(os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, BIN), "wb") as f:
        pickle.dump({"k": _WritesMarker(marker)}, f, protocol=2)
    with pytest.raises(af.AdapterFileError, match=BIN):
        af.load(folder, allow_pickle=True)
    assert not os.path.exists(marker)


def test_truncated_bin(saved):
    folder, a = saved
    to_bin(folder, af.state_dict(a))
    path = os.path.join(folder, BIN)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(af.AdapterFileError, match=BIN):
        af.load(folder, allow_pickle=True)


# -- adapter vs model --------------------------------------------------------------------------------
def test_inject_target_modules_absent_from_model(saved):
    folder, _ = saved
    a = af.load(folder)  # an OPT adapter: loading needs no model
    fn, _ = af.functional(tiny_gpt2())
    with pytest.raises(af.IncompatibleAdapterError) as ei:
        af.inject(fn, a)
    assert isinstance(ei.value, ValueError)
    assert "model.decoder.layers.0.self_attn" in str(ei.value)


def test_inject_shapes_disagree(saved):
    folder, _ = saved
    a = af.load(folder)  # hidden 22
    fn, _ = af.functional(tiny_opt(hidden=30))
    with pytest.raises(af.IncompatibleAdapterError) as ei:
        af.inject(fn, a)
    msg = str(ei.value)
    assert "model.decoder.layers." in msg and "_proj" in msg
    assert "[4, 22]" in msg and "30" in msg  # the adapter's shape and the model's size


def test_inject_replacement_shapes_disagree(setup, tmp_path):
    _, fn, _, _ = setup
    a = lora(fn, modules_to_save=["fc2"])  # fc2 weight [22, 37]
    af.save(a, tmp_path)
    b = af.load(tmp_path)
    fn2, _ = af.functional(tiny_opt(ffn=41))
    with pytest.raises(af.IncompatibleAdapterError) as ei:
        af.inject(fn2, b)
    msg = str(ei.value)
    assert "fc2" in msg and "[22, 37]" in msg and "[22, 41]" in msg


# -- adapter names -----------------------------------------------------------------------------------
BAD_NAMES = ["../x", "a/b", "..", ".", "", "/abs", "a\\b", "../../etc"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_save_adapter_name_cannot_escape(setup, tmp_path, name):
    _, fn, _, _ = setup
    a = lora(fn)
    folder = tmp_path / "root" / "ad"
    with pytest.raises(af.ConfigError) as ei:
        af.save(a, folder, adapter_name=name)
    assert "adapter_name" in str(ei.value)
    assert snapshot(tmp_path) == {}
    with pytest.raises(af.ConfigError):
        af.save({"default": a, name: a}, folder)
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("name", BAD_NAMES)
def test_load_adapter_name_cannot_escape(saved, tmp_path, name, no_weights_read):
    folder, _ = saved
    inner = os.path.join(folder, "inner")
    af.save(af.load(folder), inner)  # something a "../" would reach from inner
    no_weights_read.clear()
    with pytest.raises(af.ConfigError) as ei:
        af.load(inner, adapter_name=name)
    assert "adapter_name" in str(ei.value)
    assert no_weights_read == []


@pytest.mark.parametrize("sub", ["../ad", "x/../../ad", "/abs"])
def test_load_subfolder_cannot_escape(saved, sub):
    folder, _ = saved
    inner = os.path.join(folder, "inner")
    os.makedirs(inner)
    with pytest.raises(af.ConfigError, match="subfolder"):
        af.load(inner, subfolder=sub)


# -- atomic saves (invariant 7) ------------------------------------------------------------------------
def _interrupt(monkeypatch, stage):
    """Make the next save stop (raise Crash) at ``stage``: part-way through writing the weights or the config
    temp file, at the first / second rename, or while syncing the config. (tests/test_reliability.py stops a
    save before every one of its file operations in turn, and kills real processes.)"""
    if stage in ("save_file", "config_text"):
        real_write, calls = os.write, []

        def write(fd, data):
            calls.append(fd)
            if len(calls) == (1 if stage == "save_file" else 2):
                real_write(fd, bytes(data[: len(data) // 2]))
                raise Crash(f"interrupted while writing the {'weights' if stage == 'save_file' else 'config'}")
            return real_write(fd, data)
        monkeypatch.setattr(os, "write", write)
    elif stage.startswith("replace"):
        fail_at = {"replace_weights": 1, "replace_config": 2}[stage]
        real, calls = os.replace, []

        def replace(src, dst, *a, **k):
            calls.append(dst)
            if len(calls) == fail_at:
                raise Crash(f"interrupted at os.replace #{fail_at}")
            return real(src, dst, *a, **k)
        monkeypatch.setattr(os, "replace", replace)
    elif stage == "fsync_config":
        real_fsync, calls = os.fsync, []

        def fsync(fd):
            calls.append(fd)
            if len(calls) == 2:
                raise Crash("interrupted while syncing the config")
            return real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize(("stage", "config_changes"), [
    ("save_file", False), ("replace_weights", False),  # same config: a single atomic rename of the weights
    ("save_file", True), ("fsync_config", True), ("config_text", True), ("replace_weights", True),
    ("replace_config", True),
])
def test_interrupted_save_leaves_previous_adapter(setup, saved, monkeypatch, stage, config_changes):
    _, fn, _, _ = setup
    folder, old = saved
    before = snapshot(folder)
    # same structure, other values; and where config_changes, another config too
    new = lora(fn, seed=11, lora_alpha=5) if config_changes else lora(fn, seed=11)
    with monkeypatch.context() as m:
        _interrupt(m, stage)
        with pytest.raises(Crash):
            af.save(new, folder)
    assert sd_equal(af.load(folder), old), "the previous adapter was not left intact (new values were loaded)"
    assert sorted(snapshot(folder)) == [CARD, CONFIG, WEIGHTS], "temp files left behind"
    assert snapshot(folder) == before


def test_interrupted_save_into_new_folder_leaves_no_files(setup, tmp_path, monkeypatch):
    _, fn, _, _ = setup
    folder = tmp_path / "fresh"
    with monkeypatch.context() as m:
        _interrupt(m, "save_file")
        with pytest.raises(Crash):
            af.save(lora(fn), folder)
    assert snapshot(tmp_path) == {}
    with pytest.raises(af.AdapterFileError):
        af.load(folder)


def test_invalid_adapter_writes_nothing(setup, saved, tmp_path):
    _, fn, _, _ = setup
    folder, old = saved
    before = snapshot(folder)
    with_repl = lora(fn, modules_to_save=["fc2"])
    masked = af.mask(with_repl, False)  # a masked-off replacement cannot be written in PEFT's format
    with pytest.raises(af.ConfigError):
        af.save(masked, folder)
    assert snapshot(folder) == before
    with pytest.raises(af.ConfigError):
        af.save(masked, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    stacked = af.stack([old, lora(fn, seed=3)])
    with pytest.raises(af.ConfigError):
        af.save(stacked, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(af.ConfigError):
        af.save("not an adapter", tmp_path / "new")  # type: ignore[arg-type]
    assert not (tmp_path / "new").exists()
    assert sd_equal(af.load(folder), old)


def test_invalid_adapter_in_mapping_writes_nothing(setup, tmp_path):
    """``save`` checks everything before writing anything: a bad member of a mapping stops the whole save."""
    _, fn, _, _ = setup
    good = lora(fn)
    bad = af.mask(lora(fn, modules_to_save=["fc2"]), False)
    with pytest.raises(af.ConfigError):
        af.save({"default": good, "zz_bad": bad}, tmp_path / "multi")
    assert snapshot(tmp_path) == {}


# -- several adapters --------------------------------------------------------------------------------
@pytest.fixture
def multi(setup, tmp_path):
    _, fn, _, _ = setup
    a = lora(fn, seed=1)
    b = lora(fn, seed=2, r=2, lora_alpha=4, target_modules=["k_proj", "fc1"])
    folder = str(tmp_path / "multi")
    af.save({"default": a, "other": b}, folder)
    return folder, a, b


def test_save_several_layout(multi):
    folder, a, b = multi
    assert sorted(os.listdir(folder)) == [CARD, CONFIG, WEIGHTS, "other"]  # one card, at the root (as PEFT)
    assert sorted(os.listdir(os.path.join(folder, "other"))) == [CONFIG, WEIGHTS]
    assert sd_equal(af.load(folder), a)
    assert sd_equal(af.load(folder, adapter_name="default"), a)
    assert sd_equal(af.load(folder, adapter_name="other"), b)
    assert sd_equal(af.load(folder, subfolder="other"), b)
    assert sd_equal(af.load(os.path.join(folder, "other")), b)


def test_save_with_adapter_name(setup, tmp_path):
    _, fn, _, _ = setup
    a = lora(fn)
    out = af.save(a, tmp_path, adapter_name="named")
    assert os.path.samefile(out, tmp_path / "named")
    assert sorted(snapshot(tmp_path)) == [f"named/{CARD}", f"named/{CONFIG}", f"named/{WEIGHTS}"]
    assert sd_equal(af.load(tmp_path, adapter_name="named"), a)
    af.save(a, tmp_path / "d", adapter_name="default")
    assert sorted(os.listdir(tmp_path / "d")) == [CARD, CONFIG, WEIGHTS]


def test_peft_loads_what_adaptfn_saves(setup, multi):
    from peft import PeftModel

    _, fn, params, ids = setup
    folder, a, b = multi
    want_a = logits(af.inject(fn, af.load(folder)), params, ids)
    want_b = logits(af.inject(fn, af.load(folder, adapter_name="other")), params, ids)
    assert not torch.allclose(want_a, want_b)

    pm = PeftModel.from_pretrained(tiny_opt(), folder).eval()
    pm.load_adapter(folder, adapter_name="other", subfolder="other")
    with torch.no_grad():
        got_a = pm(input_ids=ids).logits
        pm.set_adapter("other")
        got_b = pm(input_ids=ids).logits
    torch.testing.assert_close(got_a, want_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_b, want_b, rtol=1e-5, atol=1e-6)

    pm2 = PeftModel.from_pretrained(tiny_opt(), folder, adapter_name="other", subfolder="other").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm2(input_ids=ids).logits, want_b, rtol=1e-5, atol=1e-6)
    pm3 = PeftModel.from_pretrained(tiny_opt(), os.path.join(folder, "other")).eval()
    pm3.load_adapter(folder, adapter_name="second")
    with torch.no_grad():
        torch.testing.assert_close(pm3(input_ids=ids).logits, want_b, rtol=1e-5, atol=1e-6)
        pm3.set_adapter("second")
        torch.testing.assert_close(pm3(input_ids=ids).logits, want_a, rtol=1e-5, atol=1e-6)


def test_adaptfn_loads_what_peft_saves_with_several_adapters(setup, tmp_path):
    import peft

    _, fn, params, ids = setup
    pm = peft.get_peft_model(tiny_opt(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["fc1"], init_lora_weights=False))
    pm.eval()
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "second" / CONFIG).is_file()
    with torch.no_grad():
        ref_default = pm(input_ids=ids).logits
        pm.set_adapter("second")
        ref_second = pm(input_ids=ids).logits
    got_default = logits(af.inject(fn, af.load(tmp_path)), params, ids)
    got_second = logits(af.inject(fn, af.load(tmp_path, adapter_name="second")), params, ids)
    torch.testing.assert_close(got_default, ref_default, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_second, ref_second, rtol=1e-5, atol=1e-6)


# -- the model card ---------------------------------------------------------------------------------------
def test_save_writes_a_card_and_never_replaces_the_users(setup, tmp_path):
    """af.save writes README.md (PEFT's save_pretrained does too); it replaces only its own unedited card."""
    from huggingface_hub import ModelCard

    _, fn, _, _ = setup
    a, b = lora(fn), lora(fn, seed=5, r=3)
    folder = tmp_path / "carded"
    af.save(a, folder)
    first = (folder / CARD).read_text()
    card = ModelCard(first)
    assert card.data.library_name == "peft" and "adaptfn" in card.data.tags
    assert "| rank | 4 |" in first and first.rstrip().endswith("while it is unedited -->")
    af.save(b, folder)  # adaptfn's own unedited card follows the adapter
    assert "| rank | 3 |" in (folder / CARD).read_text()
    edited = (folder / CARD).read_text().replace("## How to load", "## How to load (my notes)")
    (folder / CARD).write_text(edited)
    af.save(a, folder)
    assert (folder / CARD).read_text() == edited  # an edited card is the user's now
    (folder / CARD).write_text("# mine\n")
    af.save(b, folder)
    assert (folder / CARD).read_text() == "# mine\n" and sd_equal(af.load(folder), b)
    bare = tmp_path / "bare"
    af.save(a, bare, model_card=False)
    assert sorted(os.listdir(bare)) == [CONFIG, WEIGHTS]
    for bad in ("yes", 1, None):
        with pytest.raises(af.ConfigError, match="model_card"):
            af.save(a, tmp_path / "x", model_card=bad)
    assert not (tmp_path / "x").exists()


def test_adapter_model_save_pretrained_writes_one_card_at_the_root(setup, tmp_path):
    _, fn, _, _ = setup
    m = af.AdapterModel(tiny_opt())
    m.load_adapter(peft_config=lora(fn).config, adapter_state_dict=af.state_dict(lora(fn)), adapter_name="one")
    m.load_adapter(peft_config=lora(fn, seed=4).config, adapter_state_dict=af.state_dict(lora(fn, seed=4)),
                   adapter_name="two")
    m.set_adapter("two")
    m.save_pretrained(tmp_path / "sp")
    assert sorted(os.listdir(tmp_path / "sp")) == [CARD, CONFIG, WEIGHTS, "one"]
    assert sorted(os.listdir(tmp_path / "sp" / "one")) == [CONFIG, WEIGHTS]
    text = (tmp_path / "sp" / CARD).read_text()
    assert "Adapter `two` (root folder)" in text and "Adapter `one` (sub-folder `one/`)" in text


def test_card_of_a_mapping_without_default_names_the_sub_folders_and_cleans_the_root(setup, tmp_path):
    """``af.save({"a": ..., "b": ...})`` puts both in sub-folders: the root's card says so, and the save removes a
    stale temp file a killed card write left at the root."""
    from adaptfn import _files

    _, fn, _, _ = setup
    root = tmp_path / "two"
    root.mkdir()
    stale = root / f".README.md.{_files._host()}-999999-1-deadbeef.tmp"  # a dead writer's temp file
    stale.write_text("half a card")
    af.save({"a": lora(fn), "b": lora(fn, seed=3)}, root)
    assert sorted(os.listdir(root)) == [CARD, "a", "b"]
    text = (root / CARD).read_text()
    assert "(root folder)" not in text and "Adapter `a` (sub-folder `a/`)" in text
    assert 'adapter_name="a")' in text and 'subfolder="a")' in text and "af.from_pretrained" not in text
    assert sd_equal(af.load(root, adapter_name="a"), lora(fn))
