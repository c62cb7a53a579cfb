"""AnaController: execution ordering, grouping, preset formulas, checkpoint/resume."""
import copy

import pytest
import torch
import brevitas.nn as qnn
from torch import nn

import brevitas_ana
from brevitas_ana import AnaConfig, AnaController
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat

from brevitas_ana.quant import AnaInt8ActPerTensorFloat, AnaInt8WeightPerTensorFloat


class Scrambled(nn.Module):
    """Attributes registered in an order unrelated to execution order."""

    def __init__(self):
        super().__init__()
        self.head = qnn.QuantLinear(16, 4, bias=False, weight_quant=AnaInt8WeightPerTensorFloat)
        self.act_b = qnn.QuantIdentity(act_quant=AnaInt8ActPerTensorFloat)
        self.mid = qnn.QuantLinear(16, 16, bias=False, weight_quant=AnaInt8WeightPerTensorFloat)
        self.act_a = qnn.QuantIdentity(act_quant=AnaInt8ActPerTensorFloat)
        self.stem = qnn.QuantLinear(8, 16, bias=False, weight_quant=AnaInt8WeightPerTensorFloat)
        self.inp = qnn.QuantIdentity(act_quant=AnaInt8ActPerTensorFloat)

    def forward(self, x):
        x = self.act_a(self.stem(self.inp(x)))
        x = self.act_b(self.mid(x))
        return self.head(x)


EXPECTED_GROUPS = {
    "inp": ["inp.act_quant.fused_activation_quant_proxy.tensor_quant.int_quant"],
    "stem": ["stem.weight_quant.tensor_quant.int_quant",
             "act_a.act_quant.fused_activation_quant_proxy.tensor_quant.int_quant"],
    "mid": ["mid.weight_quant.tensor_quant.int_quant",
            "act_b.act_quant.fused_activation_quant_proxy.tensor_quant.int_quant"],
    "head": ["head.weight_quant.tensor_quant.int_quant"],
}


def make(seed=0):
    torch.manual_seed(seed)
    return Scrambled()


def test_orders_by_execution_with_example_input():
    model = make()
    # Brevitas shares some stateless modules (TensorClamp) between all quantisers it builds, so
    # one may be in eval mode already, left there by another model: compare, don't assume.
    modes = [m.training for m in model.modules()]
    ctl = AnaController(model, total_steps=10, example_input=torch.randn(2, 8))
    assert list(ctl.groups.items()) == list(EXPECTED_GROUPS.items())
    assert list(ctl.sigmas()) == list(EXPECTED_GROUPS)
    assert [m.training for m in model.modules()] == modes  # example forward left modes alone
    assert model.stem.training and model.act_a.training


def test_orders_by_execution_on_first_forward():
    model = make()
    ctl = AnaController(model, total_steps=10)
    with pytest.raises(RuntimeError, match="forward pass"):
        ctl.sigmas()
    model(torch.randn(2, 8))
    assert list(ctl.groups.items()) == list(EXPECTED_GROUPS.items())


def test_pattern_groups_ordered_by_first_execution():
    ctl = AnaController(make(), total_steps=10, example_input=torch.randn(2, 8),
                        groups={"late": ["mid", "act_b", "head"], "early": ["inp", "stem*",
                                                                            "act_a"]})
    assert list(ctl.groups) == ["early", "late"]
    assert len(ctl.groups["early"]) == 3 and len(ctl.groups["late"]) == 3


@pytest.mark.parametrize("groups,match", [
    ({"a": ["inp", "stem", "act_a"], "b": ["mid", "act_b"]}, r"uncovered: \['head\."),
    ({"a": ["*"], "b": ["head"]}, r"in several groups: \[\"head\.weight_quant\S* -> \['a', 'b'\]"),
    ({"a": ["*"], "b": ["nothing"]}, r"no quantiser matches group\(s\) \['b'\]"),
])
def test_pattern_group_errors(groups, match):
    with pytest.raises(ValueError, match=match):
        AnaController(make(), total_steps=10, example_input=torch.randn(2, 8), groups=groups)


def expected_sigma(preset, l, n, t, total, sigma0):
    """The presets' formulas, written out independently of brevitas_ana.schedules; ``total`` is
    the annealing time (anneal_end * total_steps)."""
    p = total / n
    a = 2.0 * (n - l) if preset == "progressive" else 2.0
    start, end = {"homogeneous": (0, total), "progressive": (0, total),
                  "partition": (l * p, (l + 1) * p), "same_start": (0, (l + 1) * p),
                  "same_end": ((n - l - 1) * p, total)}.get(preset, (None, None))
    if preset == "static":
        return sigma0
    if t < start:
        return sigma0
    if t >= end:
        return 0.0
    return sigma0 * ((end - t) / (end - start)) ** a


