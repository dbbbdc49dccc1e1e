"""Option ``rotate="hadamard"`` (fqtc/passes/rotate.py): the output GEMM of a Linear site quantizes Hadamard-rotated
input and weight; the backward GEMM that shares the rotated input codes un-rotates its output.

Exact tier: with nearest rounding, the compiled output, input gradient and weight gradient equal an eager
computation from the reference functions (rotate, quantize, dequantize, inverse rotation). Structural tier: rotate
nodes, records and notes; a site whose K has no usable block is left unrotated with the reason; rules switch sites
on and off. SQNR tier: with an outlier channel, rotation raises the output's SQNR.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fqtc
from fqtc.backend import capture
from fqtc.passes.common import stable_stream
from fqtc.quant import rotate as R
from fqtc.quant.uniform import dequantize, quantize


def _data(k: int = 64, n: int = 12, outlier: float = 50.0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, k, generator=g)
    x[:, 3] *= outlier
    return x


def _deq(t, dims):
    return dequantize(*quantize(t, 8, dims))


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_rotated_linear_equals_reference(compiler):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = _data().requires_grad_(True)
    go = torch.randn(12, 32, generator=torch.Generator().manual_seed(1))
    with capture() as cgs:
        out = torch.compile(lin, backend="fqt", options={"rotate": "hadamard", "rounding": "nearest",
                                                         "compiler": compiler})(x)
        out.backward(go)
    cg = cgs[0]
    recs = {r["role"]: r for r in cg.records}
    assert recs["output"]["rotate"] == {"kind": "hadamard", "block": 64}
    assert any("un-rotated" in n for n in recs["grad_weight"]["notes"])
    assert all(r["status"] == "quantized" and r["integer_gemm"] for r in recs.values())
    rot = [n for g in (cg.forward, cg.backward) for n in g.graph.nodes if n.target is torch.ops.fqt.rotate.default]
    assert len(rot) == 3  # input and weight in forward, grad_weight's output in backward
    # reference: specs as recorded (defaults: input per tensor, weight per channel, grad_output per role)
    stream = stable_stream(recs["output"]["site"], "rotate")
    xr, wr = R.rotate(x.detach(), 1, 64, 0, stream), R.rotate(lin.weight.detach(), 1, 64, 0, stream)
    xq = _deq(xr, recs["output"]["operands"]["input"]["reduce_dims"])
    wq = _deq(wr, recs["output"]["operands"]["weight"]["reduce_dims"])
    y = xq @ wq.t() + lin.bias.detach()
    torch.testing.assert_close(out.detach(), y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
    gw_dims = recs["grad_weight"]["operands"]["grad_output"]["reduce_dims"]
    gw = R.rotate(_deq(go, gw_dims).t() @ xq, 1, 64, 0, stream, inverse=True)
    torch.testing.assert_close(lin.weight.grad, gw, rtol=1e-5, atol=1e-5 * gw.abs().max().item())
    gi = recs["grad_input"]["operands"]
    gx = _deq(go, gi["grad_output"]["reduce_dims"]) @ _deq(lin.weight.detach(), gi["weight"]["reduce_dims"])
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5 * gx.abs().max().item())


class _SharedInput(nn.Module):
    """Three Linear sites reading one activation (attention's q/k/v projections): their input codes are shared."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 32), nn.Linear(64, 32), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)


def test_sites_sharing_an_input_rotate_together():
    """q/k/v read the same input codes: the input is rotated once with one sign vector (the stream of the first
    site name), each weight with the same signs, each weight gradient un-rotated; output and weight gradients
    equal the reference (nearest rounding). A plan rotating one site alone would change the shared codes under the
    others, so before joint rotation none of them was rotated."""
    torch.manual_seed(0)
    m = _SharedInput()
    x = _data()
    go = torch.randn(12, 96, generator=torch.Generator().manual_seed(1))
    with capture() as cgs:
        out = torch.compile(m, backend="fqt", options={"rotate": "hadamard", "rounding": "nearest",
                                                       "compiler": "eager"})(x)
        out.backward(go)
    cg = cgs[0]
    recs = {(r["site"], r["role"]): r for r in cg.records}
    for site in "qkv":
        assert recs[(site, "output")]["rotate"] == {"kind": "hadamard", "block": 64}
        assert any("shared input codes" in n for n in recs[(site, "output")]["notes"])
    fw_rot = [n for n in cg.forward.graph.nodes if n.target is torch.ops.fqt.rotate.default]
    assert len(fw_rot) == 4  # the shared input once, three weights
    bw_inv = [n for n in cg.backward.graph.nodes if n.target is torch.ops.fqt.rotate.default and n.args[-1]]
    assert len(bw_inv) == 3  # each grad_weight output
    stream = stable_stream("k", "rotate")
    xr = R.rotate(x, 1, 64, 0, stream)
    xq = _deq(xr, recs[("q", "output")]["operands"]["input"]["reduce_dims"])
    ys = []
    for i, site in enumerate("qkv"):
        lin, g = getattr(m, site), go[:, 32 * i:32 * (i + 1)]
        w_dims = recs[(site, "output")]["operands"]["weight"]["reduce_dims"]
        wq = _deq(R.rotate(lin.weight.detach(), 1, 64, 0, stream), w_dims)
        ys.append(xq @ wq.t() + lin.bias.detach())
        gw_dims = recs[(site, "grad_weight")]["operands"]["grad_output"]["reduce_dims"]
        gw = R.rotate(_deq(g, gw_dims).t() @ xq, 1, 64, 0, stream, inverse=True)
        torch.testing.assert_close(lin.weight.grad, gw, rtol=1e-5, atol=1e-5 * gw.abs().max().item())
    y = torch.cat(ys, -1)
    torch.testing.assert_close(out.detach(), y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


def test_site_without_a_block_and_rules():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 32), nn.ReLU(),
                      nn.Linear(32, 4))
    opts = {"rotate": "hadamard", "rules": [{"module": "6", "rotate": "none"}]}
    with capture() as cgs:
        torch.compile(m, backend="fqt", options=opts)(_data()).sum().backward()
    out = {r["site"]: r for r in cgs[0].records if r["role"] == "output"}
    assert out["0"]["rotate"]["block"] == 64
    assert out["2"].get("rotate") is None and any("K = 40 has no power-of-two factor" in n
                                                   for n in out["2"]["notes"])  # 40 = 8 * 5: block 8 < 16
    assert out["4"].get("rotate") is None  # K = 8
    assert out["6"].get("rotate") is None and not any("rotate" in n for n in out["6"]["notes"])  # rule: none
    assert cgs[0].result.counters["rotated_sites"] == 1


def test_rotation_raises_sqnr_with_an_outlier_channel():
    """A 100x outlier channel with per-token input scales: rotation spreads it over its block of 64 channels
    (measured: 34.6 -> 47.0 dB at this seed; the test asserts a gain of more than 8 dB)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = _data(outlier=100.0)
    ref = lin(x).detach()
    sq = {}
    for rot in ("none", "hadamard"):
        torch._dynamo.reset()
        out = torch.compile(lin, backend="fqt", options={
            "rotate": rot, "rules": [{"role": "output", "operand": "input", "granularity": "token"}]})(x)
        sq[rot] = (10 * torch.log10(ref.pow(2).sum() / (ref - out.detach()).pow(2).sum())).item()
    assert sq["hadamard"] > sq["none"] + 8.0, sq


def test_bad_options():
    with pytest.raises(ValueError, match="rotate"):
        fqtc.FQTConfig.from_options({"rotate": "givens"})
    with pytest.raises(ValueError, match="rotate_block"):
        fqtc.FQTConfig.from_options({"rotate_block": 512})
