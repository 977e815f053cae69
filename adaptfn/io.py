"""PEFT's file format, both ways: ``load``, ``save``, ``state_dict``.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or, from old
versions, the pickle ``adapter_model.bin``). Keys are ``base_model.model.<module path>.<suffix>``:
the method's delta suffixes (``lora_A.weight``, ...), or a replaced tensor, with ``base_layer.``
before the tensor name when PEFT loads it into the (possibly tied) base tensor.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from .adapter import COEF, GATE, Adapter, AdapterSum, Entry, gate_on, replace
from .errors import AdapterFileError, ConfigError
from .methods import get_method, method_for_config, method_for_peft_type
from .methods.base import PeftConfigBase

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_BASE_LAYER = ".base_layer."
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# -- state dict --------------------------------------------------------------------------------------
def state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (``PeftModel.get_adapter_state_dict``).

    Masked-off deltas are written in their "off" form (LoRA: ``lora_B`` zeros), so the file computes
    what the adapter computes; scale weights (:func:`adaptfn.scale`) are folded into the method's tensors
    (LoRA: ``lora_B * w``). A masked-off replacement, or a replacement with a weight other than 1, cannot be
    expressed in PEFT's format: drop it with :func:`adaptfn.select` first.
    """
    if not isinstance(adapter, Adapter):
        if isinstance(adapter, AdapterSum):
            raise ConfigError("state_dict: an AdapterSum has several adapters; save each of .parts")
        raise ConfigError(f"state_dict: expected an Adapter, got {type(adapter).__name__}")
    if adapter.is_stacked:
        raise ConfigError("state_dict: the adapter is stacked; use af.unstack first")
    method = get_method(adapter.method)
    out: dict[str, torch.Tensor] = {}
    for path, e in adapter.entry_items:
        leaves = dict(adapter.leaves(path))
        on = gate_on(leaves[GATE])
        if not isinstance(on, bool):
            raise ConfigError("state_dict: cannot read gates under a transform (vmap/grad/compile)")
        if e.kind:
            delta = method.to_peft(e, leaves if on else method.off(e, leaves))
            for suffix, t in delta.items():
                out[f"{PREFIX}{path}.{suffix}"] = t
        for name in e.replaced:
            if not on:
                raise ConfigError(
                    f"state_dict: the replacement of {path}.{name} is masked off, which PEFT's format cannot "
                    "express; drop it with af.select(adapter, ...) first")
            if COEF in leaves and name not in e.frozen and float(leaves[COEF].detach().item()) != 1.0:
                raise ConfigError(
                    f"state_dict: the replacement of {path}.{name} has a scale weight other than 1 (base + w * "
                    "(replacement - base)), which PEFT's format cannot express without the base tensor; merge it "
                    "(af.merge) or drop it with af.select(adapter, ...) first")
            mid = _BASE_LAYER if name in e.tied else "."
            key = f"{path}{mid}{name}" if path else (f"base_layer.{name}" if name in e.tied else name)
            out[PREFIX + key] = leaves[name]
    return out


