"""The pools' native CPU kernel (adaptfn._native): every vector width and build (with and without OpenMP, on any
CPU: the widths are forced with -DVW, so no path depends on the CPU the suite lands on) against a float64
reference over odd sizes, rank and output tails, items of 1-16 tokens and strided rows; the cache (keyed
builds, concurrent first builds, failed compilers) and the fallback when no kernel can be built."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptfn import _native

ROOT = Path(__file__).resolve().parents[1]
CC = _native._compiler()
# every width on the machine's baseline instructions, with and without OpenMP, and the build pools use here
BUILDS = {
    "vw4": ("-O3", "-DVW=4", "-fopenmp"),
    "vw8": ("-O3", "-DVW=8", "-fopenmp"),
    "vw16": ("-O3", "-DVW=16", "-fopenmp"),
    "vw16-serial": ("-O3", "-DVW=16"),
    "native": _native.ATTEMPTS[0],
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, object]:
    assert CC is not None, "the suite needs a C compiler (scripts/env.sh installs gcc)"
    folder = tmp_path_factory.mktemp("native")
    out = {}
    for name, flags in BUILDS.items():
        b = _native.compile_kernel(CC, flags, folder)
        assert b.lib is not None, b.why
        fn, info = _native.bind(b.lib)
        want_vw = int(flags[1][5:]) if flags[1].startswith("-DVW=") else info & 255
        assert info & 255 == want_vw and bool(info & 256) == ("-fopenmp" in flags), (name, info)
        out[name] = fn
    return out


def _case(n_in: int, R: int, n_out: int, lengths: list[int], cap: int, seed: int, stride_pad: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    rows = T + 5
    X = torch.randn(rows, n_in + stride_pad, generator=g)[:, :n_in]  # rows with a stride > n_in when padded
    Y = torch.randn(rows, n_out + stride_pad, generator=g)[:, :n_out]
    At = torch.randn(cap, n_in, R, generator=g)
    Bt = torch.randn(cap, R, n_out, generator=g)
    tok = torch.randperm(rows, generator=g)[:T]
    start = torch.tensor([sum(lengths[:j]) for j in range(len(lengths))], dtype=torch.long)
    length = torch.tensor(lengths, dtype=torch.long)
    pos = torch.randint(0, cap, (len(lengths),), generator=g)
    scale = torch.rand(len(lengths), generator=g) * 2 - 0.5
    want = Y.double().clone()
    for j, (s, m) in enumerate(zip(start.tolist(), lengths)):
        r = tok[s:s + m]
        h = X[r].double() @ At[pos[j]].double() * float(scale[j])
        want[r] += h @ Bt[pos[j]].double()
    return X, Y, At, Bt, tok, start, length, pos, scale, want


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("threads", [1, 2])
def test_every_build_matches_float64(builds, build, threads, monkeypatch) -> None:
    """Ranks below, at and between vector widths (1, 3, 4, 7, 12, 16, 33, 64), outputs with tails (1, 7, 17, 130),
    items of every length 1-16 (the 1-, 2-, 4- and 16-token tiles), rows with a stride."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    lengths = list(range(1, 17)) + [16, 3]
    for k, (n_in, R, n_out) in enumerate([(19, 1, 7), (5, 3, 17), (11, 4, 1), (64, 7, 130), (23, 12, 48),
                                          (40, 16, 33), (9, 33, 16), (130, 64, 19)]):
        X, Y, At, Bt, tok, start, length, pos, scale, want = _case(n_in, R, n_out, lengths, cap=5, seed=k,
                                                                    stride_pad=k % 2 * 3)
        _native.lora_rows(X, Y, At, Bt, tok, start, length, pos, scale, fn=builds[build])
        dims = (n_in, R, n_out)
        torch.testing.assert_close(Y.double(), want, atol=1e-4, rtol=1e-5, msg=lambda m, d=dims: f"{d}: {m}")


