"""The integer-only graph: thresholds that are exact where the accumulator sits on them, no float
tensor between layers, clear errors for what it cannot express."""
import numpy as np
import onnx
import pytest
import torch
from brevitas.quant import (Int8ActPerTensorFixedPoint, Int8ActPerTensorFloat,
                            Int8WeightPerTensorFixedPoint, SignedBinaryActPerTensorConst,
                            SignedTernaryActPerTensorConst, Uint8ActPerTensorFixedPoint)
from torch import nn
import brevitas.nn as qnn

from brevitas_ana.export import ExportError, export_qnn, graphs, int_only, runtime

from test_export import fixed_batch, tiny_qnn

C = 6
W_INT = [1, -1, 3, 127, -50, 7]  # integer weights of Linear(1, C): acc = w_c * x_q


def act_quantiser(kind):
    return {"binary": lambda: qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst),
            "ternary": lambda: qnn.QuantIdentity(act_quant=SignedTernaryActPerTensorConst),
            "uint4": lambda: qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, bit_width=4),
            "int4": lambda: qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint,
                                              bit_width=4)}[kind]()


def threshold_qnn(act: str, bn: str) -> nn.Module:
    """8-bit input -> Linear(1, 6) with the integer weights W_INT (scale 2^-6) -> BN -> ``act``.
    acc = w_c * x_q for x_q in [-128, 127]: channel 0 (w = 1) sees every accumulator of its range.
    ``bn="exact"``: gains +-2^k, variance 1, eps 0, so float32 computes BN exactly and values land
    exactly on rounding boundaries (ties); ``bn="random"``: arbitrary statistics, gains of both
    signs and one zero gain (a constant channel)."""
    torch.manual_seed(0)
    model = nn.Sequential(qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint),
                          qnn.QuantLinear(1, C, bias=False,
                                          weight_quant=Int8WeightPerTensorFixedPoint),
                          nn.BatchNorm1d(C), act_quantiser(act))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(W_INT, dtype=torch.float32).view(C, 1) / 64)
        if bn == "exact":
            model[2].eps = 0.0
            model[2].running_var.fill_(1.0)
            model[2].running_mean.zero_()
            model[2].weight.copy_(torch.tensor([64.0, -64.0, 16.0, 1.0, -2.0, 0.0]))
            model[2].bias.copy_(torch.tensor([0.0, 0.25, -0.125, 0.5, 0.0, 1.0]))
        else:
            model[2].running_mean.copy_(torch.randn(C) * 0.005)
            model[2].running_var.copy_(torch.rand(C) + 0.1)
            model[2].weight.copy_(torch.tensor([45.3, -37.1, 11.7, 0.83, -1.9, 0.0]))
            model[2].bias.copy_(torch.randn(C) * 0.1)
    # activation statistics (scales) from a training pass; BN statistics kept as set above
    model.train()
    model[2].eval()
    with torch.no_grad():
        for _ in range(3):
            model(torch.linspace(-1, 1, 256).view(-1, 1))
    return model.eval()


def all_levels(model):
    """Every input level of the 8-bit input quantiser: x_q = -128 .. 127."""
    scale = float(model[0].act_quant(torch.zeros(1, 1)).scale)
    return (torch.arange(-128, 128, dtype=torch.float32) * scale).view(-1, 1)


@pytest.mark.parametrize("bn", ["exact", "random"])
@pytest.mark.parametrize("act", ["binary", "ternary", "uint4", "int4"])
def test_thresholds_exact_at_their_boundaries(act, bn, tmp_path):
    model = threshold_qnn(act, bn)
    x = all_levels(model)
    assert model[1].quant_weight().int().view(-1).tolist() == W_INT
    qcdq = graphs.qonnx_to_qcdq(graphs.qonnx_from_torch(model, x, dynamic_batch=True))
    integer, layers = graphs.qcdq_to_integer(qcdq)
    only, (spec,) = int_only.integer_to_int_only(integer, layers)
    assert int_only.float_tensors_between(only) == []
    # channel 0 sees every accumulator in [-128, 127]: its thresholds inside that range are hit
    # exactly (acc = T) and just missed (acc = T - 1) by the inputs below
    inside = [t for t in spec.sign[0] * spec.table[0] if -127 <= t <= 127]
    assert inside, "the test must put a threshold inside channel 0's range"
    # directions follow the sign of BN's gain gamma_c (s_x s_w > 0; channel 5 is constant)
    gain = model[2].weight.detach().numpy()
    assert all(s == np.sign(g) for s, g in zip(spec.sign, gain) if g != 0)

    with torch.no_grad():
        expected = model(x).numpy()
    got_int = runtime.run_onnxruntime(integer, x.numpy(), 256)
    got = runtime.run_onnxruntime(only, x.numpy(), 256)
    np.testing.assert_array_equal(got, got_int)  # the same integers as the float chain
    np.testing.assert_array_equal(got, expected)  # and as PyTorch, tie cases included
    if bn == "exact":  # ties did occur: BN outputs exactly on a rounding boundary
        with torch.no_grad():
            z = model[2](model[1](model[0](x)))
        if act == "binary":
            assert (z == 0).any()
        else:
            s_a = float(model[3].act_quant(z).scale)
            frac = (z / s_a).numpy() % 1
            assert (frac == 0.5).any()


