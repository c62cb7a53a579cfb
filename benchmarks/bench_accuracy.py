"""Accuracy benchmark: a grid of recipe runs, ANA settings side by side with stock Brevitas STE.

    python benchmarks/bench_accuracy.py --out runs/bench_cpu \\
        --common "data_dir=../shared/data/cifar10 download=false subset=10000 epochs=3 export=false" \\
        --grid "config=cnv_w2a2,cnv_w1a1 quantiser=ste,ana seed=0,1" \\
        --grid "config=cnv_w2a2 preset=homogeneous,progressive backward=exact,floor seed=0"

Each ``--grid`` is a product of axes ``key=v1,v2,...`` over any recipe key (``config`` names a
file of ``recipes/configs`` or a path); ``--common`` settings apply to every run. The runs of all
grids are pooled and deduplicated (a stock-STE run ignores the ANA keys), all at the same budget.
``--jobs N`` runs N at once as separate processes (on one GPU small CNV steps are launch-bound,
so several runs share it well; on a 2-core CPU use 1). A run whose ``results.json`` in ``--out`` holds the same
resolved config (whatever folder it is in) is skipped, so an interrupted benchmark resumes where it
stopped and grids can be added later; a run whose settings changed (e.g. a recipe default) is run
again.

Writes into ``--out``: one folder per run (the recipe's own output), ``results.csv`` (a row per
run), ``results.md`` (mean +- std over seeds per setting, difference to STE of the same config,
training images/s) and ``accuracy.png`` (test accuracy per setting, and the noise-free eval
accuracy over steps of every run).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_cifar10.py"
CONFIGS = ROOT / "recipes" / "configs"
# Keys that only matter with ANA quantisers: a stock-STE run drops them (one STE run per seed).
ANA_KEYS = ("noise", "strategy", "annealed_grad", "sigma", "mu", "preset", "anneal_end",
            "backward", "sigma_grad_min", "groups", "schedules")
# Keys that never change what is trained.
NOT_IN_NAME = ("data_dir", "download", "output_dir", "export", "num_workers", "keep_checkpoints")


def parse_settings(text: str, where: str) -> dict:
    """``"key=a,b other=c"`` -> ``{"key": ["a", "b"], "other": ["c"]}`` (values as YAML)."""
    axes = {}
    for item in text.split():
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SystemExit(f"error: {where}: expected key=value[,value...], got {item!r}")
        key = key.replace("-", "_")
        if key in axes:
            raise SystemExit(f"error: {where}: key {key!r} given twice")
        axes[key] = [yaml.safe_load(v) for v in values.split(",")]
    return axes


def config_path(name) -> Path:
    path = Path(str(name))
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: config: {path} does not exist (known: "
                         f"{sorted(p.stem for p in CONFIGS.glob('*.yaml'))})")
    return path


def runs_of(grids, common: dict):
    """Every run of every grid, deduplicated: [(name, config path, {key: value})]."""
    runs = {}
    for i, grid in enumerate(grids):
        axes = parse_settings(grid, f"--grid {i + 1}")
        axes.setdefault("config", ["cnv_w2a2"])
        keys = list(axes)
        for values in itertools.product(*(axes[k] for k in keys)):
            settings = dict(common)
            settings.update(zip(keys, values))
            if str(settings.get("quantiser", "ana")) == "ste":
                settings = {k: v for k, v in settings.items() if k not in ANA_KEYS}
            config = str(settings.pop("config"))
            named = {k: v for k, v in settings.items() if k not in NOT_IN_NAME
                     and k not in common}
            extra = " ".join(f"{k}={v}" for k, v in sorted(named.items())
                             if k not in ("seed", "quantiser", "preset", "backward", "noise",
                                          "sigma_grad_min"))
            name = f"{Path(config).stem}/" + ("_".join(
                f"{k}-{v}" for k, v in sorted(named.items())) or "default")
            runs[name] = dict(name=name, config=config_path(config), settings=settings,
                              extra=extra, seed=settings.get("seed"))
    return list(runs.values())


def recipe_argv(run, out: Path):
    argv = ["--config", str(run["config"])]
    settings = dict(run["settings"], output_dir=str(out / run["name"]))
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            argv += [flag, "null" if v is None else json.dumps(v) if isinstance(v, list)
                     else str(v)]
    return argv


def resolved_config(argv) -> dict:
    """The recipe's own view of a run's config (defaults and config file included), by
    section, as a run's config.json holds it."""
    from brevitas_ana.recipes.config import ConfigError, parse_args, to_dict
    try:
        return to_dict(parse_args(argv))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def finished(run_dir: Path, config: dict) -> bool:
    path = run_dir / "results.json"
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())["config"]
    except (ValueError, KeyError):
        return False
    return same_config(saved, config)


