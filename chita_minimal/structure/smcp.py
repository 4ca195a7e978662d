"""SMCP: soft channel masks under a FLOP or latency budget (Humble, Shen, Latorre, Darve & Alvarez,
"Soft Masking for Cost-Constrained Channel Pruning", ECCV 2022).

Channels of the groups of :func:`structured.channel_groups` (ResNetCifar inner block channels, MLPNet hidden
neurons; on any traceable model every group, with all its producers and consumers: a MobileNet channel is a
pointwise filter, its depthwise filter and the next pointwise conv's column) are pruned *during* fine-tuning by a
soft mask: a masked channel is taken
out of the forward pass but its weights are kept, and every ``update_every`` steps the mask is
re-computed from channel importances as the solution of a global knapsack, so a pruned channel
can come back:

    max  Σ_g  Σ_{c kept in g} I_c    s.t.   Σ_g n_g·cost_g ≤ B(t),   1 ≤ n_g ≤ C_g,

n_g = channels kept in group g (the n_g most important ones), cost_g = cost of one channel of g
(FLOPs or measured latency, :func:`channel_costs`), B(t) = the cost left to the groups by the
budget at step t. As in the paper the budget is *ramped*: the removed fraction follows Zhu &
Gupta's cubic schedule from 0 to ``fraction`` over the first ``ramp`` of the steps
(:func:`ramp_target`), so each update removes only a few channels; after ``freeze`` of the steps
the mask is chosen one last time (at the final budget) and made permanent.

    costs = channel_costs(model, "flops")                   # group -> MACs per channel
    keep = knapsack_keep(importance, costs, 0.5, total=structured.flops(model, (3, 32, 32)))
    res = smcp_train(model, train, 0.5, epochs=10, lr=0.05, update_every=100, ramp=0.5, freeze=0.75)
    cm.recalibrate_bn(res.model, train)     # BN statistics of the small model: the caller's job
    res.model, res.keep, res.achieved, res.losses, res.stages, res.seconds

Masking. A 0/1 gate m_c multiplies channel c's activation at the input of every consumer of the group, through
the group's index maps (:class:`ChannelGates`, forward pre-hooks; the paper, too, masks "input channels"): the same
function as the shrunk model, with every weight kept in place. A masked channel's weights get no
loss gradient, and they are *parked*: held at their values (no weight decay, momentum reset), so
a channel comes back exactly as it left. ``soft=False`` is the baseline at the same schedule:
removed channels never return (excluded from later knapsacks) and are held at exactly 0.

Importance: the loss increase of taking channel c out, I_c = L(m_c = 0) − L(m_c = 1), from a
second-order expansion along the gate at its current value, with the gradient g_c = ∂L/∂m_c and
the curvature ≈ the gate's empirical Fisher F_c (Theis et al. 2018, Fisher pruning):

    I_c = max(0, −g_c + F_c/2)  (kept, m_c = 1),        I_c = max(0, −g_c − F_c/2)  (masked, m_c = 0),

g and F averaged with an exponential moving average (factor ``ema``) over the steps since the
last update (:func:`toggle_importance`). For a kept ResNet channel g_c = γ_c ∂L/∂γ_c + β_c ∂L/∂β_c,
Molchanov's BN form. Why not the paper's squared first-order Taylor score g_c² (Molchanov et al.
2019, there (Σ W·∂L/∂W)² over the consumer's input channel)? It measures different things on the
two sides: ≈ 0 for a kept channel at a minimum, where the gradient vanishes, but h² for the same
channel just removed (g = −h, h the curvature), so freshly removed channels out-score kept ones
and return en masse — all the more with the paper's straight-through updates of masked weights,
which move a masked column along −∂L/∂W open loop and inflate its score at every masked step.
On ResNet20 / CIFAR-10 fine-tuning (a few epochs, 50 % FLOPs) that returned 40–170 channels at
every update and cost 25–45 points of accuracy against masks without regrowth. The toggle
estimate is the same quantity from both sides: a channel removed at a minimum (g = 0, I = h/2)
has g = −h right after and scores h − h/2 = h/2 again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from chita_minimal.network import params
from chita_minimal.network.loop import EpochBatches, cosine_lr, forward_backward, setup
from chita_minimal.network.measure import latency as _latency
from chita_minimal.structure import channels as structured
from chita_minimal.structure.graph import example_inputs_for
from chita_minimal.utils import check_int as _int
from chita_minimal.utils import check_fraction, check_number, model_mode, renamed

COSTS = ("flops", "latency")


def _shape(model, input_shape, example_inputs=None):
    return structured._input_shape(model, input_shape, example_inputs)


def _groups(model, input_shape, example_inputs=None):
    """The channel groups, traced on ``example_inputs`` (default: one zero input of ``input_shape``)."""
    return structured.channel_groups(model, example_inputs_for(model, example_inputs, input_shape))



# -----------------------------------------------------------------------------
# cost of one channel per group


def _producer_inputs(model, groups, input_shape) -> dict[str, tuple]:
    """Shape (without batch) of each producer's input, from one zero forward pass in eval mode."""
    shapes, hooks = {}, []
    for gr in groups.values():
        m = model.get_submodule(gr.producer)
        hooks.append(m.register_forward_hook(
            lambda mod, inp, out, name=gr.producer: shapes.__setitem__(name, tuple(inp[0].shape[1:]))))
    try:
        structured.dry_run(model, input_shape)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _pair(model, gr, width: int, input_shape) -> nn.Module:
    """producer (→ BN) → ReLU → consumer with ``width`` channels in between: the model's layers with all
    but the first ``width`` channels removed by :func:`structured.shrink` (the model is untouched)."""
    P, Q = model.get_submodule(gr.producer), model.get_submodule(gr.consumer)
    layers = [P] + ([model.get_submodule(gr.bn)] if gr.bn is not None else []) + [nn.ReLU(), Q]
    keep = {"0": torch.arange(P.weight.shape[0]) < width}  # group "0": the channels between P and Q
    x = torch.zeros(1, *input_shape, dtype=P.weight.dtype, device=P.weight.device)
    return structured.shrink(nn.Sequential(*layers), keep, x).eval()


