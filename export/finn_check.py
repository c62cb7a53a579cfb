"""FINN's own front end, stage by stage, on an exported QONNX file: the check that an FPGA flow
takes the file as it stands.

    python export/finn_check.py runs/cnv_w2a2/export            # model_qonnx.onnx + reference.npz
    python export/finn_check.py --qonnx m.onnx --reference r.npz --num-images 20 --keep out/

FINN (``finn-plus`` on PyPI) pins its own brevitas, onnx, onnxruntime and torch, so it runs in a
virtual environment of its own, created on first use (``--venv``, default
``~/.cache/brevitas-ana/finn-venv`` or ``$BREVITAS_ANA_FINN_VENV``; about 6 GB, a few minutes)
and never mixed into the project's. This file is both sides: under the project's Python it
prepares the environment and prints the table; under the FINN environment's Python
(``--inside``, importing nothing of this project) it runs the flow.

The stages are those of FINN's CNV end-to-end flow (``tests/end2end`` and the builder's
``step_qonnx_to_finn`` ... ``step_convert_to_hw``):

    qonnx            the file as it stands, in FINN's executor
    qonnx_to_finn    qonnx cleanup + ConvertQONNXtoFINN (Quant -> MultiThreshold)
    tidy             InferShapes, FoldConstants, unique names, InferDataTypes, static inputs
    uint8_input      FINN's CNV pre-processing: uint8 pixels, x / 255 merged in front (UINT8)
    streamline       AbsorbSignBiasIntoMultiThreshold, MoveScalarLinearPastInvariants, Streamline
    lower_convs      LowerConvsToMatMul, MakeMaxPoolNHWC, AbsorbTransposeIntoMultiThreshold,
                     AbsorbConsecutiveTransposes (layout fixes)
    xnor             ConvertBipolarMatMulToXnorPopcount (binary networks), Streamline
    round_thresholds RoundAndClipThresholds
    to_hw            InferBinary/QuantizedMatrixVectorActivation, InferThresholdingLayer,
                     InferConvInpGen, InferPool, RemoveCNVtoFCFlatten, AbsorbConsecutiveTransposes

After each stage the graph runs in FINN's executor (``finn.core.onnx_exec.execute_onnx``, one
image at a time as FINN feeds it) on the reference images and is compared with the PyTorch
logits stored beside them: top-1 agreement and the largest logit difference in output quanta.
The check fails, naming the stage, when a stage raises, disagrees (agreement < 100 % or more
than ``--max-quanta``), or when a hardware layer has a degenerate shape attribute (a
``numInputVectors``, ``MW``, ``MH``, channel or image dimension <= 0) or a quantised layer did
not become a hardware layer.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

FINN_REQUIREMENTS = ["finn-plus==1.6.1", "psutil"]  # finn-plus imports psutil undeclared
DEFAULT_VENV = Path(os.environ.get("BREVITAS_ANA_FINN_VENV",
                                   Path.home() / ".cache" / "brevitas-ana" / "finn-venv"))
STAGES = ("qonnx", "qonnx_to_finn", "tidy", "uint8_input", "streamline", "lower_convs", "xnor",
          "round_thresholds", "to_hw")
# shape attributes of FINN's hardware layers that must be positive
SHAPE_ATTRS = ("numInputVectors", "MW", "MH", "NumChannels", "IFMChannels", "IFMDim", "OFMDim",
               "ConvKernelDim", "ImgDim", "PoolDim", "KernelSize", "Labels", "Channels")


class FinnCheckError(RuntimeError):
    """The FINN environment could not be prepared or the check could not start."""


# --- project side -----------------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def finn_importable(venv: Path) -> bool:
    py = venv_python(venv)
    return py.exists() and subprocess.run([str(py), "-c", "import finn, qonnx"],
                                          capture_output=True).returncode == 0


def ensure_venv(venv: Path = DEFAULT_VENV, quiet: bool = False) -> Path:
    """The FINN environment's Python, creating the environment on first use."""
    venv = Path(venv)
    if finn_importable(venv):
        return venv_python(venv)
    print(f"creating FINN's environment in {venv} ({' '.join(FINN_REQUIREMENTS)}; about 6 GB, "
          f"a few minutes, once)", flush=True)
    try:
        if not venv_python(venv).exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv_python(venv)), "-m", "pip", "install"]
                       + (["-q"] if quiet else []) + FINN_REQUIREMENTS, check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        raise FinnCheckError(f"--venv: could not install {FINN_REQUIREMENTS} into {venv}: {e}; "
                             f"remove the folder and try again") from None
    if not finn_importable(venv):
        raise FinnCheckError(f"--venv: {venv} has finn-plus installed but `import finn` fails")
    return venv_python(venv)


