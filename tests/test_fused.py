"""The closed forms fused by torch.compile (what users run by default) against the same functions
run eagerly (what the rest of the suite checks against independent computations)."""
import pytest
import torch

from brevitas_ana import ana_round
from brevitas_ana import fused as F

pytestmark = pytest.mark.slow

# every path of expectation_and_slope: (noise, lo, hi, sigma)
CASES = [
    ("uniform", 0, 1, 0.5), ("uniform", -8, 7, 2.0),        # closed form (binary, multi-level)
    ("triangular", -2, 1, 0.5), ("triangular", 0, 255, 2.0),  # closed form
    ("normal", -2, 1, 0.5), ("logistic", -2, 1, 0.5),       # every threshold
    ("logistic", -128, 127, 0.05),                          # window around u
    ("normal", -128, 127, 2.0),                             # Euler-Maclaurin, whole stair
    ("normal", -8, 7, 0.5), ("normal", -128, 127, 0.5),     # series, thresholds past an end
    ("logistic", -128, 127, 2.0),                           # series, 24 thresholds past an end
]


@pytest.mark.skipif(not F.COMPILE_SUPPORTED, reason="torch < 2.14 runs the kernels eagerly (it "
                    "would recompile at every sigma): no compiled kernel to compare")
@pytest.mark.parametrize("noise,lo,hi,sigma", CASES)
def test_compiled_matches_eager(monkeypatch, noise, lo, hi, sigma):
    torch.manual_seed(0)
    y = torch.cat([torch.randn(3000) * (hi - lo) / 3 + (lo + hi) / 2,
                   torch.tensor([float("inf"), float("-inf"), lo - 0.5, hi + 0.5])])
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("BREVITAS_ANA_COMPILE", mode)
        for s in (sigma, 1.3 * sigma):  # a new sigma: no recompilation needed, same results
            x = y.clone().requires_grad_()
            out = ana_round(x, lo, hi, noise, s)
            out[torch.isfinite(out)].sum().backward()
            results[mode, s] = out.detach(), x.grad
    for s in (sigma, 1.3 * sigma):
        (e_out, e_grad), (c_out, c_grad) = results["0", s], results["1", s]
        torch.testing.assert_close(c_out, e_out, rtol=2e-6, atol=2e-5)
        torch.testing.assert_close(c_grad, e_grad, rtol=2e-3, atol=1e-5)  # half-precision slope
    assert F.compiled_kernels() > 0  # the compiled path really ran


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setenv("BREVITAS_ANA_COMPILE", "1")
    monkeypatch.setattr(F, "COMPILE_SUPPORTED", True)

    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(F, "_COMPILED", {})
    y = torch.linspace(-3, 3, 101)
    monkeypatch.setenv("BREVITAS_ANA_COMPILE", "0")
    want = ana_round(y, -2, 1, "triangular", 0.7)
    monkeypatch.setenv("BREVITAS_ANA_COMPILE", "1")
    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler found"):
        got = ana_round(y, -2, 1, "triangular", 0.7)
    assert torch.equal(got, want)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second call is silently eager
        assert torch.equal(ana_round(y, -2, 1, "triangular", 0.7), want)
