"""Recipe runs through the export stage and FINN's own front end, one table.

For each run directory: export it (``recipes/export_run.py``: QONNX, QCDQ, integer, integer-only,
validated on the CIFAR-10 test images), then run FINN's flow on its QONNX file stage by stage
(``export/finn_check.py``, in FINN's own virtual environment, created on first use) on the first
``--finn-images`` test images. Prints a Markdown table (and writes it to ``--output``):

    python benchmarks/bench_finn.py runs/cnv_w1a1 runs/cnv_w2a2 --data-dir ../shared/data/cifar10
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from brevitas_ana.export import finn_check

ROOT = Path(__file__).resolve().parents[1]


def describe(run: Path) -> str:
    from brevitas_ana.recipes.config import flat
    cfg = flat(json.loads((run / "config.json").read_text()))
    return (f"{cfg['model']} W{cfg['weight_bit_width']}A{cfg['act_bit_width']} "
            f"{cfg['quantiser'].upper()}")


def one(run: Path, data_dir: str, num_images: int, finn_images: int, venv: Path) -> dict:
    out = run / "export"
    cmd = [sys.executable, str(ROOT / "recipes" / "export_run.py"), "--checkpoint", str(run),
           "--output-dir", str(out)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if num_images:
        cmd += ["--num-images", str(num_images)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if not (out / "report.json").exists():
        raise SystemExit(f"export of {run} failed:\n{proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    finn = finn_check.run_check(out / "model_qonnx.onnx", out / "reference.npz", venv,
                                finn_images, keep=out / "finn", quiet=True)
    last = finn["stages"][-1]
    fmt = report["formats"]
    return {"run": describe(run), "dir": str(run), "top1": fmt["qonnx"]["top1_torch"],
            "images": report["num_images"], "export_passed": report["passed"],
            "agree": {k: v.get("argmax_agreement") for k, v in fmt.items()},
            "quanta": {k: v.get("max_diff_quanta") for k, v in fmt.items()},
            "finn_ready": report["finn_ready"]["ready"], "finn_passed": finn["passed"],
            "finn_failed_stage": finn["failed_stage"], "finn_images": finn["num_images"],
            "finn_stages": sum(s["passed"] for s in finn["stages"]),
            "finn_agree": last.get("agreement"), "finn_quanta": last.get("max_diff_quanta"),
            "hw_layers": finn.get("hw_layers", {}), "finn_version": finn["finn_version"]}


def markdown(rows) -> str:
    lines = ["| run | top-1 (torch) | exports agree, max diff (quanta): qonnx / qcdq / int / "
             "int_only | FINN stages passed | FINN to_hw: agree, max diff | hardware layers |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        agree = " / ".join(f"{r['agree'][k]:.0f} %, {r['quanta'][k]:.3g}"
                           if r["agree"].get(k) is not None else "-"
                           for k in ("qonnx", "qcdq", "int", "int_only"))
        stages = f"{r['finn_stages']}/{len(finn_check.STAGES)}" + (
            "" if r["finn_passed"] else f" (fails at {r['finn_failed_stage']})")
        last = (f"{r['finn_agree']:.0f} %, {r['finn_quanta']:.3g}"
                if r["finn_agree"] is not None else "-")
        hw = ", ".join(f"{k} {v}" for k, v in sorted(r["hw_layers"].items()))
        lines.append(f"| {r['run']} | {r['top1']:.2f} | {agree} | {stages} | {last} | {hw} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="recipe run directories")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py (default: the run's)")
    p.add_argument("--num-images", type=int, default=None, help="export validation images "
                                                                "(default: the whole test set)")
    p.add_argument("--finn-images", type=int, default=50)
    p.add_argument("--venv", default=str(finn_check.DEFAULT_VENV))
    p.add_argument("--output", help="write the Markdown table and rows (JSON) here")
    args = p.parse_args(argv)
    rows = []
    for run in args.runs:
        print(f"{run} ...", flush=True)
        rows.append(one(Path(run), args.data_dir, args.num_images, args.finn_images,
                        Path(args.venv)))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(f"\nFINN {rows[0]['finn_version']}, {rows[0]['finn_images']} test images through "
          f"FINN's flow; exports validated on {rows[0]['images']} test images\n")
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
        Path(args.output).with_suffix(".json").write_text(json.dumps(rows, indent=2))
    if not all(r["finn_passed"] and r["export_passed"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
