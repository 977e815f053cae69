"""adaptfn._safetensors: the descriptor reader af.load uses for the tensors of an adapter folder.

It must give exactly what the safetensors package gives (dtype, shape, values) for every plain file, each tensor
in its own storage, and hand anything unusual back to the package (None), so that every error stays the
package's, typed by adaptfn as before."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaptfn as af
from adaptfn import _safetensors

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def _read(path: str) -> dict[str, torch.Tensor] | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        n, header, plain = _safetensors.read_header(fd, path)
        return _safetensors.read_data(fd, n, header, plain, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        return x.round().clamp(-100, 100).to(dtype) if dtype != torch.uint8 else x.abs().round().to(dtype)
    return x.to(dtype)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].dim() else a[k].reshape(1).view(torch.uint8),
                           b[k].view(torch.uint8) if b[k].dim() else b[k].reshape(1).view(torch.uint8)), k


def test_every_dtype_and_odd_shapes_equal_the_package(tmp_path):
    sd = {}
    shapes = [(11, 7), (19,), (), (3, 0, 5), (2, 3, 5, 7), (1,)]
    for i, dt in enumerate(ALL_DTYPES):
        for j, shape in enumerate(shapes):
            sd[f"m{i}.t{j}"] = _tensor(dt, shape, 100 * i + j)
    path = str(tmp_path / "w.safetensors")
    safetensors.torch.save_file(sd, path, metadata={"format": "pt"})
    got = _read(path)
    assert got is not None
    _same(got, safetensors.torch.load_file(path))
    # each tensor owns its storage: writing one changes no other, and nothing is shared with a file map
    ptrs = {t.untyped_storage().data_ptr() for t in got.values() if t.numel()}
    assert len(ptrs) == sum(1 for t in got.values() if t.numel())
    before = {k: t.clone() for k, t in got.items()}
    got["m0.t0"].add_(1)
    for k, t in got.items():
        if k != "m0.t0":
            assert torch.equal(t, before[k])
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in got.values())


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(ALL_DTYPES), st.lists(st.integers(0, 6), max_size=3)), min_size=1,
                max_size=8), st.integers(0, 2**16))
def test_random_files_equal_the_package(tmp_path, specs, seed):
    sd = {f"k{i}": _tensor(dt, tuple(shape), seed + i) for i, (dt, shape) in enumerate(specs)}
    path = str(tmp_path / f"r{seed}.safetensors")
    safetensors.torch.save_file(sd, path)
    got = _read(path)
    assert got is not None
    _same(got, safetensors.torch.load_file(path))


def _raw_file(path: str, header: dict | str, data: bytes) -> None:
    text = header if isinstance(header, str) else json.dumps(header)
    h = text.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("case", ["duplicate key", "unknown dtype", "gap", "overlap", "trailing bytes", "size",
                                  "extra field", "negative dim", "float shape", "metadata not str", "not a dict"])
def test_unusual_files_are_left_to_the_package(tmp_path, case):
    data = bytes(range(48))
    ok = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
          "b": {"dtype": "F32", "shape": [6], "data_offsets": [24, 48]}}
    header: dict | str = ok
    if case == "duplicate key":
        header = json.dumps(ok)[:-1] + ', "a": {"dtype": "F32", "shape": [6], "data_offsets": [24, 48]}}'
    elif case == "unknown dtype":
        header = {**ok, "b": {"dtype": "C64", "shape": [3], "data_offsets": [24, 48]}}
    elif case == "gap":
        header = {**ok, "b": {"dtype": "F32", "shape": [5], "data_offsets": [28, 48]}}
    elif case == "overlap":
        header = {**ok, "b": {"dtype": "F32", "shape": [7], "data_offsets": [20, 48]}}
    elif case == "trailing bytes":
        data += b"\0" * 8
    elif case == "size":
        header = {**ok, "b": {"dtype": "F32", "shape": [5], "data_offsets": [24, 48]}}
    elif case == "extra field":
        header = {**ok, "b": {"dtype": "F32", "shape": [6], "data_offsets": [24, 48], "x": 1}}
    elif case == "negative dim":
        header = {**ok, "b": {"dtype": "F32", "shape": [-6], "data_offsets": [24, 48]}}
    elif case == "float shape":
        header = {**ok, "b": {"dtype": "F32", "shape": [6.0], "data_offsets": [24, 48]}}
    elif case == "metadata not str":
        header = {**ok, "__metadata__": {"format": 1}}
    elif case == "not a dict":
        header = "[1, 2]"
    path = str(tmp_path / "w.safetensors")
    _raw_file(path, header, data)
    assert _read(path) is None


def test_a_plain_handwritten_file_is_read(tmp_path):
    x = torch.arange(12, dtype=torch.float32)
    header = {"__metadata__": {"format": "pt"}, "b": {"dtype": "F32", "shape": [6], "data_offsets": [24, 48]},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    path = str(tmp_path / "w.safetensors")
    _raw_file(path, header, x.numpy().tobytes())
    got = _read(path)
    assert got is not None and torch.equal(got["a"], x[:6].view(2, 3)) and torch.equal(got["b"], x[6:])


def _folder(tmp_path, name: str = "a"):
    cfg = af.LoraConfig(r=3, lora_alpha=6, target_modules=["q", "v"], init_lora_weights=False)
    g = torch.Generator().manual_seed(0)
    sd = {f"base_model.model.blk.{m}.lora_{ab}.weight": torch.randn(shape, generator=g)
          for m, (ai, bo) in {"q": (11, 7), "v": (11, 19)}.items() for ab, shape in (("A", (3, ai)), ("B", (bo, 3)))}
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg.to_dict()))
    safetensors.torch.save_file(sd, str(d / "adapter_model.safetensors"))
    return str(d), sd


def test_af_load_reads_through_the_descriptor_and_equals_the_package_path(tmp_path, monkeypatch):
    d, sd = _folder(tmp_path)
    calls = []
    real = _safetensors.read_data

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_safetensors, "read_data", spy)
    direct = af.load(d)
    assert calls == [True]
    monkeypatch.setattr(_safetensors, "read_data", lambda *a, **k: None)  # the package's path
    package = af.load(d)
    assert direct.paths == package.paths == ("blk.q", "blk.v")
    for p in direct.paths:
        for n in ("lora_A", "lora_B"):
            assert torch.equal(direct.tensors[p][n], package.tensors[p][n])
            assert torch.equal(direct.tensors[p][n], sd[f"base_model.model.{p}.{n}.weight"])


@pytest.mark.parametrize("how", ["short read", "no preadv"])
def test_af_load_falls_back_to_the_package(tmp_path, monkeypatch, how):
    d, sd = _folder(tmp_path)
    if how == "short read":
        real = os.preadv
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, bufs, off) - 1)
    else:
        monkeypatch.delattr(os, "preadv")
    a = af.load(d)
    assert torch.equal(a.tensors["blk.v"]["lora_B"], sd["base_model.model.blk.v.lora_B.weight"])


def test_an_io_error_while_reading_is_typed(tmp_path, monkeypatch):
    import errno

    d, _ = _folder(tmp_path)

    def fail(fd, bufs, off):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", fail)
    with pytest.raises(af.AdapterFileError, match="adapter_model.safetensors"):
        af.load(d)


def test_configs_parsed_once_are_copies_of_their_own(tmp_path):
    """Byte-identical configs are parsed once, but each load gets its own config: changing one loaded
    adapter's (mutable) fields changes no other load."""
    d1, _ = _folder(tmp_path, "one")
    d2, _ = _folder(tmp_path, "two")
    a1, a2 = af.load(d1), af.load(d2)
    assert a1.config == a2.config and a1.config is not a2.config
    a1.config.rank_pattern["v"] = 5
    a1.config.target_modules.append("k")
    a1.config.extra["x"] = 1
    a4 = af.load(d2)
    assert a4.config.rank_pattern == {} and a4.config.target_modules == ["q", "v"] and a4.config.extra == {}
    cfg = json.loads(open(os.path.join(d2, "adapter_config.json")).read())
    cfg["lora_alpha"] = 9
    with open(os.path.join(d2, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    a3 = af.load(d2)
    assert a3.config.lora_alpha == 9 and a1.config.lora_alpha == 6
    assert a3.entries["blk.q"].scaling == 3.0 and a1.entries["blk.q"].scaling == 2.0


def _rewrite_header(path: str, fn) -> None:
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = fn(data[8:8 + n])
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data[8 + n:])


@pytest.mark.parametrize("case", ["utf-8 bom", "utf-16", "surrogate escape", "huge zero-size dims", "2**64 dims"])
def test_headers_the_package_refuses_are_refused_typed(tmp_path, case):
    """The reader takes only strict UTF-8 without \\u escapes and shapes within the package's range; anything else
    goes to the safetensors package, which refuses these: a typed AdapterFileError, as before this reader."""
    d, _ = _folder(tmp_path)
    w = os.path.join(d, "adapter_model.safetensors")

    def change(raw: bytes) -> bytes:
        h = json.loads(raw)
        if case == "utf-8 bom":
            return b"\xef\xbb\xbf" + raw
        if case == "utf-16":
            return json.dumps(h).encode("utf-16-le")
        if case == "surrogate escape":
            k = next(k for k in h if k.endswith("q.lora_A.weight"))
            return json.dumps({**{x: v for x, v in h.items() if x != k}, k.replace("blk.q", "blk\udc00.q"): h[k]}
                              ).encode()
        end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
        shape = [2**40, 2**40, 0] if case == "huge zero-size dims" else [2**64, 0]
        h["base_model.model.blk.z.lora_A.weight"] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end]}
        return json.dumps(h).encode()

    _rewrite_header(w, change)
    assert _read(w) is None
    with pytest.raises(af.AdapterFileError, match="adapter_model.safetensors"):
        af.load(d)


