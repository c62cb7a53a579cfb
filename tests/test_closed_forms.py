"""Closed forms of every noise family (brevitas_ana.noise, brevitas_ana.functional) against the
direct float64 sum over every threshold, within the error bounds their docstrings state."""
import dataclasses
import math

import pytest
import torch

from brevitas_ana.expectation import (SERIES_TOL, em_terms, euler_maclaurin, expectation_and_slope,
                                      periodic_expectation, series_terms, slope_tensor, tail_terms)
from brevitas_ana.noise import get_noise

FAMILIES = ["uniform", "triangular", "normal", "logistic"]
SIGMAS = [1e-3, 0.01, 0.1, 0.3, 0.5, 1.0, 2.0, 4.0, 8.0]


def direct(fam, u, lo, hi, sigma):
    """lo + sum_k F((u - t_k) / sigma) and its slope over every threshold, no truncation."""
    ks = torch.arange(lo, hi, dtype=torch.float64)
    z = (u[:, None] - ks - 0.5) / sigma
    return lo + fam.cdf(z).sum(1), fam.pdf(z).sum(1) / sigma


def stated_bound(fam, sigma):
    """(value, slope) error bounds from the docstrings: exact for the bounded closed forms;
    the series' bound plus the truncation bound of the direct sum near the ends otherwise."""
    if fam.bounded:  # exact: float64 rounding of terms of the order of the window and 1 / sigma
        return 1e-11, 1e-11 / sigma
    L = torch.tensor(fam.support, dtype=torch.float64)
    tail, f_L = 1 - fam.cdf(L).item(), fam.pdf(L).item()
    value, slope = 2 * tail * (1 + sigma), 2 * (f_L / sigma + tail)
    em, terms = em_terms(fam, sigma), series_terms(fam, sigma)
    if em is not None:  # Euler-Maclaurin (used for more than 2 thresholds)
        value, slope = value + em[2], slope + em[3]
    if terms is not None:  # Fourier series, thresholds past the nearer end
        value, slope = value + terms[1] / (2 * math.pi), slope + terms[1]
        if fam.tail_series is not None:  # those thresholds as a power series
            *_, tail_v, tail_s = fam.tail_series(sigma)
            value, slope = value + tail_v, slope + tail_s
    return value + 1e-12, slope + 1e-10


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", range(1, 9))
def test_closed_forms_match_the_direct_sum_within_their_bound(family, bits):
    fam = get_noise(family)
    for lo, hi in ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1), (0, 2 ** bits - 1)):
        for sigma in SIGMAS:
            reach = fam.support * sigma + 2
            # across the whole range and beyond it, dense near the two ends, plus the thresholds
            # and the ends of the noise's reach themselves
            u = torch.cat([torch.linspace(lo - reach, hi + reach, 3001, dtype=torch.float64),
                           lo - 0.5 + torch.linspace(-reach, reach, 401, dtype=torch.float64),
                           hi + 0.5 + torch.linspace(-reach, reach, 401, dtype=torch.float64),
                           torch.arange(lo, hi + 1, dtype=torch.float64) + 0.5])
            value, slope = expectation_and_slope(fam, u, lo, hi, sigma)
            want_value, want_slope = direct(fam, u, lo, hi, sigma)
            bound_v, bound_s = stated_bound(fam, sigma)
            err_v = (value - want_value).abs().max().item()
            err_s = (slope_tensor(slope) - want_slope)
            if family == "uniform":  # the density jumps at +-a: compare away from the jumps
                a = math.sqrt(3) * sigma
                d = (u[:, None] - torch.arange(lo, hi, dtype=torch.float64) - 0.5).abs()
                err_s = err_s[((d - a).abs() > 1e-9).all(1)]
            err_s = err_s.abs().max().item()
            assert err_v <= bound_v, (lo, hi, sigma, err_v, bound_v)
            assert err_s <= bound_s, (lo, hi, sigma, err_s, bound_s)


@pytest.mark.parametrize("family", ["normal", "logistic"])
def test_fourier_series_is_the_unclamped_sum(family):
    """E[round(u + e)] over a stair far wider than the noise: the series alone, within the tail
    bound it reports, against the direct sum; and it is used (not the direct sum) at 8 bits."""
    fam = get_noise(family)
    u = torch.linspace(-3.3, 4.1, 2001, dtype=torch.float64)
    for sigma in (0.3, 0.5, 1.0, 2.0):
        phis, tail = series_terms(fam, sigma)
        assert tail <= SERIES_TOL
        value, slope = periodic_expectation(u, phis)
        want_value, want_slope = direct(fam, u, -300, 300, sigma)
        assert (value - want_value).abs().max() <= tail / (2 * math.pi) + 1e-12
        assert (slope - want_slope).abs().max() <= tail + 1e-12
    # at sigma = 2 both families need at most one term: E = u - phi_1 sin(2 pi u) / pi
    assert len(series_terms(fam, 2.0)[0]) <= 1
    assert series_terms(fam, 1e-3) is None  # far too many terms: the direct sum is used