@pytest.mark.parametrize("anneal_end", [1.0, 0.7])
@pytest.mark.parametrize("preset", ["homogeneous", "progressive", "partition", "same_start",
                                    "same_end", "static"])
def test_preset_formulas(preset, anneal_end):
    total = 40
    ctl = AnaController(make(), preset=preset, total_steps=total, anneal_end=anneal_end,
                        example_input=torch.randn(2, 8), config=AnaConfig(sigma=0.8))
    quantisers = dict(brevitas_ana.ana_quantizers(ctl.model))
    n = len(ctl.groups)
    for t in (0, 3, 10, 17, 20, 27, 28, 29, 39, 40, 45):
        ctl.step(t - ctl.step_count)
        got = ctl.sigmas()
        for l, g in enumerate(got):
            want = expected_sigma(preset, l, n, t, anneal_end * total, 0.8)
            assert got[g] == pytest.approx(want, rel=1e-12, abs=1e-15), (t, g)
            for name in ctl.groups[g]:  # and the quantisers really carry it
                assert quantisers[name].sigma == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("preset", ["progressive", "partition"])
def test_input_side_sharpens_first(preset):
    ctl = AnaController(make(), preset=preset, total_steps=100, example_input=torch.randn(2, 8),
                        config=AnaConfig(sigma=1.0))
    ctl.step(50)
    s = list(ctl.sigmas().values())
    assert s[0] < s[-1]
    if preset == "progressive":
        assert all(a < b for a, b in zip(s, s[1:]))


def test_mu_follows_its_own_exponent_and_epoch_time():
    ctl = AnaController(make(), preset="homogeneous", total_steps=40, anneal_end=1.0,
                        time_unit="epoch", steps_per_epoch=8, example_input=torch.randn(2, 8),
                        config=AnaConfig(sigma=0.5, mu=0.5))
    ctl.step(10)  # 1.25 of 5 epochs
    assert ctl.t == pytest.approx(1.25)
    assert next(iter(ctl.mus().values())) == pytest.approx(0.5 * (3.75 / 5) ** 1)
    assert next(iter(ctl.sigmas().values())) == pytest.approx(0.5 * (3.75 / 5) ** 2)


def test_schedule_overrides():
    ctl = AnaController(make(), total_steps=10, example_input=torch.randn(2, 8),
                        schedules={"head": {"sigma": {"name": "constant"}}},
                        config=AnaConfig(sigma=1.0))
    ctl.step(10)
    assert ctl.sigmas()["head"] == 1.0 and ctl.sigmas()["inp"] == 0.0
    with pytest.raises(ValueError, match="unknown group"):
        AnaController(make(), total_steps=10, example_input=torch.randn(2, 8),
                      schedules={"nope": {"sigma": {"name": "constant"}}})


