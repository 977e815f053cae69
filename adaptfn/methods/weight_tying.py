"""PEFT's ``ensure_weight_tying=True`` for an input embedding in ``modules_to_save`` or ``target_modules`` (the
trainable-tokens part lives in :mod:`adaptfn.methods.trainable_tokens`). Called from :mod:`adaptfn.methods.lora`
(planning), :mod:`adaptfn.io` (file keys), :mod:`adaptfn.functional` (inject) and :mod:`adaptfn.transforms`
(merge).

When a model ties its output layer to the input embedding (``config.tie_word_embeddings`` and one weight tensor
shared by both) and the config names ``embed_tokens`` or ``lm_head`` (PEFT's rule: the last component of a name in
``modules_to_save`` / ``target_modules``), PEFT 0.21 trains one thing for both:

* ``modules_to_save``: PEFT puts the input embedding's path in ``modules_to_save``, drops the tied names from it,
  and gives the tied module (``lm_head``) the embedding's trained copy as its weight. adaptfn: one replacement
  entry on the input embedding whose ``weight`` replaces every alias of the base tensor (``Entry.tied``), saved
  under ``<embedding>.weight`` and, the same values, ``<tied module>.weight``.
* ``target_modules``: PEFT puts the input embedding's path in ``target_modules``, drops the tied names, gives the
  embedding an embedding LoRA (``lora_embedding_A`` [r, vocab], ``lora_embedding_B`` [dim, r]) and the tied
  module a linear LoRA whose factors *are* those, transposed (``lora_A = lora_embedding_B.T``, ``lora_B =
  lora_embedding_A.T``): both modules see the same delta. adaptfn: one embedding entry; inject runs the tied
  module's linear LoRA from the same leaves, merge writes the merged embedding weight to the tied module too.
  The file holds the tied module's ``lora_A.weight`` / ``lora_B.weight`` as PEFT writes them.

The tied modules are recorded in the entry's option ``"tied_modules"``; they follow the embedding only where the
model really shares the weight (on an untied model PEFT leaves them alone, and so does adaptfn). The choice is
static, so ``mask`` / ``scale`` / ``stack`` / ``vmap`` / ``grad`` see one set of leaves.

PEFT's own ``merge_and_unload`` of the LoRA case adds the delta twice into the shared tensor (once per module):
its merged model differs from its unmerged one. ``af.merge`` adds it once (``merge == inject``, equal to PEFT's
unmerged outputs).

Example:
    >>> cfg = af.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], ensure_weight_tying=True)
    >>> a = af.init(fn, cfg)            # a tiny OPT: lm_head tied to model.decoder.embed_tokens
    >>> a.config.target_modules
    ['q_proj', 'model.decoder.embed_tokens']
    >>> a.entries["model.decoder.embed_tokens"].option("tied_modules")
    ('lm_head',)
    >>> sd = af.state_dict(a)           # lm_head's factors: the embedding's, transposed
    >>> [tuple(v.shape) for k, v in sorted(sd.items()) if "lm_head.lora" in k or "embedding" in k]
    [(2, 22), (61, 2), (2, 61), (22, 2)]
    >>> torch.equal(sd["base_model.model.lm_head.lora_A.weight"],
    ...             sd["base_model.model.model.decoder.embed_tokens.lora_embedding_B"].T)
    True
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..adapter import Entry
from ..errors import AdapterFileError, ConfigError
from .trainable_tokens import _input_embedding, _tied_paths, _weights_tied

__all__ = ["OPTION", "EMBEDDING_LAYER_NAMES", "rewrite", "plan", "partners", "partner_entry", "partner_leaves",
           "call_partners", "merge_targets", "is_saved_copy", "to_peft", "defer", "fold", "mark"]

OPTION = "tied_modules"
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's names for the tied pair
_LINEAR = ("lora_A.weight", "lora_B.weight")
_EMB = ("lora_embedding_A", "lora_embedding_B")


def _names_embedding(names: Any) -> bool:
    return any(isinstance(m, str) and m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in names or ())


def _tied_pair(model: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    """(input embedding path, paths of the modules sharing its weight) of a model that ties them, else None."""
    emb = _input_embedding(model)
    if emb is None or not _weights_tied(model):
        return None
    tied = tuple(sorted(_tied_paths(model, emb[1])))
    return (emb[0], tied) if tied else None


def _drop_tied(names: list[str], tied: tuple[str, ...]) -> list[str]:
    """PEFT's rule: for each tied path, remove the first name that matches it as a module-name suffix."""
    out = list(names)
    for key in tied:
        for m in out:
            if re.match(rf"(^|.*\.){m}($|\..*)", key):
                out.remove(m)
                break
    return out


