"""Channel/neuron pruning guided by the spectral radius of each channel's Hessian block.

In the spirit of HAP (Yu et al., WACV 2022, "Hessian-Aware Pruning and Optimal Neural
Implant"), which weighs a structure by the *trace* of its Hessian block; here the *spectral
radius* is used. The variables G of channel c of a group (see :func:`structured.channel_groups`)
are the producer's output row c and the consumer's input column c (the coordinates of
:func:`structured.weight_groups`, as in :mod:`chita_minimal.structure.sosp`; the channel's BN entries
are left out: once its consumer column is zero they no longer affect the loss). Removing the
channel, w_G → 0, changes the loss at a minimum by about

    ½ w_Gᵀ H_GG w_G  ≤  ½ ρ(H_GG) ‖w_G‖²  =:  s_G,

with ρ the spectral radius of the diagonal block H_GG. The score s_G is that upper bound: the
worst case over all directions inside the group, so it stays meaningful when the weights move
during fine-tuning, whereas :func:`structured.taylor2_scores` takes the actual quadratic term.

Curvature:

- ``"fisher"``: H ≈ XᵀX/n with X (n × p) the gradient rows of :func:`fisher.gradients`, so
  ρ(H_GG) = σ_max(X_G)²/n exactly (batched matrix 2-norm of the n × |G| slices).
- ``"hessian"``: the exact Hessian of the mean loss on the same n·batch_size samples, ρ(H_GG)
  from Hessian-vector products (``torch.func``: reverse-over-reverse, the gradient's graph is
  built once and each product is one backward pass through it) by power iteration with
  Rayleigh–Ritz on the Krylov space of its iterates (Lanczos with full reorthogonalisation),
  one channel at a time: a product with a vector spanning several channels would mix in the
  cross blocks H_GG'. ``iterations`` products per channel (fewer when |G| is smaller, then the
  result is exact), each a double-backward pass over all samples at once: for small models only
  (MLPNet, tiny nets); more than ``max_hvps`` products in all is refused.

    scores = spectral_scores(model, calib, n_grads=128)             # group → (channels,)
    keep, frac = structured.select(model, scores, 0.5)
    report = cm.shrink(model, calib, 0.5, "spectral", n_grads=128)  # a ChannelReport
    report.model, report.keep, report.achieved                      # small model, kept channels, FLOPs removed
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp

from chita_minimal.network import fisher
from chita_minimal.network.params import layout
from chita_minimal.structure.channels import ChannelReport, channel_groups, weight_groups
from chita_minimal.structure.sosp import group_weight_names
from chita_minimal.utils import check_int, deprecated, renamed

CURVATURES = ("fisher", "hessian")


def _split(idx, owner, groups):
    """Per group name: the (C, |G|) coordinates of its channels (equal sizes within a group)."""
    return {name: torch.stack([ix for ix, o in zip(idx, owner) if o == name]) for name in groups}


def _fisher_radii(model, dataset, n_grads, batch_size, seed, names, residual=False, example_inputs=None):
    sample = fisher.gradients(model, dataset, n_grads, batch_size=batch_size, names=names, seed=seed, progress=False)
    X = sample.X  # (n, p)
    idx, owner = weight_groups(model, sample.layout, residual=residual, example_inputs=example_inputs)
    out = {}
    for name, ix in _split(idx, owner, channel_groups(model, example_inputs, residual=residual)).items():
        XG = X[:, ix.to(X.device).reshape(-1)].view(X.shape[0], *ix.shape).transpose(0, 1)  # (C, n, |G|)
        out[name] = torch.linalg.matrix_norm(XG.double(), ord=2) ** 2 / X.shape[0]  # σ_max² / n
    return out, sample.layout


def top_abs_eigenvalue(matvec, dim: int, iterations: int, generator: torch.Generator, *,
                       dtype=torch.float64, device=None) -> float:
    """max |λ| of a symmetric dim×dim operator given by ``matvec`` (k = min(iterations, dim) products).

    Power iteration whose iterates q, Hq, H²q, … are orthonormalised (twice, Gram–Schmidt) into
    Q; the estimate is the largest |Ritz value| of QᵀHQ (Lanczos with full reorthogonalisation).
    It never exceeds the true radius and is exact when k = dim or the Krylov space is invariant.
    """
    k_max = min(iterations, dim)
    Q = torch.zeros(dim, k_max, dtype=dtype, device=device)
    HQ = torch.zeros_like(Q)
    q = torch.randn(dim, generator=generator, dtype=dtype).to(device)
    q = q / q.norm()
    k = 0
    while k < k_max:
        Q[:, k] = q
        HQ[:, k] = matvec(q)
        k += 1
        r = HQ[:, k - 1].clone()
        for _ in range(2):
            r -= Q[:, :k] @ (Q[:, :k].T @ r)
        nr = float(r.norm())
        if nr <= 1e-12 * max(float(HQ[:, k - 1].norm()), 1e-300):
            break  # invariant subspace: its Ritz values are exact eigenvalues
        q = r / nr
    M = Q[:, :k].T @ HQ[:, :k]
    return float(torch.linalg.eigvalsh(0.5 * (M + M.T)).abs().max())


def _hessian_radii(model, dataset, n_grads, batch_size, seed, names, iterations, max_hvps, residual=False,
                   example_inputs=None):
    lay = layout(model, names)
    idx, owner = weight_groups(model, lay, residual=residual, example_inputs=example_inputs)
    hvps = sum(min(iterations, len(ix)) for ix in idx)
    if hvps > max_hvps:
        raise ValueError(f"the hessian curvature needs {hvps} Hessian-vector products "
                         f"({len(idx)} channels × up to {iterations} iterations), more than max_hvps = {max_hvps}; "
                         "use curvature='fisher' for this model, or raise max_hvps")
    N = n_grads * batch_size
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"dataset must be indexable with a length (e.g. a TensorDataset), got {type(dataset).__name__}")
    if len(dataset) < N:
        raise ValueError(f"dataset has {len(dataset)} samples but n_grads·batch_size = {N} are needed")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=gen)[:N].view(1, N)  # the samples fisher.gradients draws
    out = {name: [] for name in channel_groups(model, example_inputs, residual=residual)}
    with fisher.prepared(model, None) as dev:  # eval mode (BN running statistics), modes restored
        prms = dict(model.named_parameters())
        dtype = prms[lay.names[0]].dtype
        x, y = fisher.load_samples(dataset, order, dev, dtype)
        x, y = x[0], y[0]  # (N, ...), (N,)
        train = {k: prms[k].detach() for k in lay.names}
        const = {k: t.detach() for k, t in prms.items() if k not in train}
        const.update(dict(model.named_buffers()))
        grad_fn = grad(lambda tr: F.cross_entropy(functional_call(model, (tr, const), (x,)), y))
        _, hvp_fn = vjp(grad_fn, train)  # v ↦ vᵀH = Hv: one backward pass through the gradient's graph

        for ix, name in zip(idx, owner):
            ix = ix.to(dev)

            def hvp(v, ix=ix):  # H_GG v: H (E_G v), restricted to G
                u = torch.zeros(lay.p, dtype=dtype, device=dev)
                u[ix] = v.to(dtype)
                tangent = {k: u[lay.span(k)].view(s) for k, s in zip(lay.names, lay.shapes)}
                Hu = hvp_fn(tangent)[0]
                return torch.cat([Hu[k].reshape(-1) for k in lay.names])[ix].double()

            out[name].append(top_abs_eigenvalue(hvp, len(ix), iterations, gen, device=dev))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}, lay


@renamed(n="n_grads")
def spectral_radii(model: nn.Module, dataset, n_grads: int, *, curvature: str = "fisher", seed: int = 0,
                   iterations: int = 20, batch_size: int = 1, max_hvps: int = 5000, residual: bool = False,
                   example_inputs=None) -> dict[str, torch.Tensor]:
    """ρ(H_GG) of every channel: dict group → (channels,) float64 on the CPU (see the module docstring).

    ``n_grads`` rows of ``batch_size`` samples drawn with ``seed`` (as :func:`fisher.gradients`; ``n``
    is the deprecated old name of ``n_grads``); ``iterations`` and ``max_hvps`` matter for
    ``curvature="hessian"`` only. ``residual``, ``example_inputs``: as for
    :func:`~chita_minimal.structure.channels.channel_groups` (a channel's coordinates are its rows of every
    producer and columns of every consumer).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    check_int("n_grads", n_grads)
    check_int("batch_size", batch_size)
    check_int("seed", seed, None)
    iterations = check_int("iterations", iterations)
    max_hvps = check_int("max_hvps", max_hvps)
    names = group_weight_names(model, residual=residual, example_inputs=example_inputs)
    if curvature == "fisher":
        rho, _ = _fisher_radii(model, dataset, n_grads, batch_size, seed, names, residual, example_inputs)
    else:
        rho, _ = _hessian_radii(model, dataset, n_grads, batch_size, seed, names, iterations, max_hvps, residual,
                                example_inputs)
    return {k: v.cpu() for k, v in rho.items()}


