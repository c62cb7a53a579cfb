"""benchmarks/bench_time_to_accuracy.py: the curves are the runs' own figures, a run past its
budget is stopped, bnn_pynq's log is read as its trainer writes it, finished entries rerun not."""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_process

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_time_to_accuracy.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_time_to_accuracy as tta  # noqa: E402


def test_bnn_pynq_log_gives_one_point_per_evaluation(tmp_path):
    folder = tmp_path / "bnn_pynq" / "CNV_2W2A_20261205"
    folder.mkdir(parents=True)
    lines = ["2026-12-05 10:00:00,000 Epoch: [1][0/500]\tLoss 1.0",
             "2026-12-05 10:03:00,000 Test: [0/100]\tModel Time 0.1 (0.1)\tLoss 0.5 (0.5)\t"
             "Prec@1 40.000 (40.000)\tPrec@5 90.000 (90.000)\t",
             "2026-12-05 10:03:30,500 Test: [99/100]\tModel Time 0.1 (0.1)\tLoss 0.5 (0.5)\t"
             "Prec@1 50.000 (45.500)\tPrec@5 90.000 (90.000)\t",
             "2026-12-05 10:07:00,000 Test: [99/100]\tModel Time 0.1 (0.1)\tLoss 0.4 (0.4)\t"
             "Prec@1 60.000 (52.250)\tPrec@5 95.000 (95.000)\t"]
    (folder / "log.txt").write_text("\n".join(lines) + "\n")
    import datetime
    start = datetime.datetime(2026, 12, 5, 10, 0, 0).timestamp()
    points = tta.bnn_curve(tmp_path / "bnn_pynq", start)
    assert [(e, round(m, 4), n, a) for e, m, n, a in points] == [
        (1, round(210.5 / 60, 4), 50_000, 45.5), (2, 7.0, 100_000, 52.25)]
    assert tta.best_by(points, 5) == 45.5 and tta.best_by(points, 8) == 52.25
    assert tta.best_by(points, 1) != tta.best_by(points, 1)  # nan: nothing evaluated yet


@pytest.mark.slow
def test_recipe_entries_curves_are_their_metrics(tiny_cifar, tmp_path, monkeypatch):
    out = tmp_path / "tta"
    cmd = [sys.executable, str(BENCH), "--out", str(out), "--bits", "w1a1", "--entries",
           "fast_ste", "long_ana", "--minutes", "0.75", "--data-dir", str(tiny_cifar),
           "--val-split", "20", "--jobs", "2"]
    proc = run_process(cmd, 600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "curves.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for entry in ("fast_ste", "long_ana"):
        with open(out / entry / "metrics.csv", newline="") as f:
            metrics = list(csv.DictReader(f))
        mine = [r for r in rows if r["entry"] == entry]
        assert metrics and len(mine) == len(metrics)
        assert [float(r["accuracy"]) for r in mine] == [float(m["eval_acc"]) for m in metrics]
        assert [int(r["images_seen"]) for r in mine] == [int(m["images_seen"]) for m in metrics]
        minutes = [float(r["minutes"]) for r in mine]
        assert minutes == sorted(minutes) and 0 < minutes[0]
        # the run's console output survives its --overwrite of the entry's folder
        assert "epoch 1/" in (out / f"{entry}.log").read_text()
    # the 20-epoch and the 500-epoch recipe on 100 images: both stopped at 45 s
    long_ana = json.loads((out / "long_ana" / "curve.json").read_text())
    assert long_ana["points"][-1][0] < 500 and long_ana["seconds"] < 0.75 * 60 + 30
    assert "best acc by 0.75 min" in (out / "results.md").read_text()
    assert (out / "time_to_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    again = run_process(cmd, 120, cwd=ROOT)
    assert again.returncode == 0 and json.loads(
        (out / "long_ana" / "curve.json").read_text()) == long_ana  # not run again


def processes_naming(text: str):
    """PIDs whose command line holds ``text`` (Linux's /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass  # ended meanwhile
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads Linux's /proc")
def test_sigterm_stops_the_entries_and_keeps_nothing_half_done(tiny_cifar, tmp_path):
    """The entries run in process sessions of their own (for the budget's SIGTERM to reach
    bnn_pynq's loader workers), so a stopped benchmark must stop them itself: they used to
    train on for the whole budget after Ctrl-C."""
    out = tmp_path / "tta"
    bench = subprocess.Popen(
        [sys.executable, str(BENCH), "--out", str(out), "--bits", "w1a1", "--entries",
         "long_ana", "fast_ana", "--minutes", "10", "--data-dir", str(tiny_cifar),
         "--val-split", "20", "--jobs", "2"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while len(processes_naming(f"{out}/")) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert len(processes_naming(f"{out}/")) == 2, "the two entries never started"
    time.sleep(3)
    bench.send_signal(signal.SIGTERM)
    _, err = bench.communicate(timeout=120)
    assert bench.returncode != 0 and "interrupted" in err
    deadline = time.time() + 60
    while processes_naming(f"{out}/") and time.time() < deadline:
        time.sleep(0.5)
    assert processes_naming(f"{out}/") == []
    assert not list(out.glob("*/curve.json"))  # nothing recorded as finished
