"""The book as a product: it builds with warnings as errors from the outputs stored in the notebooks (once per
session, tests/conftest.py: built_book); the repository address has one source (_config.yml); the execution
cache skips what did not change; the workflow tests and publishes; every chapter says what it costs to run."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
yaml = pytest.importorskip("yaml")


def _script(name):
    """A module from scripts/ (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _chapters(root=ROOT):
    return sorted((root / "book").glob("*.ipynb"))


def _cells(path, kind):
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def test_book_builds_without_warnings(built_book):
    assert built_book.returncode == 0, built_book.log[-8000:]
    html = built_book.html
    for page in ["book/intro.html", "book/least_squares.html", "book/bibliography.html"]:
        assert (html / page).exists(), page
    chapter = (html / "book/least_squares.html").read_text()
    assert "data:image/png" in chapter or "_images/" in chapter  # its plot rendered
    assert "colab.research.google.com" in chapter  # the launch button is there
    # MathJax: the vendored copy (scripts/setup.sh) when npm was there, else the CDN, on every page
    if (ROOT / "_static" / "mathjax" / "tex-chtml.js").is_file():
        assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
        assert 'src="../_static/mathjax/tex-chtml.js' in chapter
        assert chapter.count("_static/mathjax/") == 1  # only the loader: MathJax loads the rest itself
    else:
        assert "cdn.jsdelivr.net/npm/mathjax@3" in chapter


def test_every_notebook_is_in_the_toc():
    toc = (ROOT / "_toc.yml").read_text()
    for nb in sorted((ROOT / "book").glob("*.ipynb")):
        assert f"book/{nb.stem}" in toc, f"{nb.name} is missing from _toc.yml"


def test_every_toc_entry_is_a_file_and_chapter_names_carry_no_number():
    # the reading order lives in _toc.yml only (d2l style): chapter files are named, not numbered
    toc = (ROOT / "_toc.yml").read_text()
    entries = re.findall(r"(?:root|file): (\S+)", toc)
    for entry in entries:
        assert any((ROOT / f"{entry}{ext}").exists() for ext in (".ipynb", ".md")), f"{entry} is in _toc.yml but missing"
    for nb in sorted((ROOT / "book").glob("*.ipynb")):
        assert not nb.stem[0].isdigit(), f"{nb.name}: the order belongs in _toc.yml, not in the file name"


# ----------------------------------------------------------------------------- the repository address


def _check_repository_url(root):
    """Everything that names the repository agrees with _config.yml's repository.url; returns that URL."""
    url = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8"))["repository"]["url"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url
    install = f"git+{url}.git"
    for nb in _chapters(root):
        first_code = _cells(nb, "code")[0]
        assert '"pip", "install"' in first_code and f'"{install}"' in first_code, \
            f"{nb.name}: the install cell does not install {install}:\n{first_code}"
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert f"pip install {install}" in readme and "scripts/set_repository_url.py" in readme
    pyproject = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["urls"]["Repository"] == url
    # no other address of this repository anywhere (a stale fork, a typo)
    texts = {p.name: p.read_text(encoding="utf-8") for p in
             [root / "README.md", root / "pyproject.toml", *(root / "book").glob("*.md")]}
    texts.update({nb.name: "\n".join(_cells(nb, "code") + _cells(nb, "markdown")) for nb in _chapters(root)})
    for name, text in texts.items():
        for other in re.findall(r"https://github\.com/[\w.-]+/chita[\w.-]*", text):
            assert other.removesuffix(".git") == url, f"{name} names {other}, _config.yml says {url}"
    return url


def test_repository_url_has_one_source():
    _check_repository_url(ROOT)


def test_set_repository_url_rewrites_everything_on_a_copy(tmp_path):
    for name in ["_config.yml", "_toc.yml", "README.md", "pyproject.toml"]:
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "book", tmp_path / "book")
    old = _check_repository_url(tmp_path)
    new = "https://github.com/someone/chita_fork"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "set_repository_url.py"), new, "--root",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert _check_repository_url(tmp_path) == new
    for path in [tmp_path / "README.md", tmp_path / "pyproject.toml", *(tmp_path / "book").glob("*")]:
        assert old not in path.read_text(encoding="utf-8"), path
    for nb in _chapters(tmp_path):  # only cell sources changed: outputs and everything else are the same
        before = json.loads((ROOT / "book" / nb.name).read_text(encoding="utf-8"))
        after = json.loads(nb.read_text(encoding="utf-8"))
        for cell in before["cells"] + after["cells"]:
            cell.pop("source")
        assert before == after, nb.name
        assert nb.read_text(encoding="utf-8") == json.dumps(json.loads(nb.read_text(encoding="utf-8")), indent=1,
                                                            ensure_ascii=False) + "\n"
    (tmp_path / "book" / "intro.md").write_text("see https://github.com/stale/chita_minimal\n")
    with pytest.raises(AssertionError, match="stale"):
        _check_repository_url(tmp_path)


# ----------------------------------------------------------------------------- CI and GitHub Pages


