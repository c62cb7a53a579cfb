"""Train a quantised network on CIFAR-10 with ANA quantisers, with accelerate.

    accelerate launch recipes/train_cifar10.py --config recipes/configs/cnv_w2a2.yaml
    accelerate launch recipes/train_cifar10.py --config recipes/configs/vgg8_ternary.yaml \\
        --preset homogeneous --noise logistic
    accelerate launch recipes/train_cifar10.py --quantiser ste     # stock Brevitas baseline

The same loop runs on one GPU, several GPUs (``accelerate launch --multi_gpu``) and several CPU
processes (``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N``; plain
``--cpu --num_processes N`` starts a single process). Every epoch it evaluates the noise-free
quantised model, appends to ``metrics.csv`` and saves a resumable checkpoint; ``--resume latest``
continues a stopped run exactly.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import brevitas_ana
from brevitas_ana.recipes.config import ConfigError, flat, held_out, parse_args, to_dict
from brevitas_ana.export import ExportError, export_float, export_qnn
from brevitas_ana.export.export_qnn import atomic_write, check_writable
from brevitas_ana.export.validate import table
from brevitas_ana.recipes.data import (ResidentLoader, datasets, resident_tensors,
                                       seed_augmentation)
from brevitas_ana.recipes.checkpoint import (COMPLETE, CheckpointError, RuntimeStatsState,
                                             check_held_out, checkpoints, describe_init,
                                             held_out_of, init_from, load_problem,
                                             verify_checkpoint, write_spec, write_text)
from brevitas_ana.recipes.models import create_model, model_spec
from brevitas_ana.recipes.plot import plot_metrics
from brevitas_ana.recipes.tracking import CSVTracker

logger = get_logger(__name__)
# INFO for the recipe's own lines only (get_logger(log_level=) would raise the root logger too,
# and accelerate's per-file checkpoint lines with it)
logger.logger.setLevel(logging.INFO)


def step_hooks() -> list:
    """Callbacks ``hook(step)`` run after every optimiser step. Tests of the resume set
    ``ANA_RECIPE_KILL_AT_STEP=N``: the process is killed (SIGKILL, no clean-up) right after
    step N, as a crash or a lost machine would."""
    kill_at = int(os.environ.get("ANA_RECIPE_KILL_AT_STEP", "0"))
    if not kill_at:
        return []
    return [lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == kill_at else None]


class NoAnnealing:
    """The annealing of a stock Brevitas STE run or a float run: nothing to anneal, measure or
    save."""
    checkpointed = ()

    def after_backward(self):
        pass

    def step(self):
        pass

    def postfix(self) -> dict:
        return {}

    def columns(self, reduce) -> dict:
        return {}

    def plot(self, path):
        pass


class Annealing(NoAnnealing):
    """An ANA run's controller (the noise of every group over the run) and its gradient-health
    counters (how much gradient each group lets through), behind the training loop's calls."""

    def __init__(self, controller: brevitas_ana.AnaController):
        self.controller = controller
        # one step in 10: counting every step would cost ~10 % of a CPU step (README, Cost)
        self.health = brevitas_ana.GradientHealth(controller, every=10)
        self.checkpointed = (controller,)

    def after_backward(self):
        self.health.after_backward()

    def step(self):
        self.controller.step()

    def postfix(self) -> dict:
        s = list(self.controller.sigmas().values())
        return {"sigma": f"{min(s):.3g}..{max(s):.3g}"}

    def columns(self, reduce) -> dict:
        """sigma, mu and backward noise per group now; gradient health over the epoch."""
        ctl = self.controller
        row = {f"sigma/{g}": v for g, v in ctl.sigmas().items()}
        row.update({f"mu/{g}": v for g, v in ctl.mus().items()})
        row.update({f"sigma_b/{g}": v for g, v in ctl.grad_sigmas().items()})
        for g, stats in self.health.read(reduce=reduce).items():
            row.update({f"{k}/{g}": v for k, v in stats.items()})
        return row

    def plot(self, path):
        self.controller.plot(path)


