"""A safetensors reader on an open file descriptor: the header parsed once, then the data read straight into one
new tensor per key with a single ``preadv`` (no memory map, no per-key call into the safetensors package).

Loading an adapter folder reads the header anyway (for the config hash, see :mod:`adaptfn._files`); reading the
data from that same descriptor also makes the tensors come from the very file whose hash was checked. Anything
out of the ordinary (an unknown dtype, offsets that do not tile the data exactly, duplicate keys, a short read,
no ``os.preadv`` on this platform) makes :func:`read_data` return None, and the caller reads the file with the
safetensors package instead, whose errors it already types. So this reader never accepts a file that the
package would refuse, and never reports one in its own words.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
from typing import Any

import torch

from .errors import AdapterFileError

__all__ = ["MAX_HEADER_BYTES", "read_header", "read_data"]

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
_CHUNK = 1 << 20
_IOV_MAX = 1024  # POSIX's minimum for IOV_MAX is 16; Linux and macOS allow 1024
_GROUP_BYTES = 1 << 30
_MAX_DIM = 1 << 62  # a dimension or element count beyond this is left to the package (it refuses 2**64 bytes)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class _Duplicate(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Duplicate
    return out


def _read_exact(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        b = os.read(fd, min(left, _CHUNK))
        if not b:
            break
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


def read_header(fd: int, path: str) -> tuple[int, Any, bool]:
    """``(n, header, plain)`` of the safetensors file open as ``fd`` (at offset 0): the header's byte length,
    its parsed JSON (as ``json.loads`` of the bytes: the last of repeated keys) and whether it is plain enough
    for :func:`read_data`: strict UTF-8 (no byte-order mark, no other encoding), no escaped UTF-16 surrogate
    and no repeated key, as the safetensors package requires (a file that is not is left to the package).
    Raises :class:`AdapterFileError` naming ``path`` on a header that cannot be read at all."""
    head = _read_exact(fd, 8)
    if len(head) < 8:
        raise AdapterFileError(f"{path}: corrupt or truncated safetensors file (only {len(head)} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise AdapterFileError(f"{path}: corrupt safetensors file (header length {n} is not plausible)")
    raw = _read_exact(fd, n)
    if len(raw) < n:
        raise AdapterFileError(f"{path}: corrupt or truncated safetensors file (header cut at {len(raw)} of {n} "
                               "bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\\u" not in text.replace("\\\\", ""):  # no \u escapes: a surrogate may hide there
        try:
            return n, json.loads(text, object_pairs_hook=_pairs), True
        except (_Duplicate, ValueError, RecursionError):  # (a BOM, for one): as json.loads of the bytes says
            pass
    try:
        return n, json.loads(raw), False
    except (ValueError, RecursionError):
        raise AdapterFileError(f"{path}: corrupt safetensors file (its header is not valid JSON)") from None


def metadata(header: Any) -> dict[str, Any] | None:
    """The header's ``__metadata__`` mapping, or None."""
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def _plan(header: Any, size: int) -> list[tuple[str, torch.dtype, list[int], int]] | None:
    """``(key, dtype, shape, nbytes)`` in file order when the header describes exactly ``size`` bytes of data
    as safetensors lays it out (each tensor right after the previous one, no gaps); else None."""
    if not isinstance(header, dict):
        return None
    items = []
    for k, v in header.items():
        if k == "__metadata__":
            if type(v) is not dict or not all(type(x) is str for x in v.values()):
                return None
            continue
        if type(v) is not dict or len(v) != 3:
            return None
        try:
            dtype, shape, (start, end) = DTYPES.get(v["dtype"]), v["shape"], v["data_offsets"]
        except (KeyError, TypeError, ValueError):  # a missing field, an unhashable dtype, not two offsets
            return None
        if dtype is None or type(shape) is not list or type(start) is not int or type(end) is not int:
            return None
        numel = 1
        for d in shape:  # as the package: each dimension and the running product within its (and torch's) range
            if type(d) is not int or not 0 <= d < _MAX_DIM:
                return None
            numel *= d
            if numel >= _MAX_DIM:
                return None
        if not 0 <= start <= end or end - start != numel * dtype.itemsize:
            return None
        items.append((start, end, k, dtype, shape))
    items.sort(key=lambda x: (x[0], x[1]))
    at = 0
    for start, end, *_ in items:
        if start != at:
            return None
        at = end
    if at != size:
        return None
    return [(k, dtype, shape, end - start) for start, end, k, dtype, shape in items]


def read_data(fd: int, n: int, header: Any, plain: bool, file_size: int) -> dict[str, torch.Tensor] | None:
    """Every tensor of the safetensors file open as ``fd`` (whose header :func:`read_header` gave as ``n``,
    ``header``, ``plain``), on the CPU, each in its own new storage, read with ``os.preadv``; None when the
    file is not plain enough for this reader (see the module docstring). An I/O error raises its OSError (the
    caller types it, naming the file)."""
    if not plain or not hasattr(os, "preadv") or sys.byteorder != "little":  # (safetensors is little-endian)
        return None
    plan = _plan(header, file_size - 8 - n)
    if plan is None:
        return None
    out: dict[str, torch.Tensor] = {}
    bufs: list[Any] = []
    for k, dtype, shape, nbytes in plan:
        try:
            t = torch.empty(shape, dtype=dtype)
        except (RuntimeError, TypeError, ValueError):  # a shape torch will not make: the package's word on it
            return None
        out[k] = t
        if nbytes:
            bufs.append((ctypes.c_char * nbytes).from_address(t.data_ptr()))
    offset = 8 + n
    for group in _groups(bufs):
        want = sum(len(b) for b in group)
        got = os.preadv(fd, group, offset)  # an OSError is the caller's to type (it names the file)
        if got != want:  # a short read (a file cut under us, a signal, one tensor over ~2 GiB): the package reads
            return None
        offset += want
    return out


def _groups(bufs: list[Any]) -> list[list[Any]]:
    """``bufs`` in runs of at most :data:`_IOV_MAX` buffers and :data:`_GROUP_BYTES` bytes (one buffer may be more)
    per ``preadv``: Linux reads at most ~2 GiB per call."""
    out: list[list[Any]] = []
    run: list[Any] = []
    size = 0
    for b in bufs:
        if run and (len(run) == _IOV_MAX or size + len(b) > _GROUP_BYTES):
            out.append(run)
            run, size = [], 0
        run.append(b)
        size += len(b)
    if run:
        out.append(run)
    return out
