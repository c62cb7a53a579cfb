"""The export stage: QONNX, QCDQ and integer ONNX of small QNNs, validated on a fixed batch."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from brevitas.export import export_onnx_qcdq
from brevitas.quant import (Int8ActPerTensorFixedPoint, Int8ActPerTensorFloat,
                            Int8WeightPerChannelFloat, Int8WeightPerTensorFixedPoint,
                            Int8WeightPerTensorFloat, SignedBinaryActPerTensorConst,
                            SignedBinaryWeightPerTensorConst, SignedTernaryActPerTensorConst,
                            SignedTernaryWeightPerTensorConst, Uint8ActPerTensorFixedPoint,
                            Uint8ActPerTensorFloat)
from brevitas.quant.fixed_point import Int8WeightPerChannelFixedPoint
from torch import nn
import brevitas.nn as qnn

import brevitas_ana
from brevitas_ana.export import ExportError, Tolerance, export_qnn, graphs, int_only, runtime
from brevitas_ana.export.graphs import Layer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "export_run.py"


class BinaryWeightPo2(SignedBinaryWeightPerTensorConst):
    scaling_const = 0.125


def tiny_qnn(bits: str, per_channel: bool, po2: bool = True, seed: int = 0) -> nn.Module:
    """8-bit input quantiser, conv (padded) - act - pool - conv - act - linear - act - linear
    (bias) - BN, with ``bits`` in w1a1 (binary), w2a2 (ternary), w4a4, w8a8.

    ``po2=True``: power-of-two scales and no BN before a quantiser, so that every value a
    quantiser rounds is computed exactly in float32 by PyTorch and by any runtime alike: exports
    must then agree to the spec's tolerance on any machine. ``po2=False``: learned float scales
    and BN after every layer (the common case), where two float computations of a value that sits
    on a rounding boundary may round it to neighbouring levels."""
    torch.manual_seed(seed)
    if po2:
        w_per_tensor, w_per_channel = Int8WeightPerTensorFixedPoint, Int8WeightPerChannelFixedPoint
        a_signed, a_unsigned = Int8ActPerTensorFixedPoint, Uint8ActPerTensorFixedPoint
    else:
        w_per_tensor, w_per_channel = Int8WeightPerTensorFloat, Int8WeightPerChannelFloat
        a_signed, a_unsigned = Int8ActPerTensorFloat, Uint8ActPerTensorFloat
    if bits == "w1a1":
        wq, act = dict(weight_quant=BinaryWeightPo2 if po2 else SignedBinaryWeightPerTensorConst), \
            lambda: qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst)
    elif bits == "w2a2":
        wq, act = dict(weight_quant=SignedTernaryWeightPerTensorConst), \
            lambda: qnn.QuantIdentity(act_quant=SignedTernaryActPerTensorConst)
    else:
        b = int(bits[1])
        wq = dict(weight_quant=w_per_channel if per_channel else w_per_tensor, weight_bit_width=b)
        act = lambda: qnn.QuantReLU(act_quant=a_unsigned, bit_width=b)  # noqa: E731
    bn = (lambda n: nn.Identity()) if po2 else (lambda n: nn.BatchNorm1d(n) if n == 32  # noqa
                                                else nn.BatchNorm2d(n))
    model = nn.Sequential(
        qnn.QuantIdentity(act_quant=a_signed, return_quant_tensor=False),
        qnn.QuantConv2d(3, 8, 3, padding=1, bias=False, **wq), bn(8), act(),
        nn.MaxPool2d(2),
        qnn.QuantConv2d(8, 16, 3, bias=False, **wq), bn(16), act(),
        nn.Flatten(),
        qnn.QuantLinear(16 * 2 * 2, 32, bias=False, **wq), bn(32), act(),
        qnn.QuantLinear(32, 10, bias=True, weight_quant=w_per_channel if per_channel
                        else w_per_tensor), nn.BatchNorm1d(10))
    with torch.no_grad():  # channels of different magnitudes: per-channel scales that differ
        for layer in model:
            if isinstance(layer, (qnn.QuantConv2d, qnn.QuantLinear)):
                n = layer.weight.shape[0]
                layer.weight.mul_((2.0 ** (torch.arange(n) % 4 - 2)).view(-1, *[1] * (
                    layer.weight.dim() - 1)))
    model.train()
    with torch.no_grad():  # activation statistics and BN running stats, as training would
        for _ in range(4):
            model(torch.rand(32, 3, 8, 8))
    return model.eval()


def fixed_batch(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


CASES = [("w1a1", False), ("w2a2", False), ("w4a4", False), ("w4a4", True), ("w8a8", False),
         ("w8a8", True)]


def qcdq_hazard(report) -> bool:
    """Whether onnxruntime's own fused kernels for the QCDQ file are wrong on this machine."""
    return not all(r["exact"] for r in report["qcdq_probe"])


