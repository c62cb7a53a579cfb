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
from typing import Optional

from brevitas_ana.checks import check_backward, check_noise_args, check_sigma
from brevitas_ana.noise import get_noise


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
    - ``sigma_grad_min``: the backward floor (steps); ``None``: the family's ``default_sigma``.
    """
    noise: str = "uniform"
    strategy: str = "expectation"
    annealed_grad: str = "ste"
    sigma: Optional[float] = None
    mu: float = 0.0
    backward: str = "floor"
    sigma_grad_min: Optional[float] = None

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
                    ana_backward=self.quantiser_backward, ana_sigma_grad_min=self.sigma_grad_min)