def rewrite(config: Any, model: nn.Module) -> tuple[Any, str | None]:
    """PEFT's rewrite of ``modules_to_save`` / ``target_modules`` under ``ensure_weight_tying=True`` on a tied
    model: the input embedding's path added, the tied modules' names removed.

    Arguments:
        config: the LoraConfig. model: the model.

    Returns:
        ``(config, case)``: case ``"save"`` (``modules_to_save``), ``"lora"`` (``target_modules``) or None (no
        tying: the config comes back as it is).
    """
    if not getattr(config, "ensure_weight_tying", False):
        return config, None
    pair = _tied_pair(model)
    if pair is None:
        return config, None
    emb, tied = pair
    mts = list(getattr(config, "modules_to_save", None) or [])
    tm = config.target_modules
    if _names_embedding(mts):
        if emb not in mts:
            mts.append(emb)
        return dataclasses.replace(config, modules_to_save=_drop_tied(mts, tied)), "save"
    # PEFT's test: a regex that fullmatches a bare name, or a list with a name ending in one
    in_target = (any(re.fullmatch(tm, n) for n in EMBEDDING_LAYER_NAMES) if isinstance(tm, str)
                 else _names_embedding(tm))
    if not in_target:
        return config, None
    _check_named(emb)
    if config.use_dora:
        raise ConfigError(f"LoraConfig.ensure_weight_tying=True with use_dora=True: the tied modules {list(tied)} "
                          f"would share the LoRA of {emb!r} but each keep a DoRA magnitude of its own; adaptfn does "
                          "not support that combination (set one of them to False)")
    if isinstance(tm, str):
        return dataclasses.replace(config, target_modules=rf"(?:{tm}|^{re.escape(emb)}$)"), "lora"
    names = list(dict.fromkeys([*(tm or []), emb]))
    return dataclasses.replace(config, target_modules=_drop_tied(names, tied)), "lora"


def _check_named(emb: str, err: type[Exception] = ConfigError, source: str = "LoraConfig") -> None:
    """PEFT ties the LoRA when it builds the adapter, then again when it loads the file, from the rewritten
    ``target_modules``; an input embedding not named ``embed_tokens`` / ``lm_head`` (GPT-2's ``transformer.wte``)
    is tied in the first and not in the second (the file's lm_head keys are dropped), so PEFT's own file does not
    give back its trained model: refused, naming it. (The ``modules_to_save`` case reloads tied in PEFT: kept.)"""
    if emb.split(".")[-1] not in EMBEDDING_LAYER_NAMES:
        raise err(
            f"{source}: ensure_weight_tying=True ties the output layer's LoRA to the input embedding {emb!r} (a "
            f"LoRA target); PEFT 0.21 does that when it builds the adapter but not when it loads the saved file (the "
            f"rewritten target_modules name {emb!r}, whose last name is not one of {list(EMBEDDING_LAYER_NAMES)}), "
            "so the file does not give back the trained model in PEFT; adaptfn refuses this case (set "
            "ensure_weight_tying=False: the output layer then keeps the base weight in both)")


def _check_scaling(config: Any, emb: str, tied: tuple[str, ...], source: str = "LoraConfig") -> None:
    want = config.rank_and_alpha(emb)
    for p in tied:
        if config.rank_and_alpha(p) != want:
            raise ConfigError(
                f"{source}: ensure_weight_tying=True ties {p!r} to {emb!r}, but rank_pattern / alpha_pattern give "
                f"them different (r, alpha): {config.rank_and_alpha(p)} vs {want}; PEFT would then scale one shared "
                "LoRA two ways, which adaptfn does not reproduce (give them the same r and alpha)")


