"""One-call conversion: Brevitas model <-> ANA model, and float timm model -> ANA QNN.

``to_ana`` / ``to_stock`` work in place, like torchao's ``quantize_``: each weight and activation
quantiser's rounding module is re-typed to its twin (the same module object state: scales,
statistics, parameters and their identity, so an existing optimiser keeps working), and the
proxy's injector is swapped too, so that anything Brevitas rebuilds later is rebuilt as ANA.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import brevitas.nn as qnn
from brevitas.proxy.parameter_quant import WeightQuantProxyFromInjectorBase
from brevitas.proxy.runtime_quant import ActQuantProxyFromInjectorBase
from torch import nn

from brevitas_ana.options import AnaConfig
from brevitas_ana.quant import (STOCK, TWINS, AnaInt8ActPerTensorFloat,
                                AnaInt8WeightPerChannelFloat, AnaQuantMixin, ana_quant,
                                stock_quant)

__all__ = ["to_ana", "to_stock", "set_float", "quant_proxies", "quantize_timm"]

_NOISE_FIELDS = ("noise", "strategy", "annealed_grad", "sigma", "mu", "backward",
                 "sigma_grad_min", "float_mode")


def quant_proxies(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, proxy) of every weight and activation quant proxy (bias quantisers excluded)."""
    for name, module in model.named_modules():
        if isinstance(module, (WeightQuantProxyFromInjectorBase, ActQuantProxyFromInjectorBase)):
            yield name, module


def _retype(module: nn.Module, cls) -> nn.Module:
    # Same state, other class: the twins add only Python attributes to the stock modules.
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v)
                         for k, v in module.__dict__.items() if k not in _NOISE_FIELDS})
    return new


def _swap_leaves(proxy: nn.Module, mapping: dict, init) -> int:
    swaps = [(parent, attr, child) for parent in proxy.modules()
             for attr, child in parent.named_children() if type(child) in mapping]
    for parent, attr, child in swaps:
        new = _retype(child, mapping[type(child)])
        init(new)
        setattr(parent, attr, new)
    return len(swaps)


def _config(config, where: str) -> AnaConfig:
    config = AnaConfig() if config is None else config
    if not isinstance(config, AnaConfig):
        raise TypeError(f"{where}: config must be an AnaConfig, got {type(config).__name__} "
                        f"{config!r}"[:200])
    return config


def to_ana(model: nn.Module, config: Optional[AnaConfig] = None,
           filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Switch the integer / binary weight and activation quantisers of a Brevitas model to their
    ANA twins with the options of ``config`` (default ``AnaConfig()``), in place; returns the
    model. Weights, learned scales and statistics are kept; the quantisers start noise-free (the
    controller, or :func:`~brevitas_ana.set_sigma`, sets their noise). ``filter_fn(module,
    name)``, as in torchao's ``quantize_``, picks the layers (the modules that own the
    quantisers) to convert; default: all.

    Quantisers with no ANA twin (float, ternary-threshold) are left as they are, with a warning;
    ``ValueError`` if there is nothing to convert."""
    config = _config(config, "to_ana")
    options = config.injector_options()
    modules = dict(model.named_modules())
    converted, skipped = 0, []
    for name, proxy in quant_proxies(model):
        owner = name.rpartition(".")[0]
        if filter_fn is not None and not filter_fn(modules.get(owner, model), owner):
            continue
        if any(isinstance(m, AnaQuantMixin) for m in proxy.modules()):
            continue
        n = _swap_leaves(proxy, TWINS, lambda m: m._init_ana(config))
        if n == 0:
            if getattr(proxy, "is_quant_enabled", False):
                skipped.append(name)
            continue
        proxy.quant_injector = ana_quant(proxy.quant_injector, **options)
        converted += n
    if skipped:
        warnings.warn(f"to_ana: no ANA twin for the quantisers of {skipped}; left as they are")
    if converted == 0 and not any(isinstance(m, AnaQuantMixin) for m in model.modules()):
        raise ValueError("model: no Brevitas integer or binary weight/activation quantiser found"
                         + (" that filter_fn selects" if filter_fn is not None else ""))
    return model


def to_stock(model: nn.Module) -> nn.Module:
    """Switch every ANA quantiser back to the stock Brevitas one, in place (for deployment)."""
    for _, proxy in quant_proxies(model):
        if _swap_leaves(proxy, STOCK, lambda m: None):
            proxy.quant_injector = stock_quant(proxy.quant_injector)
    return model


def set_float(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Relax every ANA quantiser of ``model`` to its continuous twin (``enabled``), or put the
    stair back, in place; returns the model. Relaxed, an integer quantiser computes
    ``(clamp(x / s + z, min_int, max_int) - z) * s`` and a binary one ``clamp(x, -s, s)``
    (hardtanh), in training and in eval, noise-free: the float network of the QNN, with the
    same modules and parameter names, so that its weights load into the quantised network (float
    pre-training, then quantisation-aware fine-tuning). The proxies' injectors carry it
    (``ana_float``), so modules Brevitas rebuilds on ``load_state_dict`` keep it."""
    n = 0
    for _, proxy in quant_proxies(model):
        leaves = [m for m in proxy.modules() if isinstance(m, AnaQuantMixin)]
        if not leaves:
            continue
        proxy.quant_injector = proxy.quant_injector.let(ana_float=bool(enabled))
        for m in leaves:
            m.float_mode = bool(enabled)
        n += 1
    if n == 0:
        raise ValueError("model: no ANA quantiser found (use Ana* quantisers or to_ana first)")
    return model


