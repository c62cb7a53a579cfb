"""Gradient health: how much gradient each ANA group lets through, so a starving layer shows.

For every group of an :class:`~brevitas_ana.controller.AnaController`, accumulated over the
training steps since the last :meth:`GradientHealth.read`:

- ``grad_pass``: of the elements of the group's activation layer that *receive* a non-zero
  gradient, the fraction that pass a non-zero gradient on to the layer's input,
  ``nnz(dL/dx) / nnz(dL/dy)`` summed over steps (``y`` the layer's output, ``x`` its input). With
  an STE-like backward it is close to 1; as the exact derivative of a nearly sharp stair
  collapses into narrow spikes it falls towards 0. Elements that receive no gradient at all (the
  positions a max-pool drops, say) are not counted, so the figure is the quantiser's own.
- ``grad_norm``: the L2 norm of the gradient of the group's weights (all its weight-quantised
  layers together), averaged over the steps.

Only activation layers (``act_quant``: QuantIdentity, QuantReLU, ...) are counted, whose input
is the quantiser's. Groups without one whose input needs a gradient (the input quantiser, or a
layer's ``input_quant`` in timm conversions) report ``nan`` for ``grad_pass``; groups without
weights report ``nan`` for ``grad_norm``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from brevitas_ana.controller import AnaController, describe

__all__ = ["GradientHealth"]


class GradientHealth:
    """Counts gradients per group of ``controller`` through hooks on the groups' layers.

    Create it once the controller has ordered its groups (``example_input``, or after the first
    forward pass). Call :meth:`after_backward` once per optimiser step, after the backward pass
    and before the gradients are zeroed; :meth:`read` returns ``{group: {"grad_pass": ...,
    "grad_norm": ...}}`` and starts a new accumulation. Counters stay on the device (no
    synchronisation per step). ``every=N`` samples one step in N, those at which the controller's
    ``step_count`` is a multiple of N (so a resumed run samples the same steps): counting costs a
    few elementwise passes over every activation.
    """

    def __init__(self, controller: AnaController, every: int = 1):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every, self.controller = every, controller
        self.groups = list(controller.groups)
        model = controller.model
        self._act_layers: Dict[int, nn.Module] = {}
        self._weights: Dict[int, list] = {}
        for i, members in enumerate(controller.groups.values()):
            for name in members:
                layer_name, role = describe(name)
                layer = model.get_submodule(layer_name) if layer_name else model
                if role == "weight":
                    self._weights.setdefault(i, []).append(layer.weight)
                elif role == "act":  # a QuantIdentity-like layer: its input is the quantiser's
                    self._act_layers.setdefault(i, layer)
        self._totals: Optional[Tensor] = None  # [groups, 4]: nnz in, nnz out, norm sum, steps
        self._handles = [layer.register_forward_hook(self._hook(i))
                         for i, layer in self._act_layers.items()]

    def _counters(self, like: Tensor) -> Tensor:
        if self._totals is None:
            self._totals = torch.zeros(len(self.groups), 4, dtype=torch.float64,
                                       device=like.device)
        return self._totals

    def _hook(self, index: int) -> Callable:
        def count(column):
            def add(grad):
                self._counters(grad)[index, column] += torch.count_nonzero(grad)
            return add

        def hook(module, args, output):
            x = args[0] if args else None
            if not (self._sampled() and module.training and torch.is_grad_enabled()
                    and isinstance(x, Tensor) and x.requires_grad
                    and isinstance(output, Tensor) and output.requires_grad):
                return
            x.register_hook(count(0))
            output.register_hook(count(1))
        return hook

    def _sampled(self) -> bool:
        return self.controller.step_count % self.every == 0

    def after_backward(self):
        """Add this step's weight-gradient norms (call before the gradients are zeroed)."""
        if not self._sampled():
            return
        for i, weights in self._weights.items():
            grads = [w.grad for w in weights if w.grad is not None]
            if not grads:
                continue
            totals = self._counters(grads[0])
            totals[i, 2] += torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            totals[i, 3] += 1

    def read(self, reduce: Optional[Callable[[Tensor], Tensor]] = None
             ) -> "OrderedDict[str, Dict[str, float]]":
        """Per group ``grad_pass`` and ``grad_norm`` since the last read (see the module
        docstring); ``reduce`` (e.g. ``accelerator.reduce``, summing) combines processes."""
        totals = self._totals if self._totals is not None else torch.zeros(len(self.groups), 4,
                                                                           dtype=torch.float64)
        if reduce is not None:
            totals = reduce(totals)
        totals = totals.cpu().tolist()
        self._totals = None
        out = OrderedDict()
        for g, (nnz_in, nnz_out, norm_sum, steps) in zip(self.groups, totals):
            out[g] = {"grad_pass": nnz_in / nnz_out if nnz_out else math.nan,
                      "grad_norm": norm_sum / steps if steps else math.nan}
        return out

    def remove(self):
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
