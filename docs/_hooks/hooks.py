"""mkdocs hooks (mkdocs.yml ``hooks:``): the Performance page is rendered at build time from a benchmark run.

``bench/latest.json`` is what ``python -m bench --json bench/latest.json`` writes; ``bench/report.py`` turns
it into the tables that replace the ``<!-- bench-results -->`` marker of ``docs/performance.md`` and into
the SVG charts served under ``performance/``. Nothing on that page is typed by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "latest.json"
MARKER = "<!-- bench-results -->"
PAGE = "performance.md"
CHART_DIR = "performance/"

_cache: dict[str, Any] = {}


def _report() -> Any:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import report

    return report


def _data() -> dict[str, Any]:
    key = f"{RESULTS}:{RESULTS.stat().st_mtime_ns if RESULTS.exists() else 0}"
    if _cache.get("key") != key:
        if not RESULTS.exists():
            raise PluginError(f"{RESULTS.relative_to(ROOT)} is missing: run `python -m bench --json "
                              f"{RESULTS.relative_to(ROOT)}` (the Performance page is built from it)")
        try:
            _cache["data"] = _report().load(str(RESULTS))
        except ValueError as e:
            raise PluginError(str(e)) from None
        _cache["key"] = key
    return _cache["data"]


def on_config(config: Any) -> Any:
    config.watch.append(str(RESULTS))  # `mkdocs serve` rebuilds when a new run lands
    return config


def on_files(files: Any, config: Any) -> Any:
    for name, content in _report().charts(_data()).items():
        files.append(File.generated(config, CHART_DIR + name, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/{PAGE} lost its {MARKER} marker")
    return markdown.replace(MARKER, _report().markdown(_data(), chart_dir=CHART_DIR))
