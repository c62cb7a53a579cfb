"""Training-data throughput: the resident loader against torch's DataLoader, beside the CNV
training step it feeds, side by side in one run on the same images.

    python benchmarks/bench_loader.py --data-dir ../shared/data/cifar10
    python benchmarks/bench_loader.py --device cuda          # where a GPU is lent

For each loader the script draws ``--batches`` training batches (random crop with padding 4,
horizontal flip, float [0, 1]; what the recipe's training loop receives, on ``--device``) and
prints images per second, best of ``--rounds``:

    resident       recipes.data.ResidentLoader: uint8 images on the device, one gather per batch
    workers N      torch DataLoader over recipes.data.CifarBatches with torchvision's per-image
                   transforms, N worker processes (the recipe's ``data.loader: workers``)

and, for scale, the stock Brevitas CNV W2A2 training step (forward, backward, Adam) at the same
batch size on the same device, and each loader's rate as a multiple of that step rate: the
loader stops mattering once it is many times faster than the step it feeds.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from brevitas_ana.recipes.data import CifarBatches, ResidentLoader, ensure_cifar10, transforms


def images_per_s(batches, n: int, device) -> float:
    """Images/s of drawing ``n`` batches from the iterable ``batches`` onto ``device``."""
    it = iter(batches)
    start, count = time.perf_counter(), 0
    for _ in range(n):
        x, y = next(it)
        x = x.to(device, non_blocking=True)
        count += len(y)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def step_rate(batch_size: int, device, steps: int) -> float:
    """Images/s of the stock Brevitas CNV W2A2 training step (the recipe's network)."""
    from brevitas_examples.bnn_pynq.models.CNV import CNV
    torch.manual_seed(0)
    model = CNV(num_classes=10, weight_bit_width=2, act_bit_width=2, in_bit_width=8,
                in_ch=3).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def one():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    one()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="../shared/data/cifar10",
                   help="folder holding cifar-10-batches-py")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--batches", type=int, default=100, help="batches drawn per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="DataLoader worker counts to measure")
    p.add_argument("--steps", type=int, default=10, help="CNV training steps timed")
    args = p.parse_args(argv)

    folder = ensure_cifar10(Path(args.data_dir), download=False)
    train = CifarBatches(folder, train=True, transform=transforms(True))
    loaders = {"resident": ResidentLoader(train.images, train.labels, args.batch_size, seed=0,
                                          device=args.device)}
    for n in args.workers:
        loaders[f"workers {n}"] = DataLoader(train, batch_size=args.batch_size, shuffle=True,
                                             drop_last=True, num_workers=n,
                                             persistent_workers=n > 0,
                                             pin_memory=torch.device(args.device).type == "cuda")
    rates = {name: 0.0 for name in loaders}
    for _ in range(args.rounds):  # interleaved: a drift of the machine's speed hits all alike
        for name, loader in loaders.items():
            rates[name] = max(rates[name], images_per_s(loader, args.batches, args.device))
    step = step_rate(args.batch_size, args.device, args.steps)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device "
          f"{args.device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.batches} batches x best of {args.rounds}")
    print("| loader | images/s | x CNV W2A2 training step | x DataLoader (0 workers) |")
    print("| --- | --- | --- | --- |")
    base = rates.get("workers 0")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / step:.1f} | "
              f"{rate / base:.1f} |" if base else f"| {name} | {rate:,.0f} | {rate / step:.1f} | |")
    print(f"| (CNV W2A2 training step, stock Brevitas) | {step:,.0f} | 1.0 | |")
    return rates, step


if __name__ == "__main__":
    main()
