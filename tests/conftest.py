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
