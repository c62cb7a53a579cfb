"""Export a QNN to QONNX, QCDQ ONNX, an integer and an integer-only ONNX graph, and validate
each against the PyTorch model::

    from brevitas_ana.export import export_qnn
    report = export_qnn(model, images, "out", labels=labels)

(The command that exports a recipe run, ``recipes/export_run.py`` / ``brevitas-ana-export``,
rebuilds the network and its test images on the recipes' side and calls this.)

Writes ``model_qonnx.onnx`` (FINN-ready: static shapes, batch 1), ``model_qcdq.onnx``,
``model_int.onnx``, ``model_int_only.onnx``, ``reference.npz`` (the first images with PyTorch's
logits and the output quantum: what ``export/finn_check.py`` compares FINN's flow with) and
``report.json`` (each complete or absent: written to a temporary name, then renamed). The
report fails when an export disagrees with PyTorch beyond the tolerance, the QONNX file is not
FINN-ready, a quantised layer does not run as an integer kernel, the integer-only graph cannot be
built or has a float tensor between layers, or onnxruntime's integer kernels are wrong on this
machine.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from brevitas_ana import ana_quantizers
from brevitas_ana.export import graphs, int_only, runtime
from brevitas_ana.export.graphs import ExportError
from brevitas_ana.export.validate import Tolerance, compare

FORMATS = ("qonnx", "qcdq", "int", "int_only")
REFERENCE_IMAGES = 100  # images kept in reference.npz
INPUT = "the images given to export_qnn"


def check_writable(output_dir, name: str = "output_dir", create: bool = True) -> Path:
    """``output_dir`` is a folder this process can write in, or can become one (its nearest
    existing parent takes files), checked with a temporary file removed at once; created when
    ``create`` (the training recipe creates nothing until its run is known to start).
    ExportError naming ``name`` (the argument or flag the caller was given) otherwise."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{name}: {out} is a file, not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"{name}: {parent} is a file, so {out} cannot be created")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
        if create:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"{name}: cannot write in {parent}: {e.strerror or e}") from None
    return out


def check_inputs(images, labels):
    """(images, labels) as numpy arrays once they are known to fit: ``images`` a non-empty batch,
    ``labels`` one per image. Checked before any file is written; whether the model takes the
    images shows when its reference outputs are computed, also before any file is written."""
    try:
        images = np.ascontiguousarray(torch.as_tensor(images).float().cpu().numpy())
    except (TypeError, ValueError, RuntimeError) as e:
        raise ExportError(f"images: not a numeric batch ({type(e).__name__}: {e})") from None
    if images.ndim < 2 or not len(images):
        raise ExportError(f"images: expected a non-empty batch, got shape {images.shape}")
    if labels is not None:
        labels = np.asarray(torch.as_tensor(labels).cpu())
        if labels.shape != (len(images),):
            raise ExportError(f"labels: expected one label per image, shape ({len(images)},), "
                              f"got shape {labels.shape}")
    return images, labels


def check_trained(model: torch.nn.Module):
    """Refuse a model whose activation scales were never estimated: Brevitas' runtime-statistics
    scales only exist after a training forward pass (or loading trained weights)."""
    from brevitas.core.scaling import ParameterFromRuntimeStatsScaling
    never = [name for name, m in model.named_modules()
             if isinstance(m, ParameterFromRuntimeStatsScaling) and int(m.counter) == 0]
    if never:
        raise ExportError(f"the model was never trained: {len(never)} activation scale(s) were "
                          f"never estimated from data (e.g. {never[0]}); train it or load trained "
                          f"weights first")


def check_quantised(model: torch.nn.Module):
    """Refuse a float twin (:func:`brevitas_ana.set_float`): its quantisers compute clamps, so
    the quantised graphs would not be the network the reference comes from."""
    relaxed = [name for name, m in ana_quantizers(model) if m.float_mode]
    if relaxed:
        raise ExportError(f"the model is a float twin: {len(relaxed)} quantiser(s) are relaxed "
                          f"to float (e.g. {relaxed[0]}); export_float writes its float ONNX, or "
                          f"brevitas_ana.set_float(model, False) quantises it again")


