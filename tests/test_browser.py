"""The built book in a real browser: Debian's chromium, driven by Playwright, offline.

The book built once per session (tests/conftest.py: built_book) is served by http.server on 127.0.0.1; every
request to another host is blocked, so the pages must work offline. Each page of the table of contents is
visited once, and the tests check what was seen: no JavaScript errors, figures with a size, math rendered by the
vendored MathJax, launch buttons that point at the configured repository and the page's notebook, internal links
and anchors that resolve, and a search that finds "CHITA".

Needs the playwright Python package (the test extra) and a Chromium binary: /usr/bin/chromium (scripts/setup.sh
--browser installs Debian's package when run as root with apt-get), or $CHITA_CHROMIUM. Playwright's own browser
downloads (`playwright install`) are never used.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import json
import os
import re
import shutil
import threading
import urllib.parse
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHITA_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium: /usr/bin/chromium is missing and could not be installed (scripts/setup.sh --browser "
           "installs Debian's chromium with apt-get when run as root); or set CHITA_CHROMIUM to a Chromium binary")


def _config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))


def _toc_pages() -> list[str]:
    """Every page of the table of contents, as paths relative to the HTML root ("book/mlpnet.html")."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [ch["file"] for ch in part.get("chapters", [])]
    pages += [ch["file"] for ch in toc.get("chapters", [])]
    return [f"{p}.html" for p in pages]


def _image_outputs(notebook: Path) -> int:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    n = 0
    for cell in nb["cells"]:
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell["cell_type"] != "code" or tags & {"remove-output", "remove-cell"}:
            continue
        n += sum(1 for o in cell.get("outputs", []) if "image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {}))
    return n


# ----------------------------------------------------------------------------- serving and visiting


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(built_book):
    assert built_book.returncode == 0, "the book did not build:\n" + built_book.log[-3000:]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(built_book.html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", built_book.html
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(site):
    base, _ = site
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        blocked = []

        def route(r):  # offline: only the local server answers
            if r.request.url.startswith(base):
                r.continue_()
            else:
                blocked.append(r.request.url)
                r.abort()

        context.route("**/*", route)
        context.blocked = blocked
        yield context
        context.close()
        browser.close()


_VISIT = r"""async () => {
  const out = {};
  out.hasMath = document.querySelectorAll('.math').length;
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  await document.fonts.ready;  // MathJax's web fonts: loaded before the next page is opened
  out.mathjax = !!(window.MathJax && MathJax.startup && MathJax.version);
  out.mathNodes = document.querySelectorAll('.math').length;
  out.mathRendered = Array.from(document.querySelectorAll('.math')).filter(e => e.querySelector('mjx-container')).length;
  out.mathErrors = Array.from(document.querySelectorAll('mjx-merror')).map(e => e.getAttribute('data-mjx-error') || e.textContent);
  // visible text outside code, scripts and rendered math
  const skip = new Set(['PRE', 'CODE', 'SCRIPT', 'STYLE', 'TEXTAREA', 'MJX-CONTAINER', 'NOSCRIPT']);
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {acceptNode(n) {
    for (let e = n.parentElement; e; e = e.parentElement) { if (skip.has(e.tagName)) return NodeFilter.FILTER_REJECT; }
    return NodeFilter.FILTER_ACCEPT; }});
  const texts = []; while (walker.nextNode()) texts.push(walker.currentNode.nodeValue);
  out.text = texts.join(' ');
  await Promise.all(Array.from(document.images).filter(i => !i.complete).map(i => new Promise(r => { i.onload = i.onerror = r; })));
  out.images = Array.from(document.querySelectorAll('.bd-article img')).map(i => {
    const r = i.getBoundingClientRect();
    return {src: i.getAttribute('src'), natural: [i.naturalWidth, i.naturalHeight], box: [r.width, r.height],
            shown: i.offsetParent !== null};
  });
  out.links = Array.from(document.querySelectorAll('a[href]')).map(a => [a.getAttribute('href'), a.href]);
  out.ids = Array.from(document.querySelectorAll('[id], a[name]')).map(e => e.id || e.getAttribute('name'));
  return out;
}"""


@pytest.fixture(scope="module")
def visits(site, browser):
    """Every toc page visited once: what the browser saw, and the errors it reported."""
    base, _ = site
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    # a request cut short by leaving the previous page is not a failure (a missing file is a 404 console error)
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url} ({r.failure})")
            if "ERR_ABORTED" not in (r.failure or "") else None)
    out = {}
    for path in _toc_pages():
        errors.clear()
        browser.blocked.clear()
        response = page.goto(base + path, wait_until="load")
        seen = page.evaluate(_VISIT)
        seen["status"] = response.status if response else None
        seen["errors"] = list(errors)
        seen["blocked"] = list(browser.blocked)
        out[path] = seen
    page.close()
    return out


# ----------------------------------------------------------------------------- the checks