# -- save --------------------------------------------------------------------------------------------
def _atomic_write(path: str, write: Any) -> str:
    """Write through ``write(tmp_path)`` to a temp file in the same folder, fsync; return the temp path."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:  # closed here (a bare open().write() leaks it: ResourceWarning)
        f.write(text)


def _check_name(adapter_name: str | None) -> None:
    if adapter_name is None:
        return
    if (not isinstance(adapter_name, str) or not adapter_name or adapter_name in (".", "..")
            or "/" in adapter_name or "\\" in adapter_name or os.sep in adapter_name or "\x00" in adapter_name):
        raise ConfigError(
            f"adapter_name={adapter_name!r} is not a plain folder name (it would escape the adapter folder)")


def save(adapter: Adapter | Mapping[str, Adapter], directory: str | os.PathLike[str], *,
         adapter_name: str | None = None) -> str:
    """Write an adapter in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Arguments:
        adapter: an :class:`Adapter`, or a mapping name -> adapter (PEFT's ``save_pretrained`` layout:
            ``"default"`` at the root, the others in sub-folders).
        directory: the folder (created if missing).
        adapter_name: a non-default name saves into ``directory/adapter_name`` as PEFT does.

    Returns:
        The folder written. Everything is checked before anything is written; each file is written to a
        temp name in the same folder, fsynced and renamed over the old one, weights first, config last,
        so an interrupted save never leaves a half-written file.

    Example:
        >>> af.save(adapter, "out/my-lora")
        'out/my-lora'
        >>> import os; sorted(os.listdir("out/my-lora"))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    items = adapter.items() if isinstance(adapter, Mapping) else [(adapter_name, adapter)]
    plans = []
    for name, a in items:  # everything is checked (and serialised in memory) before any write
        _check_name(name)
        if isinstance(adapter, Mapping) and name == "default":
            name = None
        sd = state_dict(a)
        plans.append((name, {k: v.detach().contiguous().cpu() for k, v in sd.items()},
                      json.dumps(a.config.to_dict(), indent=2, sort_keys=True) + "\n"))
    for name, tensors, config_json in plans:
        folder = os.fspath(directory)
        if name is not None and name != "default":
            folder = os.path.join(folder, name)
        _write_adapter(folder, tensors, config_json)
    root = os.fspath(directory)
    return root if isinstance(adapter, Mapping) or adapter_name in (None, "default") else os.path.join(
        root, adapter_name)


