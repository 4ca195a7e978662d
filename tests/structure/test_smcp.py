"""SMCP soft channel masks: knapsack against brute force, exact FLOP costs, latency table fit, the soft
mask's forward and straight-through gradient, Taylor importance (masked and kept channels alike),
the cubic budget ramp, parked channels coming back, the freeze, pruning without regrowth as the
baseline, budgets, errors."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from chita_minimal.report import Report
from chita_minimal.structure import smcp, channels as structured
from chita_minimal.network.measure import Latency
from chita_minimal.models import MLPNet, resnet20
from chita_minimal.models.resnet_cifar import ResNetCifar

from conftest import DepthwiseCNN, randomise_bn


def _random_keep(model, seed, p=0.5):
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for name, gr in structured.channel_groups(model).items():
        c = model.get_submodule(gr.producer).weight.shape[0]
        m = torch.rand(c, generator=g) > p
        m[int(torch.randint(c, (1,), generator=g))] = True
        keep[name] = m
    return keep


def _mnist_like(n=256, seed=0):
    """Tiny separable data: 10 classes given by a random linear teacher on 784 features."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 1, 28, 28, generator=g)
    return TensorDataset(X, (X.flatten(1) @ torch.randn(784, 10, generator=g)).argmax(1))


def _cifar_like(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, 32, 32, generator=g)
    return TensorDataset(X, (X.mean((2, 3)) @ torch.randn(3, 10, generator=g)).argmax(1))


# -----------------------------------------------------------------------------
# knapsack


def _brute(scores, costs, B):
    """Best Σ of kept scores over all per-group counts n_g ∈ 1..C_g with Σ n_g·cost_g ≤ B (top-n per group)."""
    best = -float("inf")
    for counts in itertools.product(*[range(1, len(s) + 1) for s in scores]):
        if sum(n * c for n, c in zip(counts, costs)) <= B:
            best = max(best, sum(float(s.sort(descending=True).values[:n].sum()) for s, n in zip(scores, counts)))
    return best


def _check_keep(keep, scores, costs):
    """Masks keep the top-n scores of every group (≥ 1); returns (value, cost)."""
    value = cost = 0.0
    for m, s, c in zip(keep.values(), scores, costs):
        n = int(m.sum())
        assert n >= 1
        assert s[m].min() >= s[~m].max() if n < len(s) else True
        value += float(s[m].sum())
        cost += n * c
    return value, cost


def test_knapsack_equals_brute_force_on_tiny_instances():
    rng = random.Random(0)
    for trial in range(40):
        G = rng.randint(2, 3)
        scores = [torch.rand(rng.randint(1, 4), dtype=torch.float64,
                             generator=torch.Generator().manual_seed(trial * 10 + g)) for g in range(G)]
        costs = [rng.randint(1, 9) for _ in range(G)]
        prunable = sum(len(s) * c for s, c in zip(scores, costs))
        if prunable - sum(costs) < 1:
            continue
        B = rng.randint(sum(costs), prunable - 1)
        # fraction 0.5 of total = 2(prunable − B) leaves exactly B; resolution B makes the unit 1 (exact DP)
        keep = smcp.knapsack_keep({f"g{g}": s for g, s in enumerate(scores)}, {f"g{g}": c for g, c in enumerate(costs)},
                                  0.5, total=2 * (prunable - B), resolution=B)
        value, cost = _check_keep(keep, scores, costs)
        assert cost <= B
        assert value == pytest.approx(_brute(scores, costs, B), rel=1e-12)


def test_knapsack_rounding_up_never_exceeds_the_budget():
    rng = random.Random(1)
    for trial in range(30):
        G = 3
        scores = [torch.rand(rng.randint(2, 4), dtype=torch.float64,
                             generator=torch.Generator().manual_seed(100 + trial * 10 + g)) for g in range(G)]
        costs = [rng.uniform(0.5, 5.0) for _ in range(G)]
        prunable = sum(len(s) * c for s, c in zip(scores, costs))
        frac = rng.uniform(0.05, 0.5)
        B = prunable - frac * prunable
        R = 12  # coarse: the rounding matters
        keep = smcp.knapsack_keep({f"g{g}": s for g, s in enumerate(scores)}, {f"g{g}": c for g, c in enumerate(costs)},
                                  frac, resolution=R)
        value, cost = _check_keep(keep, scores, costs)
        assert cost <= B * (1 + 1e-12)
        # optimal for the rounded weights: at least the exact optimum of a budget G units smaller
        assert value <= _brute(scores, costs, B) + 1e-12
        assert value >= _brute(scores, costs, B - G * B / R) - 1e-12


