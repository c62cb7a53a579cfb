"""brevitas-ana: additive noise annealing (Spallanzani et al., CVPR 2022) for Brevitas.

Where things live:
    noise.py       noise families (CDF, PDF, support) and their registry
    functional.py  ana_round: the smoothed stair and its autograd function
    quant.py       Brevitas adaptation: Ana* quantisers, ana_quant() twin factory, set_noise()
"""
from brevitas_ana.quant import check_jit_disabled

check_jit_disabled()

from brevitas_ana import functional, noise  # noqa: E402
from brevitas_ana.functional import ana_round  # noqa: E402
from brevitas_ana.noise import NoiseFamily, get_noise, register_noise  # noqa: E402
from brevitas_ana.quant import (AnaQuantMixin, ana_quant, ana_quantizers,  # noqa: E402
                                set_noise)

__version__ = "0.1.0"

__all__ = ["ana_round", "functional", "noise", "NoiseFamily", "get_noise", "register_noise",
           "AnaQuantMixin", "ana_quant", "ana_quantizers", "set_noise", "__version__"]
