"""PEFT's file format, both ways: ``load``, ``save``, ``state_dict``.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or, from old
versions, the pickle ``adapter_model.bin``). Keys are ``base_model.model.<module path>.<suffix>``:
the method's delta suffixes (``lora_A.weight``, ...), or a replaced tensor, with ``base_layer.``
before the tensor name when PEFT loads it into the (possibly tied) base tensor.

The save protocol (``adaptfn/_files.py``; ``docs/reliability.md``). The two files must change together,
and POSIX renames one file at a time, so the weights file records, in its safetensors metadata
(``adaptfn.config_sha256``, which PEFT ignores), the SHA-256 of the config bytes it was saved with. A save
takes an ``flock`` on the folder (concurrent saves take turns: the last one wins), finishes or removes what
a killed save left, writes both files to flocked temp names (``.<file>.<host>-<pid>-<start>-<rand>.tmp``)
and fsyncs them, then: if the config is byte-identical, renames the weights in (one atomic step); else (1)
renames the new config to ``.adapter_config.json.pending``, (2) renames the new weights in (the commit
point), (3) renames the pending config in, fsyncing the folder after each step. ``load`` reads the config,
then the weights' hash: equal, that is the version; different, the pending config that matches is the
version (a save between (2) and (3), running or killed; a load that can take the lock finishes it). So a
load returns the old or the new adapter whatever instant a save is at or died at, never a mix; a pair that
keeps moving raises ``AdapterFileError`` (errno ``EBUSY``: a save is in progress). Temp files of dead
writers are removed by the next save; a live writer's (flocked) are never touched. PEFT reads the folder's
root files without this check: it sees a consistent pair except during (or after a kill between) steps 2
and 3, which the next ``af.load`` or ``af.save`` repairs.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import errno
import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from . import _card, _files
from ._leaves import check_leaves, storage_safe
from .adapter import COEF, GATE, Adapter, AdapterSum, Entry, gate_on, replace
from .errors import AdapterFileError, AdaptfnError, ConfigError, IncompatibleAdapterError
from .methods import get_method, method_for_config, method_for_peft_type, weight_tying
from .methods.base import PeftConfigBase, SharedTensors
from .methods.lora_init import convert as convert_lora

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
    expressed in PEFT's format, nor can a masked or weighted DoRA module (its magnitude would depend on the base
    weight): drop it with :func:`adaptfn.select` first (or merge).
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
            try:
                delta = method.to_peft(e, leaves if on else method.off(e, leaves))
            except ConfigError as err:  # what the file cannot express (a weighted or masked DoRA module)
                raise ConfigError(f"state_dict: module {path!r}: {err}") from None
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
            as_base = name in e.tied and not weight_tying.is_saved_copy(e, name)
            mid = _BASE_LAYER if as_base else "."
            key = f"{path}{mid}{name}" if path else (f"base_layer.{name}" if as_base else name)
            out[PREFIX + key] = leaves[name]
        if weight_tying.partners(e):  # ensure_weight_tying: the tied modules' keys, as PEFT writes them
            out.update(weight_tying.to_peft(path, e, out, PREFIX))
    if isinstance(method, SharedTensors):  # tensors every module shares, written once (VeRA's projections)
        out.update(method.shared_to_peft(adapter.config, adapter.entries, adapter.tensors))
    return out


# -- save --------------------------------------------------------------------------------------------
def _check_name(adapter_name: str | None) -> None:
    if adapter_name is None:
        return
    if (not isinstance(adapter_name, str) or not adapter_name or adapter_name in (".", "..")
            or "/" in adapter_name or "\\" in adapter_name or os.sep in adapter_name or "\x00" in adapter_name):
        raise ConfigError(
            f"adapter_name={adapter_name!r} is not a plain folder name (it would escape the adapter folder)")


def _path_arg(where: str, name: str, value: Any) -> str:
    """A str / os.PathLike argument as a str path (bytes paths and other types raise ConfigError)."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{where}: {name} must be a str or os.PathLike path, got {type(value).__name__}")
    try:
        p = os.fspath(value)
    except TypeError as e:
        raise ConfigError(f"{where}: {name}: {e}") from None
    if not isinstance(p, str):
        raise ConfigError(f"{where}: {name} must name a str path, got {type(p).__name__}")
    return _files.check_path(p, name)


