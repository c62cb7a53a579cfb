"""The CIFAR-10 recipe end to end on a tiny CIFAR-format data set built by the test."""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import run_process

import brevitas_ana

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_cifar10.py"

from brevitas_ana.recipes.config import (ConfigError, RecipeConfig, flat,  # noqa: E402
                                         parse_args, to_dict)

CONFIGS = ROOT / "recipes" / "configs"

QUICK = ["--batch-size", "16", "--num-workers", "0"]


def run(args, env=None, launcher=None, check=True, timeout=600):
    cmd = (launcher or [sys.executable, str(RECIPE)]) + [str(a) for a in args]
    proc = run_process(cmd, timeout, cwd=ROOT, env=dict(os.environ, **(env or {})))
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- configuration --------------------------------------------------------------------------

def test_default_is_cnv_w2a2_with_ana():
    cfg = parse_args([])
    assert (cfg.model.name, cfg.model.weight_bit_width, cfg.model.act_bit_width,
            cfg.model.quantiser, cfg.ana.preset, cfg.data.data_dir) == ("cnv", 2, 2, "ana",
                                                                         "homogeneous", "./data")
    # the measured best ANA setting (docs/accuracy.md, "The defaults")
    assert (cfg.ana.backward, cfg.ana.sigma_grad_min, cfg.ana.sigma, cfg.ana.anneal_end) == (
        "floor", 0.5774, None, 0.7)
    # the cnv_w2a2 file states the defaults in full (the ana section: the library's)
    assert to_dict(parse_args(["--config", str(CONFIGS / "cnv_w2a2.yaml")])) == to_dict(cfg)


def test_a_controller_built_with_no_options_anneals_like_the_default_recipe():
    """The README's controller snippet (no options) and the default recipe's controller (built by
    the recipe itself, from the shipped cnv_w2a2 file) give every quantiser the same noise,
    backward floor and policy at every step."""
    from brevitas_ana.recipes.models import create_model, model_spec
    from brevitas_ana.recipes.train_cifar10 import build
    cfg = parse_args(["--config", str(CONFIGS / "cnv_w2a2.yaml"), "--epochs", "3"])
    assert cfg.ana.options() == brevitas_ana.AnaConfig()  # the section carries the library's
    steps_per_epoch = 7
    data = SimpleNamespace(resident=False, train_dl=[None] * steps_per_epoch, eval_dl=[],
                           test_dl=[])
    accelerator = Accelerator(cpu=True)
    recipe = build(cfg, accelerator, data, plan={}, resuming=False).annealing.controller
    spec = model_spec(cfg.model, brevitas_ana.AnaConfig())
    torch.manual_seed(0)
    library = brevitas_ana.AnaController(create_model(spec["name"], **spec["kwargs"]),
                                         total_steps=3 * steps_per_epoch,
                                         example_input=torch.rand(2, 3, 32, 32))
    assert (recipe.preset, recipe.anneal_end, recipe.backward, recipe.sigma0, recipe.mu0,
            recipe.sigma_grad_min) == (library.preset, library.anneal_end, library.backward,
                                       library.sigma0, library.mu0, library.sigma_grad_min)
    assert list(recipe.groups) == list(library.groups) and len(recipe.groups) == 10  # input + 9 layers
    seen = set()
    for step in range(3 * steps_per_epoch + 1):
        a, b = recipe.sigmas(), library.sigmas()
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-15) for k in a), step
        assert recipe.grad_sigmas() == pytest.approx(library.grad_sigmas(), rel=1e-12)
        seen.add(round(next(iter(a.values())), 6))
        recipe.step()
        library.step()
    # the schedule really moved: from the starting noise down to zero (noise-free at the end)
    assert max(seen) == pytest.approx(round(brevitas_ana.get_noise("uniform").default_sigma, 6))
    assert min(seen) == 0.0 and len(seen) > 10
    policies = {(m.backward, m.noise, m.strategy) for c in (recipe, library)
                for _, m in brevitas_ana.ana_quantizers(c.model)}
    assert policies == {("floor", "uniform", "expectation")}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_loads_and_ste_changes_only_the_quantiser(path):
    ana = flat(parse_args(["--config", str(path)]))
    ste = flat(parse_args(["--config", str(path), "--quantiser", "ste"]))
    assert ana["quantiser"] == "ana" and ste["quantiser"] == "ste"
    assert {k: v for k, v in ana.items() if k != "quantiser"} == \
        {k: v for k, v in ste.items() if k != "quantiser"}


def test_configs_compose():
    """A CNV file states only what differs from the defaults; files given later win."""
    w1a1 = flat(parse_args(["--config", str(CONFIGS / "cnv_w1a1.yaml")]))
    w2a2 = flat(parse_args([]))
    assert {k for k in w1a1 if w1a1[k] != w2a2[k]} == {"weight_bit_width", "act_bit_width",
                                                         "output_dir"}
    assert len(yaml.safe_load((CONFIGS / "cnv_w1a1.yaml").read_text())) == 2
    both = flat(parse_args(["--config", str(CONFIGS / "vgg8_ternary.yaml"), "--config",
                            str(CONFIGS / "cnv_w1a1.yaml")]))
    assert (both["model"], both["weight_bit_width"], both["lr"], both["output_dir"]) == (
        "vgg8", 1, 0.001, "runs/cnv_w1a1")


