"""benchmarks/bench_calibration.py: Brevitas' calibration tools side by side, from a float twin."""
import re
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_calibration  # noqa: E402


def test_the_norm_correction_row_is_the_recipes_start_accuracy(tiny_cifar, tmp_path, capsys,
                                                               monkeypatch):
    """Four rows, one per tool; the norm-correction row is what the recipe's own
    ``--calibrate 2 --norm-correction`` start point measures on the same images; the tools
    change the start (the rows are not all the untouched network's); and the run folder the
    recipe wants is gone afterwards (it was left in /tmp, one per run)."""
    from brevitas_ana.recipes.config import parse_args
    from brevitas_ana.recipes.models import create_model
    from brevitas_ana.recipes.train_cifar10 import build, load_data, make_accelerator, start_point
    torch.manual_seed(0)
    torch.set_num_threads(1)
    twin = create_model("cnv", weight_bit_width=2, act_bit_width=2, quantiser="float")
    twin.train()
    with torch.no_grad():
        for _ in range(3):
            twin(torch.rand(16, 3, 32, 32))
    torch.save(twin.state_dict(), tmp_path / "float.pt")
    config = tmp_path / "ft.yaml"
    shipped = yaml.safe_load((ROOT / "recipes/configs/cnv_w2a2_finetune.yaml").read_text())
    shipped["optim"]["batch_size"] = 16
    config.write_text(yaml.safe_dump(shipped))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    bench_calibration.main(["--config", str(config), "--init-from", str(tmp_path / "float.pt"),
                            "--batches", "2", "--val-split", "40", "--data-dir", str(tiny_cifar)])
    rows = dict(re.findall(r"^\| ([a-z_ +]+) \| ([\d.]+) \|$", capsys.readouterr().out, re.M))
    assert list(rows) == list(bench_calibration.VARIANTS)
    assert list(scratch.iterdir()) == []
    cfg = parse_args(["--config", str(config), "--init-from", str(tmp_path / "float.pt"),
                      "--val-split", "40", "--data-dir", str(tiny_cifar), "--no-download",
                      "--calibrate", "2", "--norm-correction", "--output-dir", str(tmp_path / "r")])
    accelerator, _ = make_accelerator(cfg, tmp_path / "r")
    data = load_data(cfg, accelerator)
    start = start_point(cfg, accelerator, data, build(cfg, accelerator, data, {}, False))
    assert float(rows["norm_correction"]) == round(start["eval_acc"], 2)
    assert len(set(rows.values())) > 1