def _serialize(tensors: dict[str, torch.Tensor], config_json: bytes, where: str) -> bytes:
    """The safetensors bytes of ``tensors``, binding the config: ``adaptfn.config_sha256`` in the metadata."""
    from safetensors.torch import save as st_save

    meta = {"format": "pt", _files.DIGEST_KEY: _files.digest(config_json)}
    try:
        return _sorted_metadata(st_save(tensors, metadata=meta))
    except (ValueError, RuntimeError, TypeError) as e:
        raise ConfigError(f"{where}: the adapter's tensors cannot be written as safetensors ({e})") from None


def _sorted_metadata(data: bytes) -> bytes:
    """``data`` with the header's metadata keys in sorted order: safetensors writes them in a hash map's
    order, which changes from call to call, so the same adapter would not give the same bytes. The header
    keeps its length (the same JSON, reordered; space-padded as safetensors pads it)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    if not meta:
        return data
    new = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                     ensure_ascii=False).encode()
    if len(new) > n:  # pragma: no cover - the same entries never encode longer
        return data
    return data[:8] + new + b" " * (n - len(new)) + data[8 + n:]


def save(adapter: Adapter | Mapping[str, Adapter], directory: str | os.PathLike[str], *,
         adapter_name: str | None = None, model_card: bool = True, convert_from: Adapter | None = None) -> str:
    """Write an adapter in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``, and a
    ``README.md`` model card at the root, as PEFT's ``save_pretrained`` does.

    Arguments:
        adapter: an :class:`Adapter`, or a mapping name -> adapter (PEFT's ``save_pretrained`` layout:
            ``"default"`` at the root, the others in sub-folders).
        directory: the folder (created if missing).
        adapter_name: a non-default name saves into ``directory/adapter_name`` as PEFT does.
        model_card: write the card (:func:`adaptfn.hub.model_card`) into the folder saved to, after the adapter's
            files. A ``README.md`` already there is replaced only if adaptfn wrote it and nobody edited it since
            (a marker with its hash ends it); a card the user wrote is never touched. ``False``: no card.
        convert_from: the adapter as it was initialised (PiSSA / OLoRA / CorDA, before training): saves the plain
            LoRA of rank ``2 r`` for the ORIGINAL base instead, as PEFT's ``save_pretrained(...,
            path_initial_model_for_weight_conversion=...)`` (:func:`adaptfn.methods.lora_init.convert`).

    Returns:
        The folder written. Everything is checked and serialised in memory before anything is written. Each
        folder is written by the protocol in this module's docstring: a reader, or a crash at any instant,
        sees the old adapter or the new one, never a mix; concurrent saves take turns. Leaves that share
        storage are written as separate tensors (as PEFT does).

    Raises:
        ConfigError: not an adapter, a stacked one, a masked-off replacement, a bad ``adapter_name``.
        AdapterFileError: the folder cannot be written (no space, permission, a file in the way, a name too
            long, an I/O error, ...), naming the path and the operation; the previous adapter is left intact.

    Example:
        >>> af.save(adapter, "out/my-lora")
        'out/my-lora'
        >>> import os; sorted(os.listdir("out/my-lora"))
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    """
    root = _path_arg("save", "directory", directory)
    if isinstance(adapter, Mapping) and not isinstance(adapter, (Adapter, AdapterSum)):
        items = list(adapter.items())
        if not items:
            raise ConfigError("save: the mapping of adapters is empty")
    else:
        items = [(adapter_name, adapter)]
    if not isinstance(model_card, bool):
        raise ConfigError(f"save: model_card must be True or False, got {model_card!r}")
    if convert_from is not None:
        if len(items) != 1 or isinstance(adapter, Mapping) and not isinstance(adapter, (Adapter, AdapterSum)):
            raise ConfigError("save: convert_from= takes one adapter, not a mapping of them")
        items = [(adapter_name, convert_lora(adapter, convert_from))]  # type: ignore[arg-type]
    plans = []
    for name, a in items:  # everything is checked (and serialised in memory) before any write
        _check_name(name)
        if isinstance(adapter, Mapping) and name == "default":
            name = None
        sd = state_dict(a)
        check_leaves(a, "save")
        config_json = (json.dumps(a.config.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8")
        plans.append((name, _serialize(storage_safe(sd), config_json, "save"), config_json))
    card = None
    if model_card:  # made before anything is written, like the files
        card = _card.with_marker(_card.model_card(dict(items) if isinstance(adapter, Mapping) else items[0][1]))
    for name, weights, config_json in plans:
        folder = root
        if name is not None and name != "default":
            folder = os.path.join(folder, name)
        _write_adapter(folder, weights, config_json)
    top = root if isinstance(adapter, Mapping) or adapter_name in (None, "default") else os.path.join(
        root, adapter_name)
    if card is not None:
        _files.write_card(top, card, _card.ours)
    return top


def write_card(folder: str | os.PathLike[str], adapter: Adapter | Mapping[str, Adapter], *,
               root: str | None = None) -> bool:
    """Write the ``README.md`` model card of ``adapter`` (or of several, ``root`` the one at the folder's root:
    see :func:`adaptfn.hub.model_card`) into ``folder``, unless a card the user wrote or edited is there.
    Returns whether it was written."""
    card = _card.with_marker(_card.model_card(adapter, root=root))
    return _files.write_card(os.fspath(folder), card, _card.ours)


def _write_adapter(folder: str, weights: bytes, config_json: bytes) -> None:
    """Create the folder if needed and write the pair by :func:`adaptfn._files.write_pair`."""
    if os.path.isfile(folder):
        raise AdapterFileError(f"{folder}: cannot save the adapter there: it is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except (OSError, ValueError) as e:
        raise _files.os_error("create the folder", folder, e) from None
    _files.write_pair(folder, weights, config_json)


# -- load --------------------------------------------------------------------------------------------
def _looks_local(source: str) -> bool:
    """Whether a string that names no existing file is meant as a local path rather than a Hub repo id:
    a leading ``./``, ``../``, ``/`` or ``~``, a backslash, more than one ``/``, an existing parent folder,
    or anything a repo id cannot be."""
    if source in (".", "..") or source.startswith(("./", "../", "/", "~", ".\\", "..\\")) or "\\" in source:
        return True
    if os.path.isabs(source) or source.count("/") > 1 or (os.sep != "/" and os.sep in source):
        return True
    parent = os.path.dirname(source)
    if parent and os.path.isdir(parent):
        return True
    return not _REPO_ID.match(source)


def _resolve(source: str, adapter_name: str | None, revision: str | None, subfolder: str | None,
             token: Any, cache_dir: Any, local_files_only: bool, allow_pickle: bool) -> tuple[str, str, bool]:
    """Find (config path, weights path, local): a local folder, or files from huggingface_hub."""
    _check_name(adapter_name)
    if subfolder is not None and (os.path.isabs(subfolder) or ".." in subfolder.replace("\\", "/").split("/")):
        raise ConfigError(f"subfolder={subfolder!r} would escape the adapter folder")
    local = os.path.expanduser(source) if source.startswith("~") else source
    if os.path.isdir(local):
        folder = os.path.join(local, subfolder) if subfolder else local
        if adapter_name and adapter_name != "default" and os.path.isfile(
                os.path.join(folder, adapter_name, CONFIG_NAME)):
            folder = os.path.join(folder, adapter_name)
        cfg = os.path.join(folder, CONFIG_NAME)
        st, binf = os.path.join(folder, SAFETENSORS_NAME), os.path.join(folder, BIN_NAME)
        for p in (cfg, st):
            if os.path.isdir(p):
                raise AdapterFileError(f"{p}: cannot read: it is a folder, not a file")
        if os.path.isfile(st) or os.path.exists(os.path.join(folder, _files.PENDING_NAME)):
            return cfg, st, True  # (a missing config is reported, or a save in progress waited for, when read)
        if not os.path.isfile(cfg):
            if not os.path.isdir(folder):
                raise AdapterFileError(f"{folder}: not found (no such folder; an adapter folder holds {CONFIG_NAME})")
            raise AdapterFileError(f"{cfg}: not found (an adapter folder holds {CONFIG_NAME})")
        if os.path.isfile(binf):
            if not allow_pickle:
                raise AdapterFileError(
                    f"{binf}: only a pickle file ({BIN_NAME}) is there; pickle can run code, so it is refused "
                    "unless you pass allow_pickle=True (it is then read with torch.load(weights_only=True))")
            return cfg, binf, True
        raise AdapterFileError(f"{folder}: no {SAFETENSORS_NAME} (or {BIN_NAME}) next to {CONFIG_NAME}")
    if os.path.exists(local):
        hint = (" A single .safetensors file with lora_unet_ / lora_te_ keys is a kohya-ss / A1111 LoRA: read it "
                "with af.load_kohya(path, model).") if local.endswith(".safetensors") else ""
        raise AdapterFileError(f"{source}: is a file, not an adapter folder (pass the folder that holds {CONFIG_NAME} "
                               f"and {SAFETENSORS_NAME}).{hint}")
    if _looks_local(source):
        raise AdapterFileError(f"{source}: not found: no such local folder (the path does not exist"
                               + (f", resolved from {os.getcwd()}" if not os.path.isabs(local) else "") + ")")
    cfg, w = _resolve_hub(source, adapter_name, revision, subfolder, token, cache_dir, local_files_only, allow_pickle)
    return cfg, w, False


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
        except (ValueError, TypeError) as e:
            raise AdapterFileError(f"{repo}: could not fetch {name} ({type(e).__name__}: {e})") from None

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
    raise AdapterFileError(f"{where}: no local folder of that name, and no {CONFIG_NAME} found in the Hub cache"
                           + (" (offline)" if local_files_only or constants.HF_HUB_OFFLINE else " or on the Hub"))


_MAX_JSON_DEPTH = 64  # PEFT's configs nest 3 levels deep


def _json_depth_ok(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > _MAX_JSON_DEPTH:
            return False
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return True


_PARSED: dict[bytes, tuple[Any, Any]] = {}
_PARSED_MAX = 256  # configs remembered (each at most _PARSED_BYTES long)
_PARSED_BYTES = 1 << 16


def parse_config(data: bytes, path: str) -> tuple[Any, Any]:
    """``(method, config)`` from the bytes of an adapter_config.json (``path`` names it in errors). Bytes seen
    before are not parsed and checked again (a server loading many adapters saved with one config): the config
    is a copy of the one they gave, its lists and dicts its own."""
    hit = _PARSED.get(data)
    if hit is not None:
        return hit[0], copy.deepcopy(hit[1])
    out = _parse_config(data, path)
    if len(data) <= _PARSED_BYTES:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[data] = (out[0], copy.deepcopy(out[1]))
    return out


def _parse_config(data: bytes, path: str) -> tuple[Any, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); an adapter config is a JSON "
                               "file") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterFileError(f"{path}: not a readable adapter config (JSON nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise AdapterFileError(f"{path}: not a readable adapter config ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if not _json_depth_ok(raw):
        raise AdapterFileError(f"{path}: not a readable adapter config (JSON nested deeper than {_MAX_JSON_DEPTH})")
    if "peft_type" not in raw:
        raise ConfigError(f"{path}: no 'peft_type' field")
    method = method_for_peft_type(raw["peft_type"], path)
    return method, method.config_cls.from_dict(raw, source=path)


def read_config(path: str) -> Any:
    """Parse an adapter_config.json into ``(method, config)``: its method and adaptfn's config class for its
    peft_type. Unreadable, huge (over 16 MiB), non-UTF-8 or invalid files raise :class:`AdapterFileError`;
    bad fields raise :class:`ConfigError` naming them."""
    data = _files.read_capped(path)
    assert data is not None
    return parse_config(data, path)


class _WeightsReader:
    """``with _WeightsReader(path, device) as f``: a safetensors handle whose failures are typed errors."""

    def __init__(self, path: str, device: str) -> None:
        self.path, self.device, self.handle = path, device, None

    def __enter__(self) -> Any:
        from safetensors import safe_open

        try:
            self.handle = safe_open(self.path, framework="pt", device=self.device)
            f = self.handle.__enter__()
        except Exception as e:  # noqa: BLE001 - any failure to open is a bad file or a read error
            raise _weights_error(self.path, e) from None
        return _Guarded(f, self.path)

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.__exit__(*exc)


class _Guarded:
    def __init__(self, f: Any, path: str) -> None:
        self.f, self.path = f, path

    def keys(self) -> list[str]:
        return list(self.f.keys())

    def get_tensor(self, k: str) -> torch.Tensor:
        try:
            return self.f.get_tensor(k)
        except Exception as e:  # noqa: BLE001
            raise _weights_error(self.path, e) from None


def _weights_error(path: str, e: BaseException) -> AdapterFileError:
    if isinstance(e, OSError) and e.errno is not None:
        return _files.os_error("read", path, e)
    text = str(e)
    for code, words in ((errno.EACCES, "Permission denied"), (errno.EIO, "Input/output error"),
                        (errno.ENOENT, "No such file")):
        if words in text:
            err = AdapterFileError(f"{path}: cannot read: {words.lower()} ({text})")
            err.errno = code
            return err
    return AdapterFileError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {text})")


def read_tensors(path: str, device: Any = None) -> dict[str, torch.Tensor]:
    """Read a safetensors or (opted-in) pickle weights file; any damage is an AdapterFileError (a read
    failure, e.g. permission denied or an I/O error, says so instead of "corrupt")."""
    dev = _device_arg("read_tensors", device)
    if path.endswith(".safetensors"):
        try:
            fd = os.open(path, os.O_RDONLY)
            os.close(fd)
        except OSError as e:
            raise _files.os_error("read", path, e) from None
        with _WeightsReader(path, dev) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    try:
        sd = torch.load(path, map_location=dev, weights_only=True)
    except OSError as e:
        raise _files.os_error("read", path, e) from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise AdapterFileError(f"{path}: cannot read as a weights-only torch file ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise AdapterFileError(f"{path}: expected a dict of tensors")
    return sd


def _device_arg(where: str, device: Any) -> str:
    """A device argument as the string safetensors takes; bogus or unavailable devices raise ConfigError."""
    if device is None:
        return "cpu"
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise ConfigError(f"{where}: device must be a str, int or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"{where}: device={device!r} is not a device ({e})") from None
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ConfigError(f"{where}: device={device!r} is not available here ({type(e).__name__}: {e})") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def _dtype_arg(where: str, dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{where}: dtype must be a torch.dtype (e.g. torch.float16), got {dtype!r}")
    if not dtype.is_floating_point or "float8" in str(dtype):
        raise ConfigError(f"{where}: dtype={dtype} is not a compute dtype for an adapter; use torch.float32, "
                          "float64, float16 or bfloat16")
    return dtype


@functools.lru_cache(maxsize=64)
def _suffix_index(suffixes: tuple[str, ...]) -> tuple[tuple[int, ...], dict[str, int], dict[str, str | None]]:
    """For :func:`_delta_suffix`: the dot-separated lengths of ``suffixes``, each suffix's first position and
    a memo of the answers (a server loading many adapters of one model meets the same keys again)."""
    first: dict[str, int] = {}
    for i, s in enumerate(suffixes):
        first.setdefault(s, i)
    return tuple(sorted({s.count(".") + 1 for s in suffixes})), first, {}


_MEMO_KEYS = 1 << 14
_MISSING = object()


def _delta_suffix(rest: str, suffixes: tuple[str, ...]) -> str | None:
    """The first of ``suffixes`` (in their order) that ``rest`` ends with after a dot, or None: a lookup of
    ``rest``'s last 1, 2, ... components instead of an ``endswith`` per suffix, remembered per key."""
    lengths, first, memo = _suffix_index(suffixes)
    hit = memo.get(rest, _MISSING)
    if hit is not _MISSING:
        return hit  # type: ignore[return-value]
    parts = rest.split(".")
    n = len(parts)
    best, at = None, len(suffixes)
    for k in lengths:
        if k >= n:
            break
        i = first.get(".".join(parts[n - k:]))
        if i is not None and i < at:
            best, at = suffixes[i], i
    if len(memo) >= _MEMO_KEYS:
        memo.clear()
    memo[rest] = best
    return best


