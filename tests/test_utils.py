"""Tests of the small helpers of chita_minimal.utils: the deprecated-keyword helper ``renamed`` and the argument
checks every module reuses."""

from __future__ import annotations

import importlib
import inspect
import warnings

import numpy as np
import pytest
import torch

from chita_minimal.utils import check_fraction, check_int, check_number, model_mode, renamed


@renamed(blocksize="block_size", n="n_grads")
def _f(a, *, block_size=128, n_grads=8):
    """Docstring kept."""
    return a, block_size, n_grads


def test_new_names_and_positional_calls_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _f(1) == (1, 128, 8)
        assert _f(1, block_size=4, n_grads=2) == (1, 4, 2)


def test_old_name_warns_and_passes_the_value_on():
    with pytest.warns(DeprecationWarning, match=r"^_f\(blocksize=\.\.\.\) is now _f\(block_size=\.\.\.\)$") as rec:
        assert _f(1, blocksize=4) == (1, 4, 8)
    assert rec[0].filename == __file__  # points at the caller, not at the helper
    with pytest.warns(DeprecationWarning, match=r"_f\(n=\.\.\.\) is now _f\(n_grads=\.\.\.\)"):
        assert _f(1, n=3, block_size=2) == (1, 2, 3)


def test_old_and_new_name_together_is_a_type_error():
    with pytest.raises(TypeError, match="both block_size= and its deprecated old name blocksize="):
        _f(1, blocksize=4, block_size=4)


def test_wrapper_keeps_name_doc_signature_and_lists_the_aliases():
    assert _f.__name__ == "_f" and _f.__doc__ == "Docstring kept."
    assert list(inspect.signature(_f).parameters) == ["a", "block_size", "n_grads"]
    assert _f.__renamed__ == {"blocksize": "block_size", "n": "n_grads"}
    with pytest.raises(ValueError, match="another identifier"):
        renamed(x="x")


RENAMED = {  # module: functions with deprecated keyword names (old → new)
    "chita_minimal.methods.layerwise": ("sparsegpt_layer", "layerwise_prune", "layer_errors"),
    "chita_minimal.structure.channels": ("taylor_scores", "taylor2_scores", "group_chita_prune"),
    "chita_minimal.structure.sosp": ("sosp_scores",),
    "chita_minimal.structure.spectral": ("spectral_radii", "spectral_scores", "spectral_prune"),
    "chita_minimal.structure.ispasp": ("ispasp_prune",),
    "chita_minimal.structure.smcp": ("knapsack_keep",),
    "chita_minimal.structure.lowrank": ("allocate_ranks", "compress"),
    "chita_minimal.structure.quantize": ("obq_layer", "quantize_model"),
}


@pytest.mark.parametrize("module, name", [(m, f) for m, fs in RENAMED.items() for f in fs])
def test_every_alias_maps_an_old_name_to_a_parameter_of_the_function(module, name):
    fn = getattr(importlib.import_module(module), name)
    params = inspect.signature(fn).parameters
    assert fn.__renamed__
    for old, new in fn.__renamed__.items():
        assert new in params and old not in params


def test_group_param_names_is_a_deprecated_alias():
    from chita_minimal.models import MLPNet
    from chita_minimal.structure import sosp

    with pytest.warns(DeprecationWarning, match="group_weight_names"):
        assert sosp.group_param_names(MLPNet()) == sosp.group_weight_names(MLPNet())


# -- the shared argument checks ---------------------------------------------------------------------


def test_check_int_takes_numpy_integers_and_names_the_argument_and_its_bounds():
    assert check_int("n", np.int64(3)) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_int("bits", 16, low=2, high=16) == 16
    with pytest.raises(ValueError, match=r"bits must lie in \[2, 16\], got 17"):
        check_int("bits", 17, low=2, high=16)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int("n", 0)
    for bad in [True, 2.0, "2", None]:
        with pytest.raises(TypeError, match="n must be an int"):
            check_int("n", bad)


def test_check_number_refuses_non_finite_values_and_wrong_types():
    assert check_number("l2", np.float32(0.5), low=0) == 0.5
    for bad in [float("nan"), float("inf"), -float("inf")]:
        with pytest.raises(ValueError, match="l2 must be a finite number"):
            check_number("l2", bad)
    with pytest.raises(ValueError, match=r"l2 must lie in \(0, inf\], got 0"):
        check_number("l2", 0, low=0, low_open=True)
    for bad in [True, "0.1", None, torch.tensor(0.1)]:
        with pytest.raises(TypeError, match="l2 must be a number"):
            check_number("l2", bad)


def test_check_fraction_is_open_at_both_ends():
    assert check_fraction("fraction", 0.25) == 0.25
    for bad in [0, 1, 1.5, -0.1]:
        with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\)"):
            check_fraction("fraction", bad)


@pytest.mark.parametrize("start", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_model_mode_sets_the_mode_inside_and_restores_it_also_on_error(start, training):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train(start)
    with model_mode(model, training) as m:
        assert m is model and model.training is training and model[1].training is training
    assert model.training is start and model[1].training is start
    with pytest.raises(RuntimeError, match="inside"):
        with model_mode(model, training):
            raise RuntimeError("inside")
    assert model.training is start and model[1].training is start
