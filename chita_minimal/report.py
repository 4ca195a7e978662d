"""What a pruning call did: one :class:`Report` base that every entry point's result extends.

    report = cm.prune(model, data, 0.9)
    print(report)            # a table: per layer shape, kept weights, sparsity; then the totals

``target`` is what was asked (for ``prune``: the sparsity, the fraction of weights removed),
``achieved`` what was measured on the model afterwards, ``masks`` the kept weights (True = kept)
per parameter name, ready for :class:`chita_minimal.network.params.MaskKeeper`, ``seconds`` the
time per phase and ``stages`` one dict per pruning step (CHITA++ and gradual pruning have several).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True)
class Report:
    """Base of every result: method, target, achieved, masks, seconds, stages."""

    method: str
    target: float | None
    achieved: float
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    seconds: dict[str, float] = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)

    def layer_table(self) -> list[tuple[str, tuple[int, ...], int, int]]:
        """(name, shape, kept, total) per masked parameter."""
        return [(name, tuple(m.shape), int(m.sum()), m.numel()) for name, m in self.masks.items()]

    def __str__(self) -> str:
        rows = self.layer_table()
        lines = [f"{type(self).__name__}: method {self.method!r}, target {_fmt(self.target)}, "
                 f"achieved {_fmt(self.achieved)}"]
        if rows:
            w = max(len("layer"), *(len(r[0]) for r in rows))
            shapes = [" × ".join(map(str, r[1])) for r in rows]
            ws = max(len("shape"), *(len(s) for s in shapes))
            lines.append(f"  {'layer':<{w}}  {'shape':>{ws}}  {'kept':>10}  {'of':>10}  sparsity")
            for (name, _, kept, total), shape in zip(rows, shapes):
                lines.append(f"  {name:<{w}}  {shape:>{ws}}  {kept:>10,}  {total:>10,}  {1 - kept / max(total, 1):.4f}")
            kept, total = sum(r[2] for r in rows), sum(r[3] for r in rows)
            lines.append(f"  {'all':<{w}}  {'':>{ws}}  {kept:>10,}  {total:>10,}  {1 - kept / max(total, 1):.4f}")
        lines.extend(self._extra_lines())
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.seconds:
            lines.append("  seconds: " + ", ".join(f"{k} {v:.3g}" for k, v in self.seconds.items()))
        return "\n".join(lines)

    def _extra_lines(self) -> list[str]:
        return []


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


@dataclass(kw_only=True)
class PruneReport(Report):
    """What :func:`chita_minimal.prune` did (unstructured or N:M pruning of the prunable weights).

    ``sparsity`` (= target) and ``achieved_sparsity`` (= achieved, measured on the prunable weights);
    k kept of p prunable weights; layer_sparsity per parameter; objective: f(w) of problem (P) at the
    last stage (None for methods that build no X, e.g. magnitude pruning); l2, n_grads, batch_size,
    seed as used; seconds per phase ("gradients", "solve", "total").
    """

    k: int
    p: int
    layer_sparsity: dict[str, float]
    objective: float | None
    l2: float = 0.0
    n_grads: int = 0
    batch_size: int = 1
    seed: int = 0
    dense: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def dense_share(self) -> float:
        """Share of all the model's parameter entries that this call left dense (not in its prunable set)."""
        total = self.p + sum(self.dense.values())
        return sum(self.dense.values()) / total if total else 0.0

    @property
    def sparsity(self) -> float:
        return self.target

    @property
    def achieved_sparsity(self) -> float:
        return self.achieved

    def _extra_lines(self):
        obj = "–" if self.objective is None else f"{self.objective:.6g}"
        lines = [f"  objective of (P) {obj}; l2 {self.l2:g}; n_grads {self.n_grads} × batch {self.batch_size}; "
                 f"seed {self.seed}; {len(self.stages)} stage(s)"]
        if self.dense:
            big = sorted(self.dense.items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"  left dense: {len(self.dense)} parameters, {100 * self.dense_share:.1f} % of all entries "
                         f"(largest: {', '.join(f'{n} {v:,}' for n, v in big)})")
        return lines
