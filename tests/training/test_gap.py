"""GaP (scheduled grow-and-prune): partitions, phase schedule, one dense partition at a time, exact sparsity."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import chita_minimal as cm
from chita_minimal.training import sparse_training as st
from chita_minimal.training.gap import gap_train, partition_names
from chita_minimal.models.resnet_cifar import ResNetCifar

NAMES = ["1.weight", "3.weight", "5.weight"]  # the prunable weights of net(): 1280, 2048, 96
P = 1280 + 2048 + 96


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))


@pytest.fixture(scope="module")
def data():
    """300 samples, 3 classes given by a random linear teacher: learnable, chance = 1/3."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 20, generator=g)
    return TensorDataset(X, (X @ torch.randn(20, 3, generator=g)).argmax(1))


def test_partitions_are_contiguous_cover_every_layer_once_and_balance_counts():
    model = net()
    assert partition_names(model, 2) == [NAMES[:1], NAMES[1:]]  # cum 1280 | 3328: 1280 is nearer to 3424/2
    assert partition_names(model, 3) == [[n] for n in NAMES]
    resnet = cm.models.resnet20()
    names = cm.network.params.prunable_names(resnet)
    numel = {n: p.numel() for n, p in resnet.named_parameters()}
    big = max(numel.values())
    for P in range(1, len(names) + 1):
        parts = partition_names(resnet, P)
        assert len(parts) == P and all(parts) and sum(parts, []) == names  # contiguous, in order, each once
        if P <= 6:  # boundaries at most half a layer from j·C/P: each part within one layer of C/P
            sizes = [sum(numel[n] for n in part) for part in parts]
            assert all(abs(s - sum(sizes) / P) <= big for s in sizes)


def test_one_partition_dense_at_a_time_and_exact_final_sparsity(data):
    model = net()
    parts = partition_names(model, 3)
    counts = dict(zip(NAMES, st.layer_counts([p.shape for n, p in model.named_parameters() if n in NAMES], 0.8)))
    prms = dict(model.named_parameters())
    S = 21  # default: ⌊0.8·T/P⌋ with T = 8 epochs × 10 batches = 80
    seen, regrew = [], set()

    def check(step, masks, grown):
        expected = (step // S) % 3 if step // S < 3 else None
        assert grown == expected
        seen.append(grown)
        for j, part in enumerate(parts):
            for n in part:
                if j == grown:
                    assert bool(masks[n].all())  # the grown partition is dense ...
                    if int((prms[n] != 0).sum()) > counts[n]:
                        regrew.add(j)  # ... and its pruned weights really train again
                else:
                    assert int(masks[n].sum()) == counts[n]  # the others keep their k_l
                    assert not bool(prms[n][~masks[n]].any())

    res = gap_train(model, data, 0.8, 8, lr=0.2, batch_size=32, partitions=3, callback=check)
    assert len(seen) == 80 and seen[-1] is None and regrew == {0, 1, 2}
    assert [(h["partition"], h["start"], h["step"]) for h in res.history] == [(0, 0, 21), (1, 21, 42), (2, 42, 63)]
    assert [h["layers"] for h in res.history] == parts
    assert all(0 <= h["changed"] <= 1 for h in res.history) and any(h["changed"] > 0 for h in res.history)
    assert sum(int(m.sum()) for m in res.masks.values()) == cm.num_kept(0.8, P)
    assert res.sparsity == 1 - cm.num_kept(0.8, P) / P and res.method == "gap"
    assert isinstance(res, cm.Report) and res.target == 0.8 and res.achieved == res.sparsity and res.stages is res.history
    assert all(int(res.masks[n].sum()) == counts[n] for n in NAMES)
    assert all(not bool(prms[n].detach()[~res.masks[n]].any()) for n in NAMES)  # pruned weights exactly 0
    assert len(res.losses) == 8 and res.losses[-1] < 0.5 * res.losses[0]
    assert cm.evaluate(model, data) > 0.7  # chance is 1/3


def test_several_cycles_grow_every_partition_and_same_seed_same_weights(data):
    a, b = net(), net()
    ra = gap_train(a, data, 0.9, 4, lr=0.1, batch_size=32, partitions=3, steps_per_phase=4, seed=1)
    rb = gap_train(b, data, 0.9, 4, lr=0.1, batch_size=32, partitions=3, steps_per_phase=4, seed=1)
    # T = 40, phases in the first 32 steps: 8 phases of 4 steps, partitions 0 1 2 0 1 2 0 1
    assert [h["partition"] for h in ra.history] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [h["step"] for h in ra.history] == list(range(4, 33, 4))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters())) and ra.losses == rb.losses
    assert sum(int(m.sum()) for m in ra.masks.values()) == cm.num_kept(0.9, P)