@pytest.mark.slow
@pytest.mark.parametrize("quantisers", ["stock", "ana"])
@pytest.mark.parametrize("bits,per_channel", CASES)
def test_all_formats_match_pytorch(bits, per_channel, quantisers, tmp_path):
    model = tiny_qnn(bits, per_channel)
    if quantisers == "ana":
        model = brevitas_ana.to_ana(model, config=brevitas_ana.AnaConfig(noise="uniform"))
        # 4 weight quantisers, the input quantiser and 3 activation quantisers
        assert len(list(brevitas_ana.ana_quantizers(model))) == 8
    images, labels = fixed_batch()
    report = export_qnn(model, images, tmp_path, labels=labels, batch_size=20)
    with torch.no_grad():
        expected_top1 = 100.0 * (model(images).argmax(1) == labels).float().mean().item()
    for fmt in ("qonnx", "qcdq", "int", "int_only"):
        row = report["formats"][fmt]
        assert row["top1_torch"] == pytest.approx(expected_top1)
        loaded = onnx.load(row["file"])  # one self-contained file
        onnx.checker.check_model(loaded)
        assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob(".*.tmp*"))
        if fmt == "qcdq" and qcdq_hazard(report):
            continue  # onnxruntime's fused u8/s8 kernels saturate here: checked below
        assert row["passed"] and row["argmax_agreement"] == 100.0
        assert row["max_diff_quanta"] <= 1.0
    # the QONNX file is FINN-ready: static shapes with batch 1, and it runs as it stands
    qonnx_file = onnx.load(tmp_path / "model_qonnx.onnx")
    assert graphs.finn_problems(qonnx_file) == [] and report["finn_ready"]["ready"]
    assert [d.dim_value for d in qonnx_file.graph.input[0].type.tensor_type.shape.dim] == \
        [1, 3, 8, 8]
    alone = runtime.run_qonnx(qonnx_file, images[:1].numpy(), 1, fixed=True)
    with torch.no_grad():
        np.testing.assert_allclose(alone, model(images[:1]).numpy(), rtol=0, atol=1e-5)
    # the integer-only graph: integers from the input quantiser to the last layer
    assert report["int_only"]["float_tensors_between_layers"] == []
    assert int_only.float_tensors_between(onnx.load(tmp_path / "model_int_only.onnx")) == []
    # reference.npz: the images and PyTorch's logits, for finn_check.py
    ref = np.load(tmp_path / "reference.npz")
    with torch.no_grad():
        np.testing.assert_array_equal(ref["logits"], model(images).numpy())
    np.testing.assert_array_equal(ref["images"], images.numpy())
    np.testing.assert_array_equal(ref["labels"], labels.numpy())
    assert ref["quantum"].tolist() == report["output_quantum"]
    qonnx_ops = {n.op_type for n in onnx.load(tmp_path / "model_qonnx.onnx").graph.node}
    assert ("BipolarQuant" in qonnx_ops) == (bits == "w1a1") and "Quant" in qonnx_ops
    assert onnx.load(tmp_path / "model_qonnx.onnx").opset_import[0].version == 13
    qcdq_ops = {n.op_type for n in onnx.load(tmp_path / "model_qcdq.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= qcdq_ops and "Quant" not in qcdq_ops
    # every quantised Conv / Linear runs as an integer kernel in onnxruntime's executed graph
    quantised = [m for m in model.modules() if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear))]
    layers = report["integer_layers"]
    assert len(layers) == len(quantised) == len(report["qcdq_layers"])
    assert all(r["integer"] and r["kernel"] in ("ConvInteger", "MatMulInteger") for r in layers)
    # the kernels get uint8 operands; signed ranges are shifted, the real ranges are kept
    assert all(r["x_dtype"] == r["w_dtype"] == "uint8" for r in layers)
    assert layers[0]["x_range"] == [-128, 127]  # the 8-bit signed input quantiser
    act_range = {"w1a1": [-1, 1], "w2a2": [-1, 1], "w4a4": [0, 15], "w8a8": [0, 255]}[bits]
    assert all(r["x_range"] == act_range for r in layers[1:])
    assert all(-127 <= r["w_range"][0] <= r["w_range"][1] <= 127 for r in layers)
    assert all(r["exact"] for r in report["saturation_probe"])
    # the QCDQ file passes, or onnxruntime's own fusion is wrong here and the report says which
    saved = json.loads((tmp_path / "report.json").read_text())
    if qcdq_hazard(report):
        assert bits == "w8a8" and not saved["passed"]
        assert any(f.startswith("qcdq: onnxruntime fuses") and "model_int.onnx" in f
                   for f in saved["failures"])
    else:
        assert saved["passed"], saved["failures"]