def channel_costs(model: nn.Module, kind: str = "flops", input_shape=None, *, batch_size: int = 32,
                  repeats: int = 10, widths: int = 4, warmup: int = 2, device=None, seed: int = 0,
                  example_inputs=None) -> dict:
    """Cost of keeping ONE channel of each group: dict group → MACs (int) or milliseconds (float).

    ``kind="flops"``: the MACs at ONE input of shape ``input_shape`` (default the model's, e.g. (3, 32, 32)) that
    removing one channel of the group saves, all other widths full (:class:`structured.FlopModel`): with one
    producer P (MACs u_P·in_P·out_P, see :func:`structured.flops`) and one consumer Q (u_Q·in_Q·out_Q)
    that is u_P·in_P + u_Q·out_Q; with several (a depthwise filter, a flatten → Linear consumer reading HW
    columns per channel) the sum over all of them. On ResNetCifar every in_P and out_Q is
    a skip width that never changes, so the cost model is exact:
    flops(shrink(model, keep)) = flops(model) − Σ_removed cost_g. On MLPNet, fc2 is the consumer of
    group fc1 AND the producer of group fc2, so its u·n_fc1·n_fc2 MACs couple the groups: the costs
    are the exact marginals at the current widths and the identity is off by + r_fc1·r_fc2 (removed
    neurons of both groups; :func:`smcp_train` corrects for it).

    ``kind="latency"``: a measured lookup table. For each group the pair producer (→ BN) → ReLU →
    consumer (weights sliced from the model) is timed with :func:`measure.latency` (eval mode,
    ``batch_size`` inputs of the producer's input shape, median of ``repeats`` runs after ``warmup``)
    at ``widths`` evenly spaced widths C/k … C; the least-squares slope (ms per channel, clipped at 0)
    is the cost. Latency is only approximately linear in the width (kernel choice, vectorisation
    and cache effects make it a staircase, and CPU timings are noisy), so a latency budget holds
    for this linear model, not necessarily for a re-measured latency. It needs groups of one producer and one
    consumer (ValueError otherwise: use ``kind="flops"``). ``example_inputs``: what a model other than the
    package's is called with (for tracing), as for :func:`structured.channel_groups`.
    """
    if kind not in COSTS:
        raise ValueError(f"kind must be one of {COSTS}, got {kind!r}")
    input_shape = _shape(model, input_shape, example_inputs)
    if kind == "flops":  # (FlopModel traces the groups; TypeError for untraceable models)
        fm = structured.FlopModel(model, input_shape, example_inputs=example_inputs)
        full = {g: gr.channels for g, gr in fm.groups.items()}
        return {g: fm.total - fm(dict(full, **{g: full[g] - 1})) for g in full}
    groups = _groups(model, input_shape, example_inputs)
    for g, gr in groups.items():
        if len(gr.producers) != 1 or len(gr.consumers) != 1 or gr.index:
            raise ValueError(f"cost='latency' times each group's producer → consumer pair; group {g!r} has "
                             f"producers {list(gr.producers)} and consumers {list(gr.consumers)}: use cost='flops'")
    _int("batch_size", batch_size)
    _int("repeats", repeats)
    _int("widths", widths, 2)
    _int("warmup", warmup, 0)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    shapes = _producer_inputs(model, groups, input_shape)
    out = {}
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # module init draws numbers
        for g, gr in groups.items():
            C = model.get_submodule(gr.producer).weight.shape[0]
            ws = sorted({max(1, round(C * (k + 1) / widths)) for k in range(widths)})
            shape = shapes[gr.producer]
            ms = [_latency(_pair(model, gr, w, shape).to(dev), shape, batch_size=batch_size,
                           repeats=repeats, warmup=warmup, device=dev, seed=seed).median_ms for w in ws]
            if len(ws) == 1:  # a group of one channel: the time of that channel
                out[g] = max(ms[0], 0.0)
                continue
            w_mean, t_mean = sum(ws) / len(ws), sum(ms) / len(ms)
            slope = sum((w - w_mean) * (t - t_mean) for w, t in zip(ws, ms)) / sum((w - w_mean) ** 2 for w in ws)
            out[g] = max(slope, 0.0)
    return out


