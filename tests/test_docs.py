"""Every code block of the documentation site runs (sybil), page by page, top to bottom in one namespace.

* ```` ```python ```` blocks run as Python (``>>>`` blocks as doctests); ``<!-- invisible-code-block: python``
  comments are a page's hidden set-up (what it needs from earlier pages);
* ```` ```console ```` blocks run each ``$ adaptfn ...`` line through the command line (``adaptfn.cli.main``)
  and expect exit status 0 and every other non-empty line of the block somewhere in the output;
* any other fence fails ``test_every_fence_runs`` unless a ``<!-- not-run: reason -->`` comment stands right
  before it (none does today).

Pages run in a temp folder against tests/docs_world.py: a loopback Hub that serves tiny stand-ins under the
repo ids the docs name (``facebook/opt-350m``, ``ybelkada/opt-350m-lora``, ...) and takes uploads to
``me/...``. Nothing is downloaded. docs/design.md is the contract (signature sketches, second-wave APIs
included) and is not run; the API reference pages' examples are the docstrings', run by
tests/test_docstrings.py.
"""

from __future__ import annotations

import doctest
import io
import re
import shlex
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from sybil import Document
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOT_RUN = {"design.md": "the design contract: signature sketches, second-wave APIs included"}
PAGES = sorted(p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).as_posix() not in NOT_RUN
               and "_hooks" not in p.parts)
RUN_LANGUAGES = ("python", "console")
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<lang>[^\s`]*)[^\n]*\n", re.MULTILINE)
_NOT_RUN_MARK = re.compile(r"<!--\s*not-run:\s*(?P<why>\S[^>]*?)\s*-->\s*\n$")


def _console(example) -> None:
    """Run a console block: ``$ adaptfn ...`` lines through adaptfn.cli.main; other lines are expected output."""
    from adaptfn.cli import main

    text = example.parsed
    commands: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif line.strip() and line.strip() != "...":
            if not commands:
                raise AssertionError(f"console block: output before any command: {line!r}")
            commands[-1][1].append(line.strip())
    if not commands:
        raise AssertionError("console block without a `$ adaptfn ...` command")
    for command, expected in commands:
        argv = shlex.split(command)
        if argv[0] != "adaptfn":
            raise AssertionError(f"console block: only `adaptfn` commands run here, got {command!r}")
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(argv[1:])
        both = out.getvalue() + err.getvalue()
        assert rc == 0, f"`{command}` exited {rc}:\n{both}"
        flat = " ".join(both.split())
        for want in expected:
            assert " ".join(want.split()) in flat, f"`{command}`: expected {want!r} in its output:\n{both}"


PARSERS = [PythonCodeBlockParser(doctest_optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE),
           CodeBlockParser(language="console", evaluator=_console), SkipParser()]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    from docs_world import build

    return build(tmp_path_factory.mktemp("docs-repos"))


CODE_PAGES = [p for p in PAGES if any(True for _ in Document.parse(str(p), *PARSERS).examples())]


@pytest.mark.parametrize("page", CODE_PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_code_runs(page: Path, repos, tmp_path, monkeypatch) -> None:
    from docs_world import World

    doc = Document.parse(str(page), *PARSERS)
    examples = list(doc.examples())
    world = World(tmp_path, repos)
    world.enter(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    doc.namespace["__name__"] = "__docs__"
    threads = torch.get_num_threads()
    try:
        for example in examples:
            try:
                example.evaluate()
            except Exception as e:  # report the page and line, keep the cause
                raise AssertionError(f"{page.relative_to(ROOT)}:{example.line}: {type(e).__name__}: {e}") from e
    finally:
        torch.set_num_threads(threads)
        world.exit()


def _fences(text: str) -> list[tuple[int, str, str]]:
    """(line, language, text before the fence) of every fenced block's opening line."""
    out, pos = [], 0
    while True:
        m = _FENCE.search(text, pos)
        if m is None:
            return out
        close = re.compile(rf"^ {{0,3}}{re.escape(m['fence'][0])}{{{len(m['fence'])},}}\s*$", re.MULTILINE)
        end = close.search(text, m.end())
        out.append((text.count("\n", 0, m.start()) + 1, m["lang"], text[:m.start()]))
        pos = end.end() if end else len(text)


def test_only_the_contract_page_is_not_run() -> None:
    """Every page's code runs except the listed ones, each with its reason; pages without code have none."""
    all_pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "_hooks" not in p.parts}
    assert set(NOT_RUN) <= all_pages and all(NOT_RUN.values())
    assert {p.relative_to(DOCS).as_posix() for p in PAGES} == all_pages - set(NOT_RUN)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_every_fence_runs(page: Path) -> None:
    """Each fence of a run page is python or console (run above), or carries a not-run reason."""
    rel = page.relative_to(DOCS).as_posix()
    text = page.read_text(encoding="utf-8")
    bad = [(line, lang) for line, lang, before in _fences(text)
           if lang not in RUN_LANGUAGES and not _NOT_RUN_MARK.search(before)]
    assert not bad, f"{rel}: fences that would not run (language, or a <!-- not-run: why --> before it): {bad}"
    runnable = [line for line, lang, _ in _fences(text) if lang in RUN_LANGUAGES]
    lines = text.splitlines()
    parsed = [e.line for e in Document.parse(str(page), *PARSERS).examples()
              if lines[e.line - 1].lstrip().startswith(("```", "~~~"))]  # (not the invisible set-up blocks)
    assert parsed == runnable, f"{rel}: fences {runnable}, run by sybil {parsed}"


def test_the_fence_scanner() -> None:
    text = "a\n```python\nx = 1\n```\n\n<!-- not-run: shows a shell -->\n```bash\nls\n```\n````text\n```\n````\n"
    found = _fences(text)
    assert [(line, lang) for line, lang, _ in found] == [(2, "python"), (7, "bash"), (10, "text")]
    assert _NOT_RUN_MARK.search(found[1][2]) and not _NOT_RUN_MARK.search(found[2][2])


def test_coming_from_peft_names_only_what_exists() -> None:
    """Every ``af.<name>`` and ``m.<method>`` (m: an AdapterModel) in the PEFT mapping tables exists, so the page
    documents no API adaptfn does not have."""
    import adaptfn as af

    text = (DOCS / "from-peft.md").read_text(encoding="utf-8")
    spans = re.findall(r"`([^`]+)`", "\n".join(line for line in text.splitlines() if line.startswith("|")))
    functional = {m for s in spans for m in re.findall(r"\baf\.([A-Za-z_][\w.]*)", s)}
    shell = {m for s in spans for m in re.findall(r"\bm\.([A-Za-z_]\w*)", s)}
    assert len(functional) >= 12 and len(shell) >= 25
    for dotted in sorted(functional):
        obj = af
        for part in dotted.split("."):
            assert hasattr(obj, part), f"af.{dotted} does not exist"
            obj = getattr(obj, part)
    for name in sorted(shell):
        assert hasattr(af.AdapterModel, name), f"AdapterModel.{name} does not exist"
