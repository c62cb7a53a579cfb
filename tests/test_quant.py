"""ANA quantisers against stock Brevitas: eval outputs, state dicts, exports, gradients."""
import os
import subprocess
import sys

import onnx
import pytest
import torch
import torch.utils._python_dispatch
import brevitas.nn as qnn
from brevitas.core.bit_width import BitWidthImplType
from brevitas.export import export_onnx_qcdq, export_qonnx
from brevitas.quant import (Int8ActPerTensorFloat, Int8WeightPerChannelFloat,
                            Int8WeightPerTensorFloat, SignedBinaryActPerTensorConst,
                            SignedBinaryWeightPerTensorConst, SignedTernaryActPerTensorConst,
                            SignedTernaryWeightPerTensorConst, Uint8ActPerTensorFloat)
from brevitas_examples.bnn_pynq.models.common import CommonActQuant, CommonWeightQuant
from torch import nn

import brevitas_ana
from brevitas_ana import ana_quant, ana_round, set_sigma
from brevitas_ana import quant as aq

PAIRS = [  # (weight quant, act quant, layer kwargs)
    (Int8WeightPerTensorFloat, Int8ActPerTensorFloat, dict(weight_bit_width=4)),
    (Int8WeightPerChannelFloat, Uint8ActPerTensorFloat, {}),
    (SignedBinaryWeightPerTensorConst, SignedBinaryActPerTensorConst, {}),
    (SignedTernaryWeightPerTensorConst, SignedTernaryActPerTensorConst, {}),
    (CommonWeightQuant, CommonActQuant, dict(weight_bit_width=1, act_bit_width=1)),
    (CommonWeightQuant, CommonActQuant, dict(weight_bit_width=2, act_bit_width=2)),
]
IDS = ["int8-4bit", "perchannel-uint8", "binary", "ternary", "bnn_pynq-w1a1", "bnn_pynq-w2a2"]
NAMED_TWINS = [(getattr(aq, "Ana" + q.__name__), q) for q in (
    Int8WeightPerTensorFloat, Int8WeightPerChannelFloat, Int8ActPerTensorFloat,
    Uint8ActPerTensorFloat, SignedBinaryWeightPerTensorConst, SignedBinaryActPerTensorConst,
    SignedTernaryWeightPerTensorConst, SignedTernaryActPerTensorConst)]


def small_net(wq, actq, kw, ana=False, seed=0, **ana_options):
    if ana:
        wq, actq = ana_quant(wq, **ana_options), ana_quant(actq, **ana_options)
    act_kw = {k[4:]: v for k, v in kw.items() if k.startswith("act_")}
    w_kw = {k: v for k, v in kw.items() if k.startswith("weight_")}
    torch.manual_seed(seed)
    return nn.Sequential(
        qnn.QuantIdentity(act_quant=actq, return_quant_tensor=True, **act_kw),
        qnn.QuantConv2d(3, 8, 3, weight_quant=wq, bias=False, **w_kw),
        nn.BatchNorm2d(8),
        qnn.QuantIdentity(act_quant=actq, **act_kw),
        nn.Flatten(),
        qnn.QuantLinear(8 * 6 * 6, 10, bias=False, weight_quant=wq, **w_kw))


def twin_pair(wq, actq, kw, **ana_options):
    stock = small_net(wq, actq, kw)
    ana = small_net(wq, actq, kw, ana=True, **ana_options)
    calib = torch.randn(16, 3, 8, 8)
    stock.train()(calib)  # runtime-stats scales exist only after a training forward
    ana.train()(calib)
    state = stock.state_dict()
    ana.load_state_dict(state, strict=True)
    # loading also ends Brevitas' scale-statistics phase: do it to both so they stay in step
    stock.load_state_dict(state, strict=True)
    return stock, ana


@pytest.mark.parametrize("wq,actq,kw", PAIRS, ids=IDS)
def test_eval_bit_identical_and_state_dicts_interchange(wq, actq, kw):
    stock, ana = twin_pair(wq, actq, kw)
    set_sigma(ana, 0.8, 0.2)  # training noise must not leak into eval
    stock.load_state_dict(ana.state_dict(), strict=True)
    x = torch.randn(32, 3, 8, 8) * 2
    stock.eval(), ana.eval()
    with torch.no_grad():
        assert torch.equal(stock(x), ana(x))
    assert stock.state_dict().keys() == ana.state_dict().keys()


@pytest.mark.parametrize("ana_cls,stock_cls", NAMED_TWINS, ids=lambda c: c.__name__)
def test_named_twins_are_subclasses_with_ana_rounding(ana_cls, stock_cls):
    assert issubclass(ana_cls, stock_cls) and ana_cls.__name__ == "Ana" + stock_cls.__name__
    is_weight = "Weight" in stock_cls.__name__
    layer = (qnn.QuantLinear(4, 3, bias=False, weight_quant=ana_cls) if is_weight
             else qnn.QuantIdentity(act_quant=ana_cls))
    assert len(list(brevitas_ana.ana_quantizers(layer))) == 1


