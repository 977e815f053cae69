"""adaptfn's optional native CPU kernel for adapter pools, compiled on first use.

The pool's ``native`` kernel (:mod:`adaptfn.pooling`) runs each adapted module's low-rank part for every row
of a mixed batch in one call: per item (up to 16 tokens of one adapter) it reads the tokens' inputs in place,
computes ``(x @ A^T) * scale @ B^T`` with register-blocked loops (each adapter's weights read once per item,
not once per token as ``embedding_bag`` does), and adds the result into the base output's rows. Items run on
``torch.get_num_threads()`` OpenMP threads (the OpenMP runtime torch already loaded).

The C source (``lora_rows.c``, shipped with the package) is compiled with the system's C compiler (``$CC``,
else ``cc``, ``gcc`` or ``clang``) for this CPU (``-march=native``) into a cache folder
(``$ADAPTFN_CACHE/native``, default ``~/.cache/adaptfn/native``), named by a hash of the source, the compiler,
the flags and the CPU's model and features, so that a different machine or compiler never loads a stale
build. A build is written under a temporary name and renamed, so concurrent processes never load half a file.
Where the cache folder cannot be written, the process builds into a private temporary folder of its own.

Without a compiler (or with ``ADAPTFN_NATIVE=0``) pools use their portable kernels (``gather`` / ``loop``);
results agree to float32 rounding. :func:`status` says which is in use and why.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["kernel", "status", "lora_rows", "compile_kernel", "bind", "ATTEMPTS"]

_SOURCE = Path(__file__).with_name("lora_rows.c")
_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}  # "fn": the ctypes function or None, "why": status text
#: seconds a compile may take before it is given up (the kernel is ~300 lines of C: well under a second)
COMPILE_TIMEOUT = 120


def _cpu_id() -> str:
    """The CPU's model and feature flags (Linux: /proc/cpuinfo), so a cached build is never reused on a CPU
    that lacks an instruction it was compiled for."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            keep = [line.strip() for line in f if line.split(":")[0].strip() in
                    ("model name", "flags", "Features", "CPU implementer", "CPU part")]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cache_dir() -> Path:
    root = os.environ.get("ADAPTFN_CACHE")
    return Path(root) / "native" if root else Path.home() / ".cache" / "adaptfn" / "native"


#: compiler flag sets tried in turn: this CPU's instructions and OpenMP threads first; then without each
ATTEMPTS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-fopenmp"), ("-O3", "-march=native"), ("-O3",))


