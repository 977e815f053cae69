"""Publishing adapters on the Hugging Face Hub: :func:`push_to_hub` and the model card (:func:`model_card`).

An adapter is saved in PEFT's layout (:func:`adaptfn.save`) into a temporary folder, a ``README.md``
model card is added when the folder has none, and the folder is uploaded with huggingface_hub
(``create_repo``, ``create_branch`` for a ``revision``, ``upload_folder``). Tokens, ``HF_ENDPOINT``
and offline mode work as for any huggingface_hub call; every failure is an :class:`adaptfn.AdaptfnError`.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from .adapter import GATE, SCALING, Adapter
from .errors import AdapterFileError, AdaptfnError, ConfigError
from .io import save

__all__ = ["push_to_hub", "model_card", "upload_adapter_folder", "check_push_args"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
CARD_NAME = "README.md"

# PEFT's task_type -> the Hub's pipeline tag
_PIPELINE = {
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
# PEFT's task_type -> the transformers Auto class that loads its base model
_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_METHOD_NAMES = {"lora": "LoRA", "ia3": "IA3", "adalora": "AdaLoRA"}


# -- the model card ------------------------------------------------------------------------------------
def _adapters_of(adapter: Any, where: str) -> dict[str, Adapter]:
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
            present, else the first).

    Returns:
        The card's text (Markdown with a YAML header).

    Example:
        >>> card = af.hub.model_card(adapter, repo_id="user/opt-lora")
        >>> card.splitlines()[0], "library_name: peft" in card, 'af.load("user/opt-lora")' in card
        ('---', True, True)
    """
    from huggingface_hub import ModelCard, ModelCardData

    where = "model_card"
    items = _adapters_of(adapter, where)
    if repo_id is not None and not isinstance(repo_id, str):
        raise ConfigError(f"{where}: repo_id must be a str or None, got {type(repo_id).__name__}")
    if root is not None and root not in items:
        raise ConfigError(f"{where}: root={root!r} is not one of the adapters {list(items)}")
    root_name = root if root is not None else ("default" if "default" in items else next(iter(items)))
    root = items[root_name]
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
    lines += ["## How to load", "", "With adaptfn (functional):", "", "```python", "import adaptfn as af",
              f"from transformers import {auto}", "",
              f'model = {auto}.from_pretrained("{base_ref}")',
              "fn, params = af.functional(model)",
              f'adapter = af.load("{where_from}")',
              "out = af.inject(fn, adapter)(params, **inputs)", "```", "",
              "or as a stateful model (`base_model_name_or_path` from the config):", "",
              "```python", f'model = af.from_pretrained("{where_from}")', "```", "",
              "With PEFT:", "", "```python", "from peft import PeftModel", f"from transformers import {auto}", "",
              f'base = {auto}.from_pretrained("{base_ref}")',
              f'model = PeftModel.from_pretrained(base, "{where_from}")', "```", ""]
    if len(items) > 1:
        others = [n for n in items if n != root_name]
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


# -- uploading -----------------------------------------------------------------------------------------
def check_push_args(where: str, repo_id: Any, private: Any, revision: Any, commit_message: Any, token: Any) -> None:
    """Check :func:`push_to_hub`'s arguments (a :class:`adaptfn.ConfigError` starting with ``where``)."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ConfigError(f"{where}: repo_id must be 'namespace/name' (letters, digits, '-', '_', '.'), got "
                          f"{repo_id!r}")
    if not isinstance(private, bool):
        raise ConfigError(f"{where}: private must be True or False, got {private!r}")
    for name, v in (("revision", revision), ("commit_message", commit_message)):
        if v is not None and (not isinstance(v, str) or not v):
            raise ConfigError(f"{where}: {name} must be a non-empty str or None, got {v!r}")
    if token is not None and not isinstance(token, (str, bool)):
        raise ConfigError(f"{where}: token must be a str, a bool or None, got {type(token).__name__}")


def _hub_error(where: str, repo_id: str, revision: str | None, e: BaseException) -> AdaptfnError:
    """A typed error for a failed Hub call, saying what to do."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    at = f"{repo_id}" + (f" (revision {revision!r})" if revision else "")
    if isinstance(e, HFValidationError):
        return ConfigError(f"{where}: {at}: {e}")
    if isinstance(e, OfflineModeIsEnabled):
        return AdapterFileError(f"{where}: {at}: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); nothing "
                                "was uploaded")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        if status == 401:
            return AdapterFileError(f"{where}: {at}: not authenticated (HTTP 401): pass token=, set HF_TOKEN or log "
                                    "in with `hf auth login`; nothing was uploaded")
        if status == 403:
            return AdapterFileError(f"{where}: {at}: the token may not write to this repo (HTTP 403); nothing was "
                                    "uploaded")
        if status == 404:
            return AdapterFileError(f"{where}: {at}: repository or revision not found (HTTP 404)")
        return AdapterFileError(f"{where}: {at}: the Hub answered HTTP {status}: {e}")
    return AdapterFileError(f"{where}: {at}: could not reach the Hub ({type(e).__name__}: {e})")