_SHARES: dict[type, bool] = {}


def _shares_tensors(method: Any) -> bool:
    """``isinstance(method, SharedTensors)``, remembered per method class (a runtime Protocol check is slow,
    and a load of many adapters asks it for each)."""
    cls = type(method)
    if cls not in _SHARES:
        _SHARES[cls] = isinstance(method, SharedTensors)
    return _SHARES[cls]


def _saved_module(config: Any, rest: str) -> tuple[str, str] | None:
    """Split a modules_to_save key into (module path, tensor name) by PEFT's rule."""
    names = getattr(config, "modules_to_save", None) or []
    parts = rest.split(".")
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        if any(path.endswith(m) for m in names):
            return path, ".".join(parts[i:])
    return None


def _from_peft(method: Any, config: Any, sd: Mapping[str, torch.Tensor], source: str,
               model: Any = None) -> Adapter:
    """Build an adapter from a PEFT state dict (keys with the ``base_model.model.`` prefix, plus a method's
    shared keys, see :class:`adaptfn.methods.base.SharedTensors`). ``model`` (an ``nn.Module`` or None) is
    handed to a method that may need it to regenerate shared tensors the file lacks."""
    suffixes = tuple(method.delta_suffixes())
    shares = _shares_tensors(method)
    shared_keys = method.shared_keys() if shares else ()
    shared: dict[str, torch.Tensor] = {}
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    repl: dict[str, dict[str, torch.Tensor]] = {}
    tied: dict[str, set[str]] = {}
    pending: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key in shared_keys:
            shared[key] = t
            continue
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{source}: key {key!r} does not start with {PREFIX!r} (not a PEFT adapter file)")
        rest = key[len(PREFIX):]
        suffix = _delta_suffix(rest, suffixes)
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
        if weight_tying.defer(config):  # perhaps a tied module's copy (ensure_weight_tying): resolved below
            pending[rest] = t
            continue
        raise AdapterFileError(
            f"{source}: key {key!r} matches no target of the config: not a {method.name} key "
            f"({', '.join(suffixes)}), not under modules_to_save={getattr(config, 'modules_to_save', None)!r}"
            f", not a bias with bias={getattr(config, 'bias', None)!r}")
    tied_modules = weight_tying.fold(config, deltas, repl, pending, source) if weight_tying.defer(config) else {}
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
        entries[path] = Entry(e.kind, e.r, e.scaling, e.fan_in_fan_out, names, tied_names, e.options,
                              e.frozen + frozen)
        tensors.setdefault(path, {}).update(found)
    weight_tying.mark(entries, tied_modules)
    if not entries:
        raise AdapterFileError(f"{source}: the weights file holds no adapter tensors")
    if shares:
        entries, tensors = method.shared_from_peft(config, shared, entries, tensors, source, _module(model, source))
    for leaves in tensors.values():
        ref = next(iter(leaves.values()))
        leaves[GATE] = torch.ones((), dtype=torch.float32, device=ref.device)
    order = sorted(entries)
    return Adapter(method.name, config, {p: entries[p] for p in order}, {p: tensors[p] for p in order})