class Progress:
    """Epochs and optimiser steps done, and the training images and seconds they took (over
    every command that trained this run); checkpointed with the rest of the state."""

    def __init__(self):
        self.epoch, self.step = 0, 0
        self.train_images, self.train_seconds = 0, 0.0

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "train_images": self.train_images,
                "train_seconds": self.train_seconds}

    def load_state_dict(self, state):
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.train_images = int(state["train_images"])
        self.train_seconds = float(state["train_seconds"])


def sqr_hinge_loss(logits, labels):
    """Squared hinge loss on +-1 one-hot targets (bnn_pynq's training loss)."""
    target = nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype) * 2 - 1
    return torch.clamp(1 - logits * target, min=0).pow(2).mean()


PER_STEP_SCHEDULES = ("onecycle",)  # stepped after every optimiser step; the others per epoch
FIXED_LENGTH_SCHEDULES = ("cosine", "onecycle")  # shaped by the run's planned length


def make_scheduler(optim, optimizer, total_steps: int):
    """The learning-rate schedule; ``onecycle`` is torch's OneCycleLR over ``total_steps``
    optimiser steps (warm-up from lr/25 to lr over ``lr_pct_start`` of them, then down to
    lr/25e4, ``lr_anneal`` shaped; Adam's beta1 / SGD's momentum cycle inversely)."""
    if optim.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=optim.lr, total_steps=total_steps, pct_start=optim.lr_pct_start,
            anneal_strategy=optim.lr_anneal)
    if optim.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, optim.lr_step_epochs, optim.lr_gamma)
    if optim.lr_schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, optim.lr_milestones, optim.lr_gamma)
    if optim.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, optim.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def find_checkpoint(resume: str, run_dir: Path) -> Path:
    """The checkpoint folder ``--resume`` names: ``latest`` (of ``run_dir``), a run directory
    (its latest) or a checkpoint folder."""
    if resume == "latest":
        found = checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run directory
        return find_checkpoint("latest", path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (give 'latest', a run "
                                f"directory or one of its checkpoints/checkpoint_<epoch>)")
    return path


def save_checkpoint(accelerator, epoch: int, spec: dict, plan: dict):
    """accelerate names the folder (``checkpoint_<epoch>``, ProjectConfiguration's automatic
    naming) and keeps the newest ``keep_checkpoints`` (its ``total_limit``). It writes in
    place, so the model spec, the run's plan (``run_state.json``: what a resume must know before
    it builds anything, e.g. the annealing's planned length) and then the ``COMPLETE`` marker
    (itself written under a temporary name and renamed) come last: the rename that makes a
    checkpoint count. A folder without the marker is one a killed run left half-written; it is
    never loaded, and removed at the next start."""
    accelerator.project_configuration.iteration = epoch
    path = Path(accelerator.save_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_spec(path, spec)
        write_json(path / RUN_STATE, plan)
        write_text(path / COMPLETE, f"epoch {epoch}\n")
    accelerator.wait_for_everyone()


RUN_STATE = "run_state.json"


def read_plan(ckpt: Path) -> dict:
    """The plan saved with a checkpoint ({} for checkpoints written before it was saved)."""
    path = ckpt / RUN_STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def start_run(run_dir: Path, cfg, existing):
    """Once data, model and checkpoint are loaded: ``--overwrite`` removes (naming them) what
    the folder held; half-written checkpoints of a killed run go; ``config.json`` is
    written."""
    if cfg.run.overwrite and existing:
        for name in existing:
            path = run_dir / name.rstrip("/")
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        logger.info(f"--overwrite: removed {', '.join(existing)} from {run_dir}")
    for folder in checkpoints(run_dir, complete=False):
        shutil.rmtree(folder)
        logger.info(f"removed {folder}: written only in part (the run stopped while saving)")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", to_dict(cfg))


def write_json(path: Path, data):
    write_text(path, json.dumps(data, indent=2, default=str))


def evaluate(model, loader, criterion, accelerator, desc):
    """Loss and top-1 accuracy (%) of the model in eval mode: ANA quantisers are noise-free."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in tqdm(loader, desc=desc, leave=False,
                                   disable=None if accelerator.is_local_main_process else True):
            logits = model(images)
            logits, labels = accelerator.gather_for_metrics((logits, labels))
            loss_sum += criterion(logits.float(), labels).item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            count += len(labels)
    return loss_sum / max(count, 1), 100.0 * correct / max(count, 1)


def rank_agreement(accelerator, model) -> bool:
    """True when every process holds bit-identical parameters and ANA noise."""
    if accelerator.num_processes == 1:
        return True
    values = [p.detach().double().sum() for p in model.parameters()]
    values += [torch.tensor([m.sigma, m.mu], dtype=torch.float64)
               for _, m in brevitas_ana.ana_quantizers(model)]
    fingerprint = torch.cat([v.reshape(-1) for v in values]).to(accelerator.device)
    everyone = accelerator.gather(fingerprint[None])
    return bool((everyone == everyone[0]).all().item())


def export_and_validate(net, test_set, run_dir: Path, accelerator, quantiser: str,
                        max_images: int = 500):
    """QONNX (FINN-ready), QCDQ, integer and integer-only ONNX of the trained network in
    RUN/export, validated against it on the first test images (the full export stage:
    ``recipes/export_run.py``); a float run's float ONNX."""
    n = min(max_images, len(test_set))
    images = torch.stack([test_set[i][0] for i in range(n)])
    labels = torch.tensor([int(test_set[i][1]) for i in range(n)])
    try:
        if quantiser == "float":
            report = export_float(net, images, run_dir / "export", labels=labels)
        else:
            report = export_qnn(net, images, run_dir / "export", labels=labels)
    except ExportError as e:
        logger.info(f"export: failed: {e}")
        return {"error": str(e)}
    if quantiser == "float":
        row = report["formats"]["float"]
        logger.info(f"float ONNX: top-1 {row['top1_export']:.2f}% (torch {row['top1_torch']:.2f}"
                    f"%), max logit difference {row['max_abs_diff']:.3g}: "
                    f"{'passed' if report['passed'] else 'FAILED'} -> {row['file']}")
    else:
        logger.info(table(report))
    return {"passed": report["passed"], "report": str(run_dir / "export" / "report.json"),
            **{fmt: row["file"] for fmt, row in report["formats"].items()}}


def main(argv=None):
    logging.basicConfig(format="%(message)s")
    # log lines through tqdm.write: each on its own line, below the progress bars, in a terminal
    # and in a file log alike
    with logging_redirect_tqdm():
        _main(argv)


def _main(argv=None):
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    run_dir, existing, ckpt, plan = check_run(cfg)
    accelerator, csv_tracker = make_accelerator(cfg, run_dir)
    data = load_data(cfg, accelerator)
    run = build(cfg, accelerator, data, plan, resuming=ckpt is not None)
    if ckpt is not None:
        resume(cfg, accelerator, run, ckpt)
    elif cfg.model.init_from or cfg.model.calibrate:
        run.plan["start"] = start_point(cfg, accelerator, data, run)
    # --- the run starts: only now is anything in the run directory written or removed ------
    if accelerator.is_main_process:
        start_run(run_dir, cfg, existing)
    accelerator.wait_for_everyone()
    csv_tracker.keep_epochs = run.progress.epoch  # rows of the epochs the resume does not redo
    accelerator.init_trackers("tensorboard", config={k: v for k, v in flat(cfg).items()
                                                     if isinstance(v, (int, float, str, bool))})
    t_start = time.time()
    agree = True
    hooks = step_hooks()
    epoch_bar = tqdm(total=cfg.optim.epochs, initial=run.progress.epoch, desc="epochs",
                     position=0, disable=None if accelerator.is_local_main_process else True)
    while not run.done():
        row = train_epoch(cfg, accelerator, data, run, hooks)
        agree = agree and rank_agreement(accelerator, run.net)
        accelerator.log(row, step=run.progress.step)  # metrics.csv and TensorBoard
        save_checkpoint(accelerator, run.progress.epoch, run.spec, run.plan)
        epoch_bar.update()
        logger.info(
            f"epoch {row['epoch']}/{cfg.optim.epochs}: train loss {row['train_loss']:.4f} acc "
            f"{row['train_acc']:.2f}% | eval (noise-free) loss {row['eval_loss']:.4f} acc "
            f"{row['eval_acc']:.2f}% | {row['images_per_s']:.0f} img/s"
            + ("" if agree else " | RANKS DISAGREE"))
    epoch_bar.close()
    finish(cfg, accelerator, data, run, run_dir, agree, t_start)


# --- set-up -----------------------------------------------------------------------------------

def check_run(cfg):
    """(run directory, what it holds, checkpoint to resume or None, its saved plan), checked
    before anything is built or written. A second run never destroys a first: a folder that
    holds anything is continued (--resume) or replaced on request (--overwrite), and nothing is
    written or removed until the run is known to start (data, model and checkpoint loaded)."""
    run_dir = Path(cfg.run.output_dir)
    try:
        check_writable(run_dir, "--output-dir", create=False)
    except ExportError as e:
        sys.exit(f"error: {e}")
    existing = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir()) \
        if run_dir.is_dir() else []
    if cfg.run.resume and cfg.run.overwrite:
        sys.exit("error: --resume and --overwrite exclude each other (continue the run, or "
                 "replace it)")
    if existing and not cfg.run.resume and not cfg.run.overwrite:
        sys.exit(f"error: --output-dir: {run_dir} is not empty ({', '.join(existing[:6])}"
                 f"{', ...' if len(existing) > 6 else ''}); continue that run with --resume "
                 f"latest, or replace it with --overwrite")
    if not cfg.run.resume:
        return run_dir, existing, None, {}
    try:
        ckpt = find_checkpoint(cfg.run.resume, run_dir)
        verify_checkpoint(ckpt)  # every file, the way the resume will load it
    except (FileNotFoundError, CheckpointError) as e:
        sys.exit(f"error: --resume: {e}")
    # a resume validating on other images than the run did would mix two validation sets,
    # one of them partly trained on
    theirs = held_out_of(run_dir / "config.json")
    mine = held_out(cfg)
    if theirs is not None and theirs != mine:
        def held(v):
            return f"data.val_split {v[0]}, split seed {v[1]}" if v[0] else "data.val_split 0"
        sys.exit(f"error: --resume: {run_dir} was trained with {held(theirs)}, this command "
                 f"asks for {held(mine)}: its validation figures would mix two sets of images. "
                 f"Resume with --val-split {theirs[0]}"
                 + (f" --split-seed {theirs[1]}" if theirs[0] else ""))
    return run_dir, existing, ckpt, read_plan(ckpt)


def make_accelerator(cfg, run_dir: Path):
    """accelerate does the bookkeeping: checkpoint naming and rotation, metrics.csv and
    TensorBoard logs through its trackers."""
    csv_tracker = CSVTracker(run_dir)
    log_with = [csv_tracker]
    try:
        import tensorboard  # noqa: F401
        log_with.append("tensorboard")
    except ImportError:
        pass
    project = ProjectConfiguration(project_dir=str(run_dir), automatic_checkpoint_naming=True,
                                   total_limit=cfg.run.keep_checkpoints)
    accelerator = Accelerator(
        mixed_precision=cfg.run.mixed_precision, log_with=log_with, project_config=project,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(cfg.run.seed)
    if "tensorboard" not in log_with:
        logger.info("TensorBoard logs off: tensorboard is not installed (pip install "
                    "\"brevitas-ana[tensorboard]\"); metrics.csv has the same figures")
    return accelerator, csv_tracker


def load_data(cfg, accelerator) -> SimpleNamespace:
    """CIFAR-10: training batches (resident on the device, or a DataLoader), evaluation and
    test loaders."""
    with accelerator.main_process_first():
        try:
            train_set, eval_set, test_set = datasets(cfg.data.data_dir, cfg.data.download,
                                                     cfg.data.val_split, cfg.data.subset,
                                                     cfg.data.split_seed, cfg.data.crop_pad)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
    # workers start afresh each epoch: they copy the dataset with that epoch's augmentation seed
    loader = dict(batch_size=cfg.optim.batch_size, num_workers=cfg.data.num_workers,
                  persistent_workers=False)
    resident = cfg.data.loader == "resident"
    if resident:  # this process's shard of every epoch, augmented on the device
        train_dl = ResidentLoader(*resident_tensors(train_set), cfg.optim.batch_size,
                                  cfg.run.seed, device=accelerator.device,
                                  rank=accelerator.process_index,
                                  world=accelerator.num_processes, pad=cfg.data.crop_pad)
    else:
        train_dl = DataLoader(train_set, shuffle=True, drop_last=True, **loader)
    if len(train_dl) == 0:
        sys.exit(f"error: batch_size {cfg.optim.batch_size} is larger than the training set "
                 f"({len(train_set)} images"
                 + (f" over {accelerator.num_processes} processes)" if resident else ")"))
    return SimpleNamespace(train_set=train_set, test_set=test_set, resident=resident,
                           train_dl=train_dl,
                           eval_dl=DataLoader(eval_set, shuffle=False, **loader),
                           test_dl=DataLoader(test_set, shuffle=False, **loader))


class Run(SimpleNamespace):
    """What trains: model (prepared) and net (unwrapped), optimiser, lr schedule, criterion, the
    annealing, the progress counters, the model spec and the plan saved with checkpoints."""

    def done(self) -> bool:
        max_steps = self.cfg.optim.max_steps
        return (self.progress.epoch >= self.cfg.optim.epochs
                or bool(max_steps and self.progress.step >= max_steps))


def build(cfg, accelerator, data, plan: dict, resuming: bool) -> Run:
    """The network (a fresh run: from ``--init-from``'s tensors when given), its optimiser and
    lr schedule, and (ANA runs) the controller, all registered for checkpointing."""
    # written beside every set of weights: how to rebuild the network without this config
    spec = model_spec(cfg.model, cfg.ana.options())
    model = create_model(spec["name"], **spec["kwargs"])
    init = plan.get("init_from")  # a resume: what the run started from, as it was recorded
    if cfg.model.init_from and not resuming:  # before the optimiser: Brevitas rebuilds
        try:                                   # quantisers on a load
            check_held_out(cfg.model.init_from, cfg.data.val_split, cfg.data.split_seed)
            init = init_from(model, cfg.model.init_from)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
        logger.info(describe_init(init))
    if cfg.optim.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr,
                                     weight_decay=cfg.optim.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr,
                                    momentum=cfg.optim.momentum,
                                    weight_decay=cfg.optim.weight_decay)
    criterion = (sqr_hinge_loss if cfg.optim.loss == "sqr_hinge" else
                 functools.partial(nn.functional.cross_entropy,
                                   label_smoothing=cfg.optim.label_smoothing))
    # The lr scheduler is stepped here (per epoch, or per step for onecycle), not prepared: a
    # prepared one would be stepped once per process. The resident loader shards itself.
    if data.resident:
        model, optimizer, data.eval_dl, data.test_dl = accelerator.prepare(
            model, optimizer, data.eval_dl, data.test_dl)
    else:
        model, optimizer, data.train_dl, data.eval_dl, data.test_dl = accelerator.prepare(
            model, optimizer, data.train_dl, data.eval_dl, data.test_dl)
    net = accelerator.unwrap_model(model)
    # after prepare, len(train_dl) is this process's share: the steps every process takes
    steps_per_epoch = len(data.train_dl)
    total_steps = cfg.optim.epochs * steps_per_epoch
    if cfg.optim.max_steps:
        total_steps = min(total_steps, cfg.optim.max_steps)
    planned = plan.get("anneal_steps")
    if planned is not None and planned != total_steps:
        # extending (or shortening) a run: the annealing keeps the end it was planned with;
        # added epochs train noise-free
        if cfg.optim.lr_schedule in FIXED_LENGTH_SCHEDULES:
            sys.exit(f"error: --epochs: a run with lr_schedule {cfg.optim.lr_schedule} cannot "
                     f"change its length (the schedule is shaped by the original run's); use "
                     f"step or multistep")
        logger.info(f"resume with {cfg.optim.epochs} epochs: the annealing keeps its planned "
                    f"end ({planned} steps); steps past it train noise-free")
        total_steps = planned
    scheduler = make_scheduler(cfg.optim, optimizer, total_steps)
    annealing = NoAnnealing()
    if cfg.model.quantiser == "ana":
        try:
            annealing = Annealing(brevitas_ana.AnaController(
                net, preset=cfg.ana.preset, total_steps=total_steps, config=cfg.ana.options(),
                anneal_end=cfg.ana.anneal_end, groups=cfg.ana.groups,
                schedules=cfg.ana.schedules, time_unit="epoch", steps_per_epoch=steps_per_epoch,
                example_input=torch.rand(2, 3, 32, 32, device=accelerator.device)))
        except ValueError as e:  # groups / schedules from the config that do not fit the model
            sys.exit(f"error: ana: {e}")
    progress = Progress()
    accelerator.register_for_checkpointing(progress, scheduler, RuntimeStatsState(net),
                                           *annealing.checkpointed)
    return Run(cfg=cfg, model=model, net=net, optimizer=optimizer, scheduler=scheduler,
               criterion=criterion, annealing=annealing, progress=progress, spec=spec,
               plan={"anneal_steps": total_steps, "init_from": init, "start": plan.get("start")})


def resume(cfg, accelerator, run: Run, ckpt: Path):
    try:
        with brevitas_ana.keep_quant_modules():  # the optimiser holds the scale parameters
            accelerator.load_state(str(ckpt))
    except Exception as e:
        sys.exit(f"error: --resume: cannot load {cfg.run.resume!r} into a {cfg.model.name} "
                 f"(W{cfg.model.weight_bit_width}A{cfg.model.act_bit_width}, "
                 f"{cfg.model.quantiser}) run: {load_problem(e)[:400]}")
    logger.info(f"resumed from {ckpt} at epoch {run.progress.epoch}, step {run.progress.step}")


# --- one epoch --------------------------------------------------------------------------------

def train_epoch(cfg, accelerator, data, run: Run, hooks) -> dict:
    """One epoch of training (or up to max_steps), then the noise-free evaluation; the epoch's
    metrics row."""
    progress, model, annealing = run.progress, run.model, run.annealing
    per_step_lr = cfg.optim.lr_schedule in PER_STEP_SCHEDULES
    clip = cfg.optim.clip_weights
    model.train()
    if hasattr(data.train_dl, "set_epoch"):  # DataLoaders prepared by accelerate have it
        data.train_dl.set_epoch(progress.epoch)
    if not data.resident:
        seed_augmentation(data.train_set, cfg.run.seed, progress.epoch)
    loss_sum = torch.zeros((), device=accelerator.device)
    correct = torch.zeros((), device=accelerator.device)
    seen, t0 = 0, time.time()
    main_proc = accelerator.is_local_main_process  # bars: main process, terminals only
    bar = tqdm(total=len(data.train_dl), desc=f"epoch {progress.epoch + 1}/{cfg.optim.epochs}",
               position=1, leave=False, disable=None if main_proc else True)
    for images, labels in data.train_dl:
        logits = model(images)
        loss = run.criterion(logits.float(), labels)
        accelerator.backward(loss)
        annealing.after_backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        if per_step_lr:
            run.scheduler.step()
        if clip is not None:  # bnn_pynq's latent-weight clipping
            with torch.no_grad():
                for m in run.net.modules():
                    if isinstance(m, (nn.Conv2d, nn.Linear)):
                        m.weight.clamp_(-clip, clip)
        annealing.step()
        progress.step += 1
        for hook in hooks:
            hook(progress.step)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        # .item() waits for the device: every 10th step, and only where a bar is drawn
        if not bar.disable and progress.step % 10 == 0:
            bar.set_postfix({"loss": f"{loss_sum.item() / seen:.3f}",
                             "acc": f"{100 * correct.item() / seen:.1f}",
                             "img/s": f"{seen * accelerator.num_processes / (time.time() - t0):.0f}",
                             **annealing.postfix()}, refresh=False)
        bar.update()
        if run.done():
            break
    bar.close()
    seconds = time.time() - t0
    if not per_step_lr:
        run.scheduler.step()
    # global training statistics of the epoch
    totals = accelerator.reduce(torch.stack([loss_sum, correct.float(), torch.tensor(
        float(seen), device=accelerator.device)]), reduction="sum")
    progress.train_images += int(totals[2].item())
    progress.train_seconds += seconds
    eval_loss, eval_acc = evaluate(model, data.eval_dl, run.criterion, accelerator, "eval")
    progress.epoch += 1
    return {"epoch": progress.epoch, "step": progress.step,
            "lr": run.optimizer.param_groups[0]["lr"],
            "train_loss": (totals[0] / totals[2]).item(),
            "train_acc": (100 * totals[1] / totals[2]).item(),
            "eval_loss": eval_loss, "eval_acc": eval_acc,
            "images_per_s": totals[2].item() / seconds,
            # time-to-accuracy: training images and seconds so far, resumes included
            "images_seen": progress.train_images, "train_s": progress.train_seconds,
            "time": time.time(),  # the wall clock (Unix seconds) when the epoch ended
            **annealing.columns(accelerator.reduce)}


def calibration_pass_over(net, images, batch_size: int, accelerator, desc: str):
    """One no-grad pass of ``net`` over uint8 ``images`` (scaled to [0, 1] as torchvision
    does), batch by batch on the accelerator's device: what the calibration tools observe."""
    from torchvision.transforms import v2
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False,
                      disable=None if accelerator.is_local_main_process else True):
            batch = images[i:i + batch_size].to(accelerator.device)
            net(v2.functional.to_dtype(batch, torch.float32, scale=True))


