"""Brevitas adaptation: ANA twins of Brevitas' integer and binary quantisers.

Brevitas builds a quantiser from an injector class; the module that rounds and clamps is its
``tensor_quant`` (or the ``int_quant`` / ``decoupled_int_quant`` inside a rescaling wrapper). The ANA
twin of an injector only swaps that module for a subclass whose rounding is :func:`ana_round`
while training with noise; proxies, scales, zero points, bit widths, state-dict keys and export
handlers are Brevitas' own, so eval mode and export are bit-identical to the stock quantiser.

Where sigma is used: :meth:`AnaQuantMixin.ana_round` passes it to the rounding, from ``to_int``
(integer quantisers) and ``forward`` (binary ones); :func:`set_sigma` (checked) and the controller
(values checked once, where they entered) write it.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Optional, Tuple

import brevitas.config
import torch
from brevitas.core.function_wrapper import RoundSte, TensorClamp
from brevitas.core.quant import BinaryQuant, ClampedBinaryQuant, IntQuant
from brevitas.core.quant.int import (DecoupledRescalingIntQuant,
                                     DecoupledRescalingIntQuantWithInput, RescalingIntQuant)
from brevitas.core.quant.int_base import DecoupledIntQuant
from brevitas.function.ops import tensor_clamp
from brevitas.inject import ExtendedInjector, value
from brevitas.quant import (Int8ActPerTensorFloat, Int8WeightPerChannelFloat,
                            Int8WeightPerTensorFloat, SignedBinaryActPerTensorConst,
                            SignedBinaryWeightPerTensorConst, SignedTernaryActPerTensorConst,
                            SignedTernaryWeightPerTensorConst, Uint8ActPerTensorFloat)
from torch import Tensor, nn

from brevitas_ana.checks import check_noise_args, check_sigma
from brevitas_ana.functional import SIGMA_MIN, ana_round, ana_round_unchecked
from brevitas_ana.noise import get_noise
from brevitas_ana.options import AnaConfig

_DEFAULT = AnaConfig()  # the one set of defaults (brevitas_ana.options)

__all__ = [
    "AnaQuantMixin", "AnaIntQuant", "AnaDecoupledIntQuant", "AnaBinaryQuant",
    "AnaClampedBinaryQuant", "ana_quant", "stock_quant", "set_sigma", "ana_quantizers",
    "keep_quant_modules",
    "AnaInt8WeightPerTensorFloat", "AnaInt8WeightPerChannelFloat", "AnaInt8ActPerTensorFloat",
    "AnaUint8ActPerTensorFloat", "AnaSignedBinaryWeightPerTensorConst",
    "AnaSignedBinaryActPerTensorConst", "AnaSignedTernaryWeightPerTensorConst",
    "AnaSignedTernaryActPerTensorConst"]

JIT_ERROR = (
    "brevitas-ana does not work with BREVITAS_JIT=1: TorchScript compiles Brevitas' quantisers and "
    "silently ignores the Python methods through which ANA adds its noise. Unset BREVITAS_JIT "
    "(or set BREVITAS_JIT=0) before importing brevitas.")


def check_jit_disabled():
    if brevitas.config.JIT_ENABLED:
        raise RuntimeError(JIT_ERROR)


check_jit_disabled()


class AnaQuantMixin:
    """Noise state of one ANA quantiser: plain Python attributes, never in the state_dict.

    ``sigma`` is the noise's standard deviation and ``mu`` its mean, both in quantisation steps;
    ``float_mode`` relaxes the stair to a clamp (:func:`~brevitas_ana.set_float`);
    ``noise`` the family, ``strategy`` the forward strategy, ``annealed_grad`` the gradient at
    ``sigma == 0`` (see :func:`brevitas_ana.functional.ana_round`). ``backward`` is the backward
    policy: ``"exact"`` propagates the derivative of the forward's expectation, ``"floor"`` the
    derivative at ``max(sigma, sigma_grad_min)`` (``sigma_grad_min`` defaults to 0.5774, ``None``
    takes the family's ``default_sigma``). Every rank of a distributed run computes the same
    values from the same schedule, so nothing needs broadcasting.
    """

    def _init_ana(self, config: AnaConfig, sigma: float = 0.0, float_mode: bool = False):
        """The options of ``config`` (checked when it was made), the initial noise ``sigma``
        (steps; 0: noise-free until the controller or :func:`set_sigma` sets it) and whether
        the quantiser is relaxed to a clamp (:func:`~brevitas_ana.set_float`)."""
        check_jit_disabled()
        self.float_mode = bool(float_mode)
        self.noise, self.strategy = config.noise, config.strategy
        self.annealed_grad, self.backward = config.annealed_grad, config.quantiser_backward
        self.sigma_grad_min = (get_noise(config.noise).default_sigma
                               if config.sigma_grad_min is None else config.sigma_grad_min)
        self.sigma, self.mu = check_sigma("ana_sigma", sigma), config.mu

    @classmethod
    def _config_of(cls, noise, strategy, annealed_grad, mu, backward, sigma_grad_min):
        """The AnaConfig of a quantiser's ``ana_*`` keywords (Brevitas injector attributes),
        checked where they enter; the error names the keyword."""
        try:
            return AnaConfig(noise=noise, strategy=strategy, annealed_grad=annealed_grad, mu=mu,
                             backward=backward, sigma_grad_min=sigma_grad_min)
        except ValueError as e:
            raise ValueError(f"ana_{e}") from None

    def set_sigma(self, sigma, mu=0.0, sigma_grad_min=None):
        """Set the noise to standard deviation ``sigma`` and mean ``mu`` (steps), and, when given,
        the backward floor ``sigma_grad_min`` (used by the ``floor`` policy); checked."""
        sigma, mu = check_noise_args(sigma, mu, self.strategy, self.annealed_grad)
        self._set_noise(sigma, mu, None if sigma_grad_min is None else
                        check_sigma("sigma_grad_min", sigma_grad_min))

    def _set_noise(self, sigma: float, mu: float, sigma_grad_min: Optional[float] = None):
        """:meth:`set_sigma` for values already checked (the controller's schedules of its
        checked starting noise), at every optimiser step."""
        self.sigma, self.mu = sigma, mu
        if sigma_grad_min is not None:
            self.sigma_grad_min = sigma_grad_min

    @property
    def grad_floor(self) -> float:
        """The ``sigma_grad_min`` passed to :func:`ana_round`: 0 under the ``exact`` policy."""
        return self.sigma_grad_min if self.backward == "floor" else 0.0

    @property
    def stock_path(self) -> bool:
        """True when the output must be the stock quantiser's: eval mode, or noise annealed away
        (forward and backward) with Brevitas' STE as the gradient; never for a float twin."""
        return not self.float_mode and (not self.training or (
            max(self.sigma, self.grad_floor) < SIGMA_MIN and self.annealed_grad == "ste"))

    def noise_args(self) -> dict:
        """The keyword arguments of :func:`~brevitas_ana.functional.ana_round` this quantiser
        rounds with."""
        return dict(noise=self.noise, sigma=self.sigma, mu=self.mu, strategy=self.strategy,
                    annealed_grad=self.annealed_grad, sigma_grad_min=self.grad_floor)

    def ana_round(self, y: Tensor, lo: int, hi: int) -> Tensor:
        """``ana_round(y, lo, hi, **self.noise_args())``, without re-checking options that were
        checked when they were set."""
        return ana_round_unchecked(y, lo, hi, get_noise(self.noise), self.sigma, self.mu,
                                   self.strategy, self.annealed_grad,
                                   max(self.sigma, self.grad_floor))

    def extra_repr(self):
        return (f"noise={self.noise}, sigma={self.sigma:g}, mu={self.mu:g}, "
                f"strategy={self.strategy}, annealed_grad={self.annealed_grad}, "
                f"backward={self.backward}, sigma_grad_min={self.sigma_grad_min:g}"
                + (", float_mode=True" if self.float_mode else ""))


def _check_round(float_to_int_impl):
    # ANA smooths the round-to-nearest stair; floor/ceil/learned rounding have other thresholds.
    if type(float_to_int_impl) is not RoundSte:
        raise ValueError(
            f"float_to_int_impl: ANA quantisers need round-to-nearest (RoundSte), got "
            f"{type(float_to_int_impl).__name__}")


class _AnaIntMixin(AnaQuantMixin):
    """ANA ``to_int`` for IntQuant-like modules (same constructor, same ``to_int`` signature)."""

    def __init__(self, narrow_range: bool, signed: bool, input_view_impl: nn.Module,
                 float_to_int_impl: nn.Module = RoundSte(),
                 tensor_clamp_impl: nn.Module = TensorClamp(), quant_delay_steps: int = 0,
                 ana_noise: str = _DEFAULT.noise, ana_strategy: str = _DEFAULT.strategy,
                 ana_annealed_grad: str = _DEFAULT.annealed_grad, ana_sigma: float = 0.0,
                 ana_mu: float = _DEFAULT.mu, ana_backward: str = _DEFAULT.backward,
                 ana_sigma_grad_min: float = _DEFAULT.sigma_grad_min, ana_float: bool = False):
        super().__init__(narrow_range, signed, input_view_impl, float_to_int_impl,
                         tensor_clamp_impl, quant_delay_steps)
        _check_round(float_to_int_impl)
        self._init_ana(self._config_of(ana_noise, ana_strategy, ana_annealed_grad, ana_mu,
                                       ana_backward, ana_sigma_grad_min), ana_sigma, ana_float)

    def to_int(self, scale: Tensor, zero_point: Tensor, bit_width: Tensor, x: Tensor) -> Tensor:
        """``y = x / scale + zero_point``, then ``ana_round(y, min_int, max_int, ...)``."""
        if self.stock_path:
            return super().to_int(scale, zero_point, bit_width, x)
        x = self.input_view_impl(x)
        y = x / scale
        y = y + zero_point
        if self.float_mode:  # the stair's continuous relaxation: clamp(y, min_int, max_int)
            return tensor_clamp(y, self.min_int(bit_width), self.max_int(bit_width))
        if not bit_width.requires_grad:
            return self.ana_round(y, *self._int_bounds(bit_width))
        lo = self.min_int(bit_width)
        hi = self.max_int(bit_width)
        q = ana_round(y, lo, hi, **self.noise_args())
        # A learned bit width gets the gradient stock Brevitas gives it: through the clamp of
        # round(y) to the bounds (the added term is zero in value).
        r = torch.round(y.detach())
        return q + (tensor_clamp(r, lo, hi) - tensor_clamp(r, lo.detach(), hi.detach()))

    def _int_bounds(self, bit_width: Tensor) -> Tuple[int, int]:
        """``(min_int, max_int)`` as Python ints, read from the device once per bit width: a
        read each step would make the host wait for the device at every quantiser. A constant
        bit width comes back as the same storage each step; holding it keeps its address from
        being reused, and an in-place change bumps its version."""
        cached = self.__dict__.get("_bounds_cache")
        if (cached is None or cached[0].data_ptr() != bit_width.data_ptr()
                or cached[0].device != bit_width.device or cached[1] != bit_width._version):
            bounds = (int(self.min_int(bit_width).item()), int(self.max_int(bit_width).item()))
            cached = self.__dict__["_bounds_cache"] = (bit_width, bit_width._version, bounds)
        return cached[2]


class AnaIntQuant(_AnaIntMixin, IntQuant):
    """:class:`brevitas.core.quant.IntQuant` whose rounding is ANA while training with noise."""


class AnaDecoupledIntQuant(_AnaIntMixin, DecoupledIntQuant):
    """:class:`DecoupledIntQuant` (rounds with the pre-scale) with ANA rounding."""


class _AnaBinaryMixin(AnaQuantMixin):
    """Binary sign as a one-threshold stair: in step units ``y = (x / scale + 1) / 2`` the levels
    -1, +1 are 0, 1 and the threshold ``x = 0`` is ``y = 1/2``; the output is
    ``(2 * ana_round(y, 0, 1) - 1) * scale``. Uniform noise of half-width 1/2 step (sigma =
    1/sqrt(12)) is BinaryConnect's hard-sigmoid; the stock input clamp to [-scale, scale] is left
    out, since the noise now decides where the gradient vanishes."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.stock_path:
            return super().forward(x)
        scale = self.scaling_impl(x)
        if self.float_mode:  # sign's continuous relaxation: hardtanh, clamp(x, -scale, scale)
            out = torch.minimum(torch.maximum(x, -scale), scale)
            return out, scale, self.zero_point(), self.bit_width()
        # y = (x / scale + 1) / 2: three launches and Python scalars (a scalar tensor made on
        # the host would be a copy to the GPU each step). Division's backward keeps x and scale,
        # not its result, so the two in-place steps are safe for autograd.
        y = x.div(scale).add_(1.0).mul_(0.5)
        if self.sigma < SIGMA_MIN and self.grad_floor < SIGMA_MIN:  # annealed, zero gradient
            q = (y >= 0.5).to(y.dtype)  # same tie at 0 as binary_sign
        else:
            q = self.ana_round(y, 0, 1)
            if self.sigma < SIGMA_MIN:
                # the stair rounds the tie y = 1/2 (x = 0) half-to-even, to 0; sign gives +1.
                # Added, not selected, so that the gradient still flows there.
                q = q + (y == 0.5).to(q.dtype)
        out = torch.addcmul(-scale, q, 2.0 * scale)  # 2 scale q - scale
        out = self.delay_wrapper(x, out)
        return out, scale, self.zero_point(), self.bit_width()


class AnaBinaryQuant(_AnaBinaryMixin, BinaryQuant):
    """:class:`brevitas.core.quant.BinaryQuant` with ANA sign."""

    def __init__(self, scaling_impl: nn.Module, signed: bool = True, quant_delay_steps: int = 0,
                 ana_noise: str = _DEFAULT.noise, ana_strategy: str = _DEFAULT.strategy,
                 ana_annealed_grad: str = _DEFAULT.annealed_grad, ana_sigma: float = 0.0,
                 ana_mu: float = _DEFAULT.mu, ana_backward: str = _DEFAULT.backward,
                 ana_sigma_grad_min: float = _DEFAULT.sigma_grad_min, ana_float: bool = False):
        super().__init__(scaling_impl, signed, quant_delay_steps)
        self._init_ana(self._config_of(ana_noise, ana_strategy, ana_annealed_grad, ana_mu,
                                       ana_backward, ana_sigma_grad_min), ana_sigma, ana_float)


class AnaClampedBinaryQuant(_AnaBinaryMixin, ClampedBinaryQuant):
    """:class:`brevitas.core.quant.ClampedBinaryQuant` with ANA sign."""

    def __init__(self, scaling_impl: nn.Module, tensor_clamp_impl: nn.Module = TensorClamp(),
                 quant_delay_steps: int = 0, ana_noise: str = _DEFAULT.noise,
                 ana_strategy: str = _DEFAULT.strategy,
                 ana_annealed_grad: str = _DEFAULT.annealed_grad, ana_sigma: float = 0.0,
                 ana_mu: float = _DEFAULT.mu, ana_backward: str = _DEFAULT.backward,
                 ana_sigma_grad_min: float = _DEFAULT.sigma_grad_min, ana_float: bool = False):
        super().__init__(scaling_impl, tensor_clamp_impl, quant_delay_steps)
        self._init_ana(self._config_of(ana_noise, ana_strategy, ana_annealed_grad, ana_mu,
                                       ana_backward, ana_sigma_grad_min), ana_sigma, ana_float)


# Stock module -> ANA twin. Wrappers are kept: their inner slot is swapped instead.
TWINS = {IntQuant: AnaIntQuant, DecoupledIntQuant: AnaDecoupledIntQuant,
         BinaryQuant: AnaBinaryQuant, ClampedBinaryQuant: AnaClampedBinaryQuant}
STOCK = {twin: stock for stock, twin in TWINS.items()}
_WRAPPERS = {RescalingIntQuant, DecoupledRescalingIntQuant, DecoupledRescalingIntQuantWithInput}
_SLOTS = ("tensor_quant", "int_quant", "decoupled_int_quant")
ANA_OPTIONS = ("ana_noise", "ana_strategy", "ana_annealed_grad", "ana_sigma", "ana_mu",
               "ana_backward", "ana_sigma_grad_min", "ana_float")


def _swap(quant_name: str, slot: str, cls, mapping):
    if cls is None or cls in mapping.values():
        return cls
    if cls in mapping:
        return mapping[cls]
    if slot == "tensor_quant" and cls in _WRAPPERS:
        return cls
    raise ValueError(
        f"{quant_name}: {slot} {getattr(cls, '__name__', cls)!r} has no ANA twin; supported: "
        f"{sorted(c.__name__ for c in list(TWINS) + list(_WRAPPERS))}")


def _swap_value(quant_name: str, slot: str, function, mapping):
    """A ``@value`` with ``function``'s signature that swaps its result, so that solver-based
    quantisers (tensor_quant chosen from quant_type) keep their logic."""

    def swapped(**kwargs):
        return _swap(quant_name, slot, function(**kwargs), mapping)

    swapped.__signature__ = inspect.signature(function)
    swapped.__name__ = slot
    return value(swapped)


def _retarget(quant, mapping, name: str, doc: str, overrides: dict):
    if not (inspect.isclass(quant) and issubclass(quant, ExtendedInjector)):
        raise ValueError(f"quant must be a Brevitas quantiser (ExtendedInjector subclass), "
                         f"got {quant!r}")
    qname = quant.__name__
    namespace = {}
    for slot in _SLOTS:
        spec = quant.__dependencies__.get(slot)
        if spec is None:
            continue
        attribute = spec[1]
        if inspect.isclass(attribute):
            namespace[slot] = _swap(qname, slot, attribute, mapping)
        elif spec[0] == "injectable":  # a @value function or a raw value
            namespace[slot] = _swap_value(qname, slot, attribute, mapping)
        else:
            raise ValueError(f"{qname}: {slot} is a {spec[0]!r} dependency, which cannot be "
                             "retargeted; give it a class or a @value function")
    if "tensor_quant" not in namespace:
        raise ValueError(f"{qname} defines no tensor_quant: not a Brevitas quantiser")
    namespace.update(overrides)
    namespace.update(__module__=__name__, __qualname__=name, __doc__=doc)
    return type(quant)(name, (quant,), namespace)


def ana_quant(quant, name: str = None, config: "AnaConfig" = None, **overrides):
    """The ANA twin of a Brevitas integer or binary quantiser (injector) class.

    The twin is a subclass of ``quant`` whose rounding module is the ANA one; everything else,
    solver logic included, is inherited. ``config`` (an :class:`~brevitas_ana.AnaConfig`) sets
    its ANA options; ``overrides`` are injector attributes on top, e.g.
    ``ana_quant(Int8ActPerTensorFloat, config=AnaConfig(noise="normal"), ana_sigma=0.5)``;
    like any Brevitas quantiser the twin also accepts ``.let(...)`` and layer keywords such as
    ``weight_ana_noise="logistic"``.
    """
    if config is not None:
        if not isinstance(config, AnaConfig):
            raise TypeError(f"config must be an AnaConfig, got {type(config).__name__}")
        overrides = {**config.injector_options(), **overrides}
    for key in overrides:
        if key.startswith("ana_") and key not in ANA_OPTIONS:
            raise ValueError(f"{key}: unknown ANA option; known: {', '.join(ANA_OPTIONS)}")
    qname = getattr(quant, "__name__", repr(quant))
    return _retarget(quant, TWINS, name or f"Ana{qname}",
                     f"ANA twin of :class:`{getattr(quant, '__module__', '')}.{qname}`.",
                     overrides)


def stock_quant(quant, name: str = None):
    """The stock counterpart of an ANA quantiser class (inverse of :func:`ana_quant`)."""
    qname = getattr(quant, "__name__", repr(quant))
    return _retarget(quant, STOCK, name or qname.removeprefix("Ana"),
                     f"Stock counterpart of {qname}.", {})


@contextlib.contextmanager
def keep_quant_modules():
    """Load state dicts without Brevitas rebuilding the quantiser modules.

    By default (``brevitas.config.REINIT_ON_STATE_DICT_LOAD``) every ``load_state_dict`` builds new
    quantiser modules, with new scale parameters: an optimiser created before the load would then
    update parameters the model no longer uses, and the noise set on the old modules is lost.
    Inside this context values are copied into the existing modules instead, as for plain torch.
    """
    saved = brevitas.config.REINIT_ON_STATE_DICT_LOAD
    brevitas.config.REINIT_ON_STATE_DICT_LOAD = False
    try:
        yield
    finally:
        brevitas.config.REINIT_ON_STATE_DICT_LOAD = saved


def ana_quantizers(model: nn.Module) -> Iterator[Tuple[str, AnaQuantMixin]]:
    """(name, module) of every ANA rounding module in ``model``, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, AnaQuantMixin):
            yield name, module


