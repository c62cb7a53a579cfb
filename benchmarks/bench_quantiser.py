"""Training-step cost of ANA quantisers vs stock Brevitas STE quantisers, side by side.

Model: FINN's CNV (Brevitas' bnn_pynq topology) on a CIFAR-10-sized batch (3x32x32 images).
For each bit width (W1A1, W2A2, W4A4, W8A8; 8-bit input quantiser as in bnn_pynq) and each sigma,
the stock model and its ANA twin (same weights, same batch) run a full training step (forward,
cross-entropy, backward, Adam step), interleaved, and the script prints

    time ratio   = median ANA step time / median stock step time
    memory ratio = peak ANA step memory / peak stock step memory

Peak memory is the high-water mark of the bytes the step allocates beyond what was live before it
(CPU: replayed from torch.profiler's allocation events; CUDA: torch.cuda.max_memory_allocated).

    python benchmarks/bench_quantiser.py                 # all bit widths, sigma 0.5 and 2.0
    python benchmarks/bench_quantiser.py --noise all     # the four families, one table
    python benchmarks/bench_quantiser.py --bits 2 --sigmas 0.5 --noise normal --repeats 5
    python benchmarks/bench_quantiser.py --backward exact floor --sigmas 0 0.1 0.5 --health
    python benchmarks/bench_quantiser.py --bits 1 2 --profile   # launches and host reads per step

``--profile`` adds, per step and side by side, what makes a small step launch-bound on a GPU:
the kernels launched (CUDA: device kernels and copies; CPU: operators dispatched that compute,
not views, allocations or no-op casts, plus compiled regions: each a launch on a GPU) and the
host's reads of device values (``.item()`` and the like, each a host-device sync on a GPU),
from one profiled step of each model.

``--backward floor`` measures the floored gradient (backward noise ``max(sigma, sigma_grad_min)``,
the family's starting noise by default; at ``sigma`` 0 the forward is the exact stair and the
slope costs one evaluation); ``--health`` adds the recipe's gradient-health hooks
(``brevitas_ana.GradientHealth``) to the ANA step.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from brevitas_examples.bnn_pynq.models import CNV as cnv_module
from torch.profiler import ProfilerActivity, profile

import brevitas_ana
from brevitas_ana import ana_quant

BITS = {1: (1, 1), 2: (2, 2), 4: (4, 4), 8: (8, 8)}


@contextmanager
def _cnv_quantisers(weight_quant, act_quant):
    # CNV's constructor names its quantisers as module globals; swap them while it runs.
    saved = cnv_module.CommonWeightQuant, cnv_module.CommonActQuant
    cnv_module.CommonWeightQuant, cnv_module.CommonActQuant = weight_quant, act_quant
    try:
        yield
    finally:
        cnv_module.CommonWeightQuant, cnv_module.CommonActQuant = saved


def build_cnv(wbits, abits, ana=False, **ana_options):
    wq, aq = cnv_module.CommonWeightQuant, cnv_module.CommonActQuant
    if ana:
        wq, aq = ana_quant(wq, **ana_options), ana_quant(aq, **ana_options)
    with _cnv_quantisers(wq, aq):
        return cnv_module.CNV(num_classes=10, weight_bit_width=wbits, act_bit_width=abits,
                              in_bit_width=8, in_ch=3)


class Step:
    def __init__(self, model, images, labels, health=None):
        self.model, self.images, self.labels, self.health = model, images, labels, health
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
        loss.backward()
        if self.health is not None:
            self.health.after_backward()
        self.opt.step()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(step, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Each event's *self* allocations net of frees (so nested ops count once), in time order.
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def launches_and_reads(step, device):
    """(kernels launched, host reads of device values) in one call of ``step``, from
    torch.profiler's events (see the module docstring)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    events = prof.events()
    reads = sum(e.name == "aten::_local_scalar_dense" for e in events)
    if device.type == "cuda":
        launches = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    else:  # operators entered from Python or autograd, not from inside another operator or
        # a compiled region (which wraps its float arguments in scalars: no launch on a GPU)
        launches = sum(_launch(e) and not any(_launch(a) for a in _ancestors(e)) for e in events)
    return launches, reads


# operators that launch nothing on a GPU: views, allocations, casts to the same type (a real
# cast shows as its child aten::_to_copy, counted in its place)
_NO_LAUNCH = {"aten::" + n for n in (
    "to", "type_as", "detach", "detach_", "view", "reshape", "expand", "as_strided", "alias", "t",
    "transpose", "permute", "unsqueeze", "squeeze", "select", "slice", "lift_fresh", "empty",
    "empty_like", "empty_strided", "result_type", "item", "_local_scalar_dense", "contiguous",
    "flatten", "unflatten", "_unsafe_view", "_reshape_alias", "expand_as", "view_as", "numpy_T")}