def test_knapsack_prefers_cheap_channels_and_rejects_infeasible_budgets():
    imp = {"a": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    keep = smcp.knapsack_keep(imp, {"a": 1.0, "b": 3.0}, 0.5)  # total 16, B = 8: 4 of a (4) + 1 of b (3)
    assert [int(m.sum()) for m in keep.values()] == [4, 1]
    with pytest.raises(ValueError, match="one channel per group"):
        smcp.knapsack_keep(imp, {"a": 1.0, "b": 3.0}, 0.9)


# -----------------------------------------------------------------------------
# costs


def test_flop_costs_are_exact_on_resnet():
    model = resnet20()
    costs = smcp.channel_costs(model, "flops")
    assert list(costs) == list(structured.channel_groups(model))
    assert costs["layer1.0.conv1"] == 32 * 32 * 9 * (16 + 16) and costs["layer3.0.conv1"] == 8 * 8 * 9 * (32 + 64)
    dense = structured.flops(model, (3, 32, 32))
    for seed in range(4):
        keep = _random_keep(model, seed)
        removed = sum(costs[g] * int((~m).sum()) for g, m in keep.items())
        assert structured.flops(structured.shrink(model, keep), (3, 32, 32)) == dense - removed


def test_flop_costs_on_mlpnet_are_exact_marginals_up_to_the_coupled_term():
    model = MLPNet()
    costs = smcp.channel_costs(model, "flops")
    assert costs == {"fc1": 784 + 20, "fc2": 40 + 10}
    for seed in range(4):
        keep = _random_keep(model, seed)
        r1, r2 = int((~keep["fc1"]).sum()), int((~keep["fc2"]).sum())
        small = structured.flops(structured.shrink(model, keep), (1, 28, 28))
        assert small == 32360 - r1 * costs["fc1"] - r2 * costs["fc2"] + r1 * r2  # fc2 holds n_fc1·n_fc2 MACs


def test_latency_table_fits_the_slope_of_the_timed_pairs(monkeypatch):
    model = ResNetCifar(1)
    seen = []

    def fake(pair, input_shape, **kw):  # 0.3 ms + 1e-3 ms per channel per (in + out) of the pair
        w, cin, cout = pair[0].weight.shape[0], pair[0].weight.shape[1], pair[-1].weight.shape[0]
        assert isinstance(pair[1], nn.BatchNorm2d) and pair[-1].weight.shape[1] == w
        seen.append((input_shape, kw["batch_size"], kw["repeats"], w))
        return Latency(0.3 + 1e-3 * w * (cin + cout), 0, 0, kw["batch_size"], kw["repeats"])

    monkeypatch.setattr(smcp, "_latency", fake)
    costs = smcp.channel_costs(model, "latency", batch_size=4, repeats=7, widths=4)
    assert costs == pytest.approx({"layer1.0.conv1": 0.032, "layer2.0.conv1": 0.048, "layer3.0.conv1": 0.096})
    assert (((16, 32, 32), 4, 7, 4) in seen and ((16, 32, 32), 4, 7, 16) in seen
            and ((32, 16, 16), 4, 7, 64) in seen and len(seen) == 12)  # stage 2 pair starts at 32×32 with stride 2


def test_latency_table_measures_real_time():
    costs = smcp.channel_costs(MLPNet(), "latency", batch_size=2, repeats=3, widths=3, warmup=1)
    assert set(costs) == {"fc1", "fc2"} and all(isinstance(c, float) and c >= 0 for c in costs.values())


# -----------------------------------------------------------------------------
# gates and importance


@pytest.mark.parametrize("kind", ["resnet", "mlp"])
def test_gated_forward_equals_shrunk_model_and_masked_weights_get_no_gradient(kind):
    model = randomise_bn(ResNetCifar(1)) if kind == "resnet" else MLPNet()
    x = torch.randn(6, 3, 32, 32) if kind == "resnet" else torch.randn(6, 1, 28, 28)
    y = torch.arange(6)
    keep = _random_keep(model, 3)
    small = structured.shrink(model, keep)
    with smcp.ChannelGates(model, keep) as gates:
        for mode in (False, True):  # eval, and train (BN statistics are per channel: equal too)
            model.train(mode)
            small.train(mode)
            with torch.no_grad():
                assert torch.allclose(model(x), small(x), atol=1e-5, rtol=0)
        F.cross_entropy(model(x), y).backward()
        for g, gr in structured.channel_groups(model).items():
            Q, P = model.get_parameter(f"{gr.consumer}.weight"), model.get_parameter(f"{gr.producer}.weight")
            assert Q.grad[:, ~keep[g]].abs().sum() == 0 and P.grad[~keep[g]].abs().sum() == 0  # unused
            assert Q.grad[:, keep[g]].abs().sum() > 0
            assert gates.grad[g][~keep[g]].abs().sum() > 0  # but scored: the gradient of restoring them
    with torch.no_grad():  # hooks removed: the dense model again
        assert not torch.allclose(model(x), small(x), atol=1e-3, rtol=0)


def test_gate_gradient_and_fisher_are_the_per_sample_gate_derivatives():
    # MLPNet (no BN): γ_n = ∂ℓ_n/∂m_c exactly, for kept (m = 1) and masked (m = 0) neurons
    model = MLPNet()
    keep = _random_keep(model, 1)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    with smcp.ChannelGates(model, keep) as gates:
        F.cross_entropy(model(x), y).backward()
    W1, W2, W3 = (model.get_parameter(f"fc{i}.weight").detach() for i in (1, 2, 3))
    per_sample = {"fc1": [], "fc2": []}
    for n in range(8):
        m1, m2 = (keep[k].float().requires_grad_() for k in ("fc1", "fc2"))
        h1 = F.relu(x[n:n + 1].flatten(1) @ W1.T) * m1
        h2 = F.relu(h1 @ W2.T) * m2
        F.cross_entropy(h2 @ W3.T, y[n:n + 1]).backward()
        per_sample["fc1"].append(m1.grad)
        per_sample["fc2"].append(m2.grad)
    for k, gs in per_sample.items():
        gs = torch.stack(gs)
        assert torch.allclose(gates.grad[k], gs.mean(0), rtol=1e-4, atol=1e-9)
        assert torch.allclose(gates.fisher[k], (gs ** 2).mean(0), rtol=1e-4, atol=1e-12)
    # ResNet, kept channels: the gate gradient is Molchanov's BN form γ ∂L/∂γ + β ∂L/∂β (ReLU is homogeneous)
    model = randomise_bn(ResNetCifar(1)).train()
    with smcp.ChannelGates(model, {}) as gates:
        F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8)).backward()
    for g, gr in structured.channel_groups(model).items():
        bn = model.get_submodule(gr.bn)
        ref = bn.weight.detach() * bn.weight.grad + bn.bias.detach() * bn.bias.grad
        assert torch.allclose(gates.grad[g], ref, rtol=1e-3, atol=1e-5 * float(ref.abs().max()))


