"""Change the repository's address everywhere it is written, from the one place that defines it.

    python scripts/set_repository_url.py https://github.com/OWNER/NAME

``_config.yml``'s ``repository.url`` is the address (the book's launch and repository buttons read it). This
script sets it and rewrites every copy of the old address to the new one:

- every chapter's install cell (``pip install git+<url>.git``) and any other cell text in ``book/*.ipynb`` (cell
  sources only: outputs are never touched; the notebook is written back as
  ``json.dumps(nb, indent=1, ensure_ascii=False)``);
- ``book/*.md``, ``README.md`` and ``pyproject.toml`` (``[project.urls]``).

tests/test_book.py checks that all of them agree with ``_config.yml``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
URL_RE = re.compile(r"^https://[A-Za-z0-9.-]+/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


def configured_url(root: Path) -> str:
    """repository.url in _config.yml."""
    text = (root / "_config.yml").read_text(encoding="utf-8")
    m = re.search(r"^repository:\s*\n(?:[ \t]+.*\n|\s*\n)*?[ \t]+url:\s*(\S+)", text, re.M)
    if not m:
        raise SystemExit(f"no repository.url in {root / '_config.yml'}")
    return m.group(1).strip("\"'")


def _set_config_url(root: Path, new: str) -> None:
    path = root / "_config.yml"
    text = path.read_text(encoding="utf-8")
    m = re.search(r"^repository:\s*\n(?:[ \t]+.*\n|\s*\n)*?[ \t]+url:[ \t]*(\S+)", text, re.M)
    path.write_text(text[: m.start(1)] + new + text[m.end(1):], encoding="utf-8")


def _replace(text: str, old: str, new: str) -> str:
    # <old>.git first (the pip install address), then every other <old>... link
    return text.replace(old + ".git", new + ".git").replace(old, new)


def set_repository_url(new: str, root: Path = ROOT) -> list[Path]:
    """Rewrite every copy of the configured address to ``new``; return the files that changed."""
    new = new.rstrip("/").removesuffix(".git")
    if not URL_RE.match(new):
        raise SystemExit(f"expected an address like https://github.com/OWNER/NAME, got {new!r}")
    old = configured_url(root)
    changed = []
    if old != new:
        _set_config_url(root, new)
        changed.append(root / "_config.yml")
    for path in [root / "README.md", root / "pyproject.toml", *sorted((root / "book").glob("*.md"))]:
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            if (updated := _replace(text, old, new)) != text:
                path.write_text(updated, encoding="utf-8")
                changed.append(path)
    for path in sorted((root / "book").glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        touched = False
        for cell in nb["cells"]:
            src = cell["source"]
            text = "".join(src) if isinstance(src, list) else src
            if (updated := _replace(text, old, new)) != text:
                cell["source"] = updated.splitlines(keepends=True) if isinstance(src, list) else updated
                touched = True
        if touched:
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            changed.append(path)
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the new address, e.g. https://github.com/OWNER/NAME")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this script's repository)")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    old = configured_url(root)
    changed = set_repository_url(args.url, root)
    for path in changed:
        print(f"updated {path.relative_to(root)}")
    print(f"repository URL: {old} -> {configured_url(root)} ({len(changed)} files changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
