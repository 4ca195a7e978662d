"""save_pruned / load_pruned: round trips of weights, masks, report metadata; sparse storage; shrunk models."""

import pytest
import torch
from torch import nn

import chita_minimal as cm
from chita_minimal.structure.channels import shrink

from conftest import TinyMLP


def _data(m=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(m, 1, 4, 4, generator=g), torch.randint(0, 10, (m,), generator=g))


def _pruned(sparsity=0.9):
    torch.manual_seed(0)
    model = TinyMLP()
    report = cm.prune(model, _data(), sparsity, "chita", n_grads=32)
    return model, report


@pytest.mark.parametrize("sparse", [False, True])
def test_round_trip_gives_the_same_outputs_masks_and_metadata(tmp_path, sparse):
    model, report = _pruned()
    path = cm.save_pruned(model, report, tmp_path / "m.safetensors", sparse=sparse)
    loaded = cm.load_pruned(TinyMLP, path)
    x = _data(8, seed=5).tensors[0]
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.masks.keys() == report.masks.keys()
    assert all(torch.equal(loaded.masks[k], report.masks[k]) for k in report.masks)
    assert loaded.report["method"] == "chita" and loaded.report["target"] == 0.9
    assert loaded.report["achieved"] == report.achieved and loaded.report["type"] == "PruneReport"


def test_sparse_storage_is_smaller_and_dense_storage_is_not(tmp_path):
    torch.manual_seed(0)
    model = cm.models.MLPNet()  # p = 32,360 weights: the file header no longer dominates
    report = cm.prune(model, None, 0.9, "mp")
    dense = cm.save_pruned(model, report, tmp_path / "dense.safetensors").stat().st_size
    sparse = cm.save_pruned(model, report, tmp_path / "sparse.safetensors", sparse=True).stat().st_size
    plain = cm.save_pruned(model, None, tmp_path / "plain.safetensors", masks={}).stat().st_size
    assert sparse < 0.2 * plain  # 10 % of the values (4 bytes) + 1 bit per weight
    assert dense > plain         # the same zeros, plus the bit masks


def test_masks_are_reattached_for_fine_tuning(tmp_path):
    model, report = _pruned()
    loaded = cm.load_pruned(TinyMLP(), cm.save_pruned(model, report, tmp_path / "m.safetensors"))
    opt = torch.optim.SGD(loaded.model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data().tensors
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(loaded.model(x), y).backward()
        opt.step()
        loaded.keeper.apply()
    for name, m in loaded.masks.items():
        assert not bool(loaded.model.get_parameter(name)[~m].any())
    loaded.keeper.remove()


def test_a_shrunk_model_is_rebuilt_from_the_dense_factory(tmp_path):
    torch.manual_seed(0)
    dense = TinyMLP()
    keep = {g: torch.arange(n) % 2 == 0 for g, n in (("fc1", 6), ("fc2", 5))}
    small = shrink(dense, keep)
    path = cm.save_pruned(small, None, tmp_path / "small.safetensors", masks={}, keep=keep)
    loaded = cm.load_pruned(TinyMLP, path, attach_masks=False)
    x = _data(8).tensors[0]
    assert torch.equal(loaded.model(x), small(x))
    assert loaded.model.fc1.weight.shape == small.fc1.weight.shape


def test_bad_input_is_named(tmp_path):
    model, report = _pruned()
    with pytest.raises(TypeError, match="model"):
        cm.save_pruned("model", report, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="masks"):
        cm.save_pruned(model, None, tmp_path / "x.safetensors", masks={"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(FileNotFoundError):
        cm.load_pruned(TinyMLP, tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not written by"):
        cm.load_pruned(TinyMLP, tmp_path / "other.safetensors")
    with pytest.raises(TypeError, match="model_or_factory"):
        cm.load_pruned(3, tmp_path / "other.safetensors")
