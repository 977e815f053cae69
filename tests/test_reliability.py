"""Reliability of the adapter folder and of bad input (docs/reliability.md):

* a save stopped before each of its file operations in turn (an exception standing for a crash, then real
  ``kill -9`` of a child process at the same instants) leaves a folder that loads, here and in another
  process, as the complete old adapter or the complete new one; a reader at each instant of a live save
  sees the same; the next save cleans up;
* readers racing a writer in another process (>= 1,000 loads) get one of the two versions or a typed
  "save in progress" error, never a mix; two writers in two processes never raise untyped errors;
* stale temp files of dead writers are removed by the next save, a live writer's are kept;
* save errors (no space, I/O error, permission, rename, long names, files and folders in the way) are
  ``AdapterFileError`` naming the path and the operation, with the old adapter intact;
* dtypes, shared storage, arguments and messages;
* a reduced soak: 8 threads of mixed calls equal the single-threaded results (bench/soak.py runs the full one).
"""

from __future__ import annotations

import errno
import gc
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch
from conftest import gen, ids_for, tiny_opt
from safetensors.torch import load_file

import adaptfn as af
from adaptfn import _files
from adaptfn import io as af_io

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
FORK = mp.get_context("fork")

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (POSIX)")


# -- adapters and how to tell them apart -------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    model = tiny_opt()
    fn, params = af.functional(model)

    def lora(seed, **kw):
        cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        cfg.update(kw)
        return af.init(fn, af.LoraConfig(**cfg), generator=gen(seed))

    ads = {
        "old": lora(1),
        "new": lora(2, r=2, lora_alpha=5, target_modules=["k_proj", "fc1"]),  # another config: r, alpha, targets
        "same_config": lora(3),  # the old config, other values: the one-rename path
        "third": lora(4, r=3, lora_alpha=3, target_modules=["out_proj"]),
    }
    return model, fn, params, ads


def _key(a):
    sd = af.state_dict(a)
    return a.config.to_dict(), {k: v.clone() for k, v in sd.items()}


def which(loaded, ads) -> str:
    """The name of the adapter ``loaded`` equals (config and every tensor), else "MIX"."""
    cfg, sd = _key(loaded)
    for name, a in ads.items():
        c2, s2 = _key(a)
        if cfg == c2 and sd.keys() == s2.keys() and all(torch.equal(sd[k], s2[k]) for k in sd):
            return name
    return "MIX"


