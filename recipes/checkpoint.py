"""Rebuilding a trained network from what the recipes write: a run directory (``model.pt``, or
its latest ``checkpoints/checkpoint_<epoch>``), one checkpoint directory, or a weights file.

The network is rebuilt from the model spec written beside the weights (``model_spec.json``:
``{"name": ..., "kwargs": {...}}``, through :func:`models.create_model`), so no training config
is needed; runs written before specs existed fall back to the run's ``config.json``. Every
failure names the file or field at fault."""
from __future__ import annotations

import argparse
import contextlib
import json
import re
from pathlib import Path
from typing import Optional, Tuple

import brevitas.config
import torch

from brevitas_ana.export.export_qnn import atomic_write
from brevitas_ana.recipes.config import held_out
from brevitas_ana.recipes.models import create_model, describe, model_spec

SPEC_FILE = "model_spec.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")


class CheckpointError(ValueError):
    """A run, checkpoint, spec or weights file that cannot be loaded; the message names it."""


def write_text(path, text: str):
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_spec(folder: Path, spec: dict):
    """``folder/model_spec.json``."""
    write_text(Path(folder) / SPEC_FILE, json.dumps(spec, indent=2))


def read_spec(path: Path) -> dict:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable model spec: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) \
            or not isinstance(spec.get("kwargs", {}), dict):
        raise CheckpointError(f"{path}: a model spec is {{\"name\": str, \"kwargs\": {{...}}}}")
    spec.setdefault("kwargs", {})
    return spec


def spec_from_config(path: Path) -> dict:
    """The model spec of a recipe config: a YAML file, or a run's config.json."""
    from brevitas_ana.recipes.config import ConfigError, from_dict, parse_args
    if not path.is_file():
        raise CheckpointError(f"--config: {path} does not exist")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            cfg = from_dict(data)
        else:
            cfg = parse_args(["--config", str(path)])
        return model_spec(cfg.model, cfg.ana.options())
    except (ConfigError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"config {path}: {e}") from None


COMPLETE = "COMPLETE"  # written last into a checkpoint folder (see save_checkpoint)


def _number(path: Path) -> int:
    return int(path.name.rpartition("_")[2])


def checkpoints(run_dir: Path, complete: bool = True):
    """Checkpoint folders (``checkpoint_<epoch>``), oldest
    first: the complete ones, or (``complete=False``) the ones a stopped run left half-written."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")
             and (p / COMPLETE).is_file() == complete]
    return sorted(found, key=_number)


def load_problem(e: Exception) -> str:
    """What went wrong reading a file, in one line: torch's own verdict, without its advice to
    load with ``weights_only=False`` (an unsafe step, for a file that is simply corrupt or not
    a set of weights)."""
    text = str(e)
    if "Weights only load failed" in text:
        detail = " ".join(text.partition("WeightsUnpickler error:")[2].split("Check the")[0]
                          .split())
        return (f"holds something other than tensors and plain values ({detail or 'unknown'}"
                f"): corrupt, or not a weights file")
    first = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
    sentence = first.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {sentence[:200]}"


def load_pickle(path: Path):
    """A ``torch.save`` file as accelerate loads it: ``weights_only=True`` with the few numpy
    and RNG-state globals accelerate allows, and nothing else."""
    from accelerate.utils import load
    return load(path, map_location="cpu")


def _check_file(path: Path):
    """Read one file of a checkpoint whole, as a resume will; CheckpointError naming it when it
    is unreadable."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            load_file(str(path))
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.name != COMPLETE:  # accelerate's .bin / .pkl files are torch.save pickles
            load_pickle(path)
    except Exception as e:  # truncated, corrupt, not what it says it is
        raise CheckpointError(f"{path} is unreadable ({load_problem(e)})") from None


REQUIRED = (("model.safetensors", "pytorch_model.bin"), ("optimizer.bin",),
            ("random_states_0.pkl",))


