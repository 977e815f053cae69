"""The adapter folder on disk: two-file saves that are atomic as a pair, reads that see one version, cleanup.

The protocol (the module docstring of :mod:`adaptfn.io` and ``docs/reliability.md`` describe it for users):

* the weights file carries, in its safetensors metadata, ``adaptfn.config_sha256``: the SHA-256 of the
  exact bytes of the ``adapter_config.json`` it was written with. A pair *agrees* when the hash matches
  (a weights file without the key, e.g. written by PEFT, agrees with whatever config is next to it);
* a save holds an exclusive ``flock`` on the folder itself (writers take turns; readers never lock),
  settles what an earlier, killed save left (see :func:`settle`), writes each new file to a temp name
  (``.<file>.<host>-<pid>-<start time>-<random>.tmp``, flocked while written, fsynced), then:

  1. config unchanged (byte for byte): rename the new weights over the old ones. Done.
  2. config changed: rename the new config to ``.adapter_config.json.pending``; rename the new weights
     over the old ones (the commit point); rename the pending config over the old config. The folder is
     fsynced after each rename, so the renames reach the disk in this order.

* a read takes the config's bytes, then opens the weights file and reads their hash. If they agree, that
  is the version. If not, a save is between its last two renames (or was killed there): the pending
  config matches the weights, and that pair is the (new) version. A mismatch with no matching pending
  file that is the same when read again is a config edited by hand (the pair is used as it is); one that
  moves is retried, and raises ``AdapterFileError`` (errno ``EBUSY``, "a save ... is in progress") when
  it keeps moving.

So at every instant between two system calls of a save, the folder holds the old pair (agreeing, maybe
with stale temp files and a pending config that does not match the weights) or the new weights with
their config either pending or in place: a reader returns the old or the new adapter, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

try:  # POSIX advisory locks; without them (Windows) saves stay atomic but writers do not take turns
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from . import _safetensors
from .errors import AdapterFileError

__all__ = ["CONFIG_NAME", "SAFETENSORS_NAME", "PENDING_NAME", "DIGEST_KEY", "MAX_CONFIG_BYTES", "digest", "os_error",
           "check_path", "locked", "settle", "write_pair", "read_pair", "read_capped", "weights_digest"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PENDING_NAME = ".adapter_config.json.pending"
CARD_FILE = "README.md"  # the model card (adaptfn._card), written after the pair
DIGEST_KEY = "adaptfn.config_sha256"
MAX_CONFIG_BYTES = 16 << 20  # PEFT configs are kilobytes; a bigger one is refused before it is parsed
_CHUNK = 16 << 20
LOCK_TIMEOUT = 300.0  # seconds a save waits for another save of the same folder
READ_TRIES = 60  # a read retries a moving folder this many times (about 1 s) before "save in progress"

_TEMP = re.compile(r"^\.(?:adapter_model\.safetensors|adapter_config\.json|README\.md)\."
                   r"(?P<host>\w+)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+\.tmp$", re.ASCII)
# temp / backup names of adaptfn before this protocol (tempfile.mkstemp: 8 random characters)
_LEGACY = re.compile(r"^\.(?:adapter_model\.safetensors|adapter_config\.json)\.[A-Za-z0-9_]{8}\.(?P<ext>tmp|bak)$")

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "I/O error",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "it already exists",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EBUSY: "device or resource busy",
}


def os_error(op: str, path: str, e: BaseException) -> AdapterFileError:
    """An :class:`AdapterFileError` (with ``errno`` set) naming the path, the operation and the reason."""
    code = getattr(e, "errno", None)
    reason = _REASONS.get(code) if code is not None else None  # type: ignore[arg-type]
    reason = reason or getattr(e, "strerror", None) or str(e) or type(e).__name__
    err = AdapterFileError(f"{path}: cannot {op}: {reason}" + (f" [errno {code}]" if code else ""))
    if code:
        err.errno = code
    return err


def check_path(path: Any, what: str) -> str:
    """``os.fspath(path)`` as a str; a NUL byte (which no file system allows) raises."""
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if "\x00" in p:
        raise AdapterFileError(f"{what}={p!r}: a path cannot hold a NUL character")
    return p


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- temp file names: who wrote them ---------------------------------------------------------------------
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux ``/proc``), 0 where unknown: with the pid it
    names one process even when pids are reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


_TAG: dict[int, str] = {}


def _tag() -> str:
    pid = os.getpid()  # a fork gets its own
    tag = _TAG.get(pid)
    if tag is None:
        tag = _TAG[pid] = f"{_host()}-{pid}-{_start_time(pid)}"
    return tag


def _writer_alive(host: str, pid: int, start: int, mtime: float) -> bool:
    """Whether the save that made a temp file may still be running. This process's own temps (another
    thread's save) and other processes' are told apart by their flock, checked after this; a temp from
    another host is kept for a day (its process cannot be checked from here)."""
    if host != _host():
        return time.time() - mtime < 86400
    if pid == os.getpid():
        return fcntl is None  # a live save of this process holds the file's flock (checked next)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists (another user's)
        pass
    if start:
        now = _start_time(pid)
        return now in (0, start)  # another start time: the pid was reused, the writer is gone
    return True


def _locked_by_other(path: str) -> bool:
    """Whether another open file description holds an flock on ``path`` (a save writing it)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases our lock, if taken
    return False