def hidden(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def root_agrees(folder) -> bool:
    """What PEFT reads (the two root files) is one pair: the weights' recorded config hash is the config's."""
    with open(os.path.join(folder, CONFIG), "rb") as f:
        return _files.weights_digest(os.path.join(folder, WEIGHTS)) == _files.digest(f.read())


# -- a stand-in for the os module that stops a save before operation k ---------------------------------
class Crash(BaseException):
    """Stands for the process dying: a BaseException, so no ``except Exception`` of the code under test
    catches it."""


# every os function adaptfn._files / adaptfn.io call on a path or a file; os.close always runs (the kernel
# closes a dead process's files too, releasing its flocks)
OPS = ("open", "read", "write", "fsync", "fstat", "stat", "replace", "rename", "unlink", "listdir", "makedirs",
       "mkdir")


class FaultyOS:
    """Counts the file operations of a save; at operation number ``at``, calls ``hook(self, name, args)``
    first. ``dead`` makes every later operation raise Crash (a crashed process does nothing more)."""

    def __init__(self, at=None, hook=None):
        self.n, self.at, self.hook, self.dead, self.log = 0, at, hook, False, []
        for name in OPS:
            setattr(self, name, self._wrap(name, getattr(os, name)))

    def __getattr__(self, name):
        return getattr(os, name)

    def _wrap(self, name, real):
        def op(*args, **kwargs):
            if self.dead:
                raise Crash(f"after the crash: {name}")
            if self.at is not None and self.n == self.at:
                self.hook(self, name, args)
            self.n += 1
            self.log.append((name, os.path.basename(str(args[0])) if args and isinstance(args[0], str) else ""))
            return real(*args, **kwargs)
        return op


def crash_hook(fos, name, args):
    fos.dead = True
    raise Crash(f"crash before operation {fos.n}: {name}")


def kill_hook(fos, name, args):
    os.kill(os.getpid(), signal.SIGKILL)


def patched(monkeypatch, fos):
    monkeypatch.setattr(_files, "os", fos)
    monkeypatch.setattr(af_io, "os", fos)


def count_ops(monkeypatch, folder, adapter):
    fos = FaultyOS()
    with monkeypatch.context() as m:
        patched(m, fos)
        af.save(adapter, folder)
    return fos


# -- a reader in another process ---------------------------------------------------------------------
def _reader_main(conn):
    while True:
        folder = conn.recv()
        if folder is None:
            return
        try:
            a = af.load(folder)
            conn.send(("ok", _key(a)))
        except af.AdaptfnError as e:
            conn.send((type(e).__name__, str(e)))
        except BaseException as e:  # noqa: BLE001
            conn.send((f"untyped {type(e).__name__}", str(e)))


@pytest.fixture(scope="module")
def reader():
    """``ask(folder)`` -> what ``af.load`` returns in another (forked) process: ("ok", key) or (error, message)."""
    parent, child = FORK.Pipe()
    proc = FORK.Process(target=_reader_main, args=(child,), daemon=True)
    proc.start()

    def ask(folder):
        parent.send(str(folder))
        if not parent.poll(60):
            raise AssertionError("the reader process did not answer")
        return parent.recv()

    yield ask
    parent.send(None)
    proc.join(10)


def remote_which(answer, ads) -> str:
    kind, payload = answer
    if kind != "ok":
        return f"{kind}: {payload}"
    cfg, sd = payload
    for name, a in ads.items():
        c2, s2 = _key(a)
        if cfg == c2 and sd.keys() == s2.keys() and all(torch.equal(sd[k], s2[k]) for k in sd):
            return name
    return "MIX"


# -- crash points ------------------------------------------------------------------------------------
SCENARIOS = {  # name: (adapter in the folder before, or None for a new folder; adapter being saved)
    "config_changes": ("old", "new"),
    "config_same": ("old", "same_config"),
    "new_folder": (None, "new"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_crash_before_every_file_operation_leaves_old_or_new(world, reader, tmp_path, monkeypatch, scenario):
    _, _, _, ads = world
    before, after = SCENARIOS[scenario]
    probe = tmp_path / "probe"
    if before:
        af.save(ads[before], probe)
    n = count_ops(monkeypatch, probe, ads[after]).n
    assert n >= 8
    seen = {}
    for k in range(n + 1):
        folder = tmp_path / f"k{k}"
        if before:
            af.save(ads[before], folder)
        fos = FaultyOS(at=k, hook=crash_hook)
        with monkeypatch.context() as m:
            patched(m, fos)
            if k < n:
                with pytest.raises(Crash):
                    af.save(ads[after], folder)
            else:
                af.save(ads[after], folder)
        step = f"k={k} ({fos.log[-1] if fos.log else 'start'} done)"
        # another process reads the folder the crash left (it may finish a committed save: that is allowed)
        there = remote_which(reader(folder), ads)
        try:
            here = which(af.load(folder), ads)
        except af.AdapterFileError as e:
            here = f"AdapterFileError: {e}"
        allowed = {before, after} if before else {after}
        if not before and k < n:  # nothing was there before: "not found" is the old state
            allowed |= {h for h in (here, there) if h.startswith("AdapterFileError") and "not found" in h}
        assert here in allowed and there in allowed, f"{scenario} {step}: here {here!r}, other process {there!r}"
        seen[k] = "not found" if here.startswith("AdapterFileError") else here
        if here in (before, after):
            assert root_agrees(folder), f"{step}: after a load, the root files are not one pair (what PEFT reads)"
        af.save(ads["third"], folder)  # the next save settles what the crash left and cleans up
        assert which(af.load(folder), ads) == "third"
        assert sorted(os.listdir(folder)) == ["README.md", CONFIG, WEIGHTS], f"{step}: left {os.listdir(folder)}"
    assert seen[0] == (before or seen[0]) and seen[n] == after
    print(f"\ncrash points ({scenario}): {n + 1} (before each of {n} file operations, and after the last); "
          f"loaded: {sorted(set(seen.values()))}")
    if scenario == "config_changes":
        assert set(seen.values()) == {"old", "new"}


@pytest.mark.parametrize("scenario", ["config_changes", "new_folder"])
def test_reader_in_another_process_at_every_instant_of_a_live_save(world, reader, tmp_path, monkeypatch, scenario):
    """The save pauses before each file operation (holding its lock) while another process loads."""
    _, _, _, ads = world
    before, after = SCENARIOS[scenario]
    folder = tmp_path / "live"
    if before:
        af.save(ads[before], folder)
    answers = []

    def ask_reader(fos, name, args):
        answers.append((fos.n, name, remote_which(reader(folder), ads)))

    probe = tmp_path / "probe"
    if before:
        af.save(ads[before], probe)
    n = count_ops(monkeypatch, probe, ads[after]).n
    for k in range(n):
        if before:
            af.save(ads[before], folder)
        elif folder.exists():
            for name in os.listdir(folder):
                os.unlink(folder / name)
        with monkeypatch.context() as m:
            patched(m, FaultyOS(at=k, hook=ask_reader))
            af.save(ads[after], folder)
    assert len(answers) == n
    for k, name, got in answers:
        ok = got in (before, after) or (not before and "not found" in got)
        assert ok, f"before operation {k} ({name}): the other process got {got!r}"
    assert {g for _, _, g in answers} >= ({before, after} if before else {after})


def _killed_save(folder, adapter, k):
    """In a forked child: save, dying by SIGKILL before file operation k. Returns the exit code (-9: killed)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fos = FaultyOS(at=k, hook=kill_hook)
            _files.os = fos
            af_io.os = fos
            af.save(adapter, folder)
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_kill_9_before_every_file_operation(world, reader, tmp_path, monkeypatch):
    """Real kills (the child stops itself with SIGKILL before file operation k), each into a fresh copy of the
    old adapter: the folder loads as the old or the new one, here and in another process."""
    _, _, _, ads = world
    probe = tmp_path / "probe"
    af.save(ads["old"], probe)
    n = count_ops(monkeypatch, probe, ads["new"]).n
    results = []
    for k in range(n):
        folder = str(tmp_path / f"k{k}")
        af.save(ads["old"], folder)
        code = _killed_save(folder, ads["new"], k)
        assert code == -signal.SIGKILL, f"k={k}: the child exited with {code}"
        there = remote_which(reader(folder), ads)
        here = which(af.load(folder), ads)
        assert here in ("old", "new") and there in ("old", "new"), f"k={k}: {here!r} / {there!r}"
        assert root_agrees(folder)
        results.append(here)
        af.save(ads["third"], folder)
        assert hidden(folder) == [], f"k={k}: the next save left {hidden(folder)}"
    assert "old" in results and "new" in results
    assert results == sorted(results, key=lambda r: r == "new")  # old until the commit point, new after


def test_forty_killed_saves_leave_no_pile_of_leftovers(world, tmp_path, monkeypatch):
    """The issue's case: 40 saves killed at random instants into one folder. Each save removes what the
    previous killed ones left, so leftovers never pile up; every state loads; the next save leaves none."""
    import random

    _, _, _, ads = world
    probe = tmp_path / "probe"
    af.save(ads["old"], probe)
    n = count_ops(monkeypatch, probe, ads["new"]).n
    folder = str(tmp_path / "killed")
    af.save(ads["old"], folder)
    rng = random.Random(0)
    current, most, results = "old", 0, []
    for _ in range(40):
        target = "new" if current == "old" else "old"
        code = _killed_save(folder, ads[target], rng.randrange(n + 4))  # (+ cleanup ops of earlier kills)
        assert code in (0, -signal.SIGKILL)
        here = which(af.load(folder), ads)
        assert here in (current, target), here
        most = max(most, len(hidden(folder)))
        results.append(here)
        current = here
    assert most <= 3, f"leftovers piled up: {most} hidden files at once"
    af.save(ads["third"], folder)
    assert hidden(folder) == [] and which(af.load(folder), ads) == "third"


# -- readers and writers in other processes --------------------------------------------------------------
def _writer_main(folder, adapters, stop, count, errors):
    i = 0
    while not stop.is_set():
        try:
            af.save(adapters[i % len(adapters)], folder)
        except BaseException as e:  # noqa: BLE001
            errors.put(f"{type(e).__name__}: {e}")
            return
        i += 1
        count.value = i


def test_loads_racing_saves_in_another_process_see_one_version(world, tmp_path):
    """>= 1,000 loads while another process alternates two adapters whose configs differ."""
    _, _, _, ads = world
    folder = str(tmp_path / "race")
    af.save(ads["old"], folder)
    stop, count, errors = FORK.Event(), FORK.Value("i", 0), FORK.Queue()
    writer = FORK.Process(target=_writer_main, args=(folder, [ads["new"], ads["old"]], stop, count, errors))
    writer.start()
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    try:
        while count.value < 5:  # the writer is going
            assert writer.is_alive() and time.perf_counter() - t0 < 120, errors.get(timeout=1)
            time.sleep(0.005)
        loads, target = 0, int(os.environ.get("ADAPTFN_RACE_LOADS", "1000"))
        while loads < target or counts.get("old", 0) == 0 or counts.get("new", 0) == 0:
            try:
                got = which(af.load(folder), ads)
            except af.AdapterFileError as e:
                assert e.errno == errno.EBUSY and "save to this folder is in progress" in str(e), str(e)
                got = "save in progress"
            counts[got] = counts.get(got, 0) + 1
            loads += 1
            assert loads < 20 * target
    finally:
        stop.set()
        writer.join(30)
    assert errors.empty(), errors.get()
    saves = count.value
    print(f"\nrace: {loads} loads during {saves} saves in {time.perf_counter() - t0:.1f} s: {counts}")
    assert set(counts) <= {"old", "new", "save in progress"}, counts
    assert counts.get("MIX", 0) == 0 and saves >= 10


def test_two_writer_processes_and_a_reader(world, tmp_path):
    """Concurrent saves of two adapters into one folder take turns: no raw exception in either writer, every
    load is one of the two, the last save wins, and nothing is left behind."""
    _, _, _, ads = world
    folder = str(tmp_path / "two")
    af.save(ads["old"], folder)
    stop, errors = FORK.Event(), FORK.Queue()
    counts = [FORK.Value("i", 0), FORK.Value("i", 0)]
    writers = [FORK.Process(target=_writer_main, args=(folder, [ads[n]], stop, c, errors))
               for n, c in zip(("old", "new"), counts)]
    for w in writers:
        w.start()
    seen = {}
    t0 = time.perf_counter()
    try:
        while min(c.value for c in counts) < 60:
            assert time.perf_counter() - t0 < 240, f"the writers are stuck: {[c.value for c in counts]}"
            try:
                got = which(af.load(folder), ads)
            except af.AdapterFileError as e:
                assert e.errno == errno.EBUSY, str(e)
                got = "save in progress"
            seen[got] = seen.get(got, 0) + 1
            assert all(w.is_alive() for w in writers) or not errors.empty()
            if not errors.empty():
                break
    finally:
        stop.set()
        for w in writers:
            w.join(30)
    assert errors.empty(), errors.get()
    assert set(seen) <= {"old", "new", "save in progress"}, seen
    assert which(af.load(folder), ads) in ("old", "new")
    assert hidden(folder) == [] and root_agrees(folder)


def test_threads_saving_to_one_folder_take_turns(world, tmp_path):
    _, _, _, ads = world
    folder = str(tmp_path / "threads")
    errs = []

    def work(name):
        try:
            for _ in range(15):
                af.save(ads[name], folder)
        except BaseException as e:  # noqa: BLE001
            errs.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("old", "new", "same_config")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errs == []
    assert which(af.load(folder), ads) in ("old", "new", "same_config")
    assert hidden(folder) == [] and root_agrees(folder)


# -- stale files -------------------------------------------------------------------------------------
def _dead_pid():
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _temp_name(final, host, pid, start):
    return f".{final}.{host}-{pid}-{start}-0123abcd.tmp"


def _hold_temp(path, ready, release):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)
    ready.set()
    release.wait(30)
    os.close(fd)


def test_stale_temp_files_are_removed_and_live_ones_kept(world, tmp_path):
    _, _, _, ads = world
    folder = str(tmp_path / "stale")
    af.save(ads["old"], folder)
    host = _files._host()
    me, start = os.getpid(), _files._start_time(os.getpid())
    dead = _dead_pid()
    stale = [
        _temp_name(WEIGHTS, host, dead, 12345),  # its writer is gone
        _temp_name(CONFIG, host, dead, 0),
        _temp_name(WEIGHTS, host, os.getppid(), 1),  # a live pid, but another start time: pid reused
        _temp_name(WEIGHTS, host, me, start),  # this process, not flocked: no save of ours is writing it
        f".{WEIGHTS}.a1b2c3d4.tmp", f".{CONFIG}.zz99yy88.tmp",  # adaptfn's earlier temp / backup names
        f".{WEIGHTS}.q1w2e3r4.bak", f".{CONFIG}.k9j8h7g6.bak",
    ]
    for name in stale:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"x" * 1000)
    # live: another process holds the file's flock (a save writing it), with a dead-looking name
    live_locked = _temp_name(WEIGHTS, host, dead, 777)
    ready, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold_temp, args=(os.path.join(folder, live_locked), ready, release))
    holder.start()
    assert ready.wait(30)
    live_pid = _temp_name(CONFIG, host, os.getppid(), _files._start_time(os.getppid()))  # its writer runs
    other_host = _temp_name(WEIGHTS, "some_other_host", 1, 1)  # cannot be checked from here: kept for a day
    user = ".my-notes.tmp"  # not adaptfn's
    for name in (live_pid, other_host, user):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"y")
    try:
        af.save(ads["new"], folder)
        assert hidden(folder) == sorted([live_locked, live_pid, other_host, user])
        assert which(af.load(folder), ads) == "new"
    finally:
        release.set()
        holder.join(30)
    af.save(ads["old"], folder)  # the holder has exited: its file is stale now
    assert hidden(folder) == sorted([live_pid, other_host, user])


def test_old_protocol_backups_are_kept_while_the_pair_is_incomplete(world, tmp_path):
    """A backup of adaptfn's earlier protocol may hold the only copy of a file: it goes only once the folder
    holds a complete pair again."""
    _, _, _, ads = world
    folder = str(tmp_path / "bak")
    af.save(ads["old"], folder)
    os.replace(os.path.join(folder, WEIGHTS), os.path.join(folder, f".{WEIGHTS}.abcd1234.bak"))
    with pytest.raises(af.AdapterFileError, match=WEIGHTS):
        af.load(folder)
    _files._remove_stale(folder)
    assert hidden(folder) == [f".{WEIGHTS}.abcd1234.bak"]
    af.save(ads["new"], folder)
    af.save(ads["new"], folder)
    assert hidden(folder) == []


# -- save errors -----------------------------------------------------------------------------------------
def _failing(monkeypatch, name, exc, when=lambda args: True):
    real = getattr(os, name)
    fos = FaultyOS()

    def op(*args, **kwargs):
        if when(args):
            raise exc
        return real(*args, **kwargs)

    setattr(fos, name, op)
    patched(monkeypatch, fos)


def _eio(code):
    return OSError(code, os.strerror(code))


@pytest.mark.parametrize(("case", "op", "code", "words"), [
    ("disk full while writing", "write", errno.ENOSPC, "cannot write: no space left on device"),
    ("quota while writing", "write", errno.EDQUOT, "disk quota exceeded"),
    ("I/O error at fsync", "fsync", errno.EIO, "cannot sync (fsync): I/O error"),
    ("permission denied creating a file", "open", errno.EACCES, "cannot create a temp file: permission denied"),
    ("read-only file system", "open", errno.EROFS, "read-only file system"),
    ("rename fails", "replace", errno.EIO, "cannot rename"),
    ("rename across devices", "replace", errno.EXDEV, "cannot rename"),
])
def test_save_errors_are_typed_and_keep_the_old_adapter(world, tmp_path, monkeypatch, case, op, code, words):
    _, _, _, ads = world
    folder = str(tmp_path / "err")
    af.save(ads["old"], folder)
    when = (lambda args: len(args) > 1 and args[1] & os.O_CREAT) if op == "open" else (lambda args: True)
    with monkeypatch.context() as m:
        _failing(m, op, _eio(code), when)
        with pytest.raises(af.AdapterFileError) as ei:
            af.save(ads["new"], folder)
    e = ei.value
    assert isinstance(e, OSError) and e.errno == code
    assert words in str(e) and folder in str(e), str(e)
    assert which(af.load(folder), ads) == "old"
    assert hidden(folder) == [] and root_agrees(folder)


def test_io_error_syncing_the_folder_after_the_commit_says_what_happened(world, tmp_path, monkeypatch):
    _, _, _, ads = world
    folder = str(tmp_path / "dirsync")
    af.save(ads["old"], folder)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 4:  # temp weights, temp config, folder after step 1, folder after step 2 (committed)
            raise _eio(errno.EIO)
        return real_fsync(fd)

    with monkeypatch.context() as m:
        fos = FaultyOS()
        fos.fsync = fsync
        patched(m, fos)
        with pytest.raises(af.AdapterFileError) as ei:
            af.save(ads["new"], folder)
    assert "I/O error" in str(ei.value) and "af.load reads the new adapter" in str(ei.value)
    assert which(af.load(folder), ads) == "new"  # committed: the load reads (and finishes) it
    assert hidden(folder) == [] and root_agrees(folder)


def test_save_path_errors(world, tmp_path):
    _, _, _, ads = world
    a = ads["old"]
    folder = str(tmp_path / "ok")
    af.save(a, folder)
    cases = [
        (os.path.join(folder, CONFIG), "it is a file, not a folder"),  # the target is a file
        (os.path.join(folder, CONFIG, "sub"), "a file, not a folder"),  # a parent is a file
        (str(tmp_path / ("x" * 300)), "file name too long"),
        (str(tmp_path / "a\x00b"), "NUL"),
    ]
    for path, words in cases:
        with pytest.raises(af.AdapterFileError) as ei:
            af.save(a, path)
        assert words in str(ei.value), str(ei.value)
    for bad in (None, 5, b"bytes/path"):
        with pytest.raises(af.ConfigError, match="directory must be"):
            af.save(a, bad)
    assert which(af.load(folder), ads) == "old"
    # an existing folder whose config is binary garbage: overwritten
    with open(os.path.join(folder, CONFIG), "wb") as f:
        f.write(bytes(range(256)))
    af.save(ads["new"], folder)
    assert which(af.load(folder), ads) == "new"
    # ... or is a folder: refused, the weights left as they were
    bad = str(tmp_path / "cfgdir")
    af.save(a, bad)
    os.remove(os.path.join(bad, CONFIG))
    os.makedirs(os.path.join(bad, CONFIG))
    with pytest.raises(af.AdapterFileError, match="a folder has this name"):
        af.save(ads["new"], bad)
    assert load_file(os.path.join(bad, WEIGHTS)).keys() == af.state_dict(a).keys()
    assert hidden(bad) == []


# -- read errors: told apart -------------------------------------------------------------------------
def test_read_errors_say_what_happened(world, tmp_path, monkeypatch):
    _, _, _, ads = world
    folder = str(tmp_path / "r")
    af.save(ads["old"], folder)
    w = os.path.join(folder, WEIGHTS)
    for code, words in ((errno.EACCES, "permission denied"), (errno.EIO, "I/O error")):
        with monkeypatch.context() as m:
            _failing(m, "open", _eio(code), lambda args: args[0] == w)
            with pytest.raises(af.AdapterFileError) as ei:
                af.load(folder)
        assert words in str(ei.value) and w in str(ei.value) and "corrupt" not in str(ei.value)
        assert ei.value.errno == code
        with monkeypatch.context() as m:
            _failing(m, "read", _eio(code))
            with pytest.raises(af.AdapterFileError) as ei:
                af.load(folder)
        assert words in str(ei.value) and "corrupt" not in str(ei.value)
    with pytest.raises(af.ConfigError, match="not a device"):
        af.load(folder, device="bogus-device")
    with open(w, "r+b") as f:
        f.truncate(100)
    with pytest.raises(af.AdapterFileError, match="corrupt or truncated"):
        af.load(folder)


def test_missing_local_paths_are_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("exists")
    for source in ("./missing", "../missing-too", "exists/missing", "a/b/c", "~/surely-not-here-adaptfn",
                   str(tmp_path / "abs-missing"), "with space"):
        with pytest.raises(af.AdapterFileError) as ei:
            af.load(source)
        msg = str(ei.value)
        assert "no such local folder" in msg and "Hub" not in msg, msg
    with pytest.raises(af.AdapterFileError) as ei:
        af.load("someone/no-such-adapter")  # can be a repo id: both are said
    assert "no local folder" in str(ei.value) and "Hub" in str(ei.value)


# -- a save in progress, held still ----------------------------------------------------------------------
def test_load_between_the_last_two_renames_returns_the_new_adapter(world, tmp_path, monkeypatch):
    _, _, _, ads = world
    folder = str(tmp_path / "held")
    af.save(ads["old"], folder)
    got = {}

    def at_last_rename(fos, name, args):
        if name == "replace" and str(args[1]).endswith(CONFIG):
            got["mid"] = which(af.load(folder), ads)
            got["files"] = sorted(os.listdir(folder))

    with monkeypatch.context() as m:
        fos = FaultyOS(at=None)
        real = fos.replace

        def replace(*args, **kwargs):
            at_last_rename(fos, "replace", args)
            return real(*args, **kwargs)

        fos.replace = replace
        patched(m, fos)
        af.save(ads["new"], folder)
    assert got["mid"] == "new" and _files.PENDING_NAME in got["files"]


def test_a_folder_that_keeps_changing_raises_save_in_progress(world, tmp_path, monkeypatch):
    _, _, _, ads = world
    folder = str(tmp_path / "moving")
    af.save(ads["old"], folder)
    with open(os.path.join(folder, CONFIG), "rb") as f:
        text = f.read()
    flip = [0]
    real_stat = os.stat

    def stat(path, *a, **k):  # the weights file is always "another one" than the one opened
        st = real_stat(path, *a, **k)
        if str(path).endswith(WEIGHTS):
            flip[0] += 1
            return os.stat_result((st.st_mode, st.st_ino + flip[0], *st[2:]))
        return st

    with open(os.path.join(folder, CONFIG), "wb") as f:
        f.write(text.replace(b'"r": 4', b'"r": 2'))  # disagrees with the weights' hash
    monkeypatch.setattr(_files, "READ_TRIES", 5)
    with monkeypatch.context() as m:
        fos = FaultyOS()
        fos.stat = stat
        patched(m, fos)
        with pytest.raises(af.AdapterFileError) as ei:
            af.load(folder)
    assert ei.value.errno == errno.EBUSY and "in progress" in str(ei.value)


def test_config_edited_by_hand_is_used(world, tmp_path):
    """A weights file whose recorded hash disagrees with a config that does not move is a hand edit: used."""
    _, _, _, ads = world
    folder = str(tmp_path / "edited")
    af.save(ads["old"], folder)
    import json

    p = os.path.join(folder, CONFIG)
    with open(p, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["lora_alpha"] = 16
    with open(p, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    assert af.load(folder).config.lora_alpha == 16


# -- dtypes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.float8_e4m3fn])
def test_non_float_leaves_are_refused_naming_module_leaf_dtype(world, dtype):
    _, fn, params, ads = world
    a = ads["old"]
    p = a.paths[0]
    bad = af.tree.map(lambda t: t.to(dtype) if t.dim() else t, a)  # deltas only (gates stay float)
    for call in (lambda: af.inject(fn, bad), lambda: af.merge(params, bad), lambda: af.save(bad, "never")):
        with pytest.raises(af.IncompatibleAdapterError) as ei:
            call()
        msg = str(ei.value)
        assert p in msg and "lora_A" in msg and str(dtype).replace("torch.", "") in msg
    assert not os.path.exists("never")
    gate_int = af.tree.map(lambda t: t.to(torch.int64) if t.dim() == 0 else t, a)
    with pytest.raises(af.IncompatibleAdapterError, match="'gate' leaf is int64"):
        af.inject(fn, gate_int)


def test_mixed_delta_dtypes_and_replacement_kinds_are_refused(world):
    model, fn, params, ads = world
    a = ads["old"]
    p = a.paths[0]
    tensors = {q: dict(a.leaves(q)) for q in a.paths}
    tensors[p]["lora_B"] = tensors[p]["lora_B"].half()
    mixed = af.Adapter(a.method, a.config, a.entries, tensors)
    with pytest.raises(af.IncompatibleAdapterError, match="different dtypes.*lora_A float32, lora_B float16"):
        af.inject(fn, mixed)
    with_repl = af.init(fn, af.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["fc2"]), generator=gen(0))
    fc2 = next(q for q in with_repl.paths if q.endswith("fc2"))
    int_repl = af.tree.map(lambda t: t.to(torch.int32) if t.dim() == 2 and t.shape[0] == 22 and t.shape[1] == 37
                           else t, with_repl)
    with pytest.raises(af.IncompatibleAdapterError, match=f"{fc2}.*'weight' is int32.*float32"):
        af.inject(fn, int_repl)
    with pytest.raises(af.IncompatibleAdapterError, match="int32"):
        af.merge(params, int_repl)
    with pytest.raises(af.ConfigError, match="not a compute dtype"):
        af.load("anything", dtype=torch.int8)


def test_huge_alpha_is_refused_before_it_overflows(world):
    _, fn, _, _ = world
    for alpha in (1e308, 1e39, float("inf"), float("nan")):
        with pytest.raises(af.ConfigError, match="lora_alpha"):
            af.LoraConfig(lora_alpha=alpha, target_modules=["q_proj"])
    with pytest.raises(af.ConfigError, match="alpha_pattern"):
        af.LoraConfig(target_modules=["q_proj"], alpha_pattern={"q_proj": 1e300})
    with pytest.raises(af.ConfigError, match="scaling"):
        af.Entry(kind="linear", r=1, scaling=1e39)


# -- shared storage ------------------------------------------------------------------------------------
def test_leaves_sharing_storage_save_and_load(world, tmp_path):
    _, fn, params, ads = world
    a = ads["old"]
    p0, p1 = a.paths[0], a.paths[1]
    tensors = {q: dict(a.leaves(q)) for q in a.paths}
    block = torch.randn(30, 22, generator=gen(5))
    tensors[p0]["lora_A"] = block[:4]  # two views of one tensor ...
    tensors[p0]["lora_B"] = block[8:30, :4]  # (a non-contiguous one)
    tensors[p1]["lora_A"] = tensors[p0]["lora_A"]  # ... and one tensor in two entries
    shared = af.Adapter(a.method, a.config, a.entries, tensors)
    af.save(shared, tmp_path / "s")
    back = af.load(tmp_path / "s")
    sd, ref = af.state_dict(back), af.state_dict(shared)
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    ids = ids_for(world[0])
    torch.testing.assert_close(af.inject(fn, back)(params, input_ids=ids).logits,
                               af.inject(fn, shared)(params, input_ids=ids).logits)


# -- arguments -----------------------------------------------------------------------------------------
def test_bad_arguments_are_typed_errors(world):
    model, fn, params, ads = world
    a = ads["old"]
    ids = ids_for(model)
    cases = [
        (lambda: af.load(None), "source must be"),
        (lambda: af.load(5), "source must be"),
        (lambda: af.load(b"path"), "source must be"),
        (lambda: af.load(""), "empty"),
        (lambda: af.merge(None, a), "params must be a mapping"),
        (lambda: af.merge(params, None), "expected an adaptfn Adapter"),
        (lambda: fn(None, input_ids=ids), "params must be a mapping"),
        (lambda: fn({"model.decoder.embed_tokens.weight": 5}, input_ids=ids), "not a tensor"),
        (lambda: af.stack(None), "expected a list"),
        (lambda: af.stack(a), "expected a list"),
        (lambda: af.select({"a": a}, 5), "pick by name"),
        (lambda: af.select({"a": a}, [5]), "pick by name"),
        (lambda: af.unstack(None), "expected a stacked Adapter"),
        (lambda: af.unstack({}), "expected a stacked Adapter"),
        (lambda: af.AdapterModel(None), "must be a torch.nn.Module"),
        (lambda: af.AdapterModel("x"), "must be a torch.nn.Module"),
        (lambda: af.init(fn, af.LoraConfig(target_modules=["q_proj"]), generator=5), "generator must be"),
        (lambda: af.init(fn, af.LoraConfig(target_modules=["q_proj"]), dtype=torch.int8), "dtype must be"),
        (lambda: af.inject(fn, a, generator="seed"), "generator must be"),
        (lambda: af.AdapterModel(tiny_opt()).add_adapter(af.LoraConfig(target_modules=["q_proj"]), generator=1),
         "generator must be"),
        (lambda: af.LoraConfig(target_modules=5), "target_modules: must be a list of str"),
        (lambda: af.save({}, "x"), "empty"),
    ]
    for call, words in cases:
        with pytest.raises(af.AdaptfnError, match=words):
            call()


# -- a reduced soak (bench/soak.py: 8 threads x 2,000 calls) -----------------------------------------------
def test_soak_reduced(world, one_thread):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import soak

    gc.collect()
    report = soak.run(threads=8, calls=40, seed=0)
    assert report["mismatches"] == 0 and report["errors"] == [], report
    assert report["calls"] == 8 * 40
