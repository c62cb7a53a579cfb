"""onnxruntime latency of the exported integer graphs vs the float ONNX of the same network.

For one network (a recipe checkpoint, or a freshly initialised CNV W2A2 when none is given) the
script builds, in one run, the four graphs onnxruntime can execute:

    int_only  integers from the input quantiser to the last layer: integer kernels, thresholds
              for BN + activation quantiser, max-pool on integers (export/int_only.py)
    int       ConvInteger / MatMulInteger on the quantised integers, BN and requantisation in
              float between layers (export/graphs.py, item 3)
    qcdq      QuantizeLinear / Clip / DequantizeLinear around float Conv / MatMul
    float     the same network with dequantised float weights and no activation quantisers

and times each at batch 1 and batch 64 on the same input, interleaved over several rounds
(best of the per-round medians), printing milliseconds per image and the ratios to the float
graph (below 1: faster than float).

    python benchmarks/bench_export.py --checkpoint runs/cnv_w2a2
    python benchmarks/bench_export.py --threads 1 --repeats 50
"""
from __future__ import annotations

import argparse
import platform

import numpy as np
import onnxruntime as ort
import torch

from brevitas_ana.export import graphs, int_only, runtime


def build(checkpoint):
    if checkpoint:
        from brevitas_ana.recipes.checkpoint import load_trained
        from brevitas_ana.recipes.models import describe
        model, spec, _ = load_trained(checkpoint)
        return model, f"{describe(spec)} from {checkpoint}"
    from brevitas_examples.bnn_pynq.models.CNV import CNV
    torch.manual_seed(0)
    model = CNV(num_classes=10, weight_bit_width=2, act_bit_width=2, in_bit_width=8, in_ch=3)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32))
    return model.eval(), "CNV W2A2, freshly initialised"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="recipe run directory (default: fresh CNV W2A2)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=20, help="timed runs per graph and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all)")
    args = p.parse_args(argv)

    model, what = build(args.checkpoint)
    images = np.random.default_rng(0).random((max(args.batches), 3, 32, 32), dtype=np.float32)
    qonnx_model = graphs.qonnx_from_torch(model, torch.from_numpy(images[:1]),
                                          dynamic_batch=True)
    qcdq = graphs.qonnx_to_qcdq(qonnx_model)
    integer, layers = graphs.qcdq_to_integer(qcdq)
    models = {"int_only": int_only.integer_to_int_only(integer, layers)[0], "int": integer,
              "qcdq": qcdq, "float": graphs.qonnx_to_float(qonnx_model)}
    print(f"{what}; onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {args.threads or 'all'}")
    names = list(models)
    print(f"{'batch':>5} " + " ".join(f"{n + ' ms/img':>15}" for n in names) + " "
          + " ".join(f"{n + '/float':>15}" for n in names[:-1]))
    for batch in args.batches:
        t = runtime.latencies(models, images, batch, args.repeats, args.rounds, args.threads)
        print(f"{batch:>5} " + " ".join(f"{t[n] * 1e3:>15.3f}" for n in names) + " "
              + " ".join(f"{t[n] / t['float']:>15.2f}" for n in names[:-1]))


if __name__ == "__main__":
    main()