@renamed(n="n_grads")
def spectral_scores(model: nn.Module, dataset, n_grads: int, *, curvature: str = "fisher", seed: int = 0,
                    iterations: int = 20, batch_size: int = 1, max_hvps: int = 5000, residual: bool = False,
                    example_inputs=None) -> dict[str, torch.Tensor]:
    """s_G = ½ ρ(H_GG) ‖w_G‖² per channel: dict group → (channels,) float64 CPU, for :func:`select`.

    It bounds the quadratic loss change ½ w_Gᵀ H_GG w_G of removing the channel from above.
    Arguments as :func:`spectral_radii` (``n``: the deprecated old name of ``n_grads``).
    """
    rho = spectral_radii(model, dataset, n_grads, curvature=curvature, seed=seed, iterations=iterations,
                         batch_size=batch_size, max_hvps=max_hvps, residual=residual, example_inputs=example_inputs)
    lay = layout(model, group_weight_names(model, residual=residual, example_inputs=example_inputs))
    w = torch.cat([model.get_parameter(k).detach().reshape(-1) for k in lay.names]).double()
    idx, owner = weight_groups(model, lay, residual=residual, example_inputs=example_inputs)
    out = {}
    for name, ix in _split(idx, owner, rho).items():
        sq = (w[ix.to(w.device)] ** 2).sum(1).cpu()  # ‖w_G‖², (C,)
        out[name] = 0.5 * rho[name] * sq
    return out


def _spectral_prune(model: nn.Module, dataset, fraction: float, *, n_grads: int, curvature: str = "fisher",
                    seed: int = 0, iterations: int = 20, batch_size: int = 1, max_hvps: int = 5000,
                    input_shape=None) -> ChannelReport:
    """:func:`spectral_scores` → :func:`select` (≤ ``fraction`` of the FLOPs removed) → ``shrink``: what
    ``cm.shrink(model, data, fraction, method="spectral", n_grads=..., ...)`` does. Returns its
    :class:`~chita_minimal.structure.channels.ChannelReport`; ``model`` itself is not modified."""
    from chita_minimal.structure.methods import shrink as shrink_model

    return shrink_model(model, dataset, fraction, "spectral", n_grads=n_grads, curvature=curvature, seed=seed,
                        iterations=iterations, batch_size=batch_size, max_hvps=max_hvps, input_shape=input_shape)


# the per-family entry point before cm.shrink (deprecated; ``n``: the older name of ``n_grads``)
spectral_prune = renamed(n="n_grads")(deprecated(
    _spectral_prune, "spectral_prune", "cm.shrink(model, data, fraction, method='spectral', n_grads=...)"))
