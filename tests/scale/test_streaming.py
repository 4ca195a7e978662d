"""The streamed block backsolve equals the block backsolve on the full X, without holding X."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import chita_minimal as cm
from chita_minimal.network import fisher, params
from chita_minimal.solver.blocks import block_backsolve, layer_blocks
from chita_minimal.solver.problem import Problem, num_kept
from chita_minimal.scale.streaming import block_backsolve_streamed


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(),
                         nn.Linear(5, 3)).double()


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("sparsity,block_size,chunk", [(0.5, 16, 7), (0.8, 40, 16), (0.3, 1000, 5)])
def test_equals_block_backsolve_on_full_X(sparsity, block_size, chunk):
    ds, n, l2 = _data(), 40, 1e-2
    ref_model, model = _net(), _net()
    sample = fisher.gradients(ref_model, ds, n, seed=3, progress=False)
    lay = params.layout(ref_model)
    w_bar = params.flatten(ref_model, lay)
    k = num_kept(sparsity, lay.p)
    w_ref, s_ref = block_backsolve(Problem(sample.X, w_bar, l2), k, layer_blocks(lay, block_size))
    res = block_backsolve_streamed(model, ds, sparsity, n_grads=n, block_size=block_size, l2=l2, seed=3, chunk=chunk)
    assert torch.equal(res.support, s_ref)
    assert int(res.support.sum()) == k
    torch.testing.assert_close(res.w, w_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(params.flatten(model, lay), w_ref, rtol=1e-9, atol=1e-11)  # written back
    assert set(res.seconds) == {"gradients", "accumulate", "solve", "total"}


def test_matches_prune_chita_block_and_leaves_model_when_asked():
    ds = _data()
    a, b = _net(1), _net(1)
    cm.prune(a, ds, 0.7, "chita-block", n_grads=32, l2=1e-3, block_size=20, seed=5)
    before = params.flatten(b, params.layout(b)).clone()
    res = block_backsolve_streamed(b, ds, 0.7, n_grads=32, l2=1e-3, block_size=20, seed=5, write_back=False)
    assert torch.equal(params.flatten(b, params.layout(b)), before)
    torch.testing.assert_close(res.w, params.flatten(a, params.layout(a)), rtol=1e-9, atol=1e-11)


def test_memory_is_the_grams_not_X():
    ds = _data()
    res = block_backsolve_streamed(_net(), ds, 0.9, n_grads=40, block_size=8, l2=1e-2, write_back=False)
    # every block keeps at most 8 weights, padded to a power of two: Σ s_b² + s_b ≤ (8² + 8) per block
    lay = params.layout(_net())
    assert res.gram_numbers <= len(layer_blocks(lay, 8)) * (64 + 8)
    assert res.gram_numbers < 40 * lay.p


def test_fp32_close_to_fp64():
    ds = _data()
    m64, m32 = _net(2), _net(2).float()
    ds32 = TensorDataset(ds.tensors[0].float(), ds.tensors[1])
    r64 = block_backsolve_streamed(m64, ds, 0.6, n_grads=40, block_size=30, l2=1e-2)
    r32 = block_backsolve_streamed(m32, ds32, 0.6, n_grads=40, block_size=30, l2=1e-2)
    assert torch.equal(r64.support, r32.support)
    torch.testing.assert_close(r32.w.double(), r64.w, rtol=1e-4, atol=1e-5)


def test_bad_input():
    ds = _data()
    with pytest.raises(ValueError, match="sparsity"):
        block_backsolve_streamed(_net(), ds, 1.0)
    with pytest.raises(ValueError, match="l2"):
        block_backsolve_streamed(_net(), ds, 0.5, l2=0.0)
    with pytest.raises(ValueError, match="block_size"):
        block_backsolve_streamed(_net(), ds, 0.5, block_size=0)
    with pytest.raises(ValueError, match="samples"):
        block_backsolve_streamed(_net(), ds, 0.5, n_grads=1000)
    with pytest.raises(ValueError, match="unknown|not a parameter|no parameter"):
        block_backsolve_streamed(_net(), ds, 0.5, names=["nope.weight"])


def test_gradient_chunks_equal_gradients_rows():
    ds, model = _data(), _net()
    X = fisher.gradients(model, ds, 30, seed=4, progress=False).X
    got = torch.cat([c.clone() for _, c in fisher.gradient_chunks(model, ds, 30, seed=4, chunk_size=7)])
    torch.testing.assert_close(got, X)
    with pytest.raises(ValueError, match="samples"):
        fisher.gradient_chunks(model, ds, 100)  # checked at the call, not at the first next()