def _write_adapter(folder: str, tensors: dict[str, torch.Tensor], config_json: str) -> None:
    """Write weights + config so that a failure at any point leaves the previous adapter in place.

    Both files are written to temp names and fsynced first. If the config is unchanged only the weights
    are renamed over (one atomic rename). Otherwise the old files are moved aside, the new ones renamed
    in, and on any error the old ones are put back; temp and backup files are always removed."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    wpath, cpath = os.path.join(folder, SAFETENSORS_NAME), os.path.join(folder, CONFIG_NAME)
    temps: list[str] = []
    backups: list[tuple[str, str]] = []
    try:
        temps.append(_atomic_write(wpath, lambda p: save_file(tensors, p, metadata={"format": "pt"})))
        old_config = None
        if os.path.isfile(cpath):
            with open(cpath, encoding="utf-8") as f:
                old_config = f.read()
        if old_config == config_json:
            os.replace(temps[0], wpath)
            temps.clear()
        else:
            temps.append(_atomic_write(cpath, lambda p: _write_text(p, config_json)))
            for final in (wpath, cpath):
                if os.path.exists(final):
                    fd, bak = tempfile.mkstemp(prefix="." + os.path.basename(final) + ".", suffix=".bak", dir=folder)
                    os.close(fd)
                    try:
                        os.replace(final, bak)
                    except BaseException:
                        os.unlink(bak)
                        raise
                    backups.append((bak, final))
            os.replace(temps[0], wpath)
            os.replace(temps[1], cpath)
            temps.clear()
        _fsync_dir(folder)
    except BaseException:
        for bak, final in backups:  # put the previous adapter back
            with contextlib.suppress(OSError):
                os.replace(bak, final)
        backups.clear()
        raise
    finally:
        for t in temps:
            with contextlib.suppress(OSError):
                os.unlink(t)
        for bak, _ in backups:
            with contextlib.suppress(OSError):
                os.unlink(bak)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- load --------------------------------------------------------------------------------------------
def _resolve(source: str, adapter_name: str | None, revision: str | None, subfolder: str | None,
             token: Any, cache_dir: Any, local_files_only: bool, allow_pickle: bool) -> tuple[str, str]:
    """Find (config path, weights path), locally or through huggingface_hub."""
    _check_name(adapter_name)
    if subfolder is not None and (os.path.isabs(subfolder) or ".." in subfolder.replace("\\", "/").split("/")):
        raise ConfigError(f"subfolder={subfolder!r} would escape the adapter folder")
    source = os.fspath(source)
    if os.path.isdir(source):
        folder = os.path.join(source, subfolder) if subfolder else source
        if adapter_name and adapter_name != "default" and os.path.isfile(
                os.path.join(folder, adapter_name, CONFIG_NAME)):
            folder = os.path.join(folder, adapter_name)
        cfg = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(cfg):
            raise AdapterFileError(f"{cfg}: not found (an adapter folder holds {CONFIG_NAME})")
        st, binf = os.path.join(folder, SAFETENSORS_NAME), os.path.join(folder, BIN_NAME)
        if os.path.isfile(st):
            return cfg, st
        if os.path.isfile(binf):
            if not allow_pickle:
                raise AdapterFileError(
                    f"{binf}: only a pickle file ({BIN_NAME}) is there; pickle can run code, so it is refused "
                    "unless you pass allow_pickle=True (it is then read with torch.load(weights_only=True))")
            return cfg, binf
        raise AdapterFileError(f"{folder}: no {SAFETENSORS_NAME} (or {BIN_NAME}) next to {CONFIG_NAME}")
    if not _REPO_ID.match(source) or source.startswith((".", "/")):
        raise AdapterFileError(f"{source!r} is neither an adapter folder nor a Hub repo id (user/name)")
    return _resolve_hub(source, adapter_name, revision, subfolder, token, cache_dir, local_files_only, allow_pickle)


def _resolve_hub(repo: str, adapter_name: str | None, revision: str | None, subfolder: str | None, token: Any,
                 cache_dir: Any, local_files_only: bool, allow_pickle: bool) -> tuple[str, str]:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def get(name: str, sub: str | None) -> str | None:
        """The file's local path; None only when the file is known to be absent (remote 404, or not in
        the cache while offline). Any other failure is an error, never a silent fallback."""
        try:
            return hf_hub_download(repo, name, subfolder=sub, revision=revision, token=token,
                                   cache_dir=cache_dir, local_files_only=local_files_only)
        except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError: check it first)
            if local_files_only or constants.HF_HUB_OFFLINE:
                return None
            raise AdapterFileError(f"{repo}: could not download {name} ({e})") from None
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            msg = f"{repo}: repository or revision {revision!r} not found ({type(e).__name__})"
            raise AdapterFileError(msg) from None
        except EntryNotFoundError:
            return None
        except HFValidationError as e:
            raise AdapterFileError(f"{repo!r} is not a valid Hub repo id or revision ({e})") from None
        except OSError as e:
            raise AdapterFileError(f"{repo}: could not fetch {name}: {e}") from None

    subs = []
    if adapter_name and adapter_name != "default":
        subs.append(f"{subfolder}/{adapter_name}" if subfolder else adapter_name)
    subs.append(subfolder)
    for sub in subs:
        cfg = get(CONFIG_NAME, sub)
        if cfg is None:
            continue
        st = get(SAFETENSORS_NAME, sub)
        if st is not None:
            return cfg, st
        if not allow_pickle:
            raise AdapterFileError(
                f"{repo}{'/' + sub if sub else ''}: no {SAFETENSORS_NAME}; the pickle {BIN_NAME} is refused unless "
                "you pass allow_pickle=True (it is then read with torch.load(weights_only=True))")
        binf = get(BIN_NAME, sub)
        if binf is not None:
            return cfg, binf
        raise AdapterFileError(f"{repo}{'/' + sub if sub else ''}: no adapter weights found")
    where = f"{repo} (revision {revision or 'main'}{', subfolder ' + subfolder if subfolder else ''})"
    raise AdapterFileError(f"{where}: no {CONFIG_NAME} found (in the cache, offline, or on the Hub)")


def read_config(path: str) -> Any:
    """Parse an adapter_config.json into adaptfn's config class for its peft_type."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot read ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if "peft_type" not in raw:
        raise ConfigError(f"{path}: no 'peft_type' field")
    method = method_for_peft_type(raw["peft_type"], path)
    return method, method.config_cls.from_dict(raw, source=path)


def read_tensors(path: str, device: Any = None) -> dict[str, torch.Tensor]:
    """Read a safetensors or (opted-in) pickle weights file; any damage is an AdapterFileError."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device) if device is not None else "cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AdapterFileError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    try:
        sd = torch.load(path, map_location=device or "cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise AdapterFileError(f"{path}: cannot read as a weights-only torch file ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AdapterFileError(f"{path}: expected a dict of tensors")
    return sd


def _saved_module(config: Any, rest: str) -> tuple[str, str] | None:
    """Split a modules_to_save key into (module path, tensor name) by PEFT's rule."""
    names = getattr(config, "modules_to_save", None) or []
    parts = rest.split(".")
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        if any(path.endswith(m) for m in names):
            return path, ".".join(parts[i:])
    return None