def test_series_coefficients_are_the_characteristic_functions():
    """phi(t) against numerical integration of cos(t z) f(z)."""
    from scipy import integrate
    for family in ("normal", "logistic"):
        fam = get_noise(family)
        for t in (0.5, 2.0, 6.0):
            want = integrate.quad(lambda z: math.cos(t * z) * fam.pdf(
                torch.tensor(z, dtype=torch.float64)).item(), -40, 40, limit=400)[0]
            assert abs(fam.charfn(t) - want) < 1e-9


@pytest.mark.parametrize("family", ["normal", "logistic"])
def test_euler_maclaurin_covers_large_sigma_within_its_bound(family):
    """The whole clamped sum from two evaluations of Psi, F and f's derivatives: against the
    direct sum at 2 to 8 bits, within the remainder bound em_terms states; and it is available
    exactly from the sigma where its bound first meets the tolerance."""
    fam = get_noise(family)
    for sigma in (2.0, 3.0, 8.0) if family == "normal" else (4.0, 8.0):
        value_coeffs, slope_coeffs, bound_v, bound_s = em_terms(fam, sigma)
        assert bound_v <= SERIES_TOL and bound_s <= SERIES_TOL and 1 <= len(value_coeffs) <= 5
        for lo, hi in ((-2, 1), (0, 15), (-128, 127)):
            u = torch.linspace(lo - 30, hi + 30, 4001, dtype=torch.float64)
            value, slope = euler_maclaurin(u, fam, lo, hi, sigma, value_coeffs,
                                           slope_coeffs)
            want_value, want_slope = direct(fam, u, lo, hi, sigma)
            L = torch.tensor(fam.support, dtype=torch.float64)
            tail = 1 - fam.cdf(L).item()
            assert (value - want_value).abs().max() <= bound_v + 2 * tail * (1 + sigma) + 1e-12
            assert (slope - want_slope).abs().max() <= bound_s + 2 * (
                fam.pdf(L).item() / sigma + tail) + 1e-10
    # more than 5 terms: the asymptotic series diverges (0.5) or costs more than the direct sum
    assert em_terms(fam, 0.5) is None and em_terms(fam, 1.0) is None


def test_logistic_tail_series_is_the_sum_past_the_end():
    """sum_{j>=J} F((-a - 1/2 - j)/sigma) (and its derivative in a) against 20000 terms summed
    in float64, within the bounds tail_series states, for every distance a within the reach."""
    fam = get_noise("logistic")
    for sigma in (0.05, 0.3, 0.5, 1.0, 2.0, 3.0, 8.0):
        J, k, c, bound_v, bound_s = fam.tail_series(sigma)
        assert bound_v <= 1e-9 and bound_s <= 1e-9 and len(c) <= 10
        a = torch.linspace(0, fam.support * sigma + 2, 501, dtype=torch.float64)
        z = (-a[:, None] - 0.5 - torch.arange(J, J + 20000, dtype=torch.float64)) / sigma
        want_v, want_s = fam.cdf(z).sum(1), fam.pdf(z).sum(1) / sigma
        y = torch.exp(-k * (a + 0.5 + J))
        got_v = sum(cm * y ** m for m, cm in enumerate(c, start=1))
        got_s = k * sum(m * cm * y ** m for m, cm in enumerate(c, start=1))
        assert (got_v - want_v).abs().max() <= bound_v + 1e-15, sigma
        assert (got_s - want_s).abs().max() <= bound_s + 1e-15, sigma


@pytest.mark.parametrize("family,sigma,bits", [("normal", 0.5, (4, 6, 8)),
                                               ("normal", 1.0, (4, 6, 8)),
                                               ("logistic", 0.5, (4, 6, 8)),
                                               ("logistic", 2.0, (6, 8))])
def test_cost_per_element_does_not_grow_with_the_bit_width(family, sigma, bits):
    """The series path evaluates F a fixed number of times per element, whatever the number of
    levels: the thresholds within reach past one end (normal) or the few before the logistic
    tail's power series; the window it replaces took floor(2R) + 1 (7 for normal noise at
    sigma 0.5, 47 for logistic noise at sigma 2)."""
    fam = get_noise(family)
    calls = []
    counting = dataclasses.replace(fam, name="counting",
                                   cdf=lambda z: calls.append(1) or fam.cdf(z))
    R = fam.support * sigma
    want = fam.tail_series(sigma)[0] if fam.tail_series else tail_terms(R)
    assert want < math.floor(2 * R) + 1
    for b in bits:
        calls.clear()
        u = torch.linspace(-2.0 ** b, 2.0 ** b, 1001, dtype=torch.float64)
        expectation_and_slope(counting, u, -(2 ** (b - 1)), 2 ** (b - 1) - 1, sigma)
        assert len(calls) == want, (b, len(calls), want)
