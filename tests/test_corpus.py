"""The corpus of bad adapter folders (tests/corpus/make_corpus.py): ``af.load`` raises the expected typed
error, with the expected words, on every case; so does ``af.from_state_dict`` on the same config and tensors
held in memory, where it applies. Nothing else (no raw ``ValueError`` / ``RecursionError`` / ``RuntimeError``)
and no silent success."""

from __future__ import annotations

import json
import os
import re

import pytest
from corpus.make_corpus import build, decode_kwargs
from safetensors.torch import load_file

import adaptfn as af


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus"))
    return out, build(out)


def _outcome(call):
    try:
        got = call()
    except af.AdaptfnError as e:
        return type(e).__name__, str(e)
    except BaseException as e:  # noqa: BLE001 - anything else is what this test exists to catch
        return f"untyped {type(e).__name__}", str(e)
    return "no error", repr(got)


def test_corpus_is_large_and_covers_every_class(corpus):
    _, cases = corpus
    assert len(cases) >= 100, len(cases)
    assert {c["error"] for c in cases} == {"ConfigError", "AdapterFileError", "IncompatibleAdapterError"}
    assert sum(c["state_dict"] for c in cases) >= 50


def test_load_raises_the_expected_typed_error_on_every_case(corpus):
    out, cases = corpus
    wrong = []
    for c in cases:
        path = os.path.join(out, c["path"])
        cls, msg = _outcome(lambda: af.load(path, **decode_kwargs(c["kwargs"])))  # noqa: B023
        if cls != c["error"] or not re.search(c["fragment"], msg, re.S):
            wrong.append(f"{c['name']}: expected {c['error']} /{c['fragment']}/, got {cls}: {msg[:300]}")
    assert not wrong, f"{len(wrong)} of {len(cases)} cases:\n" + "\n".join(wrong)


def test_from_state_dict_raises_config_error_on_every_applicable_case(corpus):
    out, cases = corpus
    wrong, n = [], 0
    for c in cases:
        if not c["state_dict"]:
            continue
        n += 1
        folder = os.path.join(out, c["path"])
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        sd = load_file(os.path.join(folder, "adapter_model.safetensors"))
        cls, msg = _outcome(lambda: af.from_state_dict(sd, config))  # noqa: B023
        if cls != "ConfigError" or not re.search(c["sd_fragment"], msg, re.S):
            wrong.append(f"{c['name']}: expected ConfigError /{c['sd_fragment']}/, got {cls}: {msg[:300]}")
    assert n >= 50
    assert not wrong, f"{len(wrong)} of {n} cases:\n" + "\n".join(wrong)
