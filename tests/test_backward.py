"""Backward policies (exact / floor) and the families' starting noise, against independent
computations: scipy's densities, finite differences, the stock Brevitas quantisers."""
import math

import numpy as np
import pytest
import torch
import brevitas.nn as qnn
from brevitas.quant import Int8ActPerTensorFloat, SignedBinaryActPerTensorConst
from scipy import stats

from brevitas_ana import ana_quant, ana_round, set_sigma
from brevitas_ana.noise import get_noise

FAMILIES = ["uniform", "triangular", "normal", "logistic"]


def scipy_noise(name, sigma):
    """Zero-mean noise of standard deviation ``sigma`` as a frozen scipy distribution."""
    if name == "uniform":
        a = math.sqrt(3) * sigma
        return stats.uniform(loc=-a, scale=2 * a)
    if name == "triangular":
        b = math.sqrt(6) * sigma
        return stats.triang(c=0.5, loc=-b, scale=2 * b)
    if name == "normal":
        return stats.norm(scale=sigma)
    return stats.logistic(scale=sigma * math.sqrt(3) / math.pi)


def scipy_slope(y, lo, hi, family, sigma, mu):
    """d/dy E[clamp(round(y + n), lo, hi)] = sum_k f(y + mu - k - 1/2), f from scipy."""
    dist = scipy_noise(family, sigma)
    return sum(dist.pdf(y + mu - k - 0.5) for k in range(lo, hi))


def scipy_expectation(y, lo, hi, family, sigma, mu):
    dist = scipy_noise(family, sigma)
    return lo + sum(dist.cdf(y + mu - k - 0.5) for k in range(lo, hi))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["expectation", "mode", "random"])
@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.2, 0.6])
def test_floor_gradient_is_the_derivative_at_the_floored_sigma(family, strategy, sigma):
    lo, hi, mu, floor = -4, 3, 0.1, 0.3
    # keep clear of the kinks of the bounded families' slopes, where one-sided limits differ
    y = torch.linspace(lo - 2.013, hi + 2.017, 157, dtype=torch.float64)
    sigma_b = max(sigma, floor)
    torch.manual_seed(0)
    t = y.clone().requires_grad_()
    out = ana_round(t, lo, hi, family, sigma, mu, strategy, sigma_grad_min=floor)
    out.sum().backward()
    want = scipy_slope(y.numpy(), lo, hi, family, sigma_b, mu)
    # within the documented truncation bound of the unbounded families (noise.py)
    np.testing.assert_allclose(t.grad.numpy(), want, atol=1e-7, rtol=1e-9)
    # the same slope by central differences of the expectation at sigma_b (scipy's CDFs)
    h = 1e-6
    fd = (scipy_expectation(y.numpy() + h, lo, hi, family, sigma_b, mu)
          - scipy_expectation(y.numpy() - h, lo, hi, family, sigma_b, mu)) / (2 * h)
    np.testing.assert_allclose(t.grad.numpy(), fd, atol=2e-5)
    # the forward is the policy-free one: the floor changes the gradient only
    torch.manual_seed(0)
    plain = ana_round(y, lo, hi, family, sigma, mu, strategy)
    assert torch.equal(out.detach(), plain)
    if sigma == 0.0:
        assert torch.equal(plain, torch.clamp(torch.round(y), lo, hi))


@pytest.mark.parametrize("family", FAMILIES)
def test_floor_below_sigma_is_the_exact_gradient(family):
    torch.manual_seed(2)
    y = (torch.randn(300, dtype=torch.float64) * 4).requires_grad_()
    # the exact derivative of the forward itself: gradcheck passes with a floor below sigma
    assert torch.autograd.gradcheck(
        lambda v: ana_round(v, -8, 7, family, 0.7, 0.2, sigma_grad_min=0.4), (y[:40],),
        eps=1e-6, atol=1e-6)
    grads = []
    for floor in (0.0, 0.4):
        t = y.detach().clone().requires_grad_()
        ana_round(t, -8, 7, family, 0.7, 0.2, sigma_grad_min=floor).sum().backward()
        grads.append(t.grad)
    assert torch.equal(grads[0], grads[1])


def test_uniform_half_step_floor_at_sigma_zero_is_the_clipped_identity():
    # sigma_b = 1/sqrt(12): slope 1 strictly inside (lo, hi), 0 outside
    y = torch.tensor([-6.3, -4.2, -3.7, -1.5001, 0.2, 2.9, 3.4, 5.0], requires_grad=True)
    out = ana_round(y, -4, 3, "uniform", 0.0, sigma_grad_min=get_noise("uniform").default_sigma)
    out.sum().backward()
    assert torch.equal(out, torch.clamp(torch.round(y.detach()), -4, 3))
    inside = ((y.detach() > -4) & (y.detach() < 3)).float()
    torch.testing.assert_close(y.grad, inside, rtol=0, atol=1e-6)


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_bad_floor_is_a_value_error_naming_it(value):
    with pytest.raises(ValueError, match=r"^sigma_grad_min\b"):
        ana_round(torch.zeros(3), -2, 2, "normal", 0.5, sigma_grad_min=value)