def _module(model: Any, where: str) -> Any:
    """``model=`` of the load functions: an ``nn.Module``, the fn of :func:`adaptfn.functional` (its model) or None."""
    if model is None or isinstance(model, torch.nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    raise ConfigError(f"{where}: model must be an nn.Module or the fn of af.functional, got {type(model).__name__}")


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
    *,
    model: Any = None,
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
        model: keyword only, optional: the model (``nn.Module`` or the ``fn`` of :func:`adaptfn.functional`), needed
            only where the file leaves out tensors PEFT regenerates from the model (a VeRA adapter saved with
            ``save_projection=False``).

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
    where = "load"
    if isinstance(source, bytes) or not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"{where}: source must be a folder path (str or os.PathLike) or a Hub repo id, got "
                          f"{type(source).__name__}")
    source = _path_arg(where, "source", source)
    if not source:
        raise ConfigError(f"{where}: source is an empty string")
    for name, v in (("revision", revision), ("subfolder", subfolder)):
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{where}: {name} must be a str or None, got {type(v).__name__}")
    if subfolder is not None:
        _files.check_path(subfolder, "subfolder")
    if token is not None and not isinstance(token, (str, bool)):
        raise ConfigError(f"{where}: token must be a str, a bool or None, got {type(token).__name__}")
    if cache_dir is not None:
        cache_dir = _path_arg(where, "cache_dir", cache_dir)
    for name, v in (("local_files_only", local_files_only), ("allow_pickle", allow_pickle)):
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: {name} must be True or False, got {v!r}")
    dev = _device_arg(where, device)
    dtype = _dtype_arg(where, dtype)
    model = _module(model, where)
    cfg_path, w_path, local = _resolve(source, adapter_name, revision, subfolder, token, cache_dir,
                                       local_files_only, allow_pickle)

    def use(data: bytes, tensors: Any) -> Adapter:
        method, config = parse_config(data, cfg_path)
        return _from_peft(method, config, tensors(), w_path, model)

    if w_path.endswith(".safetensors"):
        folder = os.path.dirname(cfg_path)
        pending_path = os.path.join(folder, _files.PENDING_NAME) if local else None
        adapter, pending = _files.read_pair(cfg_path, w_path, pending_path, use,
                                            lambda p: _WeightsReader(p, dev), direct=dev in (None, "cpu"))
        if pending:  # a killed save had committed: finish it, unless a save is running (it will)
            with contextlib.suppress(AdaptfnError, OSError), _files.locked(folder, wait=False) as fd:
                if fd is not None:
                    _files.settle(folder, fd)
    else:
        adapter = use(_files.read_capped(cfg_path) or b"", lambda: read_tensors(w_path, dev))
    if dtype is not None:
        adapter = replace(adapter, tensors={
            p: {n: (t.to(dtype) if t.is_floating_point() and n != GATE else t) for n, t in d.items()}
            for p, d in adapter.tensors.items()})
    check_leaves(adapter, w_path)
    return adapter


