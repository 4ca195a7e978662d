"""measure(): wall time and peak memory of one call."""

import sys

import pytest
import torch

from chita_minimal.network.measure import measure


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory reads /proc/self/statm")
def test_peak_memory_sees_a_temporary_allocation():
    # in a fresh interpreter: memory an earlier test freed may still be resident in this process, and an
    # allocation that reuses it does not raise the resident size (seen under pytest-xdist)
    import subprocess

    code = ("import torch\nfrom chita_minimal.network.measure import measure\n"
            "def work():\n    x = torch.ones(64, 2**20)  # 256 MiB, freed on return\n    return float(x.sum())\n"
            "m = measure(work)\nprint(m.result, m.peak_mib, m.seconds)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    result, peak_mib, seconds = map(float, out.stdout.split())
    assert result == 64 * 2**20
    assert 200 < peak_mib < 400
    assert seconds > 0


def test_small_call_and_bad_input():
    m = measure(lambda a, b=1: a + b, 2, b=3)
    assert m.result == 5 and m.peak_mib < 50
    with pytest.raises(TypeError, match="fn must be callable"):
        measure(3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")
def test_cuda_peak_memory():
    m = measure(lambda: float(torch.ones(2**26, device="cuda").sum()), device="cuda")
    assert 200 < m.peak_mib < 300


def test_profile_attributes_time_to_package_functions():
    from chita_minimal.solver.solve import solve
    from chita_minimal.network.measure import profile
    from conftest import random_problem

    X, w_bar = random_problem(n=30, p=200, seed=0)
    res, seconds, parts = profile(solve, X, w_bar, 20, l2=0.1, method="active",
                                  functions={"Xᵀr": ["rmatvec"], "top-k": ["hard_threshold"], "none": ["no_such"]})
    assert res.nnz <= 20 and seconds > 0
    assert 0 < parts["Xᵀr"] <= seconds and 0 < parts["top-k"] <= seconds and parts["none"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory reads /proc/self/statm")
def test_problem_setup_adds_no_copy_of_X():
    # validating X (NaN/Inf check) must not allocate temporaries of X's size
    from chita_minimal.solver.problem import Problem

    X = torch.randn(256, 2**18)  # 256 MiB
    w = torch.randn(2**18)
    m = measure(Problem, X, w, 0.1)
    assert m.peak_mib < 64


def test_latency_of_a_small_model():
    from torch import nn

    from chita_minimal.network.measure import latency

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).train()
    lat = latency(model, (32,), batch_size=8, repeats=7, warmup=1)
    assert 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms and lat.batch_size == 8 and lat.repeats == 7
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="repeats"):
        latency(model, (32,), repeats=0)
