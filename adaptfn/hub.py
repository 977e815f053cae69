"""Publishing adapters on the Hugging Face Hub: :func:`push_to_hub` and the model card (:func:`model_card`).

An adapter is saved in PEFT's layout (:func:`adaptfn.save`) into a temporary folder, a ``README.md``
model card is added when the folder has none, and the folder is uploaded with huggingface_hub
(``create_repo``, ``create_branch`` for a ``revision``, ``upload_folder``). Tokens, ``HF_ENDPOINT``
and offline mode work as for any huggingface_hub call; every failure is an :class:`adaptfn.AdaptfnError`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

from . import _files
from ._card import adapters_of, ours, with_marker
from ._card import model_card as model_card
from .adapter import Adapter
from .errors import AdapterFileError, AdaptfnError, ConfigError
from .io import save

__all__ = ["push_to_hub", "model_card", "upload_adapter_folder", "check_push_args"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

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
    ``README.md`` or only the one :func:`adaptfn.save` wrote (a card the user wrote or edited is uploaded as
    it is); the repo is created if missing (``private`` applies only then), and the branch
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
    # no card, or adaptfn's own unedited one: (re)written with this repo's loading examples, atomically
    _files.write_card(folder, with_marker(model_card(card_for, repo_id=repo_id, root=root)), ours)
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
    items = adapters_of(adapter, where)
    with tempfile.TemporaryDirectory(prefix="adaptfn-push-") as tmp:
        try:
            save(adapter if isinstance(adapter, Mapping) else items["default"], tmp)
        except AdaptfnError as e:
            raise type(e)(f"{where}: {e}") from None
        return upload_adapter_folder(tmp, repo_id, items, private=private, revision=revision,
                                     commit_message=commit_message, token=token, where=where)