def upload_adapter_folder(folder: str | os.PathLike[str], repo_id: str, card_for: Adapter | Mapping[str, Adapter], *,
                          root: str | None = None, private: bool = False, revision: str | None = None,
                          commit_message: str | None = None, token: str | bool | None = None,
                          where: str = "push_to_hub") -> Any:
    """Upload a saved adapter folder: the model card is written there first when the folder has no
    ``README.md``; the repo is created if missing (``private`` applies only then), and the branch
    ``revision`` too (from the default branch).

    Arguments:
        folder: a folder written by :func:`adaptfn.save` or ``AdapterModel.save_pretrained``.
        repo_id, private, revision, commit_message, token: as :func:`push_to_hub`.
        card_for, root: the adapter(s) the card describes, and the one at the root (see :func:`model_card`).
        where: the name errors start with.

    Returns:
        huggingface_hub's ``CommitInfo`` of the upload (``.oid``, ``.commit_url``).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    folder = os.fspath(folder)
    card = os.path.join(folder, CARD_NAME)
    if not os.path.exists(card):
        with open(card, "w", encoding="utf-8") as f:
            f.write(model_card(card_for, repo_id=repo_id, root=root))
    api = HfApi()
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, token=token,
                                 commit_message=commit_message or "Upload adapter with adaptfn")
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as e:
        # (ValueError: huggingface_hub's check of the card's YAML and other refusals before any upload)
        raise _hub_error(where, repo_id, revision, e) from None


def push_to_hub(adapter: Adapter | Mapping[str, Adapter], repo_id: str, private: bool = False,
                revision: str | None = None, commit_message: str | None = None,
                token: str | bool | None = None) -> Any:
    """Upload an adapter to the Hugging Face Hub in PEFT's layout, with a model card.

    The adapter is saved with :func:`adaptfn.save` into a temporary folder (so everything is checked
    before anything is sent); a ``README.md`` card from :func:`model_card` is added when the saved folder
    has none; then the repo is created if needed and the folder uploaded in one commit.
    ``af.load(repo_id, revision=revision)`` and ``PeftModel.from_pretrained(base, repo_id, revision=...)``
    read it back.

    Arguments:
        adapter: an :class:`adaptfn.Adapter`, or a mapping name -> adapter (``"default"`` at the root,
            the others in sub-folders, as :func:`adaptfn.save`).
        repo_id: ``"namespace/name"``.
        private: make the repo private when it is created (an existing repo keeps its visibility).
        revision: the branch to commit to (created from the default branch if missing); default: main.
        commit_message: default ``"Upload adapter with adaptfn"``.
        token: as in huggingface_hub (a str, True for the stored token, None for the default lookup).

    Returns:
        huggingface_hub's ``CommitInfo`` (``.oid`` is the new commit, ``.commit_url`` its page).

    Raises:
        ConfigError: bad arguments or an adapter that cannot be saved (stacked, an ``AdapterSum``).
        AdapterFileError: the Hub refused (not authenticated, no write access) or could not be reached.

    Example:
        >>> info = af.push_to_hub(adapter, "user/opt-lora", token=token)
        >>> info.commit_url
        'http://.../user/opt-lora/commit/...'
        >>> _ = af.push_to_hub(adapter, "user/opt-lora", revision="v2", commit_message="rank 2", token=token)
        >>> af.load("user/opt-lora", revision="v2").paths == adapter.paths
        True
    """
    where = "push_to_hub"
    check_push_args(where, repo_id, private, revision, commit_message, token)
    items = _adapters_of(adapter, where)
    with tempfile.TemporaryDirectory(prefix="adaptfn-push-") as tmp:
        try:
            save(adapter if isinstance(adapter, Mapping) else items["default"], tmp)
        except AdaptfnError as e:
            raise type(e)(f"{where}: {e}") from None
        return upload_adapter_folder(tmp, repo_id, items, private=private, revision=revision,
                                     commit_message=commit_message, token=token, where=where)
