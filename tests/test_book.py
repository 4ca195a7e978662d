"""The book builds with warnings as errors, from the outputs stored in the notebooks."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) is None,
                    reason="jupyter-book is not installed (pip install -e '.[book]')")
def test_book_builds_without_warnings(tmp_path):
    jb = str(Path(sys.executable).parent / "jupyter-book")
    proc = subprocess.run([jb, "build", str(ROOT), "--path-output", str(tmp_path), "-W", "--keep-going"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    for page in ["book/intro.html", "book/least_squares.html", "book/bibliography.html"]:
        assert (html / page).exists(), page
    chapter = (html / "book/least_squares.html").read_text()
    assert "data:image/png" in chapter or "_images/" in chapter  # its plot rendered
    assert "colab.research.google.com" in chapter  # the launch button is there


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
