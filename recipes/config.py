"""Recipe configuration, parsed by jsonargparse: five sections (``model``, ``ana``, ``optim``,
``data``, ``run``), YAML files that compose, every key overridable on the command line.

    python recipes/train_cifar10.py --config recipes/configs/cnv_w1a1.yaml --optim.epochs 3
    python recipes/train_cifar10.py --config base.yaml --config mine.yaml   # later files win
    python recipes/train_cifar10.py --help                                  # every key, typed

The defaults below are the ``cnv_w2a2`` recipe; a config file states only what differs (the
CNV W1A1 file is two lines). Each key also has its short flat flag, as before the sections
(``--epochs 3`` is ``--optim.epochs 3``, ``--model vgg8`` is ``--model.name vgg8``,
``--no-export`` is ``--run.export false``). The controller's ``groups`` and per-group
``schedules`` (:class:`brevitas_ana.AnaController`) go in the ``ana`` section. Unknown keys,
wrong types and out-of-range values are errors naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt

import brevitas_ana
from brevitas_ana.options import DEFAULT_ANNEAL_END, DEFAULT_PRESET
from brevitas_ana.recipes.data import PAD
from brevitas_ana.recipes.models import list_models



class ConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    """The network and its quantisers.

    Args:
        name: a registered recipe network (recipes/models.py: cnv, vgg8, resnet18)
        weight_bit_width: weight bits (cnv, resnet18)
        act_bit_width: activation bits (cnv, resnet18)
        in_bit_width: input quantiser bits (cnv)
        quantiser: ana; ste, the same network with stock Brevitas quantisers (the baseline); or
            float, its float twin (quantisers relaxed to clamps, same parameter names)
        init_from: start from the tensors of a run directory, a checkpoint folder, a weights
            file or a timm checkpoint (.pth / .safetensors), matched by name (quantiser scales
            may be missing: estimated afresh); not a resume (--resume continues a run)
        calibrate: batches of training images run through Brevitas' calibration_mode before
            training, to set the activation scales from data; 0: none
        norm_correction: after calibration, Brevitas' norm_correction_mode re-estimates every
            BatchNorm's statistics on the quantised network, on the same batches (needs
            calibrate > 0 and init_from)
    """
    name: str = "cnv"
    weight_bit_width: PositiveInt = 2
    act_bit_width: PositiveInt = 2
    in_bit_width: PositiveInt = 8
    quantiser: Literal["ana", "ste", "float"] = "ana"
    init_from: Optional[str] = None
    calibrate: NonNegativeInt = 0
    norm_correction: bool = False


@dataclass(frozen=True)
class AnaSection(brevitas_ana.AnaConfig):
    """ANA noise and its annealing: brevitas_ana.AnaConfig and the controller's fields.

    The library's own defaults (brevitas_ana/options.py): one set, nothing restated here.

    Args:
        noise: noise family (uniform, triangular, normal, logistic, or a registered one)
        strategy: training forward: expectation, mode or random
        annealed_grad: gradient once the noise is 0: ste or zero
        sigma: starting noise std in steps; null: the family's default
        mu: noise mean in steps (0.5: the reference's dynamic mean)
        backward: backward policy: exact, floor or schedule
        sigma_grad_min: backward floor (std, steps); null: the family's starting noise
        preset: annealing preset (homogeneous, progressive, partition, same_start, same_end,
            static)
        anneal_end: every window ends at this fraction of the run, in (0, 1]
        groups: {group: [name patterns]} instead of one group per layer
        schedules: {group or "*": {"sigma" / "mu" / "sigma_grad": schedule dict}}
    """
    preset: Literal[brevitas_ana.PRESETS] = DEFAULT_PRESET
    anneal_end: float = DEFAULT_ANNEAL_END
    groups: Optional[Dict[str, List[str]]] = None
    schedules: Optional[Dict[str, Dict[str, dict]]] = None

    def options(self) -> brevitas_ana.AnaConfig:
        """The section's ANA options (its other keys are the controller's)."""
        return brevitas_ana.AnaConfig(**{f.name: getattr(self, f.name)
                                         for f in dataclasses.fields(brevitas_ana.AnaConfig)})


@dataclass
class OptimSection:
    """Optimisation (defaults: bnn_pynq's CNV recipe).

    Args:
        epochs: training epochs
        batch_size: images per optimiser step (per process)
        optimizer: adam or sgd
        lr: learning rate
        momentum: SGD momentum
        weight_decay: weight decay
        lr_schedule: step, multistep, cosine, constant (per epoch) or onecycle (per step:
            torch's OneCycleLR, warm-up to lr then down to ~0 at the last step)
        lr_step_epochs: step schedule: epochs between drops
        lr_milestones: multistep schedule: epochs of the drops
        lr_gamma: factor of each drop
        lr_pct_start: onecycle: fraction of the steps spent warming up
        lr_anneal: onecycle: shape of the way down, linear or cos
        loss: cross_entropy or sqr_hinge
        label_smoothing: cross_entropy: label smoothing in [0, 1)
        clip_weights: clamp Conv/Linear weights to [-c, c] after each step; null: no clamp
        max_steps: stop after this many optimiser steps; null: all epochs
    """
    epochs: PositiveInt = 500
    batch_size: PositiveInt = 100
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: NonNegativeFloat = 0.02
    momentum: NonNegativeFloat = 0.9
    weight_decay: NonNegativeFloat = 0.0
    lr_schedule: Literal["step", "multistep", "cosine", "constant", "onecycle"] = "step"
    lr_step_epochs: PositiveInt = 40
    lr_milestones: List[int] = field(default_factory=list)
    lr_gamma: NonNegativeFloat = 0.5
    lr_pct_start: float = 0.25
    lr_anneal: Literal["linear", "cos"] = "linear"
    loss: Literal["cross_entropy", "sqr_hinge"] = "sqr_hinge"
    label_smoothing: float = 0.0
    clip_weights: Optional[NonNegativeFloat] = 1.0
    max_steps: Optional[PositiveInt] = None


@dataclass
class DataSection:
    """CIFAR-10.

    Args:
        data_dir: folder holding (or to receive) cifar-10-batches-py
        download: download CIFAR-10 when it is missing
        val_split: training images held out for evaluation each epoch (0: the test set)
        split_seed: seed of the permutation that picks the held-out images; apart from
            run.seed, so that runs of every seed, and a fine-tuning and the run it starts from,
            hold out the same images
        subset: train on the first N training images
        loader: resident (images on the training device, batched crop and flip) or workers
            (a torch DataLoader with per-image transforms)
        num_workers: data-loader worker processes (workers loader; evaluation)
        crop_pad: random crop of the training images: zero padding in pixels on each side
            before cropping back to 32 x 32 (0: no crop, flips only); at most 16
    """
    data_dir: str = "./data"
    download: bool = True
    val_split: NonNegativeInt = 0
    split_seed: NonNegativeInt = 0
    subset: Optional[PositiveInt] = None
    loader: Literal["resident", "workers"] = "resident"
    num_workers: NonNegativeInt = 2
    crop_pad: NonNegativeInt = PAD


@dataclass
class RunSection:
    """Where and how the run goes.

    Args:
        output_dir: the run directory
        seed: seed of everything random
        mixed_precision: no, bf16 or fp16
        resume: latest, a checkpoint directory or a run directory
        overwrite: replace what output_dir holds (removed once the new run starts, each item
            named); without it a non-empty output_dir must be resumed
        export: export and validate the trained network at the end
        keep_checkpoints: checkpoints kept (the newest)
    """
    output_dir: str = "runs/cnv_w2a2"
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    resume: Optional[str] = None
    overwrite: bool = False
    export: bool = True
    keep_checkpoints: PositiveInt = 2


@dataclass
class RecipeConfig:
    model: ModelSection = field(default_factory=ModelSection)
    ana: AnaSection = field(default_factory=AnaSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    run: RunSection = field(default_factory=RunSection)


_CLASSES = {"model": ModelSection, "ana": AnaSection, "optim": OptimSection,
            "data": DataSection, "run": RunSection}
# the flat flag of every key: --epochs is --optim.epochs, --model is --model.name
FLAT = {("model" if (s, f.name) == ("model", "name") else f.name): f"{s}.{f.name}"
        for s, cls in _CLASSES.items() for f in dataclasses.fields(cls)}
BOOLEANS = {k for s, cls in _CLASSES.items() for f in dataclasses.fields(cls)
            for k in [("model" if f.name == "name" else f.name)] if f.type in (bool, "bool")}


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with lines never broken inside a flag (``--no-`` / ``download``)."""

    def _fill_text(self, text, width, indent):
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def parser() -> ArgumentParser:
    flat_flags = ", ".join(f"--{k.replace('_', '-')}" + (" / --no-" + k.replace('_', '-')
                                                        if k in BOOLEANS else "")
                           for k in FLAT)
    p = ArgumentParser(prog="train_cifar10.py", exit_on_error=False, env_prefix=False,
                       formatter_class=_HelpFormatter,
                       description="Train a QNN on CIFAR-10 with ANA (or stock STE) quantisers.",
                       epilog="Every key also has a flat flag, the key's name with dashes (--epochs "
                              "3 is --optim.epochs 3, --model vgg8 is --model.name vgg8; a "
                              "boolean takes true/false or none, --no-X sets it false): "
                              + flat_flags + ".")
    p.add_argument("--config", action=ActionConfigFile,
                   help="YAML config file(s), later ones override earlier ones "
                        "(recipes/configs/*.yaml)")
    for name, cls in _CLASSES.items():
        p.add_class_arguments(cls, name, help=cls.__doc__.split("\n")[0])
    for action in p._actions:  # jsonargparse's per-section file options
        if action.option_strings == ["--model"]:  # taken by the flat flag (_translate)
            action.metavar = "NAME"
            action.help = "the network: --model NAME is --model.name NAME"
        elif action.option_strings in [[f"--{name}"] for name in _CLASSES]:
            action.help = f"a YAML file holding only the {action.dest} section's keys"
    return p


BOOLEAN_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")


def _translate(argv: List[str]) -> List[str]:
    """Flat flags (--epochs, --data-dir, --no-export, --model) to their section keys; a flat
    boolean takes an optional value (``--download``, ``--download false``, ``--no-download``)."""
    out = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and "." not in flag and flag != "--config":
            name = flag[2:].replace("-", "_")
            negated = name.startswith("no_") and name[3:] in BOOLEANS
            if negated:
                out += [f"--{FLAT[name[3:]]}", "false"]
                continue
            if name in BOOLEANS and not eq:
                given = i < len(argv) and argv[i].lower() in BOOLEAN_WORDS
                out += [f"--{FLAT[name]}", argv[i] if given else "true"]
                i += given
                continue
            if name in FLAT:
                out.append(f"--{FLAT[name]}" + (f"={value}" if eq else ""))
                continue
        out.append(arg)
    return out


def validate(cfg: RecipeConfig, whole: bool = True) -> RecipeConfig:
    """What the types cannot say: the model registry, finite numbers, anneal_end in (0, 1]
    (the ANA options checked themselves as the section was built: brevitas_ana.AnaConfig);
    ``whole``: the keys that only make sense together, checked once every file and flag is in
    (one config file may hold one of them and the command line the other)."""
    if cfg.model.name not in list_models():
        raise ConfigError(f"model.name: must be one of {list_models()}, got {cfg.model.name!r}")
    for key in ("ana.anneal_end", "optim.lr",
                "optim.lr_pct_start", "optim.label_smoothing"):
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"{key}: must be finite, got {v!r}")
    if not 0.0 < cfg.optim.lr_pct_start < 1.0:
        raise ConfigError(f"optim.lr_pct_start: must be in (0, 1), got {cfg.optim.lr_pct_start!r}")
    if not 0.0 <= cfg.optim.label_smoothing < 1.0:
        raise ConfigError(f"optim.label_smoothing: must be in [0, 1), got "
                          f"{cfg.optim.label_smoothing!r}")
    if cfg.data.crop_pad > 16:
        raise ConfigError(f"data.crop_pad: must be in [0, 16] (pixels), got {cfg.data.crop_pad!r}")
    if not 0.0 < cfg.ana.anneal_end <= 1.0:
        raise ConfigError(f"ana.anneal_end: must be in (0, 1] (a fraction of the run), got "
                          f"{cfg.ana.anneal_end!r}")
    if whole and cfg.model.norm_correction:
        # it corrects the statistics of loaded float BatchNorms for the quantised network
        needs = [why for why, missing in (
            ("calibrate > 0 (--calibrate N: the batches it re-estimates them on)",
             not cfg.model.calibrate),
            ("init_from (--init-from: the float network whose statistics it corrects)",
             not cfg.model.init_from),
            ("a quantised network (not --quantiser float)", cfg.model.quantiser == "float"))
            if missing]
        if needs:
            raise ConfigError(f"model.norm_correction: needs {'; and '.join(needs)}")
    return cfg


def from_dict(data: dict) -> RecipeConfig:
    """A RecipeConfig from its nested dict (a run's config.json), checked like the command line."""
    p = parser()
    try:
        ns = p.parse_object(data)
        cfg = p.instantiate(ns)
    except Exception as e:  # jsonargparse's ArgumentError / TypeError
        raise ConfigError(_message(e)) from None
    return validate(_recipe(cfg))


def plain(value):
    """``value`` with jsonargparse's restricted types (``PositiveInt``, ``NonNegativeFloat``, ...:
    subclasses of int and float) turned into the built-in ones, through lists and dicts. What
    reaches torch objects must be plain: optimiser and scheduler states are pickled into every
    checkpoint, and accelerate loads them with ``torch.load(weights_only=True)``, which refuses
    any other class."""
    if isinstance(value, bool) or value is None:
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    return value


def _recipe(ns) -> RecipeConfig:
    sections = {}
    for name, cls in _CLASSES.items():
        section = getattr(ns, name)
        sections[name] = cls(**{f.name: plain(getattr(section, f.name))
                                for f in dataclasses.fields(cls)})
    return RecipeConfig(**sections)


_TYPE_WORDS = {"PositiveInt": "an integer > 0", "NonNegativeInt": "an integer >= 0",
               "NonNegativeFloat": "a number >= 0", "int": "an integer", "float": "a number",
               "bool": "true or false", "str": "a string"}


_ANA_FIELDS = [f.name for f in dataclasses.fields(brevitas_ana.AnaConfig)]


def _message(e: Exception) -> str:
    """jsonargparse's error (or AnaConfig's, raised as the ``ana`` section is built) as
    ``key: must be ..., got value``."""
    text = " ".join(str(e).split())
    ana = re.match(r"(\w+):? (.*)", text)
    if isinstance(e, ValueError) and ana and ana.group(1) in _ANA_FIELDS:
        return f"ana.{ana.group(1)}: {ana.group(2)}"
    m = re.match(r'Parser key "([^"]+)": (.*)', text)
    if not m:
        return text
    key, detail = m.groups()
    got = re.search(r"(?:Got value|Given value): (\S+)(?!.*Given value)", detail)
    got = f", got {got.group(1)}" if got else ""
    literal = re.search(r"Literal\[([^\]]*)\]", detail)
    if literal:
        return f"{key}: must be one of [{literal.group(1)}]{got}"
    for name, words in _TYPE_WORDS.items():
        if f"type {name}" in detail or f"<class '{name}'>" in detail:
            optional = "NoneType" in detail
            value = (re.search(r"Not of type \w+: (\S+) does not conform", detail)
                     or re.search(r"(?:literal for \S+ with base 10|convert string to float): "
                                  r"'?([^' ]+)", detail))
            got = got or (f", got {value.group(1)}" if value else "")
            return f"{key}: must be {words}{' or null' if optional else ''}{got}"
    return f"{key}: {detail}"


def _check_file(path: str):
    """A config file exists, is a mapping of sections and keys, and parses on its own; errors
    name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {list(_CLASSES)}")
    unknown = [k for k in data if k not in _CLASSES or not isinstance(data[k], dict)]
    if unknown:
        hints = [("model: {name: ...}" if k == "model" else f"{k} under {FLAT[k].split('.')[0]}:")
                 for k in unknown if k in FLAT]
        raise ConfigError(f"{path}: unknown section(s) {unknown}; the sections are "
                          f"{list(_CLASSES)}" + (f" (put {', '.join(hints)})" if hints else ""))
    try:
        cfg = parser().parse_args(["--config", str(path)])
        validate(_recipe(parser().instantiate(cfg)), whole=False)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:  # jsonargparse's ArgumentError and type errors
        raise ConfigError(f"{path}: {_message(e)}") from None


def _as_typed(message: str, typed: List[str]) -> str:
    """``optim.epochs: ...`` as ``--epochs: ...`` when the user gave the value as that flag."""
    key, sep, rest = message.partition(": ")
    flat_names = [k for k, v in FLAT.items() if v == key]
    for flag in [f"--{key}"] + [f"--{n.replace('_', '-')}" for n in flat_names] + \
            [f"--{n}" for n in flat_names]:
        if any(t == flag or t.startswith(flag + "=") for t in typed):
            return f"{flag}{sep}{rest}"
    return message


def parse_args(argv=None) -> RecipeConfig:
    """``--config FILE ...`` then key overrides; ConfigError naming the file and key (or the
    flag, when the bad value came from the command line)."""
    typed = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    argv = _translate(typed)
    if "-h" in argv or "--help" in argv:
        parser().parse_args(["--help"])
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            _check_file(argv[i + 1])
        elif arg.startswith("--config="):
            _check_file(arg.partition("=")[2])
    p = parser()
    try:
        cfg = p.instantiate(p.parse_args(argv))
    except Exception as e:  # jsonargparse's ArgumentError and type errors
        raise ConfigError(_as_typed(_message(e), typed)) from None
    try:
        return validate(_recipe(cfg))
    except ConfigError as e:
        raise ConfigError(_as_typed(str(e), typed)) from None


def to_dict(cfg: RecipeConfig) -> dict:
    return dataclasses.asdict(cfg)


def held_out(config) -> Tuple[int, int]:
    """(val_split, split seed): which training images a run holds out for validation, from a
    RecipeConfig or its dict (a run's config.json); (0, 0) when it holds out none. A run from
    before ``data.split_seed`` drew them with ``run.seed``."""
    c = to_dict(config) if isinstance(config, RecipeConfig) else config
    val_split = c["data"].get("val_split") or 0
    if not val_split:
        return 0, 0
    split_seed = c["data"].get("split_seed")
    return val_split, c["run"].get("seed", 0) if split_seed is None else split_seed


def flat(config) -> dict:
    """{flat key: value} of a RecipeConfig or its dict (a run's config.json); a key the run's
    version did not have yet is None (such a run is not the same as one with the key set)."""
    data = to_dict(config) if isinstance(config, RecipeConfig) else dict(config)
    missing = [s for s in _CLASSES if not isinstance(data.get(s), dict)]
    if missing:
        raise ConfigError(f"a recipe config has the sections {list(_CLASSES)}; missing "
                          f"{missing}")
    return {k: data[s].get("name" if k == "model" else k) for k, s in
            ((k, v.split(".")[0]) for k, v in FLAT.items())}