def start_point(cfg, accelerator, data, run) -> dict:
    """Where a run that starts from weights or calibrates begins: the activation scales set from
    the first ``calibrate x batch_size`` training images (no augmentation, the same on every
    process) with Brevitas' ``calibration_mode``; with ``norm_correction``, every BatchNorm's
    statistics then re-estimated on the same images through the quantised network with Brevitas'
    ``norm_correction_mode`` (mean := the new mean, var := sqrt(old var x new var)); then the
    exact quantised network's evaluation accuracy before any training step (post-training
    quantisation)."""
    n = min(cfg.model.calibrate * cfg.optim.batch_size, len(data.train_set))
    if n:
        from brevitas.core.scaling.standalone import ParameterFromRuntimeStatsScaling
        from brevitas.graph.calibrate import calibration_mode
        scales = sum(isinstance(m, ParameterFromRuntimeStatsScaling) for m in run.net.modules())
        if not scales:
            logger.info("--calibrate: no activation scale of this network is estimated from "
                        "data (its scales are constants): calibration_mode changes nothing")
        images = resident_tensors(data.train_set)[0][:n]
        # eval: the loaded BatchNorm statistics stay; calibration_mode switches only the
        # quantisers to collecting their statistics
        run.net.eval()

        def calibration_pass(desc):
            calibration_pass_over(run.net, images, cfg.optim.batch_size, accelerator, desc)

        with calibration_mode(run.net):
            calibration_pass("calibrate")
        if cfg.model.norm_correction:
            from brevitas.graph.calibrate import BN_LAYERS, norm_correction_mode
            norms = [m for m in run.net.modules() if isinstance(m, BN_LAYERS)]
            # norm_correction_mode leaves momentum None (a cumulative average), which would
            # make the fine-tuning's running statistics average over the whole run
            momenta = [m.momentum for m in norms]
            with norm_correction_mode(run.net):
                calibration_pass("norm correction")
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            run.net.eval()
        if accelerator.num_processes > 1:  # the same images everywhere; make it bit-identical
            from accelerate.utils import broadcast
            with torch.no_grad():
                for t in list(run.net.parameters()) + list(run.net.buffers()):
                    t.copy_(broadcast(t.detach().clone(), from_process=0))
    loss, acc = evaluate(run.model, data.eval_dl, run.criterion, accelerator, "start")
    logger.info(f"start ({'calibrated on ' + str(n) + ' images, ' if n else ''}before training): "
                f"eval (noise-free) loss {loss:.4f} acc {acc:.2f}%")
    return {"calibration_images": n, "norm_correction": bool(n and cfg.model.norm_correction),
            "eval_loss": loss, "eval_acc": acc}


