"""Gradual pruning with fine-tuning: masks kept, schedule reached, checkpoints resume exactly."""

import pytest
import torch

import chita_minimal as cm
from chita_minimal.network import finetune
from chita_minimal.training import gradual as gradual_mod


@pytest.fixture(scope="module")
def mnist():
    train = cm.data.subset(cm.data.load("mnist", "train"), 1200, seed=0)
    test = cm.data.subset(cm.data.load("mnist", "test"), 500, seed=0)
    return train, test


def flat(model):
    return cm.network.params.flatten(model, cm.network.params.layout(model))


def test_train_epochs_keeps_masks_and_lowers_the_loss(mnist):
    train, _ = mnist
    model = cm.models.load_pretrained("mlpnet")
    report = cm.prune(model, train, 0.9, "mp")
    losses = finetune.train_epochs(model, train, 3, lr=0.05, masks=report.masks, batch_size=100, progress=False)
    assert len(losses) == 3 and losses[-1] < losses[0]
    for name, keep in report.masks.items():
        assert not bool(dict(model.named_parameters())[name].detach()[~keep].any())


def test_gradual_reaches_the_schedule_with_nested_masks(mnist):
    train, test = mnist
    model = cm.models.load_pretrained("mlpnet")
    seen = []
    real_prune = gradual_mod.prune

    def spy(*args, **kwargs):
        report = real_prune(*args, **kwargs)
        seen.append(torch.cat([m.flatten() for m in report.masks.values()]))
        return report

    gradual_mod.prune = spy
    try:
        res = cm.gradual(model, train, 0.95, method="chita", stages=3, epochs_per_stage=1, n_grads=64, l2=1e-3,
                         batch_size=100, lr=0.02, eval_data=test, progress=False)
    finally:
        gradual_mod.prune = real_prune
    targets = cm.schedule("poly", 0.95, 3, 0.0)
    assert [h["sparsity"] for h in res.history] == targets
    assert all(abs(h["achieved_sparsity"] - s) < 1e-3 for h, s in zip(res.history, targets))
    assert all(bool((b & ~a).sum() == 0) for a, b in zip(seen, seen[1:]))  # pruned weights never come back
    w = flat(model)
    assert abs(1 - float((w != 0).float().mean()) - 0.95) < 1e-3
    assert res.history[-1]["accuracy"] >= res.history[-1]["accuracy_pruned"] - 1.0  # fine-tuning does not hurt
    assert res.final_accuracy > 60
    assert isinstance(res, cm.Report) and res.method == "chita" and res.target == 0.95 and res.stages is res.history
    assert res.achieved == res.stages[-1]["achieved_sparsity"] and set(res.seconds) == {"total"} and "acc. tuned" in str(res)


def test_interrupted_run_resumes_to_the_same_weights(mnist, tmp_path, monkeypatch):
    train, _ = mnist
    kwargs = dict(method="mp", stages=3, epochs_per_stage=1, batch_size=100, lr=0.02, progress=False)
    reference = cm.models.load_pretrained("mlpnet")
    cm.gradual(reference, train, 0.9, **kwargs)

    calls = {"n": 0}
    real = gradual_mod.train_epochs

    def dies_in_stage_two(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kw)

    model = cm.models.load_pretrained("mlpnet")
    monkeypatch.setattr(gradual_mod, "train_epochs", dies_in_stage_two)
    with pytest.raises(KeyboardInterrupt):
        cm.gradual(model, train, 0.9, checkpoint=tmp_path, **kwargs)
    monkeypatch.setattr(gradual_mod, "train_epochs", real)
    resumed = cm.models.load_pretrained("mlpnet")  # a fresh process would start from the dense model
    res = cm.gradual(resumed, train, 0.9, checkpoint=tmp_path, **kwargs)
    assert [h["resumed"] for h in res.history] == [True, False, False]
    assert torch.equal(flat(resumed), flat(reference))
    with pytest.raises(ValueError, match="different arguments.*stages"):
        cm.gradual(cm.models.load_pretrained("mlpnet"), train, 0.9, checkpoint=tmp_path,
                   **{**kwargs, "stages": 4})


def test_bad_arguments(mnist):
    train, _ = mnist
    model = cm.models.load_pretrained("mlpnet")
    with pytest.raises(ValueError, match="lr"):
        finetune.train_epochs(model, train, 1, lr=0)
    with pytest.raises(ValueError, match="chita\\+\\+"):
        cm.gradual(model, train, 0.9, method="chita++")
    with pytest.raises(TypeError, match="TensorDataset"):
        finetune.train_epochs(model, [(torch.zeros(1), 0)], 1, lr=0.1)