# -----------------------------------------------------------------------------
# the knapsack


@renamed(budget_fraction="fraction")
def knapsack_keep(importance: dict, costs: dict, fraction: float, *, total: float | None = None,
                  resolution: int = 2000) -> dict[str, torch.Tensor]:
    """Keep masks maximising the kept importance under a cost budget (multiple-choice knapsack, exact DP).

    importance: group → (C_g,) scores; costs: group → cost of one channel (≥ 0, :func:`channel_costs`).
    Within a group the kept channels are the n_g most important (ties: lower index), so the choice
    is n_g ∈ {1, …, C_g} per group, of value V_g(n) = sum of the n largest scores and cost n·cost_g.
    The budget removes at least ``fraction`` of ``total`` (default the prunable cost
    Σ_g C_g·cost_g; :func:`smcp_train` passes the whole model's FLOPs, the denominator of
    :func:`structured.select`): the groups may keep

        B = Σ_g C_g·cost_g − fraction · total.

    (``select`` removes *at most* its fraction, greedily; here the kept cost is capped, as in SMCP.)
    DP over the budget in units of B/``resolution``: weight of n channels = ⌈n·cost_g/unit⌉ (rounded
    UP, so Σ n_g·cost_g ≤ B always), dp[b] = best value within b units, O(G·C·resolution).
    The result is optimal for the rounded weights, hence exactly optimal when every n·cost_g is a
    multiple of the unit; rounding can leave up to G units of the budget unused.
    Returns group → bool mask (C_g,) on the CPU, True = kept. ValueError if even one channel per
    group does not fit. ``budget_fraction`` is the deprecated old name of ``fraction``.
    """
    fraction = check_fraction("fraction", fraction)
    resolution = _int("resolution", resolution)
    if not isinstance(importance, dict) or not importance:
        raise TypeError("importance must be a non-empty dict group name -> (channels,) tensor")
    if not isinstance(costs, dict) or set(costs) != set(importance):
        raise ValueError(f"costs must be a dict with the same groups as importance {list(importance)}")
    names = list(importance)
    values, cost, orders = [], [], []
    for g in names:
        s = importance[g]
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.numel() == 0 or not bool(torch.isfinite(s).all()):
            raise ValueError(f"importance[{g!r}] must be a non-empty finite 1-D tensor")
        order = torch.sort(s.detach().double().cpu(), descending=True, stable=True)
        orders.append(order.indices)
        values.append(order.values.cumsum(0).numpy())  # V_g(n) = values[n - 1]
        cost.append(check_number(f"costs[{g!r}]", costs[g], 0))
    prunable = sum(len(v) * c for v, c in zip(values, cost))
    total = prunable if total is None else check_number("total", total, 0, low_open=True)
    B = prunable - fraction * total
    if B < sum(cost):
        raise ValueError(f"fraction={fraction} leaves a cost of {B:.6g} to the channel groups, "
                         f"less than the {sum(cost):.6g} of keeping one channel per group")
    if B >= prunable:  # everything fits (e.g. all costs 0)
        return {g: torch.ones(len(v), dtype=torch.bool) for g, v in zip(names, values)}
    unit = B / resolution
    weights = [np.ceil(np.arange(1, len(v) + 1) * (c / unit)).astype(np.int64) for v, c in zip(values, cost)]
    dp = np.zeros(resolution + 1)  # best value of the groups so far within b units
    choice = np.zeros((len(names), resolution + 1), dtype=np.int64)  # n_g taken at budget b
    for gi, (v, w) in enumerate(zip(values, weights)):
        new = np.full(resolution + 1, -np.inf)
        for n in range(1, len(v) + 1):
            wn = int(w[n - 1])
            if wn > resolution:
                break
            cand = dp[:resolution + 1 - wn] + v[n - 1]
            better = cand >= new[wn:]  # ties: more channels (fill the budget)
            new[wn:][better] = cand[better]
            choice[gi, wn:][better] = n
        dp = new
    if not np.isfinite(dp[resolution]):
        raise ValueError(f"one channel per group does not fit the budget once costs are rounded up to "
                         f"1/{resolution} of it; increase resolution")
    keep, b = {}, resolution
    for gi in reversed(range(len(names))):
        n = int(choice[gi, b])
        b -= int(weights[gi][n - 1])
        mask = torch.zeros(len(values[gi]), dtype=torch.bool)
        mask[orders[gi][:n]] = True
        keep[names[gi]] = mask
    return {g: keep[g] for g in names}


