"""Schedules against their formulas."""
import math

import pytest
import yaml

from brevitas_ana.schedules import make_schedule


@pytest.mark.parametrize("t", [-3.0, 0.0, 2.5, 7.25, 10.0, 13.0])
def test_window(t):
    g = make_schedule({"name": "window", "t_start": 2.0, "t_end": 10.0, "alpha": 3})
    want = 1.0 if t < 2 else 0.0 if t >= 10 else ((10 - t) / 8) ** 3
    assert g(t) == pytest.approx(want, abs=1e-15)


def test_window_alpha_zero_is_static_until_the_end():
    g = make_schedule({"name": "window", "t_start": 0, "t_end": 5, "alpha": 0})
    assert [g(t) for t in (0, 2.5, 4.99, 5, 6)] == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("t", [0.0, 1.0, 4.5, 30.0, 200.0])
def test_unbounded(t):
    g = make_schedule({"name": "unbounded", "t_start": 1.0, "alpha": 2, "cutoff": 1e-3})
    raw = 1.0 if t < 1 else (1 / (t - 1 + 1)) ** 2
    assert g(t) == pytest.approx(raw if raw >= 1e-3 else 0.0)
    assert g(200.0) == 0.0 and g(30.0) > 0


@pytest.mark.parametrize("t", [0.0, 0.3, 1.7, 3.0, 4.0])
def test_linear_cosine_exponential(t):
    lin = make_schedule({"name": "linear", "t_start": 0, "t_end": 3})
    cos = make_schedule({"name": "cosine", "t_start": 0, "t_end": 3})
    exp = make_schedule({"name": "exponential", "decay": 0.5, "cutoff": 0.1})
    const = make_schedule({"name": "constant"})
    assert lin(t) == pytest.approx(max(0.0, (3 - t) / 3) if t < 3 else 0.0)
    assert cos(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * t / 3)) if t < 3 else 0.0)
    assert exp(t) == pytest.approx(0.5 ** t if 0.5 ** t >= 0.1 else 0.0)
    assert const(t) == 1.0


def test_yaml_round_trip():
    text = "name: window\nt_start: 0\nt_end: 2.5\nalpha: 2\n"
    g = make_schedule(yaml.safe_load(text))
    assert make_schedule(g.to_dict()) == g
    assert g(1.25) == pytest.approx(0.25)


@pytest.mark.parametrize("cfg,match", [
    ({"name": "sawtooth"}, "unknown schedule"),
    ({"name": "window", "t_end": 3, "aplha": 2}, r"unknown field\(s\) \['aplha'\]"),
    ({"name": "window", "t_start": 3, "t_end": 1}, "t_end must be > t_start"),
    ({"name": "window", "t_end": 3, "alpha": -1}, "alpha must be >= 0"),
    ({"name": "exponential", "decay": 1.5}, "decay"),
    ({"name": "unbounded", "alpha": "fast"}, "alpha must be a finite number"),
    ({"t_end": 3}, "'name'"),
])
def test_bad_configs(cfg, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(cfg)