def config_from(config: Any, where: str) -> tuple[Any, Any]:
    """``(method, config)`` from an adaptfn config, a parsed adapter_config.json ``dict`` or a ``peft`` config
    object (anything with ``to_dict()``; PEFT's enums, sets and runtime fields are normalised as its
    ``save_pretrained`` does)."""
    if isinstance(config, type):
        raise ConfigError(f"{where}: config is the class {config.__name__}; pass an instance, e.g. "
                          f"{config.__name__}(r=8, target_modules=[...])")
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


def from_state_dict(state_dict: Mapping[str, torch.Tensor], config: Any, *, model: Any = None) -> Adapter:
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
        model: keyword only, optional: as in :func:`load` (a VeRA state dict without its projections).

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
    model = _module(model, where)
    shared = method.shared_keys() if isinstance(method, SharedTensors) else ()
    prefixed = [k.startswith(PREFIX) for k in state_dict if k not in shared]
    if not all(prefixed):
        if any(prefixed):
            raise ConfigError(f"{where}: some keys start with {PREFIX!r} and some do not (e.g. "
                              f"{next(k for k in state_dict if not k.startswith(PREFIX))!r}); use one form")
        state_dict = {k if k in shared else PREFIX + k: v for k, v in state_dict.items()}
    try:
        adapter = _from_peft(method, cfg, state_dict, where, model)
        check_leaves(adapter, where)
    except (AdapterFileError, IncompatibleAdapterError) as e:  # the same checks as a file, as bad arguments
        raise ConfigError(str(e)) from None
    return adapter


__all__ = ["load", "save", "state_dict", "from_state_dict", "read_config", "read_tensors", "parse_config"]