def test_no_float_tensor_between_layers_and_the_walk_can_fail():
    model = tiny_qnn("w2a2", per_channel=False, po2=False)
    images, _ = fixed_batch(8)
    qcdq = graphs.qonnx_to_qcdq(graphs.qonnx_from_torch(model, images, dynamic_batch=True))
    integer, layers = graphs.qcdq_to_integer(qcdq)
    only, specs = int_only.integer_to_int_only(integer, layers)
    assert int_only.float_tensors_between(only) == []
    assert len(specs) == len(layers) - 1  # the last layer dequantises
    # the integer graph keeps BN in float: the same walk finds those tensors
    floats = int_only.float_tensors_between(integer)
    assert any("BatchNormalization" in f for f in floats)
    # every tensor type, walked independently: only integers from the input quantiser's
    # output up to the last accumulator
    inferred = onnx.shape_inference.infer_shapes(only)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    ops = [n for n in only.graph.node]
    first_q = next(i for i, n in enumerate(ops) if n.op_type == "QuantizeLinear")
    last_k = max(i for i, n in enumerate(ops) if n.op_type in ("ConvInteger", "MatMulInteger"))
    between = [o for n in ops[first_q:last_k + 1] for o in n.output]
    assert between and all(types[t] != onnx.TensorProto.FLOAT for t in between)
    assert {"MaxPool", "ConvInteger", "MatMulInteger", "GreaterOrEqual"} <= {n.op_type
                                                                             for n in ops}


@pytest.mark.parametrize("bits", ["w1a1", "w2a2", "w4a4"])
def test_int_only_agrees_with_pytorch(bits, tmp_path):
    """Binary, ternary and 4-bit networks with learned float scales and BN after every layer."""
    model = tiny_qnn(bits, per_channel=bits == "w4a4", po2=False)
    images, labels = fixed_batch(96)
    report = export_qnn(model, images, tmp_path, labels=labels, formats=["int", "int_only"])
    row, ref = report["formats"]["int_only"], report["formats"]["int"]
    assert row["argmax_agreement"] == 100.0 and row["top1_torch"] == ref["top1_torch"]
    assert row["max_diff_quanta"] == ref["max_diff_quanta"]  # the integer graph's integers
    info = report["int_only"]
    assert info["float_tensors_between_layers"] == []
    assert {"ConvInteger", "MatMulInteger"} <= set(info["executed_kernels"])
    assert all(r["integer"] for r in info["layers"])


def integer_graph(model, x):
    """(integer graph, layers) of ``model`` after one training pass on random inputs (the
    activation scales)."""
    model.train()
    with torch.no_grad():
        model(torch.randn(16, x.shape[1]))
    model.eval()
    qcdq = graphs.qonnx_to_qcdq(graphs.qonnx_from_torch(model, x, dynamic_batch=True))
    return graphs.qcdq_to_integer(qcdq)


class Tanh(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


def test_unsupported_op_is_an_error_naming_the_node_and_other_graphs_are_written(tmp_path):
    model = nn.Sequential(qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat),
                          qnn.QuantLinear(4, 8, bias=False), Tanh(),
                          qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat),
                          qnn.QuantLinear(8, 3, bias=False))
    x = torch.randn(20, 4)
    integer, layers = integer_graph(model, x)
    with pytest.raises(ExportError, match=r"Tanh node Tanh_0: between the accumulator of "
                                          r"MatMul_0 and its activation quantiser"):
        int_only.integer_to_int_only(integer, layers)
    report = export_qnn(model, x, tmp_path)
    assert not report["passed"] and report["formats"]["int_only"]["file"] is None
    assert any(f.startswith("int_only: Tanh node Tanh_0") for f in report["failures"])
    assert not (tmp_path / "model_int_only.onnx").exists()
    for fmt in ("qonnx", "qcdq", "int"):
        assert report["formats"][fmt]["passed"] and (tmp_path / f"model_{fmt}.onnx").exists()


def test_per_channel_activation_scale_is_an_error_naming_the_node():
    act = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, scaling_per_output_channel=True,
                            per_channel_broadcastable_shape=(1, 8),
                            scaling_stats_permute_dims=(1, 0))
    model = nn.Sequential(qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat),
                          qnn.QuantLinear(4, 8, bias=False), nn.BatchNorm1d(8), act,
                          qnn.QuantLinear(8, 3, bias=False))
    integer, layers = integer_graph(model, torch.randn(4, 4))
    with pytest.raises(ExportError, match=r"QuantizeLinear node Quant_\d+_q: per-channel "
                                          r"activation scale"):
        int_only.integer_to_int_only(integer, layers)
