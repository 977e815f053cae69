"""PEFT's trainable tokens inside a LoRA adapter (``LoraConfig.trainable_token_indices``, PEFT's
``TrainableTokensWrapper``): chosen rows of an embedding matrix are trained, the rest stays frozen. Called from
:mod:`adaptfn.methods.lora` for entries of kind :data:`KIND` (``"tokens"``).

The leaf ``trainable_tokens_delta`` [k, dim] holds the **values** of the k rows (PEFT's name; initialised as
copies of the base rows, or N(0, 1) with ``init_lora_weights=False``), the row indices are static
(``Entry.options``). For the call the module's ``weight`` is ``W.index_copy(0, indices, values)`` (what PEFT's
forward and merge compute), so the gradient reaches only those rows. Saved as
``<module>.token_adapter.trainable_tokens_delta``.

Targets, as PEFT 0.21 reads the field:

* a list ``[i, ...]``: the model's input embedding (``get_input_embeddings()``; else modules named
  ``embed_tokens``);
* a dict ``{name: [i, ...]}``: each module whose path ends with ``name`` (an ``nn.Embedding``, or an
  ``nn.Linear`` without bias such as a tied ``lm_head``).

Weight tying: when the model ties its output layer to the input embedding (``config.tie_word_embeddings``), the
rows replaced in the input embedding are replaced in every tied module too (PEFT wraps them with a tied
adapter that shares the delta and saves nothing of its own), unless the dict gives a tied module other indices:
then each module has its own rows. With ``ensure_weight_tying=True`` such a mismatch raises
:class:`adaptfn.ConfigError` (PEFT's ``ValueError``). A module cannot be in ``modules_to_save`` and have trainable
tokens, nor have LoRA and trainable tokens at once (PEFT refuses both).

A scale weight ``w`` (:func:`adaptfn.scale`) moves the rows ``w`` of the way from the base rows to the
trained ones (``lerp``); a weight other than 1 cannot be saved (the file holds values, not deltas). ``route=`` is
refused (the rows are shared by every row of the batch).

Example:
    >>> cfg = af.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 7])
    >>> a = af.init(fn, cfg, generator=torch.Generator().manual_seed(0))
    >>> e = "model.decoder.embed_tokens"
    >>> a.entries[e].kind, a.entries[e].option("token_indices"), tuple(a.leaves(e)["trainable_tokens_delta"].shape)
    ('tokens', (3, 7), (2, 22))
    >>> [k for k in af.state_dict(a) if "token" in k]
    ['base_model.model.model.decoder.embed_tokens.token_adapter.trainable_tokens_delta']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..adapter import COEF, Entry
from ..errors import AdapterFileError, ConfigError, IncompatibleAdapterError, shape_str, stacked_called_directly
from .base import INT64_MAX, is_int

__all__ = ["KIND", "FIELD", "LEAF", "PEFT_KEY", "validate_config", "plan", "init_leaves",
           "updated", "check", "to_peft", "from_peft", "register", "write_targets"]

KIND = "tokens"
FIELD = "trainable_token_indices"
LEAF = "trainable_tokens_delta"
PEFT_KEY = "token_adapter.trainable_tokens_delta"
_OPT = "token_indices"

# input-embedding weights of models that tie their output layer to them (tensor identity, held weakly): the rows
# a "tokens" entry replaces there are replaced under every alias too (see write_targets)
_TIED_INPUT: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _indices_ok(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(is_int(i) and 0 <= i <= INT64_MAX for i in v) and (
        len(set(v)) == len(v))


def validate_config(cfg: Any) -> None:
    """``trainable_token_indices``: None, a non-empty list of distinct ints >= 0, or a dict module name -> such a
    list; ``ensure_weight_tying`` a bool; no module both in it and in ``modules_to_save`` (PEFT's rule)."""
    cls = type(cfg).__name__
    v = getattr(cfg, FIELD)
    ewt = cfg.ensure_weight_tying
    if not isinstance(ewt, bool):
        raise ConfigError(f"{cls}.ensure_weight_tying: must be True or False, got {ewt!r}")
    if v is None:
        return
    if isinstance(v, Mapping):
        if not v:
            raise ConfigError(f"{cls}.{FIELD}: an empty dict; give {{module name: [token index, ...]}} or None")
        for k, idx in v.items():
            if not isinstance(k, str) or not k:
                raise ConfigError(f"{cls}.{FIELD}: keys must be module names (non-empty str), got {k!r}")
            if not _indices_ok(idx):
                raise ConfigError(f"{cls}.{FIELD}[{k!r}]: must be a non-empty list of distinct token indices (ints "
                                  f">= 0), got {idx!r}")
        names = list(v)
    elif _indices_ok(v):
        names = []
    else:
        raise ConfigError(f"{cls}.{FIELD}: must be a non-empty list of distinct token indices (ints >= 0), a dict "
                          f"{{module name: [index, ...]}} or None, got {v!r}")
    for n in names:
        if n in (cfg.modules_to_save or ()):
            raise ConfigError(f"{cls}.{FIELD}: module {n!r} is in modules_to_save too (trained in full); give it "
                              "one of the two, not both (PEFT refuses it too)")


def _input_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    f = getattr(model, "get_input_embeddings", None)
    try:
        emb = f() if callable(f) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is None:
        return None
    return next(((p, m) for p, m in model.named_modules() if m is emb), None)


def _weights_tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def _tied_paths(model: nn.Module, emb: nn.Module) -> list[str]:
    """Modules (other than the input embedding) whose ``weight`` is the input embedding's tensor."""
    w = getattr(emb, "weight", None)
    return [p for p, m in model.named_modules() if m is not emb and w is not None and getattr(m, "weight", None) is w]


def register(model: nn.Module, tensors: Mapping[int, torch.Tensor]) -> None:
    """Record the input embedding weight of a model that ties it (called by :func:`adaptfn.functional`).

    Arguments:
        model: the model. tensors: ``id(model tensor) -> the tensor functional() puts in params``.
    """
    found = _input_embedding(model)
    if found is None or not _weights_tied(model) or not _tied_paths(model, found[1]):
        return
    w = found[1].weight
    _TIED_INPUT[w] = True
    twin = tensors.get(id(w))
    if twin is not None:
        _TIED_INPUT[twin] = True


def write_targets(path: str, kinds: Mapping[str, str], params: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """Where the updated ``weight`` of the tokens entry at ``path`` goes: every alias of the tensor when it is a
    tied input embedding and the adapter has no tokens entry of its own on a tied module (PEFT's tying), else
    ``<path>.weight`` only.

    Arguments:
        path: the entry's module. kinds: every entry of the adapter, path -> kind. params: the params dict.
    """
    key = f"{path}.weight"
    w = params.get(key)
    try:
        tied = w is not None and _TIED_INPUT.get(w, False)
    except TypeError:
        tied = False
    if not tied:
        return (key,)
    aliases = tuple(k for k, v in params.items() if v is w)
    owners = {k.rpartition(".")[0] for k in aliases} - {path}
    if any(kinds.get(o) == KIND for o in owners):  # PEFT did not tie: a tied module has other indices
        return (key,)
    return aliases


def _module_paths(model: nn.Module, name: str) -> list[str]:
    return [p for p, _ in model.named_modules(remove_duplicate=False) if p and p.endswith(name)]


def plan(config: Any, model: nn.Module, entries: Mapping[str, Entry]) -> dict[str, Entry]:
    """The ``"tokens"`` entries of ``config.trainable_token_indices`` (see the module docstring)."""
    spec = getattr(config, FIELD, None)
    if spec is None:
        return {}
    emb = _input_embedding(model)
    if isinstance(spec, Mapping):
        layers = {k: list(v) for k, v in spec.items()}
    else:
        layers = {emb[0] if emb is not None else "embed_tokens": list(spec)}
    tied = _weights_tied(model)
    skip: set[str] = set()
    if emb is not None and tied and len(layers) > 1:
        tied_paths = _tied_paths(model, emb[1])
        keys = [k for k in layers if emb[0].endswith(k) or any(t.endswith(k) or k in t.split(".") for t in tied_paths)]
        if len(keys) >= 2:
            mismatch = any(layers[k] != layers[keys[0]] for k in keys[1:])
            if mismatch and config.ensure_weight_tying:
                raise ConfigError(
                    f"LoraConfig.{FIELD}: the tied layers {keys} get different token indices "
                    f"({ {k: layers[k] for k in keys} }); with ensure_weight_tying=True they must be the same "
                    "(PEFT refuses it too)")
            if not mismatch:  # the tied modules follow the input embedding
                skip = {k for k in keys if not emb[0].endswith(k)}
    out: dict[str, Entry] = {}
    for name, idx in layers.items():
        if name in skip:
            continue
        paths = _module_paths(model, name)
        if not paths:
            raise IncompatibleAdapterError(f"LoraConfig.{FIELD}: {name!r} matches no module of {type(model).__name__}")
        for p in paths:
            if p in entries and entries[p].kind:
                raise IncompatibleAdapterError(
                    f"LoraConfig.{FIELD}: module {p!r} is a LoRA target too; PEFT cannot put trainable tokens on a "
                    "LoRA layer, so adaptfn does not either (exclude it from target_modules)")
            out[p] = Entry(kind=KIND, options=((_OPT, tuple(int(i) for i in idx)),))
    return out


def _weight_of(path: str, module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.Linear) and module.bias is not None:
        raise IncompatibleAdapterError(
            f"module {path!r} is an nn.Linear with a bias: PEFT's trainable tokens compute F.linear(x, W) without it, "
            "so adaptfn does not put them there")
    w = getattr(module, "weight", None)
    if not isinstance(module, (nn.Embedding, nn.Linear)) or not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise IncompatibleAdapterError(
            f"module {path!r} is a {type(module).__name__}: trainable tokens need an nn.Embedding or an nn.Linear "
            "(PEFT's rule)")
    return w


def init_leaves(config: Any, path: str, entry: Entry, module: nn.Module, generator: torch.Generator | None,
                dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """PEFT's init: the base rows (``init_lora_weights=False``: N(0, 1) draws), in the weight's dtype."""
    w = _weight_of(path, module)
    idx = entry.option(_OPT)
    if max(idx) >= w.shape[0]:
        raise IncompatibleAdapterError(f"LoraConfig.{FIELD}: module {path!r} has {w.shape[0]} rows but the indices "
                                       f"go up to {max(idx)}")
    dt = dtype or w.dtype
    if config.init_lora_weights is False:
        v = torch.randn(len(idx), w.shape[1], generator=generator, dtype=torch.float32, device=w.device).to(dt)
    else:
        v = w.detach()[list(idx)].to(dt, copy=True)
    return {LEAF: v}


def updated(entry: Entry, leaves: Mapping[str, torch.Tensor], on: Any,
            tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"weight": W.index_copy(0, indices, values)}`` (values moved ``w`` of the way from the base rows with
    a scale weight; the base where the gate is off under a transform)."""
    W = tensors["weight"]
    v = leaves[LEAF]
    if v.dim() != 2:
        raise stacked_called_directly()
    idx = torch.tensor(entry.option(_OPT), device=W.device)
    if v.shape[0] != idx.numel() or v.shape[1] != W.shape[1]:
        raise IncompatibleAdapterError(f"{LEAF} {shape_str(v.shape)} does not fit {idx.numel()} rows of a weight "
                                       f"{shape_str(W.shape)}")
    v = v.to(W.dtype)
    c = leaves.get(COEF)
    if c is not None:
        v = torch.lerp(W.index_select(0, idx), v, c.to(W.dtype))
    new = W.index_copy(0, idx, v)
    if on is not True:
        new = torch.where(on, new, W)
    return {"weight": new}


def check(path: str, entry: Entry, leaves: Mapping[str, torch.Tensor], module: nn.Module) -> None:
    w = _weight_of(path, module)
    idx = entry.option(_OPT)
    v = leaves.get(LEAF)
    if v is None or tuple(v.shape[-2:]) != (len(idx), w.shape[1]) or max(idx) >= w.shape[0]:
        raise IncompatibleAdapterError(
            f"module {path!r}: {LEAF} {shape_str(v.shape) if v is not None else None} does not fit token indices "
            f"{list(idx)} of a weight {shape_str(w.shape)} (expected [{len(idx)}, {w.shape[1]}], indices < "
            f"{w.shape[0]})")


def to_peft(entry: Entry, leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    c = leaves.get(COEF)
    if c is not None and float(c.detach().item()) != 1.0:
        raise ConfigError("trainable tokens with a scale weight other than 1 cannot be saved (PEFT's file holds the "
                          "rows' values, not deltas); merge it or drop it with af.select first")
    return {PEFT_KEY: leaves[LEAF]}


def from_peft(config: Any, path: str, found: Mapping[str, torch.Tensor],
              source: str) -> tuple[Entry, dict[str, torch.Tensor]]:
    spec = getattr(config, FIELD, None)
    if spec is None:
        raise AdapterFileError(f"{source}: module {path!r} has {PEFT_KEY!r} but adapter_config.json has no {FIELD}")
    if set(found) != {PEFT_KEY}:
        raise AdapterFileError(f"{source}: module {path!r} has trainable tokens and {sorted(set(found) - {PEFT_KEY})}: "
                               "PEFT cannot put LoRA and trainable tokens on one module")
    if isinstance(spec, Mapping):
        idx = next((v for k, v in spec.items() if path.endswith(k)), None)
        if idx is None:
            raise AdapterFileError(f"{source}: module {path!r} has trainable tokens but {FIELD}={spec!r} names no "
                                   "module it ends with")
    else:
        idx = spec
    v = found[PEFT_KEY]
    if v.dim() != 2 or v.shape[0] != len(idx):
        raise AdapterFileError(f"{source}: module {path!r}: {PEFT_KEY} {shape_str(v.shape)} is not [{len(idx)}, dim] "
                               f"for the {len(idx)} indices of {FIELD}")
    return Entry(kind=KIND, options=((_OPT, tuple(int(i) for i in idx)),)), {LEAF: v}
