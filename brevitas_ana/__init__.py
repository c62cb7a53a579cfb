"""brevitas-ana: additive noise annealing (Spallanzani et al., CVPR 2022) for Brevitas.

Where things live:
    noise.py       noise families (CDF, PDF, support) and their registry
    expectation.py E[stair(y + noise)] and its slope at O(1) per element (closed forms, series,
                   Euler-Maclaurin, direct sum), the most probable level
    functional.py  ana_round: the smoothed stair's autograd function (where sigma is used)
    checks.py      argument checks of the ANA options (each value checked where it enters)
    options.py     AnaConfig: the ANA settings, one set of defaults
    quant.py       Brevitas adaptation: Ana* quantisers, ana_quant(), set_sigma() (where sigma is
                   stored)
    schedules.py   annealing factors g(t)
    controller.py  AnaController: orders and groups quantisers, sets sigma(t) and the backward
                   noise (where they come from)
    health.py      GradientHealth: how much gradient each group lets through
    convert.py     to_ana(), to_stock(), set_float() (the float twin), quantize_timm()
"""
from brevitas_ana.quant import check_jit_disabled

check_jit_disabled()

from brevitas_ana import checks, expectation, functional, noise, schedules  # noqa: E402
from brevitas_ana.controller import BACKWARD_POLICIES, PRESETS, AnaController  # noqa: E402
from brevitas_ana.health import GradientHealth  # noqa: E402
from brevitas_ana.convert import quantize_timm, set_float, to_ana, to_stock  # noqa: E402
from brevitas_ana.functional import ana_round  # noqa: E402
from brevitas_ana.noise import NoiseFamily, get_noise, register_noise  # noqa: E402
from brevitas_ana.options import AnaConfig  # noqa: E402
from brevitas_ana.quant import (AnaQuantMixin, ana_quant, ana_quantizers,  # noqa: E402
                                keep_quant_modules, set_sigma, stock_quant)
from brevitas_ana.schedules import make_schedule  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ana_round", "checks", "expectation", "functional", "noise", "schedules", "NoiseFamily", "get_noise", "register_noise",
    "AnaQuantMixin", "ana_quant", "stock_quant", "ana_quantizers", "keep_quant_modules",
    "set_sigma", "AnaConfig", "AnaController", "PRESETS", "BACKWARD_POLICIES",
    "GradientHealth", "make_schedule", "to_ana", "to_stock", "set_float", "quantize_timm", "__version__"]
