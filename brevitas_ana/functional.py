"""The ANA rounding function: a stair function smoothed by additive noise.

In step units, with integer clamp bounds ``[lo, hi]`` and thresholds ``t_k = k + 1/2``
(k = lo .. hi-1), the quantiser is ``Q(y) = clamp(round(y), lo, hi) = lo + sum_k H(y - t_k)``.
Adding noise ``n`` of mean ``mu`` and standard deviation ``sigma`` (CDF ``F``, PDF ``f`` of the
standardised family) gives

    E[Q(y + n)]      = lo + sum_k F((y + mu - t_k) / sigma)
    d/dy E[Q(y + n)] = sum_k f((y + mu - t_k) / sigma) / sigma

:func:`ana_round` returns the expectation, the most probable level or one sample of ``Q(y + n)``
(the *strategy*) and back-propagates the derivative of the expectation, taken at the backward
noise ``sigma_b = max(sigma, sigma_grad_min)``:

    gradient = sum_k f((y + mu - t_k) / sigma_b) / sigma_b

``sigma_grad_min = 0`` (the ``exact`` backward policy) gives the true derivative of the forward's
expectation. A positive floor (the ``floor`` policy) keeps the gradient from collapsing into a few
tall, narrow spikes as ``sigma`` is annealed to 0: once ``sigma`` is below the floor the forward is
sharper than the function whose derivative is propagated, so the gradient is *biased*, as every
straight-through estimator is (with uniform noise and a floor of half a step it is the clipped
identity STE inside the clamp range). Prefer ``exact`` where an unbiased gradient of the smoothed
network matters more than gradient flow (large sigma, or a few layers); prefer ``floor`` for
training deep chains of quantisers, where the exact gradient of a nearly sharp stair starves the
layers before it.
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
from brevitas.function.ops import tensor_clamp
from brevitas.function.ops_ste import round_ste
from torch import Tensor

from brevitas_ana.noise import NoiseFamily, get_noise

__all__ = ["ana_round", "STRATEGIES", "ANNEALED_GRADS", "BACKWARDS", "expectation_and_slope",
           "slope_tensor"]

STRATEGIES = ("expectation", "mode", "random")
#: What the gradient is once sigma has been annealed to 0: Brevitas' usual round-STE
#: (identity inside the clamp range) or the exact derivative of the stair, i.e. zero.
ANNEALED_GRADS = ("ste", "zero")
#: Backward policies of a quantiser: the derivative of the forward's expectation (``exact``) or
#: of the expectation at ``max(sigma, sigma_grad_min)`` (``floor``).
BACKWARDS = ("exact", "floor")

Number = Union[float, int, Tensor]

#: Noise with a standard deviation below this many steps counts as annealed (sigma = 0): it is
#: below float32 resolution for the values a quantiser sees, and its exact gradient (about
#: 1 / (3.5 sigma) at a threshold) would overflow fp16 (and, far below, float32) into inf/NaN.
#: Schedules with large exponents reach such values long before their window ends.
SIGMA_MIN = 1e-4


def check_number(name: str, value: Number) -> float:
    """A finite Python float from a number or a one-element tensor; ``ValueError`` naming
    ``name``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _bound(name: str, value: Number) -> int:
    v = check_number(name, value)
    if v != round(v):
        raise ValueError(f"{name} must be an integer clamp bound, got {v}")
    return int(round(v))


def check_sigma(name: str, value: Number) -> float:
    """A finite, non-negative standard deviation (steps); ``ValueError`` naming ``name``."""
    value = check_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (a standard deviation in steps), got {value}")
    return value


def check_backward(backward: str) -> str:
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    return backward


def check_noise_args(sigma: Number, mu: Number, strategy: str, annealed_grad: str):
    """Validate and convert the noise arguments; ``ValueError`` naming the bad one."""
    sigma = check_sigma("sigma", sigma)
    mu = check_number("mu", mu)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if annealed_grad not in ANNEALED_GRADS:
        raise ValueError(f"annealed_grad must be one of {ANNEALED_GRADS}, got {annealed_grad!r}")
    return sigma, mu


