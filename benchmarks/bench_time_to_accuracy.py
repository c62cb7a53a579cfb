"""Time to accuracy: held-out accuracy against wall-clock minutes and training images seen, for
the fast recipes (stock STE and default ANA), the 500-epoch recipe and Brevitas' own bnn_pynq
trainer, each given the same wall time on the same machine.

    python benchmarks/bench_time_to_accuracy.py --out runs/tta_w2a2 --bits w2a2 --minutes 80 \\
        --data-dir ../shared/data/cifar10

Entries (``--entries`` picks some):

    fast_ste   recipes/configs/cnv_<bits>_fast.yaml --quantiser ste
    fast_ana   recipes/configs/cnv_<bits>_fast.yaml (default ANA)
    long_ana   recipes/configs/cnv_<bits>.yaml, the 500-epoch recipe, stopped at the budget
    bnn_pynq   python -m brevitas_examples.bnn_pynq.bnn_pynq_train --network CNV_<W>W<A>A (its
               own defaults: Adam 0.02, squared hinge, batch 100, 1000 epochs), stopped at the
               budget

``--jobs`` run at once as separate processes with ``cores / jobs`` torch threads each (state
it with the figures: runs that share the machine slow each other down). The recipe runs evaluate
on ``--val-split`` training images held out (their choice of settings never sees the test set);
bnn_pynq's trainer has no split and evaluates on the test set. A run whose folder already holds
its finished curve is not run again; Ctrl-C or a SIGTERM stops the running entries (they run in
process sessions of their own) and keeps only finished ones.

Writes into ``--out``: one folder per entry and its console output ``<entry>.log``,
``curves.csv`` (entry, epoch, minutes since the process started, images seen, accuracy),
``results.md`` (best accuracy reached by each quarter of the budget, per entry) and
``time_to_accuracy.png`` (accuracy against minutes and against images).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_cifar10.py"
CONFIGS = ROOT / "recipes" / "configs"
ENTRIES = ("fast_ste", "fast_ana", "long_ana", "bnn_pynq")
#: Entries' processes still running, and set once the benchmark is interrupted: the entries
#: run in sessions of their own, which neither Ctrl-C nor a SIGTERM to the benchmark reaches.
RUNNING: set = set()
STOPPING = threading.Event()
BNN_TRAIN_IMAGES = 50_000  # bnn_pynq trains on the whole training set every epoch
# bnn_pynq's logger: "2026-12-05 02:40:06,816 Test: [99/100]\t... Prec@1 80.000 (84.220)\t..."
BNN_EVAL = re.compile(r"^(\S+ \S+) Test: \[(\d+)/(\d+)\].*?Prec@1 [\d.]+ \(([\d.]+)\)")


def command(entry: str, bits: str, args, folder: Path):
    """The command line of an entry, and the folder it writes."""
    w, a = bits[1], bits[3]
    if entry == "bnn_pynq":
        return [sys.executable, "-m", "brevitas_examples.bnn_pynq.bnn_pynq_train",
                "--network", f"CNV_{w}W{a}A", "--datadir", str(args.data_dir),
                "--experiments", str(folder), "--num_workers", str(args.num_workers),
                "--random_seed", str(args.seed)]
    config = CONFIGS / (f"cnv_{bits}_fast.yaml" if entry.startswith("fast") else
                        f"cnv_{bits}.yaml")
    return [sys.executable, str(RECIPE), "--config", str(config), "--data-dir",
            str(args.data_dir), "--no-download", "--val-split", str(args.val_split), "--seed",
            str(args.seed), "--no-export", "--output-dir", str(folder), "--overwrite",
            "--quantiser", "ste" if entry == "fast_ste" else "ana"]


def run_entry(entry: str, bits: str, args, threads: int) -> dict:
    """Run one entry for at most ``args.minutes`` (then SIGTERM) and read its curve."""
    folder = Path(args.out) / entry
    done = folder / "curve.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("settings") == settings(args, bits):
            return saved
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.time()
    # beside the folder, not in it: the recipe's --overwrite empties its folder
    with open(Path(args.out) / f"{entry}.log", "w") as log:
        # a session of its own: the budget's SIGTERM reaches bnn_pynq's loader workers too
        proc = subprocess.Popen(command(entry, bits, args, folder), stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        RUNNING.add(proc)
        if STOPPING.is_set():  # started while stop_all() went through RUNNING
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=args.minutes * 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        finally:
            RUNNING.discard(proc)
    if STOPPING.is_set():  # interrupted, not at its budget: nothing to keep as finished
        return {}
    points = (bnn_curve(folder, start) if entry == "bnn_pynq" else
              recipe_curve(folder / "metrics.csv", start))
    result = {"entry": entry, "settings": settings(args, bits), "points": points,
              "threads": threads, "seconds": time.time() - start}
    done.write_text(json.dumps(result, indent=1))
    return result


def interrupted(signum, frame):
    raise KeyboardInterrupt  # a SIGTERM stops the entries as Ctrl-C does


def stop_all():
    """SIGTERM every running entry's process group. A finished entry's curve is kept; an
    interrupted one records nothing and runs again from its start next time."""
    STOPPING.set()
    for proc in list(RUNNING):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def settings(args, bits: str) -> dict:
    # split_seed: the recipe's held-out images follow data.split_seed (default 0), not --seed;
    # curves saved before it drew them from the seed
    return {"bits": bits, "minutes": args.minutes, "seed": args.seed,
            "val_split": args.val_split, "split_seed": 0, "jobs": args.jobs}


def recipe_curve(metrics: Path, start: float):
    """[(epoch, minutes since start, images seen, eval accuracy)] from a recipe's metrics.csv
    (the ``time`` column is the wall clock when the epoch's row was written)."""
    if not metrics.is_file():
        return []
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    return [(int(r["epoch"]), (float(r["time"]) - start) / 60, int(r["images_seen"]),
             float(r["eval_acc"])) for r in rows]


def bnn_curve(folder: Path, start: float):
    """The same from bnn_pynq's log: the running top-1 at the last batch of each evaluation."""
    logs = sorted(folder.rglob("log.txt"))
    points = []
    for line in (logs[-1].read_text().splitlines() if logs else []):
        m = BNN_EVAL.match(line)
        if m and int(m.group(2)) == int(m.group(3)) - 1:
            when = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            epoch = len(points) + 1
            points.append((epoch, (when - start) / 60, epoch * BNN_TRAIN_IMAGES,
                           float(m.group(4))))
    return points


def best_by(points, minutes: float) -> float:
    """The best accuracy reached within ``minutes`` (nan before the first evaluation)."""
    reached = [acc for _, t, _, acc in points if t <= minutes]
    return max(reached) if reached else float("nan")


def report(results, args, bits: str, threads: int) -> str:
    marks = [args.minutes * q / 4 for q in (1, 2, 3, 4)]
    import torch
    lines = [f"CNV {bits.upper()}, {args.minutes} min per entry, {platform.machine()} "
             f"{os.cpu_count()} cores, {args.jobs} runs at once with {threads} thread(s) each "
             f"(runs shared the machine: {'yes' if args.jobs > 1 else 'no'}), torch "
             f"{torch.__version__}, seed {args.seed}; recipe runs evaluate on {args.val_split} "
             f"held-out training images, bnn_pynq on the test set.", "",
             "| entry | epochs | images seen | " +
             " | ".join(f"best acc by {m:.3g} min" for m in marks) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in marks) + " |"]
    for r in results:
        pts = r["points"]
        last = pts[-1] if pts else (0, 0, 0, float("nan"))
        lines.append(f"| {r['entry']} | {last[0]} | {last[2]:,} | " +
                     " | ".join(f"{best_by(pts, m):.2f}" for m in marks) + " |")
    return "\n".join(lines) + "\n"


