"""ana_round against independent computations: quadrature, finite differences, Monte Carlo,
closed forms and brute-force enumeration of levels (scipy.stats for the distributions)."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.utils._python_dispatch import TorchDispatchMode

from brevitas_ana import NoiseFamily, ana_round, register_noise

FAMILIES = ["uniform", "triangular", "normal", "logistic"]


def scipy_noise(name, sigma, mu=0.0):
    """The same noise as a frozen scipy distribution, parametrised by standard deviation."""
    if name == "uniform":
        a = math.sqrt(3) * sigma
        return stats.uniform(loc=mu - a, scale=2 * a)
    if name == "triangular":
        b = math.sqrt(6) * sigma
        return stats.triang(c=0.5, loc=mu - b, scale=2 * b)
    if name == "normal":
        return stats.norm(loc=mu, scale=sigma)
    if name == "logistic":
        return stats.logistic(loc=mu, scale=sigma * math.sqrt(3) / math.pi)
    raise KeyError(name)


def quad_expectation(y, lo, hi, dist):
    """E[clamp(round(y + n), lo, hi)] by adaptive quadrature of the stair against the density."""
    a, b = dist.ppf(1e-13), dist.ppf(1 - 1e-13)
    # Q(y+e) jumps where y + e = k + 1/2: split the integral there.
    cuts = [k + 0.5 - y for k in range(lo, hi) if a < k + 0.5 - y < b]
    edges = [a] + cuts + [b]
    total = dist.cdf(a) * lo + dist.sf(b) * hi
    for left, right in zip(edges[:-1], edges[1:]):
        level = min(max(round(y + 0.5 * (left + right)), lo), hi)
        total += level * integrate.quad(dist.pdf, left, right, epsabs=1e-13, epsrel=1e-12)[0]
    return total


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sigma,mu,lo,hi", [(0.3, 0.0, -1, 1), (0.8, 0.25, 0, 3),
                                             (2.0, -0.4, -128, 127)])
def test_expectation_matches_quadrature(family, sigma, mu, lo, hi):
    ys = [lo - 2.3, lo + 0.1, 0.5 * (lo + hi) + 0.37, hi - 0.6, hi + 1.7]
    y = torch.tensor(ys, dtype=torch.float64)
    got = ana_round(y, lo, hi, family, sigma, mu)
    dist = scipy_noise(family, sigma, mu)
    want = [quad_expectation(v, lo, hi, dist) for v in ys]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-8, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lo,hi", [(-1, 1), (-8, 7), (0, 255)])
def test_gradient_is_derivative_of_expectation(family, lo, hi):
    torch.manual_seed(0)
    y = (torch.rand(40, dtype=torch.float64) * (hi - lo + 4) + lo - 2).requires_grad_()
    for sigma in (0.2, 1.3):
        assert torch.autograd.gradcheck(
            lambda t: ana_round(t, lo, hi, family, sigma, 0.1), (y,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["mode", "random"])
def test_every_strategy_backpropagates_the_expectation_slope(family, strategy):
    torch.manual_seed(1)
    y = torch.randn(500, dtype=torch.float64) * 5
    grads = []
    for s in ("expectation", strategy):
        t = y.clone().requires_grad_()
        ana_round(t, -8, 7, family, 0.7, -0.2, strategy).backward(torch.ones_like(t))
        grads.append(t.grad)
    assert grads[0].abs().sum() > 10
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_strategy_mean_matches_expectation(family):
    torch.manual_seed(2)
    y = torch.tensor([-3.6, -1.2, 0.3, 0.5, 2.75, 4.1], dtype=torch.float64)
    n = 40000
    samples = ana_round(y.repeat(n, 1), -4, 3, family, 0.9, 0.1, "random")
    assert set(samples.unique().tolist()) <= set(range(-4, 4))
    mean, std = samples.mean(0), samples.std(0)
    want = ana_round(y, -4, 3, family, 0.9, 0.1, "expectation")
    assert ((mean - want).abs() < 4.5 * std / math.sqrt(n) + 1e-3).all(), (mean, want)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sigma", [0.3, 1.0, 4.0])
def test_mode_is_argmax_of_level_probabilities(family, sigma):
    lo, hi, mu = -3, 4, 0.2
    ys = np.linspace(-9, 10, 381) + 1e-3
    got = ana_round(torch.tensor(ys), lo, hi, family, sigma, mu, "mode").numpy()
    dist = scipy_noise(family, sigma, mu)
    levels = np.arange(lo, hi + 1)
    for y, g in zip(ys, got):
        upper = np.where(levels == hi, 1.0, dist.cdf(levels + 0.5 - y))
        lower = np.where(levels == lo, 0.0, dist.cdf(levels - 0.5 - y))
        probs = upper - lower
        # uniform noise is flat, so several levels can tie: any of them is a mode
        assert probs[levels == g][0] >= probs.max() - 1e-12, (y, g)


def test_uniform_half_step_expectation_is_hardtanh():
    sigma = 1 / math.sqrt(12)  # half-width 1/2
    # off the kinks at lo and hi, where the derivative is not defined
    y = (torch.linspace(-6, 6, 1201, dtype=torch.float64) + 1e-4).requires_grad_()
    out = ana_round(y, -4, 3, "uniform", sigma)
    torch.testing.assert_close(out, y.detach().clamp(-4, 3), rtol=0, atol=1e-12)
    out.sum().backward()
    inside = (y.detach() > -4) & (y.detach() < 3)
    torch.testing.assert_close(y.grad, inside.double(), rtol=0, atol=1e-12)


def test_uniform_half_step_mode_is_clipped_ste():
    sigma = 1 / math.sqrt(12)
    y = (torch.linspace(-6, 6, 1201, dtype=torch.float64) + 1e-4).requires_grad_()
    out = ana_round(y, -4, 3, "uniform", sigma, strategy="mode")
    torch.testing.assert_close(out, torch.round(y.detach()).clamp(-4, 3), rtol=0, atol=0)
    out.sum().backward()
    inside = (y.detach() > -4) & (y.detach() < 3)
    torch.testing.assert_close(y.grad, inside.double(), rtol=0, atol=1e-12)


def test_uniform_half_step_random_is_stochastic_rounding():
    torch.manual_seed(3)
    sigma = 1 / math.sqrt(12)
    y = torch.tensor([0.1, 0.5, 0.9, -1.75, 2.3], dtype=torch.float64)
    n = 40000
    samples = ana_round(y.repeat(n, 1), -4, 3, "uniform", sigma, strategy="random")
    assert ((samples == y.floor()) | (samples == y.ceil())).all()
    p_up = (samples == y.ceil()).double().mean(0)
    frac = y - y.floor()
    assert ((p_up - frac).abs() < 4.5 * torch.sqrt(frac * (1 - frac) / n)).all(), p_up


@pytest.mark.parametrize("strategy", ["expectation", "mode", "random"])
def test_sigma_zero_is_exact_quantiser_with_selected_gradient(strategy):
    y = torch.tensor([-9.0, -3.5, -2.5, -0.49, 0.5, 1.5, 2.2, 7.6, 8.9])
    want = torch.clamp(torch.round(y), -4, 7)
    for annealed_grad, want_grad in [("ste", ((torch.round(y) >= -4) & (torch.round(y) <= 7))),
                                     ("zero", torch.zeros_like(y, dtype=torch.bool))]:
        t = y.clone().requires_grad_()
        out = ana_round(t, -4, 7, "normal", 0.0, 0.3, strategy, annealed_grad)
        assert torch.equal(out, want)
        out.sum().backward()
        assert torch.equal(t.grad, want_grad.float()), annealed_grad


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vanishing_sigma_is_annealed_not_nan(family, dtype):
    # progressive schedules reach sigmas like 1e-55 before their window closes
    y = (torch.randn(1000, dtype=dtype) * 3).requires_grad_()
    for sigma in (1e-55, 1e-20, 0.99e-4):
        out = ana_round(y, -2, 1, family, sigma)
        out.sum().backward()
        assert torch.equal(out, torch.clamp(torch.round(y.detach()), -2, 1))
        assert torch.isfinite(y.grad).all() and set(y.grad.unique().tolist()) <= {0.0, 1.0}
        y.grad = None
    # from SIGMA_MIN on, real (steep) noise: finite, large slopes next to the thresholds
    y = torch.tensor([-1.5 + 5e-5, -0.5, 0.5 - 5e-5], dtype=dtype, requires_grad=True)
    ana_round(y, -2, 1, family, 1e-4).sum().backward()
    assert torch.isfinite(y.grad).all() and (y.grad > 1000).all()


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["expectation", "mode", "random"])
def test_no_tensor_larger_than_input_at_8_bits(family, strategy):
    y = (torch.randn(64, 256) * 60).requires_grad_()
    with _MaxNumel() as probe:
        out = ana_round(y, -128, 127, family, 2.0, 0.0, strategy)
        out.sum().backward()
    assert probe.max_numel == y.numel()


def test_backward_saves_one_compact_tensor():
    y = (torch.randn(1000) * 50).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for family, dtype in [("uniform", torch.uint8), ("normal", torch.float16),
                          ("triangular", torch.float16), ("logistic", torch.float16)]:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ana_round(y, -128, 127, family, 0.7)
        assert [(s.dtype, s.numel()) for s in saved] == [(dtype, 1000)]


def test_user_family_without_icdf():
    # Laplace noise of unit std (b = 1/sqrt(2)), registered without touching the library.
    b = 1 / math.sqrt(2)
    laplace = register_noise(NoiseFamily(
        name="laplace_test",
        cdf=lambda z: torch.where(z < 0, 0.5 * torch.exp(z / b), 1 - 0.5 * torch.exp(-z / b)),
        pdf=lambda z: torch.exp(-z.abs() / b) / (2 * b),
        support=16.0), overwrite=True)
    ys = [-2.2, 0.4, 1.5, 3.9]
    y = torch.tensor(ys, dtype=torch.float64)
    dist = stats.laplace(loc=0.1, scale=0.6 * b)
    want = [quad_expectation(v, -3, 3, dist) for v in ys]
    got = ana_round(y, -3, 3, "laplace_test", 0.6, 0.1)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-8)
    torch.manual_seed(4)
    samples = ana_round(y.repeat(20000, 1), -3, 3, laplace, 0.6, 0.1, "random")
    np.testing.assert_allclose(samples.mean(0).numpy(), want, atol=0.03)


@pytest.mark.parametrize("kwargs,name", [
    (dict(sigma=-0.1), "sigma"), (dict(sigma=float("nan")), "sigma"),
    (dict(sigma=float("inf")), "sigma"), (dict(sigma=torch.tensor([0.1, 0.2])), "sigma"),
    (dict(mu=float("nan")), "mu"), (dict(noise="gaussian"), "noise"),
    (dict(strategy="median"), "strategy"), (dict(lo=3, hi=-3), "lo"),
    (dict(lo=0.5), "lo"), (dict(annealed_grad="freeze"), "annealed_grad")])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = dict(lo=-2, hi=2, noise="normal", sigma=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ana_round(torch.zeros(3), **args)


def test_tensor_arguments_and_degenerate_range():
    y = torch.tensor([-1.2, 0.3, 2.6])
    a = ana_round(y, torch.tensor(-2.0), torch.tensor(2.0), "normal", torch.tensor(0.5),
                  torch.tensor(0.1))
    b = ana_round(y, -2, 2, "normal", 0.5, 0.1)
    assert torch.equal(a, b)
    assert torch.equal(ana_round(y, 1, 1, "normal", 0.5), torch.ones(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_autocast_cpu(family):
    torch.manual_seed(5)
    x = torch.randn(16, 8)
    w = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = x @ w
        assert y.dtype == torch.bfloat16
        yr = y.detach().requires_grad_()
        out = ana_round(yr, -8, 7, family, 0.6)
    assert out.dtype == torch.bfloat16
    ref = ana_round(yr.detach().float(), -8, 7, family, 0.6)
    torch.testing.assert_close(out.float(), ref, atol=0.04, rtol=0.01)
    out.float().sum().backward()
    assert yr.grad.dtype == torch.bfloat16 and yr.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    x = torch.randn(64, 32, device="cuda")
    w = torch.randn(32, 32, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = (x @ w).detach().requires_grad_()
        out = ana_round(y, -8, 7, "normal", 0.6)
    assert out.dtype == dtype and out.device.type == "cuda"
    ref = ana_round(y.detach().float().cpu(), -8, 7, "normal", 0.6)
    torch.testing.assert_close(out.float().cpu(), ref, atol=0.04, rtol=0.01)
    out.float().sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy", ["expectation", "mode", "random"])
@pytest.mark.parametrize("noise", ["uniform", "triangular", "normal", "logistic"])
def test_non_finite_inputs_behave_like_stock_brevitas(noise, strategy):
    """+-inf clamp to the end levels and NaN stays NaN, as Brevitas' clamp(round(x)) does, in
    every family, strategy and sigma (the uniform closed form once gave NaN for +-inf), and the
    gradient there is 0, not NaN."""
    y = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.3, 7.0, -9.0],
                     requires_grad=True)
    for lo, hi in ((-2, 1), (0, 1)):
        want = torch.clamp(torch.round(y.detach()), lo, hi)
        for sigma in (0.0, 0.3, 2.0):
            torch.manual_seed(0)
            out = ana_round(y, lo, hi, noise, sigma, 0.0, strategy)
            assert out[0].item() == hi and out[1].item() == lo, (lo, hi, sigma)
            assert torch.isnan(out[2])
            assert torch.isfinite(out[3:]).all()
            if strategy == "expectation":
                (g,) = torch.autograd.grad(out[[0, 1, 3, 4, 5]].sum(), y)
                assert g[0].item() == 0.0 and g[1].item() == 0.0 and torch.isfinite(g[3:]).all()
            assert torch.equal(out[[0, 1]], want[[0, 1]])


@pytest.mark.parametrize("strategy", ["expectation", "mode", "random"])
@pytest.mark.parametrize("noise", ["uniform", "triangular", "normal", "logistic"])
def test_non_finite_inputs_through_a_quantiser_match_stock(noise, strategy):
    import brevitas.nn as qnn
    from brevitas.quant import SignedTernaryActPerTensorConst
    import brevitas_ana
    x = torch.tensor([[float("inf"), float("-inf"), float("nan"), 0.2, -3.0]])
    stock = qnn.QuantIdentity(act_quant=SignedTernaryActPerTensorConst).train()
    ana = qnn.QuantIdentity(act_quant=brevitas_ana.ana_quant(
        SignedTernaryActPerTensorConst, config=brevitas_ana.AnaConfig(noise=noise,
                                                                      strategy=strategy)))
    brevitas_ana.set_sigma(ana.train(), 0.3)
    want, got = stock(x), ana(x)
    assert torch.equal(got[0, :2], want[0, :2]) and got[0, 0] == 1.0 and got[0, 1] == -1.0
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[0, 2])
