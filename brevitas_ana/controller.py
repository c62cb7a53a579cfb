"""The ANA controller: where each quantiser's sigma(t) and mu(t) come from.

It finds the model's ANA quantisers, orders them by the order a forward pass reaches them (input
first), groups them by layer (or by name patterns), gives every group a schedule from a preset, and
on every :meth:`AnaController.step` writes ``sigma = sigma0 * g_sigma(t)`` and
``mu = mu0 * g_mu(t)`` into the group's quantisers. Every rank of a distributed run steps the
same deterministic schedule, so all ranks hold identical noise without communication.

Presets, for ``n`` groups ``l = 0 .. n-1`` (input first), annealing time ``T = anneal_end *
total_steps`` and period ``P = T/n`` (the paper's experiment design, in which every window ends at
epoch 350 of 500, ``anneal_end = 0.7``, and the rest of the run trains noise-free; windows are
:class:`~brevitas_ana.schedules.Window`):

============= ========================== ===============================================
preset        window of group l          exponents (sigma, mu)
============= ========================== ===============================================
homogeneous   [0, T]                     (2, 1) for every group: the unsynchronised case
progressive   [0, T]                     (2 (n - l), n - l): input-side groups sharpen first
partition     [l P, (l + 1) P]           (2, 1)
same_start    [0, (l + 1) P]             (2, 1)
same_end      [(n - l - 1) P, T]         (2, 1)
static        none: constant noise       the classic STEs (never annealed)
============= ========================== ===============================================

The backward policy sets the noise whose derivative is propagated, ``sigma_b``:

============= ===================================================================================
backward      sigma_b of a group at time t
============= ===================================================================================
exact         sigma(t): the true derivative of the smoothed forward (the reference code)
floor         max(sigma(t), sigma_grad_min): the gradient never sharpens past the starting
              noise, while the forward still anneals to the exact stair (a biased estimator)
schedule      max(sigma(t), sigma_grad_min * g_grad(t)), ``g_grad`` from ``schedules[group]
              ["sigma_grad"]`` (default: linear from 1 at t = 0 to 0 at the end of the run, i.e.
              annealed more slowly than the forward)
============= ===================================================================================

``sigma = None`` and ``sigma_grad_min = None`` take the noise family's ``default_sigma`` (95 % of
the mass within +-1/2 step, the reference experiment's starting noise). ``mu = 0.5`` with any
preset is the reference's dynamic mean ("anneal to H+", reference ``mi = -1/2``), annealed with
exponent ``alpha_mu``.
"""
from __future__ import annotations

import fnmatch
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from brevitas_ana.checks import (BACKWARD_POLICIES, PRESETS, check_noise_args, check_number,
                                 check_sigma)
from brevitas_ana.noise import get_noise
from brevitas_ana.options import DEFAULT_ANNEAL_END, DEFAULT_PRESET, AnaConfig
from brevitas_ana.quant import AnaQuantMixin
from brevitas_ana.schedules import Constant, Window, make_schedule

__all__ = ["AnaController", "PRESETS", "BACKWARD_POLICIES"]

_ROLES = (("weight_quant", "weight"), ("input_quant", "input"), ("output_quant", "output"),
          ("act_quant", "act"))


def describe(name: str):
    """(layer name, role) of a quantiser module path such as
    ``features.3.act_quant.fused_activation_quant_proxy.tensor_quant.int_quant``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        for attr, role in _ROLES:
            if part == attr:
                return ".".join(parts[:i]), role
    return name, "act"


def preset_schedules(preset: str, n: int, total: float):
    """[(sigma schedule, mu schedule)] for groups 0..n-1 (input first)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    period = total / n
    out = []
    for l in range(n):
        if preset == "static":
            out.append((Constant(), Constant()))
            continue
        start, end, a_sigma, a_mu = 0.0, total, 2.0, 1.0
        if preset == "progressive":
            a_sigma, a_mu = 2.0 * (n - l), float(n - l)
        elif preset == "partition":
            start, end = l * period, (l + 1) * period
        elif preset == "same_start":
            end = (l + 1) * period
        elif preset == "same_end":
            start = (n - l - 1) * period
        out.append((Window(start, end, a_sigma), Window(start, end, a_mu)))
    return out


