import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def random_problem(n=40, p=12, seed=0, dtype=torch.float64, correlation=0.5):
    """A random instance of (P): X with correlated columns (mixing strength ``correlation``), dense w̄."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=dtype)
    if correlation:
        mix = torch.eye(p, dtype=dtype) + correlation / p**0.5 * torch.randn(p, p, generator=g, dtype=dtype)
        X = X @ mix
    w_bar = torch.randn(p, generator=g, dtype=dtype)
    return X, w_bar


def random_layer(seed, rows, cols, N, corr, spread, dtype=torch.float64):
    """A layer W (rows, cols), calibration inputs X (cols, N) with correlated features of different
    scales (mixing ``corr``, log-scale spread ``spread``), and H = 2/N·XXᵀ (layer-wise problems)."""
    f64 = torch.float64
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(cols, N, generator=g, dtype=f64)
    X = (torch.eye(cols, dtype=f64) + corr * torch.randn(cols, cols, generator=g, dtype=f64) / cols**0.5) @ X
    X = X * torch.exp(spread * torch.randn(cols, 1, generator=g, dtype=f64))
    W = torch.randn(rows, cols, generator=g, dtype=f64)
    return W.to(dtype), X.to(dtype), (2 / N * X @ X.T).to(dtype)