def same_config(a: dict, b: dict) -> bool:
    """Equal run configs; ``resume`` and ``overwrite`` only say how the run was started, and a
    stock-STE run does not depend on the ANA keys (a changed ANA default leaves it valid)."""
    return _identity(a) == _identity(b)


def run_key(config: dict) -> str:
    """What a run trains, as a string: its config less where it was written."""
    return json.dumps({k: v for k, v in _identity(config).items() if k != "output_dir"},
                      sort_keys=True, default=str)


def _identity(config: dict) -> dict:
    from brevitas_ana.recipes.config import flat, held_out
    # the held-out images, not how they were asked for: a run from before data.split_seed
    # drew them with run.seed; with none held out the split seed means nothing
    split = held_out(config)
    config = flat(config)
    config["val_split"], config["split_seed"] = split
    ignored = ("resume", "overwrite") + (ANA_KEYS if config.get("quantiser") in ("ste", "float")
                                         else ())
    # keys added since (controller groups and schedules, the start from weights, the crop's
    # padding) count only when they are set: runs finished before them stay valid
    unset = {"groups": (None,), "schedules": (None,), "init_from": (None,),
             "calibrate": (None, 0), "norm_correction": (None, False), "crop_pad": (None, 4)}
    return {k: v for k, v in config.items() if k not in ignored
            and not (k in unset and v in unset[k])}


