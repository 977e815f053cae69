"""adaptfn's optional native CPU kernel for adapter pools, compiled on first use.

The pool's ``native`` kernel (:mod:`adaptfn.pooling`) runs each adapted module's low-rank part for every row
of a mixed batch in one call: per item (up to 16 tokens of one adapter) it reads the tokens' inputs in place,
computes ``(x @ A^T) * scale @ B^T`` with register-blocked loops (each adapter's weights read once per item,
not once per token as ``embedding_bag`` does), and adds the result into the base output's rows. Items run on
``torch.get_num_threads()`` OpenMP threads. With torch's Linux wheels, which ship their OpenMP runtime under
its standard name (``libgomp.so.1``), the kernel's OpenMP calls resolve to that same runtime; a build whose
runtime differs (e.g. clang's libomp next to torch's libgomp) gets its own thread pool.

The C source (``lora_rows.c``, shipped with the package) is compiled with the system's C compiler (``$CC``,
else ``cc``, ``gcc`` or ``clang``) for this CPU (``-march=native``) into a cache folder
(``$ADAPTFN_CACHE/native``, default ``~/.cache/adaptfn/native``), named by a hash of the source, the compiler,
the flags, the CPU's model and features, and torch's version, so that a different machine or compiler never
loads a stale build. A build is written under a temporary name and renamed, so concurrent processes never load
half a file. A library is loaded only from a folder and file owned by this user and writable by no one else;
otherwise (a shared or read-only cache folder) the process builds into a private temporary folder of its own.

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
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = ["kernel", "status", "lora_rows", "compile_kernel", "bind", "Build", "ATTEMPTS"]

_SOURCE = Path(__file__).with_name("lora_rows.c")
_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}  # "fn": the ctypes function or None, "why": status text
#: seconds a compile may take before it is given up (the kernel is ~200 lines of C: well under a second)
COMPILE_TIMEOUT = 120
#: compiler flag sets tried in turn: this CPU's instructions and OpenMP threads first; then without each
ATTEMPTS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-fopenmp"), ("-O3", "-march=native"), ("-O3",))
_TILE = 16  # tokens per item at most (the C source's TB)


class Build(NamedTuple):
    """What :func:`compile_kernel` gives: the library (None when there is none) and, when None, why: ``reason``
    is "compile" (these flags failed: try others), or "compiler", "source" or "folder" (no flags can help)."""

    lib: Path | None
    why: str = ""
    reason: str = ""


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


def _version(cc: str) -> str | None:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _private(path: Path) -> bool:
    """Whether ``path`` is owned by this user and writable by no one else (so no other user could have put a
    library there). Always true where there are no POSIX owners (Windows)."""
    if not hasattr(os, "getuid"):
        return True
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _first_error(stderr: str, returncode: int) -> str:
    """The compiler's message that names the cause: its first line with "error" (the last lines are often
    "compilation terminated." or the linker's exit status), else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    named = [line for line in lines if "error" in line.lower()]
    return (named or lines or [f"exit status {returncode}"])[0 if named else -1]


def _sweep(folder: Path, older_than: float = 3600.0) -> None:
    """Remove temporary files that a process killed mid-build left behind (older than an hour)."""
    now = time.time()
    for f in folder.glob(".lora_rows-*"):
        try:
            if now - f.stat().st_mtime > older_than:
                f.unlink()
        except OSError:
            pass


