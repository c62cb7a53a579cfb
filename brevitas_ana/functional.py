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

from typing import Union

import torch
from brevitas.function.ops import tensor_clamp
from brevitas.function.ops_ste import round_ste
from torch import Tensor

from brevitas_ana.checks import Number, check_bound, check_noise_args, check_sigma
from brevitas_ana.expectation import expectation_and_slope, mode_level
from brevitas_ana.noise import NoiseFamily, get_noise

__all__ = ["ana_round", "ana_round_unchecked", "SIGMA_MIN"]

#: Noise with a standard deviation below this many steps counts as annealed (sigma = 0): it is
#: below float32 resolution for the values a quantiser sees, and its exact gradient (about
#: 1 / (3.5 sigma) at a threshold) would overflow fp16 (and, far below, float32) into inf/NaN.
#: Schedules with large exponents reach such values long before their window ends.
SIGMA_MIN = 1e-4


class _AnaRoundFn(torch.autograd.Function):
    """Forward: the chosen strategy at ``sigma`` (the exact stair once ``sigma < SIGMA_MIN``);
    backward: d/dy E[Q(y + n)] at ``sigma_b = max(sigma, sigma_grad_min)`` for every strategy.

    Only the slope is saved for backward, and only when a gradient is needed: one byte per
    element when the family's closed form gives it as integer counts (uniform), otherwise in half
    precision (two bytes; float64 inputs keep float64, so gradcheck sees the exact slope). Half
    precision changes a gradient by at most ``2^-11`` of itself (``2^-24`` absolute for slopes below
    ``2^-14``, its subnormal range); every built-in family's slope stays below its largest value,
    65504 (at most about ``0.45 / sigma_b`` steps^-1, and ``sigma_b >= SIGMA_MIN``).
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
            out = mode_level(family, u, lo, hi, sigma)
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
                ctx.save_for_backward(slope.to(torch.float64 if y.dtype == torch.float64
                                               else torch.float16))
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (slope,) = ctx.saved_tensors
        grad = grad_out * slope
        if ctx.factor is not None:
            grad = grad.mul_(ctx.factor)
        return grad, None, None, None, None, None, None, None


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
    lo, hi = check_bound("lo", lo), check_bound("hi", hi)
    if lo > hi:
        raise ValueError(f"lo must not exceed hi, got lo={lo}, hi={hi}")
    return ana_round_unchecked(y, lo, hi, family, sigma, mu, strategy, annealed_grad, sigma_b)


def ana_round_unchecked(y: Tensor, lo: int, hi: int, family: NoiseFamily, sigma: float,
                        mu: float, strategy: str, annealed_grad: str, sigma_b: float) -> Tensor:
    """:func:`ana_round` for arguments already checked where they entered (the quantisers check
    theirs when they are set, not at every forward): ``family`` a :class:`NoiseFamily`,
    ``sigma_b = max(sigma, sigma_grad_min)``."""
    if sigma_b < SIGMA_MIN:
        if annealed_grad == "zero":
            return torch.clamp(torch.round(y), lo, hi)
        # Brevitas' TensorClamp, whose gradient also passes at round(y) == lo or hi
        # (new_full fills on the device; new_tensor would copy from the host and block it)
        return tensor_clamp(round_ste(y), y.new_full((), lo), y.new_full((), hi))
    return _AnaRoundFn.apply(y, lo, hi, family, sigma, mu, strategy, sigma_b)
