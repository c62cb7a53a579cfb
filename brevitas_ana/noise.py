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
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from brevitas_ana.fused import fused

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
        charfn: optional characteristic function ``phi(t) = E[cos(t z)]`` of the standardised
            family (a Python float of a float; real because the family is symmetric). With it the
            sum over the thresholds of an interior stretch is a Fourier series whose terms fall as
            ``phi(2 pi m sigma)`` (:func:`brevitas_ana.expectation.expectation_and_slope`), so the
            cost stops growing with the bit width and ``sigma``.
        cdf_integral: optional ``Psi(z) = integral_{-inf}^{z} F``; with ``pdf_derivatives`` it
            gives the Euler-Maclaurin form of the whole clamped sum for large ``sigma``
            (:func:`brevitas_ana.expectation.euler_maclaurin`).
        pdf_derivatives: optional ``(z, n) -> [f(z), f'(z), ..., f^(n)(z)]``.
        tail_series: optional ``sigma -> (J, k, [c_1 .. c_M], bound_v, bound_s)``: the sum over
            the thresholds past a stair's end beyond the first ``J``, for an element at distance
            ``a >= 0`` inside it, as a power series,
            ``sum_{j>=J} F((-a - 1/2 - j)/sigma) = sum_m c_m y^m``, ``y = exp(-k (a + 1/2 + J))``,
            within ``bound_v`` (its derivative in ``a`` within ``bound_s``). Without it those
            thresholds are summed one by one up to the noise's reach
            (:func:`brevitas_ana.expectation.series_with_ends`).
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
    charfn: Optional[Callable[[float], float]] = None
    cdf_integral: Optional[Callable[[Tensor], Tensor]] = None
    pdf_derivatives: Optional[Callable[[Tensor, int], List[Tensor]]] = None
    tail_series: Optional[Callable[[float], Tuple[int, float, List[float], float, float]]] = None

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
    value, counts = fused(_uniform_kernel, u, lo, hi, a)
    return value, (counts, 0.5 / a)


def _uniform_kernel(u: Tensor, lo: int, hi: int, a: float):
    inv_2a = 0.5 / a
    # beyond [lo - a - 1, hi + a + 1] E is the end level and the slope 0; clamping there keeps
    # +-inf from becoming inf * 0 = NaN (NaN stays NaN, as in Brevitas' clamp(round(x)))
    u = u.clamp(lo - a - 1.0, hi + a + 1.0)
    if hi - lo == 1:  # one threshold (binary): E = lo + F, the slope is 1/2a inside the support
        d = u - (lo + 0.5)
        value = torch.mul(d, inv_2a).add_(0.5).clamp_(0.0, 1.0).add_(lo)
        # uint8 through where: inductor's CPU code stores a bool output ~20x slower
        return value, torch.where(d.abs_() < a, 1, 0).to(torch.uint8)
    b0 = torch.add(u, 0.5 - a).floor_().clamp_(lo, hi)
    m = torch.add(u, 0.5 + a).floor_().clamp_(lo, hi).sub_(b0)
    value = torch.sub(u, b0).add_(a).add_(m, alpha=-0.5).mul_(m).mul_(inv_2a).add_(b0)
    # 0 <= m <= hi - lo: one byte up to 8 bits, cast here rather than in a launch of its own
    return value, m.to(torch.uint8 if hi - lo <= 255 else torch.int32)


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


def _triangular_expectation(u: Tensor, lo: int, hi: int, sigma: float):
    """Closed form for triangular noise of half-width ``b = sqrt(6) sigma``.

    A threshold at distance ``d = u - t_k`` contributes ``F = 1`` for ``d >= b``,
    ``1 - (b - d)^2 / 2b^2`` for ``0 < d < b``, ``(b + d)^2 / 2b^2`` for ``-b < d <= 0`` and 0
    below; its slope is ``(b - |d|) / b^2`` inside the support. The thresholds of each piece are a
    contiguous run ``k = c .. c + n - 1`` (clamped to ``lo .. hi - 1``), so each piece is a sum of
    squares of an arithmetic progression. With ``c0 <= c1 <= c2`` the first threshold index at
    distance ``< b``, ``< 0`` and ``<= -b`` (each clamped to ``[lo, hi]``), ``nB = c1 - c0``,
    ``nC = c2 - c1``, ``pB = b - (u - c0 - 1/2)`` and ``pC = b + (u - c1 - 1/2)`` (both in
    ``[0, b]``), and ``S2(p, n, s) = n p^2 + s p n (n - 1) + (n - 1) n (2n - 1) / 6``:

        E     = c0 + nB - S2(pB, nB, +1) / 2b^2 + S2(pC, nC, -1) / 2b^2
        dE/du = (nB pB + nB (nB - 1) / 2) / b^2 + (nC pC - nC (nC - 1) / 2) / b^2

    Exact (no truncation) at O(1) cost per element for every bit width and ``sigma``; every term is
    of the order of the window, so nothing cancels catastrophically at 8 bits.
    """
    return fused(_triangular_kernel, u, lo, hi, sigma)


def _triangular_kernel(u: Tensor, lo: int, hi: int, sigma: float):
    b = _SQRT6 * sigma
    inv_2b2 = 0.5 / (b * b)
    # beyond [lo - b - 1, hi + b + 1] E is the end level and the slope 0; clamping keeps +-inf out
    u = u.clamp(lo - b - 1.0, hi + b + 1.0)
    c0 = torch.add(u, -0.5 - b).ceil_().clamp_(lo, hi)
    c1 = torch.add(u, -0.5).ceil_().clamp_(lo, hi)
    nC = torch.add(u, b - 0.5).ceil_().clamp_(lo, hi).sub_(c1)
    nB = c1 - c0
    pB = torch.sub(c0, u).add_(b + 0.5)
    pC = torch.sub(u, c1).add_(b - 0.5)
    # n (n - 1) / 2 and (n - 1) n (2n - 1) / 6 of each run
    tB, tC = nB * (nB - 1.0) * 0.5, nC * (nC - 1.0) * 0.5
    qB = tB * (2.0 * nB - 1.0) / 3.0
    qC = tC * (2.0 * nC - 1.0) / 3.0
    # S2 = n p^2 +- 2 p T + Q, with T = n (n - 1) / 2
    sB = (pB * nB + 2.0 * tB) * pB + qB
    sC = (pC * nC - 2.0 * tC) * pC + qC
    value = (sC - sB) * inv_2b2 + nB + c0
    slope = (pB * nB + tB + pC * nC - tC) * (2.0 * inv_2b2)
    return value, slope


register_noise(NoiseFamily(
    name="triangular",
    cdf=_triangular_cdf,
    pdf=lambda z: torch.relu(1.0 - z.abs() / _SQRT6) / _SQRT6,
    support=_SQRT6,
    icdf=_triangular_icdf,
    reference_scale=_SQRT6,
    bounded=True,
    expectation=_triangular_expectation,
))

# --- normal: truncated at 6 standard deviations ----------------------------------------------
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _normal_cdf(z: Tensor) -> Tensor:
    # erf, not torch.special.ndtr: the compiler fuses erf into the closed form's kernel
    return torch.mul(z, _INV_SQRT2).erf_().add_(1.0).mul_(0.5)


def _normal_pdf(z: Tensor) -> Tensor:
    return torch.square(z).mul_(-0.5).exp_().mul_(_INV_SQRT2PI)


def _normal_pdf_derivatives(z: Tensor, n: int) -> List[Tensor]:
    # f^(k) = (-1)^k He_k(z) f(z), He_{k+1} = z He_k - k He_{k-1} (probabilists' Hermite)
    f = _normal_pdf(z)
    out, h_prev, h = [f], torch.ones_like(z), z
    for k in range(1, n + 1):
        out.append(h * f if k % 2 == 0 else -(h * f))
        h_prev, h = h, z * h - k * h_prev
    return out


register_noise(NoiseFamily(
    name="normal",
    cdf=_normal_cdf,
    pdf=_normal_pdf,
    support=6.0,
    icdf=lambda p: math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0),
    reference_scale=1.0,
    charfn=lambda t: math.exp(-0.5 * t * t),
    # integral of Phi: z Phi(z) + phi(z)
    cdf_integral=lambda z: _normal_cdf(z).mul_(z).add_(_normal_pdf(z)),
    pdf_derivatives=_normal_pdf_derivatives,
))

