"""The ANA settings in one object, with one set of defaults (torchao's config-dataclass style).

    from brevitas_ana import AnaConfig, to_ana, AnaController
    config = AnaConfig(noise="normal", backward="floor")
    to_ana(model, config)                                   # quantisers with these options
    controller = AnaController(model, config=config, total_steps=10_000)

:func:`~brevitas_ana.to_ana`, :func:`~brevitas_ana.quantize_timm`,
:func:`~brevitas_ana.ana_quant` and :class:`~brevitas_ana.AnaController` take it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from brevitas_ana.checks import (ANNEALED_GRADS, BACKWARD_POLICIES, STRATEGIES, check_backward,
                                 check_noise_args, check_sigma)
from brevitas_ana.noise import get_noise

# The defaults, measured together on CNV W2A2 and W1A1 (squared hinge, bnn_pynq's optimiser) and
# a 4-bit ResNet-18 (cross entropy, Adam 1e-3) against stock Brevitas STE: docs/accuracy.md,
# "The defaults". The recipes inherit them (recipes/config.py); change them here only.
#: The backward floor: uniform noise of half-width one step (std 1/sqrt(3)), whose gradient
#: reaches as far as Brevitas' STE (the family's starting noise, 0.2887, starves the gradient).
DEFAULT_SIGMA_GRAD_MIN = 0.5774
#: :class:`~brevitas_ana.AnaController`'s preset: every group anneals over the same window.
DEFAULT_PRESET = "homogeneous"
#: :class:`~brevitas_ana.AnaController`'s ``anneal_end``: windows end at 70 % of the run.
DEFAULT_ANNEAL_END = 0.7


@dataclass(frozen=True)
class AnaConfig:
    """ANA options.

    - ``noise``: the noise family (``uniform``, ``triangular``, ``normal``, ``logistic`` or one
      registered with :func:`~brevitas_ana.register_noise`);
    - ``strategy``: the forward, ``expectation`` (``E[stair(x + eps)]``), ``mode`` or ``random``;
    - ``annealed_grad``: the gradient once the noise is 0 (``ste``: Brevitas' straight-through);
    - ``sigma``: the noise (std, in quantisation steps) the annealing starts from; ``None``: the
      family's ``default_sigma`` (95 % of the mass within +-1/2 step). Quantisers are created
      noise-free; the controller (or :func:`~brevitas_ana.set_sigma`) sets their noise;
    - ``mu``: the noise mean (steps); 0.5 is the reference's dynamic mean;
    - ``backward``: ``floor`` (the derivative of the expectation at ``max(sigma,
      sigma_grad_min)``), ``exact`` (at ``sigma``), or, for the controller, ``schedule``;
    - ``sigma_grad_min``: the backward floor (std, steps), by default 0.5774 (uniform noise of
      half-width one step, as far as Brevitas' STE reaches); ``None``: the family's
      ``default_sigma``.
    """
    noise: str = "uniform"
    strategy: Literal[STRATEGIES] = "expectation"
    annealed_grad: Literal[ANNEALED_GRADS] = "ste"
    sigma: Optional[float] = None
    mu: float = 0.0
    backward: Literal[BACKWARD_POLICIES] = "floor"
    sigma_grad_min: Optional[float] = DEFAULT_SIGMA_GRAD_MIN

    def __post_init__(self):
        family = get_noise(self.noise)  # ValueError naming the known families
        object.__setattr__(self, "noise", family.name)
        check_noise_args(0.0 if self.sigma is None else self.sigma, self.mu, self.strategy,
                         self.annealed_grad)
        if self.sigma is not None:
            object.__setattr__(self, "sigma", check_sigma("sigma", self.sigma))
        if self.backward != "schedule":
            check_backward(self.backward)
        if self.sigma_grad_min is not None:
            object.__setattr__(self, "sigma_grad_min",
                               check_sigma("sigma_grad_min", self.sigma_grad_min))

    @property
    def start_sigma(self) -> float:
        """``sigma``, or the family's default when it is None."""
        return get_noise(self.noise).default_sigma if self.sigma is None else self.sigma

    @property
    def quantiser_backward(self) -> str:
        """The quantisers' own policy: ``schedule`` is the controller's floor on a schedule."""
        return "floor" if self.backward == "schedule" else self.backward

    def injector_options(self) -> dict:
        """The Brevitas injector attributes of an ANA quantiser with these options (noise off)."""
        return dict(ana_noise=self.noise, ana_strategy=self.strategy,
                    ana_annealed_grad=self.annealed_grad, ana_sigma=0.0, ana_mu=self.mu,
                    ana_backward=self.quantiser_backward, ana_sigma_grad_min=self.sigma_grad_min,
                    ana_float=False)