def test_workflow_tests_builds_and_publishes_the_book():
    workflows = list((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows
    steps, jobs, triggers = [], {}, {}
    for path in workflows:
        wf = yaml.safe_load(path.read_text(encoding="utf-8"))
        on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
        triggers.update(on if isinstance(on, dict) else {k: None for k in ([on] if isinstance(on, str) else on)})
        for name, job in wf["jobs"].items():
            jobs[name] = job
            steps += job.get("steps", [])
    assert "main" in triggers["push"]["branches"]
    runs = "\n".join(step.get("run", "") for step in steps)
    uses = [step.get("uses", "") for step in steps]
    assert "bash scripts/test.sh" in runs and "bash scripts/book.sh" in runs
    assert runs.index("bash scripts/test.sh") < runs.index("bash scripts/book.sh")  # publish only what passed
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-pages-artifact@"))
    assert upload["with"]["path"].strip("./") == "_build/html"
    assert any(u.startswith("actions/deploy-pages@") for u in uses)
    deploy = next(job for job in jobs.values() if any(s.get("uses", "").startswith("actions/deploy-pages@")
                                                       for s in job.get("steps", [])))
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"} and deploy.get("needs")
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()  # the same tests as .ci/run


# ----------------------------------------------------------------------------- the execution cache


def _tiny_book(root: Path, code: str):
    (root / "book").mkdir(parents=True, exist_ok=True)
    (root / "chita_minimal").mkdir(exist_ok=True)
    (root / "chita_minimal" / "__init__.py").write_text("VERSION = 1\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/tiny\n")
    nb = {"cells": [{"cell_type": "markdown", "id": "m1", "metadata": {}, "source": ["# Tiny\n"]},
                    {"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [],
                     "source": [code]}],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    (root / "book" / "tiny.ipynb").write_text(json.dumps(nb, indent=1) + "\n")


def test_execute_skips_chapters_whose_code_and_package_did_not_change(tmp_path, monkeypatch):
    execute_book = _script("execute_book")
    monkeypatch.delenv("CHITA_QUICK", raising=False)
    _tiny_book(tmp_path, "import os\nprint('quick' if os.environ.get('CHITA_QUICK') == '1' else 'full', 6 * 7)")
    root = ["--root", str(tmp_path)]

    def status():
        cache = execute_book.load_cache(tmp_path)
        return execute_book.stale_reason("book/tiny.ipynb", cache, execute_book.package_hash(tmp_path), tmp_path)

    def outputs():
        nb = json.loads((tmp_path / "book" / "tiny.ipynb").read_text())
        return "".join("".join(o.get("text", "")) for o in nb["cells"][1]["outputs"])

    assert status() == "no full run recorded"
    assert execute_book.main(root) == 0  # runs it (a real kernel), writes the outputs and the cache entry
    assert outputs() == "full 42\n" and status() is None
    entry = json.loads((tmp_path / "data" / "book_cache.json").read_text())["notebooks"]["book/tiny.ipynb"]
    assert set(entry) >= {"code", "package", "outputs", "executed", "seconds"}
    written = (tmp_path / "book" / "tiny.ipynb").read_text()
    assert written == json.dumps(json.loads(written), indent=1, sort_keys=True, ensure_ascii=False) + "\n"

    mtime = (tmp_path / "book" / "tiny.ipynb").stat().st_mtime_ns
    assert execute_book.main(root) == 0 and (tmp_path / "book" / "tiny.ipynb").stat().st_mtime_ns == mtime  # skipped

    nb = json.loads(written)
    nb["cells"][0]["source"] = ["# Tiny, retitled\n"]  # markdown does not count
    (tmp_path / "book" / "tiny.ipynb").write_text(json.dumps(nb, indent=1) + "\n")
    assert status() is None
    nb["cells"][1]["source"] = ["print(6 * 7)"]  # code does
    (tmp_path / "book" / "tiny.ipynb").write_text(json.dumps(nb, indent=1) + "\n")
    assert status() == "its code changed"
    assert execute_book.main(root) == 0 and outputs() == "42\n" and status() is None
    (tmp_path / "chita_minimal" / "__init__.py").write_text("VERSION = 2\n")  # so does the package
    assert status() == "the package source changed"
    execute_book.main(root + ["--record"])
    assert status() is None

    monkeypatch.setenv("CHITA_QUICK", "1")  # a quick run always runs and drops the entry
    assert execute_book.main(root) == 0 and status() == "no full run recorded"


# ----------------------------------------------------------------------------- reader comfort


def test_every_chapter_says_what_a_run_costs_and_needs():
    for nb in _chapters():
        first = _cells(nb, "markdown")[0]
        assert "**Running it.**" in first, nb.name
        running = " ".join(first[first.index("**Running it.**"):].split())
        for needed in ("Full run:", "CPU", "GPU", "CHITA_QUICK=1", "It needs"):
            assert needed in running, f"{nb.name}: the first cell's 'Running it' does not say {needed!r}"
        assert re.search(r"(minute|second|hour)", running), nb.name


LONG_LINES_PENDING: set[str] = set()


def test_no_code_line_is_cut_off_badly():
    """Code cells show about 80-90 characters before scrolling; no line is longer than 110
    (python scripts/wrap_code_lines.py wraps them without changing the code)."""
    wrap = _script("wrap_code_lines")
    for nb in _chapters():
        if nb.name in LONG_LINES_PENDING:
            continue
        long = wrap.long_lines(json.loads(nb.read_text(encoding="utf-8")), 110)
        assert not long, f"{nb.name}: {len(long)} code lines over 110 characters, e.g. {long[0][1].strip()[:80]}"