def compile_kernel(cc: str, flags: tuple[str, ...], folder: Path) -> Build:
    """Compile the kernel with ``flags`` into ``folder``, or find that build there (see :class:`Build`). The
    file name hashes the source, the compiler's version, the flags, this CPU and torch's version."""
    version = _version(cc)
    if version is None:
        return Build(None, f"compiler {cc} does not run", "compiler")
    try:
        src = _SOURCE.read_bytes()
    except OSError as e:
        return Build(None, f"the kernel's source is missing ({e})", "source")
    key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(flags).encode(), _cpu_id().encode(),
                                     torch.__version__.encode()])).hexdigest()[:24]
    lib = folder / f"lora_rows-{key}.so"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        return Build(None, f"cache folder {folder} is not writable ({e})", "folder")
    if not _private(folder):
        return Build(None, f"cache folder {folder} is not private to this user (owner or group/other write)",
                     "folder")
    if lib.is_file():
        if _private(lib):
            return Build(lib)
        return Build(None, f"{lib} is not private to this user", "folder")
    _sweep(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lora_rows-", suffix=".so", dir=folder)
        os.close(fd)
    except OSError as e:
        return Build(None, f"cache folder {folder} is not writable ({e})", "folder")
    try:
        out = subprocess.run([cc, *flags, "-shared", "-fPIC", "-x", "c", "-o", tmp, str(_SOURCE)],
                             capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
        if out.returncode != 0:
            return Build(None, f"{cc} {' '.join(flags)}: {_first_error(out.stderr, out.returncode)}", "compile")
        os.chmod(tmp, 0o755)
        os.replace(tmp, lib)  # atomic: a concurrent process sees the whole file or none
        return Build(lib)
    except (OSError, subprocess.SubprocessError) as e:
        return Build(None, f"{cc} {' '.join(flags)}: {e}", "compile")
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


def _build_and_bind(cc: str, flags: tuple[str, ...], folder: Path) -> tuple[Any, Build]:
    """One flag set: build (or reuse) and load; a cached file that does not load is rebuilt once."""
    for _ in range(2):
        b = compile_kernel(cc, flags, folder)
        if b.lib is None:
            return None, b
        try:
            return bind(b.lib), b
        except (OSError, AttributeError) as e:
            why = f"loading {b.lib} failed ({e})"
            try:
                b.lib.unlink()
            except OSError:
                return None, Build(None, why, "compile")
    return None, Build(None, why, "compile")


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
        got, b = _build_and_bind(cc, flags, folder)
        if got is None and b.reason == "folder" and not folder.name.startswith("adaptfn-native-"):
            # a read-only or shared cache folder: build in a private temporary folder for this process
            folder = Path(tempfile.mkdtemp(prefix="adaptfn-native-"))
            atexit.register(shutil.rmtree, folder, True)
            got, b = _build_and_bind(cc, flags, folder)
        if got is None:
            errors.append(b.why)
            if b.reason != "compile":
                break
            continue
        fn, info = got
        threads = "OpenMP threads" if info & 256 else "one thread (built without OpenMP)"
        _STATE.update(fn=fn, why=f"on: {b.lib} ({' '.join(flags)}; {info & 255} floats per vector; {threads})")
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
    """``"on: <library path> (<flags>; <floats per vector>; <threads>)"`` or ``"off: <why>"`` (builds the kernel
    if that was not tried yet)."""
    kernel()
    return _STATE["why"]


def _check(x: torch.Tensor, y: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, idx: tuple[torch.Tensor, ...],
           scale: torch.Tensor) -> None:
    """Constant-time checks that the kernel's pointers mean what it assumes (it trusts index values)."""
    f32, i64 = torch.float32, torch.int64
    tensors = (x, y, At, Bt, scale, *idx)
    if any(t.device.type != "cpu" or type(t) is not torch.Tensor for t in tensors):
        raise ValueError("lora_rows: every tensor must be a plain CPU tensor")
    if any(t.dtype != f32 for t in (x, y, At, Bt, scale)) or any(t.dtype != i64 for t in idx):
        raise ValueError("lora_rows: x, y, At, Bt, scale must be float32 and tok, start, length, pos int64")
    if x.dim() != 2 or y.dim() != 2 or At.dim() != 3 or Bt.dim() != 3 or x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError(f"lora_rows: x {list(x.shape)} and y {list(y.shape)} must be 2-D with unit column stride, "
                         f"At {list(At.shape)} and Bt {list(Bt.shape)} 3-D")
    if not (At.is_contiguous() and Bt.is_contiguous() and scale.is_contiguous()
            and all(t.is_contiguous() and t.dim() == 1 for t in idx)):
        raise ValueError("lora_rows: At, Bt, scale and the index tensors must be contiguous (indices 1-D)")
    n_items = idx[1].numel()
    if (x.shape[0] != y.shape[0] or x.shape[1] != At.shape[1] or At.shape[2] != Bt.shape[1]
            or y.shape[1] != Bt.shape[2] or At.shape[0] != Bt.shape[0] or At.shape[2] < 1
            or any(t.numel() != n_items for t in (idx[2], idx[3], scale))):
        raise ValueError(f"lora_rows: shapes do not match: x {list(x.shape)}, y {list(y.shape)}, At "
                         f"{list(At.shape)}, Bt {list(Bt.shape)}, {n_items} items")


def lora_rows(x: torch.Tensor, y: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, tok: torch.Tensor,
              start: torch.Tensor, length: torch.Tensor, pos: torch.Tensor, scale: torch.Tensor,
              fn: Any = None, check: bool = True) -> None:
    """``y[tok[s:s+m]] += scale_j * (x[tok[s:s+m]] @ At[pos_j]) @ Bt[pos_j]`` for each item ``j``
    (``s = start[j]``, ``m = length[j]``, 1 to 16), in place.

    Shapes: x [rows, in] and y [rows, out] float32 with unit column stride; At [cap, in, R] and Bt [cap, R, out]
    contiguous float32; tok, start, length, pos int64 (contiguous); scale [items] float32. The shapes, dtypes,
    devices and layouts are checked (``ValueError``); the index values are not: the caller guarantees them in
    range (a pool's plans are built so) and that items name disjoint token rows. An item whose length is not in
    1..16 is refused by the kernel (``ValueError``, that item unwritten). ``fn``: a kernel from :func:`bind`
    (tests); default :func:`kernel`. ``check=False`` skips the checks (7 us a call) for callers whose tensors are
    so by construction: a pool's call, after :func:`adaptfn.pooling._native_ok`."""
    fn = fn or kernel()
    if fn is None:
        raise RuntimeError(f"adaptfn native kernel unavailable ({status()})")
    if check:
        _check(x, y, At, Bt, (tok, start, length, pos), scale)
    rc = fn(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), At.data_ptr(), Bt.data_ptr(), At.shape[1],
            At.shape[2], Bt.shape[2], tok.data_ptr(), start.data_ptr(), length.data_ptr(), pos.data_ptr(),
            scale.data_ptr(), start.numel(), torch.get_num_threads())
    if rc == 1:
        raise MemoryError("adaptfn native kernel: could not allocate its per-thread scratch")
    if rc == 2:
        raise ValueError(f"lora_rows: an item's length is not in 1..{_TILE}")
