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
