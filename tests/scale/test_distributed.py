"""torch.distributed: two CPU processes (gloo) give the same gradients, solves and pruned models as one."""

import datetime
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

import chita_minimal as cm
from chita_minimal.scale import distributed
from conftest import random_problem

WORLD = 2
SOLVE_CASES = [("active", None), ("iht", None), ("iht-fixed", None), ("backsolve", None), ("active", "mask"),
               ("block", None), ("block", "mask")]
PRUNE_CASES = ["chita", "chita-bso", "chita-block", "chita++", "wf", "chita-block-iht"]


def tiny_data(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g))


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return cm.models.MLPNet().to(dtype)


def solve_inputs():
    X, w_bar = random_problem(n=23, p=60, seed=11)
    mask = torch.arange(60) % 3 != 0
    return X, w_bar, mask


def _finetune():
    model = tiny_model(torch.float64)
    masks = cm.prune(model, tiny_data(1), 0.7, "mp").masks
    losses = cm.train_epochs(model, tiny_data(2), 2, lr=0.1, batch_size=16, masks=masks, progress=False)
    return cm.network.params.flatten(model, cm.network.params.layout(model)), losses, masks


def _gradual():
    model = tiny_model(torch.float64)
    res = cm.gradual(model, tiny_data(1), 0.8, method="chita", stages=2, epochs_per_stage=1, n_grads=12, l2=1e-2,
                     batch_size=16, lr=0.05, progress=False)
    return cm.network.params.flatten(model, cm.network.params.layout(model)), [h["achieved_sparsity"] for h in res.history]


def _work(rank, world):
    """Everything the tests compare, computed on one rank (rows of X split by row_range)."""
    out = {}
    sample = cm.gradients(tiny_model(), tiny_data(), 9, seed=3, progress=False)
    out["grad"] = (sample.X, sample.mean_grad, sample.indices, sample.n_total, sample.sharded)
    X, w_bar, mask = solve_inputs()
    start, stop = distributed.row_range(X.shape[0], rank, world)
    for method, m in SOLVE_CASES:
        res = cm.solve(X[start:stop], w_bar, 17, l2=0.05, method=method, distributed=True,
                       mask=mask if m else None, **({"blocks": 7} if method == "block" else {}))
        out[(method, m)] = (res.w, res.support, res.objective)
    try:
        cm.solve(X[start:stop], w_bar, 10 + rank, l2=0.05, method="active", distributed=True)
        out["mismatch"] = "no error"
    except ValueError as e:
        out["mismatch"] = str(e)
    out["ddp"] = _finetune()
    out["gradual"] = _gradual()
    for method in PRUNE_CASES:
        model = tiny_model(torch.float64)  # fp64: supports compared exactly
        extra = {"stages": 3} if method == "chita++" else {}
        report = cm.prune(model, tiny_data(1), 0.8, method, n_grads=12, l2=1e-2, seed=5, **extra)
        out[("prune", method)] = (cm.network.params.flatten(model, cm.network.params.layout(model)), report.objective)
    return out


