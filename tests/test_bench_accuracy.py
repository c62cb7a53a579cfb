"""benchmarks/bench_accuracy.py on tiny data: its figures are the runs' own, reproduced by the
recipe run directly; it resumes, deduplicates and refuses bad grids."""
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_process

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_accuracy.py"
RECIPE = ROOT / "recipes" / "train_cifar10.py"


def bench(out, data, *grids, check=True, jobs=1, common=""):
    common = (f"data_dir={data} download=false epochs=1 max_steps=3 batch_size=8 "
              "num_workers=0 export=false " + common)
    cmd = [sys.executable, str(BENCH), "--out", str(out), "--common", common, "--jobs", str(jobs)]
    for g in grids:
        cmd += ["--grid", g]
    proc = run_process(cmd, 600, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


@pytest.mark.slow
def test_results_are_the_runs_own_and_reproduce_directly(tiny_cifar, tmp_path):
    out = tmp_path / "bench"
    # cnv_w1a2 is not in the benchmark's documented grid; the recipe's default preset spelt out
    # ("preset=homogeneous") is the same run as "quantiser=ana" and runs once
    grids = ("config=cnv_w1a2 quantiser=ste,ana seed=0,1",
             "config=cnv_w1a2 preset=progressive,homogeneous seed=0")
    # 20 training images held out: the table's validation columns, what settings are chosen on
    proc = bench(out, tiny_cifar, *grids, jobs=2, common="val_split=20")  # 2 at once, 1 thread
    assert "5 runs, 0 already finished, 5 to run (2 at once)" in proc.stdout
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {r["quantiser"] for r in rows} == {"ste", "ana"}
    for r in rows:
        res = json.loads((out / r["run"] / "results.json").read_text())
        assert float(r["test_acc"]) == res["test_acc"] and int(r["steps"]) == 3
        with open(out / r["run"] / "metrics.csv", newline="") as f:
            assert float(r["val_acc"]) == float(list(csv.DictReader(f))[-1]["eval_acc"])
    # the table's mean and std over seeds are those of the rows, test and validation
    ste = [float(r["test_acc"]) for r in rows if r["quantiser"] == "ste"]
    ste_val = [float(r["val_acc"]) for r in rows if r["quantiser"] == "ste"]
    table = (out / "results.md").read_text()
    line = next(x for x in table.splitlines() if x.startswith("| cnv_w1a2 | STE"))
    assert line.startswith(f"| cnv_w1a2 | STE (stock Brevitas) | 2 | {statistics.mean(ste):.2f} +- "
                           f"{statistics.stdev(ste):.2f} |")
    assert f"| {statistics.mean(ste_val):.2f} +- {statistics.stdev(ste_val):.2f} |" in line
    assert "val top-1 (%)" in table.splitlines()[0]
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # one run reproduced by the recipe itself, with the same flags and torch threads (the
    # float sums, and so a 3-step run's test accuracy, depend on the thread count)
    homo = next(r for r in rows if r["preset"] == "homogeneous")
    threads = max(1, (os.cpu_count() or 1) // 2)  # the bench's default with --jobs 2
    direct = tmp_path / "direct"
    subprocess.run([sys.executable, str(RECIPE), "--config",
                    str(ROOT / "recipes/configs/cnv_w1a2.yaml"), "--data-dir", str(tiny_cifar),
                    "--no-download", "--epochs", "1", "--max-steps", "3", "--batch-size", "8",
                    "--num-workers", "0", "--no-export", "--preset", "homogeneous", "--seed", "0",
                    "--val-split", "20",
                    "--output-dir", str(direct)], cwd=ROOT, check=True, capture_output=True,
                   timeout=600, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    assert json.loads((direct / "results.json").read_text())["test_acc"] == \
        float(homo["test_acc"])
    # a second call finds every run finished and runs nothing
    stamp = (out / homo["run"] / "results.json").stat().st_mtime_ns
    proc = bench(out, tiny_cifar, *grids, common="val_split=20")
    assert "5 runs, 5 already finished, 0 to run" in proc.stdout
    assert (out / homo["run"] / "results.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("grid,match", [
    ("config=cnv_w9a9", "cnv_w9a9.yaml does not exist"),
    ("config=cnv_w2a2 preset", "expected key=value"),
    ("config=cnv_w2a2 preset=sync", "--preset: must be one of"),
    ("config=cnv_w2a2 lr=1 lr=2", "given twice"),
])
def test_bad_grids_are_named(grid, match, tmp_path):
    proc = bench(tmp_path / "b", tmp_path, grid, check=False)
    assert proc.returncode != 0 and match in proc.stderr


@pytest.mark.slow
def test_a_grid_run_killed_mid_epoch_resumes_exactly(tiny_cifar, tmp_path):
    """The bench's runs start from a config file with typed overrides; one killed (SIGKILL) in
    its second epoch is resumed by the next call of the bench, bit-identical to a run that was
    never interrupted."""
    common = (f"data_dir={tiny_cifar} download=false epochs=2 batch_size=16 num_workers=0 "
              "export=false lr=0.01 sigma_grad_min=0.6")
    grid = "config=cnv_w2a2 quantiser=ana seed=3"

    def call(out, env=None):
        return run_process([sys.executable, str(BENCH), "--out", str(out), "--common", common,
                            "--grid", grid, "--threads", "1"], 600, cwd=ROOT,
                           env=dict(os.environ, **(env or {})))
    straight = call(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = call(tmp_path / "killed", env={"ANA_RECIPE_KILL_AT_STEP": "10"})
    assert killed.returncode != 0 and "failed (-9)" in killed.stdout + killed.stderr
    resumed = call(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [a] = (tmp_path / "straight").glob("*/*/model.pt")
    [b] = (tmp_path / "killed").glob("*/*/model.pt")
    assert "resumed from" in b.parent.with_name(b.parent.name + ".log").read_text()
    import torch
    sa, sb = torch.load(a), torch.load(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((a.parent / "results.json").read_text())["test_acc"] == \
        json.loads((b.parent / "results.json").read_text())["test_acc"]


def test_a_run_from_before_split_seed_counts_only_where_it_held_out_the_same_images():
    """Runs finished before ``data.split_seed`` drew their held-out images from ``run.seed``: a
    seed-0 run (or one without a split) held out what split seed 0 holds out and stays valid; a
    seed-1 run with a split validated on other images and is redone."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_accuracy
    from brevitas_ana.recipes.config import parse_args, to_dict

    def configs(*argv):
        new = to_dict(parse_args(list(argv)))
        old = json.loads(json.dumps(new))
        del old["data"]["split_seed"]
        return old, new

    for argv, valid in [(["--seed", "0", "--val-split", "20"], True),
                        (["--seed", "1", "--val-split", "0"], True),
                        (["--seed", "1", "--val-split", "20"], False)]:
        old, new = configs(*argv)
        assert bench_accuracy.same_config(old, new) is valid, argv
    old, new = configs("--seed", "1", "--val-split", "20", "--split-seed", "1")
    assert bench_accuracy.same_config(old, new)  # split seed 1 is what run.seed 1 gave


def test_a_run_from_before_crop_pad_stays_valid_only_at_the_default_padding():
    """Runs finished before ``data.crop_pad`` cropped with padding 4: they count for the default
    and not for another padding."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_accuracy
    from brevitas_ana.recipes.config import parse_args, to_dict

    for pad, valid in [("4", True), ("2", False)]:
        new = to_dict(parse_args(["--crop-pad", pad]))
        old = json.loads(json.dumps(new))
        del old["data"]["crop_pad"]
        assert bench_accuracy.same_config(old, new) is valid, pad
        assert bench_accuracy.same_config(new, new)
