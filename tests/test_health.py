"""GradientHealth on a tiny model whose gradients are known in closed form."""
import math

import pytest
import torch
import brevitas.nn as qnn
from torch import nn

from brevitas_ana import AnaConfig, AnaController, GradientHealth
from brevitas_ana.quant import (AnaSignedTernaryActPerTensorConst,
                                AnaSignedTernaryWeightPerTensorConst)


def tiny(seed=0):
    """float Linear -> ternary ANA activation (scale 1) -> ternary ANA Linear (scale 0.1), with
    weights in +-[0.045, 0.095], i.e. +-[0.45, 0.95] steps: inside the clamp range, some near
    the threshold 1/2 (where a sharp exact slope is non-zero)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 6),
        qnn.QuantIdentity(act_quant=AnaSignedTernaryActPerTensorConst),
        qnn.QuantLinear(6, 3, bias=False, weight_quant=AnaSignedTernaryWeightPerTensorConst))
    with torch.no_grad():
        w = (torch.rand(3, 6) * 0.5 + 0.45) * 0.1
        model[2].weight.copy_(w * torch.where(torch.rand(3, 6) < 0.5, -1.0, 1.0))
    return model


@pytest.mark.parametrize("backward,sigma", [("floor", 0.0), ("exact", 0.05)])
def test_pass_fraction_and_weight_norm_match_closed_forms(backward, sigma):
    model = tiny()
    ctl = AnaController(model, preset="static", example_input=torch.randn(2, 4),
                        config=AnaConfig(sigma=sigma, backward=backward))
    assert list(ctl.groups) == ["1", "2"]  # the activation, then the ternary layer
    health = GradientHealth(ctl)
    half = math.sqrt(3) * sigma  # uniform noise: half-width of the support
    # the backward's noise: under floor the default floor (0.5774: half-width one step)
    half_b = math.sqrt(3) * (max(sigma, AnaConfig().sigma_grad_min) if backward == "floor"
                             else sigma)

    def slope(v):
        """d/dv of the smoothed ternary stair at the backward noise, in steps (thresholds
        +-1/2): each threshold within the half-width adds 1 / (2 half-width)."""
        return (((v - 0.5).abs() < half_b).double()
                + ((v + 0.5).abs() < half_b).double()) / (2 * half_b)

    def forward(v):
        """The training forward, E[Q(v + n)] = -1 + F(v + 1/2) + F(v - 1/2) with the uniform
        CDF F of half-width `half` (the exact stair at sigma 0)."""
        if sigma == 0:
            return torch.clamp(torch.round(v), -1, 1)
        F = lambda z: torch.clamp(z / (2 * half) + 0.5, 0.0, 1.0)  # noqa: E731
        return -1 + F(v + 0.5) + F(v - 0.5)

    passed = received = 0
    norms = []
    w_steps = model[2].weight.detach().double() / 0.1
    wq = 0.1 * forward(w_steps)
    for step in range(2):
        x = torch.randn(16, 4) * 1.5
        c = torch.randn(16, 3)
        model.train()
        (model(x) * c).sum().backward()
        health.after_backward()
        y = model[0](x).detach().double()  # the activation quantiser's input, in steps (scale 1)
        upstream = c.double() @ wq
        received += int(torch.count_nonzero(upstream))
        passed += int(torch.count_nonzero(upstream * slope(y)))
        q = forward(y)
        weight_grad = (c.double().T @ q) * slope(w_steps)  # d(0.1 Q(w/0.1))/dw = Q'(w/0.1)
        norms.append(float(torch.linalg.vector_norm(weight_grad)))
        model.zero_grad()
    model.eval()(torch.randn(8, 4))  # eval forwards count nothing
    stats = health.read()
    assert 0 < passed < received and sum(norms) > 0
    assert stats["1"]["grad_pass"] == pytest.approx(passed / received, rel=1e-12)
    assert stats["2"]["grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-5)
    assert math.isnan(stats["1"]["grad_norm"]) and math.isnan(stats["2"]["grad_pass"])
    again = health.read()  # a read starts a new accumulation
    assert all(math.isnan(v) for s in again.values() for v in s.values())
    health.remove()
    (model.train()(torch.randn(4, 4)).sum()).backward()
    assert all(math.isnan(v) for s in health.read().values() for v in s.values())


def test_reduce_combines_processes():
    model = tiny()
    ctl = AnaController(model, preset="static", example_input=torch.randn(2, 4),
                        config=AnaConfig(sigma=0.0))
    health = GradientHealth(ctl)
    model.train()(torch.randn(8, 4)).square().sum().backward()
    health.after_backward()
    one = health.read()
    model.zero_grad()
    model.train()(torch.randn(8, 4)).square().sum().backward()
    health.after_backward()
    # two identical "processes": the fractions and mean norms are unchanged by the sum
    doubled = health.read(reduce=lambda t: 2 * t)
    assert 0 < doubled["1"]["grad_pass"] <= 1 and one["1"]["grad_pass"] > 0
    assert doubled["2"]["grad_norm"] > 0


def test_every_samples_the_controllers_steps():
    model = tiny()
    ctl = AnaController(model, preset="static", example_input=torch.randn(2, 4),
                        config=AnaConfig(sigma=0.0))
    health = GradientHealth(ctl, every=2)
    torch.manual_seed(3)
    xs = [torch.randn(16, 4) * 1.5 for _ in range(3)]
    expected_norms = []
    for x in xs:  # controller steps 0, 1, 2: 0 and 2 are sampled
        model.train()(x).square().sum().backward()
        if ctl.step_count % 2 == 0:
            expected_norms.append(float(torch.linalg.vector_norm(model[2].weight.grad)))
        health.after_backward()
        model.zero_grad()
        ctl.step()
    stats = health.read()
    assert stats["2"]["grad_norm"] == pytest.approx(sum(expected_norms) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="every"):
        GradientHealth(ctl, every=0)