def test_every_toc_page_loads_without_javascript_errors(visits):
    problems = {p: v["errors"] + [f"blocked non-local request {u}" for u in v["blocked"]]
                for p, v in visits.items() if v["status"] != 200 or v["errors"] or v["blocked"]}
    assert not problems, json.dumps(problems, indent=1)
    assert len(visits) == len(_toc_pages()) >= 10


def test_index_redirects_to_the_first_page(site, browser):
    base, _ = site
    page = browser.new_page()
    page.goto(base + "index.html")
    page.wait_for_url(re.compile(r".*/book/intro\.html$"), timeout=10000)
    page.close()


def test_every_chapter_figure_has_a_size(visits):
    for path, seen in visits.items():
        notebook = ROOT / path.replace(".html", ".ipynb")
        expected = _image_outputs(notebook) if notebook.exists() else 0
        loaded = [i for i in seen["images"] if i["natural"][0] > 0 and i["natural"][1] > 0]
        assert len(loaded) >= expected, f"{path}: {len(loaded)} images loaded, the notebook has {expected}: {seen['images']}"
        for img in seen["images"]:
            assert img["natural"][0] > 0, f"{path}: image {img['src']} did not load"
            if img["shown"]:
                assert img["box"][0] > 0 and img["box"][1] > 0, f"{path}: image {img['src']} has no size on the page"


def test_math_is_rendered_by_the_vendored_mathjax(site, visits):
    _, html = site
    if not (html / "_static" / "mathjax" / "tex-chtml.js").is_file():
        pytest.skip("MathJax is not vendored (npm was missing for scripts/setup.sh): the book uses the CDN, "
                    "which this offline test cannot reach")
    pages_with_math = 0
    for path, seen in visits.items():
        assert seen["mathjax"], f"{path}: MathJax did not load"
        assert seen["mathRendered"] == seen["mathNodes"], f"{path}: {seen['mathNodes'] - seen['mathRendered']} " \
                                                          f"math elements not rendered"
        assert not seen["mathErrors"], f"{path}: TeX errors {seen['mathErrors']}"
        for raw in ("$$", "\\(", "\\[", "\\begin{"):
            at = seen["text"].find(raw)
            assert at < 0, f"{path}: raw TeX {raw!r} left in the text: …{seen['text'][max(0, at - 80):at + 80]}…"
        if path.endswith("bibliography.html"):
            continue  # pybtex prints TeX in .bib titles as text ({$L_0$} in book/references.bib: reported)
        unparsed = re.findall(r"(?<![\w$])\$[^$\s](?:[^$\n]{0,80}?[^$\s])?\$(?![\w$])", seen["text"])
        assert not unparsed, f"{path}: $…$ math left as text: {unparsed[:3]}"
        pages_with_math += seen["hasMath"] > 0
    assert pages_with_math >= 10


def test_launch_buttons_point_at_the_configured_repository(visits):
    config = _config()
    url = config["repository"]["url"].rstrip("/")
    branch = config["repository"].get("branch", "main")
    owner_repo = urllib.parse.urlsplit(url).path.strip("/")
    for path, seen in visits.items():
        hrefs = [absolute for _, absolute in seen["links"]]
        assert url in hrefs, f"{path}: no repository button to {url}"
        notebook = path.replace(".html", ".ipynb")
        colab = [h for h in hrefs if h.startswith(config["launch_buttons"]["colab_url"])]
        if (ROOT / notebook).exists():
            assert colab == [f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/{notebook}"], \
                f"{path}: Colab launch button {colab}"
        else:
            assert not colab, f"{path}: a Colab button on a page that is not a notebook"


class _Anchors(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key == "id" or (tag == "a" and key == "name"):
                self.ids.add(value)


def test_internal_links_and_anchors_resolve(site, visits):
    base, html = site
    ids = {path: set(seen["ids"]) for path, seen in visits.items()}  # the live DOM's ids of the visited pages
    broken, checked = [], 0
    for path, seen in visits.items():
        for raw, absolute in seen["links"]:
            if not absolute.startswith(base) or raw.startswith(("javascript:", "mailto:")):
                continue
            target, _, fragment = absolute[len(base):].partition("#")
            target = urllib.parse.unquote(target.split("?")[0]) or "index.html"
            if target.endswith("/"):
                target += "index.html"
            checked += 1
            if not (html / target).is_file():
                broken.append(f"{path}: {raw} -> missing {target}")
                continue
            if fragment and target.endswith(".html"):
                if target not in ids:
                    parser = _Anchors()
                    parser.feed((html / target).read_text(encoding="utf-8"))
                    ids[target] = parser.ids
                if urllib.parse.unquote(fragment) not in ids[target]:
                    broken.append(f"{path}: {raw} -> no anchor #{fragment} in {target}")
    assert not broken, "\n".join(broken)
    assert checked > 100


def test_search_finds_chita(site, browser):
    base, _ = site
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "search.html?q=CHITA", wait_until="load")
    page.wait_for_selector("#search-results ul.search li", timeout=20000)
    results = page.eval_on_selector_all("#search-results ul.search li a", "els => els.map(e => e.textContent)")
    page.close()
    assert results and not errors, (results, errors)