def run_check(qonnx: Path, reference: Path, venv: Path = DEFAULT_VENV, num_images: int = 20,
              max_quanta: float = 1.0, keep: Path = None, quiet: bool = False) -> dict:
    """Run FINN's flow on ``qonnx`` in the FINN environment; returns its report (also written
    to ``keep/finn_report.json`` when ``keep`` is given)."""
    for flag, path in (("--qonnx", qonnx), ("--reference", reference)):
        if not Path(path).is_file():
            raise FinnCheckError(f"{flag}: {path} does not exist")
    python = ensure_venv(venv, quiet)
    report_path = Path(keep or Path(qonnx).parent) / "finn_report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.unlink(missing_ok=True)
    cmd = [str(python), str(Path(__file__).resolve()), "--inside", "--qonnx", str(qonnx),
           "--reference", str(reference), "--num-images", str(num_images),
           "--max-quanta", str(max_quanta), "--report", str(report_path)]
    if keep:
        cmd += ["--keep", str(keep)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("FINN_BUILD_DIR", str(Path(keep or report_path.parent) / "finn_build"))
    proc = subprocess.run(cmd, env=env, capture_output=quiet, text=True)
    if not report_path.exists():
        tail = (proc.stderr or "")[-2000:] if quiet else ""
        raise FinnCheckError(f"FINN's flow ended without a report (exit {proc.returncode}) {tail}")
    return json.loads(report_path.read_text())


def table(report: dict) -> str:
    lines = [f"FINN {report.get('finn_version', '?')} on {report['qonnx']}, "
             f"{report['num_images']} test images",
             f"{'stage':<17} {'nodes':>5} {'top-1 agree %':>13} {'max diff (quanta)':>17}  result"]
    for s in report["stages"]:
        agree = "-" if s.get("agreement") is None else f"{s['agreement']:.2f}"
        diff = "-" if s.get("max_diff_quanta") is None else f"{s['max_diff_quanta']:.3g}"
        lines.append(f"{s['stage']:<17} {s.get('nodes', '-'):>5} {agree:>13} {diff:>17}  "
                     f"{'pass' if s['passed'] else 'FAIL: ' + s.get('error', '')}")
    if report.get("hw_layers"):
        lines.append("hardware layers: " + ", ".join(f"{k} x{v}" for k, v in
                                                     sorted(report["hw_layers"].items())))
    lines.append("PASSED" if report["passed"] else f"FAILED at {report['failed_stage']}")
    return "\n".join(lines)


# --- FINN side (runs under the FINN environment's Python) ---------------------------------------

def _uint8_preprocessing(model):
    """FINN's CNV pre-processing: uint8 pixels in, x / 255 (torchvision's ToTensor) merged in
    front of the network, input annotated UINT8."""
    from onnx import TensorProto, helper
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.transformation.merge_onnx_models import MergeONNXModels

    shape = model.get_tensor_shape(model.graph.input[0].name)
    graph = helper.make_graph(
        [helper.make_node("Div", ["pixels", "c255"], ["scaled"])], "to_tensor",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("scaled", TensorProto.FLOAT, shape)],
        [helper.make_tensor("c255", TensorProto.FLOAT, [], [255.0])])
    pre = ModelWrapper(helper.make_model(graph, opset_imports=[helper.make_opsetid(
        "", model.model.opset_import[0].version)]))
    pre = pre.transform(InferShapes()).transform(FoldConstants())
    model = model.transform(MergeONNXModels(pre))
    model.set_tensor_datatype(model.graph.input[0].name, DataType["UINT8"])
    return model


