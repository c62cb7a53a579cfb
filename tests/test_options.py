"""AnaConfig: one options object for ana_quant, to_ana, quantize_timm and the controller."""
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
    # the floor: std of uniform noise of half-width one step, 1/sqrt(3) to 4 places
    assert (c.noise, c.strategy, c.annealed_grad, c.sigma, c.mu, c.backward,
            c.sigma_grad_min) == ("uniform", "expectation", "ste", None, 0.0, "floor",
                                  round(1 / 3 ** 0.5, 4))
    start = brevitas_ana.get_noise("uniform").default_sigma
    assert c.start_sigma == start
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.noise = "normal"
    # to_ana and the controller read the same defaults
    model = to_ana(net())
    assert options(model) == {("uniform", "expectation", "ste", 0.0, 0.0, "floor", 0.5774)}
    ctl = AnaController(model, total_steps=10, example_input=torch.randn(2, 8))
    assert (ctl.preset, ctl.anneal_end, ctl.sigma0, ctl.mu0, ctl.backward,
            ctl.sigma_grad_min) == ("homogeneous", 0.7, start, 0.0, "floor", 0.5774)
    # None: the family's starting noise
    ctl = AnaController(model, total_steps=10, config=AnaConfig(sigma_grad_min=None))
    assert ctl.sigma_grad_min == start


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


def test_anything_but_an_anaconfig_is_a_type_error_naming_config():
    """No keyword spellings beside AnaConfig (the API before it was never released)."""
    with pytest.raises(TypeError, match="to_ana: config must be an AnaConfig, got str"):
        to_ana(net(), "normal")
    with pytest.raises(TypeError, match="unexpected keyword argument 'noise'"):
        to_ana(net(), noise="normal")
    with pytest.raises(TypeError, match="quantize_timm: config must be an AnaConfig, got dict"):
        brevitas_ana.quantize_timm(timm.create_model("resnet18", num_classes=3),
                                   config={"noise": "normal"})
    with pytest.raises(TypeError, match="unexpected keyword argument 'sigma'"):
        AnaController(to_ana(net()), total_steps=10, sigma=0.2)
    with pytest.raises(TypeError, match="config: must be an AnaConfig"):
        AnaController(to_ana(net()), total_steps=10, config="uniform")
    assert not hasattr(brevitas_ana, "set_noise")
