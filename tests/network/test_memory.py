"""The memory plan: checked before X is built; an impossible request fails at once and leaves the model alone."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import chita_minimal as cm
from chita_minimal.network import memory


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))


def _data(m=64):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(m, 12, generator=g), torch.randint(0, 4, (m,), generator=g))


def test_parse_and_print_bytes():
    assert memory.parse_bytes("8GB") == 8 * 10**9 and memory.parse_bytes("512 MiB") == 512 * 2**20
    assert memory.parse_bytes(1e3) == 1000
    for bad in ("lots", "-3GB", 0):
        with pytest.raises(ValueError, match="max_memory"):
            memory.parse_bytes(bad)
    with pytest.raises(TypeError, match="max_memory"):
        memory.parse_bytes([1])
    assert memory.human(3 * 2**30) == "3.00 GiB" and memory.available_bytes("cpu") > 0


def test_an_impossible_request_fails_before_allocating_and_the_model_is_untouched(monkeypatch):
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    called = []
    monkeypatch.setattr(cm.network.fisher, "gradients", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match=r"needs .* but 1000 B are available \(max_memory.*n_grads = 0.*chita-block"):
        cm.prune(model, _data(), 0.5, "chita", n_grads=32, max_memory=1000)
    with pytest.raises(memory.MemoryPlanError, match="'wf'"):
        cm.prune(model, _data(), 0.5, "wf", n_grads=32, max_memory="2KB")
    assert not called  # no gradient was computed
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    cm.prune(model, _data(), 0.5, "mp", max_memory=1000)  # no X: nothing to plan


def test_chita_block_streams_the_gradients_when_x_does_not_fit():
    a, b = _net(), _net()
    full = cm.prune(a, _data(), 0.6, "chita-block", block_size=16, n_grads=32)
    streamed = cm.prune(b, _data(), 0.6, "chita-block", block_size=16, n_grads=32, max_memory="1KB")
    assert streamed.stages[0]["streamed"] and "streamed" in str(streamed) and not full.notes
    assert streamed.achieved_sparsity == full.achieved_sparsity
    for name in full.masks:
        assert torch.equal(full.masks[name], streamed.masks[name])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
