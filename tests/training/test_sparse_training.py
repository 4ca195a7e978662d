"""Sparse training (RigL, L0 hard-concrete gates): exact sparsity, mask updates, ERK, seeding, errors."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import chita_minimal as cm
from chita_minimal.training import sparse_training as st

SHAPES = [(16, 20), (3, 16)]  # the prunable weights of net()
P = 16 * 20 + 3 * 16


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture(scope="module")
def data():
    """300 samples, 3 classes given by a random linear teacher: learnable, chance = 1/3."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 20, generator=g)
    return TensorDataset(X, (X @ torch.randn(20, 3, generator=g)).argmax(1))


def weights(model):
    return {n: w.detach().clone() for n, w in model.named_parameters() if n.endswith("weight")}


def reference_erk(shapes, sparsity):
    """ERK as in the RigL code (sparse_utils.get_sparsities_erdos_renyi), written out independently."""
    n = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense = set()
    while len(dense) < len(n):
        rhs = sum((1 - sparsity) * n[i] for i in range(len(n)) if i not in dense) \
            - sum(sparsity * n[i] for i in dense)
        eps = rhs / sum(raw[i] * n[i] for i in range(len(n)) if i not in dense)
        if max(eps * raw[i] for i in range(len(n)) if i not in dense) <= 1 + 1e-12:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(n))]
        dense.add(max((i for i in range(len(n)) if i not in dense), key=lambda i: raw[i]))
    return [1.0] * len(n)


@pytest.mark.parametrize("shapes", [SHAPES, [(8, 3, 3, 3), (16, 8, 3, 3), (10, 16), (10,)]])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95])
def test_layer_counts_meet_the_global_target_exactly(shapes, sparsity):
    n = [math.prod(s) for s in shapes]
    K = cm.num_kept(sparsity, sum(n))
    dens = st.erk_densities(shapes, sparsity)
    ref = reference_erk(shapes, (sum(n) - K) / sum(n))  # the paper's ERK at the rounded target
    assert all(0 < d <= 1 for d in dens) and dens == pytest.approx(ref, rel=1e-9)
    sparse = [i for i, d in enumerate(dens) if d < 1]
    ratio = {i: dens[i] / (sum(shapes[i]) / n[i]) for i in sparse}  # d_l ∝ Σ dims / Π dims on sparse layers
    if ratio:
        assert max(ratio.values()) == pytest.approx(min(ratio.values()), rel=1e-9)
    for dist, d in [("erk", dens), ("uniform", [K / sum(n)] * len(n))]:
        counts = st.layer_counts(shapes, sparsity, dist)
        assert sum(counts) == K  # global count exact
        assert all(math.floor(di * ni) <= c <= min(ni, math.ceil(di * ni)) for c, di, ni in zip(counts, d, n))
    if sparsity == 0.5 and shapes == SHAPES:  # ε·ratio of the 3x16 layer exceeds 1: it is made dense
        assert dens[1] == 1.0 and st.layer_counts(shapes, 0.5, "erk")[1] == 48


def test_rigl_keeps_exact_counts_and_updates_until_t_end(data, monkeypatch):
    calls = []
    real = st._drop_and_grow

    def spy(w, grad, keep, fraction):
        new, grown = real(w, grad, keep, fraction)
        calls.append((keep.clone(), new.clone(), grown.clone()))
        return new, grown

    monkeypatch.setattr(st, "_drop_and_grow", spy)
    model = net()
    counts = st.layer_counts(SHAPES, 0.8, "uniform")
    res = st.rigl(model, data, 0.8, 6, lr=0.1, batch_size=32, delta_t=4, t_end=0.5)
    total = 6 * math.ceil(300 / 32)  # 60 steps, T_end = 30: updates after steps 4, 8, ..., 28
    assert [h["step"] for h in res.history] == list(range(4, 30, 4))
    assert len(calls) == 2 * len(res.history)
    for j, (old, new, grown) in enumerate(calls):
        assert int(old.sum()) == int(new.sum()) == counts[j % 2]  # per-layer count constant
        assert not bool((grown & old).any()) and bool((grown <= new).all())
    assert sum(h["regrown"] for h in res.history) > 0  # the masks did change
    assert any(not torch.equal(old, new) for old, new, _ in calls)
    last = [new for _, new, _ in calls[-2:]]
    assert all(torch.equal(m, r) for m, r in zip(last, res.masks.values()))  # frozen after T_end
    assert all(h["step"] < 0.5 * total for h in res.history)
    w = weights(model)
    for name, keep in res.masks.items():
        assert int(keep.sum()) == counts[list(res.masks).index(name)]
        assert not bool(w[name][~keep].any())  # pruned weights exactly 0
    assert res.sparsity == 1 - cm.num_kept(0.8, P) / P
    assert isinstance(res, cm.Report) and res.method == "rigl" and res.target == 0.8 and res.achieved == res.sparsity
    assert res.stages is res.history and set(res.seconds) == {"total"} and "stage(s)" in str(res)
    assert res.losses[-1] < res.losses[0]
    assert cm.evaluate(model, data) > 0.7