def _from_peft(method: Any, config: Any, sd: Mapping[str, torch.Tensor], source: str) -> Adapter:
    """Build an adapter from a PEFT state dict (keys with the ``base_model.model.`` prefix)."""
    suffixes = method.delta_suffixes()
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    repl: dict[str, dict[str, torch.Tensor]] = {}
    tied: dict[str, set[str]] = {}
    for key, t in sd.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{source}: key {key!r} does not start with {PREFIX!r} (not a PEFT adapter file)")
        rest = key[len(PREFIX):]
        suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
        if suffix is not None:
            deltas.setdefault(rest[: -len(suffix) - 1], {})[suffix] = t
            continue
        if _BASE_LAYER in "." + rest:
            path, name = ("." + rest).split(_BASE_LAYER, 1)
            path = path[1:]
            repl.setdefault(path, {})[name] = t
            tied.setdefault(path, set()).add(name)
            continue
        saved = _saved_module(config, rest)
        if saved is not None:
            repl.setdefault(saved[0], {})[saved[1]] = t
            continue
        if getattr(config, "bias", "none") == "all" and (rest == "bias" or rest.endswith(".bias")):
            path = rest[: -len(".bias")] if "." in rest else ""
            repl.setdefault(path, {})["bias"] = t
            continue
        raise AdapterFileError(
            f"{source}: key {key!r} matches no target of the config: not a {method.name} key "
            f"({', '.join(suffixes)}), not under modules_to_save={getattr(config, 'modules_to_save', None)!r}"
            f", not a bias with bias={getattr(config, 'bias', None)!r}")
    entries: dict[str, Entry] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for path, found in deltas.items():
        e, leaves = method.from_peft(config, path, found, source)
        entries[path], tensors[path] = e, leaves
    for path, found in repl.items():
        e = entries.get(path, Entry())
        names = tuple(sorted(found))
        tied_names = tuple(n for n in names if n in tied.get(path, ()))
        # PEFT never trains a base layer's weight: those keys are there for resized vocabularies
        frozen = tuple(n for n in tied_names if not (n == "bias" and getattr(config, "bias", "none") != "none"))
        entries[path] = Entry(e.kind, e.r, e.scaling, e.fan_in_fan_out, names, tied_names, e.options, frozen)
        tensors.setdefault(path, {}).update(found)
    if not entries:
        raise AdapterFileError(f"{source}: the weights file holds no adapter tensors")
    for leaves in tensors.values():
        ref = next(iter(leaves.values()))
        leaves[GATE] = torch.ones((), dtype=torch.float32, device=ref.device)
    order = sorted(entries)
    return Adapter(method.name, config, {p: entries[p] for p in order}, {p: tensors[p] for p in order})