def test_toggle_importance_is_the_second_order_loss_change_from_either_side():
    # with the exact gate curvature in place of the Fisher, −g ± h/2 is L(m_c=0) − L(m_c=1) up to third order,
    # evaluated from the kept side and from the masked side alike; the first-order g alone is not
    torch.manual_seed(0)
    W1, W2 = torch.randn(16, 10) / 10 ** 0.5, torch.randn(3, 16) / 4
    x, y = torch.randn(64, 10), torch.randint(3, (64,))

    def loss(m):
        return F.cross_entropy((torch.tanh(x @ W1.T) * m) @ W2.T, y)

    kept = torch.rand(16) > 0.5
    m = kept.float().requires_grad_()
    g, = torch.autograd.grad(loss(m), m, create_graph=True)
    h = torch.stack([torch.autograd.grad(g[c], m, retain_graph=True)[0][c] for c in range(16)]).detach()
    g = g.detach()
    exact = torch.stack([loss(torch.where(torch.arange(16) == c, 0.0, m.detach()))
                         - loss(torch.where(torch.arange(16) == c, 1.0, m.detach())) for c in range(16)])
    est = torch.where(kept, -g + h / 2, -g - h / 2)
    assert torch.allclose(smcp.toggle_importance(g, h, kept), est.clamp(min=0))
    err, first = (est - exact).abs(), (-g - exact).abs()
    assert float(err.max()) < 0.1 * float(exact.abs().max()) and float(err.sum()) < 0.2 * float(first.sum())


