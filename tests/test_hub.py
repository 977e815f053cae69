"""adaptfn.load from the Hugging Face Hub, without the internet, both ways:

(b) a loopback Hub: an ``http.server`` on 127.0.0.1 (port 0) speaking the part of the Hub protocol that
    ``huggingface_hub.hf_hub_download`` (2.4) uses: ``HEAD``/``GET /{repo}/resolve/{revision}/{path}`` with
    ``X-Repo-Commit``, ``ETag`` / ``X-Linked-Etag`` / ``X-Linked-Size``, ``Content-Length``, same-host
    redirects for the LFS files, and the ``X-Error-Code`` 401/404 answers (RepoNotFound, RevisionNotFound,
    EntryNotFound). ``HF_ENDPOINT`` (and the ``huggingface_hub.constants`` read from it at import) point at it.
    Uploads (``create_repo``, ``create_branch``, ``upload_folder`` / ``create_commit``): ``POST /api/repos/create``,
    ``/api/models/{repo}/branch/{branch}``, ``/preupload/{revision}`` (every file "regular": its bytes travel
    base64 in the commit; the LFS / Xet transfers are huggingface_hub's own and not exercised here),
    ``/commit/{revision}`` (NDJSON) and ``/api/validate-yaml``; writes need a token from ``FakeHub.writers``
    (401 without one, 403 for another namespace).
(a) a populated HF cache in offline mode (``local_files_only=True`` and ``HF_HUB_OFFLINE=1``), filled by a
    real download from (b), and one laid out by hand (``models--user--repo/{refs,snapshots,blobs}``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

import pytest
import torch
from conftest import gen, tiny_opt

import adaptfn as af

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BIN = "adapter_model.bin"


# -- adapters to publish -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _adapters():
    fn, _ = af.functional(tiny_opt())
    mk = lambda seed, **kw: af.init(  # noqa: E731
        fn, af.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                             "init_lora_weights": False, **kw}), generator=gen(seed))
    return mk(1), mk(2), mk(3, r=2, target_modules=["fc1"])


def files_of(adapter, tmp, name, bin_too=False, bin_only=False):
    """{filename: bytes} of an adapter folder, as af.save writes it (optionally with / as a pickle)."""
    folder = os.path.join(tmp, name)
    af.save(adapter, folder)
    out = {}
    for f in (CONFIG, WEIGHTS):
        with open(os.path.join(folder, f), "rb") as fh:
            out[f] = fh.read()
    if bin_too or bin_only:
        torch.save(af.state_dict(adapter), os.path.join(folder, BIN))
        with open(os.path.join(folder, BIN), "rb") as fh:
            out[BIN] = fh.read()
    if bin_only:
        del out[WEIGHTS]
    return out


def under(prefix, files):
    return {f"{prefix}/{k}": v for k, v in files.items()}


def same(a, b) -> bool:
    sa, sb = af.state_dict(a), af.state_dict(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the loopback Hub --------------------------------------------------------------------------------
class FakeHub:
    """Repos: {repo_id: {"refs": {name: commit}, "commits": {commit: {path: bytes}}, "token": str | None}}."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, authorization header)
        self.forced: dict[str, int] = {}  # file path -> HTTP status to answer instead
        self.writers: dict[str, str] = {}  # write token -> the namespace it may write to
        self.messages: dict[str, str] = {}  # commit -> its message (uploaded commits)
        self._n = 0
        self._lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.endpoint = ""

    def publish(self, repo, files, refs=("main",), token=None):
        self._n += 1
        h = hashlib.sha1(repr((repo, self._n, sorted(files))).encode())
        for k in sorted(files):
            h.update(files[k])
        commit = h.hexdigest()
        r = self.repos.setdefault(repo, {"refs": {}, "commits": {}, "token": token})
        r["commits"][commit] = dict(files)
        for ref in refs:
            r["refs"][ref] = commit
        return commit

    def requested(self, method=None):
        with self._lock:
            return [p for m, p, _ in self.log if method is None or m == method]

    def start(self):
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        host, port = self.server.server_address[:2]
        assert host == "127.0.0.1"
        self.endpoint = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            assert not self.thread.is_alive()
            self.server = None


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def do_POST(self):
        hub = self.hub
        with hub._lock:
            hub.log.append((self.command, self.path, self.headers.get("authorization")))
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = urlsplit(self.path).path.split("/")
        if parts[1:3] == ["api", "validate-yaml"]:
            return self._json(200, {"errors": [], "warnings": []})
        if parts[1:4] == ["api", "repos", "create"]:
            payload = json.loads(data)
            repo = f"{payload['organization']}/{payload['name']}"
            if not self._may_write(repo):
                return None
            with hub._lock:
                if repo in hub.repos:
                    return self._json(409, {"error": "You already created this model repo",
                                            "url": f"{hub.endpoint}/{repo}"})
                token = self.headers["authorization"].removeprefix("Bearer ")
                hub.publish(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                            token=token if payload.get("visibility") == "private" else None)
            return self._json(200, {"url": f"{hub.endpoint}/{repo}"})
        if len(parts) < 7 or parts[1:3] != ["api", "models"]:
            return self._send(404, {}, b"not found")
        repo, action, revision = f"{parts[3]}/{parts[4]}", parts[5], unquote("/".join(parts[6:]))
        r = hub.repos.get(repo)
        if r is None:
            return self._error(404, "RepoNotFound", True)
        if not self._may_write(repo):
            return None
        if action == "branch":
            with hub._lock:
                if revision in r["refs"]:
                    return self._json(409, {"error": "Reference already exists"})
                start = (json.loads(data) if data else {}).get("startingPoint") or "main"
                r["refs"][revision] = r["refs"].get(start) or start
            return self._json(200, {})
        if revision not in r["refs"]:
            return self._error(404, "RevisionNotFound", True)
        if action == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                     for f in json.loads(data)["files"]]
            return self._json(200, {"files": files})
        if action == "commit":
            lines = [json.loads(line) for line in data.splitlines() if line.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            with hub._lock:
                files = dict(r["commits"][r["refs"][revision]])
                for x in lines:
                    if x["key"] == "file":
                        files[x["value"]["path"]] = base64.b64decode(x["value"]["content"])
                    elif x["key"] == "deletedFile":
                        files.pop(x["value"]["path"], None)
                    elif x["key"] != "header":
                        return self._json(400, {"error": f"the fake Hub takes no {x['key']!r} operations"})
                commit = hub.publish(repo, files, refs=(revision,), token=r["token"])
                hub.messages[commit] = header["summary"]
            return self._json(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{commit}", "commitOid": commit,
                                    "pullRequestUrl": None})
        return self._send(404, {}, b"not found")

    def _may_write(self, repo):
        """True when the request's token may write to ``repo``; else answers 401 / 403 and returns False."""
        auth = self.headers.get("authorization") or ""
        namespace = self.hub.writers.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
        if namespace is None:
            self._json(401, {"error": "Invalid credentials in Authorization header"},
                       {"X-Error-Message": "Invalid credentials in Authorization header"})
            return False
        if repo.split("/")[0] != namespace:
            self._json(403, {"error": f"You don't have the rights to create a model under the namespace "
                                      f"{repo.split('/')[0]!r}"})
            return False
        return True

    def _json(self, status, obj, extra=None):
        self._send(status, {"Content-Type": "application/json", **(extra or {})}, json.dumps(obj).encode())

    def _send(self, status, headers, data=b"", body=True):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if body and data:
            self.wfile.write(data)

    def _error(self, status, code, body, extra=None):
        self._send(status, {"X-Error-Code": code, "X-Error-Message": code, **(extra or {})}, code.encode(), body)

    def _serve(self, body):
        hub = self.hub
        with hub._lock:
            hub.log.append((self.command, self.path, self.headers.get("authorization")))
        parts = urlsplit(self.path).path.split("/")
        if len(parts) < 6 or parts[3] != "resolve":
            return self._send(404, {}, b"not found", body)
        repo, revision, filename = f"{parts[1]}/{parts[2]}", unquote(parts[4]), unquote("/".join(parts[5:]))
        r = hub.repos.get(repo)
        if r is None or (r["token"] and self.headers.get("authorization") != f"Bearer {r['token']}"):
            return self._error(401, "RepoNotFound", body)  # what the Hub says for missing or private repos
        commit = r["refs"].get(revision) or (revision if revision in r["commits"] else None)
        if commit is None:
            return self._error(404, "RevisionNotFound", body)
        if filename in hub.forced:
            return self._send(hub.forced[filename], {"X-Repo-Commit": commit}, b"denied", body)
        files = r["commits"][commit]
        if filename not in files:
            return self._error(404, "EntryNotFound", body, {"X-Repo-Commit": commit})
        data = files[filename]
        if filename.endswith(".json"):  # a "git" file: served directly, ETag = its git blob sha1
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            return self._send(200, {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, data, body)
        sha256 = hashlib.sha256(data).hexdigest()  # an "LFS" file
        if revision != commit:  # a ref: redirect (same host) to the commit's copy, as the Hub does
            location = f"/{repo}/resolve/{commit}/{quote(filename)}"
            return self._send(302, {"Location": location, "X-Repo-Commit": commit,
                                    "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))}, b"", body)
        self._send(200, {"X-Repo-Commit": commit, "ETag": f'"{sha256}"', "X-Linked-Size": str(len(data))}, data, body)


def _online(monkeypatch, endpoint):
    """Point huggingface_hub at ``endpoint`` and turn offline mode off, for this test only."""
    from huggingface_hub import close_session, constants, hf_api

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    # huggingface_hub's module-level functions (list_repo_tree, model_info, ...) are methods of one HfApi made at
    # import, which keeps the endpoint of that moment
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    hub_utils = sys.modules.get("transformers.utils.hub")  # transformers keeps its own HfApi, made on first use
    if hub_utils is not None and hasattr(hub_utils, "_hf_api"):
        monkeypatch.setattr(hub_utils, "_hf_api", None)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)  # no token from ~/.cache unless asked
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    close_session()  # the shared HTTP client is rebuilt with this environment


def _offline(monkeypatch):
    from huggingface_hub import close_session, constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    close_session()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import close_session

    h = FakeHub()
    h.start()
    h.cache = str(tmp_path / "hf-cache")
    _online(monkeypatch, h.endpoint)
    try:
        yield h
    finally:
        h.stop()
        close_session()


# -- (b) downloads from the loopback Hub -----------------------------------------------------------
def test_download_from_loopback_hub(hub, tmp_path):
    a, _, _ = _adapters()
    commit = hub.publish("user/repo", files_of(a, tmp_path, "a"))
    got = af.load("user/repo", cache_dir=hub.cache)
    assert same(got, a) and got.config == a.config
    # only the two files were fetched, safetensors (never the pickle)
    fetched = hub.requested("GET")
    assert any(p.endswith("/" + CONFIG) for p in fetched) and any(p.endswith("/" + WEIGHTS) for p in fetched)
    assert not any(BIN in p for p in hub.requested())
    # it landed in the standard cache layout
    repo_dir = os.path.join(hub.cache, "models--user--repo")
    with open(os.path.join(repo_dir, "refs", "main")) as f:
        assert f.read() == commit
    for name in (CONFIG, WEIGHTS):
        assert os.path.isfile(os.path.join(repo_dir, "snapshots", commit, name))
    assert len(os.listdir(os.path.join(repo_dir, "blobs"))) == 2


def test_revision(hub, tmp_path):
    a, b, _ = _adapters()
    c_a = hub.publish("user/repo", files_of(a, tmp_path, "a"), refs=("main",))
    c_b = hub.publish("user/repo", files_of(b, tmp_path, "b"), refs=("v1",))
    assert same(af.load("user/repo", cache_dir=hub.cache), a)
    assert same(af.load("user/repo", revision="v1", cache_dir=hub.cache), b)
    assert same(af.load("user/repo", revision=c_a, cache_dir=hub.cache), a)
    assert same(af.load("user/repo", revision=c_b, cache_dir=hub.cache), b)
    assert any(f"/resolve/v1/{CONFIG}" in p for p in hub.requested("HEAD"))
    with pytest.raises(af.AdapterFileError) as ei:
        af.load("user/repo", revision="no-such-branch", cache_dir=hub.cache)
    assert "user/repo" in str(ei.value) and "no-such-branch" in str(ei.value)


def test_subfolder(hub, tmp_path):
    a, _, _ = _adapters()
    hub.publish("user/nested", under("sub/dir", files_of(a, tmp_path, "a")))
    assert same(af.load("user/nested", subfolder="sub/dir", cache_dir=hub.cache), a)
    assert any(p.endswith(f"/sub/dir/{WEIGHTS}") for p in hub.requested("GET"))
    with pytest.raises(af.AdapterFileError) as ei:
        af.load("user/nested", cache_dir=hub.cache)  # nothing at the root
    assert "user/nested" in str(ei.value) and CONFIG in str(ei.value)


def test_adapter_name_sub_folder(hub, tmp_path):
    a, b, c = _adapters()
    files = {**files_of(a, tmp_path, "a"), **under("other", files_of(b, tmp_path, "b")),
             **under("sub/third", files_of(c, tmp_path, "c")), **under("sub", files_of(a, tmp_path, "a2"))}
    hub.publish("user/multi", files)
    assert same(af.load("user/multi", cache_dir=hub.cache), a)
    assert same(af.load("user/multi", adapter_name="default", cache_dir=hub.cache), a)
    assert same(af.load("user/multi", adapter_name="other", cache_dir=hub.cache), b)
    assert same(af.load("user/multi", subfolder="sub", adapter_name="third", cache_dir=hub.cache), c)
    assert same(af.load("user/multi", subfolder="sub", cache_dir=hub.cache), a)
    with pytest.raises(af.ConfigError):
        af.load("user/multi", adapter_name="../other", cache_dir=hub.cache)
    with pytest.raises(af.ConfigError):
        af.load("user/multi", subfolder="../x", cache_dir=hub.cache)


def test_token_reaches_server(hub, tmp_path):
    a, _, _ = _adapters()
    hub.publish("user/private", files_of(a, tmp_path, "a"), token="hf_secret_123")
    with pytest.raises(af.AdapterFileError, match="user/private"):
        af.load("user/private", cache_dir=hub.cache)
    with pytest.raises(af.AdapterFileError, match="user/private"):
        af.load("user/private", token="hf_wrong", cache_dir=hub.cache)
    n = len(hub.log)
    got = af.load("user/private", token="hf_secret_123", cache_dir=hub.cache)
    assert same(got, a)
    new = hub.log[n:]
    assert {m for m, _, _ in new} == {"HEAD", "GET"}
    assert all(auth == "Bearer hf_secret_123" for _, _, auth in new), new


def test_token_true_uses_the_stored_token(hub, tmp_path, monkeypatch):
    a, _, _ = _adapters()
    hub.publish("user/private", files_of(a, tmp_path, "a"), token="hf_from_env")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert same(af.load("user/private", token=True, cache_dir=hub.cache), a)
    assert hub.log[-1][2] == "Bearer hf_from_env"


def test_safetensors_preferred_over_bin(hub, tmp_path):
    a, b, _ = _adapters()
    files = files_of(a, tmp_path, "a")
    files[BIN] = files_of(b, tmp_path, "b", bin_only=True)[BIN]  # a different adapter in the pickle
    hub.publish("user/both", files)
    assert same(af.load("user/both", allow_pickle=True, cache_dir=hub.cache), a)
    assert same(af.load("user/both", cache_dir=hub.cache), a)
    assert not any(BIN in p for p in hub.requested())


def test_bin_only_refused_without_allow_pickle(hub, tmp_path):
    a, _, _ = _adapters()
    hub.publish("user/pickled", files_of(a, tmp_path, "a", bin_only=True))
    with pytest.raises(af.AdapterFileError) as ei:
        af.load("user/pickled", cache_dir=hub.cache)
    assert "allow_pickle" in str(ei.value) and BIN in str(ei.value) and "user/pickled" in str(ei.value)
    assert not any(p.endswith(BIN) for p in hub.requested("GET"))  # refused before downloading it
    assert same(af.load("user/pickled", allow_pickle=True, cache_dir=hub.cache), a)
    assert any(p.endswith(BIN) for p in hub.requested("GET"))


def test_missing_repo_file_and_weights_404(hub, tmp_path):
    a, _, _ = _adapters()
    files = files_of(a, tmp_path, "a")
    hub.publish("user/config-only", {CONFIG: files[CONFIG]})
    hub.publish("user/weights-only", {WEIGHTS: files[WEIGHTS]})
    with pytest.raises(af.AdapterFileError) as ei:
        af.load("user/does-not-exist", cache_dir=hub.cache)
    assert "user/does-not-exist" in str(ei.value)
    with pytest.raises(af.AdapterFileError) as ei:
        af.load("user/weights-only", cache_dir=hub.cache)
    assert "user/weights-only" in str(ei.value) and CONFIG in str(ei.value)
    with pytest.raises(af.AdapterFileError) as ei:
        af.load("user/config-only", cache_dir=hub.cache)
    assert "user/config-only" in str(ei.value)
    with pytest.raises(af.AdapterFileError) as ei:
        af.load("user/config-only", allow_pickle=True, cache_dir=hub.cache)
    assert "user/config-only" in str(ei.value)
    # a bare 404 (no Hub error code, e.g. from a mirror) for the config
    hub.publish("user/plain-404", files)
    hub.forced[CONFIG] = 404
    with pytest.raises(af.AdapterFileError) as ei:
        af.load("user/plain-404", cache_dir=hub.cache)
    assert "user/plain-404" in str(ei.value)


def test_corrupt_download_is_a_file_error(hub, tmp_path):
    a, _, _ = _adapters()
    files = files_of(a, tmp_path, "a")
    files[WEIGHTS] = files[WEIGHTS][: len(files[WEIGHTS]) // 2]
    hub.publish("user/truncated", files)
    with pytest.raises(af.AdapterFileError) as ei:
        af.load("user/truncated", cache_dir=hub.cache)
    assert WEIGHTS in str(ei.value)


def test_inaccessible_safetensors_does_not_fall_back_to_pickle(hub, tmp_path):
    """A safetensors file that exists but cannot be fetched (HTTP 403) is an error; adaptfn must not
    quietly load the pickle instead (safetensors is preferred whenever it is there)."""
    a, b, _ = _adapters()
    files = files_of(a, tmp_path, "a")
    files[BIN] = files_of(b, tmp_path, "b", bin_only=True)[BIN]
    hub.publish("user/forbidden", files)
    hub.forced[WEIGHTS] = 403
    with pytest.raises(af.AdapterFileError) as ei:
        af.load("user/forbidden", allow_pickle=True, cache_dir=hub.cache)
    assert "user/forbidden" in str(ei.value)


@pytest.mark.parametrize("source", ["user/bad--name", "user/" + "x" * 120, "user/name."])
def test_invalid_repo_id_is_a_typed_error(hub, source):
    with pytest.raises(af.AdaptfnError) as ei:
        af.load(source, cache_dir=hub.cache)
    assert isinstance(ei.value, (af.AdapterFileError, af.ConfigError))
    assert source in str(ei.value)
    assert hub.requested() == []


def test_server_binds_loopback_only_and_shuts_down():
    h = FakeHub()
    h.start()
    host, port = h.server.server_address[:2]
    assert host == "127.0.0.1"
    socket.create_connection((host, port), timeout=2).close()  # it answers while running
    thread = h.thread
    h.stop()
    assert not thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=2)


# -- (a) a populated cache, offline ------------------------------------------------------------------
def test_offline_cache_filled_by_a_real_download(hub, tmp_path, monkeypatch):
    a, b, c = _adapters()
    main = hub.publish("user/repo", {**files_of(a, tmp_path, "a"), **under("other", files_of(b, tmp_path, "b"))})
    v1 = hub.publish("user/repo", files_of(c, tmp_path, "c"), refs=("v1",))
    hub.publish("user/pickled", files_of(a, tmp_path, "p", bin_only=True))
    cache = hub.cache
    af.load("user/repo", cache_dir=cache)
    af.load("user/repo", adapter_name="other", cache_dir=cache)
    af.load("user/repo", revision="v1", cache_dir=cache)
    af.load("user/pickled", allow_pickle=True, cache_dir=cache)
    hub.stop()  # from here on nothing answers

    # local_files_only=True (offline mode itself still off)
    assert same(af.load("user/repo", cache_dir=cache, local_files_only=True), a)
    assert same(af.load("user/repo", adapter_name="other", cache_dir=cache, local_files_only=True), b)
    assert same(af.load("user/repo", revision="v1", cache_dir=cache, local_files_only=True), c)
    assert same(af.load("user/repo", revision=v1, cache_dir=cache, local_files_only=True), c)
    assert same(af.load("user/repo", revision=main, cache_dir=cache, local_files_only=True), a)

    # HF_HUB_OFFLINE=1
    _offline(monkeypatch)
    assert same(af.load("user/repo", cache_dir=cache), a)
    assert same(af.load("user/repo", adapter_name="other", cache_dir=cache), b)
    assert same(af.load("user/repo", subfolder="other", cache_dir=cache), b)
    assert same(af.load("user/repo", revision="v1", cache_dir=cache), c)
    assert same(af.load("user/pickled", allow_pickle=True, cache_dir=cache), a)
    with pytest.raises(af.AdapterFileError, match="allow_pickle"):
        af.load("user/pickled", cache_dir=cache)
    for kwargs in ({}, {"local_files_only": True}):
        with pytest.raises(af.AdapterFileError) as ei:
            af.load("user/never-downloaded", cache_dir=cache, **kwargs)
        assert "user/never-downloaded" in str(ei.value)
        with pytest.raises(af.AdapterFileError) as ei:
            af.load("user/repo", revision="v2", cache_dir=cache, **kwargs)
        assert "user/repo" in str(ei.value)


def _hand_built_cache(cache, repo, files, refs=("main",), commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub keeps: refs/<ref> holds the commit; snapshots/<commit>/<path> is a
    relative symlink to blobs/<etag>."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(root, "refs", ref), "w") as f:
            f.write(commit)
    for path, data in files.items():
        etag = hashlib.sha256(data).hexdigest()
        blob = os.path.join(root, "blobs", etag)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(root, "snapshots", commit, *path.split("/"))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    return commit


def test_offline_hand_built_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    a, b, _ = _adapters()
    cache = str(tmp_path / "cache")
    commit = _hand_built_cache(cache, "someone/adapter",
                               {**files_of(a, tmp_path, "a"), **under("other", files_of(b, tmp_path, "b"))})
    _offline(monkeypatch)
    assert same(af.load("someone/adapter", cache_dir=cache), a)
    assert same(af.load("someone/adapter", cache_dir=cache, local_files_only=True), a)
    assert same(af.load("someone/adapter", revision=commit, cache_dir=cache), a)
    assert same(af.load("someone/adapter", adapter_name="other", cache_dir=cache), b)
    # the default cache (HF_HUB_CACHE) when cache_dir is not given
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    assert same(af.load("someone/adapter"), a)
    with pytest.raises(af.AdapterFileError, match="someone/missing"):
        af.load("someone/missing")
    with pytest.raises(af.AdapterFileError, match="someone/adapter"):
        af.load("someone/adapter", revision="v9")


def test_offline_cache_with_corrupt_blob(tmp_path, monkeypatch):
    a, _, _ = _adapters()
    files = files_of(a, tmp_path, "a")
    files[WEIGHTS] = files[WEIGHTS][:100]
    cache = str(tmp_path / "cache")
    _hand_built_cache(cache, "someone/broken", files)
    _offline(monkeypatch)
    with pytest.raises(af.AdapterFileError) as ei:
        af.load("someone/broken", cache_dir=cache)
    assert WEIGHTS in str(ei.value)


# -- (c) uploads: af.push_to_hub and AdapterModel.push_to_hub ----------------------------------------
def _files_at(hub, repo, ref="main"):
    r = hub.repos[repo]
    return r["commits"][r["refs"][ref]]


def test_push_to_hub_uploads_a_peft_folder_with_a_card(hub, tmp_path):
    from huggingface_hub import ModelCard

    a, _, _ = _adapters()
    hub.writers["hf_write"] = "user"
    info = af.push_to_hub(a, "user/pushed", token="hf_write")
    files = _files_at(hub, "user/pushed")
    assert {CONFIG, WEIGHTS, "README.md"} <= set(files)
    assert info.oid == hub.repos["user/pushed"]["refs"]["main"]
    assert info.commit_url.endswith(f"/user/pushed/commit/{info.oid}")
    assert hub.messages[info.oid] == "Upload adapter with adaptfn"
    assert same(af.load("user/pushed", cache_dir=hub.cache), a)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and "adaptfn" in card.data.tags and "lora" in card.data.tags
    assert 'af.load("user/pushed")' in card.text and "PeftModel.from_pretrained" in card.text
    assert "q_proj` ×2" in card.text and "| rank | 4 |" in card.text
    # the writes carried the token
    assert all(auth == "Bearer hf_write" for m, _, auth in hub.log if m == "POST")


def test_push_to_hub_revision_and_commit_message(hub, tmp_path):
    a, b, c = _adapters()
    hub.writers["hf_write"] = "user"
    af.push_to_hub(a, "user/revs", token="hf_write")
    info = af.push_to_hub(b, "user/revs", revision="v2", commit_message="rank 4, second seed", token="hf_write")
    assert hub.messages[info.oid] == "rank 4, second seed"
    assert same(af.load("user/revs", cache_dir=hub.cache), a)  # main untouched
    assert same(af.load("user/revs", revision="v2", cache_dir=hub.cache), b)
    af.push_to_hub(c, "user/revs", revision="v2", token="hf_write")  # the branch exists now: a new commit on it
    assert same(af.load("user/revs", revision="v2", cache_dir=hub.cache), c)
    assert same(af.load("user/revs", revision=info.oid, cache_dir=hub.cache), b)
    assert any("/branch/v2" in p for p in hub.requested("POST"))


def test_push_to_hub_auth_errors(hub, tmp_path, monkeypatch):
    a, _, _ = _adapters()
    hub.writers["hf_write"] = "user"
    for token in (None, "hf_wrong"):
        with pytest.raises(af.AdapterFileError, match="not authenticated") as ei:
            af.push_to_hub(a, "user/denied", token=token)
        assert "user/denied" in str(ei.value) and "Traceback" not in str(ei.value)
    with pytest.raises(af.AdapterFileError, match="may not write"):
        af.push_to_hub(a, "someone-else/repo", token="hf_write")
    assert "user/denied" not in hub.repos and "someone-else/repo" not in hub.repos
    monkeypatch.setenv("HF_TOKEN", "hf_write")  # token=True: the stored token
    af.push_to_hub(a, "user/denied", token=True)
    assert same(af.load("user/denied", cache_dir=hub.cache), a)


def test_push_to_hub_private_repo(hub, tmp_path):
    a, _, _ = _adapters()
    hub.writers["hf_write"] = "user"
    af.push_to_hub(a, "user/secret", private=True, token="hf_write")
    with pytest.raises(af.AdapterFileError, match="user/secret"):
        af.load("user/secret", cache_dir=hub.cache)
    assert same(af.load("user/secret", token="hf_write", cache_dir=hub.cache), a)


def test_push_to_hub_without_xet_uses_create_commit(hub, tmp_path, monkeypatch):
    """huggingface_hub's single-commit path (hf_xet not installed): the card's YAML is validated first."""
    import huggingface_hub.hf_api

    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
    a, _, _ = _adapters()
    hub.writers["hf_write"] = "user"
    af.push_to_hub(a, "user/legacy", token="hf_write")
    assert any(p == "/api/validate-yaml" for p in hub.requested("POST"))
    assert same(af.load("user/legacy", cache_dir=hub.cache), a)


def test_push_to_hub_keeps_a_card_the_folder_has(hub, tmp_path):
    from adaptfn.hub import upload_adapter_folder

    a, _, _ = _adapters()
    hub.writers["hf_write"] = "user"
    folder = tmp_path / "mine"
    af.save(a, folder)
    (folder / "README.md").write_text("# my own card\n")
    upload_adapter_folder(folder, "user/carded", a, token="hf_write")
    assert _files_at(hub, "user/carded")["README.md"] == b"# my own card\n"


def test_push_to_hub_bad_arguments_send_nothing(hub):
    a, b, _ = _adapters()
    bad = [dict(repo_id="no-namespace"), dict(repo_id="user/bad--name"), dict(repo_id="user/x", private="yes"),
           dict(repo_id="user/x", revision=""), dict(repo_id="user/x", token=3)]
    for kw in bad:
        with pytest.raises(af.ConfigError):
            af.push_to_hub(a, **kw)
    with pytest.raises(af.ConfigError, match="stacked"):
        af.push_to_hub(af.stack([a, b]), "user/x")
    with pytest.raises(af.ConfigError):
        af.push_to_hub(af.select({"a": a, "b": b}, ["a", "b"]), "user/x")  # an AdapterSum
    assert hub.log == []


def test_push_to_hub_offline_is_a_typed_error(hub, monkeypatch):
    a, _, _ = _adapters()
    _offline(monkeypatch)
    with pytest.raises(af.AdapterFileError, match="offline"):
        af.push_to_hub(a, "user/x", token="hf_write")


def test_adapter_model_push_to_hub_uploads_adapters_only(hub, tmp_path):
    a, b, _ = _adapters()
    hub.writers["hf_write"] = "user"
    m = af.AdapterModel(tiny_opt())
    m.load_adapter(peft_config=a.config, adapter_state_dict=af.state_dict(a), adapter_name="first")
    m.load_adapter(peft_config=b.config, adapter_state_dict=af.state_dict(b), adapter_name="second")
    m.set_adapter("second")
    m.push_to_hub("user/shell", commit_message="two adapters", token="hf_write")
    files = _files_at(hub, "user/shell")
    assert set(files) == {".gitattributes", "README.md", CONFIG, WEIGHTS, f"first/{CONFIG}", f"first/{WEIGHTS}"}
    assert same(af.load("user/shell", cache_dir=hub.cache), b)  # the active adapter at the root
    assert same(af.load("user/shell", adapter_name="first", cache_dir=hub.cache), a)
    card = files["README.md"].decode()
    assert "Adapter `second` (root folder)" in card and "Adapter `first` (sub-folder `first/`)" in card
    with pytest.raises(af.AdapterFileError, match="not authenticated"):
        m.push_to_hub("user/shell2")
    with pytest.raises(af.ConfigError, match="push_to_hub"):
        af.AdapterModel(tiny_opt()).push_to_hub("user/empty", token="hf_write")  # no adapters
