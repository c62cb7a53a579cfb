"""Export a trained recipe run: rebuild its network from the model spec beside the weights,
take CIFAR-10 test images (or a batch of your own), and run the export stage on them.

    python recipes/export_run.py --checkpoint runs/cnv_w2a2 --output-dir runs/cnv_w2a2/export \\
        --data-dir ../shared/data/cifar10
    brevitas-ana-export --checkpoint runs/cnv_w2a2 --output-dir out      # the same, installed

Writes what :func:`brevitas_ana.export.export_qnn` writes, prints the report's tables and exits
1 when the report fails; bad input is a one-line error naming the file or field.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from brevitas_ana.export import ExportError, Tolerance, export_qnn
from brevitas_ana.export.export_qnn import FORMATS, check_writable
from brevitas_ana.export.validate import table
from brevitas_ana.recipes.checkpoint import CheckpointError, load_trained
from brevitas_ana.recipes.data import CifarBatches, ensure_cifar10, transforms
from brevitas_ana.recipes.models import describe

RECIPE_INPUT = ("float32 NCHW in [0, 1] (uint8 pixels / 255), as the recipes' test loader gives "
                "them; the model's own preprocessing is inside the graph")


def run_data_dir(weights: Path):
    """The data_dir of the run the weights belong to (its config.json), if any."""
    for folder in (weights.parent, weights.parent.parent.parent):
        if (folder / "config.json").is_file():
            try:
                config = json.loads((folder / "config.json").read_text())
                return config["data"]["data_dir"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                return None
    return None


def _inputs(args, weights: Path):
    """(images, labels or None, description) from --inputs, --data-dir or the run's data_dir."""
    if args.inputs:
        path = Path(args.inputs)
        try:
            data = np.load(path) if path.suffix == ".npy" else torch.load(path, weights_only=True)
        except Exception as e:
            raise ExportError(f"--inputs: cannot read {path}: {e}") from None
        if isinstance(data, dict):
            images, labels = data.get("images"), data.get("labels")
        else:
            images, labels = data, None
        if images is None:
            raise ExportError(f"--inputs: {path} has no 'images' entry")
        images = torch.as_tensor(images).float()[:args.num_images]
        labels = None if labels is None else torch.as_tensor(labels)[:args.num_images]
        return images, labels, f"the batch in {path}"
    data_dir = args.data_dir or run_data_dir(weights)
    try:
        folder = ensure_cifar10(data_dir, download=False)
    except FileNotFoundError as e:
        raise ExportError(f"{e} (or give a batch with --inputs)") from None
    test = CifarBatches(folder, train=False)
    n = min(args.num_images or len(test), len(test))
    images = transforms(False)(test.images[:n])
    return images, test.labels[:n], (f"CIFAR-10 test set ({folder}), first {n} images; "
                                     + RECIPE_INPUT)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except where the text already says it or there is none."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="export_run.py", formatter_class=_Help,
        description="Export a trained QNN to QONNX (FINN), QCDQ, integer and integer-only ONNX, "
        "and validate each against the PyTorch model.")
    p.add_argument("--checkpoint", required=True,
                   help="run directory (model.pt or checkpoints/), checkpoint directory, or "
                        "weights file (.pt / .safetensors); the network comes from the "
                        "model_spec.json beside the weights")
    p.add_argument("--output-dir", required=True, help="where the .onnx files and report go")
    p.add_argument("--config", help="recipe config (YAML/JSON) describing the network, for "
                                    "weights with no model_spec.json or config.json near them")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py (default: the "
                                      "run's data_dir)")
    p.add_argument("--inputs", help="a .pt (tensor, or dict with images/labels) or .npy batch to "
                                    "validate on instead of CIFAR-10")
    p.add_argument("--num-images", type=int, default=None,
                   help="validate on the first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=100,
                   help="images per validation batch (memory, not results)")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS,
                   help="which files to write and validate")
    p.add_argument("--min-agreement", type=float, default=100.0,
                   help="tolerance: argmax agreement in %%")
    p.add_argument("--max-quanta", type=float, default=1.0,
                   help="tolerance: largest logit difference in output quanta")
    args = p.parse_args(argv)
    for name in ("num_images", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        check_writable(args.output_dir, "--output-dir")
        model, spec, weights = load_trained(args.checkpoint, args.config)
        images, labels, description = _inputs(args, weights)
        print(f"exporting {describe(spec)} from {weights}")
        report = export_qnn(model, images, args.output_dir, labels=labels, formats=args.formats,
                            tolerance=Tolerance(args.min_agreement, args.max_quanta),
                            batch_size=args.batch_size, input_description=description)
    except (ExportError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    print(table(report))
    print(f"report: {Path(args.output_dir) / 'report.json'}")
    if not report["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
