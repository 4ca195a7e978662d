"""Tests of the saliency baselines (SNIP, Taylor, L1-norm filters) against direct computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chita_minimal.network.params import flatten, layout, split
from chita_minimal.methods.saliency import l1_filter, snip, taylor

F64 = torch.float64


def _instance(n=15, p=30, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=F64).to(dtype), torch.randn(p, generator=g, dtype=F64).to(dtype)


def _topk_mask(score, k):
    """Reference top-k: sort by (−score, index), keep the first k."""
    order = sorted(range(len(score)), key=lambda q: (-float(score[q]), q))
    mask = torch.zeros(len(score), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_snip_and_taylor_equal_direct_scores(dtype):
    X, w = _instance(dtype=dtype)
    n, p = X.shape
    snip_score = torch.stack([abs(sum(X[i, q] for i in range(n)) / n * w[q]) for q in range(p)])
    taylor_score = torch.stack([sum((X[i, q] * w[q]) ** 2 for i in range(n)) / n for q in range(p)])
    for fn, score in [(snip, snip_score), (taylor, taylor_score)]:
        for k in [1, 7, 29, 30]:
            out, support = fn(X, w, k)
            assert support.dtype == torch.bool and int(support.sum()) == k
            assert torch.equal(support, _topk_mask(score, k))
            assert torch.equal(out, torch.where(support, w, torch.zeros_like(w))) and out.dtype == dtype


def test_taylor_is_diagonal_fisher_times_w_squared_and_ties_keep_lower_index():
    X, w = _instance(seed=1)
    F = X.T @ X / X.shape[0]
    assert torch.equal(taylor(X, w, 10).support, _topk_mask(F.diagonal() * w**2, 10))
    # equal scores: the lower index is kept
    X = torch.ones(4, 6, dtype=F64)
    w = torch.tensor([1.0, -2.0, 1.0, 2.0, -1.0, 1.0], dtype=F64)
    for fn in (snip, taylor):
        assert fn(X, w, 3).support.tolist() == [True, True, False, True, False, False]


def test_saliency_input_errors():
    X, w = _instance()
    for fn in (snip, taylor):
        with pytest.raises(ValueError, match="columns"):
            fn(X, w[:-1], 3)
        with pytest.raises(ValueError, match="number of weights kept"):
            fn(X, w, 0)
        with pytest.raises(ValueError, match="number of weights kept"):
            fn(X, w, 31)
        with pytest.raises(ValueError, match="NaN"):
            fn(X * float("nan"), w, 3)
        with pytest.raises(TypeError, match="must match"):
            fn(X, w.float(), 3)


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1, bias=False), nn.Flatten(),
                         nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_l1_filter_removes_whole_filters_with_exact_counts(sparsity):
    net = _convnet()
    lay = layout(net)
    w_bar = flatten(net, lay)
    w, support = l1_filter(w_bar, lay, sparsity)
    assert torch.equal(w, torch.where(support, w_bar, torch.zeros_like(w_bar)))
    parts, masks, dense = split(lay, w), split(lay, support), split(lay, w_bar)
    for name, out in [("0.weight", 8), ("2.weight", 5)]:
        W, M, D = parts[name].reshape(out, -1), masks[name].reshape(out, -1), dense[name].reshape(out, -1)
        removed = ~M.all(1)
        assert torch.all(M.all(1) | ~M.any(1))  # each filter all kept or all removed
        assert torch.all(W[removed] == 0) and torch.equal(W[~removed], D[~removed])
        assert int(removed.sum()) == out - max(1, round((1 - sparsity) * out))
        norms = D.abs().sum(1)
        if removed.any():
            assert norms[removed].max() <= norms[~removed].min()  # the smallest L1 norms go
    for name in ["4.weight", "6.weight"]:  # Linear layers stay dense by default
        assert masks[name].all()
    removed_fraction = 1 - support.double().mean()
    assert float(removed_fraction) == pytest.approx(sum((out - max(1, round((1 - sparsity) * out))) * per
                                                        for out, per in [(8, 27), (5, 8)]) / lay.p)


def test_l1_filter_linear_rows_skip_and_errors():
    net = _convnet()
    lay = layout(net)
    w_bar = flatten(net, lay)
    _, support = l1_filter(w_bar, lay, 0.5, linear=True, skip=["6.weight", "0.weight"])
    masks = split(lay, support)
    assert masks["0.weight"].all() and masks["6.weight"].all()
    assert int((~masks["4.weight"].all(1)).sum()) == 7 - max(1, round(0.5 * 7))
    assert int((~masks["2.weight"].reshape(5, -1).all(1)).sum()) == 5 - max(1, round(0.5 * 5))
    with pytest.raises(ValueError, match="not in the layout"):
        l1_filter(w_bar, lay, 0.5, skip=["fc.weight"])
    with pytest.raises(ValueError, match="layout has p"):
        l1_filter(w_bar[:-1], lay, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        l1_filter(w_bar, lay, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        l1_filter(w_bar * float("nan"), lay, 0.5)
