"""to_ana / to_stock on Brevitas models, quantize_timm on timm models."""
import copy

import onnx
import pytest
import timm
import torch
import brevitas.nn as qnn
from brevitas.export import export_onnx_qcdq, export_qonnx
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat
from brevitas_examples.bnn_pynq.models.CNV import CNV
from torch import nn

import brevitas_ana
from brevitas_ana import AnaConfig, AnaController, ana_quantizers, to_ana, to_stock


def cnv(bits):
    torch.manual_seed(0)
    return CNV(num_classes=10, weight_bit_width=bits, act_bit_width=bits, in_bit_width=8, in_ch=3)


def per_channel_net():
    torch.manual_seed(0)
    return nn.Sequential(
        qnn.QuantConv2d(3, 8, 3, weight_quant=Int8WeightPerChannelFloat, weight_bit_width=4,
                        weight_scaling_impl_type="parameter_from_stats"),
        nn.BatchNorm2d(8),
        qnn.QuantReLU(act_quant=Int8ActPerTensorFloat, bit_width=4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        qnn.QuantLinear(8, 10, bias=True, weight_quant=Int8WeightPerChannelFloat,
                        weight_bit_width=4))


MODELS = {"cnv_w1a1": lambda: cnv(1), "cnv_w2a2": lambda: cnv(2),
          "learned_per_channel": per_channel_net}


@pytest.mark.parametrize("name", list(MODELS))
def test_to_ana_keeps_everything_and_to_stock_undoes_it(name):
    model = MODELS[name]()
    x = torch.rand(8, 3, 32, 32)
    model.train()(x)  # scale statistics
    stock_copy = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    to_ana(model, AnaConfig(noise="normal", backward="exact"))
    leaves = list(ana_quantizers(model))
    # the options of the config, noise off until a controller or set_sigma turns it on
    assert len(leaves) >= 3 and all(m.noise == "normal" and m.sigma == 0.0
                                    and m.backward == "exact" for _, m in leaves)
    brevitas_ana.set_sigma(model, 0.4)
    assert all(params[k] is p for k, p in model.named_parameters())  # optimiser stays valid
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), stock_copy(x))
    # a Brevitas rebuild (state-dict load) keeps ANA: the injectors were swapped too
    model.load_state_dict(stock_copy.state_dict())
    assert len(list(ana_quantizers(model))) == len(leaves)
    to_stock(model)
    assert not list(ana_quantizers(model))
    model.load_state_dict(stock_copy.state_dict())
    assert not list(ana_quantizers(model))
    with torch.no_grad():
        assert torch.equal(model(x), stock_copy(x))


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_trains(name):
    model = MODELS[name]()
    torch.manual_seed(1)
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    model.train()(x)
    reference = copy.deepcopy(model).eval()
    to_ana(model)
    ctl = AnaController(model, preset="progressive", total_steps=300, example_input=x[:2],
                        config=AnaConfig(sigma=0.5))
    with torch.no_grad():  # at noise zero (eval) the converted model is the original
        assert torch.equal(model.eval()(x), reference(x))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(25):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        ctl.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.95 * sum(losses[:5]), losses
    sigmas = list(ctl.sigmas().values())
    assert 0 < sigmas[0] < sigmas[-1] < 0.5  # annealing, input side first


def test_to_ana_errors():
    with pytest.raises(ValueError, match="no Brevitas integer or binary"):
        to_ana(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="noise"):
        to_ana(per_channel_net(), config=AnaConfig(noise="gauss"))
    with pytest.raises(ValueError, match="sigma"):
        to_ana(per_channel_net(), config=AnaConfig(sigma=-2))