def load(
    source: str | os.PathLike[str],
    adapter_name: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    allow_pickle: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Adapter:
    """Load a PEFT-format adapter from a folder or a Hub repo.

    Arguments:
        source: a local folder, or a Hub repo id (through huggingface_hub: its cache, offline mode
            ``HF_HUB_OFFLINE=1`` and token handling apply).
        adapter_name: a non-default name is looked up in the sub-folder PEFT saves it in (falling back to
            the folder itself). revision, subfolder, token, cache_dir, local_files_only: as in
            ``hf_hub_download``.
        allow_pickle: read ``adapter_model.bin`` when no safetensors file exists (with
            ``torch.load(weights_only=True)``); refused by default.
        device, dtype: where and in which floating dtype to put the tensors.

    Returns:
        An :class:`Adapter`. The config keeps fields adaptfn does not know, and writes them back.

    Example:
        >>> _ = af.save(adapter, "out/my-lora")
        >>> a = af.load("out/my-lora")
        >>> a.paths == adapter.paths and a.entries == adapter.entries
        True

        A Hub repo loads the same way, e.g. ``af.load("user/repo", revision="v1")`` (through the
        huggingface_hub cache; ``HF_HUB_OFFLINE=1`` reads the cache only).
    """
    cfg_path, w_path = _resolve(source, adapter_name, revision, subfolder, token, cache_dir,
                                local_files_only, allow_pickle)
    method, config = read_config(cfg_path)
    sd = read_tensors(w_path, device)
    adapter = _from_peft(method, config, sd, w_path)
    if dtype is not None:
        adapter = replace(adapter, tensors={
            p: {n: (t.to(dtype) if t.is_floating_point() and n != GATE else t) for n, t in d.items()}
            for p, d in adapter.tensors.items()})
    return adapter


def config_from(config: Any, where: str) -> tuple[Any, Any]:
    """``(method, config)`` from an adaptfn config, a parsed adapter_config.json ``dict`` or a ``peft`` config
    object (anything with ``to_dict()``; PEFT's enums, sets and runtime fields are normalised as its
    ``save_pretrained`` does)."""
    if isinstance(config, Mapping):
        raw = dict(config)
    elif isinstance(config, PeftConfigBase):  # one of adaptfn's configs
        return method_for_config(config), config
    elif callable(getattr(config, "to_dict", None)):
        raw = {k: _plain(v) for k, v in config.to_dict().items() if k != "runtime_config"}
    else:
        raise ConfigError(f"{where}: config must be an adaptfn config (e.g. af.LoraConfig), a dict with PEFT's "
                          f"adapter_config.json fields or a peft config; got {type(config).__name__}")
    if "peft_type" not in raw:
        raise ConfigError(f"{where}: the config has no 'peft_type' field")
    method = method_for_peft_type(_plain(raw["peft_type"]), where)
    return method, method.config_cls.from_dict(raw, source=where)


def _plain(v: Any) -> Any:
    """PEFT config values as JSON would hold them: enums -> their value, sets -> sorted lists."""
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (set, frozenset)):
        return sorted(_plain(x) for x in v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


def from_state_dict(state_dict: Mapping[str, torch.Tensor], config: Any) -> Adapter:
    """An adapter from tensors held in memory: PEFT's key names plus a config.

    The in-memory twin of :func:`load` (what ``PeftModel.load_adapter(adapter_state_dict=...)`` and
    ``set_peft_model_state_dict`` take). Keys are PEFT's saved names, ``base_model.model.<module
    path>.lora_A.weight`` etc. (what :func:`adaptfn.state_dict` and ``peft.get_peft_model_state_dict``
    return), or the same without the ``base_model.model.`` prefix (what transformers'
    ``get_adapter_state_dict`` returns); one form per dict.

    Arguments:
        state_dict: ``{key: Tensor}``; the tensors are used as they are (not copied).
        config: an adaptfn config (:class:`adaptfn.LoraConfig`, ...), a ``dict`` with PEFT's
            ``adapter_config.json`` fields (``peft_type`` included), or a ``peft`` config object.

    Returns:
        An :class:`Adapter`, checked as :func:`load` checks a file.

    Example:
        >>> sd = af.state_dict(adapter)
        >>> next(iter(sd))
        'base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight'
        >>> a = af.from_state_dict(sd, adapter.config)
        >>> all(torch.equal(a.leaves(p)["lora_B"], adapter.leaves(p)["lora_B"]) for p in a.paths)
        True
    """
    where = "from_state_dict"
    method, cfg = config_from(config, where)
    if not isinstance(state_dict, Mapping):
        raise ConfigError(f"{where}: state_dict must be a mapping of PEFT key names to tensors, got "
                          f"{type(state_dict).__name__}")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"{where}: state_dict entries must be str -> Tensor; not so for {bad[:3]!r}")
    if not state_dict:
        raise ConfigError(f"{where}: state_dict is empty")
    prefixed = [k.startswith(PREFIX) for k in state_dict]
    if not all(prefixed):
        if any(prefixed):
            raise ConfigError(f"{where}: some keys start with {PREFIX!r} and some do not (e.g. "
                              f"{next(k for k in state_dict if not k.startswith(PREFIX))!r}); use one form")
        state_dict = {PREFIX + k: v for k, v in state_dict.items()}
    try:
        return _from_peft(method, cfg, state_dict, where)
    except AdapterFileError as e:  # the same checks as a file, reported as bad arguments
        raise ConfigError(str(e)) from None


__all__ = ["load", "save", "state_dict", "from_state_dict", "read_config", "read_tensors"]
