"""The recipes' networks, built with stock Brevitas quantisers or their ANA twins.

Every model takes CIFAR-10 images as the data loader gives them: float tensors in [0, 1], NCHW,
32x32. Per-model preprocessing (CNV's ``2x - 1``, the others' mean/std normalisation) is inside
the model, so exported graphs take the same input.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import timm
import torch
import brevitas.nn as qnn
from brevitas.quant import (Int8ActPerTensorFloat, Int8WeightPerTensorFloat,
                            SignedTernaryActPerTensorConst, SignedTernaryWeightPerTensorConst)
from brevitas_examples.bnn_pynq.models.CNV import CNV
from torch import nn

import brevitas_ana

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """(x - mean) / std per channel, with constant buffers (exported as Sub/Div)."""

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class VGG8(nn.Module):
    """The paper's CIFAR-10 network: conv 128-128-pool-256-256-pool-512-512-pool, FC
    8192-1024-1024-10, BatchNorm after every conv/FC. Ternary weights and activations everywhere
    except the input (8-bit input quantiser, 8-bit first-conv weights) and the last FC (8-bit)."""

    def __init__(self, num_classes=10):
        super().__init__()
        tw, ta = SignedTernaryWeightPerTensorConst, SignedTernaryActPerTensorConst
        layers = [Normalize(), qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat)]
        in_ch = 3
        for i, (out_ch, pool) in enumerate([(128, False), (128, True), (256, False), (256, True),
                                           (512, False), (512, True)]):
            wq = dict(weight_quant=Int8WeightPerTensorFloat) if i == 0 else dict(weight_quant=tw)
            layers += [qnn.QuantConv2d(in_ch, out_ch, 3, padding=1, bias=False, **wq),
                       nn.BatchNorm2d(out_ch), qnn.QuantIdentity(act_quant=ta)]
            if pool:
                layers.append(nn.MaxPool2d(2))
            in_ch = out_ch
        layers.append(nn.Flatten())
        for fin, fout in [(8192, 1024), (1024, 1024)]:
            layers += [qnn.QuantLinear(fin, fout, bias=False, weight_quant=tw),
                       nn.BatchNorm1d(fout), qnn.QuantIdentity(act_quant=ta)]
        layers += [qnn.QuantLinear(1024, num_classes, bias=False,
                                   weight_quant=Int8WeightPerTensorFloat),
                   nn.BatchNorm1d(num_classes)]
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


def resnet18_cifar(weight_bit_width=4, act_bit_width=4, num_classes=10, config=None):
    """timm resnet18 adapted to 32x32 inputs (3x3 stride-1 stem, no max-pool), converted with
    :func:`brevitas_ana.quantize_timm` (first and last layer 8-bit)."""
    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model = nn.Sequential(Normalize(), model)
    return brevitas_ana.quantize_timm(model, weight_bit_width=weight_bit_width,
                                      act_bit_width=act_bit_width, config=config)


# --- the registry (timm's register_model / create_model pattern) ------------------------------

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a network builder under its function name; :func:`create_model` calls it with
    the keyword arguments of a model spec."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> List[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """The registered network ``name`` built with ``kwargs``; what a model spec
    ``{"name": ..., "kwargs": {...}}`` (written beside every saved set of weights) describes."""
    if name not in _MODELS:
        raise ValueError(f"model: unknown model {name!r}; known: {list_models()}")
    try:
        return _MODELS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"model {name!r}: {e}") from None


QUANTISERS = ("ana", "ste", "float")


def _check_quantiser(quantiser: str):
    if quantiser not in QUANTISERS:
        raise ValueError(f"quantiser: must be one of {list(QUANTISERS)}, got {quantiser!r}")


def _ana_or_stock(model: nn.Module, quantiser: str, ana: Optional[dict]) -> nn.Module:
    """``model`` (stock Brevitas quantisers) for ``quantiser``: ``ana`` its ANA twin, ``ste`` as
    it is, ``float`` the ANA twin relaxed to float (:func:`brevitas_ana.set_float`: the same
    parameter names, so its weights load into the other two)."""
    _check_quantiser(quantiser)
    if quantiser == "ste":
        return model
    model = brevitas_ana.to_ana(model, brevitas_ana.AnaConfig(**(ana or {})))
    return brevitas_ana.set_float(model) if quantiser == "float" else model


@register_model
def cnv(weight_bit_width: int = 2, act_bit_width: int = 2, in_bit_width: int = 8,
        quantiser: str = "ana", ana: Optional[dict] = None) -> nn.Module:
    """FINN's CNV (Brevitas bnn_pynq topology) for CIFAR-10, ANA (``quantiser="ana"``, with
    the ANA options ``ana``) or stock Brevitas (``"ste"``) quantisers, or its float twin
    (``"float"``)."""
    model = CNV(num_classes=10, weight_bit_width=weight_bit_width, act_bit_width=act_bit_width,
                in_bit_width=in_bit_width, in_ch=3)
    return _ana_or_stock(model, quantiser, ana)


@register_model
def vgg8(quantiser: str = "ana", ana: Optional[dict] = None) -> nn.Module:
    """The paper's VGG8 (:class:`VGG8`), ANA or stock quantisers, or its float twin."""
    return _ana_or_stock(VGG8(), quantiser, ana)


@register_model
def resnet18(weight_bit_width: int = 4, act_bit_width: int = 4, quantiser: str = "ana",
             ana: Optional[dict] = None) -> nn.Module:
    """timm's resnet18 for 32x32 inputs (:func:`resnet18_cifar`), ANA or stock quantisers, or
    its float twin."""
    _check_quantiser(quantiser)
    model = resnet18_cifar(weight_bit_width, act_bit_width,
                           config=brevitas_ana.AnaConfig(**(ana or {})))
    if quantiser == "float":
        return brevitas_ana.set_float(model)
    return model if quantiser == "ana" else brevitas_ana.to_stock(model)


def model_spec(model, ana: brevitas_ana.AnaConfig) -> dict:
    """The spec ``{"name", "kwargs"}`` of a recipe network: the recipe's ``model`` section (the
    keywords the registered builder takes) and its ANA options, the whole
    :class:`~brevitas_ana.AnaConfig`."""
    import dataclasses
    import inspect
    takes = inspect.signature(_MODELS[model.name]).parameters if model.name in _MODELS else {}
    kwargs = {k: v for k, v in dataclasses.asdict(model).items() if k in takes}
    kwargs["ana"] = dataclasses.asdict(ana)
    return {"name": model.name, "kwargs": kwargs}


def describe(spec: dict) -> str:
    """``cnv W2A2 (ana)``: a spec in a few words, for messages."""
    kw = spec.get("kwargs", {})
    bits = (f" W{kw['weight_bit_width']}A{kw['act_bit_width']}"
            if "weight_bit_width" in kw else "")
    return f"{spec.get('name')}{bits} ({kw.get('quantiser', 'ana')})"
