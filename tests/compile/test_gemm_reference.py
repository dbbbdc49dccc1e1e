"""Exact tier for Linear, bmm and attention: a compiled training step equals an eager computation on the same codes
and scales.

The reference quantizes each operand itself (`fqtc.quant.uniform.quantize`) with the granularity the docs give for
its (role, operand) (docs/architecture.md, "Scales and integer GEMMs") or the one a rule sets, dequantizes, and runs
the float GEMMs; the compiled step must match it to fp32 tolerance (``assert_close``). A change of granularity
(weights per tensor instead of per output channel, gradients per tensor instead of per sample, ...) moves the
result by a quantization step and fails here. The conv counterpart is
tests/passes/test_conv.py::test_pass_numerics_equal_dequantized_reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import fqtc
from fqtc.passes.common import stable_stream
from fqtc.quant.uniform import dequantize, quantize
from tests.helpers import assert_quantized_graphs, run_and_capture

DEFAULT = {("output", "input"): "tensor", ("output", "weight"): "channel", ("grad_input", "grad_output"): "sample",
           ("grad_input", "weight"): "tensor", ("grad_weight", "grad_output"): "channel",
           ("grad_weight", "input"): "tensor"}


def _dims(gran: str, operand: str, ndim: int) -> list[int]:
    """Granularity -> dims sharing one scale (fqtc/passes/assign.py reduce_dims_for, written out)."""
    if gran == "tensor":
        return list(range(ndim))
    if gran in ("token", "sample") or operand == "weight":  # weight channel = output channel = row of W
        return [ndim - 1]
    return list(range(ndim - 1))  # channel of an activation / gradient: one scale per feature column


def _dq(t: torch.Tensor, gran: str, operand: str, bits: int = 8, rounding: str = "nearest", stream: int = 0,
        step: int = 0) -> torch.Tensor:
    codes, scale = quantize(t.detach(), bits, _dims(gran, operand, t.dim()), rounding, seed=0, step=step, stream=stream)
    return dequantize(codes, scale)


# rule sets: {(role, operand): granularity} overrides of the defaults, one per granularity a rule can set
LINEAR_CASES = {
    "defaults": {},
    "weight_tensor": {("output", "weight"): "tensor"},
    "grad_input_g_tensor": {("grad_input", "grad_output"): "tensor"},
    "grad_weight_g_tensor": {("grad_weight", "grad_output"): "tensor"},
    "input_token": {("output", "input"): "token", ("grad_weight", "input"): "token"},  # dequantized grad_weight
    "grad_input_g_channel": {("grad_input", "grad_output"): "channel"},  # a scale along K: dequantized product
    "grad_input_w_channel": {("grad_input", "weight"): "channel"},
}


def _rules(over: dict) -> list[dict]:
    return [{"role": r, "operand": o, "granularity": g} for (r, o), g in over.items()]


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_step_equals_dequantized_reference(case):
    over = LINEAR_CASES[case]
    gran = {**DEFAULT, **over}
    torch.manual_seed(0)
    fc = nn.Linear(24, 10)
    x = torch.randn(6, 24, requires_grad=True)
    go = torch.randn(6, 10)
    out, cgs = run_and_capture(fc, (x,), {"bits": "W8A8G8", "rounding": "nearest", "rules": _rules(over)}, grad=go)
    assert_quantized_graphs(cgs[0], 1, 2)
    w = fc.weight.detach()
    ref_out = _dq(x, gran["output", "input"], "input") @ _dq(w, gran["output", "weight"], "weight").T + fc.bias
    assert_close(out.detach(), ref_out.detach())
    if gran["grad_input", "weight"] == "channel" and gran["grad_input", "grad_output"] != "channel":
        # per-output-channel weight scales lie along grad_input's reduction axis: they are folded into the gradient
        # before it is quantized, and the integer GEMM reads the weight's codes (fqtc/passes/rewrite.py)
        w8, sw = quantize(w, 8, _dims("channel", "weight", 2), "nearest")
        ref_gi = _dq(go * sw.T, gran["grad_input", "grad_output"], "grad_output") @ w8.float()
        assert not torch.allclose(ref_gi, _dq(go, gran["grad_input", "grad_output"], "grad_output")
                                  @ dequantize(w8, sw))  # the unfolded product is another result
        rec = next(r for r in cgs[0].records if r["role"] == "grad_input")
        assert rec["integer_gemm"] and rec["evidence"] == "fqt::qgemm(int8, int8)", rec
        # one weight quantizer per graph: grad_input reads the per-channel codes the output GEMM reads
        for gm in (cgs[0].forward, cgs[0].backward):
            wq = [n for n in gm.graph.nodes if n.target is torch.ops.fqt.quantize.default
                  and (n.meta.get("fqt") or {}).get("is_weight")]
            assert len(wq) <= 1, wq
    else:
        ref_gi = _dq(go, gran["grad_input", "grad_output"], "grad_output") @ _dq(w, gran["grad_input", "weight"],
                                                                                "weight")
    assert_close(x.grad, ref_gi)
    g_c = _dq(go, gran["grad_weight", "grad_output"], "grad_output")
    ref_gw = g_c.T @ _dq(x, gran["grad_weight", "input"], "input")
    assert_close(fc.weight.grad, ref_gw)
    assert_close(fc.bias.grad, go.sum(0))
    # the reference is sharp: the neighbouring layout gives another result
    if case == "defaults":
        assert not torch.allclose(out.detach(), x.detach() @ _dq(w, "tensor", "weight").T + fc.bias)


def test_linear_default_stochastic_gradients_equal_reference():
    """The default rounding: gradients stochastic with the documented key (seed, step, stream); stream = crc32 of
    (site, role, operand, spec) (docs/architecture.md, "Stochastic rounding")."""
    torch.manual_seed(0)
    fc = nn.Linear(24, 10)
    x = torch.randn(6, 24, requires_grad=True)
    go = torch.randn(6, 10)
    out, cgs = run_and_capture(fc, (x,), {"bits": "W4A8G4"}, grad=go)
    step = fqtc.get_step() - 1  # the training forward took this step and advanced the counter
    site = cgs[0].records[0]["site"]
    w = fc.weight.detach()
    assert_close(out.detach(), _dq(x, "tensor", "input") @ _dq(w, "channel", "weight", bits=4).T + fc.bias.detach())

    def g(role, gran):
        stream = stable_stream(site, role, "grad_output", f"int4/{gran}/sr")
        return _dq(go, gran, "grad_output", 4, "stochastic", stream, step=step)

    assert_close(x.grad, g("grad_input", "sample") @ _dq(w, "tensor", "weight", bits=4))
    assert_close(fc.weight.grad, g("grad_weight", "channel").T @ _dq(x, "tensor", "input"))


class Bmm(nn.Module):
    def forward(self, a, b):
        return torch.bmm(a, b)


BMM_CASES = {
    "defaults": {},
    "a_token": {("output", "input"): "token", ("grad_weight", "input"): "token"},
    "grad_input_g_tensor": {("grad_input", "grad_output"): "tensor"},
    "grad_weight_g_tensor": {("grad_weight", "grad_output"): "tensor"},
}


@pytest.mark.parametrize("case", list(BMM_CASES))
def test_bmm_step_equals_dequantized_reference(case):
    """``bmm(a, b)``: ``output`` = Q(a) Q(b); ``grad_input`` (of a) = Q(g) Q(b)^T; ``grad_weight`` (of the second
    activation b) = Q(a)^T Q(g). Both activations are ``input`` operands (a rule on ``input`` sets both; b keeps
    ``grad_input``'s default, per tensor, in ``grad_input``)."""
    over = BMM_CASES[case]
    gran = {**DEFAULT, **over}
    torch.manual_seed(1)
    a = torch.randn(3, 5, 7, requires_grad=True)
    b = torch.randn(3, 7, 4, requires_grad=True)
    go = torch.randn(3, 5, 4)
    out, cgs = run_and_capture(Bmm(), (a, b), {"bits": "W8A8G8", "rounding": "nearest", "rules": _rules(over)},
                               grad=go)
    assert_quantized_graphs(cgs[0], 1, 2)
    assert_close(out.detach(), _dq(a, gran["output", "input"], "input") @ _dq(b, gran["output", "input"], "input"))
    assert_close(a.grad, _dq(go, gran["grad_input", "grad_output"], "grad_output") @ _dq(b, "tensor", "input").mT)
    a_g = _dq(a, gran["grad_weight", "input"], "input")
    assert_close(b.grad, a_g.mT @ _dq(go, gran["grad_weight", "grad_output"], "grad_output"))


class Attn(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("case", ["defaults", "grad_tensor"])
def test_attention_step_equals_dequantized_reference(case):
    """SDPA in its math form (q and k^T each scaled by d^-1/4): S = Q(q') Q(k'^T), P = softmax(S), O = Q(P) Q(v),
    and the four backward products with the gradient layouts of ``grad_input`` / ``grad_weight``. Saved
    activations in fp32 (``save_fp``) so only the GEMMs quantize; P is recomputed from the saved codes."""
    over = {} if case == "defaults" else {("grad_input", "grad_output"): "tensor",
                                          ("grad_weight", "grad_output"): "tensor"}
    gran = {**DEFAULT, **over}
    torch.manual_seed(2)
    bsz, h, t, d = 2, 2, 5, 8
    q, k, v = (torch.randn(bsz, h, t, d, requires_grad=True) for _ in range(3))
    go = torch.randn(bsz, h, t, d)
    opts = {"bits": "W8A8G8", "rounding": "nearest", "save_fp": "all", "rules": _rules(over)}
    out, cgs = run_and_capture(Attn(), (q, k, v), opts, grad=go)
    assert_quantized_graphs(cgs[0], 2, 4)  # P saved in fp32 (save_fp): no recompute of Q.K^T in backward

    def gi(g):
        return _dq(g, gran["grad_input", "grad_output"], "grad_output")

    def gw(g):
        return _dq(g, gran["grad_weight", "grad_output"], "grad_output")

    c = d ** -0.25
    q3, kt3, v3 = (q * c).reshape(-1, t, d), (k.mT * c).reshape(-1, d, t), v.reshape(-1, t, d)
    qd, ktd, vd = (_dq(z, "tensor", "input") for z in (q3, kt3, v3))
    p = torch.softmax(qd @ ktd, -1)
    pd = _dq(p, "tensor", "input")
    assert_close(out.detach(), (pd @ vd).reshape(bsz, h, t, d))
    g3 = go.reshape(-1, t, d)
    assert_close(v.grad, (pd.mT @ gw(g3)).reshape(bsz, h, t, d))
    gp = gi(g3) @ vd.mT
    gs = torch._softmax_backward_data(gp, p, -1, torch.float32)
    assert_close(q.grad, (gi(gs) @ ktd.mT).reshape(bsz, h, t, d) * c)
    assert_close(k.grad, (qd.mT @ gw(gs)).reshape(bsz, h, d, t).mT * c)
