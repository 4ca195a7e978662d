"""Saliency baselines on the flat weights: SNIP, first-order Taylor, L1-norm filter pruning.

Same data as CHITA and the baselines of :mod:`chita_minimal.baselines`: the flat prunable weights
w̄ (p,) and the gradient matrix X (n, p), row i = gradient of the loss on mini-batch i (as
``fisher.gradients`` makes it). Each returns ``Pruned(w, support)``: w = w̄ on the support, exactly
0.0 elsewhere; no weight is updated. Top-k ties: the lower index is kept (``threshold.hard_threshold``).

- :func:`snip`      — |ḡ ⊙ w̄|, ḡ the mean gradient (Lee et al. 2019, connection sensitivity).
- :func:`taylor`    — mean_i (g_i ⊙ w̄)² (Molchanov et al. 2019, first-order Taylor importance).
- :func:`l1_filter` — whole output filters of least L1 norm, per layer (Li et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chita_minimal.methods.base import Method, Stage, Step, register
from chita_minimal.methods.magnitude import Pruned, check_data, finish
from chita_minimal.network.params import Layout, split
from chita_minimal.solver.threshold import hard_threshold
from chita_minimal.solver.problem import Problem, check_tensor, num_kept

_check = check_data  # X (n, p), w_bar (p,), same dtype/device, 1 ≤ k ≤ p


def snip(X: torch.Tensor, w_bar: torch.Tensor, k: int) -> Pruned:
    """SNIP (Lee et al. 2019): keep the k largest connection sensitivities |ḡ_q · w̄_q|.

    ḡ = mean of the rows of X (the gradient of the mean loss over the sampled data). SNIP's
    normalisation by Σ|ḡ ⊙ w̄| does not change the ranking and is omitted.

    Args:
        X: (n, p) per-sample (or per-mini-batch) gradients; w_bar: (p,) dense weights; 1 ≤ k ≤ p.
    """
    _check(X, w_bar, k)
    return finish(w_bar, hard_threshold(X.mean(0) * w_bar, k))  # (p,)


def taylor(X: torch.Tensor, w_bar: torch.Tensor, k: int) -> Pruned:
    """First-order Taylor importance (Molchanov et al. 2019, eq. 8 per weight): keep the k largest
    I_q = (1/n) Σ_i (g_iq · w̄_q)².

    I_q = diag(F)_q · w̄_q² with F = XᵀX/n the empirical Fisher: the OBD saliency with the diagonal
    Fisher as Hessian, without OBD's factor ½ (which does not change the ranking).

    Args:
        X: (n, p) per-sample (or per-mini-batch) gradients; w_bar: (p,) dense weights; 1 ≤ k ≤ p.
    """
    _check(X, w_bar, k)
    score = X.pow(2).mean(0) * w_bar.pow(2)  # (p,) never forms the (n, p) product
    return finish(w_bar, hard_threshold(score, k))


def l1_filter(w_bar: torch.Tensor, layout: Layout, sparsity: float, *, skip=(), linear: bool = False) -> Pruned:
    """L1-norm filter pruning (Li et al. 2017), structured, the same fraction in every layer.

    For every convolution weight (a layout entry with ≥ 3 dims: (out, in, *kernel)) the output
    filters W[f] are ranked by ‖W[f]‖₁ and the smallest are zeroed: the layer keeps
    num_kept(sparsity, out) = round((1 − sparsity)·out) filters (at least one), i.e. it loses about
    round(sparsity·out). With ``linear=True`` the rows (output neurons) of 2-d weights are pruned the
    same way. Everything else — Linear weights by default (e.g. the final classifier), 1-d parameters,
    and the names in ``skip`` — stays dense, so the fraction of weights removed, 1 − support.mean(),
    is below ``sparsity`` (it is Σ_pruned layers removed_filters·(in·kh·kw) / p). Filter ties: the
    lower index is kept. Note: only the weights are zeroed; a bias or BatchNorm shift of a removed
    filter still contributes a constant output.

    Args:
        w_bar: (p,) flat weights in ``layout`` order; layout: from ``params.layout(model)``.
        sparsity: fraction of filters removed per layer, in [0, 1).
        skip: layout names left dense.
    Returns:
        ``Pruned(w, support)``: support is False on exactly the weights of the removed filters.
    """
    check_tensor("w_bar", w_bar, 1)
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a params.Layout, got {type(layout).__name__}")
    if w_bar.numel() != layout.p:
        raise ValueError(f"w_bar has {w_bar.numel()} entries but the layout has p = {layout.p}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if isinstance(skip, str):
        skip = (skip,)
    unknown = sorted(set(skip) - set(layout.names))
    if unknown:
        raise ValueError(f"skip names {unknown} are not in the layout {list(layout.names)}")
    support = torch.ones_like(w_bar, dtype=torch.bool)  # (p,)
    for (name, W), mask in zip(split(layout, w_bar).items(), split(layout, support).values()):
        if name in skip or W.dim() < 2 or (W.dim() == 2 and not linear):
            continue
        norms = W.abs().reshape(W.shape[0], -1).sum(1)  # (out,) L1 norm of each filter
        kept = hard_threshold(norms, num_kept(float(sparsity), W.shape[0]))  # (out,)
        mask[~kept] = False  # view of support: whole filters
    return finish(w_bar, support)


class Saliency(Method):
    """Keep the k weights of largest ``score(X, w̄, k)``; no weight is updated. The objective of (P)
    is reported when l2 > 0."""

    score = None

    def step(self, stage: Stage) -> Step:
        out = type(self).score(stage.X, stage.w, stage.k)
        objective = Problem(stage.X, stage.w, stage.l2, stage.alpha).objective(out.w) if stage.l2 > 0 else None
        return Step(out.w, out.support, objective)


@register
@dataclass
class SNIP(Saliency):
    """SNIP: keep the k largest |ḡ ⊙ w̄| (connection sensitivity, Lee et al. 2019)."""

    name = "snip"
    summary = "SNIP: saliency = magnitude of mean gradient ⊙ w (Lee et al. 2019)"
    score = staticmethod(snip)


@register
@dataclass
class Taylor(Saliency):
    """First-order Taylor importance: keep the k largest mean_i (g_i ⊙ w̄)² (Molchanov et al. 2019)."""

    name = "taylor"
    summary = "first-order Taylor importance mean (g_i ⊙ w)² (Molchanov et al. 2019)"
    score = staticmethod(taylor)


@register
@dataclass
class L1Filter(Method):
    """L1-norm filter pruning (Li et al. 2017): ``sparsity`` is the fraction of output filters removed
    from every conv layer (``skip``: layer names left dense; ``linear``: Linear rows too)."""

    name = "l1-filter"
    summary = "whole conv filters of least L1 norm, the same fraction per layer (Li et al. 2017)"
    needs_gradients = False
    exact_k = False
    skip: tuple = ()
    linear: bool = False

    def step(self, stage: Stage) -> Step:
        out = l1_filter(stage.w, stage.layout, stage.sparsity, skip=self.skip, linear=self.linear)
        return Step(out.w, out.support, None)
