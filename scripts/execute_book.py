"""Re-run the book's chapters, writing their outputs into the notebooks; skip the ones that are up to date.

    python scripts/execute_book.py                  full runs of every chapter whose code or package changed
    python scripts/execute_book.py mlpnet gradual   full runs of the named chapters (always)
    CHITA_QUICK=1 python scripts/execute_book.py    quick runs of all (or the named) chapters, never skipped
    python scripts/execute_book.py --status         which chapters are up to date, without running anything
    python scripts/execute_book.py --record [ch…]   declare the stored outputs up to date without running

(``bash scripts/book.sh --execute [chapter …]`` calls this, then builds the HTML.)

The execution cache is ``data/book_cache.json`` (committed with the notebooks): for every chapter it records,
from its last full run, the SHA256 of its code cells, of the package source (every ``chita_minimal/**/*.py``)
and of the outputs that run wrote. A chapter is *up to date* when all three still match: its code and the
package did not change and its stored outputs are the ones that run wrote (a quick run, or an edit of the
outputs, makes it stale). Markdown edits do not count. A quick run (``CHITA_QUICK=1``) removes the chapter's
entry, since its notebook then holds quick-mode outputs.

Notebooks are executed with nbclient in ``book/`` (as nbmake does in the tests) and written back with nbformat
(the format of the committed notebooks); a chapter that fails keeps its old outputs, the failed run is saved to
``_build/failed/<chapter>.ipynb``, and the script exits with status 1 after the other chapters ran.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = "data/book_cache.json"
PACKAGE = "chita_minimal"


# ----------------------------------------------------------------------------- hashes


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def code_hash(nb: dict) -> str:
    """SHA256 of the notebook's code cells' sources, in order (markdown does not count)."""
    return _sha([_source(c) for c in nb["cells"] if c["cell_type"] == "code"])


def outputs_hash(nb: dict) -> str:
    """SHA256 of the code cells' outputs and execution counts."""
    return _sha([[c.get("outputs", []), c.get("execution_count")] for c in nb["cells"] if c["cell_type"] == "code"])