@pytest.mark.parametrize("wq,actq,kw", PAIRS, ids=IDS)
def test_training_output_is_scale_times_ana_round(wq, actq, kw):
    # Weight quantiser in training with noise == scale * ana_round(w / scale) computed here.
    _, ana = twin_pair(wq, actq, kw, ana_strategy="expectation", ana_noise="normal")
    set_sigma(ana, 0.6, 0.1)
    conv = ana[1]
    qw = conv.quant_weight()
    scale = qw.scale.detach()
    w = conv.weight.detach()
    if qw.bit_width.item() == 1:  # binary: levels 0/1 in step units, output (2q - 1) * scale
        q = ana_round((w / scale + 1) / 2, 0, 1, "normal", 0.6, 0.1)
        want = (2 * q - 1) * scale
    else:
        narrow = conv.weight_quant.is_narrow_range
        n = 2 ** (int(qw.bit_width.item()) - 1)
        want = scale * ana_round(w / scale, -n + int(narrow), n - 1, "normal", 0.6, 0.1)
    torch.testing.assert_close(qw.value.detach(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("wq,actq,kw", PAIRS, ids=IDS)
def test_annealed_noise_trains_exactly_like_stock(wq, actq, kw):
    """At sigma 0 with the exact backward policy (the default floor smooths the gradient on
    purpose) training is stock Brevitas bit for bit."""
    stock, ana = twin_pair(wq, actq, kw, ana_backward="exact")
    set_sigma(ana, 0.0)
    x = torch.randn(16, 3, 8, 8)
    outs, grads = [], []
    for m in (stock, ana):
        out = m.train()(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append([p.grad for p in m.parameters()])
    assert torch.equal(outs[0], outs[1])
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


def test_scales_learn_and_noise_changes_their_gradient():
    stock, ana = twin_pair(Int8WeightPerTensorFloat, Int8ActPerTensorFloat,
                           dict(weight_bit_width=4))
    set_sigma(ana, 0.7)
    x = torch.randn(16, 3, 8, 8)
    grads = {}
    for name, m in (("stock", stock), ("ana", ana)):
        m.train()(x).square().sum().backward()
        grads[name] = {k: p.grad for k, p in m.named_parameters() if "scaling_impl.value" in k}
    assert grads["ana"].keys() == grads["stock"].keys() and len(grads["ana"]) == 2
    for k, g in grads["ana"].items():
        assert g is not None and g.abs().item() > 0, k
        assert not torch.equal(g, grads["stock"][k]), k


def test_learned_bit_width_gets_stock_gradient_through_the_bounds():
    # Given the scale, the bit width acts only through the clamp bounds: under a loss linear in
    # the output its gradient must equal stock Brevitas' whatever the noise.
    from brevitas.core.quant import IntQuant
    torch.manual_seed(0)
    x, c = torch.randn(200) * 3, torch.randn(200)
    scale, zero_point = torch.tensor(0.2), torch.tensor(0.0)
    grads = []
    for m in (IntQuant(True, True, nn.Identity()),
              aq.AnaIntQuant(True, True, nn.Identity(), ana_noise="normal", ana_sigma=0.9)):
        bit_width = torch.tensor(4.0, requires_grad=True)
        (m.train()(scale, zero_point, bit_width, x) * c).sum().backward()
        grads.append(bit_width.grad)
    assert grads[0].abs().item() > 0
    torch.testing.assert_close(grads[1], grads[0])


class _DeviceReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value by the host (.item(), bool(), int(): each waits for
    the device on a GPU)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("wq,actq,kw", [PAIRS[0], PAIRS[5]], ids=[IDS[0], IDS[5]])
def test_integer_quantisers_read_the_device_no_more_than_stock(wq, actq, kw):
    """The clamp bounds are read from the bit width once, not at every step (a host-device
    sync per quantiser and step on a GPU); a new bit width is read again."""
    stock, ana = twin_pair(wq, actq, kw)
    set_sigma(ana, 0.5)
    x = torch.randn(4, 3, 8, 8)
    reads = []
    for net in (stock, ana):
        net(x).sum().backward()  # first step: ANA reads its bounds here
        with _DeviceReads() as probe:
            for _ in range(3):
                net(x).sum().backward()
        reads.append(probe.reads)
    assert reads[1] <= reads[0], reads
    # the bounds read once still follow the bit width: changed in place (same storage, new
    # version) or a new tensor, the noisy rounding clamps to the new range
    q = aq.AnaIntQuant(True, True, nn.Identity()).train()  # narrow range, signed
    q.set_sigma(0.3)
    x = torch.linspace(-20, 20, 401)
    one = torch.ones(())
    bit_width = torch.tensor(4.0)

    def extremes(bits):
        out = q.to_int(one, 0 * one, bits, x)
        return out.min().item(), out.max().item()
    assert extremes(bit_width) == (-7, 7)
    bit_width.fill_(3.0)
    assert extremes(bit_width) == (-3, 3)
    assert extremes(torch.tensor(2.0)) == (-1, 1)


class _LearnedBitWidth(Int8WeightPerTensorFloat):
    bit_width_impl_type = BitWidthImplType.PARAMETER
    bit_width = 4


def test_learned_bit_width_learns_in_a_layer():
    layer = qnn.QuantLinear(20, 5, bias=False, weight_quant=ana_quant(_LearnedBitWidth))
    set_sigma(layer, 0.9)
    layer.train()(torch.randn(7, 20)).square().sum().backward()
    (bw,) = [p for n, p in layer.named_parameters() if "bit_width" in n]
    assert bw.grad is not None and bw.grad.abs().item() > 0


def test_keyword_configuration():
    q = aq.AnaInt8ActPerTensorFloat.let(ana_noise="logistic", ana_strategy="mode", ana_sigma=0.4,
                                        ana_mu=0.5, ana_annealed_grad="zero")
    (_, m), = brevitas_ana.ana_quantizers(qnn.QuantIdentity(act_quant=q))
    assert (m.noise, m.strategy, m.sigma, m.mu, m.annealed_grad) == (
        "logistic", "mode", 0.4, 0.5, "zero")
    layer = qnn.QuantConv2d(3, 4, 3, weight_quant=aq.AnaInt8WeightPerChannelFloat,
                            weight_ana_noise="triangular", weight_bit_width=3)
    (_, m), = brevitas_ana.ana_quantizers(layer)
    assert m.noise == "triangular" and layer.quant_weight().bit_width.item() == 3


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="ana_nosie"):
        ana_quant(Int8ActPerTensorFloat, ana_nosie="normal")
    with pytest.raises(ValueError, match="noise"):
        qnn.QuantIdentity(act_quant=aq.AnaInt8ActPerTensorFloat.let(ana_noise="gauss"))
    with pytest.raises(ValueError, match="strategy"):
        qnn.QuantIdentity(act_quant=aq.AnaInt8ActPerTensorFloat.let(ana_strategy="max"))
    with pytest.raises(ValueError, match="quant must be"):
        ana_quant(nn.Linear)


def test_unsupported_quantisers_are_refused():
    from brevitas.quant.float import Fp8e4m3WeightPerTensorFloat
    with pytest.raises(ValueError, match="FloatQuant"):
        ana_quant(Fp8e4m3WeightPerTensorFloat)

    class FloorQuant(Int8WeightPerTensorFloat):
        float_to_int_impl_type = "floor"

    with pytest.raises(ValueError, match="float_to_int_impl"):
        qnn.QuantLinear(4, 4, weight_quant=ana_quant(FloorQuant))


def test_set_sigma():
    _, ana = twin_pair(*PAIRS[0])
    assert set_sigma(ana, 0.3, -0.1) == 4  # two weight and two activation quantisers
    assert all((m.sigma, m.mu) == (0.3, -0.1) for _, m in brevitas_ana.ana_quantizers(ana))
    with pytest.raises(ValueError, match="sigma"):
        set_sigma(ana, -1.0)
    with pytest.raises(ValueError, match="no ANA quantiser"):
        set_sigma(small_net(*PAIRS[0]), 0.3)


def test_brevitas_jit_is_refused():
    env = dict(os.environ, BREVITAS_JIT="1")
    proc = subprocess.run([sys.executable, "-c", "import brevitas_ana"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "BREVITAS_JIT" in proc.stderr and "RuntimeError" in proc.stderr


def _graph_signature(path):
    model = onnx.load(path)
    ops = [(n.op_type, tuple(n.input), tuple(n.output), tuple(
        (a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute))
        for n in model.graph.node]
    inits = {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in model.graph.initializer}
    return ops, inits


@pytest.mark.parametrize("wq,actq,kw", PAIRS, ids=IDS)
def test_exports_identical_to_stock(wq, actq, kw, tmp_path):
    stock, ana = twin_pair(wq, actq, kw)
    set_sigma(ana, 0.5)
    x = torch.randn(1, 3, 8, 8)
    binary = 1 in (kw.get("weight_bit_width"), kw.get("act_bit_width")) or "Binary" in wq.__name__
    exports = [("qonnx", export_qonnx)] + ([] if binary else [("qcdq", export_onnx_qcdq)])
    for fmt, fn in exports:
        sigs = []
        for name, m in (("stock", stock), ("ana", ana)):
            path = tmp_path / f"{name}_{fmt}.onnx"
            fn(m.eval(), args=x, export_path=str(path), dynamo=False, opset_version=13)
            sigs.append(_graph_signature(path))
        assert len(sigs[0][0]) > 3
        assert sigs[0] == sigs[1], fmt