# --- logistic: scale s = sqrt(3)/pi gives unit variance; truncated at 11.5 std ----------------
_LOGISTIC_S = _SQRT3 / math.pi


def _logistic_cdf(z: Tensor) -> Tensor:
    return torch.sigmoid(z * (1.0 / _LOGISTIC_S))


def _logistic_pdf(z: Tensor) -> Tensor:
    F = _logistic_cdf(z)
    return (1.0 - F).mul_(F).mul_(1.0 / _LOGISTIC_S)


def _logistic_charfn(t: float) -> float:
    # E[cos(t z)] of the logistic of scale s: pi s t / sinh(pi s t)
    x = math.pi * _LOGISTIC_S * abs(t)
    if x < 1e-8:
        return 1.0
    return x / math.sinh(x) if x < 700.0 else 0.0


def _logistic_polynomials(n: int) -> List[List[float]]:
    # f^(k)(z) = Q_k(w) / s^(k+1) with w = F(z): Q_0 = w (1 - w), Q_{k+1} = Q_k'(w) w (1 - w)
    Q = [[0.0, 1.0, -1.0]]
    for _ in range(n):
        d = [i * c for i, c in enumerate(Q[-1])][1:]
        nxt = [0.0] * (len(d) + 2)
        for i, c in enumerate(d):  # times w - w^2
            nxt[i + 1] += c
            nxt[i + 2] -= c
        Q.append(nxt)
    return Q