def set_sigma(model: nn.Module, sigma, mu=0.0, sigma_grad_min=None) -> int:
    """Set the noise of every ANA quantiser in ``model`` to standard deviation ``sigma`` and
    mean ``mu`` (steps), and the backward floor ``sigma_grad_min`` when given; returns how many
    were set. ``ValueError`` if the model has none."""
    count = 0
    for _, module in ana_quantizers(model):
        module.set_sigma(sigma, mu, sigma_grad_min)
        count += 1
    if count == 0:
        raise ValueError("model: no ANA quantiser found (swap quantisers with their Ana* twins "
                         "or convert the model first)")
    return count


AnaInt8WeightPerTensorFloat = ana_quant(Int8WeightPerTensorFloat)
AnaInt8WeightPerChannelFloat = ana_quant(Int8WeightPerChannelFloat)
AnaInt8ActPerTensorFloat = ana_quant(Int8ActPerTensorFloat)
AnaUint8ActPerTensorFloat = ana_quant(Uint8ActPerTensorFloat)
AnaSignedBinaryWeightPerTensorConst = ana_quant(SignedBinaryWeightPerTensorConst)
AnaSignedBinaryActPerTensorConst = ana_quant(SignedBinaryActPerTensorConst)
AnaSignedTernaryWeightPerTensorConst = ana_quant(SignedTernaryWeightPerTensorConst)
AnaSignedTernaryActPerTensorConst = ana_quant(SignedTernaryActPerTensorConst)