def package_hash(root: Path = ROOT) -> str:
    """SHA256 of the package source: every .py file under chita_minimal/, by relative path and content."""
    h = hashlib.sha256()
    for path in sorted((root / PACKAGE).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- chapters and cache


def chapters(root: Path = ROOT) -> list[str]:
    """The notebook chapters in reading order (_toc.yml), as paths relative to the root ("book/mlpnet.ipynb")."""
    toc = (root / "_toc.yml").read_text(encoding="utf-8")
    entries = re.findall(r"(?:root|file):\s*(\S+)", toc)
    return [f"{e}.ipynb" for e in entries if (root / f"{e}.ipynb").is_file()]


def resolve(names: list[str], root: Path = ROOT) -> list[str]:
    """Chapter names as given on the command line ("mlpnet", "mlpnet.ipynb", "book/mlpnet.ipynb") → toc paths."""
    known = chapters(root)
    by_stem = {Path(c).stem: c for c in known}
    out = []
    for name in names:
        stem = Path(name).stem
        if stem not in by_stem:
            raise SystemExit(f"unknown chapter {name!r}; the chapters are: {', '.join(by_stem)}")
        out.append(by_stem[stem])
    return out


def read_nb(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_nb(path: Path, nb) -> None:
    """Write an executed notebook as nbformat does (sorted keys, one-space indent, sources as lists of lines)."""
    import nbformat

    nbformat.write(nb, str(path))


def load_cache(root: Path = ROOT) -> dict:
    path = root / CACHE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"about": "scripts/execute_book.py: hashes of each chapter's last full run", "notebooks": {}}


def save_cache(cache: dict, root: Path = ROOT) -> None:
    path = root / CACHE
    path.parent.mkdir(parents=True, exist_ok=True)
    cache["notebooks"] = dict(sorted(cache["notebooks"].items()))
    path.write_text(json.dumps(cache, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def entry_for(nb: dict, pkg: str, **extra) -> dict:
    return {"code": code_hash(nb), "package": pkg, "outputs": outputs_hash(nb), **extra}


def stale_reason(chapter: str, cache: dict, pkg: str, root: Path = ROOT) -> str | None:
    """None when the chapter is up to date, else why it must run again."""
    entry = cache["notebooks"].get(chapter)
    if entry is None:
        return "no full run recorded"
    nb = read_nb(root / chapter)
    if entry.get("code") != code_hash(nb):
        return "its code changed"
    if entry.get("package") != pkg:
        return "the package source changed"
    if entry.get("outputs") != outputs_hash(nb):
        return "its stored outputs are not the recorded run's (quick run or edited)"
    return None


# ----------------------------------------------------------------------------- execution


def execute(chapter: str, quick: bool, timeout: int, root: Path = ROOT) -> tuple[dict | None, float]:
    """Run one notebook in book/ with a fresh kernel; return (executed notebook or None on failure, seconds)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    path = root / chapter
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    env_before = os.environ.get("CHITA_QUICK")
    os.environ["CHITA_QUICK"] = "1" if quick else "0"  # the kernel inherits it
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=True)
    start = time.perf_counter()
    try:
        client.execute(cwd=str(path.parent))
        ok = True
    except (CellExecutionError, CellTimeoutError) as err:
        ok = False
        print(f"  FAILED: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}")
    finally:
        if env_before is None:
            os.environ.pop("CHITA_QUICK", None)
        else:
            os.environ["CHITA_QUICK"] = env_before
    seconds = time.perf_counter() - start
    if not ok:
        failed = root / "_build" / "failed" / path.name
        failed.parent.mkdir(parents=True, exist_ok=True)
        write_nb(failed, nb)
        print(f"  the failed run is in {failed}; {chapter} keeps its previous outputs")
        return None, seconds
    return nb, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("chapters", nargs="*", help="chapters to run (default: every stale chapter; all in quick mode)")
    ap.add_argument("--status", action="store_true", help="print which chapters are up to date; run nothing")
    ap.add_argument("--record", action="store_true",
                    help="declare the stored outputs of the named (default: all) chapters up to date; run nothing")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per cell (default 7200)")
    ap.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = args.root.resolve()
    quick = os.environ.get("CHITA_QUICK") == "1"
    named = resolve(args.chapters, root)
    selected = named or chapters(root)
    cache = load_cache(root)
    pkg = package_hash(root)

    if args.status:
        for ch in selected:
            why = stale_reason(ch, cache, pkg, root)
            print(f"{ch:40s} {'up to date' if why is None else 'stale: ' + why}")
        return 0
    if args.record:
        for ch in selected:
            nb = read_nb(root / ch)
            cache["notebooks"][ch] = entry_for(nb, pkg, recorded=_dt.date.today().isoformat(),
                                               how="declared up to date (--record), not executed")
            print(f"recorded {ch}")
        save_cache(cache, root)
        return 0

    mode = "quick" if quick else "full"
    todo, skipped = [], []
    for ch in selected:
        why = "named" if named else ("quick mode" if quick else stale_reason(ch, cache, pkg, root))
        (skipped if why is None else todo).append((ch, why))
    for ch, _ in skipped:
        print(f"skip {ch}: up to date (code, package and outputs as recorded in {CACHE})")
    failures = 0
    total = time.perf_counter()
    for i, (ch, why) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {mode} run of {ch} ({why}) ...", flush=True)
        nb, seconds = execute(ch, quick, args.timeout, root)
        if nb is None:
            failures += 1
            continue
        write_nb(root / ch, nb)
        if quick:
            cache["notebooks"].pop(ch, None)  # the notebook holds quick outputs now: a full run must redo it
        else:
            cache["notebooks"][ch] = entry_for(read_nb(root / ch), pkg,  # hashes of the file as written
                                               executed=_dt.datetime.now().isoformat(timespec="seconds"),
                                               seconds=round(seconds, 1))
        save_cache(cache, root)
        print(f"  done in {seconds:.0f} s", flush=True)
    print(f"{len(todo) - failures} chapter(s) run ({mode} mode), {len(skipped)} skipped as up to date, "
          f"{failures} failed; {time.perf_counter() - total:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
