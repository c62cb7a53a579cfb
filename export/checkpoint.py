"""Rebuilding a trained network from what the recipes write: a run directory (``config.json`` +
``model.pt``, or its latest ``checkpoints/epoch_NNNN``), one checkpoint directory, or a weights
file with a config. Every failure names the file or field at fault."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import torch

from brevitas_ana.export.graphs import ExportError

# The config fields that decide the network's architecture and quantisers.
MODEL_FIELDS = ("model", "weight_bit_width", "act_bit_width", "in_bit_width", "quantiser")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")


class CheckpointError(ExportError):
    pass


def _read_config(path: Path) -> dict:
    """A recipe config (YAML or the run's config.json), validated like the recipe does."""
    from brevitas_ana.recipes.config import FIELDS, Config, ConfigError, load_yaml, validate
    if not path.is_file():
        raise CheckpointError(f"--config: {path} does not exist")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            unknown = sorted(set(data) - set(FIELDS))
            if unknown:
                raise ConfigError(f"{path}: unknown config key(s) {unknown}")
        else:
            data = load_yaml(path)
        return validate(Config(**data), where=str(path))
    except (ConfigError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"config {path}: {e}") from None


def _weights_in(folder: Path) -> Optional[Path]:
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)


def locate(checkpoint) -> Tuple[Path, Optional[Path]]:
    """(weights file, the run's config.json or None) for a run dir, checkpoint dir or file."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"--checkpoint: {path} does not exist")
    if path.is_file():
        cfg = path.parent / "config.json"
        return path, cfg if cfg.is_file() else None
    if (path / "config.json").is_file():  # a run directory
        if (path / "model.pt").is_file():
            return path / "model.pt", path / "config.json"
        epochs = sorted((path / "checkpoints").glob("epoch_*")) if (path / "checkpoints").is_dir() \
            else []
        for ckpt in reversed(epochs):
            weights = _weights_in(ckpt)
            if weights:
                return weights, path / "config.json"
        raise CheckpointError(f"--checkpoint: {path} was never trained: no model.pt and no "
                              f"checkpoints/epoch_* with weights (training stopped before its "
                              f"first epoch ended?)")
    weights = _weights_in(path)
    if weights is None:
        raise CheckpointError(f"--checkpoint: {path} is neither a run directory (config.json) nor "
                              f"a checkpoint directory ({' / '.join(WEIGHT_FILES)})")
    cfg = path.parent.parent / "config.json"
    return weights, cfg if cfg.is_file() else None


def read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): "
                              f"{type(e).__name__}: {e}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a model state_dict (expected a mapping of tensors)")
    return state


def load_trained(checkpoint, config=None):
    """(model in eval mode, Config, weights path). ``config`` (YAML or JSON) defaults to the run's
    config.json; when both exist, their architecture fields must agree."""
    from brevitas_ana.recipes.models import build_model

    weights, run_config = locate(checkpoint)
    if config is None and run_config is None:
        raise CheckpointError(f"--checkpoint: no config.json beside {weights}; pass --config")
    cfg = _read_config(Path(config) if config is not None else run_config)
    if config is not None and run_config is not None:
        trained = _read_config(run_config)
        diff = [f"{k}: {getattr(cfg, k)!r} in {config}, {getattr(trained, k)!r} in {run_config}"
                for k in MODEL_FIELDS if getattr(cfg, k) != getattr(trained, k)]
        if diff:
            raise CheckpointError("--config does not describe the trained network: " +
                                  "; ".join(diff))
    state = read_state_dict(weights)
    model = build_model(cfg)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{weights}: does not fit a {cfg.model} with "
                              f"W{cfg.weight_bit_width}A{cfg.act_bit_width}: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{weights}: does not fit a {cfg.model} with W{cfg.weight_bit_width}"
            f"A{cfg.act_bit_width} (architecture mismatch): missing {result.missing_keys[:5]}"
            f"{' ...' if len(result.missing_keys) > 5 else ''}, unexpected "
            f"{result.unexpected_keys[:5]}{' ...' if len(result.unexpected_keys) > 5 else ''}")
    return model.eval(), cfg, weights