def plot(results, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for r in results:
        pts = r["points"]
        if not pts:
            continue
        style = dict(marker="o", markersize=3, label=r["entry"],
                     color="gray" if r["entry"] == "bnn_pynq" else None)
        left.plot([p[1] for p in pts], [p[3] for p in pts], **style)
        right.plot([p[2] / 1e6 for p in pts], [p[3] for p in pts], **style)
    left.set_xlabel("wall-clock minutes since the process started")
    right.set_xlabel("training images seen (millions)")
    left.set_ylabel("held-out top-1 (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend()
    # the report's first line is longer than the figure is wide
    fig.suptitle(textwrap.fill(title, 150), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/time_to_accuracy", help="benchmark folder")
    p.add_argument("--bits", default="w2a2", choices=["w2a2", "w1a2", "w1a1"])
    p.add_argument("--entries", nargs="+", default=list(ENTRIES), choices=ENTRIES)
    p.add_argument("--minutes", type=float, default=80.0, help="wall time per entry")
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--val-split", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="entries at once")
    p.add_argument("--num-workers", type=int, default=2, help="bnn_pynq's DataLoader workers")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.jobs < 1:
        raise SystemExit("error: --minutes must be > 0 and --jobs >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{len(args.entries)} entries x {args.minutes} min, {args.jobs} at once -> {out}")
    signal.signal(signal.SIGTERM, interrupted)
    pool = ThreadPoolExecutor(args.jobs)
    try:
        results = list(pool.map(lambda e: run_entry(e, args.bits, args, threads), args.entries))
    except KeyboardInterrupt:
        stop_all()
        sys.exit(f"interrupted: the running entries were stopped; finished ones are kept in "
                 f"{out} (the same command runs the others)")
    except BaseException:
        stop_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["entry", "epoch", "minutes", "images_seen", "accuracy"])
        for r in results:
            writer.writerows([r["entry"], *pt] for pt in r["points"])
    text = report(results, args, args.bits, threads)
    (out / "results.md").write_text(text)
    plot(results, out / "time_to_accuracy.png", text.splitlines()[0])
    print(text)
    return results


if __name__ == "__main__":
    main()
