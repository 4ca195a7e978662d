"""scripts/gradual_resnet20.py (the gradual chapter's full-length GPU run) in its quick mode on the CPU."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from conftest import needs_cifar

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("gradual_resnet20", ROOT / "scripts" / "gradual_resnet20.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schedules_and_estimates():
    script = _load_script()
    assert script.total_epochs(script.SCHEDULES["100"]) == 100
    totals = [script.total_epochs(plan) for name, plan in script.SCHEDULES.items() if name != "quick"]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    plan = script.SCHEDULES["30"]
    # a gradual CHITA run pays for a pruning step per stage; magnitude pruning's steps cost nothing here
    chita = script.estimate(plan, 2.0, 1.0, 0.1, gradual=True, chita=True)
    mp = script.estimate(plan, 2.0, 1.0, 0.1, gradual=True, chita=False)
    assert chita == pytest.approx(30 * 2.0 + 6 * (1.0 + 0.2)) and mp == pytest.approx(30 * 2.0 + 6 * 0.2)
    assert script.estimate(plan, 2.0, 1.0, 0.1, gradual=False, chita=True) == pytest.approx(30 * 2.0 + 1.2)


@needs_cifar
def test_quick_run_writes_the_comparison(tmp_path):
    script = _load_script()
    # budget 1 s: the two gradual runs always run (they are the comparison), the one-shot runs are skipped
    script.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--checkpoints", str(tmp_path / "ck"),
                 "--budget", "1"])
    rows = list(csv.DictReader(open(tmp_path / "gradual_resnet20_quick.csv")))
    assert [r["method"] for r in rows] == ["CHITA gradual", "MP gradual"]
    for r in rows:
        assert float(r["achieved_sparsity"]) == pytest.approx(0.9, abs=1e-3)
        assert int(r["epochs"]) == script.total_epochs(script.SCHEDULES["quick"])
        assert 0 <= float(r["accuracy"]) <= 100
    history = list(csv.DictReader(open(tmp_path / "gradual_resnet20_quick_history.csv")))
    assert len(history) == 2 * script.SCHEDULES["quick"][0]
    sparsities = [float(h["sparsity"]) for h in history if h["method"] == "CHITA gradual"]
    assert sparsities == sorted(sparsities) and sparsities[0] == pytest.approx(script.RECIPE["base"])
    meta = json.loads((tmp_path / "gradual_resnet20_quick.json").read_text())
    assert meta["schedule"] == "quick" and meta["train_images"] == script.QUICK_IMAGES and meta["recipe"] == dict(script.RECIPE, n_grads=script.QUICK_N_GRADS)