class AnaController:
    """Anneals the noise of every ANA quantiser of ``model``, group by group.

    Args:
        model: a model with ANA quantisers (a DDP wrapper is unwrapped).
        preset: one of :data:`PRESETS`.
        total_steps: optimiser steps of the whole run (required unless static).
        config: an :class:`~brevitas_ana.AnaConfig`; the controller uses its ``sigma`` and ``mu``
            (starting standard deviation and mean of the noise, in quantisation steps;
            ``sigma=None``: the family's ``default_sigma``), ``backward`` (one of
            :data:`BACKWARD_POLICIES`, table above) and ``sigma_grad_min`` (the backward floor
            of ``floor`` / ``schedule``; ``None``: the family's ``default_sigma``). The noise
            family and forward strategy are the quantisers' own.
        anneal_end: fraction of ``total_steps`` by which every preset window has ended, in
            (0, 1]; the rest of the run trains noise-free.
        groups: ``None`` (by layer: a layer's quantisers plus the activation quantiser right after
            it) or ``{group name: [fnmatch patterns]}`` matched against the quantisers' layer names
            and full module names; every quantiser must match exactly one group.
        schedules: per-group overrides ``{group name or "*": {"sigma": cfg, "mu": cfg,
            "sigma_grad": cfg}}`` of the preset, each ``cfg`` a
            :func:`~brevitas_ana.schedules.make_schedule` dict, in time units.
        time_unit: ``"step"`` or ``"epoch"`` (then ``steps_per_epoch`` is required and times are
            fractional epochs).
        example_input: a batch to order the quantisers right away (run in eval mode, no grad);
            without it they are ordered by the model's first forward pass.
    """

    def __init__(self, model: nn.Module, preset: str = DEFAULT_PRESET,
                 total_steps: Optional[int] = None, config: Optional[AnaConfig] = None,
                 anneal_end: float = DEFAULT_ANNEAL_END, groups: Optional[Dict[str, Sequence[str]]] = None,
                 schedules: Optional[Dict[str, dict]] = None, time_unit: str = "step",
                 steps_per_epoch: Optional[int] = None, example_input=None):
        config = AnaConfig() if config is None else config
        if not isinstance(config, AnaConfig):
            raise TypeError(f"config: must be an AnaConfig, got {type(config).__name__}")
        sigma, mu, backward = config.sigma, config.mu, config.backward
        sigma_grad_min = config.sigma_grad_min
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model = model
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        self.preset = preset
        if backward not in BACKWARD_POLICIES:
            raise ValueError(f"backward must be one of {BACKWARD_POLICIES}, got {backward!r}")
        self.backward = backward
        anneal_end = check_number("anneal_end", anneal_end)
        if not 0.0 < anneal_end <= 1.0:
            raise ValueError(f"anneal_end must be in (0, 1] (a fraction of the run), "
                             f"got {anneal_end}")
        self.anneal_end = anneal_end
        self._quantizers: Dict[str, AnaQuantMixin] = OrderedDict(
            (name, m) for name, m in model.named_modules() if isinstance(m, AnaQuantMixin))
        if not self._quantizers:
            raise ValueError("model: no ANA quantiser found (use Ana* quantisers or to_ana first)")
        if sigma is None or sigma_grad_min is None:
            families = sorted({m.noise for m in self._quantizers.values()})
            if len(families) > 1:
                raise ValueError(f"sigma: the model mixes noise families {families}; give sigma "
                                 "and sigma_grad_min explicitly")
            default = get_noise(families[0]).default_sigma
            sigma = default if sigma is None else sigma
            sigma_grad_min = default if sigma_grad_min is None else sigma_grad_min
        self.sigma0, self.mu0 = check_noise_args(sigma, mu, "expectation", "ste")
        self.sigma_grad_min = check_sigma("sigma_grad_min", sigma_grad_min)
        if time_unit not in ("step", "epoch"):
            raise ValueError(f"time_unit must be 'step' or 'epoch', got {time_unit!r}")
        if time_unit == "epoch" and not (isinstance(steps_per_epoch, int) and steps_per_epoch > 0):
            raise ValueError(f"steps_per_epoch must be a positive integer when time_unit='epoch', "
                             f"got {steps_per_epoch!r}")
        if preset != "static" and not (isinstance(total_steps, int) and total_steps > 0):
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        self.total_steps = total_steps
        self.time_unit = time_unit
        self.steps_per_epoch = steps_per_epoch if time_unit == "epoch" else None
        self.group_patterns = {k: list(v) for k, v in groups.items()} if groups else None
        self.schedule_overrides = dict(schedules or {})
        self.step_count = 0
        self._groups: Optional["OrderedDict[str, List[str]]"] = None
        self._schedules = None
        self._pending_state = None
        self._known: Dict[str, nn.Module] = {}  # quantiser modules given the policy, by name
        for m in self._quantizers.values():
            # every preset starts at g = 1; the controller's policy replaces the quantisers' own
            m.backward = self._quantizer_policy()
            m._set_noise(self.sigma0, self.mu0, self.sigma_grad_min)  # checked above
        if example_input is not None:
            self._order_with(example_input)
        else:
            self._order_on_first_forward()

    # --- ordering and grouping -------------------------------------------------------------
    def _record_order(self):
        order, seen, by_module = [], set(), {id(m): n for n, m in self._quantizers.items()}

        def hook(module, args):
            name = by_module[id(module)]
            if name not in seen:
                seen.add(name)
                order.append(name)

        handles = [m.register_forward_pre_hook(hook) for m in self._quantizers.values()]
        return order, handles

    def _order_with(self, example_input):
        order, handles = self._record_order()
        modes = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            with torch.no_grad():
                args = example_input if isinstance(example_input, tuple) else (example_input,)
                self.model(*args)
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
        self._finish_ordering(order)

    def _order_on_first_forward(self):
        order, handles = self._record_order()

        def done(module, args, output):
            for h in handles + [root]:
                h.remove()
            self._finish_ordering(order)

        root = self.model.register_forward_hook(done)

    def _finish_ordering(self, order: List[str]):
        missing = [n for n in self._quantizers if n not in order]
        if missing:
            warnings.warn(f"AnaController: quantisers never reached by the forward pass, put "
                          f"last: {missing}")
        order = order + missing
        self._groups = (self._match_groups(order) if self.group_patterns
                        else self._layer_groups(order))
        unknown = sorted(set(self.schedule_overrides) - set(self._groups) - {"*"})
        if unknown:
            raise ValueError(f"schedules: unknown group(s) {unknown}; groups: {list(self._groups)}")
        total = self._to_time(self.total_steps) if self.total_steps else 1.0
        presets = preset_schedules(self.preset, len(self._groups), self.anneal_end * total)
        grad_default = Window(0.0, total, 1.0) if self.backward == "schedule" else Constant()
        self._schedules = OrderedDict()
        for (name, _), (s_sigma, s_mu) in zip(self._groups.items(), presets):
            override = self.schedule_overrides.get(name, self.schedule_overrides.get("*", {}))
            bad = sorted(set(override) - {"sigma", "mu", "sigma_grad"})
            if bad:
                raise ValueError(f"schedules[{name!r}]: unknown key(s) {bad}; use 'sigma', 'mu', "
                                 "'sigma_grad'")
            if "sigma_grad" in override and self.backward != "schedule":
                raise ValueError(f"schedules[{name!r}]: 'sigma_grad' needs backward='schedule', "
                                 f"got backward={self.backward!r}")
            self._schedules[name] = (make_schedule(override.get("sigma", s_sigma)),
                                     make_schedule(override.get("mu", s_mu)),
                                     make_schedule(override.get("sigma_grad", grad_default)))
        pending, self._pending_state = self._pending_state, None
        if pending is not None:
            self.load_state_dict(pending)
        self.apply()

    @staticmethod
    def _layer_groups(order):
        groups: "OrderedDict[str, List[str]]" = OrderedDict()
        current = None  # (group name, last layer, has weight, has act)
        for name in order:
            layer, role = describe(name)
            if current and (layer == current[1] or (role == "act" and current[2]
                                                     and not current[3])):
                groups[current[0]].append(name)
                current = (current[0], layer, current[2], current[3] or role == "act")
                continue
            gname, k = layer or name, 1
            while gname in groups:
                k += 1
                gname = f"{layer}#{k}"
            groups[gname] = [name]
            current = (gname, layer, role == "weight", role == "act")
        return groups

    def _match_groups(self, order):
        members = {g: [] for g in self.group_patterns}
        uncovered, doubled = [], []
        for name in order:
            layer, _ = describe(name)
            hits = [g for g, pats in self.group_patterns.items()
                    if any(fnmatch.fnmatchcase(layer, p) or fnmatch.fnmatchcase(name, p)
                           for p in pats)]
            if not hits:
                uncovered.append(name)
            elif len(hits) > 1:
                doubled.append(f"{name} -> {hits}")
            else:
                members[hits[0]].append(name)
        if uncovered or doubled:
            raise ValueError("groups: every ANA quantiser must match exactly one group; "
                             f"uncovered: {uncovered}; in several groups: {doubled}")
        empty = [g for g, m in members.items() if not m]
        if empty:
            raise ValueError(f"groups: no quantiser matches group(s) {empty}")
        first = {g: order.index(m[0]) for g, m in members.items()}
        return OrderedDict((g, members[g]) for g in sorted(members, key=first.get))

    # --- time and noise ----------------------------------------------------------------------
    def _to_time(self, steps: float) -> float:
        return steps / self.steps_per_epoch if self.time_unit == "epoch" else float(steps)

    @property
    def t(self) -> float:
        """Current time in the controller's unit (steps, or fractional epochs)."""
        return self._to_time(self.step_count)

    def _require_order(self):
        if self._groups is None:
            raise RuntimeError("AnaController: quantisers are ordered by the first forward pass; "
                               "run one (or pass example_input) first")

    def _quantizer_policy(self) -> str:
        """The quantisers' own policy: ``schedule`` is a floor that the controller moves."""
        return "exact" if self.backward == "exact" else "floor"

    def _noise(self, t: float) -> "OrderedDict[str, tuple]":
        """{group: (sigma, mu, backward floor)} at time ``t``: sigma0 g_sigma(t), mu0 g_mu(t) and
        sigma_grad_min g_grad(t) (0 under the ``exact`` policy)."""
        self._require_order()
        floor = 0.0 if self.backward == "exact" else self.sigma_grad_min
        return OrderedDict((g, (self.sigma0 * s(t), self.mu0 * m(t), floor * grad(t)))
                           for g, (s, m, grad) in self._schedules.items())

    def noise_at(self, t: float) -> "OrderedDict[str, tuple]":
        """{group: (sigma, mu)} at time ``t``."""
        return OrderedDict((g, (s, m)) for g, (s, m, _) in self._noise(t).items())

    def grad_sigmas_at(self, t: float) -> "OrderedDict[str, float]":
        """{group: sigma_b = max(sigma, floor)}, the backward noise at time ``t``."""
        return OrderedDict((g, max(s, f)) for g, (s, _, f) in self._noise(t).items())

    def apply(self):
        """Write the backward policy and the current noise into every quantiser.
        ``load_state_dict`` does it; so does ``step`` for a quantiser module it has not seen
        before (Brevitas rebuilds its quantisers when a state_dict is loaded)."""
        self._known = {}
        self._write_noise()

    def _write_noise(self):
        """The current noise into every quantiser: values of the schedules, which start from the
        noise checked at construction, so written without checking them again. Quantisers are
        looked up by name; one not seen before (rebuilt by Brevitas) gets the policy too."""
        known = self._known
        policy = self._quantizer_policy()
        for g, (sigma, mu, floor) in self._noise(self.t).items():
            for name in self._groups[g]:
                m = self.model.get_submodule(name)
                if known.get(name) is not m:
                    m.backward = policy
                    known[name] = m
                m._set_noise(float(sigma), float(mu), float(floor))

    def step(self, n: int = 1):
        """Advance time by ``n`` optimiser steps and update every quantiser's noise."""
        self.step_count += n
        if self._groups is not None:
            self._write_noise()

    def sigmas(self) -> "OrderedDict[str, float]":
        """{group name: current sigma}, input first."""
        return OrderedDict((g, s) for g, (s, _) in self.noise_at(self.t).items())

    def mus(self) -> "OrderedDict[str, float]":
        """{group name: current mu}, input first."""
        return OrderedDict((g, m) for g, (_, m) in self.noise_at(self.t).items())

    def grad_sigmas(self) -> "OrderedDict[str, float]":
        """{group name: current backward noise sigma_b}, input first."""
        return self.grad_sigmas_at(self.t)

    @property
    def groups(self) -> "OrderedDict[str, List[str]]":
        """{group name: [quantiser module names]}, input first."""
        self._require_order()
        return OrderedDict((g, list(m)) for g, m in self._groups.items())

    def schedules(self) -> "OrderedDict[str, tuple]":
        self._require_order()
        return OrderedDict(self._schedules)

    def summary(self, file=None) -> str:
        """A table of groups, members and current noise; printed, and returned."""
        self._require_order()
        lines = [f"AnaController: preset={self.preset}, sigma0={self.sigma0:g}, "
                 f"mu0={self.mu0:g}, backward={self.backward}, "
                 f"sigma_grad_min={self.sigma_grad_min:g}, anneal_end={self.anneal_end:g}, "
                 f"t={self.t:g} {self.time_unit}(s), "
                 f"{len(self._groups)} groups, {len(self._quantizers)} quantisers"]
        now, grad = self.noise_at(self.t), self.grad_sigmas()
        for g, members in self._groups.items():
            sigma, mu = now[g]
            lines.append(f"  {g}: sigma={sigma:.4g} mu={mu:.4g} sigma_b={grad[g]:.4g}")
            lines.extend(f"      {name}" for name in members)
        text = "\n".join(lines)
        print(text, file=file)
        return text

    def plot(self, path, num_points: int = 400):
        """Draw sigma(t) per group over the whole schedule to a PNG at ``path``."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        self._require_order()
        end = self._to_time(self.total_steps) if self.total_steps else 1.0
        ts = [end * i / (num_points - 1) for i in range(num_points)]
        fig, ax = plt.subplots(figsize=(7, 4))
        for g in self._schedules:
            ax.plot(ts, [self.noise_at(t)[g][0] for t in ts], label=g)
        ax.axvline(self.t, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(self.time_unit + "s")
        ax.set_ylabel("sigma (steps)")
        ax.set_title(f"ANA noise, preset {self.preset}")
        ax.legend(fontsize="x-small", ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    # --- checkpointing ------------------------------------------------------------------------
    def _config(self):
        return {"preset": self.preset, "total_steps": self.total_steps, "sigma": self.sigma0,
                "mu": self.mu0, "backward": self.backward,
                "sigma_grad_min": self.sigma_grad_min, "anneal_end": self.anneal_end,
                "time_unit": self.time_unit, "steps_per_epoch": self.steps_per_epoch,
                "groups": list(self._groups) if self._groups is not None else None,
                "schedules": {g: [s.to_dict() for s in trio]
                              for g, trio in (self._schedules or {}).items()}}

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "config": self._config()}

    def load_state_dict(self, state: dict):
        """Restore the time; ``ValueError`` if the saved schedule differs from this one."""
        if not isinstance(state, dict) or "step_count" not in state or "config" not in state:
            raise ValueError("state: not an AnaController state_dict")
        if self._groups is None:  # checked once the first forward pass has ordered the groups
            self._pending_state = state
            self.step_count = int(state["step_count"])
            return
        saved, mine = state["config"], self._config()
        diff = [k for k in mine if k in saved and saved[k] != mine[k]]
        if len(diff) > 1 and "schedules" in diff:
            diff.remove("schedules")  # derived from the others: name the cause only
        if diff:
            raise ValueError("state: saved controller differs in " + ", ".join(
                f"{k}" if k == "schedules" else f"{k} (saved {saved[k]!r}, here {mine[k]!r})"
                for k in diff))
        self.step_count = int(state["step_count"])
        self.apply()