def test_overrides_are_typed_flat_and_by_section():
    cfg = parse_args(["--lr", "1e-3", "--epochs", "3", "--clip-weights", "null",
                      "--lr-milestones", "[2, 5]", "--no-export", "--output-dir", "x/y",
                      "--model", "vgg8", "--no-download"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.epochs == 3 and cfg.optim.clip_weights is None
    assert cfg.optim.lr_milestones == [2, 5] and cfg.run.export is False
    assert cfg.run.output_dir == "x/y" and cfg.model.name == "vgg8" and cfg.data.download is False
    same = parse_args(["--optim.lr", "1e-3", "--optim.epochs=3", "--optim.clip_weights", "null",
                       "--optim.lr_milestones", "[2, 5]", "--run.export", "false",
                       "--run.output_dir", "x/y", "--model.name", "vgg8", "--data.download",
                       "false"])
    assert to_dict(same) == to_dict(cfg)


def test_groups_and_schedules_in_yaml(tmp_path):
    path = tmp_path / "groups.yaml"
    path.write_text(yaml.safe_dump({"ana": {
        "groups": {"stem": ["conv_features.0", "conv_features.1"], "rest": ["*"]},
        "schedules": {"*": {"sigma": {"name": "cosine", "t_start": 0, "t_end": 3}}}}}))
    cfg = parse_args(["--config", str(path)])
    assert cfg.ana.groups == {"stem": ["conv_features.0", "conv_features.1"], "rest": ["*"]}
    assert cfg.ana.schedules["*"]["sigma"]["name"] == "cosine"


def test_vgg8_paper_setting():
    cfg = parse_args(["--config", str(CONFIGS / "vgg8_ternary.yaml"),
                      "--preset", "homogeneous", "--noise", "logistic"])
    o = cfg.optim
    assert (o.optimizer, o.lr, o.batch_size, o.epochs, o.lr_milestones, o.lr_gamma) == (
        "adam", 1e-3, 256, 500, [400], 0.1)
    assert (cfg.ana.preset, cfg.ana.noise) == ("homogeneous", "logistic")


@pytest.mark.parametrize("argv,match", [
    (["--preset", "sync"], r"^--preset: must be one of \['homogeneous'.*got sync"),
    (["--noise", "gauss"], r"^--noise: unknown noise family 'gauss'"),
    (["--epochs", "0"], r"^--epochs: must be an integer > 0, got 0"),
    (["--epochs", "-1"], r"^--epochs: must be an integer > 0, got -1"),
    (["--optim.epochs", "two"], r"^--optim.epochs: must be an integer > 0, got two"),
    (["--lr", "fast"], r"^--lr: must be a number >= 0, got fast"),
    (["--config", "nowhere.yaml"], "nowhere.yaml does not exist"),
    (["--anneal-end", "0"], r"^--anneal-end: must be in \(0, 1\]"),
    (["--anneal-end", "1.5"], r"^--anneal-end: must be in \(0, 1\]"),
    (["--backward", "smooth"], r"^--backward: must be one of"),
    (["--sigma-grad-min", "-0.1"], r"^--sigma-grad-min: must be >= 0 .*got -0.1"),
    (["--sigma-grad-min", "nan"], r"^--sigma-grad-min: must be a number or null, got nan"),
    (["--sigma-grad-min", "inf"], r"^--sigma-grad-min: must be a number or null, got inf"),
    (["--ana.sigma", "-2"], r"^--ana.sigma: must be >= 0 .*got -2"),
    (["--mu", "inf"], r"^--mu: must be a number, got inf"),
    (["--model", "vgg9"], r"^--model: must be one of \['cnv', 'resnet18', 'vgg8'\]"),
    (["--crop-pad", "17"], r"^--crop-pad: must be in \[0, 16\] \(pixels\), got 17"),
    (["--data.crop_pad", "-1"], r"^--data.crop_pad: must be an integer >= 0, got -1"),
])
def test_bad_values_name_the_field(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


def test_bad_value_in_a_config_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"ana": {"anneal_end": 2.0}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: ana.anneal_end: must be in"):
        parse_args(["--config", str(bad)])
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        parse_args(["--config", str(bad)])


def test_unknown_keys_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"optim": {"learning_rate": 0.1}}))
    with pytest.raises(ConfigError,
                       match=r"bad.yaml: .*'optim' does not accept .*'learning_rate'"):
        parse_args(["--config", str(bad)])
    # a file in the flat format of earlier releases: where each key goes now
    bad.write_text(yaml.safe_dump({"model": "cnv", "epochs": 3}))
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['epochs', 'model'\].*"
                                          r"epochs under optim:"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match="unrecognized arguments: --epoch 3"):
        parse_args(["--epoch", "3"])


def test_every_yaml_key_is_a_config_field():
    for path in CONFIGS.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        for section, keys in data.items():
            assert set(keys) <= set(to_dict(RecipeConfig())[section]), (path, section)


# --- data errors -----------------------------------------------------------------------------

def main_error(argv) -> str:
    """The one-line error the recipe's main() exits with (in-process)."""
    from brevitas_ana.recipes import train_cifar10
    with pytest.raises(SystemExit) as exit_:
        train_cifar10.main([str(a) for a in argv])
    assert isinstance(exit_.value.code, str) and "\n" not in exit_.value.code
    return exit_.value.code


