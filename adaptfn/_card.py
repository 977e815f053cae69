"""The ``README.md`` model card :func:`adaptfn.save` writes beside an adapter (and :func:`adaptfn.push_to_hub`
uploads): huggingface_hub's ``ModelCard`` with YAML metadata and a summary of the adapter.

A card adaptfn wrote ends with a marker holding the SHA-256 of the text above it. ``af.save`` replaces a card
only while that marker matches (the card is adaptfn's and unedited); a card the user wrote or edited is never
touched.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from .adapter import GATE, SCALING, Adapter
from .errors import ConfigError
from .methods.common import TASK_AUTO_CLASS

__all__ = ["CARD_NAME", "model_card", "with_marker", "ours", "adapters_of"]

CARD_NAME = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_MARKER = re.compile(rb"\n<!-- adaptfn card sha256=([0-9a-f]{64}): af\.save replaces this card while it is unedited "
                     rb"-->\n\Z")


def with_marker(text: str) -> bytes:
    """The card's bytes with the marker that lets a later save recognise it as its own, unedited."""
    body = text.rstrip("\n").encode("utf-8") + b"\n"
    h = hashlib.sha256(body).hexdigest()
    return body + f"\n<!-- adaptfn card sha256={h}: af.save replaces this card while it is unedited -->\n".encode()


def ours(data: bytes) -> bool:
    """Whether ``data`` (a ``README.md``) is a card adaptfn wrote and nobody edited since."""
    m = _MARKER.search(data)
    return m is not None and hashlib.sha256(data[:m.start()]).hexdigest() == m.group(1).decode()