def _stage(name, model):
    from finn.transformation.move_reshape import RemoveCNVtoFCFlatten
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN
    from finn.transformation.streamline import Streamline
    from finn.transformation.streamline import absorb
    from finn.transformation.streamline.reorder import (MakeMaxPoolNHWC,
                                                        MoveScalarLinearPastInvariants)
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds
    from qonnx.transformation.bipolar_to_xnor import ConvertBipolarMatMulToXnorPopcount
    from qonnx.transformation.fold_constants import FoldConstants
    from qonnx.transformation.general import (GiveReadableTensorNames, GiveUniqueNodeNames,
                                              RemoveStaticGraphInputs, RemoveUnusedTensors)
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul
    from qonnx.util.cleanup import cleanup_model
    from finn.transformation.fpgadataflow.convert_to_hw.binary_matrix_vector_activation import \
        InferBinaryMatrixVectorActivation
    from finn.transformation.fpgadataflow.convert_to_hw.conv_inp_gen import InferConvInpGen
    from finn.transformation.fpgadataflow.convert_to_hw.pool import InferPool
    from finn.transformation.fpgadataflow.convert_to_hw.quantized_matrix_vector_activation \
        import InferQuantizedMatrixVectorActivation
    from finn.transformation.fpgadataflow.convert_to_hw.thresholding import \
        InferThresholdingLayer

    steps = {
        "qonnx": [],
        "qonnx_to_finn": [cleanup_model, ConvertQONNXtoFINN()],
        "tidy": [InferShapes(), FoldConstants(), GiveUniqueNodeNames(), GiveReadableTensorNames(),
                 InferDataTypes(), RemoveStaticGraphInputs()],
        "uint8_input": [_uint8_preprocessing, InferShapes(), FoldConstants(),
                        GiveUniqueNodeNames(), GiveReadableTensorNames(), InferDataTypes(),
                        RemoveStaticGraphInputs()],
        "streamline": [absorb.AbsorbSignBiasIntoMultiThreshold(),
                       MoveScalarLinearPastInvariants(), Streamline()],
        "lower_convs": [LowerConvsToMatMul(), MakeMaxPoolNHWC(),
                        absorb.AbsorbTransposeIntoMultiThreshold(), MakeMaxPoolNHWC(),
                        absorb.AbsorbConsecutiveTransposes()],
        "xnor": [ConvertBipolarMatMulToXnorPopcount(), Streamline(), InferDataLayouts(),
                 RemoveUnusedTensors()],
        "round_thresholds": [RoundAndClipThresholds()],
        "to_hw": [InferBinaryMatrixVectorActivation(), InferQuantizedMatrixVectorActivation(),
                  InferThresholdingLayer(), InferConvInpGen(), InferPool(),
                  RemoveCNVtoFCFlatten(), absorb.AbsorbConsecutiveTransposes(),
                  GiveUniqueNodeNames(), InferDataLayouts()],
    }[name]
    for step in steps:
        model = step(model) if callable(step) and not hasattr(step, "apply") else \
            model.transform(step)
    return model


def _execute(model, images: np.ndarray) -> np.ndarray:
    from finn.core.onnx_exec import execute_onnx
    name, out = model.graph.input[0].name, model.graph.output[0].name
    shape = model.get_tensor_shape(name)
    rows = []
    for img in images:
        rows.append(np.asarray(execute_onnx(model, {name: img.reshape(shape).astype(np.float32)})
                               [out]).reshape(-1))
    return np.stack(rows)


def _hw_problems(model, n_layers: int):
    """(hardware layer counts, problems): degenerate shape attributes, quantised layers that did
    not become hardware layers."""
    from qonnx.custom_op.registry import getCustomOp
    counts, problems = {}, []
    for node in model.graph.node:
        if "fpgadataflow" not in node.domain:
            continue
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        inst = getCustomOp(node)
        for attr in SHAPE_ATTRS:
            try:
                value = inst.get_nodeattr(attr)
            except (AttributeError, Exception):
                continue
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, (int, np.integer)) and v <= 0 for v in values):
                problems.append(f"{node.name} ({node.op_type}): {attr} = {values}")
    mvau = sum(v for k, v in counts.items() if k.startswith("MVAU")
               or k.startswith("MatrixVectorActivation"))
    if mvau != n_layers:
        problems.append(f"{mvau} matrix-vector hardware layers for {n_layers} quantised "
                        f"Conv/MatMul layers")
    left = sorted({n.op_type for n in model.graph.node if n.op_type in ("Conv", "MatMul",
                                                                          "MultiThreshold")})
    if left:
        problems.append(f"left in software: {', '.join(left)}")
    return counts, problems