# -- locking ---------------------------------------------------------------------------------------------
def _open_dir(folder: str) -> int:
    try:
        return os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise os_error("open the folder", folder, e) from None


@contextlib.contextmanager
def locked(folder: str, *, wait: bool = True, timeout: float = LOCK_TIMEOUT) -> Iterator[int | None]:
    """Hold the folder's writer lock (an ``flock`` on the folder itself, so no lock file is left behind).

    Yields the folder's fd; with ``wait=False`` yields None at once when another process holds the lock.
    Waiting longer than ``timeout`` raises :class:`AdapterFileError` (errno ``EBUSY``). File systems
    without flock (some network mounts) are used unlocked.
    """
    if fcntl is None:  # pragma: no cover - Windows: no folder fd to lock (or to fsync)
        yield None
        return
    fd = _open_dir(folder)
    try:
        deadline, delay = time.monotonic() + timeout, 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    yield None
                    return
                if time.monotonic() > deadline:
                    err = AdapterFileError(f"{folder}: another save to this folder has held its lock for more "
                                           f"than {timeout:g} s; not saving")
                    err.errno = errno.EBUSY
                    raise err from None
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
            except OSError:  # ENOLCK / EINVAL: no flock on this file system
                break
        yield fd
    finally:
        os.close(fd)


def _fsync_dir(fd: int | None, folder: str) -> None:
    """Make the folder's renames durable (ignored where a file system cannot sync a folder)."""
    if fd is None:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EROFS):
            return
        raise os_error("sync (fsync) the folder", folder, e) from None


# -- reading ---------------------------------------------------------------------------------------------
def read_capped(path: str, limit: int = MAX_CONFIG_BYTES, *, missing_ok: bool = False) -> bytes | None:
    """A small file's bytes (a config); None when missing and ``missing_ok``; over ``limit`` bytes raises."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise AdapterFileError(f"{path}: not found") from None
    except OSError as e:
        raise os_error("read", path, e) from None
    try:
        parts, size = [], 0
        while True:
            b = os.read(fd, min(_CHUNK, limit + 1 - size))
            if not b:
                break
            parts.append(b)
            size += len(b)
            if size > limit:
                raise AdapterFileError(f"{path}: the file is over {limit >> 20} MiB; an adapter config is a few "
                                       "kilobytes, so this is not one (refused before parsing it)")
        return b"".join(parts)
    except AdapterFileError:
        raise
    except OSError as e:
        raise os_error("read", path, e) from None
    finally:
        os.close(fd)


def _header_digest(fd: int, path: str) -> str | None:
    """The config hash in an open safetensors file's metadata (None: no hash). Raises on a bad header."""
    return _digest_of(_safetensors.read_header(fd, path)[1])


def _digest_of(header: Any) -> str | None:
    meta = _safetensors.metadata(header)
    h = meta.get(DIGEST_KEY) if meta is not None else None
    return h if isinstance(h, str) else None