# -----------------------------------------------------------------------------
# training


def test_ramp_target_is_the_cubic_schedule():
    assert smcp.ramp_target(0, 100, 0.6, 0.5) == 0.0
    assert smcp.ramp_target(25, 100, 0.6, 0.5) == pytest.approx(0.6 * (1 - 0.5 ** 3))
    assert smcp.ramp_target(10, 100, 0.6, 0.5) == pytest.approx(0.6 * (1 - 0.8 ** 3))
    assert smcp.ramp_target(50, 100, 0.6, 0.5) == smcp.ramp_target(99, 100, 0.6, 0.5) == 0.6
    assert smcp.ramp_target(0, 100, 0.6, 0.0) == 0.6
    f = [smcp.ramp_target(t, 40, 0.5, 0.75) for t in range(41)]
    steps = [b - a for a, b in zip(f, f[1:])]
    assert all(d >= 0 for d in steps) and all(b <= a + 1e-15 for a, b in zip(steps, steps[1:]))  # concave rise


def _spy(monkeypatch, model, opts=()):
    """(keep, parameter snapshot) at every mask update (channel_masks is called once per update);
    with ``opts`` (a list that receives the optimiser), the momentum buffers are appended to ``opts``."""
    seen = []
    real = smcp.channel_masks

    def masks(m, keep, groups=None):
        seen.append(({g: k.clone() for g, k in keep.items()},
                     {n: p.detach().clone() for n, p in model.named_parameters()}))
        if opts:
            opts.append({n: opts[0].state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()})
        return real(m, keep, groups)

    monkeypatch.setattr(smcp, "channel_masks", masks)
    return seen


def _channel(params, gr, c):
    """All parameter entries of channel c of group gr: producer row, BN entries, consumer column."""
    parts = [params[f"{gr.producer}.weight"][c], params[f"{gr.consumer}.weight"][:, c]]
    if gr.bn is not None:
        parts += [params[f"{gr.bn}.weight"][c:c + 1], params[f"{gr.bn}.bias"][c:c + 1]]
    return torch.cat([p.flatten() for p in parts])


def _check_parked(model, seen):
    """Between two updates a masked channel is held exactly (momentum, weight decay on); kept ones train."""
    groups = structured.channel_groups(model)
    for (keep0, p0), (_, p1) in zip(seen, seen[1:]):
        moved = 0
        for g, gr in groups.items():
            for c in range(len(keep0[g])):
                same = torch.equal(_channel(p0, gr, c), _channel(p1, gr, c))
                assert same or keep0[g][c]
                moved += not same
        assert moved > 0


def test_soft_masks_follow_the_ramp_channels_come_back_and_masked_channels_are_parked(monkeypatch):
    torch.manual_seed(0)
    model = MLPNet()
    opts = []

    class SGD(torch.optim.SGD):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            opts.append(self)

    monkeypatch.setattr(torch.optim, "SGD", SGD)
    seen = _spy(monkeypatch, model, opts)
    res = smcp.smcp_train(model, _mnist_like(), 0.5, 5, lr=0.05, batch_size=32, update_every=4,
                          ramp=0.5, freeze=0.75)  # 40 steps: ramp over 20, frozen at step 30
    small = res.model
    assert res.frozen_at == 30 and [h["step"] for h in res.history] == [4, 8, 12, 16, 20, 24, 28, 30]
    assert [h["final"] for h in res.history] == [False] * 7 + [True]
    dense = 32360
    for h, (keep, _) in zip(res.history, seen):
        assert h["target"] == (0.5 if h["final"] else smcp.ramp_target(h["step"], 40, 0.5, 0.5))
        left = structured.flops(structured.shrink(MLPNet(), keep), (1, 28, 28))
        assert h["removed_fraction"] == pytest.approx(1 - left / dense)
        assert left <= (1 - h["target"]) * dense  # the current budget is met
        assert h["removed_fraction"] < h["target"] + 0.03  # and filled: one fc1 neuron is 2.5 % of the FLOPs
    assert res.history[0]["target"] < 0.25 and res.history[3]["target"] < 0.5  # ramped, not all at once
    assert sum(h["came_back"] for h in res.history) > 0  # pruned channels came back
    assert res.history[0]["came_back"] == 0 and res.history[0]["kept"] == 60 - res.history[0]["removed"]
    for a, b in zip(res.history, res.history[1:]):
        assert b["kept"] == a["kept"] + b["came_back"] - b["removed"]
    _check_parked(model, seen)
    groups = structured.channel_groups(model)
    for (keep0, _), (_, _), buf in zip(seen, seen[1:], opts[2:]):  # and their momentum is reset
        for g, gr in groups.items():
            for c in torch.nonzero(~keep0[g]).flatten().tolist():
                assert not _channel(buf, gr, c).any()
    assert torch.equal(small.fc1.weight, model.fc1.weight[res.keep["fc1"]])
    assert structured.flops(small, (1, 28, 28)) <= 0.5 * dense and res.fraction == 1 - structured.flops(
        small, (1, 28, 28)) / dense


