"""Annealing schedules: the factor ``g(t)`` in ``sigma(t) = sigma0 * g(t)`` and ``mu(t) = mu0 * g(t)``.

``t`` is in the controller's time unit (optimiser steps, or epochs, fractional allowed). Every
schedule is a small frozen dataclass built from a plain dict (as read from YAML)::

    make_schedule({"name": "window", "t_start": 0, "t_end": 100, "alpha": 2})

========== ======================================================================================
name       g(t)
========== ======================================================================================
constant   1 (static noise: the classic STEs)
window     1 before t_start; ((t_end - t) / (t_end - t_start)) ** alpha inside; 0 from t_end
           (the paper's bounded window; alpha = 0 keeps the noise static until t_end)
unbounded  1 before t_start; (1 / (t - t_start + 1)) ** alpha after, 0 once below ``cutoff``
           (the paper's unbounded window)
linear     window with alpha = 1
cosine     1 before t_start; (1 + cos(pi (t - t_start) / (t_end - t_start))) / 2; 0 from t_end
exponential 1 before t_start; decay ** (t - t_start), 0 once below ``cutoff``
========== ======================================================================================
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Type

__all__ = ["Schedule", "make_schedule", "SCHEDULES", "Constant", "Window", "Unbounded", "Linear",
           "Cosine", "Exponential"]


def _number(cls_name, field, value, *, minimum=None, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{cls_name}.{field} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{cls_name}.{field} must be >= {minimum}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{cls_name}.{field} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Base class: ``self(t)`` is the annealing factor g(t) in [0, 1]."""
    name = "schedule"

    def __call__(self, t: float) -> float:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    name = "constant"

    def __call__(self, t):
        return 1.0


@dataclasses.dataclass(frozen=True)
class Window(Schedule):
    """g = ((t_end - t) / (t_end - t_start)) ** alpha on [t_start, t_end), 1 before, 0 after."""
    t_start: float = 0.0
    t_end: float = 1.0
    alpha: float = 1.0
    name = "window"

    def __post_init__(self):
        for f in ("t_start", "t_end"):
            _number(type(self).__name__, f, getattr(self, f))
        _number(type(self).__name__, "alpha", self.alpha, minimum=0)
        if self.t_end <= self.t_start:
            raise ValueError(f"{type(self).__name__}.t_end must be > t_start, got "
                             f"t_start={self.t_start}, t_end={self.t_end}")

    def __call__(self, t):
        if t < self.t_start:
            return 1.0
        if t >= self.t_end:
            return 0.0
        return ((self.t_end - t) / (self.t_end - self.t_start)) ** self.alpha


@dataclasses.dataclass(frozen=True)
class Linear(Window):
    """Window with alpha = 1."""
    alpha: float = 1.0
    name = "linear"

    def __post_init__(self):
        super().__post_init__()
        if self.alpha != 1.0:
            raise ValueError(f"Linear.alpha is fixed to 1 (use 'window' for another exponent), "
                             f"got {self.alpha}")


@dataclasses.dataclass(frozen=True)
class Cosine(Window):
    """g = (1 + cos(pi (t - t_start) / (t_end - t_start))) / 2 on the window."""
    alpha: float = 1.0
    name = "cosine"

    def __call__(self, t):
        if t < self.t_start:
            return 1.0
        if t >= self.t_end:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * (t - self.t_start) / (self.t_end - self.t_start)))


@dataclasses.dataclass(frozen=True)
class Unbounded(Schedule):
    """g = (1 / (t - t_start + 1)) ** alpha from t_start, set to 0 once below ``cutoff``."""
    t_start: float = 0.0
    alpha: float = 1.0
    cutoff: float = 1e-3
    name = "unbounded"

    def __post_init__(self):
        _number("Unbounded", "t_start", self.t_start)
        _number("Unbounded", "alpha", self.alpha, minimum=0)
        _number("Unbounded", "cutoff", self.cutoff, minimum=0)

    def __call__(self, t):
        if t < self.t_start:
            return 1.0
        g = (1.0 / (t - self.t_start + 1.0)) ** self.alpha
        return g if g >= self.cutoff else 0.0


@dataclasses.dataclass(frozen=True)
class Exponential(Schedule):
    """g = decay ** (t - t_start) from t_start, set to 0 once below ``cutoff``."""
    t_start: float = 0.0
    decay: float = 0.9
    cutoff: float = 1e-3
    name = "exponential"

    def __post_init__(self):
        _number("Exponential", "t_start", self.t_start)
        _number("Exponential", "decay", self.decay, positive=True)
        if self.decay > 1:
            raise ValueError(f"Exponential.decay must be in (0, 1], got {self.decay}")
        _number("Exponential", "cutoff", self.cutoff, minimum=0)

    def __call__(self, t):
        if t < self.t_start:
            return 1.0
        g = self.decay ** (t - self.t_start)
        return g if g >= self.cutoff else 0.0


SCHEDULES: Dict[str, Type[Schedule]] = {
    cls.name: cls for cls in (Constant, Window, Linear, Cosine, Unbounded, Exponential)}


def make_schedule(config) -> Schedule:
    """A schedule from ``{"name": ..., **fields}`` (or a Schedule, returned as is).

    ``ValueError`` names an unknown schedule, an unknown field or a bad value."""
    if isinstance(config, Schedule):
        return config
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"schedule must be a dict with a 'name' key, got {config!r}")
    fields = dict(config)
    name = fields.pop("name")
    if name not in SCHEDULES:
        raise ValueError(f"schedule name: unknown schedule {name!r}; known: {sorted(SCHEDULES)}")
    cls = SCHEDULES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"schedule {name!r}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**fields)