@pytest.mark.parametrize("bits", ["w4a4", "w8a8"])
def test_learned_float_scales_with_batchnorm(bits, tmp_path):
    """The common case: float scales, BN before each quantiser. Here two float computations of a
    value on a rounding boundary may pick neighbouring levels, so the check is that such
    disagreements stay rare and never change the class on this batch."""
    model = brevitas_ana.to_ana(tiny_qnn(bits, per_channel=True, po2=False))
    images, labels = fixed_batch(96)
    report = export_qnn(model, images, tmp_path, labels=labels)
    for fmt in ("qonnx", "qcdq", "int", "int_only"):
        row = report["formats"][fmt]
        assert row["argmax_agreement"] == 100.0
        assert row["frac_differ"] <= 0.02
    assert all(r["integer"] for r in report["integer_layers"])
    assert all(r["exact"] for r in report["saturation_probe"])
    # onnxruntime runs the QCDQ graph's BN-separated convolutions in float; a per-channel MatMul
    # it may turn into MatMulNBits, whose default input quantisation the report points out
    kernels = {r["layer"]: r["kernel"] for r in report["qcdq_layers"]}
    assert kernels["Conv_0"] == kernels["Conv_1"] == "Conv"
    nbits = kernels["MatMul_0"] == "MatMulNBits"
    assert nbits == any("accuracy_level" in n for n in report["notes"])


def test_finn_problems_name_what_finn_would_trip_on():
    """A symbolic batch (what gave FINN's hardware layers zero input vectors), an initializer
    listed as a graph input, a QONNX op outside its domain: each is named."""
    model = tiny_qnn("w2a2", per_channel=False)
    images, _ = fixed_batch(2)
    dynamic = graphs.qonnx_from_torch(model, images, dynamic_batch=True)
    problems = graphs.finn_problems(dynamic)
    assert any("not static" in p for p in problems) and any("batch" in p for p in problems)
    static = graphs.qonnx_from_torch(model, images)
    assert graphs.finn_problems(static) == []
    broken = onnx.ModelProto.FromString(static.SerializeToString())
    init = broken.graph.initializer[0]
    broken.graph.input.append(onnx.helper.make_tensor_value_info(
        init.name, init.data_type, list(init.dims)))
    quant = next(n for n in broken.graph.node if n.op_type == "Quant")
    quant.domain = "finn.custom_op.general"
    problems = graphs.finn_problems(broken)
    assert "initializers listed as graph inputs" in problems
    assert any(p.startswith(f"{quant.name}: Quant in domain 'finn.custom_op.general'")
               for p in problems)
    assert any("2 inputs" in p for p in problems)