def test_freeze_fixes_the_mask_and_zeroes_the_removed_channels(monkeypatch):
    torch.manual_seed(0)
    model = MLPNet()
    seen = _spy(monkeypatch, model)
    calls = []
    real = smcp.knapsack_keep
    monkeypatch.setattr(smcp, "knapsack_keep", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    res = smcp.smcp_train(model, _mnist_like(), 0.5, 5, lr=0.05, batch_size=32, update_every=3,
                          ramp=0.2, freeze=0.35)  # 40 steps: frozen at step 14, not a multiple of 3
    small = res.model
    assert [h["step"] for h in res.history] == [3, 6, 9, 12, 14] and res.history[-1]["final"]
    assert len(seen) == 5 and len(calls) >= 5
    n_calls = len(calls)
    keep, at_freeze = seen[-1]
    assert all(torch.equal(keep[g], res.keep[g]) for g in keep)  # the final mask is the one of step 14
    groups = structured.channel_groups(model)
    end = {n: p.detach() for n, p in model.named_parameters()}
    for g, gr in groups.items():
        for c in range(len(keep[g])):
            if not keep[g][c]:
                assert not _channel(end, gr, c).any()  # zeroed and held at 0 despite momentum and decay
    assert not torch.equal(at_freeze["fc1.weight"], end["fc1.weight"])  # the kept weights trained on
    assert len(calls) == n_calls  # no knapsack after the freeze
    assert res.history[-1]["target"] == 0.5 and structured.flops(small, (1, 28, 28)) <= 0.5 * 32360
    # freeze = 1: the final update is at the last step
    res = smcp.smcp_train(MLPNet(), _mnist_like(64), 0.5, 1, lr=0.05, batch_size=32, update_every=4, freeze=1.0)
    assert [(h["step"], h["final"]) for h in res.history] == [(2, True)] and res.frozen_at == 2


def test_without_regrowth_removed_channels_never_return_and_stay_zero(monkeypatch):
    kwargs = dict(lr=0.05, batch_size=32, update_every=4, seed=1)
    torch.manual_seed(0)
    soft_model = MLPNet()
    soft_seen = _spy(monkeypatch, soft_model)
    smcp.smcp_train(soft_model, _mnist_like(), 0.5, 3, **kwargs)
    torch.manual_seed(0)
    model = MLPNet()
    seen = _spy(monkeypatch, model)
    res = smcp.smcp_train(model, _mnist_like(), 0.5, 3, soft=False, **kwargs)  # 24 steps, freeze at 18
    small = res.model
    assert [h["step"] for h in res.history] == [4, 8, 12, 16, 18]
    assert all(h["came_back"] == 0 for h in res.history) and sum(h["removed"] for h in res.history) > 0
    assert all(torch.equal(seen[0][0][g], soft_seen[0][0][g]) for g in res.keep)  # same first mask as soft
    groups = structured.channel_groups(model)
    for (k0, _), (k1, p1) in zip(seen, seen[1:]):
        for g, gr in groups.items():
            assert not (k1[g] & ~k0[g]).any()  # nested: removed for good
            for c in range(len(k0[g])):
                assert k0[g][c] or not _channel(p1, gr, c).any()  # held at exactly 0
    for h, (keep, _) in zip(res.history, seen):
        assert 1 - structured.flops(structured.shrink(MLPNet(), keep), (1, 28, 28)) / 32360 >= h["target"]
    assert structured.flops(small, (1, 28, 28)) <= 0.5 * 32360
    # ramp = 0: one mask at step update_every, then fixed
    torch.manual_seed(0)
    res = smcp.smcp_train(MLPNet(), _mnist_like(), 0.5, 3, soft=False, ramp=0.0, **kwargs)
    assert res.history[0]["step"] == 4 and all(h["removed"] == 0 for h in res.history[1:])


def test_each_step_leaves_masked_channels_out_and_the_knapsack_gets_their_averaged_toggle_importance(monkeypatch):
    steps, calls, gates = [], [], []  # per SGD step: (gate mask, grad, fisher, parameter grads)

    class Gates(smcp.ChannelGates):
        def __init__(self, *a):
            super().__init__(*a)
            gates.append(self)

    class SGD(torch.optim.SGD):
        def step(self, *a, **kw):
            gt = gates[0]
            steps.append(({g: m > 0 for g, m in gt.m.items()}, dict(gt.grad), dict(gt.fisher),
                          {n: p.grad.clone() for n, p in model.named_parameters()}))
            return super().step(*a, **kw)

    real = smcp.knapsack_keep

    def knapsack(importance, *a, **kw):
        calls.append((len(steps), importance))
        return real(importance, *a, **kw)

    monkeypatch.setattr(smcp, "ChannelGates", Gates)
    monkeypatch.setattr(torch.optim, "SGD", SGD)
    monkeypatch.setattr(smcp, "knapsack_keep", knapsack)
    torch.manual_seed(0)
    model = MLPNet()
    ema = 0.7
    res = smcp.smcp_train(model, _mnist_like(128), 0.5, 4, lr=0.05, batch_size=32, update_every=3, ema=ema)
    groups = structured.channel_groups(model)
    for keep, _, _, grads in steps:  # the gates are the current mask; masked channels get no gradient
        for g, gr in groups.items():
            assert not grads[f"{gr.producer}.weight"][~keep[g]].any()
            assert not grads[f"{gr.consumer}.weight"][:, ~keep[g]].any()
    assert sum(int((~k).sum()) for k in steps[-1][0].values()) > 0
    last = 0
    for i, (t, imp) in enumerate(calls):
        if i and t == calls[i - 1][0]:  # MLPNet's coupled FLOPs: the same update re-solved
            assert all(torch.equal(imp[g], calls[i - 1][1][g]) for g in groups)
            continue
        for g in groups:
            gbar, fbar = steps[last][1][g], steps[last][2][g]  # EMA restarted at the last update
            for _, gr, fi, _ in steps[last + 1:t]:
                gbar, fbar = ema * gbar + (1 - ema) * gr[g], ema * fbar + (1 - ema) * fi[g]
            want = torch.where(steps[t - 1][0][g], -gbar + fbar / 2, -gbar - fbar / 2).clamp(min=0)
            assert torch.allclose(imp[g], want, rtol=1e-5, atol=1e-12)
        last = t
    assert [t for t, _ in calls][-1] == res.frozen_at == 12


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_resnet_budget_never_exceeded_and_shrunk_model_equals_masked_model(monkeypatch, fraction):
    torch.manual_seed(0)
    model = randomise_bn(ResNetCifar(1))
    seen = _spy(monkeypatch, model)
    data = _cifar_like()
    res = smcp.smcp_train(model, data, fraction, 2, lr=0.05, batch_size=16, update_every=1, freeze=1.0)
    small = res.model
    dense = structured.flops(model, (3, 32, 32))
    kept = structured.flops(small, (3, 32, 32))
    assert kept <= (1 - fraction) * dense and res.fraction == 1 - kept / dense
    assert isinstance(res, Report) and res.method == "smcp" and res.target == fraction and res.masks == {}
    assert res.achieved == res.fraction and res.stages is res.history and set(res.seconds) == {"total"}
    assert res.flops_dense == dense and res.flops_pruned == kept and "mask update" in str(res)
    assert res.fraction < fraction + 294912 / dense  # the budget is filled up to about one channel
    assert len(res.history) == 4 and len(res.losses) == 2
    _check_parked(model, seen[:-1])  # parked channels, BN entries included
    model.eval()
    small.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5, rtol=0)