def _entry(rank, world, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(_work(rank, world), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    mp.spawn(_entry, args=(WORLD, str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_row_range_splits_every_row_once():
    for n in [1, 7, 9, 10, 1000]:
        for world in [1, 2, 3, 8]:
            spans = [distributed.row_range(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def test_distributed_gradients_equal_single_process(ranks):
    single = cm.gradients(tiny_model(), tiny_data(), 9, seed=3, progress=False)
    assert not single.sharded
    X = torch.cat([r["grad"][0] for r in ranks])
    assert [r["grad"][0].shape[0] for r in ranks] == [5, 4]
    assert all(r["grad"][3] == 9 and r["grad"][4] for r in ranks)
    torch.testing.assert_close(X, single.X, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["grad"][2] for r in ranks]), single.indices)
    for r in ranks:  # the first-order term is the mean over all rows, on every rank
        torch.testing.assert_close(r["grad"][1], single.mean_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", SOLVE_CASES, ids=lambda c: "-".join(filter(None, c)))
def test_row_sharded_solver_equals_one_process(ranks, case):
    method, m = case
    X, w_bar, mask = solve_inputs()
    ref = _one_process(X, w_bar, method, mask if m else None)
    for r in ranks:
        w, support, objective = r[case]
        assert torch.equal(support, ref.support)
        torch.testing.assert_close(w, ref.w, rtol=1e-6, atol=1e-6)
        assert objective == pytest.approx(ref.objective, rel=1e-9)
    assert torch.equal(ranks[0][case][0], ranks[1][case][0])  # bitwise the same weights on every rank


def _one_process(X, w_bar, method, mask):
    """The one-process solve that a row-sharded one must equal. To the active set a ShardedProblem is an operator,
    not a dense X in one process, so it runs without the devices of the latter (batched trial steps, several
    swaps at once, the Frobenius bound for L, the exact search): the reference is the same solver on the same
    problem seen as an operator."""
    if method != "active":
        return cm.solve(X, w_bar, 17, l2=0.05, method=method, mask=mask, **({"blocks": 7} if method == "block" else {}))
    from chita_minimal.solver.active_set import active_set
    from chita_minimal.solver.problem import Problem

    class Operator(Problem):  # a general operator to the active set, as the sharded problem is
        dense_x = False

    idx = torch.arange(X.shape[1]) if mask is None else torch.nonzero(mask).squeeze(1)
    sub = Problem(X, w_bar, 0.05).restrict(idx)  # as solve() restricts to the mask
    w_sub, support_sub, _, _ = active_set(Operator(sub.X, sub.w_bar, 0.05, y=sub.y, offset=sub.offset), 17)
    w, support = torch.zeros_like(w_bar), torch.zeros(X.shape[1], dtype=torch.bool)
    w[idx], support[idx] = w_sub, support_sub
    return SimpleNamespace(w=w, support=support, objective=Problem(X, w_bar, 0.05).objective(w))


def test_mismatched_k_is_reported_on_every_rank(ranks):
    for r in ranks:
        assert "ranks disagree on k" in r["mismatch"] and "rank 0: 10" in r["mismatch"]


@pytest.mark.parametrize("method", PRUNE_CASES)
def test_prune_under_two_ranks_equals_one_process(ranks, method):
    model = tiny_model(torch.float64)
    extra = {"stages": 3} if method == "chita++" else {}
    report = cm.prune(model, tiny_data(1), 0.8, method, n_grads=12, l2=1e-2, seed=5, **extra)
    w = cm.network.params.flatten(model, cm.network.params.layout(model))
    for r in ranks:
        w_r, objective = r[("prune", method)]
        assert torch.equal(w_r != 0, w != 0)
        torch.testing.assert_close(w_r, w, rtol=1e-6, atol=1e-8)
        assert objective == pytest.approx(report.objective, rel=1e-8)


def test_ddp_finetuning_keeps_pruned_weights_at_zero_and_equals_one_process(ranks):
    w_ref, losses_ref, masks = _finetune()
    keep = torch.cat([m.flatten() for m in masks.values()])
    for r in ranks:
        w, losses, _ = r["ddp"]
        assert not bool(w[~keep].any())
        torch.testing.assert_close(w, w_ref, rtol=1e-7, atol=1e-9)
    # each rank reports the loss of its half of every batch; their mean is the one-process loss
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["ddp"][1], ranks[1]["ddp"][1])]
    assert mean == pytest.approx(losses_ref, rel=1e-9)


def test_gradual_pruning_under_two_ranks_equals_one_process(ranks):
    w_ref, sparsities = _gradual()
    for r in ranks:
        torch.testing.assert_close(r["gradual"][0], w_ref, rtol=1e-6, atol=1e-8)
        assert r["gradual"][1] == pytest.approx(sparsities)


def test_sharded_problem_needs_a_process_group():
    X, w_bar, _ = solve_inputs()
    with pytest.raises(RuntimeError, match="process group"):
        cm.solve(X, w_bar, 5, method="active", distributed=True)
    with pytest.raises(ValueError, match="process group"):
        cm.gradients(tiny_model(), tiny_data(), 4, shard=True, progress=False)
    with pytest.raises(ValueError, match="not available with distributed=True"):
        cm.solve(X, w_bar, 5, method="block-iht", blocks=10, distributed=True)


def test_torchrun_launcher_runs_two_ranks(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    report = tmp_path / "report.json"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "chita_minimal.scale.launch", "--n-grads", "40",
           "--threads", "1", "--timeout", "60", "--out", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(report.read_text())
    assert out["world_size"] == 2 and out["rows_per_rank"] == 20 and out["backend"] == "gloo"
    assert out["achieved_sparsity"] == pytest.approx(0.9, abs=1e-4) and out["accuracy"] > 80
