"""SOSP-H-style second-order structured saliency (Nonnenmacher et al., ICLR 2022, "SOSP:
Efficiently capturing global correlations by second-order structured pruning").

For each channel c of a prunable group (see :func:`structured.channel_groups`), its variable set
G is the producer's output row c and the consumer's input column c (as in
:func:`structured.group_chita`; :func:`structured.weight_groups` gives the coordinates),
with indicator m_G ∈ {0,1}^p over the p weights w of all producers/consumers. With the rows
X (n×p) of :func:`fisher.gradients`, the mean gradient ḡ = Xᵀ1/n and the empirical Fisher
F = XᵀX/n as the Hessian approximation, the score implemented here is exactly::

    s_G = | (w ⊙ m_G)ᵀ ḡ |  +  ½ · | (w ⊙ m_G)ᵀ (F w) |,    F w = Xᵀ (X w) / n.

Why this captures correlations across groups: (F w)_G = Σ_H F_{G,H} w_H sums over *every*
group H of the network (and any coordinate in no group), so s_G contains all cross terms
w_Gᵀ F_{G,H} w_H, not just the within-group block w_Gᵀ F_{G,G} w_G that
:func:`structured.taylor2_scores` (OBD-style) keeps. It is the second-order term of the
loss change when the removal of G is weighed against the full weight vector (SOSP-H's
Hessian-vector form), rather than against G alone. (The absolute values are taken per term; the paper's exact
normalisation of the two terms may differ — this is our reading, not a copy of its code.)

Cost: F is never formed. F w costs two mat-vecs with X (O(np) time, O(n + p) extra memory);
the per-channel sums are one ``index_add`` over the concatenated group coordinates. No
p×p tensor (nor any tensor larger than X) is created after X is built.
Groups overlap for MLPNet (fc2's weights are columns of fc1-channels and rows of
fc2-channels); each channel simply sums over its own coordinates.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from chita_minimal.network import fisher
from chita_minimal.structure.channels import channel_groups, weight_groups
from chita_minimal.utils import renamed


def group_weight_names(model: nn.Module, *, residual: bool = False, example_inputs=None) -> list[str]:
    """The weight names of every producer and consumer of every channel group, each once, in group order (a
    group may have several: a depthwise conv with its pointwise producer, the convs of a residual stream)."""
    names = []
    for gr in channel_groups(model, example_inputs, residual=residual).values():
        for pname in [f"{m}.weight" for m in gr.producers + gr.consumers]:
            if pname not in names:
                names.append(pname)
    return names


def group_param_names(model: nn.Module) -> list[str]:
    """Deprecated old name of :func:`group_weight_names` (kept for one release)."""
    warnings.warn("group_param_names(...) is now group_weight_names(...)", DeprecationWarning, stacklevel=2)
    return group_weight_names(model)


def sosp_from_sample(model: nn.Module, sample: fisher.FisherSample, *, residual: bool = False,
                     example_inputs=None) -> dict[str, torch.Tensor]:
    """SOSP-H scores from an existing :class:`fisher.FisherSample` whose layout covers the
    producer and consumer weights of every channel group (see module docstring for the formula). A channel's
    coordinates are its rows of every producer and its columns of every consumer, through the group's index maps
    (:func:`~chita_minimal.structure.channels.weight_groups`); ``residual``, ``example_inputs``: as for
    :func:`~chita_minimal.structure.channels.channel_groups`.

    Returns dict group name → (channels,) scores (float64, CPU), as :func:`structured.select` wants.
    """
    if not isinstance(sample, fisher.FisherSample):
        raise TypeError(f"sample must be a fisher.FisherSample, got {type(sample).__name__}")
    if sample.sharded:
        raise ValueError("sosp_from_sample needs all n rows of X (an unsharded sample)")
    lay = sample.layout
    missing = [p for p in group_weight_names(model, residual=residual, example_inputs=example_inputs)
               if p not in lay.names]
    if missing:
        raise ValueError(f"sample lacks parameter(s) {missing} needed by the channel groups")
    X = sample.X  # (n, p)
    w = torch.cat([model.get_parameter(p).detach().reshape(-1) for p in lay.names]).to(X)
    if w.numel() != X.shape[1]:
        raise ValueError(f"model weights ({w.numel()}) do not match the sample's p = {X.shape[1]}")
    Fw = X.T.mv(X.mv(w)) / X.shape[0]  # (p,) Fisher-vector product, F = XᵀX/n never formed
    first = (w * sample.mean_grad.to(X)).double()  # (p,) w ⊙ ḡ
    second = (w * Fw).double()  # (p,) w ⊙ Fw
    idx, owner = weight_groups(model, lay, residual=residual, example_inputs=example_inputs)
    gid = torch.repeat_interleave(torch.arange(len(idx)), torch.tensor([len(ix) for ix in idx])).to(X.device)
    flat = torch.cat(idx).to(X.device)
    s1 = torch.zeros(len(idx), dtype=torch.float64, device=X.device).index_add_(0, gid, first[flat])
    s2 = torch.zeros(len(idx), dtype=torch.float64, device=X.device).index_add_(0, gid, second[flat])
    s = (s1.abs() + 0.5 * s2.abs()).cpu()  # (channels of all groups,)
    out, j = {}, 0
    for name in channel_groups(model, example_inputs, residual=residual):
        c = owner.count(name)
        out[name] = s[j:j + c].clone()
        j += c
    return out


@renamed(n="n_grads")
def sosp_scores(model: nn.Module, dataset, n_grads: int, *, seed: int = 0, batch_size: int = 1,
                residual: bool = False, example_inputs=None) -> dict[str, torch.Tensor]:
    """SOSP-H saliency of every channel of any traceable model: dict group → (channels,) scores.

    Draws X (n×p) with :func:`fisher.gradients` (``n_grads`` rows of ``batch_size`` samples, permutation
    seeded with ``seed``) restricted to the producer and consumer weights of all channel groups,
    then applies :func:`sosp_from_sample`. Low score = cheap to remove; feed the result to
    :func:`structured.select`. ``residual``, ``example_inputs``: as for
    :func:`~chita_minimal.structure.channels.channel_groups` (models other than the package's need
    ``example_inputs``); errors of :func:`fisher.gradients` for bad ``n_grads`` / ``batch_size`` / ``seed`` /
    ``dataset``. ``n`` is the deprecated old name of ``n_grads``.
    """
    names = group_weight_names(model, residual=residual, example_inputs=example_inputs)
    sample = fisher.gradients(model, dataset, n_grads, batch_size=batch_size, names=names, seed=seed, progress=False)
    return sosp_from_sample(model, sample, residual=residual, example_inputs=example_inputs)
