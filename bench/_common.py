"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import csv
from pathlib import Path


DRIVER_MODE = "true sequential"  # ``within_block`` of rows measured with the driver as it is now


def read_table(path) -> list[dict]:
    """The rows of a CSV written by :func:`write_table` (strings), or [] when the file does not exist yet."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def replace_row(path, row: dict, key: tuple[str, ...]) -> list[dict]:
    """The rows of the CSV at ``path`` with ``row`` (values as strings) in place of those that agree with it on
    every column of ``key`` — a grid filled in parts keeps one row per key."""
    new = {k: str(v) for k, v in row.items()}
    return [r for r in read_table(path) if any(r.get(c) != new[c] for c in key)] + [new]


def write_table(rows: list[dict], out, device_type: str = "cpu") -> Path:
    """Write rows as CSV to ``out`` (``<stem>_<device>.csv`` for a non-CPU device); return the path."""
    out = Path(out)
    if device_type != "cpu":
        out = out.with_name(out.stem + f"_{device_type}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    return out


def smollm2_wikitext(n_eval: int | None, length: int):
    """The language-model chapter's model and data: SmolLM2-135M-Instruct (fp32, eval mode), its tokenizer, the
    WikiText-2 *valid* text (draw the calibration windows from it: ``token_windows(valid, tok, windows, length,
    seed=...)``) and the first ``n_eval`` non-overlapping ``length``-token windows of *test* (None: test is not read)."""
    import chita_minimal as cm
    from chita_minimal.data.text import token_windows

    model = cm.models.load_pretrained("smollm2-135m")
    tok = cm.models.load_tokenizer("smollm2-135m")
    valid = cm.data.load("wikitext-2", "valid")
    test = None if n_eval is None else token_windows(cm.data.load("wikitext-2", "test"), tok, n_eval, length,
                                                     random=False)
    return model, tok, valid, test


def split_valid(valid: str, tok, windows: int, n_eval: int, length: int, heldout: float = 0.2):
    """WikiText-2 valid cut in two, for choices the test split must not make: ``windows`` calibration windows at
    seeded (0) random starts in the first 1 − ``heldout`` of its tokens, and the first ``n_eval`` non-overlapping
    windows of the rest, which no calibration window touches. Returns (calibration, held out, tokens before the
    cut, tokens after it)."""
    from chita_minimal.data.text import token_windows, tokenize

    ids = tokenize(valid, tok).reshape(-1)
    cut = int(ids.numel() * (1 - heldout))
    calib = token_windows(ids[:cut], n=windows, length=length, seed=0)
    held = token_windows(ids[cut:], n=n_eval, length=length, random=False)
    return calib, held, cut, ids.numel() - cut