def test_rigl_erk_random_init_and_same_seed_same_weights(data):
    kwargs = dict(lr=0.1, batch_size=32, delta_t=3, distribution="erk", init="random", seed=3)
    a, b = net(), net()
    ra = st.rigl(a, data, 0.9, 4, **kwargs)
    rb = st.rigl(b, data, 0.9, 4, **kwargs)
    assert all(torch.equal(wa, wb) for wa, wb in zip(weights(a).values(), weights(b).values()))
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks) and ra.losses == rb.losses
    assert [int(m.sum()) for m in ra.masks.values()] == st.layer_counts(SHAPES, 0.9, "erk")
    c = net()
    st.rigl(c, data, 0.9, 4, **{**kwargs, "seed": 4})
    assert not torch.equal(weights(a)["1.weight"], weights(c)["1.weight"])


def test_l0_exact_sparsity_gate_report_and_accuracy(data):
    model = net()
    res = st.l0_train(model, data, 0.8, 20, lr=0.1, lam=3e-3, batch_size=32)
    k = cm.num_kept(0.8, P)
    assert sum(int(m.sum()) for m in res.masks.values()) == k and res.sparsity == 1 - k / P
    w = weights(model)
    assert all(not bool(w[n][~m].any()) for n, m in res.masks.items())
    assert 0 < res.gate_sparsity < 1 and res.gate_sparsity == res.history[-1]["gate_sparsity"]
    assert len(res.losses) == 20 and res.losses[-1] < res.losses[0]
    assert all(type(prm) is nn.Parameter for prm in model.parameters())  # model left as it was built
    assert cm.evaluate(model, data) > 0.7  # chance is 1/3
    again = net()
    st.l0_train(again, data, 0.8, 20, lr=0.1, lam=3e-3, batch_size=32)
    assert all(torch.equal(w[n], v) for n, v in weights(again).items())


def test_l0_larger_penalty_closes_more_gates(data):
    closed = [st.l0_train(net(), data, 0.5, 20, lr=0.1, lam=lam, batch_size=32).gate_sparsity
              for lam in (1e-3, 1e-2)]
    assert closed[0] < closed[1]


def test_bad_input(data):
    model = net()
    with pytest.raises(ValueError, match="sparsity"):
        st.rigl(model, data, 1.0, 1, lr=0.1)
    with pytest.raises(ValueError, match="sparsity"):
        st.l0_train(model, data, -0.1, 1, lr=0.1, lam=1e-3)
    with pytest.raises(ValueError, match="epochs"):
        st.rigl(model, data, 0.5, 0, lr=0.1)
    with pytest.raises(TypeError, match="epochs"):
        st.l0_train(model, data, 0.5, 1.5, lr=0.1, lam=1e-3)
    with pytest.raises(ValueError, match="empty"):
        st.rigl(model, TensorDataset(torch.zeros(0, 20), torch.zeros(0, dtype=torch.long)), 0.5, 1, lr=0.1)
    with pytest.raises(TypeError, match="TensorDataset"):
        st.rigl(model, [(torch.zeros(20), 0)], 0.5, 1, lr=0.1)
    with pytest.raises(ValueError, match="unknown"):
        st.rigl(model, data, 0.5, 1, lr=0.1, names=["fc.weight"])
    with pytest.raises(ValueError, match="delta_t"):
        st.rigl(model, data, 0.5, 1, lr=0.1, delta_t=0)
    with pytest.raises(ValueError, match="alpha"):
        st.rigl(model, data, 0.5, 1, lr=0.1, alpha=1.5)
    with pytest.raises(ValueError, match="t_end"):
        st.rigl(model, data, 0.5, 1, lr=0.1, t_end=0)
    with pytest.raises(ValueError, match="distribution"):
        st.rigl(model, data, 0.5, 1, lr=0.1, distribution="er")
    with pytest.raises(ValueError, match="lr"):
        st.rigl(model, data, 0.5, 1, lr=0)
    with pytest.raises(ValueError, match="lam"):
        st.l0_train(model, data, 0.5, 1, lr=0.1, lam=-1)
    with pytest.raises(ValueError, match="gamma"):
        st.l0_train(model, data, 0.5, 1, lr=0.1, lam=1e-3, gamma=0.1)
    with pytest.raises(ValueError, match="zeta"):
        st.l0_train(model, data, 0.5, 1, lr=0.1, lam=1e-3, zeta=0.9)
    with pytest.raises(TypeError, match="model"):
        st.rigl("net", data, 0.5, 1, lr=0.1)