def inside(args) -> int:
    """The flow, in the FINN environment; writes the report JSON, returns the exit code."""
    import warnings
    warnings.filterwarnings("ignore")
    from importlib.metadata import version
    from qonnx.core.modelwrapper import ModelWrapper

    ref = np.load(args.reference)
    n = min(args.num_images, len(ref["images"]))
    images, logits, quantum = ref["images"][:n], ref["logits"][:n], ref["quantum"]
    pixels = np.round(images * 255)
    report = {"qonnx": args.qonnx, "num_images": int(n), "finn_version": version("finn-plus"),
              "max_quanta": args.max_quanta, "stages": [], "passed": False,
              "failed_stage": None}
    base = ModelWrapper(args.qonnx)
    n_layers = sum(node.op_type in ("Conv", "MatMul", "Gemm") for node in base.graph.node)
    model = base
    for name in STAGES:
        row = {"stage": name, "passed": False}
        report["stages"].append(row)
        t0 = time.time()
        try:
            model = _stage(name, model)
            row["nodes"] = len(model.graph.node)
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                model.save(str(Path(args.keep) / f"{STAGES.index(name)}_{name}.onnx"))
            uint8 = model.get_tensor_datatype(model.graph.input[0].name).name == "UINT8"
            if uint8 and not np.array_equal(pixels / 255, images.astype(np.float64)) \
                    and not np.allclose(pixels / 255, images, atol=1e-7):
                raise ValueError("the reference images are not uint8 pixels / 255")
            out = _execute(model, pixels if uint8 else images)
            row["time_s"] = round(time.time() - t0, 2)
            if out.shape != logits.shape:
                raise ValueError(f"output shape {list(out.shape)} != PyTorch's "
                                 f"{list(logits.shape)}")
            row["agreement"] = float(100 * np.mean(out.argmax(1) == logits.argmax(1)))
            row["max_diff_quanta"] = float((np.abs(out - logits) / quantum).max())
            if row["agreement"] < 100.0 or row["max_diff_quanta"] > args.max_quanta:
                raise ValueError(f"disagrees with PyTorch: top-1 agreement "
                                 f"{row['agreement']:.2f}%, max difference "
                                 f"{row['max_diff_quanta']:.3g} quanta")
            if name == "to_hw":
                report["hw_layers"], problems = _hw_problems(model, n_layers)
                if problems:
                    raise ValueError("hardware layers: " + "; ".join(problems))
            row["passed"] = True
        except Exception as e:  # any failure of FINN's flow is the result, named by stage
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            row["traceback"] = traceback.format_exc()[-3000:]
            report["failed_stage"] = name
            break
    report["passed"] = report["failed_stage"] is None
    Path(args.report).write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


# --- command line -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="finn_check.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("export_dir", nargs="?", help="an export folder (model_qonnx.onnx and "
                                                  "reference.npz, as export_qnn writes them)")
    p.add_argument("--qonnx", help="QONNX file (default: EXPORT_DIR/model_qonnx.onnx)")
    p.add_argument("--reference", help=".npz with images (N x C x H x W, pixels / 255), logits "
                                       "(PyTorch) and quantum (default: EXPORT_DIR/reference.npz)")
    p.add_argument("--num-images", type=int, default=20,
                   help="reference images run through every stage")
    p.add_argument("--max-quanta", type=float, default=1.0,
                   help="largest logit difference allowed, in output quanta")
    p.add_argument("--venv", default=str(DEFAULT_VENV), help="FINN's virtual environment "
                   "(created on first use)")
    p.add_argument("--keep", help="folder for each stage's graph and finn_report.json")
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.export_dir:
        args.qonnx = args.qonnx or str(Path(args.export_dir) / "model_qonnx.onnx")
        args.reference = args.reference or str(Path(args.export_dir) / "reference.npz")
    if not (args.qonnx and args.reference):
        p.error("give an export folder, or --qonnx and --reference")
    if args.num_images <= 0:
        p.error("--num-images must be > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.inside:
        sys.exit(inside(args))
    try:
        report = run_check(Path(args.qonnx), Path(args.reference), Path(args.venv),
                           args.num_images, args.max_quanta, args.keep and Path(args.keep))
    except FinnCheckError as e:
        sys.exit(f"error: {e}")
    print(table(report))
    if not report["passed"]:
        failed = report["stages"][-1]
        print(failed.get("traceback", ""), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