def verify_checkpoint(folder: Path):
    """Every file of a checkpoint folder reads, and the ones a resume needs are there;
    otherwise CheckpointError naming the file and the newest checkpoint that is usable."""
    folder = Path(folder)
    try:
        for names in REQUIRED:
            if not any((folder / n).is_file() for n in names):
                raise CheckpointError(f"{folder / names[0]} is missing")
        for path in sorted(folder.iterdir()):
            if path.is_file():
                _check_file(path)
    except CheckpointError as e:
        try:
            older = [c for c in checkpoints(folder.parent.parent)
                     if _number(c) < _number(folder)]
        except ValueError:  # a folder given by path, outside a run's checkpoints/
            older = []
        usable = next((c for c in reversed(older) if _usable(c)), None)
        hint = (f"the newest usable checkpoint is {usable} (--resume {usable})" if usable else
                "no older checkpoint of this run is usable")
        raise CheckpointError(f"{e}; {hint}") from None


def _usable(folder: Path) -> bool:
    try:
        verify_checkpoint(folder)
        return True
    except CheckpointError:
        return False


def _weights_in(folder: Path) -> Optional[Path]:
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)


def locate(checkpoint, flag: str = "--checkpoint") -> Tuple[Path, Optional[Path]]:
    """(weights file, the run's config.json or None) for a run dir, checkpoint dir or file;
    errors name ``flag``."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"{flag}: {path} does not exist")
    if path.is_file():
        cfg = path.parent / "config.json"
        if not cfg.is_file() and path.parent.parent.name == "checkpoints":  # a checkpoint's file
            cfg = path.parents[2] / "config.json"
        return path, cfg if cfg.is_file() else None
    run_cfg = path / "config.json" if (path / "config.json").is_file() else None
    if (path / "model.pt").is_file():  # a finished run
        return path / "model.pt", run_cfg
    if (path / "checkpoints").is_dir() or run_cfg is not None:  # a run directory
        for ckpt in reversed(checkpoints(path)):
            weights = _weights_in(ckpt)
            if weights:
                return weights, run_cfg
        raise CheckpointError(f"{flag}: {path} was never trained: no model.pt and no "
                              f"complete checkpoint in checkpoints/ (training stopped before its "
                              f"first epoch ended?)")
    weights = _weights_in(path)
    if weights is None:
        raise CheckpointError(f"{flag}: {path} is neither a run directory (config.json) nor "
                              f"a checkpoint directory ({' / '.join(WEIGHT_FILES)})")
    cfg = path.parent.parent / "config.json"
    return weights, cfg if cfg.is_file() else None


def read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            # timm's train script saves its argparse.Namespace beside the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's and safetensors' messages run over several lines
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): "
                              f"{load_problem(e)}") from None
    for key in ("model", "state_dict"):  # accelerate's and timm's train scripts' wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a model state_dict (expected a mapping of tensors)")
    return state


def _trained_spec(weights: Path, run_config: Optional[Path]) -> Tuple[Optional[dict], str]:
    """(spec, where it came from): beside the weights, in the run directory, else the run's
    config.json (runs written before specs)."""
    for folder in (weights.parent, weights.parent.parent.parent):
        if (folder / SPEC_FILE).is_file():
            return read_spec(folder / SPEC_FILE), str(folder / SPEC_FILE)
    if run_config is not None:
        return spec_from_config(run_config), str(run_config)
    return None, ""


def load_trained(checkpoint, config=None):
    """(model in eval mode, spec, weights path). ``config`` (a recipe YAML or JSON) is needed
    only for a weights file with no spec or run config near it; when both exist, the networks
    they describe must agree."""
    weights, run_config = locate(checkpoint)
    spec, where = _trained_spec(weights, run_config)
    if config is not None:
        given = spec_from_config(Path(config))
        if spec is not None:
            diff = [f"{k}: {given['kwargs'].get(k)!r} in {config}, "
                    f"{spec['kwargs'].get(k)!r} in {where}"
                    for k in dict.fromkeys(list(given["kwargs"]) + list(spec["kwargs"]))
                    if k != "ana" and given["kwargs"].get(k) != spec["kwargs"].get(k)]
            if given["name"] != spec["name"]:
                diff.insert(0, f"model: {given['name']!r} in {config}, {spec['name']!r} in "
                               f"{where}")
            if diff:
                raise CheckpointError("--config does not describe the trained network: " +
                                      "; ".join(diff))
        spec = given
    if spec is None:
        raise CheckpointError(f"--checkpoint: no {SPEC_FILE} or config.json beside {weights}; "
                              f"pass --config")
    state = read_state_dict(weights)
    try:
        model = create_model(spec["name"], **spec["kwargs"])
    except ValueError as e:
        raise CheckpointError(f"{where or config}: {e}") from None
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{weights}: does not fit a {describe(spec)}: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{weights}: does not fit a {describe(spec)} (architecture mismatch): missing "
            f"{result.missing_keys[:5]}{' ...' if len(result.missing_keys) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}"
            f"{' ...' if len(result.unexpected_keys) > 5 else ''}")
    return model.eval(), spec, weights


# A quantiser's own state (scales, their statistics): what a float network does not have.
_QUANT_STATE = re.compile(r"(^|\.)(weight|bias|input|output|act)_quant\.")
# Wrappers other code puts around a network's names: DDP, torch.compile, EMA / train scripts.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _renamings(source, target):
    """Candidate ``(drop, add)`` prefix pairs mapping ``source`` names onto ``target`` names: as
    they are, a wrapper's prefix dropped, and the prefix the target puts before them (e.g. the
    ``1.`` of ``nn.Sequential(Normalize(), model)``)."""
    out = [("", "")]
    for drop in [""] + [w for w in _WRAPPER_PREFIXES if all(k.startswith(w) for k in source)]:
        names = [k[len(drop):] for k in source]
        adds = {}
        for k in names[:50]:
            for t in target:
                if t.endswith("." + k):
                    adds[t[:-len(k)]] = adds.get(t[:-len(k)], 0) + 1
        out += [(drop, "")] + [(drop, a) for a in sorted(adds, key=adds.get, reverse=True)[:3]]
    return list(dict.fromkeys(out))


@contextlib.contextmanager
def _full_state_dict():
    """Brevitas' state_dict with the scales it leaves out until their first forward (a new
    network's placeholders): the names and shapes a file may fill."""
    saved = brevitas.config._FULL_STATE_DICT
    brevitas.config._FULL_STATE_DICT = True
    try:
        yield
    finally:
        brevitas.config._FULL_STATE_DICT = saved