def test_integer_graph_is_exact_on_the_integers():
    """The integer graph's pre-BN layer outputs equal (s_x s_w) * sum(x_q w_q), computed here from
    the PyTorch model's own integer tensors."""
    model = tiny_qnn("w4a4", per_channel=True)
    images, _ = fixed_batch(8)
    qcdq = graphs.qonnx_to_qcdq(graphs.qonnx_from_torch(model, images, dynamic_batch=True))
    integer, layers = graphs.qcdq_to_integer(qcdq)
    first = layers[0]
    integer.graph.output.insert(0, onnx.helper.make_tensor_value_info(
        first.output, onnx.TensorProto.FLOAT, None))
    got = runtime.session(integer).run([first.output], {
        integer.graph.input[0].name: images.numpy()})[0]
    x_q = model[0].act_quant(images)  # QuantTensors: integer values and scales
    w_q = model[1].quant_weight()
    acc = torch.nn.functional.conv2d(x_q.int().double(), w_q.int().double(), padding=1)
    expected = acc * (x_q.scale * w_q.scale.view(1, -1, 1, 1)).double()
    np.testing.assert_allclose(got, expected.detach().float().numpy(), rtol=1e-6, atol=1e-6)


def test_qcdq_matches_brevitas_own_qcdq_export(tmp_path):
    """Independent check of the QONNX -> QCDQ rewrite: stock Brevitas' QCDQ export (which
    refuses binary, so W4A4 per-channel here) computes the same outputs in onnxruntime."""
    model = tiny_qnn("w4a4", per_channel=True)
    images, _ = fixed_batch()
    export_onnx_qcdq(model, args=images[:1], export_path=str(tmp_path / "brevitas.onnx"),
                     dynamo=False, opset_version=13)
    theirs = ort.InferenceSession(str(tmp_path / "brevitas.onnx"),
                                  providers=["CPUExecutionProvider"])
    ours = graphs.qonnx_to_qcdq(graphs.qonnx_from_torch(model, images, dynamic_batch=True))
    quantum = graphs.output_quantum(ours, graphs.qcdq_to_integer(ours)[1])
    a = np.concatenate([theirs.run(None, {theirs.get_inputs()[0].name: images[i:i + 1].numpy()})[0]
                        for i in range(len(images))])
    b = runtime.run_onnxruntime(ours, images.numpy(), 16)
    assert np.abs(a - b).max() / quantum.min() < 1e-3


def test_output_quantum_closed_form():
    """Last layer QuantLinear -> BatchNorm1d: one step is s_x * s_w * |gamma| / sqrt(var + eps)."""
    model = tiny_qnn("w4a4", per_channel=True)
    images, _ = fixed_batch(4)
    qcdq = graphs.qonnx_to_qcdq(graphs.qonnx_from_torch(model, images, dynamic_batch=True))
    quantum = graphs.output_quantum(qcdq, graphs.qcdq_to_integer(qcdq)[1])
    act, linear, bn = model[11], model[12], model[13]
    s_x = act.act_quant(torch.zeros(1, 32)).scale
    s_w = linear.quant_weight().scale.view(-1)
    expected = (s_x * s_w * bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).detach()
    np.testing.assert_allclose(quantum, expected.detach().numpy(), rtol=1e-5)


def test_saturation_probe_finds_what_a_direct_run_finds():
    """u8 activations 255 times int8 weights 127, 64 terms: the probe's verdict must equal a direct
    MatMulInteger run compared with numpy (wrong on x86 CPUs without VNNI, exact elsewhere).
    The same product with both operands uint8 (weights + 128, zero point 128) must be exact."""
    x = np.full((1, 64), 255, np.uint8)
    w = np.full((64, 2), 127, np.int8)
    node = onnx.helper.make_node("MatMulInteger", ["x", "w"], ["y"])
    g = onnx.helper.make_graph([node], "direct", [
        onnx.helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 2])],
        [onnx.numpy_helper.from_array(w, "w")])
    direct = runtime.session(onnx.helper.make_model(
        g, opset_imports=[onnx.helper.make_opsetid("", 13)])).run(None, {"x": x})[0]
    hazard = not np.array_equal(direct, x.astype(np.int64) @ w.astype(np.int64))
    signed = Layer("fc", "MatMul", "y", integer=True, kernel="MatMulInteger", x_dtype="uint8",
                   w_dtype="int8", x_range=[0, 255], w_range=[-127, 127])
    (row,) = runtime.saturation_probe([signed])
    assert row["exact"] == (not hazard)
    for kernel in ("MatMulInteger", "ConvInteger"):
        unsigned = Layer("fc", "MatMul", "y", integer=True, kernel=kernel, x_dtype="uint8",
                         w_dtype="uint8", w_zero_point=128, x_range=[0, 255],
                         w_range=[-127, 127])
        assert runtime.saturation_probe([unsigned])[0]["exact"]


