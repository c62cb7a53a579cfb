"""Fused kernels: each closed form's elementwise work compiled into one kernel.

An ANA quantiser's forward is a few dozen elementwise operations (a closed form, a series, a
short sum). Run one after another they cost a memory pass and a launch each; compiled by
``torch.compile`` (inductor) they are one loop over the tensor: about 25x less time on a CPU, and
one kernel launch instead of dozens on a GPU.
"""
from __future__ import annotations

import os
import types
import warnings

import torch
from torch import Tensor

__all__ = ["fused", "compile_enabled", "compiled_kernels"]

#: Compiled copies by (function, specialisation); ``{function: None}`` once it failed to compile
#: (no C++ compiler, an unsupported platform): it warns once and runs eagerly from then on.
_COMPILED: dict = {}


#: From torch 2.14 the compiler keeps a float argument (sigma) symbolic; up to 2.12 at least it
#: specialises the kernel to each value, i.e. recompiles (seconds) at every annealing step, so
#: older releases run the kernels eagerly.
COMPILE_SUPPORTED = torch.torch_version.TorchVersion(torch.__version__) >= "2.14"


def compile_enabled() -> bool:
    """True on torch >= 2.14 unless the environment variable ``BREVITAS_ANA_COMPILE`` is ``0``."""
    return COMPILE_SUPPORTED and os.environ.get("BREVITAS_ANA_COMPILE", "1") != "0"


def compiled_kernels() -> int:
    """How many compiled kernel copies this process holds (0 where everything ran eagerly)."""
    return sum(1 for key, value in _COMPILED.items() if isinstance(key, tuple) and value)


def _static_key(args) -> tuple:
    # what a compiled kernel is specialised to: everything but floats (sigma and the series
    # coefficients are kernel arguments, so annealing never recompiles), lists by their length
    return tuple(len(a) if isinstance(a, list) else None if isinstance(a, float) else a
                 for a in args)


def fused(fn, u: Tensor, *args):
    """``fn(u, *args)``, compiled (``dynamic=True``: no recompiling for new shapes or noise
    levels) when enabled and ``u`` is float32; eager otherwise. ``fn`` must return tensors only
    (a Python number computed inside a compiled function can come back stale).

    Each specialisation (family, clamp bounds, loop lengths) gets its own copy of ``fn``'s code:
    the compiler caches a handful of variants per code object and silently runs eagerly beyond
    them, which a model with several bit widths and families would reach."""
    if u.dtype != torch.float32 or not compile_enabled() or torch.compiler.is_compiling():
        return fn(u, *args)
    if _COMPILED.get(fn, 0) is None:  # failed to compile before
        return fn(u, *args)
    key = (fn, _static_key(args))
    compiled = _COMPILED.get(key)
    if compiled is None:
        copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                  fn.__defaults__, fn.__closure__)
        compiled = _COMPILED[key] = torch.compile(copy, dynamic=True)
    try:
        return compiled(u, *args)
    except Exception as e:  # noqa: BLE001 -- any compiler failure: the eager function still works
        _COMPILED[fn] = None
        warnings.warn(f"brevitas_ana: torch.compile failed for {getattr(fn, '__name__', fn)} "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                      "running it eagerly (set BREVITAS_ANA_COMPILE=0 to skip compiling)")
        return fn(u, *args)