TIMM = ["resnet18", "mobilenetv3_small_100", "efficientnet_b0"]


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("name", TIMM)
def test_quantize_timm(name, tmp_path):
    torch.manual_seed(0)
    model = brevitas_ana.quantize_timm(
        timm.create_model(name, pretrained=False, num_classes=10),
        weight_bit_width=4, act_bit_width=4, first_layer_bit_width=8, last_layer_bit_width=8,
        config=AnaConfig(noise="logistic"))
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear)) for m in layers)
    bits = [int(m.quant_weight().bit_width.item()) for m in layers]
    assert bits[0] == 8 and bits[-1] == 8 and set(bits[1:-1]) == {4}
    assert int(layers[1].input_quant.bit_width().item()) == 4
    leaves = list(ana_quantizers(model))
    assert len(leaves) >= 2 * (len(layers) - 1) and all(m.noise == "logistic" for _, m in leaves)

    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    ctl = AnaController(model, preset="progressive", total_steps=10, example_input=x[:1],
                        config=AnaConfig(sigma=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    ctl.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("weight")
               and p.dim() > 1)

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    export_qonnx(model, args=x[:1], export_path=str(tmp_path / "q.onnx"), dynamo=False,
                 opset_version=13)
    export_onnx_qcdq(model, args=x[:1], export_path=str(tmp_path / "c.onnx"), dynamo=False,
                     opset_version=13)
    assert "Quant" in _ops(tmp_path / "q.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(tmp_path / "c.onnx")


def test_quantize_timm_errors():
    with pytest.raises(ValueError, match="weight_bit_width"):
        brevitas_ana.quantize_timm(nn.Sequential(nn.Linear(3, 3)), weight_bit_width=1)
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        brevitas_ana.quantize_timm(nn.Sequential(nn.ReLU()))
    # a model's name instead of the model: what to do, not an AttributeError from inside
    with pytest.raises(TypeError, match=r"^model: quantize_timm takes a torch.nn.Module, got str "
                                        r"'resnet99'; build it first: quantize_timm\(timm"):
        brevitas_ana.quantize_timm("resnet99")


# --- the float twin -----------------------------------------------------------------------------

def test_set_float_relaxes_every_quantiser_to_its_clamp_and_back():
    """Relaxed, an integer quantiser is (clamp(x / s, min_int, max_int)) * s and a binary one
    hardtanh(x / s) * s, computed here from the quantisers' own scales; the state dict is the
    quantised network's; set_float(False) gives back the exact stair; a Brevitas reload keeps
    the mode."""
    torch.manual_seed(0)
    for bits in (1, 2):
        model = to_ana(cnv(bits))
        x = torch.rand(4, 3, 32, 32) * 2 - 1
        model.train()(x)  # scales exist
        stair = model.eval()(x)
        keys = list(model.state_dict())
        assert brevitas_ana.set_float(model) is model
        act = model.conv_features[3]  # the first hidden activation quantiser (CNV: scale 1)
        y = torch.linspace(-3, 3, 24)  # no point on a boundary (+-1), where the slope splits
        # binary (scale 1): hardtanh; CNV's 2-bit activations: signed, narrow range, scale 1,
        # levels -1, 0, 1: the same clamp
        torch.testing.assert_close(act(y), y.clamp(-1, 1), rtol=0, atol=0)
        # not on the grid: the relaxation passes values between the levels
        assert act(torch.tensor([0.3]))[0] == pytest.approx(0.3)
        relaxed = model(x)
        assert not torch.equal(relaxed, stair) and list(model.state_dict()) == keys
        # gradient of the clamp: 1 inside the range, 0 outside
        t = y.clone().requires_grad_()
        act.train()(t).sum().backward()
        assert torch.equal(t.grad, ((y > -1) & (y < 1)).float())
        model.eval()
        before = [m for _, m in ana_quantizers(model)]  # held: ids are not reused meanwhile
        model.load_state_dict(model.state_dict())  # Brevitas rebuilds its quantiser modules
        after = [m for _, m in ana_quantizers(model)]
        assert len(after) == len(before) and not any(a is b for a in after for b in before)
        assert all(m.float_mode for _, m in ana_quantizers(model))  # ...relaxed all the same
        assert torch.equal(model(x), relaxed)
        brevitas_ana.set_float(model, False)
        assert torch.equal(model(x), stair)
        # back to stock and to ANA again: the new quantisers are not relaxed, and stay so
        to_ana(to_stock(model))
        model.load_state_dict(model.state_dict())
        assert not any(m.float_mode for _, m in ana_quantizers(model))


def test_set_float_on_a_learned_scale_quantiser_clamps_at_its_range():
    model = to_ana(per_channel_net())
    x = torch.randn(8, 3, 10, 10)
    model.train()(x)
    model.eval()
    brevitas_ana.set_float(model)
    relu = model[2]  # Int8ActPerTensorFloat at 4 bits, signed: levels -8..7 times its scale
    scale = relu.act_quant.scale().item()
    y = torch.linspace(-20, 20, 81) * scale
    torch.testing.assert_close(relu(y), torch.relu(y).clamp(max=7 * scale), rtol=1e-6,
                               atol=1e-6)
    with pytest.raises(ValueError, match="no ANA quantiser"):
        brevitas_ana.set_float(per_channel_net())