# --- finish -----------------------------------------------------------------------------------

def finish(cfg, accelerator, data, run: Run, run_dir: Path, agree: bool, t_start: float):
    """The exact quantised model (a float run: the float network) on the test set; results,
    weights, plots, export."""
    test_loss, test_acc = evaluate(run.model, data.test_dl, run.criterion, accelerator, "test")
    agree = agree and rank_agreement(accelerator, run.net)
    accelerator.end_training()
    progress = run.progress
    if accelerator.is_main_process:
        import accelerate
        import brevitas
        import timm
        results = {
            "config": to_dict(cfg), "test_acc": test_acc, "test_loss": test_loss,
            "epochs": progress.epoch, "steps": progress.step,
            "world_size": accelerator.num_processes, "ranks_agree": agree,
            # training time over every command that trained this run (resumes included);
            # this command's own wall time, evaluation and export included
            "train_time_s": progress.train_seconds, "command_wall_time_s": time.time() - t_start,
            "train_images_per_s": (progress.train_images / progress.train_seconds
                                   if progress.train_seconds else None),
            "test_images": len(data.test_set),
            # what --init-from loaded, left new and ignored (None: trained from scratch), and
            # the accuracy before training (after calibration): where fine-tuning started
            "init_from": run.plan.get("init_from"), "start": run.plan.get("start"),
            "device": str(accelerator.device), "mixed_precision": cfg.run.mixed_precision,
            "versions": {"torch": torch.__version__, "brevitas": brevitas.__version__,
                         "brevitas_ana": brevitas_ana.__version__,
                         "accelerate": accelerate.__version__, "timm": timm.__version__,
                         "python": sys.version.split()[0]}}
        write_spec(run_dir, run.spec)
        atomic_write(run_dir / "model.pt", lambda tmp: torch.save(run.net.state_dict(), tmp))
        if (run_dir / "metrics.csv").exists():
            plot_metrics(run_dir / "metrics.csv")
        run.annealing.plot(run_dir / "sigma_schedule.png")
        if cfg.run.export:
            results["export"] = export_and_validate(run.net, data.test_set, run_dir, accelerator,
                                                    cfg.model.quantiser)
        write_json(run_dir / "results.json", results)
        what = "float network" if cfg.model.quantiser == "float" else "exact quantised model"
        logger.info(f"test accuracy ({what}, {len(data.test_set)} test images): "
                    f"{test_acc:.2f}% -> {run_dir / 'results.json'}")
    error = None if agree else "error: processes ended with different parameters or noise"
    if accelerator.num_processes > 1:
        # Leave without tearing gloo down: freeing DDP's reducer joins gloo's worker threads while
        # holding the GIL, and a worker still freeing its last tensor waits for that GIL, so a
        # finished run sometimes never returns (seen with torch 2.5 to 2.8 on CPUs). Everything
        # is written and the trackers are closed by now.
        if error:
            print(error, file=sys.stderr)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if error else 0)
    if error:
        sys.exit(error)


if __name__ == "__main__":
    main()