def launch(run, out: Path, threads: int) -> int:
    run_dir = out / run["name"]
    started = run_dir / "config.json"
    if started.is_file() and not same_config(json.loads(started.read_text()), run["resolved"]):
        shutil.rmtree(run_dir)  # a run of other settings (a default changed): start afresh
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    from brevitas_ana.recipes.checkpoint import checkpoints
    # continue a run that saved a checkpoint; replace one that stopped before its first
    start = ["--resume", "latest"] if checkpoints(run_dir) else ["--overwrite"]
    with open(run_dir.with_name(run_dir.name + ".log"), "a") as log:
        return subprocess.call([sys.executable, str(RECIPE)] + run["argv"] + start,
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def row_of(run, run_dir: Path) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
    metrics = read_csv(run_dir / "metrics.csv")
    from brevitas_ana.recipes.config import flat
    cfg = flat(res["config"])
    setting = ("STE (stock Brevitas)" if cfg["quantiser"] == "ste" else
               "float twin" if cfg["quantiser"] == "float" else
               f"ANA {cfg['preset']}, {cfg['backward']}{floor_of(cfg)}, {cfg['noise']}")
    setting += f" {run['extra']}" if run["extra"] else ""
    return {"config": run["config"].stem, "setting": setting, "seed": cfg["seed"],
            "quantiser": cfg["quantiser"],
            "preset": cfg["preset"] if cfg["quantiser"] == "ana" else "",
            "backward": cfg["backward"] if cfg["quantiser"] == "ana" else "",
            "noise": cfg["noise"] if cfg["quantiser"] == "ana" else "",
            "test_acc": res["test_acc"], "steps": res["steps"], "epochs": res["epochs"],
            "best_eval_acc": max(float(r["eval_acc"]) for r in metrics) if metrics else "",
            # the held-out training images' accuracy at the end: what settings are chosen on
            "val_acc": float(metrics[-1]["eval_acc"]) if metrics and cfg.get("val_split") else "",
            "train_images_per_s": res.get("train_images_per_s"),
            "train_time_s": res.get("train_time_s", res.get("wall_time_s")),
            "device": res.get("device"),
            "torch": res.get("versions", {}).get("torch"), "run": run["name"]}


def floor_of(cfg: dict) -> str:
    """`` 0.2887`` (the backward floor, the family's default when null) or ``""`` (exact)."""
    if cfg["backward"] == "exact":
        return ""
    from brevitas_ana.noise import get_noise
    floor = cfg["sigma_grad_min"]
    return f" {get_noise(cfg['noise']).default_sigma if floor is None else floor:.4g}"


def read_csv(path: Path):
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _stats(values):
    mean = statistics.mean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows):
    """[(config, setting, n, mean, std, diff to STE mean, images/s)] of the test accuracy, and
    the same of the validation accuracy (``val_*``, NaN unless every run held out a validation
    split): by config, STE first, then in first-seen order."""
    groups = {}
    configs = list(dict.fromkeys(r["config"] for r in rows))
    for r in sorted(rows, key=lambda r: (configs.index(r["config"]), r["quantiser"] != "ste")):
        groups.setdefault((r["config"], r["setting"], r["quantiser"]), []).append(r)
    def val(rs):
        return [x["val_acc"] for x in rs] if all(x["val_acc"] != "" for x in rs) else None

    ste = {c: statistics.mean(x["test_acc"] for x in rs)
           for (c, s, q), rs in groups.items() if q == "ste"}
    ste_val = {c: statistics.mean(val(rs)) for (c, s, q), rs in groups.items()
               if q == "ste" and val(rs)}
    out = []
    for (config, setting, quantiser), rs in groups.items():
        mean, std = _stats([x["test_acc"] for x in rs])
        val_mean, val_std = _stats(val(rs)) if val(rs) else (math.nan, math.nan)
        speed = [x["train_images_per_s"] for x in rs if x["train_images_per_s"]]
        out.append(dict(config=config, setting=setting, quantiser=quantiser, n=len(rs),
                        mean=mean, std=std,
                        diff=mean - ste[config] if config in ste else math.nan,
                        val_mean=val_mean, val_std=val_std,
                        val_diff=val_mean - ste_val.get(config, math.nan),
                        images_per_s=statistics.mean(speed) if speed else math.nan))
    return out


def markdown(summary, rows) -> str:
    budget = {(r["config"]): (r["steps"], r["epochs"], r["device"], r["torch"]) for r in rows}
    # with a validation split, its columns come last: settings are chosen on them, not on test
    with_val = any(not math.isnan(s["val_mean"]) for s in summary)
    extra = " val top-1 (%) | val vs STE |" if with_val else ""
    lines = ["| config | setting | runs | test top-1 (%) | vs STE (points) | train img/s |" + extra,
             "| --- | --- | --- | --- | --- | --- |" + " --- | --- |" * with_val]

    def vs(s, key):
        return "" if s["quantiser"] == "ste" or math.isnan(s[key]) else f"{s[key]:+.2f}"

    for s in summary:
        line = (f"| {s['config']} | {s['setting']} | {s['n']} | {s['mean']:.2f} +- "
                f"{s['std']:.2f} | {vs(s, 'diff')} | {s['images_per_s']:.0f} |")
        if with_val:
            line += (" |" if math.isnan(s["val_mean"]) else
                     f" {s['val_mean']:.2f} +- {s['val_std']:.2f} |") + f" {vs(s, 'val_diff')} |"
        lines.append(line)
    lines.append("")
    for config, (steps, epochs, device, torch_version) in budget.items():
        lines.append(f"{config}: {steps} steps ({epochs} epochs) per run, device {device}, "
                     f"torch {torch_version}.")
    return "\n".join(lines) + "\n"


