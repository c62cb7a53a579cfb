"""Recipe configuration: a YAML file, every field overridable as ``--field-name value``.

Values given on the command line are parsed as YAML scalars/lists (``--lr 1e-3``,
``--clip-weights null``, ``--lr-milestones [400]``); booleans also take ``--export`` /
``--no-export``. Unknown or mistyped keys, in the file or on the command line, are errors that
name the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml

import brevitas_ana
from brevitas_ana.functional import ANNEALED_GRADS, STRATEGIES
from brevitas_ana.recipes.models import list_models

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "cnv_w2a2.yaml"


@dataclass
class Config:
    # network and quantisers
    model: str = "cnv"                  # cnv | vgg8 | resnet18
    weight_bit_width: int = 2
    act_bit_width: int = 2
    in_bit_width: int = 8
    quantiser: str = "ana"              # ana | ste (stock Brevitas, the baseline)
    # ANA noise and its annealing
    noise: str = "uniform"
    strategy: str = "expectation"
    annealed_grad: str = "ste"
    sigma: Optional[float] = None       # starting noise std (steps); null: the family's default
    mu: float = 0.0                     # 0.5: the reference's dynamic mean ("anneal to H+")
    preset: str = "progressive"
    anneal_end: float = 0.7             # every window ends at this fraction of the run
    backward: str = "floor"             # exact | floor | schedule (backward smoothing policy)
    sigma_grad_min: Optional[float] = None  # backward floor (steps); null: the family's default
    # optimisation
    epochs: int = 500
    batch_size: int = 100
    optimizer: str = "adam"             # adam | sgd
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "step"           # step | multistep | cosine | constant
    lr_step_epochs: int = 40
    lr_milestones: List[int] = field(default_factory=list)
    lr_gamma: float = 0.5
    loss: str = "cross_entropy"         # cross_entropy | sqr_hinge
    clip_weights: Optional[float] = 1.0  # clamp weights to [-c, c] after each step (bnn_pynq)
    # data
    data_dir: str = "./data"
    download: bool = True
    val_split: int = 0
    subset: Optional[int] = None
    max_steps: Optional[int] = None
    num_workers: int = 2
    seed: int = 0
    # run
    output_dir: str = "runs/cnv_w2a2"
    mixed_precision: str = "no"         # no | bf16 | fp16
    resume: Optional[str] = None        # checkpoint dir, run dir, or "latest"
    export: bool = True
    keep_checkpoints: int = 2


CHOICES = {
    "model": tuple(list_models()), "quantiser": ("ana", "ste"),
    "strategy": STRATEGIES, "annealed_grad": ANNEALED_GRADS, "preset": brevitas_ana.PRESETS,
    "backward": brevitas_ana.BACKWARD_POLICIES,
    "optimizer": ("adam", "sgd"), "lr_schedule": ("step", "multistep", "cosine", "constant"),
    "loss": ("cross_entropy", "sqr_hinge"), "mixed_precision": ("no", "bf16", "fp16"),
}
POSITIVE = ("weight_bit_width", "act_bit_width", "in_bit_width", "epochs", "batch_size",
            "lr_step_epochs", "subset", "max_steps", "keep_checkpoints")
NON_NEGATIVE = ("sigma", "sigma_grad_min", "lr", "weight_decay", "momentum", "lr_gamma", "clip_weights",
                "val_split", "num_workers")
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


class ConfigError(ValueError):
    pass


def _check_type(name, value, where):
    hint = typing.get_type_hints(Config)[name]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = [a for a in typing.get_args(hint) if a is not type(None)][0] if optional else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {name} must not be null")
    if typing.get_origin(base) in (list, List):
        if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
            raise ConfigError(f"{where}: {name} must be a list of integers, got {value!r}")
        return value
    if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}") from None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: {name} must be an integer, got {value!r}")
    if not isinstance(value, base):
        raise ConfigError(f"{where}: {name} must be a {base.__name__}, got {value!r}")
    return value


def validate(cfg: Config, where: str = "config") -> Config:
    for name in FIELDS:
        setattr(cfg, name, _check_type(name, getattr(cfg, name), where))
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{where}: {name} must be one of {list(choices)}, got "
                              f"{getattr(cfg, name)!r}")
    if cfg.noise not in brevitas_ana.noise.noise_families():
        raise ConfigError(f"{where}: noise must be one of "
                          f"{list(brevitas_ana.noise.noise_families())}, got {cfg.noise!r}")
    for name in POSITIVE:
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            raise ConfigError(f"{where}: {name} must be > 0, got {v!r}")
    for name in NON_NEGATIVE:
        v = getattr(cfg, name)
        if v is not None and not v >= 0:  # "not >=" also catches nan
            raise ConfigError(f"{where}: {name} must be >= 0, got {v!r}")
    for name in ("sigma", "sigma_grad_min", "mu", "anneal_end", "lr"):
        v = getattr(cfg, name)
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"{where}: {name} must be finite, got {v!r}")
    if not 0.0 < cfg.anneal_end <= 1.0:
        raise ConfigError(f"{where}: anneal_end must be in (0, 1] (a fraction of the run), got "
                          f"{cfg.anneal_end!r}")
    return cfg


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown config key(s) {unknown}")
    return data


def _yaml_value(text):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_args(argv=None) -> Config:
    """``--config FILE`` (default: cnv_w2a2) then ``--field-name value`` overrides."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=str(DEFAULT_CONFIG))
    known, _ = pre.parse_known_args(argv)
    values = load_yaml(known.config)

    parser = argparse.ArgumentParser(
        prog="train_cifar10.py", allow_abbrev=False,
        description="Train a QNN on CIFAR-10 with ANA (or stock STE) quantisers.",
        epilog="Every config key can be overridden, e.g. --epochs 1 --lr 1e-3 --no-export.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if typing.get_type_hints(Config)[name] is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS)
        else:  # SUPPRESS: absent unless given, so that "--clip-weights null" can set None
            parser.add_argument(flag, dest=name, type=_yaml_value, default=argparse.SUPPRESS,
                                metavar=name.upper())
    args = parser.parse_args(argv)
    merged = dict(values)
    merged.update({k: v for k, v in vars(args).items() if k in FIELDS})
    cfg = Config(**merged)
    return validate(cfg, where=known.config)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