def expectation_and_slope(family: NoiseFamily, u: Tensor, lo: int, hi: int, sigma: float,
                          want_value: bool = True, want_slope: bool = True
                          ) -> Tuple[Tensor, Tensor]:
    """``E = lo + sum_k F((u - t_k)/sigma)`` and ``dE/du = sum_k f((u - t_k)/sigma)/sigma``.

    ``u = y + mu``. Uses the family's closed form when it has one. Otherwise only the thresholds
    within ``support * sigma`` of ``u`` are evaluated, one pass over ``u`` per threshold offset
    (never a #thresholds x N tensor); the ones below the window count exactly 1, the ones above 0.
    Either result is ``None`` when not wanted. The slope may come factored from a closed form as
    ``(counts, factor)``; :func:`slope_tensor` multiplies it out.
    """
    n = hi - lo
    if n == 0:
        return (torch.full_like(u, lo) if want_value else None,
                torch.zeros_like(u) if want_slope else None)
    if family.expectation is not None:
        value, slope = family.expectation(u, lo, hi, sigma)
        return (value if want_value else None, slope if want_slope else None)
    inv_sigma = 1.0 / sigma
    value = torch.zeros_like(u) if want_value else None
    slope = torch.zeros_like(u) if want_slope else None
    half = family.support * sigma
    width = int(math.floor(2.0 * half)) + 2  # thresholds that can lie in [u - half, u + half]
    if n <= width:
        # Few levels: every threshold, no truncation at all.
        for k in range(lo, hi):
            z = (u - (k + 0.5)) * inv_sigma
            if want_value:
                value += family.cdf(z)
            if want_slope:
                slope += family.pdf(z)
        if want_value:
            value += lo
    else:
        first = torch.clamp(torch.ceil(u - half - 0.5), lo, hi)  # first threshold in the window
        last = hi - 1 - first  # offsets j > last are past the top threshold
        z0 = (u - first - 0.5) * inv_sigma
        for j in range(width):
            z = z0 - j * inv_sigma
            inside = last >= j
            if want_value:
                value += torch.where(inside, family.cdf(z), 0.0)
            if want_slope:
                slope += torch.where(inside, family.pdf(z), 0.0)
        if want_value:
            value += first
    if want_slope:
        slope *= inv_sigma
    return value, slope


def _mode(family: NoiseFamily, u: Tensor, lo: int, hi: int, sigma: float) -> Tensor:
    """The most probable level of ``clamp(round(u + e), lo, hi)``.

    For a symmetric unimodal noise the interior level with most mass is the one nearest ``u``, so
    the argmax is among ``clamp(round(u))``, ``lo`` and ``hi`` (the end levels collect the tails):
    P(lo) = F((lo + 1/2 - u)/sigma), P(hi) = 1 - F((hi - 1/2 - u)/sigma),
    P(c)  = F((c + 1/2 - u)/sigma) - F((c - 1/2 - u)/sigma) for lo < c < hi.
    Ties go to the nearest level.
    """
    if hi == lo:
        return torch.full_like(u, lo)
    F = family.cdf
    inv_sigma = 1.0 / sigma
    c = torch.clamp(torch.round(u), lo, hi)
    upper = torch.where(c >= hi, torch.ones_like(u), F((c + 0.5 - u) * inv_sigma))
    lower = torch.where(c <= lo, torch.zeros_like(u), F((c - 0.5 - u) * inv_sigma))
    p_c = upper - lower
    p_lo = F((lo + 0.5 - u) * inv_sigma)
    p_hi = 1.0 - F((hi - 0.5 - u) * inv_sigma)
    out = torch.where(p_lo > p_c, torch.full_like(u, lo), c)
    p_best = torch.maximum(p_c, p_lo)
    return torch.where(p_hi > p_best, torch.full_like(u, hi), out)


