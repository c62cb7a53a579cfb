"""AnaConfig: one options object for ana_quant, to_ana, quantize_timm and the controller; the
earlier keyword spellings still work for one release, with a DeprecationWarning."""
import dataclasses

import pytest
import timm
import torch
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat
from torch import nn
import brevitas.nn as qnn

import brevitas_ana
from brevitas_ana import AnaConfig, AnaController, ana_quant, ana_quantizers, to_ana


def net():
    torch.manual_seed(0)
    return nn.Sequential(qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat),
                         qnn.QuantLinear(8, 6, bias=False, weight_quant=Int8WeightPerTensorFloat),
                         qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat),
                         qnn.QuantLinear(6, 2, bias=False, weight_quant=Int8WeightPerTensorFloat))


def options(model):
    return {(m.noise, m.strategy, m.annealed_grad, m.sigma, m.mu, m.backward, m.sigma_grad_min)
            for _, m in ana_quantizers(model)}


def test_one_set_of_defaults():
    c = AnaConfig()
    assert (c.noise, c.strategy, c.annealed_grad, c.sigma, c.mu, c.backward,
            c.sigma_grad_min) == ("uniform", "expectation", "ste", None, 0.0, "floor", None)
    assert c.start_sigma == brevitas_ana.get_noise("uniform").default_sigma
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.noise = "normal"
    # to_ana and the controller read the same defaults
    model = to_ana(net())
    floor = brevitas_ana.get_noise("uniform").default_sigma
    assert options(model) == {("uniform", "expectation", "ste", 0.0, 0.0, "floor", floor)}
    ctl = AnaController(model, total_steps=10, example_input=torch.randn(2, 8))
    assert (ctl.sigma0, ctl.mu0, ctl.backward, ctl.sigma_grad_min) == (floor, 0.0, "floor",
                                                                       floor)


@pytest.mark.parametrize("field,value,match", [
    ("noise", "gauss", "noise"), ("strategy", "max", "strategy"), ("sigma", -1.0, "sigma"),
    ("sigma_grad_min", float("nan"), "sigma_grad_min"), ("backward", "smooth", "backward")])
def test_bad_options_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        AnaConfig(**{field: value})


def test_every_entry_point_takes_the_config():
    config = AnaConfig(noise="logistic", strategy="mode", mu=0.25, backward="exact",
                       sigma_grad_min=0.4)
    expected = {("logistic", "mode", "ste", 0.0, 0.25, "exact", 0.4)}
    assert options(to_ana(net(), config)) == expected
    layer = nn.Sequential(
        qnn.QuantIdentity(act_quant=ana_quant(Int8ActPerTensorFloat, config=config)),
        qnn.QuantLinear(8, 2, bias=False,
                        weight_quant=ana_quant(Int8WeightPerTensorFloat, config=config)))
    assert options(layer) == expected
    model = brevitas_ana.quantize_timm(timm.create_model("resnet18", num_classes=3),
                                       config=config)
    assert options(model) == expected
    ctl = AnaController(to_ana(net(), config), total_steps=10, config=AnaConfig(sigma=0.3),
                        example_input=torch.randn(2, 8))
    assert ctl.sigma0 == 0.3 and set(ctl.sigmas().values()) == {0.3}


def test_filter_fn_picks_layers_like_torchao():
    model = net()
    to_ana(model, filter_fn=lambda module, name: isinstance(module, qnn.QuantLinear))
    converted = {name.split(".")[0] for name, _ in ana_quantizers(model)}
    assert converted == {"1", "3"}  # the linears' weight quantisers, not the activations
    with pytest.raises(ValueError, match="that filter_fn selects"):
        to_ana(net(), filter_fn=lambda module, name: False)


def test_earlier_spellings_warn_and_keep_their_meaning():
    with pytest.warns(DeprecationWarning, match=r"to_ana\(noise=..., sigma=...\) is deprecated"):
        old = to_ana(net(), noise="normal", sigma=0.4)
    # the earlier sigma= set the quantisers' noise; it still does
    assert {(n, s) for n, _, _, s, *_ in options(old)} == {("normal", 0.4)}
    with pytest.warns(DeprecationWarning, match="to_ana"):
        assert {o[0] for o in options(to_ana(net(), "triangular"))} == {"triangular"}
    with pytest.warns(DeprecationWarning, match=r"quantize_timm\(ana_noise=...\)"):
        model = brevitas_ana.quantize_timm(timm.create_model("resnet18", num_classes=3),
                                           ana_noise="normal")
    assert {o[0] for o in options(model)} == {"normal"}
    with pytest.warns(DeprecationWarning, match=r"AnaController\(sigma=..., backward=...\)"):
        ctl = AnaController(to_ana(net()), total_steps=10, sigma=0.2, backward="exact",
                            example_input=torch.randn(2, 8))
    assert (ctl.sigma0, ctl.backward) == (0.2, "exact")
    model = to_ana(net())
    with pytest.warns(DeprecationWarning, match=r"set_noise\(\) is deprecated"):
        assert brevitas_ana.set_noise(model, 0.3) == 4
    assert {o[3] for o in options(model)} == {0.3}
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['noize'\]"):
        to_ana(net(), noize="normal")