def held_out_of(config: Path) -> Optional[Tuple[int, int]]:
    """``held_out`` of a recipe run's config.json; None when the file is not one."""
    try:
        return held_out(json.loads(Path(config).read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_held_out(source, val_split: int, split_seed: int, flag: str = "--init-from"):
    """Refuse to start from a run that trained on images this run validates on: with
    ``val_split`` > 0 the source run (when it is one of this recipe's runs: its config.json)
    must have drawn its held-out images with the same split seed and held out at least as many
    (the held-out images are the first ``val_split`` of one permutation); otherwise validation
    would be measured on images the starting weights were trained on. ``CheckpointError``
    naming both settings."""
    if not val_split:
        return
    _, config = locate(source, flag)
    theirs = held_out_of(config) if config is not None else None
    if theirs is None:  # a weights file from elsewhere: nothing says what it was trained on
        return
    if theirs[0] == 0:
        raise CheckpointError(
            f"{flag}: {config.parent} trained on every training image (its data.val_split is "
            f"0), including the {val_split} this run holds out for validation: its validation "
            f"figures would be inflated. Use data.val_split 0 (evaluate on the test set) or "
            f"start from a run that held out the same images")
    if theirs[1] != split_seed or theirs[0] < val_split:
        raise CheckpointError(
            f"{flag}: {config.parent} held out other images (data.val_split {theirs[0]}, split "
            f"seed {theirs[1]}) than this run (data.val_split {val_split}, data.split_seed "
            f"{split_seed}): it trained on part of this run's validation set. Use its "
            f"data.val_split and data.split_seed")


def init_from(model: torch.nn.Module, source, flag: str = "--init-from") -> dict:
    """Load into ``model`` the tensors of ``source`` (a run directory, a checkpoint folder, a
    weights file, or a timm checkpoint ``.pth`` / ``.safetensors``), matched by name; a
    wrapper's prefix (``module.``) or the network's own (a preprocessing wrapper's ``1.``) is
    matched up. Returns ``{"path", "loaded", "new", "ignored"}``: the network's tensors loaded
    (trained scales included), those not in the file (only a quantiser's state may be: its
    scales are then estimated afresh from data) and the file's tensors the network has no
    place for. Never partial: ``CheckpointError`` naming the tensor when a shape differs or a
    weight of the network is missing, and naming the file when nothing matches; ``model`` is
    unchanged then."""
    weights, _ = locate(source, flag)
    try:
        state = read_state_dict(weights)
    except CheckpointError as e:
        raise CheckpointError(f"{flag}: {e}") from None
    with _full_state_dict():
        target = model.state_dict()
    drop, add = max(_renamings(list(state), list(target)),
                    key=lambda r: sum(r[1] + k[len(r[0]):] in target for k in state))
    mapped = {add + k[len(drop):]: k for k in state}
    loaded = [t for t in target if t in mapped]
    if not loaded:
        raise CheckpointError(f"{flag}: {weights}: no tensor of it has a place in the network "
                              f"(its names: {list(state)[:3]} ...; the network's: "
                              f"{list(target)[:3]} ...)")
    for t in loaded:
        if tuple(state[mapped[t]].shape) != tuple(target[t].shape):
            raise CheckpointError(
                f"{flag}: {mapped[t]}: shape {list(state[mapped[t]].shape)} in {weights}, "
                f"{list(target[t].shape)} in the network")
    new = [t for t in target if t not in mapped]
    missing = [t for t in new if not _QUANT_STATE.search(t)]
    if missing:
        raise CheckpointError(
            f"{flag}: {weights} has no {missing[0]}" + (f" (nor {len(missing) - 1} other "
                                                        f"tensors of the network)"
                                                        if len(missing) > 1 else "") +
            ": a different network? (only quantiser scales may be missing)")
    ignored = [k for t, k in mapped.items() if t not in target]
    # only what the file holds: a scale given no value keeps collecting its statistics
    result = model.load_state_dict({t: state[mapped[t]] for t in loaded}, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{flag}: {weights}: the network refused "
                              f"{result.unexpected_keys[:3]}")
    return {"path": str(weights), "loaded": loaded, "new": new, "ignored": ignored}


def describe_init(report: dict) -> str:
    """``--init-from``'s report in a few lines, for the log."""
    lines = [f"--init-from {report['path']}: {len(report['loaded'])} tensors loaded, "
             f"{len(report['new'])} newly initialised, {len(report['ignored'])} ignored"]
    if report["new"]:
        lines.append(f"  newly initialised (quantiser state): {', '.join(report['new'][:6])}"
                     + (" ..." if len(report["new"]) > 6 else ""))
    if report["ignored"]:
        lines.append(f"  ignored (no place in the network): {', '.join(report['ignored'][:6])}"
                     + (" ..." if len(report["ignored"]) > 6 else ""))
    return "\n".join(lines)


class RuntimeStatsState:
    """The statistics phase of Brevitas' activation scales, for exact resumes.

    ``ParameterFromRuntimeStatsScaling`` averages its input's statistics over the first
    ``collect_stats_steps`` training steps (300 by default) before it learns the scale. Its
    ``state_dict`` keeps only the average so far, as the learned value, and loading one ends the
    phase; so a run resumed inside the phase would continue with another scale. This object
    (registered with ``accelerator.register_for_checkpointing``) saves each such module's step
    counter, running buffer and value, and puts them back after the model's weights are loaded.
    Modules are looked up by name at each call: Brevitas rebuilds quantiser modules on load."""

    def __init__(self, model):
        self.model = model

    def _modules(self) -> dict:
        from brevitas.core.scaling import ParameterFromRuntimeStatsScaling
        return {name: m for name, m in self.model.named_modules()
                if isinstance(m, ParameterFromRuntimeStatsScaling)}

    def state_dict(self) -> dict:
        return {name: {"counter": int(m.counter), "buffer": m.buffer.detach().cpu().clone(),
                       "value": m.value.detach().cpu().clone()}
                for name, m in self._modules().items()}

    def load_state_dict(self, state: dict):
        modules = self._modules()
        if sorted(state) != sorted(modules):
            raise CheckpointError(f"activation-scale statistics saved for {len(state)} "
                                  f"module(s), the network has {len(modules)}")
        with torch.no_grad():
            for name, saved in state.items():
                m = modules[name]
                m.counter = int(saved["counter"])
                m.buffer.copy_(saved["buffer"])
                m.value.copy_(saved["value"])
