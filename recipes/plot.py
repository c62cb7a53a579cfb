"""Draw a training run's curves from its metrics.csv.

    python recipes/plot.py runs/cnv_w2a2            # reads runs/cnv_w2a2/metrics.csv
    python recipes/plot.py metrics.csv --out-dir plots

Writes ``accuracy.png``, ``loss.png`` and, for ANA runs, ``sigma.png`` (sigma per ANA group over
epochs) and ``gradient.png``: per group, the fraction of elements whose gradient passes the
activation quantiser and the norm of the gradient reaching the weights (``brevitas_ana.health``),
where a layer starved by annealing shows as a falling curve.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_metrics(path: Path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _column(rows, key):
    return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]


def _epoch_axis(ax, epochs):
    """Integer epochs with half an epoch of margin: one epoch is a point, not a lone dot on a
    padded axis."""
    if epochs:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.set_xticks(range(int(min(epochs)), int(max(epochs)) + 1,
                            max(1, int(len(epochs) // 10))))


def draw_sigma(ax, rows, epochs):
    """sigma per group at each epoch end: input side first (dark to light), markers so a single
    epoch shows, symmetric-log scale so the small late values and the annealed-away zero (the
    marked floor) are all readable."""
    import matplotlib
    keys = [k for k in rows[0] if k.startswith("sigma/")]
    colours = matplotlib.colormaps["viridis"]
    for i, k in enumerate(keys):
        ax.plot(epochs, _column(rows, k), marker="o", markersize=4,
                color=colours(i / max(1, len(keys) - 1)),
                label=("input side: " if i == 0 else "") + k[len("sigma/"):])
    ax.set_xlabel("epoch")
    ax.set_ylabel("sigma at epoch end (steps)")
    ax.set_title("ANA noise per group" if keys else "no ANA quantisers (STE run)")
    if keys:
        ax.set_yscale("symlog", linthresh=1e-3)
        top = max([v for k in keys for v in _column(rows, k) if v == v] + [1e-2])
        ax.set_ylim(-2e-4, top * 2)  # no negative half: sigma >= 0
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":", label="0: noise-free")
        ax.legend(fontsize="x-small", ncol=2)
    _epoch_axis(ax, epochs)


def _draw_groups(ax, rows, epochs, keys):
    """One curve per group that has a figure; returns the groups with none (all NaN)."""
    unmeasured = []
    for k in keys:
        values = _column(rows, k)
        if all(v != v for v in values):
            unmeasured.append(k.split("/", 1)[1])
            continue
        ax.plot(epochs, values, marker="o", markersize=3, label=k.split("/", 1)[1])
    return unmeasured


def plot_metrics(csv_path, out_dir=None):
    """Write the PNGs next to ``csv_path`` (or into ``out_dir``): accuracy and loss; for ANA runs
    also sigma and gradient health. Returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    csv_path = Path(csv_path)
    out_dir = Path(out_dir) if out_dir else csv_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_metrics(csv_path)
    epochs = _column(rows, "epoch")
    written = []
    for name, keys, ylabel in (("accuracy", ("train_acc", "eval_acc"), "top-1 accuracy (%)"),
                               ("loss", ("train_loss", "eval_loss"), "loss")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in keys:
            ax.plot(epochs, _column(rows, k), marker="o", markersize=3,
                    label=k.replace("_", " ") + (" (noise-free)" if k.startswith("eval") else ""))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        _epoch_axis(ax, epochs)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / f"{name}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if any(k.startswith("sigma/") for k in rows[0]):  # an STE run has no noise to draw
        fig, ax = plt.subplots(figsize=(7, 4))
        draw_sigma(ax, rows, epochs)
        fig.tight_layout()
        written.append(out_dir / "sigma.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    pass_keys = [k for k in rows[0] if k.startswith("grad_pass/")]
    norm_keys = [k for k in rows[0] if k.startswith("grad_norm/")]
    if pass_keys or norm_keys:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
        unmeasured = _draw_groups(top, rows, epochs, pass_keys)
        if unmeasured:
            top.text(0.01, 0.02, "not measured (no activation quantiser whose input needs a "
                     "gradient): " + ", ".join(unmeasured), transform=top.transAxes,
                     fontsize="x-small", wrap=True)
        top.set_ylabel("gradient passed (fraction)")
        top.set_ylim(-0.02, 1.02)
        unmeasured = _draw_groups(bottom, rows, epochs, norm_keys)
        if unmeasured:
            bottom.text(0.01, 0.02, "no weights: " + ", ".join(unmeasured),
                        transform=bottom.transAxes, fontsize="x-small", wrap=True)
        bottom.set_yscale("log")
        bottom.set_ylabel("weight gradient norm")
        bottom.set_xlabel("epoch")
        _epoch_axis(bottom, epochs)
        top.set_title("gradient health per ANA group")
        bottom.legend(fontsize="x-small", ncol=2)
        fig.tight_layout()
        written.append(out_dir / "gradient.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description="Redraw a run's plots from its metrics.csv")
    p.add_argument("path", help="run directory or metrics.csv")
    p.add_argument("--out-dir", default=None, help="where to write the PNGs (default: beside)")
    args = p.parse_args(argv)
    path = Path(args.path)
    csv_path = path / "metrics.csv" if path.is_dir() else path
    if not csv_path.is_file():
        sys.exit(f"error: {csv_path} not found")
    for out in plot_metrics(csv_path, args.out_dir):
        print(out)


if __name__ == "__main__":
    main()