def atomic_write(path, write: Callable[[Path], None]):
    """``write(tmp)`` to a temporary name beside ``path`` (same suffix: numpy and onnx go by
    it), then rename: ``path`` is either the old file or the complete new one, whenever the
    process dies. Every file an export or a training run writes goes through here."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save(model: onnx.ModelProto, path: Path):
    """One self-contained file (no external data)."""
    atomic_write(path, lambda tmp: onnx.save_model(model, str(tmp), save_as_external_data=False))


def _check_int_kernels(integer, layers, report):
    """Every quantised layer of the integer graph must run as an integer kernel in onnxruntime,
    and each kernel configuration must be exact on this machine (the saturation probe)."""
    report["integer_layers"] = runtime.kernels_per_layer(integer, layers)
    report["saturation_probe"] = runtime.saturation_probe(layers)
    floats = [r["layer"] for r in report["integer_layers"] if not r["integer"]]
    if floats:
        report["failures"].append(f"int: layer(s) {floats} do not run as integer kernels")
    wrong = [r for r in report["saturation_probe"] if not r["exact"]]
    if wrong:
        report["failures"].append(
            "int: onnxruntime's integer kernels give wrong results on this CPU (int16 "
            "saturation, as on x86 without VNNI) for " + ", ".join(
                f"{r['kernel']} {r['x_dtype']} x {r['w_dtype']}, x - z_x in {r['x_range']}, "
                f"w - z_w in {r['w_range']}" for r in wrong)
            + "; do not deploy model_int.onnx on this machine")


def _check_qcdq_kernels(qcdq, layers, report):
    """onnxruntime fuses QCDQ layers into its own integer kernels (QLinearConv,
    MatMulIntegerToFloat, ...) with the operand types the quantisers have (uint8 / int8
    activations, int8 weights): list them, probe those types and ranges on this machine, and
    fail, naming the layers, where onnxruntime's kernels are wrong here."""
    rows = runtime.kernels_per_layer(qcdq, layers, "qcdq_weight")
    report["qcdq_layers"] = rows
    nbits = [r["layer"] for r in rows if r["kernel"] == "MatMulNBits"]
    if nbits:
        report["notes"].append(
            f"qcdq: onnxruntime runs {', '.join(nbits)} as MatMulNBits, which by default "
            f"quantises its float input to int8 (session.qdq_matmulnbits_accuracy_level=4, an "
            f"approximation); validated with level 0: set it where you deploy model_qcdq.onnx")
    fused = [dataclasses.replace(l, kernel=r["kernel"], x_dtype=l.qcdq_x_dtype,
                                 x_zero_point=l.qcdq_x_zero_point, w_dtype=l.qcdq_w_dtype,
                                 w_zero_point=l.qcdq_w_zero_point)
             for l, r in zip(layers, rows) if r["integer"] and l.integer]
    report["qcdq_probe"] = runtime.saturation_probe(fused)
    wrong = {(r["kernel"], r["x_dtype"], r["x_zero_point"], tuple(r["x_range"]),
              tuple(r["w_range"])) for r in report["qcdq_probe"] if not r["exact"]}
    bad = [f"{l.name} ({r['kernel']}, {l.qcdq_x_dtype} x {l.qcdq_w_dtype})"
           for l, r in zip(layers, rows)
           if (r["kernel"], l.qcdq_x_dtype, l.qcdq_x_zero_point, tuple(l.x_range),
               tuple(l.w_range)) in wrong]
    if bad:
        report["failures"].append(
            "qcdq: onnxruntime fuses " + ", ".join(bad) + " into integer kernels whose operand "
            "types give wrong results on this CPU (int16 saturation, as on x86 without VNNI; "
            "see qcdq_probe); the file is correct: run it where those kernels are exact, or use "
            "model_int.onnx with onnxruntime")


def _check_finn_ready(qonnx_file, images, reference, quantum, tolerance, report, n: int = 4):
    """The written QONNX file has what FINN's front end needs (graphs.finn_problems) and, run
    as it stands (batch 1, one image at a time) by qonnx's executor, agrees with PyTorch on the
    first images within the tolerance. (Its twin with a symbolic batch is validated on all
    images; float kernels may round differently at another batch size, hence not bit for bit.)"""
    problems = graphs.finn_problems(qonnx_file)
    if not problems:
        n = min(n, len(images))
        try:
            alone = np.concatenate([runtime.run_qonnx(qonnx_file, images[i:i + 1], 1, fixed=True)
                                    for i in range(n)])
            row = compare(reference[:n], alone, None, quantum)
            if not tolerance.passes(row):
                problems.append(f"run as it stands on {n} images, argmax agreement "
                                f"{row['argmax_agreement']:.2f}%, max difference "
                                f"{row['max_diff_quanta']:.3g} quanta")
        except Exception as e:  # noqa: BLE001  any failure to run it is the finding
            problems.append(f"qonnx's executor cannot run it as it stands: {e}")
    report["finn_ready"] = {"ready": not problems, "problems": problems}
    if problems:
        report["failures"].append("qonnx: not FINN-ready: " + "; ".join(problems))