def weights_digest(path: str) -> str | None:
    """The config hash recorded in a weights file; None when it has none or cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    try:
        return _header_digest(fd, path)
    except (AdapterFileError, OSError):
        return None
    finally:
        os.close(fd)


def _same_file(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    return a is not None and b is not None and (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (
        b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def in_progress(folder: str, why: str) -> AdapterFileError:
    err = AdapterFileError(f"{folder}: a save to this folder is in progress ({why}); try again when it is done")
    err.errno = errno.EBUSY
    return err


class _Moved(Exception):
    """The weights file was renamed over between two reads of one attempt: start again."""


def read_pair(cpath: str, wpath: str, ppath: str | None, use: Callable[[bytes, Callable[[], Any]], Any],
              open_weights: Callable[[str], Any], direct: bool = False) -> tuple[Any, bool]:
    """Read one consistent (config, weights) version of an adapter folder.

    Arguments:
        cpath, wpath: the config and safetensors weights paths. ppath: the pending config of an unfinished
            save (None where there is no protocol, e.g. a Hub cache).
        use: ``use(config_bytes, read_tensors)`` parses the config, then calls ``read_tensors()`` for the
            tensors of the very weights file whose hash was checked; its result is returned. (So a bad
            config is reported before a bad weights file.)
        open_weights: ``open_weights(wpath)`` -> a context manager giving a safetensors handle.
        direct: read the tensors (to the CPU) from the descriptor whose hash was checked, with
            :func:`adaptfn._safetensors.read_data`, when the file is plain enough for it (else as above).

    Returns:
        ``(use's result, pending)``: pending is True when the version read is that of a save not finished
        (killed, or running between its last two renames).
    """
    folder = os.path.dirname(cpath) or "."
    delay = 0.0005
    why = "the folder kept changing while it was read"
    for _ in range(READ_TRIES):
        c = read_capped(cpath, missing_ok=True)
        try:
            fd = os.open(wpath, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            fd = None
        except OSError as e:
            raise os_error("read", wpath, e) from None
        if fd is None:  # (a save renames the weights in before a first config: no weights, no adapter yet)
            if c is None:
                raise AdapterFileError(f"{cpath}: not found (an adapter folder holds {CONFIG_NAME})")
            raise AdapterFileError(f"{folder}: no {SAFETENSORS_NAME} next to {CONFIG_NAME}")
        else:
            try:
                st1 = os.fstat(fd)
                bad: AdapterFileError | None = None
                n, header, plain = 0, None, False
                try:
                    n, header, plain = _safetensors.read_header(fd, wpath)
                    h = _digest_of(header)
                except AdapterFileError as e:  # (an OSError too: first)
                    h, bad = None, e
                except OSError as e:
                    h, bad = None, os_error("read", wpath, e)
                chosen, pending = None, False
                if c is not None and (h is None or h == digest(c)):
                    chosen = c
                else:
                    p = read_capped(ppath, missing_ok=True) if ppath else None
                    if p is not None and digest(p) == h:
                        chosen, pending = p, True
                    elif c is not None and read_capped(cpath, missing_ok=True) == c and _same_file(st1, _stat(wpath)):
                        chosen = c  # a stable pair that disagrees: a config edited outside adaptfn
                    elif c is None:  # weights without a config or a pending config of theirs
                        raise AdapterFileError(f"{cpath}: not found (an adapter folder holds {CONFIG_NAME})")
                    else:
                        why = f"{CONFIG_NAME} and {SAFETENSORS_NAME} disagree while a save renames them"
                if chosen is not None:
                    def tensors(st1: os.stat_result = st1, bad: AdapterFileError | None = bad, n: int = n,
                                header: Any = header, plain: bool = plain, fd: int = fd) -> dict[str, Any]:
                        # safetensors opens (and maps) the file by its path, maybe more than once: the path
                        # must name the very file whose hash was read (held open by fd, so its inode cannot be
                        # reused) before and after, or the tensors may come from a file renamed in meanwhile
                        if bad is not None:
                            raise bad
                        if direct:  # the very file whose hash was read: no rename can come between
                            try:
                                got = _safetensors.read_data(fd, n, header, plain, st1.st_size)
                            except OSError as e:
                                raise os_error("read", wpath, e) from None
                            if got is not None:
                                return got
                        if not _same_file(st1, _stat(wpath)):
                            raise _Moved
                        try:
                            with open_weights(wpath) as f:
                                out = {k: f.get_tensor(k) for k in f.keys()}
                        except AdapterFileError:
                            if not _same_file(st1, _stat(wpath)):
                                raise _Moved from None
                            raise
                        if not _same_file(st1, _stat(wpath)):
                            raise _Moved
                        return out

                    try:
                        return use(chosen, tensors), pending
                    except _Moved:
                        why = f"{SAFETENSORS_NAME} was replaced while it was read"
            finally:
                os.close(fd)
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    raise in_progress(folder, why)


# -- writing ---------------------------------------------------------------------------------------------
def _write_temp(folder: str, final: str, data: bytes) -> tuple[str, int]:
    """Write ``data`` to a new temp file next to ``final``, flocked (so no cleanup removes it) and fsynced.
    Returns its path and its open fd (the lock lasts until the fd is closed)."""
    path = os.path.join(folder, f".{final}.{_tag()}-{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags, 0o666)  # the umask applies, as for any file the user writes
    except OSError as e:
        raise os_error("create a temp file", path, e) from None
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        view, off = memoryview(data), 0
        try:
            while off < len(view):
                off += os.write(fd, view[off:off + _CHUNK])
        except OSError as e:
            raise os_error("write", path, e) from None
        try:
            os.fsync(fd)
        except OSError as e:
            raise os_error("sync (fsync)", path, e) from None
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return path, fd


def _rename(src: str, dst: str) -> None:
    try:
        os.replace(src, dst)
    except OSError as e:
        raise os_error(f"rename {os.path.basename(src)} to {os.path.basename(dst)} in", os.path.dirname(dst) or ".",
                       e) from None


def settle(folder: str, dirfd: int | None) -> bool:
    """Finish or undo what a killed save left, and remove stale temp files. Call it holding :func:`locked`.

    A pending config that matches the weights is renamed in (the save had committed); one that does not
    is removed (the save died before its weights were renamed in). Returns whether anything was renamed in.
    """
    ppath = os.path.join(folder, PENDING_NAME)
    rolled = False
    pending = read_capped(ppath, missing_ok=True)
    if pending is not None:
        h = weights_digest(os.path.join(folder, SAFETENSORS_NAME))
        if h is not None and h == digest(pending):
            _rename(ppath, os.path.join(folder, CONFIG_NAME))
            _fsync_dir(dirfd, folder)
            rolled = True
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ppath)
    _remove_stale(folder)
    return rolled


def _remove_stale(folder: str) -> None:
    """Remove temp files of saves that are certainly dead: the writer process (host, pid and start time in
    the name) is gone and no one holds the file's flock. Backups of the old protocol go only once the
    folder holds a complete pair."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    complete = CONFIG_NAME in names and SAFETENSORS_NAME in names
    for name in names:
        m = _TEMP.match(name)
        path = os.path.join(folder, name)
        if m is not None:
            st = _stat(path)
            if st is None or _writer_alive(m["host"], int(m["pid"]), int(m["start"]), st.st_mtime):
                continue
        else:
            legacy = _LEGACY.match(name)
            if legacy is None or (legacy["ext"] == "bak" and not complete):
                continue
        if _locked_by_other(path):
            continue
        with contextlib.suppress(OSError):
            os.unlink(path)


def write_pair(folder: str, weights: bytes, config: bytes) -> None:
    """Write an adapter folder's two files so that a reader (and a crash) sees the old pair or the new one.

    ``weights`` must carry ``DIGEST_KEY = digest(config)`` in its metadata. See the module docstring."""
    wpath, cpath = os.path.join(folder, SAFETENSORS_NAME), os.path.join(folder, CONFIG_NAME)
    ppath = os.path.join(folder, PENDING_NAME)
    with locked(folder) as dirfd:
        settle(folder, dirfd)
        for p in (wpath, cpath):
            if os.path.isdir(p):
                raise AdapterFileError(f"{p}: cannot write the adapter: a folder has this name (remove it first)")
        try:
            old = read_capped(cpath, missing_ok=True)
        except AdapterFileError:
            old = None  # unreadable or huge: replaced as a changed config
        temps: dict[str, int] = {}  # temp path -> its open (flocked) fd
        moved: set[str] = set()
        renamed_pending = committed = False
        try:
            wtmp, fd = _write_temp(folder, SAFETENSORS_NAME, weights)
            temps[wtmp] = fd
            if old == config:
                _rename(wtmp, wpath)
                moved.add(wtmp)
                committed = True
            else:
                ctmp, fd = _write_temp(folder, CONFIG_NAME, config)
                temps[ctmp] = fd
                _rename(ctmp, ppath)
                moved.add(ctmp)
                renamed_pending = True
                _fsync_dir(dirfd, folder)
                _rename(wtmp, wpath)  # the commit point: from here on a reader gets the new adapter
                moved.add(wtmp)
                committed = True
                _fsync_dir(dirfd, folder)
                _rename(ppath, cpath)
                renamed_pending = False
            _fsync_dir(dirfd, folder)
        except AdapterFileError as e:
            if committed and renamed_pending:
                raise AdapterFileError(
                    f"{e} -- the new weights are in place and the new config is in {PENDING_NAME}: af.load reads "
                    "the new adapter, and the next save or load of this folder completes the save") from None
            raise
        finally:
            for fd in temps.values():
                os.close(fd)
            for path in temps:
                if path not in moved:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            if renamed_pending and not committed:  # the weights never moved: the old pair stays
                with contextlib.suppress(OSError):
                    os.unlink(ppath)


def write_card(folder: str, card: bytes, replaceable: Callable[[bytes], bool]) -> bool:
    """Write ``README.md`` (the model card) into ``folder`` unless a card is there that ``replaceable`` refuses
    (one the user wrote or edited). Atomic like the pair: a temp file renamed in, under the folder's lock.
    Returns whether the card was written."""
    path = os.path.join(folder, CARD_FILE)
    with locked(folder) as dirfd:
        settle(folder, dirfd)  # (a folder holding only sub-folders' adapters gets no write_pair to clean it)
        try:
            old = read_capped(path, missing_ok=True)
        except AdapterFileError:
            return False  # unreadable or huge: not ours to replace
        if old is not None and (old == card or not replaceable(old)):
            return False
        tmp, fd = _write_temp(folder, CARD_FILE, card)
        try:
            _rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        _fsync_dir(dirfd, folder)
    return True