@settings(max_examples=40, deadline=None)
@given(n_in=st.integers(1, 70), R=st.integers(1, 70), n_out=st.integers(1, 70),
       lengths=st.lists(st.integers(1, 16), min_size=0, max_size=9), seed=st.integers(0, 2**16))
def test_native_build_property(n_in, R, n_out, lengths, seed) -> None:
    """The build pools use, over random sizes and items: equal to the float64 reference; rows no item names are
    untouched (also with no items at all)."""
    fn = _native.kernel()
    assert fn is not None, _native.status()
    X, Y, At, Bt, tok, start, length, pos, scale, want = _case(n_in, R, n_out, lengths, cap=3, seed=seed)
    before = Y.clone()
    _native.lora_rows(X, Y, At, Bt, tok, start, length, pos, scale)
    torch.testing.assert_close(Y.double(), want, atol=1e-4, rtol=1e-5)
    untouched = torch.ones(Y.shape[0], dtype=torch.bool)
    untouched[tok] = False
    assert torch.equal(Y[untouched], before[untouched])


def test_status_names_the_build() -> None:
    s = _native.status()
    assert s.startswith("on: ") and "floats per vector" in s, s


def _child(code: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_STATUS_RUN = "import json; from adaptfn import _native; print(json.dumps({'status': _native.status()}))"
_POOL_RUN = """
import json, torch, adaptfn as af
torch.manual_seed(0)
from adaptfn import _native, pooling
lin = torch.nn.Sequential(torch.nn.Linear(13, 9), torch.nn.Linear(9, 11))
fn, params = af.functional(lin)
ads = [af.init(fn, af.LoraConfig(r=r, target_modules=["0", "1"], init_lora_weights=False),
               generator=torch.Generator().manual_seed(r)) for r in (3, 8)]
p = af.pool(ads)
x = torch.randn(4, 5, 13, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    got = af.inject(fn, p, route=torch.tensor([1, -1, 0, 1]))(params, x)
print(json.dumps({"status": _native.status(), "native": pooling._native.kernel() is not None, "sum": got.sum().item()}))
"""


def test_off_switch_and_no_compiler_fall_back(tmp_path) -> None:
    """ADAPTFN_NATIVE=0, no compiler on PATH, or a compiler that fails: the status says why and pools run their
    portable kernels with the same results."""
    env = {**os.environ, "ADAPTFN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    on = _child(_POOL_RUN, env)
    assert on["native"] and on["status"].startswith("on: ")
    off = _child(_POOL_RUN, {**env, "ADAPTFN_NATIVE": "0"})
    assert not off["native"] and off["status"] == "off: ADAPTFN_NATIVE=0"
    bare = tmp_path / "bin"
    bare.mkdir()
    none = _child(_POOL_RUN, {**env, "PATH": str(bare), "CC": ""})
    assert not none["native"] and "no C compiler" in none["status"]
    bad = bare / "cc"
    bad.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 1.0; exit 0; }\necho 'fake: error: no' >&2\n"
                   "exit 1\n")
    bad.chmod(0o755)
    failed = _child(_POOL_RUN, {**env, "PATH": f"{bare}:/usr/bin:/bin", "CC": str(bad),
                                "ADAPTFN_CACHE": str(tmp_path / "c2")})
    assert not failed["native"] and "compiling failed" in failed["status"] and "fake: error" in failed["status"]
    assert list((tmp_path / "c2" / "native").iterdir()) == []  # no half-written library left behind
    for other in (off, none, failed):
        assert abs(other["sum"] - on["sum"]) <= 1e-4 * max(1.0, abs(on["sum"]))


