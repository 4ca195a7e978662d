"""The epoch bookkeeping shared by the sparse-training loops (chita_minimal.network.loop)."""

from __future__ import annotations

import torch

from chita_minimal.network.loop import EpochBatches, epoch_batches


def test_epoch_batches_are_the_epochs_permutation_and_mean_is_the_sample_weighted_mean():
    X = torch.arange(10, dtype=torch.float32)[:, None]
    ds = torch.utils.data.TensorDataset(X, torch.arange(10))
    batches = EpochBatches(ds, 4, seed=3, epoch=1, device="cpu", dtype=torch.float64, desc="t")
    seen, expected = [], []
    for (x, y), (x2, y2) in zip(batches, epoch_batches(ds, 4, 3, 1, "cpu", torch.float64)):
        assert torch.equal(x, x2) and torch.equal(y, y2) and x.dtype == torch.float64
        loss = torch.tensor(0.1, dtype=torch.float32) * (len(seen) + 1)  # a float32 loss, as a model gives
        batches.add(loss, len(y))
        seen += y.tolist()
        expected.append(float(loss) * len(y))
    assert sorted(seen) == list(range(10)) and [len(b) for b in (seen[:4], seen[4:8], seen[8:])] == [4, 4, 2]
    assert batches.seen == 10 and batches.batches == 3
    assert batches.mean == sum(expected) / 10  # the sum in float64, as Python floats would give it