class _AnaRoundFn(torch.autograd.Function):
    """Forward: the chosen strategy at ``sigma`` (the exact stair once ``sigma < SIGMA_MIN``);
    backward: d/dy E[Q(y + n)] at ``sigma_b = max(sigma, sigma_grad_min)`` for every strategy.

    Only the slope is saved for backward, and only when a gradient is needed: one tensor like
    ``y``, or one byte per element when the family's closed form gives it as integer counts.
    Computation is in float32 (float64 for float64 inputs), so autocast's bf16/fp16 inputs don't
    round the thresholds; the output has the input's dtype. When ``sigma_b == sigma`` and the
    strategy is ``expectation`` value and slope come from one evaluation; otherwise the slope is
    one extra evaluation (without the value).
    """

    @staticmethod
    def forward(ctx, y, lo, hi, family, sigma, mu, strategy, sigma_b):
        need_grad = ctx.needs_input_grad[0]
        u = y if y.dtype == torch.float64 else y.float()
        if mu != 0.0:
            u = u + mu
        slope = None
        if sigma < SIGMA_MIN:  # forward annealed: the stair itself (mu ignored, as in ana_round)
            out = torch.clamp(torch.round(y), lo, hi)
        elif strategy == "expectation":
            out, slope = expectation_and_slope(family, u, lo, hi, sigma, True,
                                               need_grad and sigma_b == sigma)
        elif strategy == "mode":
            out = _mode(family, u, lo, hi, sigma)
        else:  # random: one sample of clamp(round(u + e), lo, hi)
            out = torch.clamp(torch.round(u + sigma * family.sample(u)), lo, hi)
        if need_grad:
            if slope is None:
                _, slope = expectation_and_slope(family, u, lo, hi, sigma_b, False, True)
            if isinstance(slope, tuple):  # (small integer counts, factor): keep counts compact
                counts, ctx.factor = slope
                # counts <= hi - lo, so 8 bits hold them up to 8-bit quantisers
                if counts.dtype != torch.bool:
                    counts = counts.to(torch.uint8 if hi - lo <= 255 else torch.int32)
                ctx.save_for_backward(counts)
            else:
                ctx.factor = None
                ctx.save_for_backward(slope.to(y.dtype))
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (slope,) = ctx.saved_tensors
        grad = grad_out * slope
        if ctx.factor is not None:
            grad = grad.mul_(ctx.factor)
        return grad, None, None, None, None, None, None, None


def slope_tensor(slope) -> Tensor:
    """The slope as one tensor, whether or not it came factored."""
    if isinstance(slope, tuple):
        counts, factor = slope
        return counts * factor
    return slope


def ana_round(y: Tensor, lo: Number, hi: Number, noise: Union[str, NoiseFamily] = "uniform",
              sigma: Number = 0.0, mu: Number = 0.0, strategy: str = "expectation",
              annealed_grad: str = "ste", sigma_grad_min: Number = 0.0) -> Tensor:
    """ANA rounding of ``y`` (in quantisation steps) to the integers ``lo .. hi``.

    Returns, with ``n`` a noise of family ``noise``, mean ``mu`` and standard deviation ``sigma``:

    - ``strategy="expectation"``: ``E[clamp(round(y + n), lo, hi)] = lo + sum_k F((y+mu-t_k)/sigma)``;
    - ``strategy="mode"``: the most probable value of ``clamp(round(y + n), lo, hi)``;
    - ``strategy="random"``: one sample of it (uniform noise of std ``1/sqrt(12)``, i.e. half-width
      1/2, gives stochastic rounding).

    The gradient with respect to ``y`` is ``sum_k f((y+mu-t_k)/sigma_b)/sigma_b`` for all three,
    with the backward noise ``sigma_b = max(sigma, sigma_grad_min)``: ``sigma_grad_min = 0`` is the
    exact derivative of the expectation, a positive one floors the backward smoothing (a biased
    estimator, like every STE; see the module docstring).

    With ``sigma == 0`` (in practice ``sigma < SIGMA_MIN = 1e-4``) the noise has been annealed
    away: the output is exactly ``clamp(round(y), lo, hi)`` (``mu`` is ignored). The gradient is
    then the floored one when ``sigma_grad_min >= SIGMA_MIN``; without a floor it is Brevitas'
    round-STE one (``annealed_grad="ste"``: 1 where ``lo <= round(y) <= hi``, else 0) or the
    stair's true derivative, 0 everywhere (``annealed_grad="zero"``, the reference code's
    behaviour, which stops every earlier layer from learning).

    Raises ``ValueError`` naming the argument for a negative or non-finite ``sigma`` or
    ``sigma_grad_min``, a non-finite ``mu``, an unknown ``noise`` or ``strategy``, non-integer
    bounds or ``lo > hi``.
    """
    family = get_noise(noise)
    sigma, mu = check_noise_args(sigma, mu, strategy, annealed_grad)
    sigma_b = max(sigma, check_sigma("sigma_grad_min", sigma_grad_min))
    lo, hi = _bound("lo", lo), _bound("hi", hi)
    if lo > hi:
        raise ValueError(f"lo must not exceed hi, got lo={lo}, hi={hi}")
    if sigma_b < SIGMA_MIN:
        if annealed_grad == "zero":
            return torch.clamp(torch.round(y), lo, hi)
        # Brevitas' TensorClamp, whose gradient also passes at round(y) == lo or hi
        # (new_full fills on the device; new_tensor would copy from the host and block it)
        return tensor_clamp(round_ste(y), y.new_full((), lo), y.new_full((), hi))
    return _AnaRoundFn.apply(y, lo, hi, family, sigma, mu, strategy, sigma_b)