def test_missing_data_is_a_clear_error(tmp_path):
    error = main_error(["--data-dir", tmp_path / "empty", "--no-download", "--output-dir",
                        tmp_path / "run"] + QUICK)
    assert "CIFAR-10 not found in" in error and "cifar-10-batches-py" in error


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_a_second_run_never_destroys_the_first(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    args = ["--data-dir", tiny_cifar, "--epochs", "1", "--max-steps", "2", "--no-export",
            "--output-dir", out] + QUICK
    run(args)
    before = snapshot(out)
    error = main_error(args)  # the same command again
    assert error.startswith(f"error: --output-dir: {out} is not empty (accuracy.png, checkpoints/")
    assert "--resume latest" in error and "--overwrite" in error
    assert snapshot(out) == before
    # a launch that fails after the check (data missing) leaves the run byte for byte as it was
    main_error(["--data-dir", tmp_path / "nodata", "--no-download", "--output-dir", out,
                "--resume", "latest"] + QUICK)
    assert snapshot(out) == before
    assert not (tmp_path / "nodata").exists()
    # --overwrite replaces it, and says what it removed
    proc = run(args + ["--overwrite", "--seed", "1"])
    assert "--overwrite: removed accuracy.png, checkpoints/, config.json" in proc.stderr
    assert json.loads((out / "config.json").read_text())["run"]["seed"] == 1
    assert "--resume and --overwrite exclude" in main_error(args + ["--overwrite", "--resume",
                                                                      "latest"])


def test_a_failed_start_writes_nothing(tmp_path):
    main_error(["--data-dir", tmp_path / "nodata", "--no-download", "--output-dir",
                tmp_path / "run"] + QUICK)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_corrupt_batch_is_named(tiny_cifar, tmp_path):
    (tiny_cifar / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    error = main_error(["--data-dir", tiny_cifar, "--output-dir", tmp_path / "run"] + QUICK)
    assert "data_batch_3 is not a readable CIFAR-10 batch" in error


# --- end to end ------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_run_writes_everything(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    proc = run(["--data-dir", tiny_cifar, "--epochs", "2", "--preset", "progressive",
                "--output-dir", out] + QUICK)
    # a log that is not a terminal: every epoch line on a line of its own, no bar fragments
    log = proc.stderr.replace("\r", "\n")
    assert len(re.findall(r"^(\[RANK 0\] )?epoch [12]/2: train loss", proc.stderr, re.M)) == 2
    assert "it/s]" not in log
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 2 and results["world_size"] == 1 and results["ranks_agree"]
    assert 0 <= results["test_acc"] <= 100 and results["train_images_per_s"] > 0
    assert set(results["versions"]) >= {"torch", "brevitas", "brevitas_ana", "accelerate"}
    table = rows(out)
    assert [int(r["epoch"]) for r in table] == [1, 2]
    sigma_cols = [k for k in table[0] if k.startswith("sigma/")]
    assert len(sigma_cols) == 10  # CNV: input quantiser + 9 layers
    assert float(table[0][sigma_cols[0]]) < float(table[0][sigma_cols[-1]])  # progressive
    assert all(float(table[-1][k]) == 0.0 for k in sigma_cols)  # annealed by the end
    assert {"train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "images_per_s"} <= set(
        table[0])
    # time-to-accuracy columns: cumulative images (7 steps x 16 per epoch) and seconds
    assert [int(r["images_seen"]) for r in table] == [112, 224]
    assert 0 < float(table[0]["train_s"]) < float(table[1]["train_s"])
    # gradient health per group: fractions in [0, 1] (nan for the input quantiser, whose input
    # needs no gradient), positive weight-gradient norms (nan for the input group: no weights)
    groups = [k.split("/", 1)[1] for k in sigma_cols]
    for r in table:
        passes = [float(r[f"grad_pass/{g}"]) for g in groups]
        norms = [float(r[f"grad_norm/{g}"]) for g in groups]
        assert math.isnan(passes[0]) and math.isnan(norms[0])
        assert all(0 < p <= 1 for p in passes[1:-1]) and all(n > 0 for n in norms[1:])
        # backward floor: the backward noise never falls below the family's starting noise
        assert all(float(r[f"sigma_b/{g}"]) >= 0.2886 for g in groups)
    assert list(out.rglob("events.out.tfevents.*"))  # TensorBoard (the dev extra has it)
    for png in ("accuracy.png", "loss.png", "sigma.png", "sigma_schedule.png", "gradient.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # accelerate's automatic naming, each folder marked complete once fully written
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_1",
                                                                        "checkpoint_2"]
    assert all((out / "checkpoints" / f"checkpoint_{i}" / "COMPLETE").is_file() for i in (1, 2))
    export = results["export"]
    assert export["passed"] and json.loads(Path(export["report"]).read_text())["passed"]
    assert all(Path(export[fmt]).stat().st_size > 1000 for fmt in ("qonnx", "qcdq", "int"))
    state = torch.load(out / "model.pt")
    assert any(k.endswith("weight") for k in state)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cnv_w1a1", "vgg8_ternary", "resnet18_w4a4"])
@pytest.mark.parametrize("quantiser", ["ana", "ste"])
def test_every_recipe_trains_a_few_steps(config, quantiser, tiny_cifar, tmp_path):
    out = tmp_path / "run"
    run(["--config", ROOT / "recipes/configs" / f"{config}.yaml", "--data-dir", tiny_cifar,
         "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--num-workers", "0",
         "--quantiser", quantiser, "--no-export", "--output-dir", out])
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and results["config"]["model"]["quantiser"] == quantiser
    has_sigma = any(k.startswith("sigma/") for k in rows(out)[0])
    assert has_sigma == (quantiser == "ana")