def plot(summary, rows, out: Path, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = list(dict.fromkeys(s["config"] for s in summary))
    most = max(sum(s["config"] == c for s in summary) for c in configs)
    fig, axes = plt.subplots(2, len(configs), figsize=(7 * len(configs), 5 + 0.3 * most),
                             squeeze=False, gridspec_kw={"height_ratios": [0.3 * most + 1, 4]})
    for j, config in enumerate(configs):
        mine = [s for s in summary if s["config"] == config]
        ax = axes[0][j]
        ax.barh(range(len(mine)), [s["mean"] for s in mine], xerr=[s["std"] for s in mine],
                color=["gray" if s["quantiser"] == "ste" else "tab:blue" for s in mine])
        for i, s in enumerate(mine):
            accs = [r["test_acc"] for r in rows if r["config"] == config
                    and r["setting"] == s["setting"]]
            ax.plot(accs, [i] * len(accs), "k.", markersize=4)
        ax.set_yticks(range(len(mine)), [s["setting"] for s in mine], fontsize="x-small")
        ax.invert_yaxis()  # the table's order, top to bottom
        ax.set_xlabel("test top-1 (%)")
        ax.set_title(config)
        ax = axes[1][j]
        for r in rows:
            if r["config"] != config:
                continue
            metrics = read_csv(out / r["run"] / "metrics.csv")
            ax.plot([int(m["step"]) for m in metrics], [float(m["eval_acc"]) for m in metrics],
                    marker="o", markersize=3, linewidth=1,
                    color="gray" if r["quantiser"] == "ste" else None,
                    label=f"{r['setting']} s{r['seed']}")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("noise-free eval top-1 (%)")
        ax.legend(fontsize="xx-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_accuracy", help="benchmark folder")
    p.add_argument("--grid", action="append", required=True,
                   help='axes of one grid, e.g. "config=cnv_w2a2 quantiser=ste,ana seed=0,1"')
    p.add_argument("--common", default="", help="settings for every run, e.g. \"epochs=3\"")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (separate processes)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: CPU cores / jobs)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1, got {args.jobs}")
    out = Path(args.out)
    common = {k: v[0] for k, v in parse_settings(args.common, "--common").items()}
    runs = runs_of(args.grid, common)
    # Finished runs in --out, by what they trained: a run is the same whatever grid named it
    # (e.g. the default preset spelt out), so each is run once and found again under its folder.
    done = {}
    for path in sorted(out.glob("*/*/results.json")):
        try:
            saved = json.loads(path.read_text())["config"]
        except (ValueError, KeyError):
            continue
        done.setdefault(run_key(saved), path.parent.relative_to(out).as_posix())
    unique = {}
    for run in runs:
        run["argv"] = recipe_argv(run, out)
        run["resolved"] = resolved_config(run["argv"])
        key = run_key(run["resolved"])
        if key in done:
            run["name"] = done[key]
            run["argv"] = recipe_argv(run, out)
            run["resolved"] = resolved_config(run["argv"])
        unique.setdefault(key, run)
    runs = list(unique.values())
    todo = [r for r in runs if not finished(out / r["name"], r["resolved"])]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run "
          f"({args.jobs} at once) -> {out}")
    if args.dry_run:
        for r in runs:
            print(("  done " if r not in todo else "  todo ") + r["name"])
        return 0
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    failed = []
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), desc="runs") as bar:
        futures = {pool.submit(launch, r, out, threads): r for r in todo}
        for future in as_completed(futures):
            code = future.result()
            if code != 0 or not finished(out / futures[future]["name"],
                                         futures[future]["resolved"]):
                failed.append(futures[future]["name"])
                tqdm.write(f"failed ({code}): {futures[future]['name']}; see "
                           f"{out / (futures[future]['name'] + '.log')}")
            bar.update()
    rows = [row_of(r, out / r["name"]) for r in runs if r["name"] not in failed]
    if not rows:
        raise SystemExit("error: no run finished")
    fields = list(rows[0])
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    (out / "results.md").write_text(markdown(summary, rows))
    plot(summary, rows, out, out / "accuracy.png")
    print(markdown(summary, rows))
    print(f"{out / 'results.csv'}, {out / 'results.md'}, {out / 'accuracy.png'} "
          f"({time.time() - t0:.0f} s)")
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
