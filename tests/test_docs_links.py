"""The documentation links only to files of this repository (or to the web): every relative link in README.md,
docs/*.md and bench/README.md resolves to a file or folder inside the checkout, so a user of a clone or of a
release has each page it points to (the design contract is docs/design.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted({ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "bench").glob("*.md")})

# [text](target "title") and ![alt](target); the target has no spaces (markdown needs <...> for those)
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
# reference definitions: [id]: target
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.MULTILINE)
# any ../ path, links or not (code spans and prose included)
_PARENT = re.compile(r"(?<![\w./-])((?:\.\./)+[\w.\-/]*)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _relative_targets(text: str) -> list[str]:
    found = [m.group(1) for m in _INLINE.finditer(text)] + [m.group(1) for m in _REFERENCE.finditer(text)]
    found += [m.group(1) for m in _PARENT.finditer(text)]
    out = []
    for target in found:
        if _SCHEME.match(target) or target.startswith(("#", "//")):
            continue  # the web (allowed), or an anchor of this page
        out.append(target)
    return out


def _problem(page: Path, target: str) -> str | None:
    path = target.split("#", 1)[0].split("?", 1)[0]
    if not path:
        return None
    if path.startswith("/"):
        return "absolute path"
    resolved = (page.parent / path).resolve()
    if not resolved.is_relative_to(ROOT):
        return "outside the repository"
    if not resolved.exists():
        return "no such file"
    return None


def test_pages_are_found():
    assert ROOT / "README.md" in PAGES and ROOT / "docs" / "index.md" in PAGES and ROOT / "docs" / "design.md" in PAGES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_stay_in_the_repository(page: Path):
    text = page.read_text(encoding="utf-8")
    bad = {t: why for t in _relative_targets(text) if (why := _problem(page, t)) is not None}
    assert not bad, f"{page.relative_to(ROOT)}: {bad}"


def test_the_link_scanner_sees_each_kind_of_link():
    text = ("see [the contract](design.md#2-invariants) and ![chart](bench.png \"title\"), the web "
            "(https://example.org/x.md), `../shared/DESIGN.md` in a code span, and\n[ref]: ../outside.md\n")
    targets = _relative_targets(text)
    assert targets == ["design.md#2-invariants", "bench.png", "../outside.md", "../shared/DESIGN.md",
                       "../outside.md"]
    page = ROOT / "docs" / "index.md"
    assert _problem(page, "design.md#2-invariants") is None
    assert _problem(page, "bench.png") is None
    assert _problem(page, "../README.md") is None  # ../ that stays inside the checkout is fine
    assert _problem(page, "missing.md") == "no such file"
    assert _problem(page, "../shared/DESIGN.md") is not None  # the old link (<repo>/shared/ is no page of it)
    assert _problem(ROOT / "README.md", "../shared/DESIGN.md") == "outside the repository"
    assert _problem(page, "/etc/passwd") == "absolute path"