def plan(config: Any, model: nn.Module, entries: dict[str, Entry], case: str | None) -> dict[str, Entry]:
    """Mark the input embedding's entry with its tied modules (``case`` from :func:`rewrite`).

    Arguments:
        config: the rewritten config. model: the model. entries: the plan so far. case: ``"save"``,
            ``"lora"`` or None.

    Returns:
        the entries, the input embedding's one carrying the ``tied_modules`` option (and, for a saved copy,
        replacing every alias of the weight).
    """
    if case is None:
        return entries
    pair = _tied_pair(model)
    if pair is None:
        return entries
    emb, tied = pair
    e = entries.get(emb)
    if e is None:
        return entries
    out = dict(entries)
    for p in tied:  # the tied modules follow the embedding: nothing of their own
        out.pop(p, None)
    opts = tuple(o for o in e.options if o[0] != OPTION) + ((OPTION, tied),)
    if case == "save":
        if "weight" not in e.replaced:
            return entries
        out[emb] = dataclasses.replace(e, tied=tuple(set(e.tied) | {"weight"}), options=opts)
    else:
        if e.kind != "embedding":
            return entries
        _check_scaling(config, emb, tied)
        out[emb] = dataclasses.replace(e, options=opts)
    return out


def partners(entry: Entry) -> tuple[str, ...]:
    """The modules tied to this entry's module (empty for every entry but a tied input embedding's)."""
    return tuple(entry.option(OPTION, ()) or ())


def partner_entry(entry: Entry) -> Entry:
    """The linear LoRA entry a tied module runs (PEFT's ``lora_A`` / ``lora_B`` views of the embedding's)."""
    return Entry(kind="linear", r=entry.r, scaling=entry.scaling, fan_in_fan_out=False,
                 options=tuple(o for o in entry.options if o[0] != OPTION))


def partner_leaves(leaves: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tied module's leaves: ``lora_A = lora_B(emb).T`` [r, dim], ``lora_B = lora_A(emb).T`` [vocab, r] (the
    last two dims, so a stack [n, ...] works too); gate, weight and scaling shared."""
    out = {k: v for k, v in leaves.items() if k not in ("lora_A", "lora_B")}
    out["lora_A"] = leaves["lora_B"].transpose(-1, -2)
    out["lora_B"] = leaves["lora_A"].transpose(-1, -2)
    return out


def call_partners(path: str, entry: Entry, aliases: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The tied modules that share ``<path>.weight`` in this model (``aliases``: params key -> every key of the
    same tensor); only those get the embedding's LoRA."""
    if entry.kind != "embedding":
        return ()
    same = set(aliases.get(f"{path}.weight", ()))
    return tuple(p for p in partners(entry) if f"{p}.weight" in same)


