"""Test helpers importable from any test module (``from tests.helpers import ...``)."""

from __future__ import annotations

from functools import partial

import torch

from fqtc.backend import capture, fqt_backend


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20*log10(||ref|| / ||ref - x||) (torchao's compute_error)."""
    ref, x = ref.detach().double(), x.detach().double()
    err = (ref - x).norm()
    return float("inf") if err == 0 else float(20 * torch.log10(ref.norm() / err))


def compile_fqt(model, options=None):
    """torch.compile with the fqt backend and explicit options (bypasses the entry-point lookup)."""
    return torch.compile(model, backend=partial(fqt_backend, options=options))


def run_and_capture(model, inputs, options=None, grad=None):
    """Compile ``model`` with fqt, run forward (+ backward with ``grad`` or sum()), return (out, CompiledGraphs)."""
    with capture() as cgs:
        out = compile_fqt(model, options)(*inputs)
        if out.requires_grad:
            out.backward(grad if grad is not None else torch.ones_like(out))
    return out, cgs