# --- timm ---------------------------------------------------------------------------------------

def _layer_map(model: nn.Module, weight_bit_width: int, act_bit_width: int, weight_quant,
               act_quant, ana_options: dict) -> Dict[type, tuple]:
    """Brevitas layerwise map for every Conv2d / Linear class in ``model``. Subclasses count when
    they keep the base forward (timm's Linear only adds a TorchScript cast); others, such as
    'same'-padding convolutions, would change meaning and are left in float, with a warning."""
    kwargs = dict(weight_quant=weight_quant, weight_bit_width=weight_bit_width,
                  input_quant=act_quant, input_bit_width=act_bit_width,
                  return_quant_tensor=False,
                  **{f"weight_{k}": v for k, v in ana_options.items()},
                  **{f"input_{k}": v for k, v in ana_options.items()})
    layer_map, left = {}, set()
    for cls in {type(m) for m in model.modules()}:
        for base, quant_cls in ((nn.Conv2d, qnn.QuantConv2d), (nn.Linear, qnn.QuantLinear)):
            if not issubclass(cls, base) or issubclass(cls, quant_cls):
                continue
            if cls is base or cls.forward is base.forward or cls.__module__ == "timm.layers.linear":
                layer_map[cls] = (quant_cls, kwargs)
            else:
                left.add(cls.__name__)
    if left:
        warnings.warn(f"quantize_timm: layers of class {sorted(left)} have their own forward and "
                      "stay in float")
    return layer_map


def quantize_timm(model: nn.Module, weight_bit_width: int = 4, act_bit_width: int = 4,
                  first_layer_bit_width: Optional[int] = 8, last_layer_bit_width: Optional[int] = 8,
                  weight_quant=AnaInt8WeightPerChannelFloat,
                  act_quant=AnaInt8ActPerTensorFloat,
                  config: Optional[AnaConfig] = None) -> nn.Module:
    """Turn a float timm (or any torch) model into a Brevitas QNN with ANA quantisers.

    Every ``Conv2d`` and ``Linear`` becomes a ``QuantConv2d`` / ``QuantLinear`` whose weight
    (``weight_bit_width``, per-channel scales by default) and input (``act_bit_width``, signed,
    since timm blocks feed layers with signed residual sums) are quantised, with Brevitas'
    ``layerwise_quantize``. The first and the last such layer (in registration order) use
    ``first_layer_bit_width`` / ``last_layer_bit_width`` for both (``None``: same as the others).
    ``config`` (an :class:`~brevitas_ana.AnaConfig`) sets the ANA options. Weights are kept.
    """
    from brevitas.graph.quantize import layerwise_quantize
    if not isinstance(model, nn.Module):
        hint = (f"; build it first: quantize_timm(timm.create_model({model!r}, ...))"
                if isinstance(model, str) else "")
        raise TypeError(f"model: quantize_timm takes a torch.nn.Module, got "
                        f"{type(model).__name__} {model!r}"[:200] + hint)
    for field, bits in (("weight_bit_width", weight_bit_width), ("act_bit_width", act_bit_width),
                        ("first_layer_bit_width", first_layer_bit_width),
                        ("last_layer_bit_width", last_layer_bit_width)):
        if bits is None and field.startswith(("first", "last")):
            continue
        if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
            raise ValueError(f"{field} must be an integer in [2, 16], got {bits!r}")
    ana_options = _config(config, "quantize_timm").injector_options()
    layer_map = _layer_map(model, weight_bit_width, act_bit_width, weight_quant, act_quant,
                           ana_options)
    layers = [n for n, m in model.named_modules() if type(m) in layer_map]
    if not layers:
        raise ValueError("model: no Conv2d or Linear layer to quantise")
    special = {n: b for n, b in ((layers[0], first_layer_bit_width),
                                 (layers[-1], last_layer_bit_width)) if b is not None}
    model = layerwise_quantize(model, layer_map, name_blacklist=list(special))
    for name, bits in special.items():
        holder = _Holder(model.get_submodule(name))
        layerwise_quantize(holder, _layer_map(holder, bits, bits, weight_quant, act_quant,
                                              ana_options))
        _set_submodule(model, name, holder.m)
    return model


class _Holder(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
