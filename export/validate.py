"""Comparing an export's outputs with the PyTorch model's, and the validation report.

For reference logits ``r`` and export logits ``e`` on the same images, with the output quantum
``q`` (one step of the last quantised tensor, per output channel, see
:func:`graphs.output_quantum`):

- top-1 accuracy of each (when labels are given);
- argmax agreement: mean(argmax r == argmax e), in %;
- largest difference in quanta: max |e - r| / q;
- fraction of output elements that differ: mean(|e - r| / q > 1/2), i.e. that land on another
  output level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class Tolerance:
    """An export passes when its argmax agreement is at least ``min_agreement`` % and no output
    differs by more than ``max_quanta`` output quanta."""
    min_agreement: float = 100.0
    max_quanta: float = 1.0

    def passes(self, row: dict) -> bool:
        return (row["argmax_agreement"] >= self.min_agreement
                and row["max_diff_quanta"] <= self.max_quanta)


def top1(logits: np.ndarray, labels: Optional[np.ndarray]) -> Optional[float]:
    return None if labels is None else float(100.0 * np.mean(logits.argmax(1) == labels))


def compare(reference: np.ndarray, output: np.ndarray, labels: Optional[np.ndarray],
            quantum: np.ndarray) -> dict:
    """The module docstring's figures for one export."""
    if output.shape != reference.shape:
        raise ValueError(f"export output shape {output.shape} != PyTorch output shape "
                         f"{reference.shape}")
    diff = np.abs(output.astype(np.float64) - reference) / quantum
    return {"top1_torch": top1(reference, labels), "top1_export": top1(output, labels),
            "argmax_agreement": float(100.0 * np.mean(reference.argmax(1) == output.argmax(1))),
            "max_diff_quanta": float(diff.max()),
            "frac_differ": float(np.mean(diff > 0.5))}


def _pct(v):
    return "-" if v is None else f"{v:.2f}"


def table(report: dict) -> str:
    """The report as plain-text tables: one row per exported file, then the integer graph's
    layers and the saturation probe."""
    lines = [f"{report['num_images']} images; input: {report['input']}",
             f"tolerance: argmax agreement >= {report['tolerance']['min_agreement']}%, "
             f"max difference <= {report['tolerance']['max_quanta']} output quanta",
             "",
             f"{'format':<9} {'top-1 torch':>11} {'top-1 export':>12} {'argmax agree %':>14} "
             f"{'max diff (quanta)':>17} {'elements differing':>18}  result  file"]
    for name, row in report["formats"].items():
        if row.get("error"):
            lines.append(f"{name:<9} not written: {row['error']}")
            continue
        lines.append(f"{name:<9} {_pct(row['top1_torch']):>11} {_pct(row['top1_export']):>12} "
                     f"{row['argmax_agreement']:>14.2f} {row['max_diff_quanta']:>17.3g} "
                     f"{row['frac_differ']:>18.3g}  {'pass' if row['passed'] else 'FAIL':<6}  "
                     f"{row['file']}")
    if "finn_ready" in report:
        ready = report["finn_ready"]
        lines += ["", "qonnx: FINN-ready (static shapes, batch 1; runs as it stands)"
                  if ready["ready"] else "qonnx: NOT FINN-ready: " + "; ".join(ready["problems"])]
    if report.get("integer_layers"):
        lines += ["", "integer graph, kernels onnxruntime executes (its optimised graph):",
                  f"{'layer':<12} {'op':<7} {'kernel':<22} {'x, w types':<13} {'x - z_x':<11} "
                  f"{'w - z_w':<11} note"]
        for r in report["integer_layers"]:
            types = f"{r['x_dtype']}, {r['w_dtype']}" if r["x_dtype"] else "-"
            lines.append(f"{r['layer']:<12} {r['op']:<7} "
                         f"{r['kernel'] + ('' if r['integer'] else ' (FLOAT)'):<22} "
                         f"{types:<13} {str(r['x_range']):<11} {str(r['w_range']):<11} "
                         f"{r['reason']}")
    if report.get("qcdq_layers"):
        fused = [f"{r['layer']}: {r['kernel']}" for r in report["qcdq_layers"] if r["integer"]]
        lines += ["", f"qcdq: onnxruntime runs {len(fused)} of {len(report['qcdq_layers'])} "
                      f"quantised layers as integer kernels of its own"
                  + (f" ({', '.join(fused)})" if fused else "")]
        for r in report.get("qcdq_probe", []):
            lines.append(f"  probe {r['x_dtype']} x {r['w_dtype']}, x - z_x in {r['x_range']}, "
                         f"w - z_w in {r['w_range']}: "
                         f"{'exact' if r['exact'] else 'WRONG by %g' % r['max_error']}")
    if report.get("saturation_probe"):
        lines += ["", "saturation probe (all-equal extreme operands vs exact int64):"]
        for r in report["saturation_probe"]:
            lines.append(f"  {r['kernel']:<14} {r['x_dtype']} x {r['w_dtype']}, x - z_x in "
                         f"{r['x_range']}, w - z_w in {r['w_range']}: "
                         f"{'exact' if r['exact'] else 'WRONG by %g' % r['max_error']}")
    if report.get("int_only"):
        r = report["int_only"]
        kernels = ", ".join(f"{k} x{v}" for k, v in r["executed_kernels"].items())
        lines += ["", "integer-only graph, kernels onnxruntime executes: " + kernels,
                  "  float tensors between layers: " + (", ".join(
                      r["float_tensors_between_layers"][:5]) or "none")]
    lines += [f"note: {n}" for n in report.get("notes", [])]
    lines += ["", "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"])]
    return "\n".join(lines)