def test_training_lowers_the_loss_on_separable_data():
    torch.manual_seed(0)
    model = MLPNet()
    data = _mnist_like(512)
    res = smcp.smcp_train(model, data, 0.3, 8, lr=0.1, batch_size=64, update_every=8)
    small = res.model
    assert len(res.losses) == 8 and res.losses[-1] < 0.7 * res.losses[0]
    with torch.no_grad():
        acc = float((small(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean())
    assert acc > 0.5  # chance is 0.1


def test_latency_budget_holds_for_the_latency_model(monkeypatch):
    monkeypatch.setattr(smcp, "_latency", lambda pair, shape, **kw: Latency(
        0.1 + 1e-3 * pair[0].weight.shape[0] * pair[0].weight.shape[1], 0, 0, 1, 1))  # slope 1e-3·in_P
    torch.manual_seed(0)
    model = ResNetCifar(1)
    res = smcp.smcp_train(model, _cifar_like(), 0.4, 1, lr=0.05, batch_size=16, cost="latency",
                          update_every=1)
    small = res.model
    slope = {"layer1.0.conv1": 0.016, "layer2.0.conv1": 0.016, "layer3.0.conv1": 0.032}
    assert res.costs == pytest.approx(slope)
    full = sum(slope[g] * m.numel() for g, m in res.keep.items())
    left = sum(slope[g] * int(m.sum()) for g, m in res.keep.items())
    assert res.cost_fraction == pytest.approx(1 - left / full) and left <= 0.6 * full * (1 + 1e-12)
    assert res.history[-1]["removed_fraction"] == res.cost_fraction
    assert res.fraction == 1 - structured.flops(small, (3, 32, 32)) / structured.flops(model, (3, 32, 32))


def test_bad_input():
    model, data = MLPNet(), _mnist_like(16)
    with pytest.raises(ValueError, match="fraction"):
        smcp.smcp_train(model, data, 1.0, 1, lr=0.1)
    with pytest.raises(ValueError, match="cost"):
        smcp.smcp_train(model, data, 0.5, 1, lr=0.1, cost="energy")
    with pytest.raises(ValueError, match="update_every"):
        smcp.smcp_train(model, data, 0.5, 1, lr=0.1, update_every=0)
    with pytest.raises(ValueError, match="ramp"):
        smcp.smcp_train(model, data, 0.5, 1, lr=0.1, ramp=0.8, freeze=0.6)
    with pytest.raises(ValueError, match="ramp"):
        smcp.smcp_train(model, data, 0.5, 1, lr=0.1, ramp=-0.1)
    with pytest.raises(ValueError, match="freeze"):
        smcp.smcp_train(model, data, 0.5, 1, lr=0.1, ramp=0.0, freeze=0.0)
    with pytest.raises(ValueError, match="step"):
        smcp.ramp_target(-1, 10, 0.5, 0.5)
    with pytest.raises(ValueError, match="ema"):
        smcp.smcp_train(model, data, 0.5, 1, lr=0.1, ema=1.0)
    with pytest.raises(ValueError, match="epochs"):
        smcp.smcp_train(model, data, 0.5, 0, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        smcp.smcp_train(model, data, 0.5, 1, lr=0.0)
    with pytest.raises(TypeError, match="soft"):
        smcp.smcp_train(model, data, 0.5, 1, lr=0.1, soft="yes")
    with pytest.raises(TypeError, match="TensorDataset"):
        smcp.smcp_train(model, [(torch.zeros(784), 0)], 0.5, 1, lr=0.1)
    with pytest.raises(TypeError, match="ResNetCifar and MLPNet"):
        smcp.smcp_train(nn.Linear(3, 2), data, 0.5, 1, lr=0.1)
    with pytest.raises(ValueError, match="kind"):
        smcp.channel_costs(model, "energy")
    with pytest.raises(ValueError, match="repeats"):
        smcp.channel_costs(model, "latency", repeats=0)
    imp, costs = {"a": torch.ones(3)}, {"a": 1.0}
    with pytest.raises(ValueError, match="fraction"):
        smcp.knapsack_keep(imp, costs, 1.5)
    with pytest.raises(ValueError, match="resolution"):
        smcp.knapsack_keep(imp, costs, 0.5, resolution=0)
    with pytest.raises(ValueError, match="costs"):
        smcp.knapsack_keep(imp, {"b": 1.0}, 0.5)
    with pytest.raises(ValueError, match="costs"):
        smcp.knapsack_keep(imp, {"a": -1.0}, 0.5)
    with pytest.raises(ValueError, match="importance"):
        smcp.knapsack_keep({"a": torch.tensor([1.0, float("nan")])}, costs, 0.5)
    with pytest.raises(ValueError, match="keeps no channel"):
        smcp.ChannelGates(model, {"fc1": torch.zeros(40, dtype=torch.bool)})


# -----------------------------------------------------------------------------
# groups of several producers and consumers (a depthwise-separable CNN with a concatenation)


def _dw_keep(groups, seed):
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for name, gr in groups.items():
        m = torch.rand(gr.channels, generator=g) > 0.4
        m[0] = True
        keep[name] = m
    return keep


def test_flop_costs_of_a_depthwise_cnn_are_the_savings_of_one_channel():
    model, x = DepthwiseCNN(), torch.zeros(1, 3, 16, 16)
    costs = smcp.channel_costs(model, "flops", example_inputs=x)
    groups = structured.channel_groups(model, x)
    dense = structured.flops(model, (3, 16, 16))
    # a channel of block 1's output: its pointwise filter (8 inputs at 8×8), block 2's depthwise filter of it (9 taps
    # at 4×4, stride 2), and its columns in block 2's pointwise conv (16 outputs at 4×4) and the side conv (4 at 4×4)
    assert costs["block1.3"] == 8 * 8 * 8 + 4 * 4 * 9 + 4 * 4 * 16 + 4 * 4 * 4
    for g in groups:
        one = {g: torch.arange(groups[g].channels) > 0}
        assert structured.flops(structured.shrink(model, one, x), (3, 16, 16)) == dense - costs[g]
    with pytest.raises(ValueError, match="cost='latency'.*use cost='flops'"):
        smcp.channel_costs(model, "latency", example_inputs=x)


def test_gates_of_a_depthwise_cnn_equal_the_shrunk_model_and_sum_over_every_consumer():
    """Gates at every consumer through the index maps: the function of shrink(model, keep); with every channel
    kept, ∂L/∂m_c = Σ over the consumers' columns of channel c of W·∂L/∂W (gating an input column is scaling it)."""
    model, x, y = randomise_bn(DepthwiseCNN()), torch.randn(6, 3, 16, 16), torch.arange(6)
    groups = structured.channel_groups(model, x[:1])
    keep = _dw_keep(groups, 1)
    small = structured.shrink(model, keep, x[:1])
    model.eval(), small.eval()
    with smcp.ChannelGates(model, keep, groups) as gates:
        with torch.no_grad():
            assert torch.allclose(model(x), small(x), atol=1e-5, rtol=0)
        F.cross_entropy(model(x), y).backward()
        for g, gr in groups.items():
            for p in gr.producers:
                rows = gr.from_channels(p, keep[g], True)
                assert model.get_parameter(f"{p}.weight").grad[~rows].abs().sum() == 0  # unused
            assert gates.grad[g][~keep[g]].abs().sum() > 0  # but scored
    model.zero_grad()
    with smcp.ChannelGates(model, {}, groups) as gates:
        F.cross_entropy(model(x), y).backward()
        for g, gr in groups.items():
            ref = torch.zeros(gr.channels, dtype=torch.float64)
            for q in gr.consumers:
                W = model.get_parameter(f"{q}.weight")
                per_column = (W * W.grad).transpose(0, 1).flatten(1).sum(1).double()
                owner = gr.channel_of(q)
                ref.index_add_(0, owner[owner >= 0], per_column[owner >= 0])
            assert torch.allclose(gates.grad[g].double(), ref, rtol=1e-4, atol=1e-7), g


def test_smcp_trains_a_depthwise_cnn_to_its_budget_and_the_small_model_computes_the_same():
    torch.manual_seed(0)
    model, x = randomise_bn(DepthwiseCNN()), torch.randn(48, 3, 16, 16)
    data = TensorDataset(x, (x.mean((2, 3)) @ torch.randn(3, 10)).argmax(1))
    res = smcp.smcp_train(model, data, 0.4, 2, lr=0.05, batch_size=16, update_every=1, freeze=1.0,
                          example_inputs=x[:1])
    dense = structured.flops(model, (3, 16, 16))
    assert res.flops_pruned <= 0.6 * dense and res.achieved == 1 - res.flops_pruned / dense
    assert any(not m.all() for m in res.keep.values())
    model.eval(), res.model.eval()
    with torch.no_grad():
        out = res.model(x[:4])
        assert out.shape == (4, 10) and torch.allclose(out, model(x[:4]), atol=1e-5, rtol=0)