def _check_int_only(model, layers, report):
    """No float tensor between the input quantiser and the last layer; the kernels onnxruntime
    executes for it."""
    floats = int_only.float_tensors_between(model)
    executed = runtime.executed_graph(model)
    counts = {}
    for n in executed.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    report["int_only"] = {"float_tensors_between_layers": floats,
                          "executed_kernels": dict(sorted(counts.items())),
                          "layers": runtime.kernels_per_layer(model, layers)}
    if floats:
        report["failures"].append(f"int_only: float tensors between layers: {floats[:5]}")
    not_int = [r["layer"] for r in report["int_only"]["layers"] if not r["integer"]]
    if not_int:
        report["failures"].append(f"int_only: layer(s) {not_int} do not run as integer kernels")


def _save_reference(path: Path, images, logits, labels, quantum, n: int = REFERENCE_IMAGES):
    """The first ``n`` images with PyTorch's logits and the output quantum, for checks by other
    tools (export/finn_check.py)."""
    arrays = dict(images=images[:n], logits=logits[:n].astype(np.float32),
                  quantum=np.asarray(quantum, np.float32))
    if labels is not None:
        arrays["labels"] = labels[:n]
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def torch_logits(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's eval-mode outputs, from a float32 CPU copy: the exports are float32 CPU
    graphs, and a GPU's reduced-precision convolutions (TF32) would move values across rounding
    boundaries."""
    model = copy.deepcopy(model).float().cpu().eval()
    outs = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch_size), desc="pytorch", leave=False,
                      disable=None):  # bars in terminals only
            outs.append(model(torch.from_numpy(images[i:i + batch_size])).float().numpy())
    return np.concatenate(outs)


def _reference(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """:func:`torch_logits`, or ExportError naming ``images`` when the model does not take
    them (checked before any file is written)."""
    try:
        return torch_logits(model, images, batch_size)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"images: the model does not take images of shape "
                          f"{list(images.shape[1:])} ({first})") from None


def export_qnn(model: torch.nn.Module, images, output_dir, labels=None,
               formats: Sequence[str] = FORMATS, tolerance: Optional[Tolerance] = None,
               batch_size: int = 100, input_description: str = INPUT,
               name: str = "model", unsigned_operands: bool = True) -> dict:
    """Export ``model`` (ANA or stock quantisers) in ``formats`` to ``output_dir`` and validate
    every file on ``images`` (an N x C x H x W float array or tensor, the model's input) against
    the model in eval mode. Returns the report (also written to ``report.json``); its
    ``passed`` is False when an export is beyond ``tolerance``, a quantised layer of the
    integer graph does not run as an integer kernel, or the saturation probe finds onnxruntime's
    integer kernels wrong on this machine. ``unsigned_operands=False`` keeps the quantisers' own
    operand types in the integer graph (see :func:`graphs.qcdq_to_integer`)."""
    created = not Path(output_dir).exists()
    try:
        return _export(model, images, output_dir, labels, formats, tolerance, batch_size,
                       input_description, name, unsigned_operands)
    except BaseException:
        out = Path(output_dir)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed export leaves no empty folder behind
        raise


def _export(model, images, output_dir, labels, formats, tolerance, batch_size,
            input_description, name, unsigned_operands) -> dict:
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ExportError(f"formats: unknown {unknown or 'empty'}; choose from {list(FORMATS)}")
    tolerance = tolerance or Tolerance()
    check_trained(model)
    check_quantised(model)
    images, labels = check_inputs(images, labels)
    out = check_writable(output_dir)
    reference = _reference(model, images, batch_size)
    (out / "report.json").unlink(missing_ok=True)  # a stale report must not describe new files

    example = torch.from_numpy(images[:1])
    qonnx_file = graphs.qonnx_from_torch(model, example)  # static, batch 1: what FINN reads
    qonnx_model = graphs.qonnx_from_torch(model, example, dynamic_batch=True)
    qcdq = graphs.qonnx_to_qcdq(qonnx_model)
    integer, layers = graphs.qcdq_to_integer(qcdq, unsigned_operands)
    if not layers:
        raise ExportError("the model has no quantised Conv / Linear layer to export")
    quantum = graphs.output_quantum(qcdq, layers)
    models = {"qonnx": qonnx_model, "qcdq": qcdq, "int": integer}
    files = {"qonnx": qonnx_file}
    int_only_error = None
    if "int_only" in formats:
        try:
            models["int_only"], _ = int_only.integer_to_int_only(integer, layers)
        except ExportError as e:  # the other graphs are still written and validated
            int_only_error = str(e)

    report = {"num_images": int(len(images)), "input": input_description,
              "input_shape": list(images.shape[1:]), "tolerance": vars(tolerance),
              "output_quantum": quantum.tolist(),
              "onnxruntime": {"version": runtime.ort.__version__,
                              "graph_optimization_level": "ORT_ENABLE_ALL",
                              "session_config": runtime.SESSION_CONFIG},
              "formats": {}, "failures": [], "notes": []}
    for fmt in formats:
        path = out / f"{name}_{fmt}.onnx"
        path.unlink(missing_ok=True)  # a stale file must not stand for this export
        if fmt == "int_only" and int_only_error:
            report["formats"][fmt] = {"file": None, "error": int_only_error, "passed": False}
            report["failures"].append(f"int_only: {int_only_error}")
            continue
        _save(files.get(fmt, models[fmt]), path)
        # the QONNX file itself is checked by _check_finn_ready; its twin with a symbolic batch
        # runs the whole batch here
        run = runtime.run_qonnx if fmt == "qonnx" else runtime.run_onnxruntime
        with tqdm(total=len(images), desc=fmt, leave=False, disable=None) as bar:
            logits = run(models[fmt], images, batch_size, progress=bar.update)
        row = {"file": str(path), **compare(reference, logits, labels, quantum)}
        row["passed"] = tolerance.passes(row)
        report["formats"][fmt] = row
        if not row["passed"]:
            report["failures"].append(
                f"{fmt}: argmax agreement {row['argmax_agreement']:.2f}%, max difference "
                f"{row['max_diff_quanta']:.3g} quanta")
    if "qcdq" in formats:
        _check_qcdq_kernels(qcdq, layers, report)
    if "qonnx" in formats:
        _check_finn_ready(qonnx_file, images, reference, quantum, tolerance, report)
    if "int" in formats:
        _check_int_kernels(integer, layers, report)
    if "int_only" in models and "int_only" in formats:
        _check_int_only(models["int_only"], layers, report)
    _save_reference(out / "reference.npz", images, reference, labels, quantum)
    report["passed"] = not report["failures"]
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    return report


def export_float(model: torch.nn.Module, images, output_dir, labels=None, batch_size: int = 100,
                 name: str = "model", rtol: float = 1e-4) -> dict:
    """Export a float network (e.g. the float twin of a QNN, :func:`brevitas_ana.set_float`) to
    ``{name}_float.onnx`` (torch's ONNX exporter, a symbolic batch) and validate it in
    onnxruntime on ``images`` against the model in eval mode. The report (``report.json``)
    passes when the argmax agrees on every image and no logit differs by more than ``rtol *
    max(1, max |logit|)``."""
    images, labels = check_inputs(images, labels)
    out = check_writable(output_dir)
    reference = _reference(model, images, batch_size)
    path = out / f"{name}_float.onnx"
    (out / "report.json").unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    net = copy.deepcopy(model).float().cpu().eval()
    example = torch.from_numpy(images[:1])
    try:
        with warnings.catch_warnings():  # the tracer's notes on Brevitas' constant tensors
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            atomic_write(path, lambda tmp: torch.onnx.export(
                net, (example,), str(tmp), dynamo=False, input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}))
    except Exception as e:  # torch's exporter raises many kinds, over many lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {first[:300]}") from None
    logits = runtime.run_onnxruntime(onnx.load(str(path)), images, batch_size)
    limit = rtol * max(1.0, float(np.abs(reference).max()))
    figures = compare(reference, logits, labels, np.float64(1.0))  # differences in logit units
    row = {"file": str(path), "top1_torch": figures["top1_torch"],
           "top1_export": figures["top1_export"],
           "argmax_agreement": figures["argmax_agreement"],
           "max_abs_diff": figures["max_diff_quanta"], "limit": limit}
    row["passed"] = row["argmax_agreement"] == 100.0 and row["max_abs_diff"] <= limit
    report = {"num_images": int(len(images)), "input_shape": list(images.shape[1:]),
              "onnxruntime": {"version": runtime.ort.__version__}, "formats": {"float": row},
              "failures": [] if row["passed"] else [
                  f"float: argmax agreement {row['argmax_agreement']:.2f}%, max difference "
                  f"{row['max_abs_diff']:.3g} (limit {limit:.3g})"]}
    report["passed"] = row["passed"]
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    return report