# -----------------------------------------------------------------------------
# gates, masks and importance


class ChannelGates:
    """0/1 gates m_g on the channels of every group, at the consumer's input, and their gradients.

    Forward pre-hooks replace every consumer's input x (the producer → BN → ReLU activation,
    (N, C_g) or (N, C_g, H, W); through the group's index map when the consumer reads more or other columns) by
    x ⊙ m_g, so the model computes the same function as
    ``structured.shrink(model, keep)`` while every weight stays in place. After a backward pass

        grad[g]   = ∂L/∂m_c = Σ_n γ_{n,c} / N,        fisher[g] = Σ_n γ_{n,c}² / N,     (C_g,)
        γ_{n,c}   = N · Σ_p x[n, c, p] · ∂L/∂(x ⊙ m)[n, c, p]    (p: spatial positions),

    (summed over the group's consumers and over the input columns that carry channel c), γ_n = sample n's term of
    the batch gate gradient, as a per-sample loss gradient (= ∂ℓ_n/∂m_c for
    L = mean_n ℓ_n when no BatchNorm after the gate couples the samples), so ``fisher`` is the
    empirical Fisher of the gate (Theis et al. 2018, "Faster gaze prediction with dense networks and
    Fisher pruning"), ≈ ∂²L/∂m_c². A masked channel (m_c = 0) is unused — its weights get no loss
    gradient — but its activation x is still computed, so its gate gradient is that of restoring it.

        gates = ChannelGates(model, keep, groups)     # or: with ChannelGates(model, keep) as gates:
        F.cross_entropy(model(x), y).backward()
        gates.grad, gates.fisher
        gates.set(new_keep); gates.remove()
    """

    def __init__(self, model: nn.Module, keep: dict[str, torch.Tensor], groups=None):
        self.model = model
        self.groups = structured.channel_groups(model) if groups is None else groups  # TypeError: untraceable
        self._terms, self._handles = {}, [model.register_forward_pre_hook(lambda mod, inp: self._terms.clear())]
        self.set(keep)
        for g, gr in self.groups.items():
            for q in gr.consumers:  # every reader of the channels, through its index map
                self._handles.append(model.get_submodule(q).register_forward_pre_hook(
                    lambda mod, inp, g=g, q=q: (self._gate(g, q, inp[0]), *inp[1:])))

    @property
    def grad(self) -> dict[str, torch.Tensor]:
        """∂L/∂m_c of every gated group after the last backward pass, summed over the group's consumers."""
        return {g: s.sum(0) for g, s in self._terms.items()}

    @property
    def fisher(self) -> dict[str, torch.Tensor]:
        """The gates' empirical Fisher Σ_n γ_{n,c}²/N after the last backward pass."""
        return {g: (s * len(s)).pow(2).mean(0) for g, s in self._terms.items()}

    def set(self, keep: dict[str, torch.Tensor]) -> None:
        """New gates: 1 where ``keep`` is True (absent groups: all 1)."""
        keep = structured.check_keep(self.model, keep, groups=self.groups)
        ref = next(self.model.parameters())
        self.m = {g: m.to(device=ref.device, dtype=ref.dtype) for g, m in keep.items()}
        self._columns = {(g, q): gr.from_channels(q, self.m[g], 1.0)
                         for g, gr in self.groups.items() for q in gr.consumers}

    def _gate(self, g, q, x):
        y = x * self._columns[(g, q)].view(1, -1, *[1] * (x.dim() - 2))
        if y.requires_grad:
            def record(gy, x=x.detach()):
                s = x * gy if x.dim() == 2 else (x * gy).flatten(2).sum(2)  # (N, in): γ / N per input column
                term = self.groups[g].to_channels(q, s, dim=1)  # the columns of each channel, summed
                self._terms[g] = self._terms[g] + term if g in self._terms else term
            y.register_hook(record)
        return y

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ChannelGates":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def channel_masks(model: nn.Module, keep: dict[str, torch.Tensor], groups=None) -> dict[str, torch.Tensor]:
    """Per-parameter bool masks (True = kept, for :func:`params.apply_masks`) covering everything of
    the removed channels, through the groups' index maps: every producer's rows (weight, bias), every norm's
    weight/bias entries, every consumer's columns."""
    groups = structured.channel_groups(model) if groups is None else groups
    keep = structured.check_keep(model, keep, groups=groups)
    masks = {}

    def cut(name, dim, kept):
        prm = model.get_parameter(name)
        m = masks.setdefault(name, torch.ones(prm.shape, dtype=torch.bool))
        m.mul_(kept.view([-1 if d == dim else 1 for d in range(prm.dim())]))

    for g, gr in groups.items():
        if bool(keep[g].all()):
            continue
        for member, dim in [(p, 0) for p in gr.producers] + [(b, 0) for b in gr.bns] + [(q, 1) for q in gr.consumers]:
            module, kept = model.get_submodule(member), gr.from_channels(member, keep[g], True)
            if dim == 1 or not isinstance(module, nn.modules.batchnorm._NormBase) or module.affine:
                cut(f"{member}.weight", dim, kept)
            if dim == 0 and getattr(module, "bias", None) is not None:
                cut(f"{member}.bias", 0, kept)
    return masks


