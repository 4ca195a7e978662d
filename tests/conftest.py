import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chita_minimal.data import datasets as _data


def _have(name):
    """Whether the data set ``name`` is available locally (no download tried)."""
    try:
        _data.load(name, "test", download=False)
        return True
    except FileNotFoundError:
        return False


needs_mnist = pytest.mark.skipif(not _have("mnist"), reason="MNIST not available locally (set CHITA_DATA_DIR)")
needs_cifar = pytest.mark.skipif(not _have("cifar10"), reason="CIFAR-10 not available locally (set CHITA_DATA_DIR)")


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


def randomise_bn(model, seed=0):
    """Non-trivial BN statistics and affine parameters (in place), so that removed channels would matter."""
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.3 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


def image_data(m, shape, seed=0):
    """A TensorDataset of m Gaussian 'images' of the given shape with labels in 0..9."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(m, *shape, generator=g), torch.randint(0, 10, (m,), generator=g))


from chita_minimal.models import MLPNet as _MLPNet  # noqa: E402


def _dw_block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DepthwiseCNN(nn.Module):
    """stem → two depthwise-separable blocks; block 2 concatenated with a 1×1 side branch of block 1's output
    (16 + 4 channels) → 1×1 fuse conv (16) → 2×2 pooling → flatten → Linear(64, 16) → Linear(16, 10)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = _dw_block(8, 12, 2)
        self.block2 = _dw_block(12, 16, 2)
        self.side = nn.Conv2d(12, 4, 1)
        self.fuse = nn.Conv2d(20, 16, 1)
        self.head = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        a = self.block1(self.stem(x))
        y = torch.cat([self.block2(a), self.side(F.avg_pool2d(a, 2))], 1)
        return self.head(F.adaptive_avg_pool2d(F.relu(self.fuse(y)), 2).flatten(1))


class TinyMLP(_MLPNet):
    """MLPNet subclass (same channel groups fc1/fc2) 16 → 6 → 5 → 10, bias-free: p = 176, explicit Hessians are cheap."""

    def __init__(self):
        from torch import nn

        nn.Module.__init__(self)
        self.fc1 = nn.Linear(16, 6, bias=False)
        self.fc2 = nn.Linear(6, 5, bias=False)
        self.fc3 = nn.Linear(5, 10, bias=False)


# ----------------------------------------------------------------------------- the book, built once per session


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """The book built once per test session (jupyter-book build -W --keep-going, from the outputs stored in the
    notebooks) into a temporary folder, or into $CHITA_BOOK_OUTPUT (relative to the repository) when it is set:
    CI sets it to the repository, so that scripts/book.sh then finds the HTML up to date and publishes the build
    that was tested. Shared by tests/test_book.py and tests/test_browser.py. Returns returncode, log (stdout +
    stderr) and html (the _build/html folder)."""
    jb = Path(sys.executable).parent / "jupyter-book"
    if not jb.exists() and shutil.which("jupyter-book") is None:
        pytest.skip("jupyter-book is not installed (pip install -e '.[book]')")
    root = Path(__file__).resolve().parents[1]
    out = root / os.environ["CHITA_BOOK_OUTPUT"] if os.environ.get("CHITA_BOOK_OUTPUT") \
        else tmp_path_factory.mktemp("book")
    proc = subprocess.run([str(jb) if jb.exists() else "jupyter-book", "build", str(root), "--path-output", str(out),
                           "-W", "--keep-going"], capture_output=True, text=True, timeout=1200)
    return SimpleNamespace(returncode=proc.returncode, log=proc.stdout + proc.stderr, html=out / "_build" / "html")



def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (scripts/test.sh runs ``-n 2 --dist loadgroup``), every test that needs the built book
    runs on one worker, so the book is built once per session, not once per worker."""
    for item in items:
        if "built_book" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("book"))