@pytest.mark.slow
def test_bf16_mixed_precision_on_cpu(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    run(["--data-dir", tiny_cifar, "--epochs", "1", "--max-steps", "3", "--mixed-precision",
         "bf16", "--no-export", "--output-dir", out] + QUICK)
    results = json.loads((out / "results.json").read_text())
    assert results["mixed_precision"] == "bf16" and results["steps"] == 3
    assert all(float(v) == float(v) for k, v in rows(out)[0].items() if "loss" in k)  # no NaN


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(workers, tiny_cifar, tmp_path):
    args = ["--data-dir", tiny_cifar, "--epochs", "3", "--no-export", "--batch-size", "16",
            "--num-workers", str(workers)]
    run(args + ["--output-dir", tmp_path / "straight"])
    out = tmp_path / "killed"
    # 7 steps per epoch: step 10 is in the middle of epoch 2
    proc = run(args + ["--output-dir", out], env={"ANA_RECIPE_KILL_AT_STEP": "10"}, check=False)
    assert proc.returncode == -9
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint_1"]
    epoch1 = (out / "checkpoints" / "checkpoint_1" / "model.safetensors").read_bytes()
    # the checkpoint that survived the kill is complete: every tensor of the model, readable
    from safetensors.torch import load as load_safetensors
    epoch1 = load_safetensors(epoch1)
    # a run killed while saving leaves a folder without the COMPLETE marker: never loaded
    half = out / "checkpoints" / "checkpoint_2"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half written")
    proc = run(args + ["--output-dir", out, "--resume", "latest"])
    log = proc.stdout + proc.stderr
    assert f"removed {half}: written only in part" in log
    assert f"resumed from {out / 'checkpoints' / 'checkpoint_1'} at epoch 1" in log
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert (b["epochs"], b["steps"]) == (a["epochs"], a["steps"]) == (3, 21)
    assert b["test_acc"] == pytest.approx(a["test_acc"], abs=1e-9)
    sa, sb = torch.load(tmp_path / "straight" / "model.pt"), torch.load(out / "model.pt")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [int(r["epoch"]) for r in rows(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint_2", "checkpoint_3"]  # keep_checkpoints=2: accelerate rotated the first
    assert epoch1.keys() == sb.keys()
    assert any(not torch.equal(epoch1[k], sb[k]) for k in sb)  # epoch 1, not the end state


def load_every_checkpoint_file(run_dir: Path) -> int:
    """Load every .bin / .pkl file of every checkpoint as accelerate's resume does
    (``torch.load(weights_only=True)`` with only accelerate's own safe globals); how many."""
    from accelerate.utils import load
    files = [p for p in (run_dir / "checkpoints").rglob("*") if p.suffix in (".bin", ".pkl")]
    for path in files:
        load(path, map_location="cpu")
    return len(files)


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_a_run_from_each_shipped_config_resumes_after_sigkill_and_extends(config, tiny_cifar,
                                                                           tmp_path):
    """As users start: --config FILE with typed command-line overrides (values jsonargparse
    types as PositiveInt / NonNegativeFloat), killed mid-epoch, resumed: bit-identical to the
    run that was never interrupted; every checkpoint file loads weights_only; then extended."""
    args = ["--config", CONFIGS / f"{config}.yaml", "--data-dir", tiny_cifar, "--no-download",
            "--epochs", "2", "--batch-size", "16", "--num-workers", "0", "--no-export",
            "--lr", "0.004", "--optim.weight_decay", "0.0001", "--keep-checkpoints", "3",
            "--sigma-grad-min", "0.6"]
    if config.endswith("_finetune"):  # it starts from its float twin's run, made first
        fast = config.replace("_finetune", "_fast")
        run(args[:1] + [CONFIGS / f"{fast}.yaml"] + args[2:] +
            ["--quantiser", "float", "--output-dir", tmp_path / "float"])
        args += ["--init-from", tmp_path / "float"]
    run(args + ["--output-dir", tmp_path / "straight"])
    out = tmp_path / "killed"
    # 7 steps per epoch: step 10 is in the middle of epoch 2
    proc = run(args + ["--output-dir", out], env={"ANA_RECIPE_KILL_AT_STEP": "10"}, check=False)
    assert proc.returncode == -9 and [p.name for p in (out / "checkpoints").iterdir()] == [
        "checkpoint_1"]
    assert load_every_checkpoint_file(out) >= 3  # optimiser, RNG, progress, scheduler (...)
    if config.endswith("_finetune"):  # a resume continues the run: it reads --init-from no more
        (tmp_path / "float").rename(tmp_path / "float_elsewhere")
    run(args + ["--output-dir", out, "--resume", "latest"])
    a = json.loads((tmp_path / "straight" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert b["init_from"] == a["init_from"] and b["start"] == a["start"]
    if config.endswith("_finetune"):
        assert a["init_from"]["path"] == str(tmp_path / "float" / "model.pt")
        assert a["start"]["eval_acc"] >= 0 and a["start"]["calibration_images"] == 0
        (tmp_path / "float_elsewhere").rename(tmp_path / "float")
    assert (b["epochs"], b["steps"]) == (a["epochs"], a["steps"]) == (2, 14)
    assert b["test_acc"] == a["test_acc"]
    sa, sb = torch.load(tmp_path / "straight" / "model.pt"), torch.load(out / "model.pt")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b["config"]["optim"]["lr"] == 0.004 and b["config"]["run"]["keep_checkpoints"] == 3
    assert load_every_checkpoint_file(out) >= 6
    # the finished run extended by an epoch
    extend = args + ["--output-dir", out, "--resume", "latest", "--epochs", "3"]
    schedule = parse_args(args).optim.lr_schedule
    if schedule in ("cosine", "onecycle"):  # shaped by the run's length
        assert f"lr_schedule {schedule} cannot change its length" in main_error(extend)
    else:
        run(extend)
        assert json.loads((out / "results.json").read_text())["epochs"] == 3
        assert [int(r["epoch"]) for r in rows(out)] == [1, 2, 3]


@pytest.mark.slow
def test_resume_errors(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    error = main_error(["--data-dir", tiny_cifar, "--output-dir", out, "--resume", "latest"]
                       + QUICK)
    assert error == f"error: --resume: no checkpoint in {out / 'checkpoints'}"
    error = main_error(["--data-dir", tiny_cifar, "--output-dir", out, "--resume",
                        tmp_path / "weights.pth"] + QUICK)
    assert error.startswith(f"error: --resume: {tmp_path / 'weights.pth'} is not a checkpoint "
                            f"directory")
    run(["--data-dir", tiny_cifar, "--epochs", "2", "--no-export", "--output-dir", out] + QUICK)
    # resuming a finished run trains nothing more and keeps its training figures
    before = json.loads((out / "results.json").read_text())
    run(["--data-dir", tiny_cifar, "--epochs", "2", "--no-export", "--output-dir", out,
         "--resume", "latest"] + QUICK)
    after = json.loads((out / "results.json").read_text())
    assert after["train_time_s"] == before["train_time_s"] > 0
    assert after["train_images_per_s"] == before["train_images_per_s"] > 0
    assert after["test_images"] == 40 and after["steps"] == before["steps"]
    # a resume validating on other images than the run did: refused, naming the run's split
    error = main_error(["--data-dir", tiny_cifar, "--output-dir", out, "--resume", "latest",
                        "--val-split", "20", "--split-seed", "1"] + QUICK)
    assert error == (f"error: --resume: {out} was trained with data.val_split 0, this command "
                     f"asks for data.val_split 20, split seed 1: its validation figures would "
                     f"mix two sets of images. Resume with --val-split 0")
    proc = run(["--config", ROOT / "recipes/configs/vgg8_ternary.yaml", "--data-dir", tiny_cifar,
                "--output-dir", tmp_path / "other", "--resume", out, "--epochs", "2"] + QUICK,
               check=False)
    assert proc.returncode != 0 and "resume: cannot load" in proc.stderr and "vgg8" in proc.stderr
    # every file is checked before anything is loaded; the error names the file and the
    # newest checkpoint that is usable
    newest = out / "checkpoints" / "checkpoint_2"
    states = (newest / "random_states_0.pkl").read_bytes()
    (newest / "random_states_0.pkl").write_bytes(states[:len(states) // 2])  # truncated
    resume = ["--data-dir", tiny_cifar, "--output-dir", out, "--resume", "latest", "--epochs",
              "3", "--no-export"] + QUICK
    error = main_error(resume)
    assert f"{newest / 'random_states_0.pkl'} is unreadable" in error
    assert f"the newest usable checkpoint is {out / 'checkpoints' / 'checkpoint_1'}" in error
    (newest / "random_states_0.pkl").write_bytes(states)
    (newest / "model.safetensors").write_bytes(b"garbage")
    assert f"{newest / 'model.safetensors'} is unreadable" in main_error(resume)
    (newest / "optimizer.bin").unlink()
    assert f"{newest / 'optimizer.bin'} is missing" in main_error(resume)


@pytest.mark.slow
def test_two_cpu_processes_agree(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", str(RECIPE)]
    run(["--data-dir", tiny_cifar, "--epochs", "2", "--batch-size", "8", "--num-workers", "0",
         "--no-export", "--output-dir", out], env={"ACCELERATE_USE_CPU": "1"}, launcher=launcher)
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["ranks_agree"] is True
    assert results["steps"] == 2 * 7  # 120 images / (8 per batch x 2 ranks), per epoch
    # the schedule is timed in per-process steps, so it ends exactly with the run
    last = rows(out)[-1]
    assert all(float(v) == 0.0 for k, v in last.items() if k.startswith("sigma/"))
    assert float(rows(out)[0]["sigma/linear_features.6"]) > 0


@pytest.mark.slow
def test_plot_cli_redraws(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    run(["--data-dir", tiny_cifar, "--epochs", "1", "--max-steps", "2", "--no-export",
         "--output-dir", out] + QUICK)
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "plot.py"), str(out),
                           "--out-dir", str(tmp_path / "plots")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "accuracy.png", "gradient.png", "loss.png", "sigma.png"]


def test_recipe_help_shows_every_key_with_its_meaning_and_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key, value in flat(RecipeConfig()).items():
        section = to_dict(RecipeConfig())
        flag = next(f"--{s}.{'name' if key == 'model' else key}" for s in section
                    if ("name" if key == "model" else key) in section[s])
        assert flag in text, flag
    assert "training epochs (type: PositiveInt, default: 500)" in text
    assert "noise family" in text and "default: uniform" in text
    # the flat flags users type, each listed (not "..."), and --model as a network's name
    for flag in ("--subset", "--quantiser", "--no-export", "--data-dir", "--output-dir",
                 "--resume", "--epochs", "--no-download"):
        assert f" {flag}," in text or f" {flag}." in text, flag
    assert "--model NAME the network: --model NAME is --model.name NAME" in text
    assert "Path to a configuration file" not in text


@pytest.mark.slow
def test_a_finished_run_can_be_extended(tiny_cifar, tmp_path):
    """--resume latest --epochs N on a finished run: the annealing keeps its planned end, the
    added epochs train noise-free; a changed schedule is a short error naming the field."""
    out = tmp_path / "run"
    base = ["--data-dir", tiny_cifar, "--no-export", "--output-dir", out] + QUICK
    run(base + ["--epochs", "2"])
    planned = [float(r["sigma/conv_features.0"]) for r in rows(out)]
    error = main_error(base + ["--epochs", "3", "--resume", "latest", "--preset", "progressive"])
    assert "preset (saved 'homogeneous', here 'progressive')" in error and len(error) < 400
    proc = run(base + ["--epochs", "3", "--resume", "latest"])
    assert "the annealing keeps its planned end" in proc.stderr
    table = rows(out)
    assert [int(r["epoch"]) for r in table] == [1, 2, 3]
    assert [float(r["sigma/conv_features.0"]) for r in table[:2]] == planned
    assert all(float(v) == 0.0 for k, v in table[2].items() if k.startswith("sigma/"))
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 3 and results["steps"] == 3 * 7


def test_flat_booleans_take_a_value_or_none():
    assert parse_args(["--download", "false"]).data.download is False
    assert parse_args(["--download=false"]).data.download is False
    assert parse_args(["--no-download"]).data.download is False
    assert parse_args(["--export", "--download", "no"]).run.export is True
    cfg = parse_args(["--overwrite", "--epochs", "3"])  # a flag's own value is not swallowed
    assert cfg.run.overwrite is True and cfg.optim.epochs == 3
    with pytest.raises(ConfigError, match="--download: must be true or false, got 1"):
        parse_args(["--download", "1"])


def test_values_past_the_config_boundary_are_plain_python():
    """jsonargparse types values as PositiveInt, NonNegativeFloat...; whatever reaches torch
    (optimiser, scheduler, checkpoints) must be int / float / str / list / dict, or accelerate's
    weights_only loading refuses it."""
    cfg = parse_args(["--config", str(CONFIGS / "vgg8_ternary.yaml"), "--lr", "0.01",
                      "--optim.lr_milestones", "[3, 4]", "--sigma-grad-min", "0.5",
                      "--groups", '{"a": ["*"]}'])

    def kinds(value):
        if isinstance(value, dict):
            return set().union(*(kinds(k) | kinds(v) for k, v in value.items()))
        if isinstance(value, list):
            return set().union(set(), *(kinds(v) for v in value))
        return {type(value)}
    assert kinds(to_dict(cfg)) <= {int, float, str, bool, type(None)}
    assert type(cfg.optim.epochs) is int and type(cfg.optim.lr) is float
    assert [type(m) for m in cfg.optim.lr_milestones] == [int, int]


def test_output_dir_that_cannot_be_a_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = ["--data-dir", tmp_path / "nodata", "--no-download"] + QUICK
    assert main_error(args + ["--output-dir", blocker]) == \
        f"error: --output-dir: {blocker} is a file, not a folder"
    assert main_error(args + ["--output-dir", blocker / "run"]) == \
        f"error: --output-dir: {blocker} is a file, so {blocker / 'run'} cannot be created"
    assert blocker.read_text() == "x" and sorted(tmp_path.iterdir()) == [blocker]


def test_subset_cuts_only_the_training_images(tiny_cifar):
    from brevitas_ana.recipes.data import datasets
    train, evaluation, test = datasets(tiny_cifar, False, subset=10)
    assert (len(train), len(evaluation), len(test)) == (10, 40, 40)
    train, evaluation, test = datasets(tiny_cifar, False, val_split=20, subset=10)
    assert (len(train), len(evaluation), len(test)) == (10, 20, 40)


def test_sigma_plot_is_readable_after_one_epoch(tmp_path):
    """One epoch: markers (not a lone invisible point), integer epoch axis with half an epoch of
    margin, symmetric-log sigma with the noise-free zero marked, input side labelled first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from brevitas_ana.recipes.plot import draw_sigma, plot_metrics
    rows = [{"epoch": "1", "sigma/conv_features.0": "0.02", "sigma/linear_features.9": "0.0"}]
    fig, ax = plt.subplots()
    draw_sigma(ax, rows, [1.0])
    assert ax.get_yscale() == "symlog" and ax.get_xlim() == (0.5, 1.5)
    lines = ax.get_lines()
    assert all(line.get_marker() == "o" for line in lines[:2])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "input side: conv_features.0" and "0: noise-free" in labels
    plt.close(fig)
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,train_acc,eval_acc,train_loss,eval_loss,sigma/a\n1,10,11,2,2,0.1\n")
    assert {p.name for p in plot_metrics(csv_path)} == {"accuracy.png", "loss.png", "sigma.png"}
    # an STE run has no noise: no empty sigma plot
    (tmp_path / "ste").mkdir()
    ste = tmp_path / "ste" / "metrics.csv"
    ste.write_text("epoch,train_acc,eval_acc,train_loss,eval_loss\n1,10,11,2,2\n")
    assert {p.name for p in plot_metrics(ste)} == {"accuracy.png", "loss.png"}


def test_gradient_plot_names_the_groups_it_cannot_measure(tmp_path, monkeypatch):
    import matplotlib.axes
    from brevitas_ana.recipes.plot import plot_metrics
    texts = []
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, s, **kw: texts.append(s))
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,train_acc,eval_acc,train_loss,eval_loss,sigma/in,sigma/c1,"
                        "grad_pass/in,grad_norm/in,grad_pass/c1,grad_norm/c1\n"
                        "1,10,11,2,2,0.1,0.1,nan,nan,0.9,0.5\n2,10,11,2,2,0,0,nan,nan,0.8,0.4\n")
    assert "gradient.png" in {p.name for p in plot_metrics(csv_path)}
    assert texts == ["not measured (no activation quantiser whose input needs a gradient): in",
                     "no weights: in"]


def test_model_spec_records_the_whole_ana_config_and_rebuilds_it():
    """The spec beside every set of weights holds the run's AnaConfig whole (not a hand-picked
    part of it); the network rebuilt from it has quantisers with exactly those options."""
    import dataclasses
    import brevitas_ana
    from brevitas_ana.recipes.models import create_model, model_spec
    cfg = parse_args(["--config", str(CONFIGS / "cnv_w1a2.yaml"), "--noise", "normal",
                      "--strategy", "mode", "--backward", "exact", "--sigma-grad-min", "0.3",
                      "--mu", "0.25"])
    spec = json.loads(json.dumps(model_spec(cfg.model, cfg.ana.options())))  # as written
    assert spec["name"] == "cnv" and spec["kwargs"]["weight_bit_width"] == 1
    assert spec["kwargs"]["ana"] == dataclasses.asdict(cfg.ana.options())
    model = create_model(spec["name"], **spec["kwargs"])
    options = {(m.noise, m.strategy, m.backward, m.sigma_grad_min, m.mu)
               for _, m in brevitas_ana.ana_quantizers(model)}
    assert options == {("normal", "mode", "exact", 0.3, 0.25)}


# --- float baseline and --init-from ------------------------------------------------------------

@pytest.mark.slow
def test_float_run_exports_float_onnx_and_its_weights_start_a_quantised_run(tiny_cifar, tmp_path):
    float_dir, ana_dir = tmp_path / "float", tmp_path / "ana"
    common = ["--data-dir", tiny_cifar, "--epochs", "1", "--max-steps", "3"] + QUICK
    run(common + ["--quantiser", "float", "--output-dir", float_dir])
    res = json.loads((float_dir / "results.json").read_text())
    assert res["init_from"] is None and res["export"]["passed"] is True
    report = json.loads((float_dir / "export" / "report.json").read_text())
    row = report["formats"]["float"]
    assert row["argmax_agreement"] == 100.0 and row["max_abs_diff"] <= row["limit"]
    # onnxruntime on the float ONNX reproduces the float network's test accuracy (40 images)
    assert (float_dir / "export" / "model_float.onnx").is_file()
    assert not (float_dir / "export" / "model_qonnx.onnx").exists()
    spec = json.loads((float_dir / "model_spec.json").read_text())
    assert spec["kwargs"]["quantiser"] == "float"
    # the quantised run starts from every tensor of the float one
    proc = run(common + ["--init-from", float_dir, "--output-dir", ana_dir, "--no-export"])
    float_state = torch.load(float_dir / "model.pt")
    res = json.loads((ana_dir / "results.json").read_text())
    assert res["init_from"]["path"] == str(float_dir / "model.pt")
    assert sorted(res["init_from"]["loaded"]) == sorted(float_state)
    assert res["init_from"]["new"] == [] and res["init_from"]["ignored"] == []
    assert f"--init-from {float_dir / 'model.pt'}: {len(float_state)} tensors loaded" in proc.stderr
    # a network the file does not fit: the error names the tensor and nothing is written
    error = main_error(common + ["--model", "vgg8", "--init-from", float_dir,
                                 "--output-dir", tmp_path / "vgg"])
    assert error.startswith("error: --init-from: ") and "no tensor of it has a place" in error
    error = main_error(common + ["--weight-bit-width", "2", "--init-from", tmp_path / "nowhere",
                                 "--output-dir", tmp_path / "vgg"])
    assert error == f"error: --init-from: {tmp_path / 'nowhere'} does not exist"
    assert not (tmp_path / "vgg").exists()
    # the float run trained on every image: fine-tuning it with a held-out split would measure
    # validation on images the weights were trained on
    error = main_error(common + ["--init-from", float_dir, "--val-split", "20",
                                 "--output-dir", tmp_path / "leak"])
    assert error.startswith(f"error: --init-from: {float_dir} trained on every training image")
    assert "the 20 this run holds out" in error and not (tmp_path / "leak").exists()


def test_held_out_images_are_the_same_for_every_seed_and_init_from_must_share_them(
        tiny_cifar, tmp_path):
    from brevitas_ana.recipes.checkpoint import CheckpointError, check_held_out, held_out_of
    from brevitas_ana.recipes.data import datasets
    from brevitas_ana.recipes.train_cifar10 import load_data, make_accelerator

    def held_out(*extra):
        cfg = parse_args([str(a) for a in ["--data-dir", tiny_cifar, "--val-split", "20",
                                           "--output-dir", tmp_path / "x"] + QUICK + list(extra)])
        return load_data(cfg, make_accelerator(cfg, tmp_path / "x")[0]).eval_dl.dataset.indices

    seed0 = held_out("--seed", "0")
    seed1 = held_out("--seed", "1")
    other = held_out("--seed", "1", "--split-seed", "1")
    # the run seed no longer moves the split (it did: a second seed validated on other images)
    assert seed1 == seed0 and sorted(other) != sorted(seed0)
    n = len(datasets(tiny_cifar, False)[0])
    assert seed0 == torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()[:20]

    def source(name, data, seed):  # a recipe run folder: its config.json and weights
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"data": data, "run": {"seed": seed}}))
        torch.save({}, folder / "model.pt")
        return folder

    same = source("same", {"val_split": 20, "split_seed": 0}, 3)
    check_held_out(same, 20, 0)  # the same images held out: no error, whatever the run seed
    check_held_out(same, 0, 0)   # evaluated on the test set: nothing to leak
    old = source("old", {"val_split": 20}, 1)  # before split_seed: the split came from run.seed
    with pytest.raises(CheckpointError, match=rf"^--init-from: {re.escape(str(old))} held out "
                                              r"other images \(data.val_split 20, split seed 1\)"
                                              r" than this run \(data.val_split 20, data.split_"
                                              r"seed 0\)"):
        check_held_out(old, 20, 0)
    check_held_out(old, 20, 1)
    # fewer held out with the same seed: a part of what the source held out, no leak
    check_held_out(same, 10, 0)
    with pytest.raises(CheckpointError, match=r"held out other images \(data.val_split 20, "):
        check_held_out(same, 30, 0)
    # a checkpoint's weights file, two folders under the run's config.json
    inner = same / "checkpoints" / "checkpoint_0"
    inner.mkdir(parents=True)
    torch.save({}, inner / "model.pt")
    with pytest.raises(CheckpointError, match=r"split seed 0\) than this run \(data.val_split "
                                              r"20, data.split_seed 1\)"):
        check_held_out(inner / "model.pt", 20, 1)
    weights = tmp_path / "elsewhere.pt"  # a file from elsewhere: nothing to check against
    torch.save({}, weights)
    check_held_out(weights, 20, 0)
    assert held_out_of(same / "config.json") == (20, 0) and held_out_of(weights) is None


def test_init_from_a_timm_checkpoint_fills_the_quantised_resnet(tmp_path):
    """A float timm resnet18 of the recipe's shape, saved as timm's train script saves it (a
    ``state_dict`` entry) and as safetensors, initialises the registered quantised resnet18
    (names under its preprocessing wrapper's ``1.``); quantiser scales are new; a checkpoint
    of another shape is an error naming the tensor, and leaves the network as it was."""
    import timm
    from safetensors.torch import save_file
    from brevitas_ana.recipes.checkpoint import CheckpointError, init_from
    from brevitas_ana.recipes.models import create_model
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=10)
    source.conv1 = torch.nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    source.maxpool = torch.nn.Identity()
    import argparse  # timm's train script saves its arguments beside the weights
    torch.save({"state_dict": source.state_dict(), "epoch": 3,
                "args": argparse.Namespace(model="resnet18", lr=0.1)}, tmp_path / "r18.pth")
    save_file(source.state_dict(), str(tmp_path / "r18.safetensors"))
    for path in (tmp_path / "r18.pth", tmp_path / "r18.safetensors"):
        model = create_model("resnet18", quantiser="ana")
        report = init_from(model, path)
        assert len(report["loaded"]) == len(source.state_dict()) and report["ignored"] == []
        assert report["new"] and all("_quant." in k for k in report["new"])
        for k, v in source.state_dict().items():
            assert torch.equal(model.state_dict()["1." + k], v), k
    other = timm.create_model("resnet18", num_classes=10)  # ImageNet stem: 7x7 conv1
    torch.save(other.state_dict(), tmp_path / "imagenet_stem.pth")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"^--init-from: conv1.weight: shape \[64, 3, 7, 7\]"):
        init_from(model, tmp_path / "imagenet_stem.pth")
    partial = {k: v for k, v in source.state_dict().items() if k != "layer2.0.bn1.weight"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"has no 1.layer2.0.bn1.weight"):
        init_from(model, tmp_path / "partial.pt")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.slow
def test_calibration_sets_the_scales_and_the_start_accuracy_is_recorded(tiny_cifar, tmp_path):
    """--init-from a float timm resnet18 file with --calibrate 2: results.json's start accuracy
    is the post-training-quantised network's, reproduced here by hand (the same weights,
    Brevitas' calibration_mode on the first 32 training images, evaluation on the test set);
    calibration moved the activation scales away from their untrained values."""
    import timm
    from brevitas.graph.calibrate import calibration_mode
    from brevitas_ana.recipes.checkpoint import init_from
    from brevitas_ana.recipes.data import datasets, resident_tensors
    from brevitas_ana.recipes.models import create_model
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=10)
    source.conv1 = torch.nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    source.maxpool = torch.nn.Identity()
    torch.save(source.state_dict(), tmp_path / "float.pth")
    out = tmp_path / "run"
    run(["--config", CONFIGS / "resnet18_w4a4.yaml", "--data-dir", tiny_cifar, "--epochs", "1",
         "--max-steps", "1", "--init-from", tmp_path / "float.pth", "--calibrate", "2",
         "--no-export", "--output-dir", out] + QUICK, env={"OMP_NUM_THREADS": "1"})
    start = json.loads((out / "results.json").read_text())["start"]
    assert start["calibration_images"] == 32
    torch.set_num_threads(1)
    model = create_model("resnet18", quantiser="ana")
    init_from(model, tmp_path / "float.pth")
    train, _, test = datasets(tiny_cifar, False)
    images = resident_tensors(train)[0][:32].float() / 255
    model.eval()
    with torch.no_grad(), calibration_mode(model):
        for x in images.split(16):
            model(x)
    scale = model[1].layer1[0].conv1.input_quant.scale().item()
    model.eval()
    with torch.no_grad():
        x, y = resident_tensors(test)
        correct = (model(x.float() / 255).argmax(1) == y).sum().item()
    assert start["eval_acc"] == pytest.approx(100.0 * correct / len(y))
    untrained = create_model("resnet18", quantiser="ana")
    untrained.eval()
    assert scale != pytest.approx(untrained[1].layer1[0].conv1.input_quant.scale().item())


def test_norm_correction_re_estimates_batchnorm_on_the_quantised_network(tiny_cifar, tmp_path):
    """--calibrate 2 --norm-correction from a float twin's weights: every BatchNorm holds
    Brevitas' norm correction of the quantised network, recomputed here with torch alone
    (BatchNorms in train mode with a cumulative average over the first 32 training images, the
    rest of the quantised network exact; CNV's activation scales are constants, so
    calibration_mode has nothing to set): mean = the new mean, var = sqrt(old var x new var); the
    momentum is torch's 0.1 again, so fine-tuning keeps exponential running averages; and the
    start accuracy is the corrected network's."""
    from brevitas.graph.calibrate import BN_LAYERS
    from brevitas_ana.recipes.checkpoint import init_from
    from brevitas_ana.recipes.data import datasets, resident_tensors
    from brevitas_ana.recipes.models import create_model
    from brevitas_ana.recipes.train_cifar10 import (build, evaluate, load_data,
                                                    make_accelerator, start_point)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    twin = create_model("cnv", weight_bit_width=2, act_bit_width=2, quantiser="float")
    twin.train()
    with torch.no_grad():  # BatchNorm statistics of the float network, not torch's 0 / 1
        for _ in range(3):
            twin(torch.rand(16, 3, 32, 32))
    torch.save(twin.state_dict(), tmp_path / "float.pt")
    args = ["--config", CONFIGS / "cnv_w2a2_finetune.yaml", "--init-from", tmp_path / "float.pt",
            "--data-dir", tiny_cifar, "--no-download", "--calibrate", "2", "--norm-correction",
            "--output-dir", tmp_path / "run"] + QUICK
    cfg = parse_args([str(a) for a in args])
    accelerator, _ = make_accelerator(cfg, tmp_path / "run")
    data = load_data(cfg, accelerator)
    recipe = build(cfg, accelerator, data, plan={}, resuming=False)
    start = start_point(cfg, accelerator, data, recipe)
    assert start["calibration_images"] == 32 and start["norm_correction"] is True

    model = create_model("cnv", weight_bit_width=2, act_bit_width=2, quantiser="ana")
    init_from(model, tmp_path / "float.pt")
    norms = {name: m for name, m in model.named_modules() if isinstance(m, BN_LAYERS)}
    old = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in norms.items()}
    model.eval()
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    images = resident_tensors(datasets(tiny_cifar, False)[0])[0][:32].float() / 255
    with torch.no_grad():
        for x in images.split(16):
            model(x)
    corrected = recipe.net
    corrected_norms = dict(corrected.named_modules())
    assert len(norms) == 8
    for name, m in norms.items():
        got = corrected_norms[name]
        assert got.momentum == 0.1
        torch.testing.assert_close(got.running_mean, m.running_mean)
        torch.testing.assert_close(got.running_var, torch.sqrt(old[name][1] * m.running_var))
        assert not torch.allclose(got.running_mean, old[name][0], atol=1e-3)
    # the start accuracy is the corrected network's (its own evaluation gives the same)
    loss, acc = evaluate(recipe.model, data.eval_dl, recipe.criterion, accelerator, "again")
    assert start["eval_acc"] == acc
    with pytest.raises(ConfigError, match=r"^--norm-correction: needs calibrate > 0 \(--cali"
                                          r"brate N.*; and init_from \(--init-from"):
        parse_args(["--norm-correction"])
    with pytest.raises(ConfigError, match=r"^--norm-correction: needs a quantised network"):
        parse_args(args + ["--quantiser", "float"])
    # a config file may hold the flag and the command line the calibration, or the other way
    (tmp_path / "norm.yaml").write_text("model: {norm_correction: true}\n")
    cfg = parse_args(["--config", str(tmp_path / "norm.yaml"), "--calibrate", "3",
                      "--init-from", "x"])
    assert (cfg.model.norm_correction, cfg.model.calibrate) == (True, 3)


def test_init_from_a_quantised_run_loads_its_trained_scales(tmp_path):
    """The learned activation scales a trained network holds (Brevitas leaves them out of a new
    network's state_dict until its first forward) are loaded, not ignored: the new network
    computes what the saved one does; without them it would start from placeholders."""
    from brevitas_ana.recipes.checkpoint import init_from
    from brevitas_ana.recipes.models import create_model
    torch.manual_seed(0)
    trained = create_model("resnet18", quantiser="ana")
    trained.train()
    with torch.no_grad():
        for _ in range(3):
            trained(torch.rand(4, 3, 32, 32))
    torch.save(trained.state_dict(), tmp_path / "trained.pt")
    model = create_model("resnet18", quantiser="ana")
    report = init_from(model, tmp_path / "trained.pt")
    scales = [k for k in report["loaded"] if k.endswith("input_quant.fused_activation_quant_proxy"
                                                         ".tensor_quant.scaling_impl.value")]
    assert len(scales) == 21 and report["ignored"] == []
    x = torch.rand(4, 3, 32, 32)
    trained.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))


def test_crop_pad_reaches_both_loaders(tiny_cifar, tmp_path):
    """``--crop-pad 2``: the resident loader's first batch is the epoch's draws at padding 2,
    cropped as torchvision would; the workers loader's transform pads by 2."""
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    from brevitas_ana.recipes.data import datasets, epoch_draws, resident_tensors
    from brevitas_ana.recipes.train_cifar10 import load_data, make_accelerator

    def data(*extra):
        cfg = parse_args([str(a) for a in ["--data-dir", tiny_cifar, "--output-dir",
                                           tmp_path / "x", "--crop-pad", "2"] + QUICK
                          + list(extra)])
        return cfg, load_data(cfg, make_accelerator(cfg, tmp_path / "x")[0])

    cfg, resident = data()
    resident.train_dl.set_epoch(0)
    x, _ = next(iter(resident.train_dl))
    images, _ = resident_tensors(datasets(tiny_cifar, False)[0])
    order, dy, dx, flip = epoch_draws(len(images), cfg.run.seed, 0, pad=2)
    for b in range(len(x)):
        want = TF.crop(TF.pad(images[order[b]], [2]), int(dy[b]), int(dx[b]), 32, 32)
        want = TF.horizontal_flip(want) if flip[b] else want
        assert torch.equal(x[b], TF.to_dtype(want, torch.float32, scale=True)), b
    _, workers = data("--loader", "workers", "--num-workers", "0")
    crops = [t for t in workers.train_dl.dataset.transform.transforms
             if isinstance(t, v2.RandomCrop)]
    assert [c.padding for c in crops] == [[2, 2, 2, 2]]