def _launch(event) -> bool:
    return (event.name.startswith("Torch-Compiled Region")
            or event.name.startswith("aten::") and event.name not in _NO_LAUNCH)


def _ancestors(event):
    while event.cpu_parent is not None:
        event = event.cpu_parent
        yield event


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4, 8], choices=sorted(BITS))
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--noise", nargs="+", default=["uniform"],
                   choices=brevitas_ana.noise.noise_families() + ("all",),
                   help="noise families to compare with stock ('all': every registered one)")
    p.add_argument("--strategy", default="expectation",
                   choices=brevitas_ana.checks.STRATEGIES)
    p.add_argument("--backward", nargs="+", default=["exact"],
                   choices=brevitas_ana.checks.BACKWARDS, help="backward policies")
    p.add_argument("--sigma-grad-min", type=float, default=None,
                   help="floor of the floor policy (default: the family's starting noise)")
    p.add_argument("--health", action="store_true", help="add gradient-health hooks to ANA")
    p.add_argument("--profile", action="store_true",
                   help="also count kernel launches and host reads of device values per step")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=9, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    noises = brevitas_ana.noise.noise_families() if "all" in args.noise else args.noise
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(args.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)

    print(f"CNV training step, batch {args.batch_size}x3x32x32, device {device}, "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"strategy {args.strategy}, {args.repeats} interleaved repeats (median)"
          + (", gradient-health hooks on ANA" if args.health else ""))
    header = (f"{'config':>6} {'noise':>10} {'sigma':>6} {'backward':>8} {'stock ms':>9} "
              f"{'ANA ms':>9} {'time ratio':>10} {'stock MiB':>9} {'ANA MiB':>9} "
              f"{'mem ratio':>9}")
    print(header)
    print("-" * len(header))
    summary = {}  # (noise, sigma, backward) -> {bits: (time ratio, memory ratio)}
    for bits, noise in ((b, n) for b in args.bits for n in noises):
        wbits, abits = BITS[bits]
        torch.manual_seed(0)
        stock = build_cnv(wbits, abits).to(device).train()
        ana = build_cnv(wbits, abits, ana=True, ana_noise=noise,
                        ana_strategy=args.strategy).to(device).train()
        stock(images)  # initialise runtime-stats scales before copying them over
        ana.load_state_dict(stock.state_dict())
        health = None
        if args.health:
            controller = brevitas_ana.AnaController(
                ana, preset="static", config=brevitas_ana.AnaConfig(sigma=0.0),
                example_input=images[:2])
            health = brevitas_ana.GradientHealth(controller)
        for sigma, backward in ((s, b) for s in args.sigmas for b in args.backward):
            for _, q in brevitas_ana.ana_quantizers(ana):
                q.backward = backward
            brevitas_ana.set_sigma(ana, sigma, sigma_grad_min=args.sigma_grad_min)
            steps = {"stock": Step(stock, images, labels),
                     "ana": Step(ana, images, labels, health)}
            for _ in range(args.warmup):
                for s in steps.values():
                    s()
            times = {k: [] for k in steps}
            for _ in range(args.repeats):
                for k, s in steps.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    s()
                    _sync(device)
                    times[k].append(time.perf_counter() - t0)
            t_stock, t_ana = (statistics.median(times[k]) for k in ("stock", "ana"))
            m_stock, m_ana = (peak_bytes(steps[k], device) for k in ("stock", "ana"))
            print(f"{f'W{wbits}A{abits}':>6} {noise:>10} {sigma:>6g} {backward:>8} "
                  f"{1e3 * t_stock:>9.1f} {1e3 * t_ana:>9.1f} {t_ana / t_stock:>10.3f} "
                  f"{m_stock / 2**20:>9.1f} {m_ana / 2**20:>9.1f} {m_ana / m_stock:>9.3f}",
                  flush=True)
            if args.profile:
                (l_stock, r_stock), (l_ana, r_ana) = (launches_and_reads(steps[k], device)
                                                      for k in ("stock", "ana"))
                print(f"{'':>6} launches per step: stock {l_stock}, ANA {l_ana} "
                      f"({l_ana / l_stock:.2f}x); host reads: stock {r_stock}, ANA {r_ana}",
                      flush=True)
            summary.setdefault((noise, sigma, backward), {})[bits] = (t_ana / t_stock,
                                                                      m_ana / m_stock)
    print("\nANA / stock, time ratio / memory ratio (markdown):\n")
    print("| noise | sigma | backward | " + " | ".join(f"W{BITS[b][0]}A{BITS[b][1]}"
                                                    for b in args.bits) + " |")
    print("| --- | --- | --- |" + " --- |" * len(args.bits))
    for (noise, sigma, backward), row in summary.items():
        print(f"| {noise} | {sigma:g} | {backward} | " + " | ".join(
            f"{row[b][0]:.2f} / {row[b][1]:.2f}" for b in args.bits) + " |")


if __name__ == "__main__":
    main()