# PEFT's task_type -> the Hub's pipeline tag
_PIPELINE = {
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_AUTO = TASK_AUTO_CLASS
_METHOD_NAMES = {"lora": "LoRA", "ia3": "IA3", "adalora": "AdaLoRA", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT",
                 "vera": "VeRA"}


def adapters_of(adapter: Any, where: str) -> dict[str, Adapter]:
    """name -> Adapter for an Adapter (named "default") or a mapping of them, checked."""
    items = dict(adapter) if isinstance(adapter, Mapping) else {"default": adapter}
    if not items:
        raise ConfigError(f"{where}: no adapters given")
    for name, a in items.items():
        if not isinstance(a, Adapter):
            raise ConfigError(f"{where}: expected an af.Adapter (or a mapping name -> Adapter), got "
                              f"{type(a).__name__}" + (f" for {name!r}" if isinstance(adapter, Mapping) else ""))
        if a.is_stacked:
            raise ConfigError(f"{where}: the adapter is stacked; use af.unstack first")
    return items


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(_REPO_ID.match(name)) and not os.path.exists(name)  # type: ignore[arg-type]


def _targets(a: Adapter) -> str:
    counts: dict[str, int] = {}
    for p, e in a.entry_items:
        if e.kind:
            last = p.rsplit(".", 1)[-1]
            counts[last] = counts.get(last, 0) + 1
    return ", ".join(f"`{k}` ×{v}" if v > 1 else f"`{k}`" for k, v in sorted(counts.items())) or "-"


def _summary_rows(a: Adapter) -> list[tuple[str, str]]:
    cfg = a.config
    d = cfg.to_dict()
    rows = [("method", f"{_METHOD_NAMES.get(a.method, a.method)} (`peft_type: {d.get('peft_type')}`)"),
            ("base model", f"`{cfg.base_model_name_or_path}`" if cfg.base_model_name_or_path else "not recorded"),
            ("task type", f"`{cfg.task_type}`" if cfg.task_type else "-"),
            ("adapted modules", f"{sum(1 for _, e in a.entry_items if e.kind)}: {_targets(a)}")]
    ranks = sorted({e.r for _, e in a.entry_items if e.kind})
    if ranks:
        rows.append(("rank", str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]} (per module)"))
    for key in ("lora_alpha", "lora_dropout", "use_rslora", "bias", "init_r", "target_r", "feedforward_modules",
                "fan_in_fan_out", "modules_to_save", "layers_to_transform"):
        if key in d and d[key] not in (None, [], {}):
            rows.append((key, f"`{d[key]}`"))
    dtypes = sorted({str(t.dtype).replace("torch.", "") for leaves in a.tensors.values()
                     for n, t in leaves.items() if n not in (GATE, SCALING)})
    rows.append(("trainable parameters", f"{a.num_parameters():,} ({'/'.join(dtypes) or '-'})"))
    return rows


def model_card(adapter: Adapter | Mapping[str, Adapter], *, repo_id: str | None = None,
               root: str | None = None) -> str:
    """A ``README.md`` model card for an adapter (huggingface_hub's ``ModelCard``): YAML metadata (base
    model, ``library_name``, tags, pipeline tag) and a summary of the method and config, with how to load
    it with adaptfn and with PEFT.

    ``library_name`` is ``peft``: the files are PEFT's, so the Hub shows PEFT's loading snippet and lists
    the repo among the base model's adapters; the ``adaptfn`` tag names the library that wrote them.

    Arguments:
        adapter: an :class:`adaptfn.Adapter`, or a mapping name -> adapter as :func:`adaptfn.save` takes
            (``"default"`` at the root, the others in sub-folders).
        repo_id: the Hub repo the card is for (used in the loading examples); default: a placeholder.
        root: for a mapping, the name of the adapter at the folder's root (default: ``"default"`` when
            present; otherwise no adapter is at the root, as :func:`adaptfn.save` lays such a mapping out,
            and the loading examples name the first adapter's sub-folder).

    Returns:
        The card's text (Markdown with a YAML header).

    Example:
        >>> card = af.hub.model_card(adapter, repo_id="user/opt-lora")
        >>> card.splitlines()[0], "library_name: peft" in card, 'af.load("user/opt-lora")' in card
        ('---', True, True)
    """
    from huggingface_hub import ModelCard, ModelCardData

    where = "model_card"
    items = adapters_of(adapter, where)
    if repo_id is not None and not isinstance(repo_id, str):
        raise ConfigError(f"{where}: repo_id must be a str or None, got {type(repo_id).__name__}")
    if root is not None and root not in items:
        raise ConfigError(f"{where}: root={root!r} is not one of the adapters {list(items)}")
    root_name = root if root is not None else ("default" if "default" in items else None)
    first = root_name if root_name is not None else next(iter(items))
    root = items[first]
    cfg = root.config
    base = cfg.base_model_name_or_path
    methods = sorted({a.method for a in items.values()})
    tags = ["adaptfn", "peft", *methods]
    if _is_hub_id(base):
        tags.append(f"base_model:adapter:{base}")
    data = ModelCardData(library_name="peft", base_model=base if _is_hub_id(base) else None, tags=tags,
                         pipeline_tag=_PIPELINE.get(cfg.task_type or ""))
    where_from = repo_id or "path/to/this-adapter"
    title = f"{_METHOD_NAMES.get(root.method, root.method)} adapter" + (f" for {base}" if base else "")
    lines = [f"# {title}", "",
             "An adapter in PEFT's file format (`adapter_config.json` + `adapter_model.safetensors`), written by "
             "[adaptfn](https://pypi.org/project/adaptfn/), a functional adapter library for PyTorch. "
             "It loads with adaptfn and with 🤗 PEFT.", ""]
    for name, a in items.items():
        if len(items) > 1:
            lines += [f"## Adapter `{name}`" + (" (root folder)" if name == root_name else f" (sub-folder `{name}/`)"),
                      ""]
        else:
            lines += ["## Adapter", ""]
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _summary_rows(a)] + [""]
    auto = _AUTO.get(cfg.task_type or "", "AutoModelForCausalLM")
    base_ref = base or "<base model>"
    # no adapter at the root: the examples load the first one from its sub-folder
    af_arg, peft_arg = ("", "") if root_name is not None else (f', adapter_name="{first}"', f', subfolder="{first}"')
    lines += ["## How to load", "", "With adaptfn (functional):", "", "```python", "import adaptfn as af",
              f"from transformers import {auto}", "",
              f'model = {auto}.from_pretrained("{base_ref}")',
              "fn, params = af.functional(model)",
              f'adapter = af.load("{where_from}"{af_arg})',
              "out = af.inject(fn, adapter)(params, **inputs)", "```", ""]
    if root_name is not None:
        lines += ["or as a stateful model (`base_model_name_or_path` from the config):", "",
                  "```python", f'model = af.from_pretrained("{where_from}")', "```", ""]
    lines += ["With PEFT:", "", "```python", "from peft import PeftModel", f"from transformers import {auto}", "",
              f'base = {auto}.from_pretrained("{base_ref}")',
              f'model = PeftModel.from_pretrained(base, "{where_from}"{peft_arg})', "```", ""]
    if len(items) > 1:
        others = [n for n in items if n != first]
        lines += ["The other adapters load with `adapter_name=` (adaptfn) / `subfolder=` (PEFT): "
                  + ", ".join(f"`{n}`" for n in others) + ".", ""]
    lines += ["## Framework versions", "", *_versions(), ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def _versions() -> list[str]:
    from importlib import metadata

    out = []
    for dist in ("adaptfn", "torch", "safetensors", "huggingface_hub"):
        try:
            out.append(f"- {dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            if dist == "adaptfn":  # (a source checkout that is not installed)
                out.append(f"- adaptfn {sys.modules[__package__].__version__}")
    return out