def test_bad_arguments():
    with pytest.raises(ValueError, match="preset"):
        AnaController(make(), preset="sync", total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        AnaController(make(), preset="progressive")
    with pytest.raises(ValueError, match="sigma"):
        AnaController(make(), total_steps=10, config=AnaConfig(sigma=-1))
    with pytest.raises(ValueError, match="steps_per_epoch"):
        AnaController(make(), total_steps=10, time_unit="epoch")
    with pytest.raises(ValueError, match="no ANA quantiser"):
        AnaController(nn.Linear(3, 3), total_steps=10)


def test_eval_is_noise_free():
    model = make()
    ctl = AnaController(model, total_steps=10, example_input=torch.randn(2, 8),
                        config=AnaConfig(sigma=2.0))
    x = torch.randn(5, 8)
    model.train()(x)
    model.eval()
    noisy = model(x)
    stock = copy.deepcopy(model)
    brevitas_ana.to_stock(stock)
    assert ctl.sigmas()["inp"] == 2.0 and torch.equal(noisy, stock(x))


def test_summary_and_plot(tmp_path, capsys):
    ctl = AnaController(make(), total_steps=10, example_input=torch.randn(2, 8))
    text = ctl.summary()
    assert capsys.readouterr().out.strip() == text
    for g, members in EXPECTED_GROUPS.items():
        assert g in text and all(m in text for m in members)
    path = ctl.plot(tmp_path / "sigma.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def _train(model, ctl, opt, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ctl.step()


def test_resume_matches_uninterrupted_run():
    x, y = torch.randn(32, 8), torch.randn(32, 4)

    def fresh():
        model = make()
        model.train()(x)  # scale statistics
        # and end Brevitas' statistics phase, as loading a checkpoint does
        with brevitas_ana.keep_quant_modules():
            model.load_state_dict(model.state_dict())
        ctl = AnaController(model, preset="progressive", total_steps=20, example_input=x,
                            config=AnaConfig(sigma=0.6))
        return model, ctl, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, ctl, opt = fresh()
    torch.manual_seed(1)
    _train(model, ctl, opt, 20, x, y)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, ctl, opt = fresh()
    torch.manual_seed(1)
    _train(model, ctl, opt, 8, x, y)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), ctl.state_dict()))
    sigmas_at_save = ctl.sigmas()

    model, ctl, opt = fresh()
    with brevitas_ana.keep_quant_modules():  # the optimiser already holds the scale parameters
        model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    ctl.load_state_dict(saved[2])
    assert ctl.sigmas() == sigmas_at_save and ctl.step_count == 8
    for g, s in ctl.sigmas().items():
        for name in ctl.groups[g]:
            assert dict(brevitas_ana.ana_quantizers(model))[name].sigma == s
    torch.manual_seed(1)
    _train(model, ctl, opt, 12, x, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_load_before_first_forward_and_mismatch():
    model = make()
    src = AnaController(model, total_steps=30, example_input=torch.randn(2, 8))
    src.step(12)
    lazy = AnaController(make(), total_steps=30)
    lazy.load_state_dict(src.state_dict())
    lazy.model(torch.randn(2, 8))
    assert lazy.sigmas() == src.sigmas()
    other = AnaController(make(), preset="partition", total_steps=30,
                          example_input=torch.randn(2, 8))
    with pytest.raises(ValueError, match="preset"):
        other.load_state_dict(src.state_dict())


# --- backward policies, anneal_end, defaults ---------------------------------------------------

@pytest.mark.parametrize("backward", ["exact", "floor", "schedule"])
def test_backward_policies_follow_their_formulas(backward):
    total, floor, sigma0 = 40, 0.3, 0.8
    ctl = AnaController(make(), preset="progressive", total_steps=total,
                        example_input=torch.randn(2, 8),
                        config=AnaConfig(sigma=sigma0, backward=backward, sigma_grad_min=floor))
    quantisers = dict(brevitas_ana.ana_quantizers(ctl.model))
    n = len(ctl.groups)
    for t in (0, 5, 20, 27, 28, 35, 40):
        ctl.step(t - ctl.step_count)
        for l, (g, sigma_b) in enumerate(ctl.grad_sigmas().items()):
            sigma = expected_sigma("progressive", l, n, t, 0.7 * total, sigma0)
            want_floor = {"exact": 0.0, "floor": floor,
                          "schedule": floor * max(0.0, (total - t) / total)}[backward]
            assert sigma_b == pytest.approx(max(sigma, want_floor), abs=1e-15), (t, g)
            for name in ctl.groups[g]:  # what the quantisers pass to ana_round
                args = quantisers[name].noise_args()
                assert args["sigma"] == pytest.approx(sigma, abs=1e-15)
                assert args["sigma_grad_min"] == pytest.approx(want_floor, abs=1e-15)


def test_schedule_policy_takes_a_sigma_grad_schedule_per_group():
    ctl = AnaController(make(), preset="homogeneous", total_steps=10,
                        example_input=torch.randn(2, 8),
                        schedules={"*": {"sigma_grad": {"name": "constant"}}},
                        config=AnaConfig(sigma=0.5, backward="schedule", sigma_grad_min=0.4))
    ctl.step(10)
    assert set(ctl.grad_sigmas().values()) == {0.4} and set(ctl.sigmas().values()) == {0.0}
    with pytest.raises(ValueError, match="sigma_grad.*needs backward='schedule'"):
        AnaController(make(), total_steps=10, example_input=torch.randn(2, 8),
                      schedules={"*": {"sigma_grad": {"name": "constant"}}})


@pytest.mark.parametrize("kwargs,match", [
    (dict(anneal_end=0.0), "anneal_end"), (dict(anneal_end=1.2), "anneal_end"),
    (dict(anneal_end=float("nan")), "anneal_end"), (dict(anneal_end="late"), "anneal_end"),
    (dict(sigma_grad_min=-0.1), "sigma_grad_min"),
    (dict(sigma_grad_min=float("inf")), "sigma_grad_min"),
    (dict(sigma_grad_min=float("nan")), "sigma_grad_min"),
    (dict(backward="smooth"), "backward")])
def test_bad_policy_arguments_name_them(kwargs, match):
    with pytest.raises(ValueError, match=rf"^{match}\b"):
        if "anneal_end" in kwargs:
            AnaController(make(), total_steps=10, **kwargs)
        else:
            AnaController(make(), total_steps=10, config=AnaConfig(**kwargs))


def test_defaults_are_the_familys_starting_noise_and_the_floor_policy():
    """The start is the quantisers' family's own noise; the floor and the policy the defaults'."""
    def net(act_noise, weight_noise):
        return nn.Sequential(
            qnn.QuantIdentity(act_quant=brevitas_ana.ana_quant(Int8ActPerTensorFloat,
                                                               ana_noise=act_noise)),
            qnn.QuantLinear(8, 4, bias=False, weight_quant=brevitas_ana.ana_quant(
                Int8WeightPerTensorFloat, ana_noise=weight_noise)))

    ctl = AnaController(net("normal", "normal"), total_steps=10, example_input=torch.randn(2, 8))
    default = brevitas_ana.get_noise("normal").default_sigma
    assert ctl.sigma0 == default and ctl.sigma_grad_min == AnaConfig().sigma_grad_min == 0.5774
    assert (ctl.backward, ctl.anneal_end, ctl.preset) == ("floor", 0.7, "homogeneous")
    # a floor of None: the family's starting noise too
    ctl = AnaController(net("normal", "normal"), total_steps=10, example_input=torch.randn(2, 8),
                        config=AnaConfig(sigma_grad_min=None))
    assert ctl.sigma_grad_min == default
    with pytest.raises(ValueError, match="mixes noise families"):
        AnaController(net("normal", "logistic"), total_steps=10)
    # explicit values need no default
    ctl = AnaController(net("normal", "logistic"), total_steps=10, example_input=torch.randn(2, 8),
                        config=AnaConfig(sigma=0.3, sigma_grad_min=0.25))
    assert (ctl.sigma0, ctl.sigma_grad_min) == (0.3, 0.25)
    assert set(ctl.sigmas().values()) == {0.3} and set(ctl.grad_sigmas().values()) == {0.3}


def test_saved_state_with_another_backward_policy_is_refused():
    src = AnaController(make(), total_steps=10, example_input=torch.randn(2, 8),
                        config=AnaConfig(backward="floor"))
    src.step(3)
    other = AnaController(make(), total_steps=10, example_input=torch.randn(2, 8),
                          config=AnaConfig(backward="exact"))
    with pytest.raises(ValueError, match="backward"):
        other.load_state_dict(src.state_dict())


def test_a_quantiser_brevitas_rebuilds_gets_the_policy_and_noise_at_the_next_step():
    """Brevitas rebuilds a proxy's quantiser module from its injector (on load_state_dict,
    calibration): the new module carries the injector's own backward policy. The controller
    sets the policy once, not every step, but gives it to any module it has not seen before."""
    exact_act = brevitas_ana.ana_quant(Int8ActPerTensorFloat, config=AnaConfig(backward="exact"))
    model = nn.Sequential(qnn.QuantIdentity(act_quant=exact_act),
                          qnn.QuantLinear(8, 4, bias=False, weight_quant=brevitas_ana.ana_quant(
                              Int8WeightPerTensorFloat, config=AnaConfig(backward="exact"))))
    ctl = AnaController(model, preset="homogeneous", total_steps=10,
                        example_input=torch.randn(2, 8),
                        config=AnaConfig(backward="floor", sigma_grad_min=0.4))
    ctl.step()
    quantisers = dict(brevitas_ana.ana_quantizers(model))
    assert {m.backward for m in quantisers.values()} == {"floor"}
    model[0].act_quant.init_tensor_quant()  # what a load does
    rebuilt = dict(brevitas_ana.ana_quantizers(model))
    fresh = [n for n in rebuilt if rebuilt[n] is not quantisers.get(n)]
    assert fresh and all(rebuilt[n].backward == "exact" and rebuilt[n].sigma == 0.0
                         for n in fresh)
    ctl.step()
    assert all(rebuilt[n].backward == "floor" and rebuilt[n].sigma_grad_min == 0.4
               and rebuilt[n].sigma == pytest.approx(ctl.sigmas()["0"]) for n in fresh)
