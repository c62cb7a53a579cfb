"""Post-training quantisation from a float twin: Brevitas' calibration tools side by side.

Loads ``--init-from`` (a float run, e.g. ``--quantiser float``) into the quantised network of
``--config`` and prints the held-out top-1 of the exact quantised network before any training
step, after each of: nothing, ``bias_correction_mode``, ``norm_correction_mode``, and norm then
bias correction, each on the first ``--batches`` x batch-size training images (no augmentation),
every row after ``calibration_mode`` on the same images (as the recipe's ``--calibrate``)::

    python benchmarks/bench_calibration.py --config recipes/configs/cnv_w2a2_finetune.yaml \\
        --init-from runs/ft/cnv_w2a2_float10 --batches 20 --val-split 5000 \\
        --data-dir ../shared/data/cifar10

The recipe offers what measurably helped (``--calibrate N --norm-correction``; docs/finetune.md).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("nothing", "bias_correction", "norm_correction", "norm_correction + bias_correction")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a recipe config (its network and batch size)")
    p.add_argument("--init-from", required=True, help="float weights: a run, folder or file")
    p.add_argument("--batches", type=int, default=20, help="calibration batches (default 20)")
    p.add_argument("--val-split", type=int, default=5000,
                   help="training images held out for evaluation (default 5000)")
    p.add_argument("--data-dir", default="./data")
    args = p.parse_args(argv)
    # the recipe wants a run folder; nothing is written to it that outlives the benchmark
    with tempfile.TemporaryDirectory(prefix="bench_calibration_") as unused:
        measure(args, Path(unused))


def measure(args, unused: Path):
    """Held-out top-1 after each calibration variant, each from freshly loaded float weights."""
    from brevitas.graph.calibrate import (bias_correction_mode, calibration_mode,
                                          norm_correction_mode)
    from brevitas_ana.recipes.config import ConfigError, parse_args
    from brevitas_ana.recipes.data import resident_tensors
    from brevitas_ana.recipes.train_cifar10 import (build, calibration_pass_over, evaluate,
                                                    load_data, make_accelerator)
    try:
        cfg = parse_args(["--config", args.config, "--init-from", args.init_from,
                          "--val-split", str(args.val_split), "--data-dir", args.data_dir,
                          "--no-download", "--output-dir", str(unused)])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    accelerator, _ = make_accelerator(cfg, unused)
    data = load_data(cfg, accelerator)
    size = cfg.optim.batch_size
    images = resident_tensors(data.train_set)[0][:args.batches * size]

    def calibration_pass(net):
        calibration_pass_over(net, images, size, accelerator, "calibration images")

    print(f"{cfg.model.name} W{cfg.model.weight_bit_width}A{cfg.model.act_bit_width} "
          f"({cfg.model.quantiser}) from {args.init_from}; {len(images)} calibration images, "
          f"{len(data.eval_dl.dataset)} held-out images")
    print("| after loading the float weights and calibration_mode | held-out top-1 (%) |\n"
          "| --- | --- |")
    for variant in VARIANTS:
        run = build(cfg, accelerator, data, {}, resuming=False)  # fresh weights each time
        run.net.eval()
        with torch.no_grad():
            with calibration_mode(run.net):
                calibration_pass(run.net)
            if "norm_correction" in variant:
                with norm_correction_mode(run.net):
                    calibration_pass(run.net)
                run.net.eval()
            if "bias_correction" in variant:
                with bias_correction_mode(run.net):
                    calibration_pass(run.net)
        _, acc = evaluate(run.model, data.eval_dl, run.criterion, accelerator, variant)
        print(f"| {variant} | {acc:.2f} |", flush=True)


if __name__ == "__main__":
    main()