def test_resnet_with_batchnorm():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))
    model = ResNetCifar(1)
    res = gap_train(model, data, 0.7, 3, lr=0.05, batch_size=4, partitions=3)
    names = cm.network.params.prunable_names(model)
    p = sum(model.get_parameter(n).numel() for n in names)
    assert sum(int(m.sum()) for m in res.masks.values()) == cm.num_kept(0.7, p)
    assert all(not bool(model.get_parameter(n).detach()[~m].any()) for n, m in res.masks.items())
    assert sorted(h["partition"] for h in res.history) == [0, 1, 2]


def test_bad_input(data):
    model = net()
    with pytest.raises(ValueError, match="partitions"):
        gap_train(model, data, 0.5, 2, lr=0.1, partitions=0)
    with pytest.raises(ValueError, match="partitions"):
        gap_train(model, data, 0.5, 2, lr=0.1, partitions=4)  # 3 prunable layers
    with pytest.raises(TypeError, match="partitions"):
        gap_train(model, data, 0.5, 2, lr=0.1, partitions=2.0)
    with pytest.raises(ValueError, match="steps_per_phase"):
        gap_train(model, data, 0.5, 2, lr=0.1, batch_size=32, partitions=3, steps_per_phase=7)  # 16 steps: 2 phases
    with pytest.raises(ValueError, match="steps_per_phase"):
        gap_train(model, data, 0.5, 2, lr=0.1, steps_per_phase=0, partitions=2)
    with pytest.raises(ValueError, match="too few"):
        gap_train(model, data, 0.5, 1, lr=0.1, batch_size=300, partitions=2)  # 1 step in all
    with pytest.raises(ValueError, match="grow_end"):
        gap_train(model, data, 0.5, 2, lr=0.1, grow_end=0, partitions=2)
    with pytest.raises(ValueError, match="sparsity"):
        gap_train(model, data, 1.0, 2, lr=0.1, partitions=2)
    with pytest.raises(ValueError, match="epochs"):
        gap_train(model, data, 0.5, 0, lr=0.1, partitions=2)
    with pytest.raises(TypeError, match="callback"):
        gap_train(model, data, 0.5, 2, lr=0.1, callback="print", partitions=2)
    with pytest.raises(ValueError, match="unknown"):
        partition_names(model, 2, names=["fc.weight"])
    with pytest.raises(ValueError, match="distribution"):
        gap_train(model, data, 0.5, 2, lr=0.1, partitions=2, distribution="random")
    one = gap_train(net(), data, 0.5, 2, lr=0.1, batch_size=32, partitions=1)  # T = 20: grow all, prune back at 16
    assert [(h["layers"], h["step"]) for h in one.history] == [(NAMES, 16)] and math.isfinite(one.losses[-1])


def test_erk_distribution_sets_the_per_layer_counts(data):
    model = net()
    shapes = [p.shape for n, p in model.named_parameters() if n in NAMES]
    erk = st.layer_counts(shapes, 0.8, "erk")
    assert erk != st.layer_counts(shapes, 0.8, "uniform")  # the test can tell the two apart
    res = gap_train(model, data, 0.8, 4, lr=0.1, batch_size=32, partitions=3, distribution="erk")
    assert [int(res.masks[n].sum()) for n in NAMES] == erk
    prms = dict(model.named_parameters())
    assert all(int((prms[n] != 0).sum()) <= k for n, k in zip(NAMES, erk))  # pruned weights are exactly zero
    assert sum(erk) == cm.num_kept(0.8, sum(s.numel() for s in shapes))