def test_read_only_cache_builds_in_a_private_folder(tmp_path) -> None:
    """A cache folder that cannot be written (a read-only home): the kernel is built in a private temp folder."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        env = {**os.environ, "ADAPTFN_CACHE": str(ro / "sub"), "PYTHONPATH": str(ROOT)}
        if os.geteuid() == 0:  # root writes anywhere: a file where the folder should be makes it unwritable
            ro.chmod(0o700)
            (ro / "sub").write_text("")
        got = _child(_POOL_RUN, env)
    finally:
        ro.chmod(0o700)
    assert got["native"] and "adaptfn-native-" in got["status"], got["status"]


def test_concurrent_first_builds_share_one_library(tmp_path) -> None:
    """Processes building into one empty cache at once: each loads a whole library, one file remains, no temp."""
    env = {**os.environ, "ADAPTFN_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _STATUS_RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert all(json.loads(o[0].strip().splitlines()[-1])["status"].startswith("on: ") for o in outs)
    files = sorted(f.name for f in (tmp_path / "native").iterdir())
    assert len(files) == 1 and files[0].startswith("lora_rows-") and files[0].endswith(".so"), files


def test_builds_are_keyed_by_flags_and_cpu(tmp_path, monkeypatch) -> None:
    """A build is reused for the same source, compiler, flags and CPU, and never for another CPU or flags."""
    a = _native.compile_kernel(CC, ("-O3",), tmp_path).lib
    again = _native.compile_kernel(CC, ("-O3",), tmp_path).lib
    assert a is not None and a == again
    other_flags = _native.compile_kernel(CC, ("-O2",), tmp_path).lib
    monkeypatch.setattr(_native, "_cpu_id", lambda: "model name: some other CPU\nflags: sse2")
    other_cpu = _native.compile_kernel(CC, ("-O3",), tmp_path).lib
    assert len({a, other_flags, other_cpu}) == 3


def test_compiler_search_honours_cc(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CC", shutil.which("gcc") or CC)
    assert _native._compiler() == (shutil.which("gcc") or CC)
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    assert _native._compiler() is not None  # falls back to cc / gcc / clang on PATH


def test_bad_calls_are_refused_before_the_kernel_runs(builds) -> None:
    """The wrapper checks devices, dtypes, layouts and shapes (ValueError naming them); the kernel itself refuses
    an item of 0 or more than 16 tokens (return code 2) and writes nothing for it."""
    X, Y, At, Bt, tok, start, length, pos, scale, _ = _case(7, 4, 5, [3, 2], cap=2, seed=1)
    args = dict(tok=tok, start=start, length=length, pos=pos, scale=scale)
    with pytest.raises(ValueError, match="float32"):
        _native.lora_rows(X.double(), Y, At, Bt, **args)
    with pytest.raises(ValueError, match="unit column stride"):
        _native.lora_rows(X.t().contiguous().t(), Y, At, Bt, **args)
    with pytest.raises(ValueError, match="shapes do not match"):
        _native.lora_rows(X, Y[:, :4], At, Bt, **args)
    with pytest.raises(ValueError, match="shapes do not match"):
        _native.lora_rows(X, Y, At, Bt, **{**args, "pos": pos[:1]})
    with pytest.raises(ValueError, match="int64"):
        _native.lora_rows(X, Y, At, Bt, **{**args, "tok": tok.int()})
    with pytest.raises(ValueError, match="plain CPU"):
        _native.lora_rows(X, Y, At.to("meta"), Bt, **args)
    before = Y.clone()
    for bad in (torch.tensor([17, 2]), torch.tensor([0, 2]), torch.tensor([-3, 2])):
        Y.copy_(before)
        with pytest.raises(ValueError, match="1..16"):
            _native.lora_rows(X, Y, At, Bt, **{**args, "length": bad})
        rows_of_bad = tok[:3]
        assert torch.equal(Y[rows_of_bad], before[rows_of_bad])  # the refused item wrote nothing
    fn = builds["vw16"]
    rc = fn(X.data_ptr(), X.stride(0), Y.data_ptr(), Y.stride(0), At.data_ptr(), Bt.data_ptr(), 7, 4, 5,
            tok.data_ptr(), start.data_ptr(), torch.tensor([40, 2]).data_ptr(), pos.data_ptr(), scale.data_ptr(), 2, 2)
    assert rc == 2


_DRIVER = r"""
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
int adaptfn_lora_rows_f32(const float *, int64_t, float *, int64_t, const float *, const float *, int, int, int,
                          const int64_t *, const int64_t *, const int64_t *, const int64_t *, const float *, int64_t,
                          int);
