"""The papers' gradient quantizers at conv sites (docs/gradient_quantizers.md): each lowers to its own op on the
4-D ``grad_output`` — ``fqt::grad_quantize`` (PTQ, PSQ, SCQ, AQ, AQ top-k: int8 codes + scale) or ``fqt::bhq``
(a dequantized operand) — with the role's grouping, instead of a uniform stand-in.

Exact tier: with nearest rounding, PTQ/PSQ/SCQ give input and weight gradients equal to torch's conv gradients on
the dequantized operands quantized with the reference functions. Structural tier: the op, the grouping per role and
the integer/float product flag per quantizer. SQNR tier (AQ, BHQ: stochastic by construction): the gradients stay
within a measured band of the FP32 gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fqtc.ops  # noqa: F401
from fqtc.quant import gradq
from fqtc.quant.uniform import dequantize, quantize
from tests.helpers import run_and_capture

ARGS = ([1, 1], [1, 1], [1, 1], 1)
# grad_output grouping per role (fqtc.config.GRAD_QUANTIZER_GRANULARITY mapped to 4-D dims by passes/conv.py)
DIMS = {"tensor": [0, 1, 2, 3], "sample": [1, 2, 3], "channel": [0, 2, 3]}
GROUPING = {"ptq": ("tensor", "tensor"), "psq": ("sample", "sample"), "scq": ("sample", "channel"),
            "aq": ("sample", "channel"), "aq_topk": ("sample", "channel"), "bhq": ("sample", "sample")}


def _setup(quantizer: str, bits: str = "W8A8G8", rounding: str | None = None):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(5, 4, 7, 6, requires_grad=True)
    go = torch.randn(5, 6, 7, 6) * torch.logspace(-1, 1, 5).reshape(5, 1, 1, 1)
    opts = {"bits": bits, "grad_quantizer": quantizer}
    if rounding:
        opts["rounding"] = rounding
    out, cgs = run_and_capture(conv, (x,), opts, grad=go)
    return conv, x, go, cgs[0]


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum())).item()


@pytest.mark.parametrize("quantizer", list(GROUPING))
def test_conv_lowers_each_gradient_quantizer(quantizer):
    _, _, _, cg = _setup(quantizer, "W8A8G1" if quantizer.startswith("aq") else "W8A8G8")
    op = torch.ops.fqt.bhq_quantize.default if quantizer == "bhq" else torch.ops.fqt.grad_quantize.default
    nodes = [n for n in cg.backward.graph.nodes if n.op == "call_function" and n.target is op]
    assert nodes, f"no {op} in the backward graph"
    recs = {r["role"]: r for r in cg.records if r["op"] == "convolution_backward"}
    for role, gran in zip(("grad_input", "grad_weight"), GROUPING[quantizer]):
        g = recs[role]["operands"]["grad_output"]
        assert g["quantizer"] == quantizer and g["reduce_dims"] == DIMS[gran], (role, g)
        # integer conv when the grouping is constant along the role's reduction (per sample for grad_input,
        # per channel for grad_weight); BHQ mixes samples: grad_input stays integer on the codes of T g (its output
        # rows are the samples, T^-1 goes on them), grad_weight reduces over samples and reads T^-1 Q(T g)
        integer = gran in ({"grad_input": ("tensor", "sample"), "grad_weight": ("tensor", "channel")}[role])
        if quantizer == "bhq":
            integer = role == "grad_input"
        assert recs[role]["integer_gemm"] is integer, (role, recs[role])
        assert not any("not lowered" in n for n in recs[role]["notes"])
    if quantizer != "bhq":
        stored = {tuple(n.args[3]) for n in nodes}
        assert stored == {tuple(DIMS[g]) for g in GROUPING[quantizer]}
    else:  # T^-1 on the integer grad_input's output, and on the dequantized codes grad_weight reads
        inv = [n for n in cg.backward.graph.nodes if n.target is torch.ops.fqt.bhq_invert.default]
        assert sorted(n.args[0].target.__name__ for n in inv) == ["mul.Tensor", "qconv2d_input.default"]


@pytest.mark.parametrize("quantizer", ["ptq", "psq", "scq"])
def test_conv_gradient_quantizer_equals_dequantized_reference(quantizer):
    conv, x, go, _ = _setup(quantizer, rounding="nearest")
    _, _, xd = (lambda c, s: (c, s, dequantize(c, s)))(*quantize(x.detach(), 8, DIMS["tensor"]))
    wc, ws = quantize(conv.weight.detach(), 8, DIMS["tensor"])
    g_in, g_w = (gradq.dequantize(gradq.grad_quantize(go, quantizer, 8, DIMS[g], "nearest"))
                 for g in GROUPING[quantizer])
    # the integer conv and torch's fp32 conv round their sums differently: tolerances relative to the tensor's
    # range (a change of grouping moves every element by ~1% of it)
    for got, want in ((x.grad, torch.nn.grad.conv2d_input(x.shape, dequantize(wc, ws), g_in, *ARGS)),
                      (conv.weight.grad, torch.nn.grad.conv2d_weight(xd, conv.weight.shape, g_w, *ARGS))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("quantizer,bits,band", [("aq", "W8A8G1", (-8.0, 0.0)), ("bhq", "W8A8G8", (35.0, 45.0))])
def test_conv_stochastic_gradient_quantizers_within_band(quantizer, bits, band):
    """AQ at 1 bit on average and BHQ at 8 bits against the FP32 gradient (one step; the bands bracket what these
    quantizers give on this layer, so a uniform stand-in at 8 bits fails the AQ band)."""
    conv, x, go, _ = _setup(quantizer, bits)
    ref_conv = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        ref_conv.weight.copy_(conv.weight)
        ref_conv.bias.copy_(conv.bias)
    xr = x.detach().clone().requires_grad_(True)
    ref_conv(xr).backward(go)
    s = _sqnr(ref_conv.weight.grad, conv.weight.grad)
    assert band[0] <= s <= band[1], s
