"""Noise families: the distributions ANA adds to a quantiser's input.

Every family is described in *standardised* form: zero mean and unit standard deviation. A noise of
standard deviation ``sigma`` (in quantisation steps) and mean ``mu`` has CDF ``F((e - mu) / sigma)``
and PDF ``f((e - mu) / sigma) / sigma``. Using the standard deviation for every family is what lets
shapes be compared at equal spread.

The reference code of Spallanzani et al. parametrises the families differently; ``reference_scale``
converts (reference parameter = ``reference_scale * sigma``):

=========== ====================== =========================== ===================
family      reference parameter    reference_scale             support (std units)
=========== ====================== =========================== ===================
uniform     half-width of support  sqrt(3)   ~ 1.7321          sqrt(3), exact
triangular  half-width of support  sqrt(6)   ~ 2.4495          sqrt(6), exact
normal      standard deviation     1                           6.0, truncated
logistic    scale s                sqrt(3)/pi ~ 0.5513         11.5, truncated
=========== ====================== =========================== ===================

For the unbounded families ``support`` is where the sum over thresholds is truncated: each omitted
threshold contributes less than ``1 - F(support)`` (normal: 9.9e-10, logistic: 8.6e-10) and all of
them together at most ``2 * (1 - F(support)) * (1 + sigma)`` to the expectation and
``2 * (f(support) / sigma + 1 - F(support))`` to its slope (each side's omitted terms are bounded by
the first one plus the integral of the tail).

Every family also has a *starting* noise, ``default_sigma``: the spread the reference experiment
starts from, the one that puts 95 % of the mass within +-1/2 step (for the bounded families the
whole support is +-1/2 step)::

    bounded families:    default_sigma = (1/2) / support           (support * sigma = 1/2)
    unbounded families:  default_sigma = (1/2) / F^-1(0.975)        (P(|e| < 1/2) = 0.95)

=========== ============= ===========================
family      default_sigma  reference parameter
=========== ============= ===========================
uniform     0.2887         half-width 0.5
triangular  0.2041         half-width 0.5
normal      0.2551         standard deviation 0.2551
logistic    0.2476         scale 0.1365
=========== ============= ===========================

A user adds a family with :func:`register_noise`; the library needs nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["NoiseFamily", "register_noise", "get_noise", "noise_families"]


@dataclass(frozen=True)
class NoiseFamily:
    """A zero-mean, unit-variance, symmetric, unimodal noise distribution.

    Attributes:
        name: registry key.
        cdf: ``F(z)``, elementwise on a tensor; must give 0 at ``-inf`` and 1 at ``+inf``.
        pdf: ``f(z) = F'(z)``, elementwise on a tensor.
        support: half-width (in standard deviations) outside which ``F`` is taken as exactly 0 or 1.
            Exact for bounded families, a truncation point for unbounded ones.
        icdf: ``F^-1(p)`` for sampling (the ``"random"`` strategy); when omitted, ``F`` is inverted
            by bisection on ``[-support, support]``.
        reference_scale: the reference code's parameter for this family divided by ``sigma``.
        bounded: True when ``support`` is exact (the noise never exceeds it), False when it is a
            truncation point.
        default_sigma: starting standard deviation (steps); when omitted, the one with 95 % of the
            mass within +-1/2 step (bounded: support within +-1/2 step), see the module docstring.
        expectation: optional closed form ``(u, lo, hi, sigma) -> (E, dE/du)`` of
            ``E[clamp(round(u + e), lo, hi)]`` (``e`` of standard deviation ``sigma``) that replaces
            the generic sum over thresholds; ``dE/du`` may be a tensor or a pair
            ``(integer-valued tensor, float factor)`` whose product is the slope.
    """

    name: str
    cdf: Callable[[Tensor], Tensor]
    pdf: Callable[[Tensor], Tensor]
    support: float
    icdf: Optional[Callable[[Tensor], Tensor]] = None
    reference_scale: float = 1.0
    bounded: bool = False
    default_sigma: Optional[float] = None
    expectation: Optional[Callable[[Tensor, int, int, float], Tuple[Tensor, Tensor]]] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"NoiseFamily.name must be a non-empty string, got {self.name!r}")
        if not callable(self.cdf) or not callable(self.pdf):
            raise ValueError(f"NoiseFamily {self.name!r}: cdf and pdf must be callables")
        if not (isinstance(self.support, (int, float)) and math.isfinite(self.support)
                and self.support > 0):
            raise ValueError(
                f"NoiseFamily {self.name!r}: support must be a finite positive number of "
                f"standard deviations, got {self.support!r}")
        if self.default_sigma is None:
            # frozen dataclass: the derived default is set once, here
            object.__setattr__(self, "default_sigma", 0.5 / self.mass_quantile(0.95))
        elif not (isinstance(self.default_sigma, (int, float)) and math.isfinite(self.default_sigma)
                  and self.default_sigma > 0):
            raise ValueError(f"NoiseFamily {self.name!r}: default_sigma must be a finite positive "
                             f"number, got {self.default_sigma!r}")

    def mass_quantile(self, mass: float) -> float:
        """The half-width ``z`` (standard deviations) with ``P(|e| <= z) = mass``, i.e.
        ``F^-1((1 + mass) / 2)``; for a bounded family the whole support, whatever ``mass``."""
        if self.bounded:
            return float(self.support)
        p = (1.0 + mass) / 2.0
        if self.icdf is not None:
            return float(self.icdf(torch.tensor(p, dtype=torch.float64)))
        lo, hi = 0.0, float(self.support)
        for _ in range(60):  # bisection on F
            mid = 0.5 * (lo + hi)
            if float(self.cdf(torch.tensor(mid, dtype=torch.float64))) < p:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def sample(self, like: Tensor) -> Tensor:
        """Standardised noise samples with the shape, dtype and device of ``like``."""
        # Keep p away from 0 and 1 so that unbounded inverse CDFs stay finite.
        eps = torch.finfo(like.dtype).eps
        p = torch.rand_like(like).clamp_(eps, 1.0 - eps)
        if self.icdf is not None:
            return self.icdf(p)
        lo = torch.full_like(p, -self.support)
        hi = torch.full_like(p, self.support)
        for _ in range(40 if like.dtype == torch.float64 else 26):
            mid = 0.5 * (lo + hi)
            below = self.cdf(mid) < p
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return 0.5 * (lo + hi)


_REGISTRY: Dict[str, NoiseFamily] = {}


def register_noise(family: NoiseFamily, overwrite: bool = False) -> NoiseFamily:
    """Add ``family`` to the registry under ``family.name`` (``ValueError`` if taken, unless
    ``overwrite``). Returns the family, so it can be used as a decorator-free one-liner."""
    if not isinstance(family, NoiseFamily):
        raise ValueError(f"register_noise expects a NoiseFamily, got {type(family).__name__}")
    if family.name in _REGISTRY and not overwrite:
        raise ValueError(f"noise family {family.name!r} is already registered "
                         "(pass overwrite=True to replace it)")
    _REGISTRY[family.name] = family
    return family


def get_noise(noise) -> NoiseFamily:
    """The family called ``noise`` (or ``noise`` itself when it already is a NoiseFamily)."""
    if isinstance(noise, NoiseFamily):
        return noise
    try:
        return _REGISTRY[noise]
    except (KeyError, TypeError):
        raise ValueError(
            f"noise: unknown noise family {noise!r}; known: {sorted(_REGISTRY)}") from None


def noise_families() -> Tuple[str, ...]:
    """Names of the registered families."""
    return tuple(sorted(_REGISTRY))


# --- uniform: support [-sqrt(3), sqrt(3)] ------------------------------------------------------
_SQRT3 = math.sqrt(3.0)


def _uniform_expectation(u: Tensor, lo: int, hi: int, sigma: float):
    """Closed form for uniform noise of half-width ``a = sqrt(3) sigma``.

    E[Q(u + e)] = (1 / 2a) * integral_{u-a}^{u+a} Q(v) dv. With ``b0 = clamp(floor(u - a + 1/2),
    lo, hi)`` (lo plus the number of thresholds ``t_k = k + 1/2`` below the window),
    ``b1 = clamp(floor(u + a + 1/2), lo, hi)`` and ``m = b1 - b0`` (the thresholds inside it):

        E     = b0 + m * (u + a - b0 - m / 2) / (2a)
        dE/du = m / (2a)

    Cost is O(1) per element whatever the bit width and sigma, and every term stays of the order of
    the window, so nothing cancels catastrophically at 8 bits. The slope is returned factored as
    ``(m, 1 / 2a)``: ``m`` is a small integer, so backward can keep it in one byte.
    """
    a = _SQRT3 * sigma
    inv_2a = 0.5 / a
    # beyond [lo - a - 1, hi + a + 1] E is the end level and the slope 0; clamping there keeps
    # +-inf from becoming inf * 0 = NaN (NaN stays NaN, as in Brevitas' clamp(round(x)))
    u = u.clamp(lo - a - 1.0, hi + a + 1.0)
    if hi - lo == 1:  # one threshold (binary): E = lo + F, the slope is 1/2a inside the support
        d = u - (lo + 0.5)
        value = torch.mul(d, inv_2a).add_(0.5).clamp_(0.0, 1.0).add_(lo)
        return value, (d.abs_() < a, inv_2a)
    b0 = torch.add(u, 0.5 - a).floor_().clamp_(lo, hi)
    m = torch.add(u, 0.5 + a).floor_().clamp_(lo, hi).sub_(b0)
    value = torch.sub(u, b0).add_(a).add_(m, alpha=-0.5).mul_(m).mul_(inv_2a).add_(b0)
    return value, (m, inv_2a)


register_noise(NoiseFamily(
    name="uniform",
    cdf=lambda z: torch.clamp(z * (0.5 / _SQRT3) + 0.5, 0.0, 1.0),
    pdf=lambda z: (z.abs() < _SQRT3).to(z.dtype) * (0.5 / _SQRT3),
    support=_SQRT3,
    icdf=lambda p: (2.0 * p - 1.0) * _SQRT3,
    reference_scale=_SQRT3,
    bounded=True,
    expectation=_uniform_expectation,
))

# --- triangular: support [-sqrt(6), sqrt(6)] ---------------------------------------------------
_SQRT6 = math.sqrt(6.0)


def _triangular_cdf(z: Tensor) -> Tensor:
    # With t = z / b clamped to [-1, 1]: F = 1/2 + t - t|t|/2 (both quadratic pieces at once).
    t = torch.clamp(z / _SQRT6, -1.0, 1.0)
    return 0.5 + t - 0.5 * t * t.abs()


def _triangular_icdf(p: Tensor) -> Tensor:
    t = torch.where(p < 0.5, torch.sqrt(2.0 * p) - 1.0, 1.0 - torch.sqrt(2.0 * (1.0 - p)))
    return t * _SQRT6


register_noise(NoiseFamily(
    name="triangular",
    cdf=_triangular_cdf,
    pdf=lambda z: torch.relu(1.0 - z.abs() / _SQRT6) / _SQRT6,
    support=_SQRT6,
    icdf=_triangular_icdf,
    reference_scale=_SQRT6,
    bounded=True,
))

# --- normal: truncated at 6 standard deviations ----------------------------------------------
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)

register_noise(NoiseFamily(
    name="normal",
    cdf=lambda z: 0.5 * (1.0 + torch.erf(z * _INV_SQRT2)),
    pdf=lambda z: torch.exp(-0.5 * z * z) * _INV_SQRT2PI,
    support=6.0,
    icdf=lambda p: math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0),
    reference_scale=1.0,
))

# --- logistic: scale s = sqrt(3)/pi gives unit variance; truncated at 11.5 std ----------------
_LOGISTIC_S = _SQRT3 / math.pi


def _logistic_pdf(z: Tensor) -> Tensor:
    F = torch.sigmoid(z / _LOGISTIC_S)
    return F * (1.0 - F) / _LOGISTIC_S


register_noise(NoiseFamily(
    name="logistic",
    cdf=lambda z: torch.sigmoid(z / _LOGISTIC_S),
    pdf=_logistic_pdf,
    support=11.5,
    icdf=lambda p: _LOGISTIC_S * torch.logit(p),
    reference_scale=_LOGISTIC_S,
))
