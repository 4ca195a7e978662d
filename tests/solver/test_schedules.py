import math

import pytest

from chita_minimal.solver.schedules import SCHEDULES, schedule


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("stages", [1, 2, 5, 16])
@pytest.mark.parametrize("final", [0.5, 0.95, 0.98])
def test_ends_at_target_and_is_monotone(name, stages, final):
    s = schedule(name, final, stages)
    assert len(s) == stages and s[-1] == final
    assert all(b >= a - 1e-15 for a, b in zip(s, s[1:]))
    assert all(0.0 <= x <= final for x in s)


def test_formulas():
    T, b, s = 5, 0.1, 0.9
    exp = [b + (s - b) * 2 ** (T - 1) / (2 ** (T - 1) - 1) * (1 - 2 ** (-t)) for t in range(T)]
    poly = [s + (b - s) * (1 - t / (T - 1)) ** 3 for t in range(T)]
    lin = [b + t * (s - b) / (T - 1) for t in range(T)]
    mfac = [1 - (1 - b) * ((1 - s) / (1 - b)) ** ((t + 1) / T) for t in range(T)]
    for name, ref in [("exp", exp), ("poly", poly), ("linear", lin), ("mfac", mfac), ("const", [s] * T)]:
        assert schedule(name, s, T, base=b) == pytest.approx(ref, abs=1e-12)
    assert schedule("exp", s, T)[0] == pytest.approx(b)
    assert schedule("linear", 0.9, 3) == pytest.approx([0.1, 0.5, 0.9])
    assert schedule("mfac", 0.9, 2, base=0.0)[0] == pytest.approx(1 - math.sqrt(0.1))


@pytest.mark.parametrize("kwargs,word", [
    (dict(name="cosine"), "schedule"),
    (dict(final=1.0), "final"),
    (dict(final=-0.2), "final"),
    (dict(stages=0), "stages"),
    (dict(stages=2.0), "stages"),
    (dict(base=0.99), "base"),
])
def test_bad_input(kwargs, word):
    args = dict(name="exp", final=0.9, stages=4) | kwargs
    with pytest.raises(ValueError, match=word):
        schedule(args.pop("name"), **args)
