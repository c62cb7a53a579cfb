"""How ``E[Q(u + e)] = lo + sum_k F((u - t_k)/sigma)`` and its slope ``sum_k f((u - t_k)/sigma)
/ sigma`` are evaluated at O(1) cost per element, whatever the number of thresholds: the noise
family's closed form, the Euler-Maclaurin form of the whole clamped sum, the Fourier series of the
unclamped stair with its ends, or the direct sum over the thresholds in reach
(:func:`expectation_and_slope` chooses); and the most probable level (:func:`mode_level`).
Derivations and error bounds: ``docs/closed-forms.md``. The autograd function that uses them is
:mod:`brevitas_ana.functional`.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from brevitas_ana.fused import fused
from brevitas_ana.noise import NoiseFamily

__all__ = ["expectation_and_slope", "mode_level", "slope_tensor"]

#: Largest error the Fourier series of :func:`periodic_expectation` may add to the slope (its value
#: error is at most ``SERIES_TOL / (2 pi)``): below float32 resolution of a slope of order 1.
SERIES_TOL = 1e-7
#: More terms than this and the direct sum over the few thresholds within reach is cheaper.
SERIES_MAX_TERMS = 8


def series_terms(family: NoiseFamily, sigma: float) -> Optional[Tuple[List[float], float]]:
    """``phi_m = phi(2 pi m sigma)``, ``m = 1 .. M``, for the smallest ``M`` whose omitted terms
    satisfy ``2 sum_{m > M} |phi_m| <= SERIES_TOL``, and that omitted sum (the slope's error
    bound); ``None`` when the family has no characteristic function or ``M > SERIES_MAX_TERMS``."""
    if family.charfn is None:
        return None
    phis = []
    for m in range(1, SERIES_MAX_TERMS + 64):
        phis.append(family.charfn(2.0 * math.pi * m * sigma))
        if m == SERIES_MAX_TERMS + 1 and 2.0 * abs(phis[-1]) > SERIES_TOL:
            return None  # the omitted tail would exceed the tolerance at any M allowed
        if abs(phis[-1]) < 1e-30:
            break
    else:
        return None
    tail, M = 0.0, len(phis)
    while M > 0 and 2.0 * (tail + abs(phis[M - 1])) <= SERIES_TOL:
        tail += abs(phis[M - 1])
        M -= 1
    return phis[:M], 2.0 * tail


def _chebyshev(M: int):
    # monomial coefficients (index = power) of T_0..T_M and U_0..U_M
    T, U = [[1.0], [0.0, 1.0]], [[1.0], [0.0, 2.0]]
    for m in range(2, M + 1):
        for P in (T, U):
            nxt = [0.0] + [2.0 * c for c in P[m - 1]]
            for i, c in enumerate(P[m - 2]):
                nxt[i] -= c
            P.append(nxt)
    return T, U


def _series_polynomials(phis: List[float]) -> Tuple[List[float], List[float]]:
    """Monomial coefficients (in ``x = cos(2 pi r)``) of the value's correction
    ``sum_m a_m U_{m-1}(x)`` (times ``sin(2 pi r)``) and of the slope ``1 - sum_m c_m T_m(x)``."""
    M = len(phis)
    T, U = _chebyshev(M)
    pv, ps = [0.0] * M, [0.0] * (M + 1)
    for m in range(1, M + 1):
        sign = 1.0 if m % 2 else -1.0
        for i, c in enumerate(U[m - 1]):
            pv[i] += c * sign * phis[m - 1] / (math.pi * m)
        for i, c in enumerate(T[m]):
            ps[i] -= c * 2.0 * sign * phis[m - 1]
    ps[0] += 1.0
    return pv, ps


def _periodic(u: Tensor, pv: List[float], ps: List[float]) -> Tuple[Tensor, Tensor]:
    if not pv:
        return u.clone(), torch.ones_like(u)
    theta = torch.round(u).sub_(u).mul_(-2.0 * math.pi)
    x = torch.cos(theta)
    value = torch.full_like(u, pv[-1])
    for c in reversed(pv[:-1]):
        value.mul_(x).add_(c)
    value = torch.addcmul(u, value, theta.sin_(), value=-1.0)
    slope = torch.full_like(u, ps[-1])
    for c in reversed(ps[:-1]):
        slope.mul_(x).add_(c)
    return value, slope


def periodic_expectation(u: Tensor, phis: List[float]) -> Tuple[Tensor, Tensor]:
    """``E[round(u + e)]`` and its slope for the *unclamped* stair (Poisson summation; ``e``
    symmetric with characteristic function ``phi``, ``phi_m = phi(2 pi m sigma)``):

        E     = u - sum_{m=1}^{M} (-1)^(m+1) phi_m sin(2 pi m r) / (pi m)
        dE/du = 1 - 2 sum_{m=1}^{M} (-1)^(m+1) phi_m cos(2 pi m r),      r = u - round(u)

    (the sawtooth ``v - round(v) = sum_m (-1)^(m+1) sin(2 pi m v) / (pi m)`` averaged over the
    noise). Omitting the terms ``m > M`` changes the slope by at most ``2 sum_{m>M} |phi_m|`` and
    the value by at most ``sum_{m>M} |phi_m| / (pi (M + 1))``. Evaluated as two polynomials in
    ``cos(2 pi r)`` (Chebyshev T and U in monomial form, Horner): one sin, one cos and ``2M``
    multiply-adds per element; ``r`` keeps the phase exact in float32 for any ``u``.
    """
    return _periodic(u, *_series_polynomials(phis))


def tail_terms(R: float) -> int:
    """How many thresholds past a stair's end can be within the noise's reach ``R`` of an element
    on the inside: ``ceil(R - 1/2)``, rounded up to a multiple of 4 beyond 8 (a compiled loop is
    specialised to its length: an annealed sigma compiles a handful of lengths, not one per step;
    the extra thresholds are beyond the reach, ``F = 0`` within the truncation bound)."""
    J = max(int(math.ceil(R - 0.5)), 1)
    return J if J <= 8 else -(-J // 4) * 4


def series_with_ends(u: Tensor, family: NoiseFamily, lo: int, hi: int, sigma: float, J: int,
                     k: float, tail_c: List[float], pv: List[float], ps: List[float]
                     ) -> Tuple[Tensor, Tensor]:
    """The clamped sum from the unclamped stair's Fourier series (:func:`periodic_expectation`)
    and the thresholds past the nearer end ``e`` (``lo`` below the middle, ``hi`` above it):

        E     = B(u) + s C(|u - e|),     C(a) = sum_{j>=0} F((-a - 1/2 - j) / sigma)
        dE/du = B'(u) + s sign(u - e) C'(a)

    with ``s = +1`` at ``lo`` and ``-1`` at ``hi``, and ``B`` the series ``P(u)`` inside
    ``[lo, hi]``, the end level ``e`` (slope 0) outside it. Inside, ``C`` adds back the thresholds
    below ``lo`` the series counted as missing (or takes out those above ``hi``); outside, the
    stair is its end level plus the thresholds towards the inside. ``C`` sums its first ``J``
    terms one by one and the rest as ``sum_m c_m exp(-k (a + 1/2 + J))^m`` (``tail_c``, the
    family's ``tail_series``; without one, ``J >= R - 1/2`` terms reach past the noise's reach
    ``R`` and ``tail_c`` is empty). Exact up to the series' bound, the tail series' bound and the
    truncation bound of the direct sum when every element is within ``R`` of one end at most
    (:func:`expectation_and_slope` uses it for ``hi - lo >= 2R + 1``). Cost: one sin, one cos,
    the series' ``2M`` multiply-adds and ``J`` evaluations of ``F`` and ``f`` (plus one exp and
    the tail polynomial), whatever the bit width. ``u`` comes first: the function is compiled as
    it stands (:func:`brevitas_ana.fused.fused`).
    """
    inv_sigma = 1.0 / sigma
    R = family.support * sigma
    value_p, slope_p = _periodic(u, pv, ps)
    lower = u < 0.5 * (lo + hi)
    e = torch.where(lower, lo, hi).to(u.dtype)
    # a beyond R adds nothing within the truncation bound; clamping keeps +-inf out (NaN stays)
    a = (u - e).abs_().clamp_max_(R)
    tail, tail_slope = torch.zeros_like(u), torch.zeros_like(u)  # C(a), -C'(a) >= 0
    for j in range(J):
        z = _in_reach(torch.neg(a).sub_(0.5 + j).mul_(inv_sigma), family)
        tail = tail + family.cdf(z)
        tail_slope = tail_slope + family.pdf(z)
    tail_slope = tail_slope * inv_sigma
    if tail_c:
        y = torch.add(a, 0.5 + J).mul_(-k).exp_()
        acc_v = torch.full_like(u, tail_c[-1])
        acc_s = torch.full_like(u, len(tail_c) * tail_c[-1])
        for m in range(len(tail_c) - 1, 0, -1):
            acc_v = acc_v * y + tail_c[m - 1]
            acc_s = acc_s * y + m * tail_c[m - 1]
        tail = tail + acc_v * y
        tail_slope = tail_slope + acc_s * y * k
    inside = (u >= lo) & (u <= hi)
    value = torch.where(inside, value_p, e) + torch.where(lower, tail, -tail)
    # s sign(u - e) C'(a): -C' inside the range, +C' (the direct sum) outside it
    slope = torch.where(inside, slope_p - tail_slope, tail_slope)
    return _end_levels(u, value, slope, lo, hi, R)


def _in_reach(z: Tensor, family: NoiseFamily) -> Tensor:
    """``z`` clamped to ``+-2 support``: ``F`` and ``f`` there differ from their limits by
    ``F(-2 support)`` (normal 1e-32, logistic 8e-19), far below the truncation bound, and ``exp``
    and ``erf`` never underflow. Underflowing arguments take the vector math library's slow path:
    without the clamp a wide input (most activations sit far outside a 4-bit range in steps)
    made the same kernel 2-3x slower."""
    return z.clamp(-2.0 * family.support, 2.0 * family.support)


def _end_levels(u: Tensor, value: Optional[Tensor], slope: Optional[Tensor], lo: int, hi: int,
                R: float):
    """Exactly ``lo`` / ``hi`` (slope 0) where every threshold is beyond the reach ``R``: a
    kernel's terms there are ``F(-2 support)``-small but not 0, and Brevitas' clamp(round(x))
    gives exact end levels (``+-inf`` included). NaN stays NaN."""
    below, above = u <= lo - 0.5 - R, u >= hi + 0.5 + R
    if value is not None:
        value = torch.where(below, lo, torch.where(above, hi, value))
    if slope is not None:
        slope = torch.where(below | above, 0.0, slope)
    return value, slope


#: At most this many Euler-Maclaurin correction terms (derivatives of f up to order 2 * 5):
#: beyond that the polynomials cost more than summing the thresholds in a fused kernel.
EM_MAX_TERMS = 5
_EM_CACHE: dict = {}


def _bernoulli(n: int) -> List[float]:
    # B_0 .. B_n (B_1 = -1/2) from sum_{j<=m} C(m+1, j) B_j = 0
    B = [1.0]
    for m in range(1, n + 1):
        B.append(-sum(math.comb(m + 1, j) * B[j] for j in range(m)) / (m + 1))
    return B


def _em_constants(family: NoiseFamily):
    """Per ``P``: ``(c_1 .. c_P, 2 zeta(2P) / (2 pi)^2P, I_(2P-1), I_(2P))``, where
    ``I_k = integral |f^(k)(z)| dz`` (trapezoid rule in float64 over twice the truncation range,
    beyond which the tails are negligible; 1e-6 added for the rule's error)."""
    if family not in _EM_CACHE:
        z = torch.linspace(-2 * family.support, 2 * family.support, 200001, dtype=torch.float64)
        I = [torch.trapezoid(d.abs(), z).item() * (1 + 1e-6)
             for d in family.pdf_derivatives(z, 2 * EM_MAX_TERMS)]
        B = _bernoulli(2 * EM_MAX_TERMS)
        # B_2p(1/2) = -(1 - 2^(1-2p)) B_2p
        c = [-(1.0 - 2.0 ** (1 - 2 * p)) * B[2 * p] / math.factorial(2 * p)
             for p in range(1, EM_MAX_TERMS + 1)]
        _EM_CACHE[family] = [
            (c[:P], 2.0 * sum(k ** (-2.0 * P) for k in range(1, 4000)) / (2 * math.pi) ** (2 * P),
             I[2 * P - 1], I[2 * P]) for P in range(1, EM_MAX_TERMS + 1)]
    return _EM_CACHE[family]


def em_terms(family: NoiseFamily, sigma: float
             ) -> Optional[Tuple[List[float], List[float], float, float]]:
    """Euler-Maclaurin coefficients for the smallest ``P`` whose remainder bounds are within
    ``SERIES_TOL``: ``a_p = c_p / sigma^(2p-1)`` (value) and ``b_p = c_p / sigma^(2p)`` (slope),
    ``c_p = B_2p(1/2) / (2p)!``, ``p = 1 .. P``, and those bounds (value, slope):

        |R_P|  <= 2 zeta(2P) / (2 pi)^(2P) * I_(2P-1) / sigma^(2P-1)
        |R_P'| <= 2 zeta(2P) / (2 pi)^(2P) * I_(2P)   / sigma^(2P)

    (``|periodic B_2P| <= |B_2P| = 2 zeta(2P) (2P)! / (2 pi)^(2P)``; ``I_k = int |f^(k)|``).
    ``None`` when the family lacks ``cdf_integral`` or ``pdf_derivatives``, or no ``P <=
    EM_MAX_TERMS`` is enough (small sigma: the terms grow like ``k! / (2 pi sigma)^k``).
    The powers of sigma are taken here, once: inside the compiled kernel each would be a scalar
    ``pow`` per vector of elements (measured 4x slower).
    """
    if family.cdf_integral is None or family.pdf_derivatives is None:
        return None
    for P, (coeffs, c, I_v, I_s) in enumerate(_em_constants(family), start=1):
        bound_v = c * I_v / sigma ** (2 * P - 1)
        bound_s = c * I_s / sigma ** (2 * P)
        if bound_v <= SERIES_TOL and bound_s <= SERIES_TOL:
            return ([cp / sigma ** (2 * p - 1) for p, cp in enumerate(coeffs, start=1)],
                    [cp / sigma ** (2 * p) for p, cp in enumerate(coeffs, start=1)],
                    bound_v, bound_s)
    return None


def euler_maclaurin(u: Tensor, family: NoiseFamily, lo: int, hi: int, sigma: float,
                    value_coeffs: List[float], slope_coeffs: List[float]
                    ) -> Tuple[Tensor, Tensor]:
    """The whole clamped sum in closed form (midpoint Euler-Maclaurin over the thresholds
    ``t_k = k + 1/2``, ``k = lo .. hi - 1``; ``G(x) = F((u - x)/sigma)``, ``z_b = (u - b)/sigma``):

        E     = lo + sigma (Psi(z_lo) - Psi(z_hi)) - sum_p a_p (f^(2p-2)(z_hi) - f^(2p-2)(z_lo))
        dE/du = F(z_lo) - F(z_hi) - sum_p b_p (f^(2p-1)(z_hi) - f^(2p-1)(z_lo))

    with ``Psi = int F``, ``a_p = c_p / sigma^(2p-1)``, ``b_p = c_p / sigma^(2p)``, ``c_p =
    B_2p(1/2) / (2p)!`` (:func:`em_terms`, with the remainder bounds); ``u`` is first clamped to
    ``support * sigma`` beyond the range (the direct sum's truncation). Cost: two evaluations of
    ``Psi``, ``F`` and ``2P`` derivatives of ``f``, whatever the bit width. ``u`` comes first:
    the function is compiled as it stands (:func:`brevitas_ana.fused.fused`).
    """
    R = family.support * sigma
    u = u.clamp(lo - 0.5 - R, hi + 0.5 + R)
    z_lo, z_hi = (u - lo) / sigma, (u - hi) / sigma
    # Psi(z) = max(z, 0) + Psi(-|z|) (F symmetric): only the tail's argument needs clamping
    psi = [torch.relu(z) + family.cdf_integral(_in_reach(-z.abs(), family)) for z in (z_lo, z_hi)]
    value = (psi[0] - psi[1]) * sigma + lo
    z_lo, z_hi = _in_reach(z_lo, family), _in_reach(z_hi, family)
    slope = family.cdf(z_lo) - family.cdf(z_hi)
    d_lo = family.pdf_derivatives(z_lo, 2 * len(value_coeffs))
    d_hi = family.pdf_derivatives(z_hi, 2 * len(value_coeffs))
    for p, (a, b) in enumerate(zip(value_coeffs, slope_coeffs), start=1):
        value = value - (d_hi[2 * p - 2] - d_lo[2 * p - 2]) * a
        slope = slope - (d_hi[2 * p - 1] - d_lo[2 * p - 1]) * b
    return _end_levels(u, value, slope, lo, hi, R)


def expectation_and_slope(family: NoiseFamily, u: Tensor, lo: int, hi: int, sigma: float,
                          want_value: bool = True, want_slope: bool = True
                          ) -> Tuple[Tensor, Tensor]:
    """``E = lo + sum_k F((u - t_k)/sigma)`` and ``dE/du = sum_k f((u - t_k)/sigma)/sigma``.

    ``u = y + mu``. Uses, in this order:

    1. the family's closed form (``family.expectation``), when it has one;
    2. for families with ``cdf_integral`` and ``pdf_derivatives`` and more than two thresholds,
       when ``sigma`` is large enough for at most ``EM_MAX_TERMS`` terms: the Euler-Maclaurin
       form of the whole clamped sum (:func:`euler_maclaurin`), error bound from
       :func:`em_terms` plus the truncation bound (inputs clamped to ``R`` beyond the range);
    3. for families with a characteristic function, when every element is within the noise's
       reach ``R = support * sigma`` of one end of the stair at most (``hi - lo >= 2R + 1``) and
       the series needs at most ``SERIES_MAX_TERMS`` terms: the Fourier series of the unclamped
       stair (:func:`periodic_expectation`) corrected by the thresholds past the nearer end
       (:func:`series_with_ends`). Error: the series' bound plus the direct sum's truncation
       bound (:mod:`brevitas_ana.noise`);
    4. the direct sum: every threshold when there are no more than the noise reaches, else only
       the thresholds within ``R`` of ``u``, one pass over ``u`` per threshold offset (never a
       #thresholds x N tensor); the ones below the window count exactly 1, the ones above 0.

    Every case is elementwise and runs fused (:func:`brevitas_ana.fused.fused`): one kernel
    whatever its number of terms, and nothing that waits for the device.

    Either result is ``None`` when not wanted. The slope may come factored from a closed form as
    ``(counts, factor)``; :func:`slope_tensor` multiplies it out.
    """
    n = hi - lo
    if n == 0:
        return (torch.full_like(u, lo) if want_value else None,
                torch.zeros_like(u) if want_slope else None)
    if family.expectation is not None:
        # the built-in closed forms fuse their own kernels (brevitas_ana.fused)
        value, slope = family.expectation(u, lo, hi, sigma)
        return (value if want_value else None, slope if want_slope else None)
    kernel, *static = _plan(family, n, sigma)
    if kernel is None:
        return _direct_sum(family, u, lo, hi, sigma, want_value, want_slope)
    value, slope = fused(kernel, u, family, lo, hi, sigma, *static)
    return (value if want_value else None, slope if want_slope else None)


@functools.lru_cache(maxsize=64)
def _plan(family: NoiseFamily, n: int, sigma: float) -> tuple:
    """``(kernel, *its coefficients)`` of cases 2 and 3 of :func:`expectation_and_slope` for
    ``n`` thresholds at ``sigma``, or ``(None,)`` for the direct sum. Cached: every quantiser of a
    step shares its sigma, and choosing the formula and building its coefficients takes up to
    ~25 us of Python per call. The lists are read, never changed."""
    em = em_terms(family, sigma) if n > 2 else None
    if em is not None:
        return euler_maclaurin, em[0], em[1]
    R = family.support * sigma
    # the series wherever each element is within the noise's reach of one end at most; the
    # direct sum over the few thresholds in reach otherwise (small sigma), also in one kernel
    terms = series_terms(family, sigma) if n >= 2.0 * R + 1.0 else None
    if terms is None:
        return (None,)
    tail = family.tail_series(sigma) if family.tail_series is not None else None
    J, k, tail_c = tail[:3] if tail is not None else (tail_terms(R), 0.0, [])
    return (series_with_ends, J, k, tail_c, *_series_polynomials(terms[0]))


def _all_thresholds(u: Tensor, family: NoiseFamily, lo: int, hi: int, sigma: float,
                    want_value: bool, want_slope: bool):
    # few levels: every threshold, no truncation at all
    inv_sigma = 1.0 / sigma
    value = slope = None
    for k in range(lo, hi):
        z = _in_reach(torch.sub(u, k + 0.5).mul_(inv_sigma), family)
        if want_value:
            value = family.cdf(z) if value is None else value.add_(family.cdf(z))
        if want_slope:
            slope = family.pdf(z) if slope is None else slope.add_(family.pdf(z))
    return _end_levels(u, value.add_(lo) if want_value else None,
                       slope.mul_(inv_sigma) if want_slope else None, lo, hi,
                       family.support * sigma)


def _window(u: Tensor, family: NoiseFamily, lo: int, hi: int, sigma: float, width: int,
            want_value: bool, want_slope: bool):
    # the thresholds from the first one within support * sigma below u, `width` of them
    inv_sigma = 1.0 / sigma
    value = slope = None
    first = torch.sub(u, family.support * sigma + 0.5).ceil_().clamp_(lo, hi)
    last = torch.sub(hi - 1, first)  # offsets j > last are past the top threshold
    z0 = torch.sub(u, first).sub_(0.5).mul_(inv_sigma)
    for j in range(width):
        z = _in_reach(z0 - j * inv_sigma, family)
        inside = last >= j
        if want_value:
            term = family.cdf(z).masked_fill_(~inside, 0.0)
            value = term if value is None else value.add_(term)
        if want_slope:
            term = family.pdf(z).masked_fill_(~inside, 0.0)
            slope = term if slope is None else slope.add_(term)
    return _end_levels(u, value.add_(first) if want_value else None,
                       slope.mul_(inv_sigma) if want_slope else None, lo, hi,
                       family.support * sigma)


def _direct_sum(family: NoiseFamily, u: Tensor, lo: int, hi: int, sigma: float,
                want_value: bool = True, want_slope: bool = True):
    """Case 4 of :func:`expectation_and_slope`."""
    # thresholds that can lie within R = support * sigma of u: a closed interval of length 2R
    # holds at most floor(2R) + 1 points of the half-integer lattice
    width = int(math.floor(2.0 * family.support * sigma)) + 1
    # A compiled loop is specialised to its length: beyond 8, round it up to a multiple of 8, so
    # that an annealed sigma compiles a handful of lengths, not one per step (the extra
    # thresholds are beyond the noise's reach: F = 0 within the truncation bound)
    width = width if width <= 8 else -(-width // 8) * 8
    if hi - lo <= width:  # every threshold: no window arithmetic, no masks
        return fused(_all_thresholds, u, family, lo, hi, sigma, want_value, want_slope)
    return fused(_window, u, family, lo, hi, sigma, width, want_value, want_slope)


def mode_level(family: NoiseFamily, u: Tensor, lo: int, hi: int, sigma: float) -> Tensor:
    """The most probable level of ``clamp(round(u + e), lo, hi)``.

    For a symmetric unimodal noise the interior level with most mass is the one nearest ``u``, so
    the argmax is among ``clamp(round(u))``, ``lo`` and ``hi`` (the end levels collect the tails):
    P(lo) = F((lo + 1/2 - u)/sigma), P(hi) = 1 - F((hi - 1/2 - u)/sigma),
    P(c)  = F((c + 1/2 - u)/sigma) - F((c - 1/2 - u)/sigma) for lo < c < hi.
    Ties go to the nearest level.
    """
    if hi == lo:
        return torch.full_like(u, lo)
    F = family.cdf
    inv_sigma = 1.0 / sigma
    c = torch.clamp(torch.round(u), lo, hi)
    upper = torch.where(c >= hi, torch.ones_like(u), F((c + 0.5 - u) * inv_sigma))
    lower = torch.where(c <= lo, torch.zeros_like(u), F((c - 0.5 - u) * inv_sigma))
    p_c = upper - lower
    p_lo = F((lo + 0.5 - u) * inv_sigma)
    p_hi = 1.0 - F((hi - 0.5 - u) * inv_sigma)
    out = torch.where(p_lo > p_c, torch.full_like(u, lo), c)
    p_best = torch.maximum(p_c, p_lo)
    return torch.where(p_hi > p_best, torch.full_like(u, hi), out)


def slope_tensor(slope) -> Tensor:
    """The slope as one tensor, whether or not it came factored (bool or integer counts times
    the factor are returned in float64, which holds every such product exactly)."""
    if isinstance(slope, tuple):
        counts, factor = slope
        if not counts.is_floating_point():
            counts = counts.to(torch.float64)
        return counts * factor
    return slope
