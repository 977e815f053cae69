"""The documentation site: ``mkdocs build --strict`` passes (no broken link, anchor or cross-reference, no
missing page), and the built site works in a real browser: Debian's Chromium, headless, driven by
playwright over its own protocol (no browser download), serving the site from 127.0.0.1.

Every page renders with its navigation, search box and title; images load; code is highlighted; the
browser console shows no error and no request fails; nothing is fetched from another host; search finds
a page. Screenshots of the home page and of one API page are checked (size, and not blank). The
Performance page holds the numbers of ``bench/latest.json`` and its charts.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from html import escape
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    found = os.environ.get("ADAPTFN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("Debian's chromium is not installed: run ./scripts/env.sh (it runs `apt-get install -y "
                    "chromium`), or point ADAPTFN_CHROMIUM at a Chromium binary")
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built by ``python -m mkdocs build --strict`` (a subprocess, as a user runs it)."""
    out = tmp_path_factory.mktemp("site") / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=os.pathsep.join([str(ROOT),
                                                                                 os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-d", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    print(f"mkdocs build --strict: {seconds:.1f} s")
    return {"dir": out, "rc": proc.returncode, "log": proc.stdout + proc.stderr, "seconds": seconds}


def nav_pages() -> list[str]:
    """The pages of mkdocs.yml's nav, as site paths (``guide/``, ``api/core/``, ...)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    cfg = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)
    found: list[str] = []

    def walk(items):
        for item in items:
            for value in item.values() if isinstance(item, dict) else [item]:
                if isinstance(value, list):
                    walk(value)
                elif isinstance(value, str) and value.endswith(".md"):
                    found.append("" if value == "index.md" else value[:-3] + "/")

    walk(cfg["nav"])
    return found


def test_mkdocs_build_strict(site):
    assert site["rc"] == 0, site["log"][-4000:]
    assert "WARNING" not in site["log"], site["log"][-4000:]
    for page in nav_pages():
        assert (site["dir"] / page / "index.html").is_file(), page
    assert (site["dir"] / "search" / "search_index.json").is_file()
    assert (site["dir"] / "img" / "call.svg").is_file()


def test_performance_page_is_the_latest_run(site):
    """Generated from bench/latest.json at build time: every scenario and ratio of the run is on the page,
    with the run's values, and the charts are there."""
    data = json.loads((ROOT / "bench" / "latest.json").read_text())
    html = (site["dir"] / "performance" / "index.html").read_text()
    assert "bench-results" not in html  # the marker was replaced
    for r in data["results"]:
        assert escape(r["scenario"], quote=False) in html
        for name, value in r["ratios"].items():
            assert f"<td>{escape(name, quote=False)}</td>\n<td>{value:.3f}</td>" in html, (r["scenario"], name)
    for chart in ("ratios.svg", "scaling.svg"):
        svg = (site["dir"] / "performance" / chart).read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg and len(svg) > 5000
    assert 'src="../performance/ratios.svg"' in html or 'src="ratios.svg"' in html


def test_api_reference_is_rendered_from_docstrings(site):
    core = (site["dir"] / "api" / "core" / "index.html").read_text()
    for name in ("adaptfn.inject", "adaptfn.merge", "adaptfn.functional.functional", "adaptfn.stack"):
        assert f'id="{name}"' in core, name
    assert core.count('class="autorefs autorefs-internal"') > 5  # docstring roles became links
    assert ":func:" not in core and ":class:" not in core
    assert "&gt;&gt;&gt;" in core and 'class="highlight"' in core  # examples are highlighted code


@pytest.fixture(scope="module")
def served(site):
    assert site["rc"] == 0, "the site did not build"
    handler = functools.partial(_QuietHandler, directory=str(site["dir"]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run ./scripts/env.sh (pinned in constraints-test.txt)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


class _Tab:
    """One browser tab that records, per visit, console errors, page errors, failed requests (HTTP >= 400
    included) and requests to other hosts (aborted: the site must work offline)."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.problems: list[str] = []
        p = self.page
        p.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        p.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        p.on("requestfailed", self._failed)
        p.on("response", lambda r: self.problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        p.route("**/*", self._local_only)

    def _failed(self, request):
        # a local request cancelled by the next navigation (the previous page's search worker, still loading
        # when the tab moves on) fails with ERR_ABORTED after visit() has started the next page: not a fault
        # of either page. Other hosts are caught by _local_only; every other failure counts.
        if request.failure == "net::ERR_ABORTED" and request.url.startswith("http://127.0.0.1:"):
            return
        self.problems.append(f"request failed: {request.url} ({request.failure})")

    def _local_only(self, route):
        if route.request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
            route.continue_()
        else:
            self.problems.append(f"request to another host: {route.request.url}")
            route.abort()

    def visit(self, url, idle=False):
        self.problems = []
        self.page.goto(url, wait_until="load")
        if idle:
            self.page.wait_for_load_state("networkidle")
        return self.page


def test_every_page_renders_in_chromium(browser, served):
    report = {}
    tab = _Tab(browser)
    for i, path in enumerate(nav_pages()):
        page = tab.visit(served + path, idle=i == 0)
        checks = page.evaluate("""() => ({
                title: document.title,
                h1: (document.querySelector("article h1") || {}).textContent || "",
                navLinks: document.querySelectorAll("nav.md-nav--primary a.md-nav__link").length,
                search: !!document.querySelector("input.md-search__input"),
                images: Array.from(document.querySelectorAll("article img")).map(
                    i => [i.getAttribute("src"), i.complete && i.naturalWidth > 0]),
                codeBlocks: document.querySelectorAll("article pre > code").length,
                highlighted: document.querySelectorAll("article .highlight pre code span[class]").length,
                textLength: (document.querySelector("article") || {innerText: ""}).innerText.length,
            })""")
        page.wait_for_timeout(50)  # late console messages of this page
        report[path] = checks
        assert not tab.problems, f"/{path}: {tab.problems}"
        assert checks["title"] and checks["h1"].strip(), (path, checks)
        assert checks["navLinks"] >= 15 and checks["search"], (path, checks)
        assert checks["textLength"] > 200, (path, checks)
        assert all(ok for _, ok in checks["images"]), (path, checks["images"])
        if checks["codeBlocks"]:
            assert checks["highlighted"] > 0, (path, "code blocks without highlighting")
    tab.page.close()
    assert report[""]["codeBlocks"] and report["concepts/"]["images"]  # home page code, the call figure
    assert report["performance/"]["images"] and report["api/core/"]["highlighted"] > 10


def test_search_finds_a_page(browser, served):
    tab = _Tab(browser)
    page = tab.visit(served, idle=True)
    try:
        page.locator("input.md-search__input").click()  # (visible in the header at this width)
        page.keyboard.type("push_to_hub")
        page.wait_for_selector(".md-search-result__item", timeout=15000)
        hits = page.locator(".md-search-result__item").count()
        text = page.locator(".md-search-result").inner_text()
    finally:
        page.close()
    assert not tab.problems, tab.problems
    assert hits >= 1 and "push_to_hub" in text.replace("\u200b", "")


@pytest.mark.parametrize("path,name", [("", "home"), ("api/core/", "api-core")])
def test_screenshot(browser, served, path, name, tmp_path):
    from PIL import Image

    tab = _Tab(browser)
    page = tab.visit(served + path, idle=True)
    shot = tmp_path / f"{name}.png"
    try:
        page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()
    assert not tab.problems, tab.problems
    with Image.open(shot) as im:
        width, height = im.size
        rgb = im.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20) or []
        small = rgb.resize((64, 64))
        spread = max(small.getextrema()[0][1] - small.getextrema()[0][0], 1)
    assert width == 1280 and height >= 900, (width, height)
    assert len(colors) > 64, f"{name}: {len(colors)} colors: blank?"
    assert spread > 100, f"{name}: no contrast"
    dominant = max(colors)[0] / (width * height)
    assert dominant < 0.97, f"{name}: {dominant:.0%} of the screenshot is one color"
    keep = os.environ.get("ADAPTFN_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
