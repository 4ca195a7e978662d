"""The method registry: a method is an object that owns its options; adding one needs no edit of prune.py."""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import chita_minimal as cm
from chita_minimal.methods import Method, Step, register


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(m=64):
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(m, 12, generator=g), torch.randint(0, 3, (m,), generator=g))


@pytest.fixture()
def toy_method():
    """A method added the way a user adds one: a registered dataclass with its options, in its own file."""

    @register
    @dataclass
    class KeepRandom(Method):
        name = "toy-random"
        summary = "keep k weights chosen at random (a sanity baseline)"
        needs_gradients = False
        draw: int = 0

        def check(self):
            if not isinstance(self.draw, int):
                raise TypeError(f"draw must be an int, got {type(self.draw).__name__}")

        def step(self, stage):
            g = torch.Generator().manual_seed(self.draw)
            keep = torch.randperm(stage.w.numel(), generator=g)[: stage.k].to(stage.w.device)
            support = torch.zeros_like(stage.w, dtype=torch.bool)
            support[keep] = True
            return Step(torch.where(support, stage.w, torch.zeros_like(stage.w)), support, None)

    yield KeepRandom
    del cm.methods.REGISTRY["toy-random"]


def test_a_new_method_prunes_through_prune_by_name_and_by_object(toy_method):
    assert "toy-random" in cm.methods.available()
    a, b = _net(), _net()
    rep = cm.prune(a, _data(), 0.75, "toy-random", draw=3)
    cm.prune(b, _data(), 0.75, toy_method(draw=3))
    assert rep.method == "toy-random" and rep.k == round(0.25 * rep.p)
    assert rep.achieved_sparsity == pytest.approx(1 - rep.k / rep.p)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(TypeError, match="draw must be an int"):
        cm.prune(_net(), _data(), 0.75, "toy-random", draw="3")


def test_a_new_method_can_solve_the_stages_of_chita_plus_plus(toy_method):
    rep = cm.prune(_net(), _data(), 0.8, cm.methods.ChitaPlusPlus(stages=3, stage_method=toy_method(draw=1)))
    assert [s["method"] for s in rep.stages] == ["toy-random"] * 3
    assert rep.achieved_sparsity == pytest.approx(1 - rep.k / rep.p)


def test_unknown_option_names_the_option_the_method_and_the_valid_options():
    model = _net()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(TypeError) as e:
        cm.prune(model, _data(), 0.5, "chita", l2s=1e-3)
    msg = str(e.value)
    assert "'l2s'" in msg and "'chita'" in msg and "max_iter" in msg and "l2" in msg  # prune's own arguments too
    with pytest.raises(TypeError, match="'wf'.*'blok_size'.*block_size"):
        cm.prune(model, _data(), 0.5, "chita++", stage_method="wf", blok_size=10)
    with pytest.raises(ValueError, match="unknown method 'obs'.*chita-bso"):
        cm.prune(model, _data(), 0.5, "obs")
    with pytest.raises(TypeError, match="method object"):
        cm.prune(model, _data(), 0.5, cm.methods.WoodFisher(), block_size=10)
    with pytest.raises(TypeError, match="method must be"):
        cm.prune(model, _data(), 0.5, 3)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_name_with_options_is_the_object_with_options():
    a, b = _net(), _net()
    ra = cm.prune(a, _data(), 0.7, "wf", block_size=10, n_grads=32, l2=1e-2)
    rb = cm.prune(b, _data(), 0.7, cm.methods.WoodFisher(block_size=10), n_grads=32, l2=1e-2)
    assert ra.objective == rb.objective
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    a, b = _net(), _net()
    cm.prune(a, _data(), 0.7, "chita++", stages=2, stage_method="chita-block", block_size=16, n_grads=32)
    cm.prune(b, _data(), 0.7, cm.methods.ChitaPlusPlus(stages=2, stage_method=cm.methods.ChitaBlock(block_size=16)),
             n_grads=32)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_method_objects_say_what_they_need():
    assert not cm.methods.Magnitude().needs_gradients and cm.methods.Chita().needs_gradients
    assert cm.methods.WoodFisher().needs_l2 and not cm.methods.Chita().needs_l2
    assert cm.methods.Chita().takes_pattern and not cm.methods.WoodFisher().takes_pattern
    assert cm.methods.ChitaBlock().takes_sharded and not cm.methods.CBS().takes_sharded
    assert not cm.methods.ChitaPlusPlus(stage_method="mp").needs_gradients
    assert isinstance(cm.methods.SparseGPT(), cm.methods.ModelMethod)
    with pytest.raises(ValueError, match="stage_method"):
        cm.methods.ChitaPlusPlus(stage_method="sparsegpt")
    with pytest.raises(ValueError, match="schedule"):
        cm.methods.ChitaPlusPlus(schedule="cubic")
    with pytest.raises(ValueError, match="block_size"):
        cm.methods.ChitaBlock(block_size=0)


def test_registering_twice_or_without_a_name_fails():
    with pytest.raises(ValueError, match="registered already"):
        @register
        @dataclass
        class Other(Method):
            name = "chita"
    with pytest.raises(ValueError, match="name"):
        register(type("Nameless", (Method,), {}))
    with pytest.raises(ValueError, match="'seed' is an argument of prune"):
        @register
        @dataclass
        class Clash(Method):
            name = "clash"
            seed: int = 0


def test_readme_method_table_is_the_registry():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert cm.methods.table() in readme, "README's method table is out of date: paste cm.methods.table()"


def test_sparsegpt_old_option_name_warns_and_still_works():
    a, b = _net(), _net()
    with pytest.warns(DeprecationWarning, match="block_size"):
        cm.prune(a, _data(), 0.5, "sparsegpt", n_grads=32, blocksize=4)
    cm.prune(b, _data(), 0.5, "sparsegpt", n_grads=32, block_size=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.warns(DeprecationWarning, match="names"):
        cm.prune(_net(), _data(), 0.5, "mp", param_names=["1.weight"])


def test_report_prints_a_table():
    model = _net()
    rep = cm.prune(model, _data(), 0.5, "chita", n_grads=32)
    text = str(rep)
    assert re.search(r"1\.weight\s+8 × 12\s+48\s+96\s+0\.5000", text) or "1.weight" in text
    for name, mask in rep.masks.items():
        assert name in text
    assert "objective" in text and "all" in text
    assert isinstance(rep, cm.Report) and rep.target == 0.5 and rep.achieved == rep.achieved_sparsity