def test_signed_kernels_hazard_is_reported_not_silent(tmp_path):
    """With the quantisers' own operand types (int8 weights), W8A8 runs onnxruntime's u8 x s8
    kernels: on a CPU where they saturate, the report must fail and say so; where they do not,
    it must pass."""
    model = tiny_qnn("w8a8", per_channel=False)
    images, labels = fixed_batch()
    report = export_qnn(model, images, tmp_path, labels=labels, formats=["int"],
                        unsigned_operands=False)
    assert all(r["w_dtype"] == "int8" for r in report["integer_layers"])
    wrong = [r for r in report["saturation_probe"] if not r["exact"]]
    if wrong:
        assert not report["passed"]
        assert any("saturation" in f and "without VNNI" in f for f in report["failures"])
    else:
        assert report["passed"]


def test_never_trained_model_is_refused(tmp_path):
    model = nn.Sequential(qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat),
                          qnn.QuantLinear(4, 2, bias=False))
    with pytest.raises(ExportError, match="never trained"):
        export_qnn(model.eval(), torch.rand(4, 4), tmp_path / "out")
    assert not (tmp_path / "out" / "model_qonnx.onnx").exists()


def test_unwritable_output_dir_and_unknown_format(tmp_path):
    model = tiny_qnn("w2a2", False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # a Python call: the message names the argument, not the command's flag
    with pytest.raises(ExportError, match=f"^output_dir: {blocker} is a file, so "
                                          f"{blocker / 'sub'} cannot be created"):
        export_qnn(model, torch.rand(2, 3, 8, 8), blocker / "sub")
    with pytest.raises(ExportError, match=f"^output_dir: {blocker} is a file, not a folder"):
        export_qnn(model, torch.rand(2, 3, 8, 8), blocker)
    with pytest.raises(ExportError, match="unknown"):
        export_qnn(model, torch.rand(2, 3, 8, 8), tmp_path, formats=["tflite"])


@pytest.mark.parametrize("images,labels,match", [
    (torch.rand(6, 3, 8, 8), torch.arange(5), r"^labels: expected one label per image, shape "
                                              r"\(6,\), got shape \(5,\)"),
    (torch.rand(6, 3, 8, 8), torch.zeros(6, 2), r"^labels: .* got shape \(6, 2\)"),
    (torch.rand(6, 3, 8, 12), None, r"^images: the model does not take images of shape "
                                   r"\[3, 8, 12\]"),
    (torch.rand(0, 3, 8, 8), None, r"^images: expected a non-empty batch"),
])
def test_bad_images_or_labels_are_named_and_nothing_is_written(images, labels, match, tmp_path):
    with pytest.raises(ExportError, match=match) as error:
        export_qnn(tiny_qnn("w2a2", False), images, tmp_path / "out", labels=labels)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    def half_written(model, path, **kwargs):
        Path(path).write_bytes(b"\x08\x01partial")
        raise OSError("disk full")
    monkeypatch.setattr(onnx, "save_model", half_written)
    with pytest.raises(OSError, match="disk full"):
        export_qnn(tiny_qnn("w2a2", False), torch.rand(4, 3, 8, 8), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_tolerance_is_applied():
    row = {"argmax_agreement": 99.5, "max_diff_quanta": 0.0}
    assert not Tolerance().passes(row) and Tolerance(min_agreement=99.0).passes(row)
    row = {"argmax_agreement": 100.0, "max_diff_quanta": 1.5}
    assert not Tolerance().passes(row) and Tolerance(max_quanta=2.0).passes(row)


# --- the command line, on a recipe run -------------------------------------------------------

def cli(args, check=True):
    proc = subprocess.run([sys.executable, str(SCRIPT)] + [str(a) for a in args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"export failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from conftest import write_tiny_cifar
    root = tmp_path_factory.mktemp("run")
    data = write_tiny_cifar(root / "data")
    run = root / "cnv_w2a2"
    subprocess.run([sys.executable, str(ROOT / "recipes" / "train_cifar10.py"), "--data-dir",
                    str(data), "--epochs", "1", "--max-steps", "3", "--batch-size", "16",
                    "--num-workers", "0", "--no-export", "--output-dir", str(run)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    return run, data


@pytest.mark.slow
def test_cli_exports_and_validates_a_recipe_run(trained_run, tmp_path):
    run, data = trained_run
    proc = cli(["--checkpoint", run, "--output-dir", tmp_path / "out", "--data-dir", data])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and report["num_images"] == 40
    assert "CIFAR-10 test set" in report["input"] and "[0, 1]" in report["input"]
    for fmt in ("qonnx", "qcdq", "int", "int_only"):
        assert report["formats"][fmt]["argmax_agreement"] == 100.0
        assert f"model_{fmt}.onnx" in proc.stdout
    assert "qonnx: FINN-ready" in proc.stdout and report["finn_ready"]["ready"]
    assert "float tensors between layers: none" in proc.stdout
    assert "PASSED" in proc.stdout and "ConvInteger" in proc.stdout
    # the checkpoint directory alone (with the run's config two levels up) works too
    ckpt = next((run / "checkpoints").iterdir())
    from brevitas_ana.recipes import export_run  # the same command, in-process
    export_run.main([str(a) for a in ["--checkpoint", ckpt, "--output-dir", tmp_path / "out2",
                                       "--data-dir", data, "--num-images", "8", "--formats",
                                       "int"]])
    assert json.loads((tmp_path / "out2" / "report.json").read_text())["num_images"] == 8
    # a batch of one's own instead of CIFAR-10
    images, labels = torch.rand(6, 3, 32, 32), torch.arange(6)
    torch.save({"images": images, "labels": labels}, tmp_path / "b.pt")
    export_run.main([str(a) for a in ["--checkpoint", run, "--output-dir", tmp_path / "out3",
                                       "--inputs", tmp_path / "b.pt", "--formats", "qcdq"]])
    report = json.loads((tmp_path / "out3" / "report.json").read_text())
    assert report["num_images"] == 6 and "b.pt" in report["input"]
    # the report's accuracy is the trained model's own on that batch, against those labels
    from brevitas_ana.recipes.checkpoint import load_trained
    model, _, _ = load_trained(run)
    with torch.no_grad():
        hits = (model(images).argmax(1) == labels).sum().item()
    assert report["formats"]["qcdq"]["top1_torch"] == pytest.approx(100.0 * hits / 6)


@pytest.mark.slow
def test_cli_exits_non_zero_beyond_tolerance(trained_run, tmp_path):
    run, data = trained_run
    proc = cli(["--checkpoint", run, "--output-dir", tmp_path, "--data-dir", data,
                "--formats", "qcdq", "--min-agreement", "100.5"], check=False)
    assert proc.returncode == 1 and "FAILED: qcdq: argmax agreement 100.00%" in proc.stdout


def test_console_script_is_installed():
    proc = subprocess.run(["brevitas-ana-export", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout


@pytest.mark.parametrize("case", ["missing", "corrupt", "never_trained", "other_config",
                                  "wrong_shapes", "no_data", "unwritable"])
@pytest.mark.slow
def test_cli_bad_input_is_a_clear_error(case, trained_run, tmp_path):
    run, data = trained_run
    out = tmp_path / "out"
    args = ["--checkpoint", run, "--output-dir", out, "--data-dir", data]
    if case == "missing":
        args[1], expected = tmp_path / "nope", "does not exist"
    elif case == "corrupt":
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "config.json").write_bytes((run / "config.json").read_bytes())
        good = (run / "model.pt").read_bytes()  # a byte run overwritten: a corrupt pickle
        (bad / "model.pt").write_bytes(good[:200] + b"x" * 60 + good[260:])
        args[1], expected = bad, "not a readable checkpoint (corrupt or truncated?)"
    elif case == "never_trained":
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "config.json").write_bytes((run / "config.json").read_bytes())
        args[1], expected = empty, "was never trained"
    elif case == "other_config":
        args += ["--config", ROOT / "recipes" / "configs" / "cnv_w1a1.yaml"]
        expected = "does not describe the trained network: weight_bit_width: 1"
    elif case == "wrong_shapes":
        other = tmp_path / "other"
        other.mkdir()
        spec = json.loads((run / "model_spec.json").read_text())
        (other / "model_spec.json").write_text(json.dumps({"name": "vgg8", "kwargs": {
            "quantiser": spec["kwargs"]["quantiser"]}}))
        (other / "model.pt").write_bytes((run / "model.pt").read_bytes())
        args[1], expected = other, "does not fit a vgg8"
    elif case == "no_data":
        args[-1], expected = tmp_path / "nodata", "CIFAR-10 not found"
    else:
        (tmp_path / "file").write_text("x")
        args[3], expected = tmp_path / "file" / "out", "--output-dir: " + \
            f"{tmp_path / 'file'} is a file, so {tmp_path / 'file' / 'out'} cannot be created"
    # in-process: the command's main() ends in SystemExit with the one-line message
    from brevitas_ana.recipes import export_run
    with pytest.raises(SystemExit) as exit_:
        export_run.main([str(a) for a in args])
    assert str(exit_.value.code).startswith("error: ") and expected in str(exit_.value.code)
    assert "\n" not in str(exit_.value.code)
    # never the advice to load an unknown file unsafely
    assert "weights_only" not in str(exit_.value.code)
    assert not list(tmp_path.rglob("*.onnx"))


def test_help_shows_each_option_with_its_meaning_and_default(capsys):
    from brevitas_ana.recipes import export_run
    with pytest.raises(SystemExit):
        export_run.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--checkpoint", "--output-dir", "--config", "--data-dir", "--inputs",
                   "--num-images", "--batch-size", "--formats", "--min-agreement",
                   "--max-quanta"):
        assert option in text
    assert "(default: 100)" in text and "(default: 100.0)" in text and "(default: 1.0)" in text
    assert "(default: all)" in text and "(default: None)" not in text


class Attention(nn.Module):
    """A quantised projection followed by PyTorch's fused attention (as timm's ViT blocks)."""

    def __init__(self):
        super().__init__()
        self.inp = qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat)
        self.qkv = qnn.QuantLinear(8, 24, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(self.inp(x)).view(x.shape[0], 1, 4, 24).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).flatten(1)


def test_an_operator_the_exporter_cannot_handle_is_one_line_naming_it(tmp_path):
    model = Attention().train()
    with torch.no_grad():
        model(torch.randn(4, 4, 8))
    with pytest.raises(ExportError) as error:
        export_qnn(model.eval(), torch.randn(2, 4, 8), tmp_path / "out")
    message = str(error.value)
    assert "aten::scaled_dot_product_attention" in message and "fused_attn=False" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()  # no empty output folder left behind


# --- the float twin -----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", ["w1a1", "w4a4"])
def test_float_twin_exports_its_float_onnx_and_export_qnn_refuses_it(bits, tmp_path):
    """export_float's ONNX runs in onnxruntime to the float twin's own logits (hardtanh /
    clamped activations, float weights), computed here by PyTorch; export_qnn refuses a float
    twin, naming export_float, and writes nothing."""
    from brevitas_ana.export import export_float
    model = brevitas_ana.to_ana(tiny_qnn(bits, False, po2=False))
    images = torch.rand(12, 3, 8, 8)
    labels = torch.randint(0, 10, (12,))
    model.train()(images)  # scales from data
    brevitas_ana.set_float(model)
    report = export_float(model.eval(), images, tmp_path / "out", labels=labels)
    row = report["formats"]["float"]
    assert report["passed"] and row["argmax_agreement"] == 100.0
    sess = ort.InferenceSession(str(tmp_path / "out" / "model_float.onnx"))
    logits = sess.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        expected = model(images).numpy()
    assert np.abs(logits - expected).max() == pytest.approx(row["max_abs_diff"], abs=1e-6)
    assert row["max_abs_diff"] <= 1e-4 * max(1.0, float(np.abs(expected).max()))
    # the float twin computes something else than the QNN (values between the levels)
    brevitas_ana.set_float(model, False)
    with torch.no_grad():
        assert not np.allclose(model(images).numpy(), expected)
    brevitas_ana.set_float(model)
    with pytest.raises(ExportError, match="float twin.*export_float"):
        export_qnn(model, images, tmp_path / "qnn")
    assert not (tmp_path / "qnn").exists()