def test_an_escaped_but_valid_header_loads_through_the_package(tmp_path):
    """A header with \\u escapes (json.dumps' default for non-ASCII) is valid: the package reads it."""
    d, sd = _folder(tmp_path)
    w = os.path.join(d, "adapter_model.safetensors")
    _rewrite_header(w, lambda raw: json.dumps({**json.loads(raw), "__metadata__": {"note": "caf\u00e9"}}).encode())
    with open(w, "rb") as f:
        assert b"\\u00e9" in f.read()
    assert _read(w) is None
    a = af.load(d)
    assert torch.equal(a.tensors["blk.q"]["lora_A"], sd["base_model.model.blk.q.lora_A.weight"])


@pytest.mark.parametrize("limit", [1, 100, 1 << 30])
def test_reads_in_groups_of_bounded_size_and_count(tmp_path, monkeypatch, limit):
    """preadv calls of at most _GROUP_BYTES bytes (one larger tensor alone) and _IOV_MAX buffers each."""
    sd = {f"t{i:03d}": _tensor(torch.float32, (i % 7 + 1, 3), i) for i in range(40)}
    path = str(tmp_path / "w.safetensors")
    safetensors.torch.save_file(sd, path)
    monkeypatch.setattr(_safetensors, "_GROUP_BYTES", limit)
    monkeypatch.setattr(_safetensors, "_IOV_MAX", 16)
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: calls.append([len(b) for b in bufs]) or real(fd, bufs,
                                                                                                          off))
    got = _read(path)
    assert got is not None
    _same(got, safetensors.torch.load_file(path))
    assert sum(map(len, calls)) == 40 and max(map(len, calls)) <= 16
    assert all(len(c) == 1 or sum(c) <= limit for c in calls)
    assert len(calls) == {1: 40, 1 << 30: 3}.get(limit, len(calls)) and (limit != 100 or len(calls) > 3)