def _version(cc: str) -> str | None:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def compile_kernel(cc: str, flags: tuple[str, ...], folder: Path) -> tuple[Path | None, str]:
    """Compile the kernel with ``flags`` into ``folder`` (or find that build there): ``(path, "")`` or
    ``(None, why)``. The file name hashes the source, the compiler's version, the flags, this CPU and torch."""
    version = _version(cc)
    if version is None:
        return None, f"compiler {cc} does not run"
    try:
        src = _SOURCE.read_bytes()
    except OSError as e:
        return None, f"the kernel's source is missing ({e})"
    key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(flags).encode(), _cpu_id().encode(),
                                     torch.__version__.encode()])).hexdigest()[:24]
    lib = folder / f"lora_rows-{key}.so"
    if lib.is_file():
        return lib, ""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lora_rows-", suffix=".so", dir=folder)
        os.close(fd)
    except OSError as e:
        return None, f"cache folder {folder} is not writable ({e})"
    try:
        out = subprocess.run([cc, *flags, "-shared", "-fPIC", "-x", "c", "-o", tmp, str(_SOURCE)],
                             capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
        if out.returncode != 0:
            last = out.stderr.strip().splitlines()[-1:] or [f"exit status {out.returncode}"]
            return None, f"{cc} {' '.join(flags)}: {last[0]}"
        os.replace(tmp, lib)  # atomic: a concurrent process sees the whole file or none
        return lib, ""
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{cc} {' '.join(flags)}: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def bind(lib: Path) -> tuple[Any, int]:
    """Load a built kernel: ``(function, info)``, info being its floats per vector plus 256 with OpenMP."""
    dll = ctypes.CDLL(str(lib))
    fn = dll.adaptfn_lora_rows_f32
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [p, i64, p, i64, p, p, i32, i32, i32, p, p, p, p, p, i64, i32]
    fn.restype = i32
    fn._adaptfn_dll = dll  # keeps the library loaded while the function lives
    return fn, int(dll.adaptfn_lora_rows_info())


def _load() -> None:
    if os.environ.get("ADAPTFN_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _STATE.update(fn=None, why="off: ADAPTFN_NATIVE=0")
        return
    cc = _compiler()
    if cc is None:
        _STATE.update(fn=None, why="off: no C compiler found ($CC, cc, gcc, clang)")
        return
    errors = []
    folder = _cache_dir()
    for flags in ATTEMPTS:
        lib, why = compile_kernel(cc, flags, folder)
        if lib is None and "not writable" in why and not folder.name.startswith("adaptfn-native-"):
            # a read-only home: build in a private temporary folder for this process (never a shared one,
            # where another user could plant a library)
            folder = Path(tempfile.mkdtemp(prefix="adaptfn-native-"))
            atexit.register(shutil.rmtree, folder, True)
            lib, why = compile_kernel(cc, flags, folder)
        if lib is None:
            errors.append(why)
            if "does not run" in why or "missing" in why or "not writable" in why:
                break
            continue
        try:
            fn, info = bind(lib)
        except (OSError, AttributeError) as e:
            errors.append(f"loading {lib} failed ({e})")
            continue
        threads = "OpenMP threads" if info & 256 else "one thread (built without OpenMP)"
        _STATE.update(fn=fn, why=f"on: {lib} ({' '.join(flags)}; {info & 255} floats per vector; {threads})")
        return
    _STATE.update(fn=None, why="off: compiling failed: " + "; ".join(errors))


def kernel() -> Any:
    """The compiled kernel (a ctypes function), building it on first call; None where it cannot be built."""
    if "fn" not in _STATE:
        with _LOCK:
            if "fn" not in _STATE:
                _load()
    return _STATE["fn"]


def status() -> str:
    """``"on: <library path>"`` or ``"off: <why>"`` (builds the kernel if that was not tried yet)."""
    kernel()
    return _STATE["why"]


def lora_rows(x: torch.Tensor, y: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, tok: torch.Tensor,
              start: torch.Tensor, length: torch.Tensor, pos: torch.Tensor, scale: torch.Tensor,
              fn: Any = None) -> None:
    """``y[tok[s:s+m]] += scale_j * (x[tok[s:s+m]] @ At[pos_j]) @ Bt[pos_j]`` for each item ``j``
    (``s = start[j]``, ``m = length[j]`` <= 16), in place.

    Shapes: x [rows, in] and y [rows, out] float32 with unit column stride; At [cap, in, R] and Bt [cap, R, out]
    contiguous float32; tok, start, length, pos int64 (contiguous); scale [items] float32. The caller
    guarantees indices in range (a pool's plans are built so) and that items name disjoint token rows.
    ``fn``: a kernel from :func:`bind` (tests); default :func:`kernel`."""
    fn = fn or kernel()
    if fn is None:
        raise RuntimeError(f"adaptfn native kernel unavailable ({status()})")
    rc = fn(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), At.data_ptr(), Bt.data_ptr(), At.shape[1],
            At.shape[2], Bt.shape[2], tok.data_ptr(), start.data_ptr(), length.data_ptr(), pos.data_ptr(),
            scale.data_ptr(), start.numel(), torch.get_num_threads())
    if rc:
        raise MemoryError("adaptfn native kernel: could not allocate its per-thread scratch")