@pytest.mark.parametrize("family,want_std,want_reference", [
    ("uniform", 0.2887, 0.5), ("triangular", 0.2041, 0.5), ("normal", 0.2551, 0.2551),
    ("logistic", 0.24755, 0.1365)])
def test_default_sigma_puts_95_percent_of_the_mass_within_half_a_step(family, want_std,
                                                                      want_reference):
    f = get_noise(family)
    dist = scipy_noise(family, f.default_sigma)
    assert dist.std() == pytest.approx(f.default_sigma, rel=1e-9)
    mass = dist.cdf(0.5) - dist.cdf(-0.5)
    if f.bounded:  # the whole support within +-1/2 step, exactly
        assert mass == pytest.approx(1.0, abs=1e-12)
        assert dist.support() == pytest.approx((-0.5, 0.5), abs=1e-12)
    else:
        assert mass == pytest.approx(0.95, abs=1e-9)
    assert f.default_sigma == pytest.approx(want_std, abs=5e-5)
    assert f.default_sigma * f.reference_scale == pytest.approx(want_reference, abs=5e-5)


# --- the quantisers ---------------------------------------------------------------------------

def act_pair(stock_quant, **kw):
    torch.manual_seed(0)
    stock = qnn.QuantIdentity(act_quant=stock_quant, **kw)
    # the floor at the family's starting noise (uniform half-width 1/2 step), not the default 1
    ana = qnn.QuantIdentity(act_quant=ana_quant(stock_quant, ana_backward="floor",
                                                ana_sigma_grad_min=None), **kw)
    calib = torch.randn(64, 16) * 2
    stock.train()(calib), ana.train()(calib)  # runtime-stats scales exist after a forward
    state = stock.state_dict()
    # loading also ends Brevitas' scale-statistics phase: do it to both so they stay in step
    ana.load_state_dict(state)
    stock.load_state_dict(state)
    return stock, ana


def test_floor_quantiser_at_sigma_zero_forward_is_stock_gradient_is_the_clipped_identity():
    stock, ana = act_pair(Int8ActPerTensorFloat, bit_width=3, return_quant_tensor=True)
    set_sigma(ana, 0.0)
    x = torch.randn(64, 16) * 8  # wider than the calibration: many values beyond the range
    outs, grads, scales = [], [], []
    for m in (stock, ana):
        t = x.clone().requires_grad_()
        out = m.train()(t)
        out.value.sum().backward()
        outs.append(out.value.detach())
        grads.append(t.grad)
        scales.append(out.scale.detach())
    assert torch.equal(outs[0], outs[1]) and torch.equal(scales[0], scales[1])
    y = x / scales[1]  # the signed 3-bit range is [-4, 3] in steps
    inside = ((y > -4) & (y < 3)).float()
    assert 0.2 < inside.mean() < 0.9
    torch.testing.assert_close(grads[1], inside, rtol=0, atol=1e-5)
    assert not torch.equal(grads[0], grads[1])  # stock STE passes up to half a step further
    for m in (stock, ana):
        m.eval()
    assert torch.equal(stock(x).value, ana(x).value)


def test_floor_binary_at_sigma_zero_keeps_the_sign_tie_and_gets_the_hardtanh_gradient():
    stock, ana = act_pair(SignedBinaryActPerTensorConst)
    set_sigma(ana, 0.0)
    x = torch.tensor([-1.7, -0.99, -0.2, 0.0, 0.3, 0.98, 1.4])
    outs, grads = [], []
    for m in (stock, ana):
        t = x.clone().requires_grad_()
        out = m.train()(t)
        out.sum().backward()
        outs.append(out.detach())
        grads.append(t.grad)
    assert torch.equal(outs[0], outs[1]) and outs[1][3] == 1.0  # sign(0) = +1, as stock
    # uniform half-width 1/2 step = 1 in x (scale 1): the hardtanh gradient, as stock's clamp
    torch.testing.assert_close(grads[1], (x.abs() < 1).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_quantiser_backward_option_errors():
    with pytest.raises(ValueError, match="backward"):
        qnn.QuantIdentity(act_quant=ana_quant(Int8ActPerTensorFloat, ana_backward="smooth"))
    with pytest.raises(ValueError, match="sigma_grad_min"):
        qnn.QuantIdentity(act_quant=ana_quant(Int8ActPerTensorFloat, ana_backward="floor",
                                              ana_sigma_grad_min=-1.0))