# computed once (derivative orders up to 16 cover every Euler-Maclaurin use), not per call,
# with the powers of s: a power inside a compiled kernel is a scalar pow per vector of elements
_LOGISTIC_Q = _logistic_polynomials(16)
_LOGISTIC_SCALES = [_LOGISTIC_S ** -(k + 1) for k in range(len(_LOGISTIC_Q))]


def _logistic_pdf_derivatives(z: Tensor, n: int) -> List[Tensor]:
    if n >= len(_LOGISTIC_Q):
        raise ValueError(f"logistic pdf_derivatives: order {n} > {len(_LOGISTIC_Q) - 1}")
    w = _logistic_cdf(z)
    out = []
    for k, q in enumerate(_LOGISTIC_Q[:n + 1]):
        acc = torch.full_like(w, q[-1])
        for c in reversed(q[:-1]):
            acc = acc * w + c
        out.append(acc * _LOGISTIC_SCALES[k])
    return out


def _logistic_tail_series(sigma: float) -> Tuple[int, float, List[float], float, float]:
    """Thresholds past a stair's end for logistic noise of scale ``b = s sigma`` steps: with
    ``y_j = exp(-(a + 1/2 + j) / b)`` each contributes ``F = y_j / (1 + y_j)``, and expanding
    ``1 / (1 + y_j)`` (``y_j < 1``) and summing the geometric series over ``j >= J``:

        sum_{j>=J} y_j / (1 + y_j) = sum_{m>=1} (-1)^(m+1) y^m / (1 - q^m),
        y = exp(-(a + 1/2 + J) / b),  q = exp(-1/b)

    ``J = ceil(3b - 1/2)`` makes ``y <= e^-3`` for every ``a >= 0``; the terms then alternate and
    fall, so stopping after ``M`` leaves at most the next one: ``y^(M+1) / (1 - q^(M+1))``
    (value), ``(M + 1) y^(M+1) / (b (1 - q^(M+1)))`` (derivative in ``a``). ``M`` is the
    smallest making both <= 1e-9."""
    b = _LOGISTIC_S * sigma
    k = 1.0 / b
    J = max(int(math.ceil(3.0 * b - 0.5)), 0)
    y_max = math.exp(-k * (J + 0.5))
    coeffs = []
    while True:
        m = len(coeffs) + 1
        coeffs.append((1.0 if m % 2 else -1.0) / -math.expm1(-k * m))
        nxt = y_max ** (m + 1) / -math.expm1(-k * (m + 1))
        if nxt <= 1e-9 and k * (m + 1) * nxt <= 1e-9:
            return J, k, coeffs, nxt, k * (m + 1) * nxt


register_noise(NoiseFamily(
    name="logistic",
    cdf=_logistic_cdf,
    pdf=_logistic_pdf,
    support=11.5,
    icdf=lambda p: _LOGISTIC_S * torch.logit(p),
    reference_scale=_LOGISTIC_S,
    charfn=_logistic_charfn,
    # integral of the logistic CDF: s softplus(z / s)
    cdf_integral=lambda z: torch.nn.functional.softplus(z * (1.0 / _LOGISTIC_S)) * _LOGISTIC_S,
    pdf_derivatives=_logistic_pdf_derivatives,
    tail_series=_logistic_tail_series,
))
