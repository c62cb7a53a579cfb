"""Argument checks of the ANA options, shared by every place a value enters (the options object,
the quantisers' setters, the controller, :func:`~brevitas_ana.functional.ana_round`): each
returns the value converted, or raises ``ValueError`` naming the argument. No numerics here, so
the options dataclass can check its fields without importing the rounding code."""
from __future__ import annotations

import math
from typing import Union

from torch import Tensor

STRATEGIES = ("expectation", "mode", "random")
#: What the gradient is once sigma has been annealed to 0: Brevitas' usual round-STE
#: (identity inside the clamp range) or the exact derivative of the stair, i.e. zero.
ANNEALED_GRADS = ("ste", "zero")
#: Backward policies of a quantiser: the derivative of the forward's expectation (``exact``) or
#: of the expectation at ``max(sigma, sigma_grad_min)`` (``floor``).
BACKWARDS = ("exact", "floor")
#: The controller's annealing presets (:class:`~brevitas_ana.AnaController`).
PRESETS = ("homogeneous", "progressive", "partition", "same_start", "same_end", "static")
#: The controller's backward policies: a quantiser's own, or the floor on a schedule.
BACKWARD_POLICIES = ("exact", "floor", "schedule")

Number = Union[float, int, Tensor]

def check_number(name: str, value: Number) -> float:
    """A finite Python float from a number or a one-element tensor; ``ValueError`` naming
    ``name``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_bound(name: str, value: Number) -> int:
    """An integer clamp bound from a number; ``ValueError`` naming ``name``."""
    v = check_number(name, value)
    if v != round(v):
        raise ValueError(f"{name} must be an integer clamp bound, got {v}")
    return int(round(v))


def check_sigma(name: str, value: Number) -> float:
    """A finite, non-negative standard deviation (steps); ``ValueError`` naming ``name``."""
    value = check_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (a standard deviation in steps), got {value}")
    return value


def check_backward(backward: str) -> str:
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    return backward


def check_noise_args(sigma: Number, mu: Number, strategy: str, annealed_grad: str):
    """Validate and convert the noise arguments; ``ValueError`` naming the bad one."""
    sigma = check_sigma("sigma", sigma)
    mu = check_number("mu", mu)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if annealed_grad not in ANNEALED_GRADS:
        raise ValueError(f"annealed_grad must be one of {ANNEALED_GRADS}, got {annealed_grad!r}")
    return sigma, mu