static uint64_t state = 0x9E3779B97F4A7C15ull;
static uint32_t next(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return (uint32_t)state; }
static float uni(void) { return (float)(next() % 20001) / 10000.0f - 1.0f; }
/* every buffer exactly as large as the kernel may touch, so that AddressSanitizer sees any byte beyond it */
int main(int argc, char **argv) {
    int cases = argc > 1 ? atoi(argv[1]) : 500, bad = 0;
    for (int c = 0; c < cases; c++) {
        int n_in = 1 + next() % 67, R = 1 + next() % 70, n_out = 1 + next() % 83;
        int items = next() % 7, cap = 1 + next() % 3;
        int64_t len[8], T = 0;
        for (int j = 0; j < items; j++) { len[j] = 1 + next() % 16; T += len[j]; }
        int64_t rows = T + next() % 3, xs = n_in + next() % 4, ys = n_out + next() % 4;
        size_t nx = rows ? (size_t)((rows - 1) * xs + n_in) : 0, ny = rows ? (size_t)((rows - 1) * ys + n_out) : 0;
        float *x = malloc(sizeof(float) * (nx ? nx : 1)), *y = malloc(sizeof(float) * (ny ? ny : 1));
        double *want = malloc(sizeof(double) * (ny ? ny : 1));
        float *A = malloc(sizeof(float) * cap * n_in * R), *B = malloc(sizeof(float) * cap * R * n_out);
        int64_t *tok = malloc(sizeof(int64_t) * (T ? T : 1)), *start = malloc(sizeof(int64_t) * (items ? items : 1));
        int64_t *pos = malloc(sizeof(int64_t) * (items ? items : 1));
        float *sc = malloc(sizeof(float) * (items ? items : 1));
        int64_t *perm = malloc(sizeof(int64_t) * (rows ? rows : 1));
        for (size_t i = 0; i < nx; i++) x[i] = uni();
        for (size_t i = 0; i < ny; i++) want[i] = y[i] = uni();
        for (int i = 0; i < cap * n_in * R; i++) A[i] = uni();
        for (int i = 0; i < cap * R * n_out; i++) B[i] = uni();
        for (int64_t i = 0; i < rows; i++) perm[i] = i;
        for (int64_t i = rows - 1; i > 0; i--) {
            int64_t k = next() % (i + 1), t = perm[i];
            perm[i] = perm[k];
            perm[k] = t;
        }
        for (int64_t i = 0; i < T; i++) tok[i] = perm[i];
        for (int j = 0, at = 0; j < items; at += len[j], j++) { start[j] = at; pos[j] = next() % cap; sc[j] = uni(); }
        int rc = adaptfn_lora_rows_f32(x, xs, y, ys, A, B, n_in, R, n_out, tok, start, len, pos, sc, items,
                                       1 + c % 3);
        for (int j = 0; j < items; j++)
            for (int64_t t = 0; t < len[j]; t++) {
                int64_t row = tok[start[j] + t];
                const float *a = A + pos[j] * n_in * R, *b = B + pos[j] * R * n_out;
                for (int n = 0; n < n_out; n++) {
                    double s = 0;
                    for (int r = 0; r < R; r++) {
                        double h = 0;
                        for (int i = 0; i < n_in; i++) h += (double)x[row * xs + i] * a[i * R + r];
                        s += h * sc[j] * b[r * n_out + n];
                    }
                    want[row * ys + n] += s;
                }
            }
        for (size_t i = 0; i < ny; i++)
            if (fabs(y[i] - want[i]) > 1e-4 * (1 + fabs(want[i]))) {
                bad++;
                printf("case %d: %g != %g\n", c, y[i], want[i]);
                break;
            }
        if (rc) { bad++; printf("case %d: rc %d\n", c, rc); }
        free(x); free(y); free(want); free(A); free(B); free(tok); free(start); free(pos); free(sc); free(perm);
    }
    printf("bad %d\n", bad);
    return bad != 0;
}
"""


@pytest.mark.parametrize("vw", [4, 8, 16])
def test_kernel_under_address_and_undefined_behaviour_sanitizers(tmp_path, vw) -> None:
    """The kernel built with -fsanitize=address,undefined into a C driver: 400 random cases (sizes 1-83, items of
    1-16 tokens, padded row strides, 1-3 threads), every buffer exactly as large as the kernel may read or write:
    no out-of-bounds access, no undefined behaviour, results equal a float64 reference."""
    (tmp_path / "driver.c").write_text(_DRIVER)
    exe = tmp_path / "driver"
    flags = ["-O1", "-g", f"-DVW={vw}", "-fopenmp", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    cc = subprocess.run([CC, *flags, "-o", str(exe), str(tmp_path / "driver.c"), str(_native._SOURCE), "-lm"],
                        capture_output=True, text=True, timeout=300)
    assert cc.returncode == 0, cc.stderr[-2000:]
    run = subprocess.run([str(exe), "400"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1"})
    assert run.returncode == 0 and "bad 0" in run.stdout, (run.stdout[-2000:], run.stderr[-3000:])


def test_build_errors_name_their_cause_and_reasons_are_codes(tmp_path, monkeypatch) -> None:
    """A failed compile reports the compiler's first error line (not "compilation terminated."); whether other
    flags are tried depends on a reason code, not on words in paths (a compiler under a folder named "missing")."""
    err = "x.c:1:10: fatal error: stdint.h: No such file or directory\ncompilation terminated.\n"
    assert _native._first_error(err, 1) == "x.c:1:10: fatal error: stdint.h: No such file or directory"
    assert _native._first_error("", 4) == "exit status 4"
    odd = tmp_path / "missing-tools"
    odd.mkdir()
    cc = odd / "cc"
    cc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 2.0; exit 0; }\n"
                  "case \"$*\" in *march*) echo 'cc: error: unknown -march' >&2; exit 1;; esac\n"
                  f"exec {CC} \"$@\"\n")
    cc.chmod(0o755)
    b = _native.compile_kernel(str(cc), _native.ATTEMPTS[0], tmp_path / "cache")
    assert b.lib is None and b.reason == "compile" and "unknown -march" in b.why
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("ADAPTFN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_native, "_STATE", {})
    assert _native.status().startswith("on: ") and "-O3 -fopenmp;" in _native.status()  # the second flag set


def test_shared_folders_and_broken_libraries(tmp_path, monkeypatch) -> None:
    """A cache folder others may write to is not trusted: the kernel is built in a private temporary folder. A
    cached library that does not load is removed and built again."""
    shared = tmp_path / "shared"
    (shared / "native").mkdir(parents=True)
    (shared / "native").chmod(0o777)
    monkeypatch.setenv("ADAPTFN_CACHE", str(shared))
    monkeypatch.setattr(_native, "_STATE", {})
    assert "adaptfn-native-" in _native.status()
    own = {**os.environ, "ADAPTFN_CACHE": str(tmp_path / "own"), "PYTHONPATH": str(ROOT)}
    first = _child(_STATUS_RUN, own)["status"]
    lib = Path(first.split()[1])
    broken = lib.with_name(".broken")
    broken.write_bytes(b"not a library")
    os.replace(broken, lib)
    again = _child(_STATUS_RUN, own)["status"]  # a new process (this one's loader would hand back its loaded copy)
    assert again == first and lib.read_bytes()[:4] == b"\x7fELF"