def toggle_importance(grad: torch.Tensor, fisher: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Loss increase L(m_c = 0) − L(m_c = 1) of taking channel c out, to second order, from either side.

    With the gate's gradient g and curvature h ≈ F (the gate Fisher, :class:`ChannelGates`),
    L(m) ≈ L(m₀) + g·(m − m₀) + ½·h·(m − m₀)², so, clipped at 0,

        kept   (m₀ = 1):  I = −g + ½F,          masked (m₀ = 0):  I = −g − ½F.

    Both are the same quantity, the loss change of toggling the gate, so masked and kept channels
    are comparable: a channel removed at a minimum (g = 0, I = ½h) has g = −h right after, and
    scores I = h − ½h = ½h again. (The squared first-order Taylor score (Molchanov et al. 2019),
    g², is not: ≈ 0 for a kept channel at a minimum, h² for the same channel just removed.)
    """
    return torch.where(kept, -grad + fisher / 2, -grad - fisher / 2).clamp(min=0)


# -----------------------------------------------------------------------------
# training


def ramp_target(step: int, total: int, fraction: float, ramp: float) -> float:
    """Cost fraction to remove after ``step`` of ``total`` steps: Zhu & Gupta's (2017) cubic ramp

        f(t) = fraction · (1 − (1 − t/T)³)  for t < T = ramp·total,     f(t) = fraction  for t ≥ T,

    rising from f(0) = 0, fast at first (when the network is most redundant), flat at T.
    ``ramp=0``: the whole fraction from the first step.
    """
    step, total = _int("step", step, 0), _int("total", total)
    fraction = check_fraction("fraction", fraction)
    ramp = check_number("ramp", ramp, 0, 1)
    T = ramp * total
    return fraction if step >= T else fraction * (1 - (1 - step / T) ** 3)


@dataclass(kw_only=True)
class SMCPResult(structured.ChannelReport):
    """What :func:`smcp_train` did: a :class:`~chita_minimal.structure.channels.ChannelReport` (method "smcp").

    target: the ``fraction`` asked; achieved: FLOPs removed, measured on the shrunk model,
    1 − flops(small)/flops(dense); model: the small model ``shrink(model, keep)``; keep: group → bool
    (C_g,) on the CPU, the final mask; seconds: {"total"}; stages: one dict per mask update (step;
    target = the removed cost fraction asked for, :func:`ramp_target`; removed_fraction = the one of
    the new mask, as cost_fraction; came_back = channels kept again that were masked; removed =
    channels newly masked; kept = channels kept in all; final = the update that froze the mask).
    cost: "flops" or "latency"; cost_fraction: the budgeted cost removed (= achieved for "flops"; for
    "latency" per the linear latency model of :func:`channel_costs`, relative to the modelled latency
    of all groups); losses: mean training cross-entropy of each epoch; frozen_at: the step of the
    final update; soft: soft masks (True) or pruning without regrowth (False); costs: group → cost
    of one channel. ``fraction`` and ``history`` are the old names of ``achieved`` and ``stages``.
    """

    cost: str
    cost_fraction: float
    losses: list[float]
    soft: bool
    frozen_at: int = 0
    costs: dict = field(default_factory=dict, repr=False)

    @property
    def fraction(self) -> float:
        return self.achieved

    @property
    def history(self) -> list[dict]:
        return self.stages

    def _extra_lines(self) -> list[str]:
        came_back = sum(h["came_back"] for h in self.stages)
        loss = f"{self.losses[-1]:.4f}" if self.losses else "–"
        return super()._extra_lines() + [
            f"  {self.cost} cost removed {self.cost_fraction:.4f}; {'soft masks' if self.soft else 'no regrowth'}; "
            f"{len(self.stages)} mask update(s), frozen at step {self.frozen_at}, {came_back} channel(s) came back; "
            f"last epoch loss {loss}"]


def smcp_train(model: nn.Module, train_dataset, fraction: float, epochs: int, *, lr: float, cost: str = "flops",
               update_every: int = 100, ramp: float = 0.5, freeze: float = 0.75, ema: float = 0.9,
               soft: bool = True, batch_size: int = 128, momentum: float = 0.9, weight_decay: float = 5e-4,
               nesterov: bool = True, input_shape=None, resolution: int = 2000,
               latency_options: dict | None = None, device=None, seed: int = 0, progress: bool = False,
               example_inputs=None) -> SMCPResult:
    """SMCP fine-tuning of a network to remove ≥ ``fraction`` of its cost; returns an :class:`SMCPResult`.

    Any traceable model: the package's have default input shapes; another needs ``input_shape`` (one input) or
    ``example_inputs`` (what it is called with), as for :func:`structured.channel_groups`.

    SGD (momentum, Nesterov, weight decay, cosine learning rate from ``lr`` to 0 over all T steps,
    batches from a permutation drawn with ``seed`` + epoch: as :func:`sparse_training.rigl`). The
    model is trained in place. Mask updates (see the module docstring):

    - after every step t with t % ``update_every`` == 0 and t < t_f = round(``freeze``·T) (at least
      1): the mask becomes :func:`knapsack_keep` of the importance averaged since the last update,
      removing ≥ f(t) = :func:`ramp_target` (t, T, fraction, ``ramp``) of the cost;
    - after step t_f: the final update, at the full ``fraction``; from then on the mask is permanent
      (removed channels zeroed and held at 0) for the remaining steps. ``ramp`` ≤ ``freeze``.

    Costs: :func:`channel_costs` (``cost`` "flops": at most (1 − f) of the model's FLOPs stay,
    checked exactly — MLPNet's coupled fc2 term is met by re-solving with the target raised by
    the overshoot; "latency": at most (1 − f) of the modelled latency of the groups,
    ``latency_options`` go to :func:`channel_costs`).

    ``soft=True``: masked channels are parked (held at their values, left out of the forward pass)
    and come back whenever the knapsack keeps them again. ``soft=False``, the baseline at the same
    schedule: removed channels never come back (the knapsack may only choose among the kept ones)
    and are zeroed; with ``ramp=0`` that is one mask chosen at step ``update_every``, then fixed.

    At the end ``small = structured.shrink(model, keep)``, the result's ``model``, computes the same
    function as ``model`` (whose removed channels are 0). BatchNorm running statistics were gathered under changing
    masks: re-estimate them on the small model (:func:`chita_minimal.recalibrate_bn`; on a small
    data set set ``bn.momentum = None`` first, so the statistics are the exact average rather than
    a few momentum steps from the reset values).
    """
    fraction = check_fraction("fraction", fraction)
    input_shape = _shape(model, input_shape, example_inputs)
    example_inputs = example_inputs_for(model, example_inputs, input_shape)
    groups = structured.channel_groups(model, example_inputs)  # TypeError for untraceable models
    _, device = setup(model, train_dataset, 0.0, epochs, lr, batch_size, None, device)  # shared checks
    update_every = _int("update_every", update_every)
    ramp = check_number("ramp", ramp, 0, 1)
    freeze = check_number("freeze", freeze, 0, 1, low_open=True)
    if ramp > freeze:
        raise ValueError(f"ramp ({ramp}) must not exceed freeze ({freeze}): the budget is reached before the "
                         f"mask is frozen")
    ema = check_number("ema", ema, 0, 1, high_open=True)
    check_number("momentum", momentum, 0, 1, high_open=True)
    check_number("weight_decay", weight_decay, 0)
    resolution = _int("resolution", resolution)
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    if not isinstance(soft, bool):
        raise TypeError(f"soft must be a bool, got {type(soft).__name__}")
    if latency_options is not None and not isinstance(latency_options, dict):
        raise TypeError(f"latency_options must be a dict or None, got {type(latency_options).__name__}")
    t0 = time.perf_counter()
    costs = channel_costs(model, cost, input_shape, example_inputs=example_inputs, **(latency_options or {}))
    flop_model = structured.FlopModel(model, input_shape, example_inputs=example_inputs)  # exact FLOPs of any counts
    full = sum(costs[g] * gr.channels for g, gr in groups.items())

    def removed_fraction(keep):  # of the whole model's FLOPs, or of the groups' modelled latency
        if cost == "flops":
            return 1 - flop_model({g: int(m.sum()) for g, m in keep.items()}) / flop_model.total
        return 1 - sum(costs[g] * int(m.sum()) for g, m in keep.items()) / full if full > 0 else 0.0

    def allocate(imp, target):
        if not soft:  # no regrowth: a removed channel scores below any set of kept ones, so is never chosen
            big = 1 + sum(float(v.sum()) for v in imp.values())
            imp = {g: torch.where(keep[g].to(v.device), v, -big) for g, v in imp.items()}
        goal = target
        for _ in range(100):
            new = knapsack_keep(imp, costs, goal, resolution=resolution,
                                total=flop_model.total if cost == "flops" else None)
            over = target - removed_fraction(new)
            if cost != "flops" or over <= 0:
                return new
            goal += over  # coupled groups (MLPNet): remove what the linear model missed
            if goal >= 1:
                break
        raise ValueError(f"fraction={target} cannot be met while keeping one channel per group")

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov and momentum > 0)
    total = epochs * math.ceil(len(train_dataset) / batch_size)
    frozen_at = min(total, max(1, round(freeze * total)))
    dtype = next(model.parameters()).dtype
    keep = {g: torch.ones(gr.channels, dtype=torch.bool) for g, gr in groups.items()}
    hold = {}  # parameter name -> (bool mask, True = free to train; values held where False)
    avg = dict.fromkeys(groups)  # group -> EMA of (gate gradient, gate Fisher) since the last update
    history, losses, step, frozen = [], [], 0, False

    def update(final):
        nonlocal keep, hold, avg, frozen
        target = fraction if final else ramp_target(step, total, fraction, ramp)
        new = allocate({g: toggle_importance(*avg[g], keep[g].to(device)) for g in groups}, target)
        history.append(dict(step=step, target=target, removed_fraction=removed_fraction(new),
                            came_back=sum(int((new[g] & ~keep[g]).sum()) for g in groups),
                            removed=sum(int((~new[g] & keep[g]).sum()) for g in groups),
                            kept=sum(int(m.sum()) for m in new.values()), final=final))
        keep, avg, frozen = new, dict.fromkeys(groups), final
        masks = channel_masks(model, keep, groups)
        if final or not soft:
            params.apply_masks(model, masks)  # pruned for good: held at 0
        gates.set(keep)
        hold = {n: (m.to(device), model.get_parameter(n).detach().clone()) for n, m in masks.items()}

    def restore():  # undo what the step (gradient, weight decay, momentum) did to masked channels
        for n, (m, values) in hold.items():
            p = model.get_parameter(n)
            p.copy_(torch.where(m, p, values))
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buf.mul_(m)

    with model_mode(model, training=True), ChannelGates(model, keep, groups) as gates:
        for epoch in range(epochs):
            batches = EpochBatches(train_dataset, batch_size, seed, epoch, device, dtype, f"smcp {epoch + 1}/{epochs}",
                                   progress)
            for x, y in batches:
                loss = forward_backward(model, opt, x, y, cosine_lr(lr, step, total))
                step += 1
                with torch.no_grad():
                    if not frozen:
                        for g in groups:
                            now = (gates.grad[g], gates.fisher[g])
                            avg[g] = now if avg[g] is None else tuple(ema * a + (1 - ema) * b
                                                                      for a, b in zip(avg[g], now))
                    opt.step()
                    restore()
                if not frozen and (step == frozen_at or step % update_every == 0):
                    update(final=step == frozen_at)
                batches.add(loss, len(y))
            losses.append(batches.mean)
    small = structured.shrink(model, keep, example_inputs)
    flops_small = structured.flops(small, input_shape)
    achieved = 1 - flops_small / flop_model.total
    return SMCPResult(method="smcp", target=fraction, achieved=achieved, stages=history, model=small,
                      keep={g: m.clone() for g, m in keep.items()}, flops_dense=flop_model.total,
                      flops_pruned=flops_small, cost=cost,
                      cost_fraction=achieved if cost == "flops" else removed_fraction(keep), losses=losses,
                      seconds={"total": time.perf_counter() - t0}, soft=soft, frozen_at=frozen_at, costs=costs)