def merge_targets(path: str, entry: Entry, name: str, before: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The tied modules' keys that :func:`adaptfn.merge` writes the merged ``<path>.<name>`` to."""
    if name != "weight" or entry.kind != "embedding":
        return ()
    w = before.get(f"{path}.weight")
    return tuple(k for k in (f"{p}.weight" for p in partners(entry)) if w is not None and before.get(k) is w)


def is_saved_copy(entry: Entry, name: str) -> bool:
    """Whether ``name`` is a tied ``modules_to_save`` copy (saved as ``<path>.<name>``, not ``base_layer.``)."""
    return bool(partners(entry)) and not entry.kind and name not in entry.frozen


def to_peft(path: str, entry: Entry, written: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tied modules' keys PEFT writes, from what was written for the embedding (``written``: the file so far).

    Arguments:
        path: the embedding's path. entry: its entry. written: keys -> tensors. prefix: ``base_model.model.``.
    """
    out: dict[str, torch.Tensor] = {}
    for p in partners(entry):
        if not entry.kind:
            for k, t in written.items():
                if k.startswith(f"{prefix}{path}.") and "base_layer." not in k[len(prefix) + len(path):]:
                    out[f"{prefix}{p}{k[len(prefix) + len(path):]}"] = t.clone()
            continue
        a, b = (written.get(f"{prefix}{path}.{s}") for s in _EMB)
        if a is None or b is None:
            continue
        out[f"{prefix}{p}.lora_A.weight"] = b.T.contiguous()
        out[f"{prefix}{p}.lora_B.weight"] = a.T.contiguous()
        base = written.get(f"{prefix}{path}.base_layer.weight")
        if base is not None:
            out[f"{prefix}{p}.base_layer.weight"] = base.clone()
    return out


def defer(config: Any) -> bool:
    """Whether a file key that matches no target may be a tied module's copy (``ensure_weight_tying=True``)."""
    return getattr(config, "ensure_weight_tying", False) is True


def fold(config: Any, deltas: dict[str, dict[str, torch.Tensor]], repl: dict[str, dict[str, torch.Tensor]],
         pending: Mapping[str, torch.Tensor], source: str) -> dict[str, tuple[str, ...]]:
    """Find the tied modules' keys in a PEFT file (``ensure_weight_tying=True``): a linear LoRA pair equal to an
    embedding LoRA's, transposed; a ``<module>.weight`` equal to a ``modules_to_save`` copy. They are removed
    from ``deltas`` / ``repl`` (in place).

    Arguments:
        config: the file's config. deltas / repl: path -> {suffix or name: tensor}, as the loader grouped them.
            pending: keys (without prefix) that matched nothing. source: the file, for messages.

    Returns:
        embedding path -> its tied modules. Raises AdapterFileError for a pending key that is no such copy.
    """
    found: dict[str, list[str]] = {}
    if defer(config):
        embs = {p: f for p, f in deltas.items() if set(f) == set(_EMB)}
        for p, f in list(deltas.items()):
            if set(f) != set(_LINEAR):
                continue
            for q, g in embs.items():
                if (f[_LINEAR[0]].shape == g[_EMB[1]].T.shape and f[_LINEAR[1]].shape == g[_EMB[0]].T.shape
                        and torch.equal(f[_LINEAR[0]], g[_EMB[1]].T) and torch.equal(f[_LINEAR[1]], g[_EMB[0]].T)):
                    _check_scaling(config, q, (p,), source)
                    found.setdefault(q, []).append(p)
                    del deltas[p]
                    base = repl.get(p)
                    if base is not None and set(base) == {"weight"} and torch.equal(
                            base["weight"], repl.get(q, {}).get("weight", torch.empty(0))):
                        del repl[p]
                    break
    for rest, t in pending.items():
        mod, _, name = rest.rpartition(".")
        q = next((q for q, g in repl.items() if name in g and g[name].shape == t.shape and torch.equal(g[name], t)),
                 None) if defer(config) and name == "weight" else None
        if q is None:
            raise AdapterFileError(
                f"{source}: key {rest!r} matches no target of the config: not a LoRA key, not under modules_to_save="
                f"{getattr(config, 'modules_to_save', None)!r}, not a bias with bias={getattr(config, 'bias', None)!r}"
                + (", and not a copy of a tied embedding's weight (ensure_weight_tying)" if defer(config) else ""))
        found.setdefault(q, []).append(mod)
    for q in found:
        if q in deltas:
            _check_named(q, AdapterFileError, source)
    return {q: tuple(sorted(v)) for q, v in found.items()}


def mark(entries: dict[str, Entry], found: Mapping[str, tuple[str, ...]]) -> None:
    """Add the ``tied_modules`` option to the loaded entries (``found`` from :func:`fold`), in place; a saved copy
    replaces every alias of the weight."""
    for q, tied in found.items():
        e = entries[q]
        opts = tuple(o for o in e.options if o[0] != OPTION) + ((OPTION, tied),)
        extra = {"weight"} if not e.kind else set()
        entries[q] = dataclasses.replace(e, tied=tuple(set(e.tied) | extra), options=opts)
