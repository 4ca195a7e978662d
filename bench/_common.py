"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import csv
from pathlib import Path


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


def smollm2_wikitext(n_eval: int, length: int):
    """The language-model chapter's model and data: SmolLM2-135M-Instruct (fp32, eval mode), its tokenizer, the
    WikiText-2 *valid* text (draw the calibration windows from it: ``token_windows(valid, tok, windows, length,
    seed=...)``) and the first ``n_eval`` non-overlapping ``length``-token windows of *test*."""
    import chita_minimal as cm
    from chita_minimal.data.text import token_windows

    model = cm.models.load_pretrained("smollm2-135m")
    tok = cm.models.load_tokenizer("smollm2-135m")
    valid = cm.data.load("wikitext-2", "valid")
    test = token_windows(cm.data.load("wikitext-2", "test"), tok, n_eval, length, random=False)
    return model, tok, valid, test
