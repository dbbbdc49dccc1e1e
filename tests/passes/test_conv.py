"""Convolution sites: the fqt conv ops (exact vs F.conv2d / torch.nn.grad on dequantized operands) and the conv pass
(records, node counts, int8 saved activations, full-precision fallbacks with reasons)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fqtc.ops  # noqa: F401
from fqtc.quant import conv as qc
from fqtc.quant.uniform import dequantize, quantize
from tests.helpers import run_and_capture

fqt = torch.ops.fqt
aten = torch.ops.aten

# (N, C_in, C_out, H, W, k, stride, padding, dilation, groups): odd sizes, every knob off its default somewhere,
# grouped and depthwise (groups == C_in == C_out) convs.
GRID = [
    (2, 3, 5, 7, 9, 3, 1, 1, 1, 1),
    (3, 6, 4, 11, 8, 3, 2, 0, 1, 2),
    (2, 4, 4, 9, 9, 3, 1, 2, 2, 4),  # depthwise, dilation 2
    (1, 5, 7, 10, 13, 1, 1, 0, 1, 1),  # pointwise
    (2, 6, 6, 12, 7, 5, 3, 2, 1, 6),  # depthwise 5x5 stride 3
    (2, 3, 6, 8, 8, 2, (2, 1), (0, 1), (1, 2), 3),  # even kernel, anisotropic stride/padding/dilation
]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _codes(shape, lo=-127, hi=127, gen=None):
    return torch.randint(lo, hi + 1, shape, dtype=torch.int8, generator=gen)


@pytest.mark.parametrize("case", GRID, ids=[f"g{i}" for i in range(len(GRID))])
def test_integer_conv_exact_vs_float64(case):
    """int8 conv, conv-input-grad and conv-weight-grad equal the float64 convolution of the codes exactly."""
    n, ci, co, h, w, k, s, p, d, g = case
    s, p, d = _pair(s), _pair(p), _pair(d)
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    x, wt = _codes((n, ci, h, w), gen=gen), _codes((co, ci // g, k, k), gen=gen)
    out = qc.int_conv2d(x, wt, s, p, d, g)
    assert out.dtype == torch.int32
    torch.testing.assert_close(out.double(), F.conv2d(x.double(), wt.double(), None, s, p, d, g), rtol=0, atol=0)
    go = _codes(tuple(out.shape), gen=gen)
    gi = qc.int_conv2d_input(x.shape, wt, go, s, p, d, g)
    ref_i = torch.nn.grad.conv2d_input(x.shape, wt.double(), go.double(), s, p, d, g)
    torch.testing.assert_close(gi.double(), ref_i, rtol=0, atol=0)
    gw = qc.int_conv2d_weight(x, wt.shape, go, s, p, d, g)
    ref_w = torch.nn.grad.conv2d_weight(x.double(), wt.shape, go.double(), s, p, d, g)
    torch.testing.assert_close(gw.double(), ref_w, rtol=0, atol=0)


def test_channel_chunking_keeps_large_reductions_exact():
    """All codes 127 and reductions of 2295 / 1152 taps: sums reach 3.7e7 > 2^24. 255*9*127^2 is odd, so no fp32
    number equals it and a single fp32 conv must be wrong; the channel-chunked int32 accumulation is exact."""
    x = torch.full((1, 255, 5, 5), 127, dtype=torch.int8)
    w = torch.full((3, 255, 3, 3), 127, dtype=torch.int8)
    out = qc.int_conv2d(x, w, (1, 1), (0, 0), (1, 1), 1)
    assert int(out.max()) == 255 * 9 * 127 * 127 > 2**24
    torch.testing.assert_close(out.double(), F.conv2d(x.double(), w.double()), rtol=0, atol=0)
    assert not torch.equal(F.conv2d(x.float(), w.float()).double(), F.conv2d(x.double(), w.double()))
    g = torch.full((1, 128, 3, 3), -127, dtype=torch.int8)
    w2 = torch.full((128, 2, 3, 3), 127, dtype=torch.int8)
    gi = qc.int_conv2d_input((1, 2, 5, 5), w2, g, (1, 1), (0, 0), (1, 1), 1)
    ref = torch.nn.grad.conv2d_input((1, 2, 5, 5), w2.double(), g.double(), (1, 1), (0, 0), (1, 1), 1)
    torch.testing.assert_close(gi.double(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("hw", [31, 9])
def test_weight_grad_reduction_over_many_positions_is_exact(hw):
    """grad_weight reduces over N*Ho*Wo positions (4*31*31 = 3844: one sample has > 1024 positions, the float64
    path; 40*9*9 = 3240: sample chunks of 12 in fp32, int32 sums). Every product is 127^2, so each sum is an odd
    multiple of 127^2 above 2^24 that a single fp32 reduction cannot represent; the result must still be exact."""
    n = 4 if hw == 31 else 40
    x = torch.full((n, 2, hw, hw), 127, dtype=torch.int8)
    g = torch.full((n, 3, hw, hw), 127, dtype=torch.int8)
    g[0, 0, 0, 0] = -127  # not every sum the same
    gw = qc.int_conv2d_weight(x, (3, 2, 3, 3), g, (1, 1), (1, 1), (1, 1), 1)
    ref = torch.nn.grad.conv2d_weight(x.double(), (3, 2, 3, 3), g.double(), (1, 1), (1, 1), (1, 1), 1)
    assert ref.abs().max() > 2**24
    torch.testing.assert_close(gw.double(), ref, rtol=0, atol=0)
    one_fp32 = torch.nn.grad.conv2d_weight(x.float(), (3, 2, 3, 3), g.float(), (1, 1), (1, 1), (1, 1), 1)
    assert not torch.equal(one_fp32.double(), ref)  # the chunking is what keeps it exact


# granularity -> reduce dims of a 4-D operand (fqtc/passes/conv.py conv_reduce_dims)
DIMS = {"tensor": [0, 1, 2, 3], "sample": [1, 2, 3], "channel": [0, 2, 3], "wchannel": [1, 2, 3], "wcin": [0, 2, 3]}


def _q(t, dims, bits=8):
    codes, scale = quantize(t, bits, dims)
    return codes, scale, dequantize(codes, scale)


@pytest.mark.parametrize("case", GRID, ids=[f"g{i}" for i in range(len(GRID))])
def test_ops_match_torch_on_dequantized_operands(case):
    """fqt::qconv2d / qconv2d_input / qconv2d_weight with the default layouts (integer path) equal F.conv2d and
    torch.nn.grad.conv2d_{input,weight} applied to the dequantized operands (assert_close, default fp32 tolerance)."""
    n, ci, co, h, w, k, s, p, d, g = case
    s, p, d = list(_pair(s)), list(_pair(p)), list(_pair(d))
    torch.manual_seed(len(GRID) + n + ci)
    x, wt, b = torch.randn(n, ci, h, w), torch.randn(co, ci // g, k, k), torch.randn(co)
    xq, sx, xd = _q(x, DIMS["tensor"])
    wq, sw, wd = _q(wt, DIMS["wchannel"])
    out = fqt.qconv2d(xq, sx, wq, sw, b, s, p, d, g, torch.float32)
    torch.testing.assert_close(out, F.conv2d(xd, wd, b, s, p, d, g))
    go = torch.randn(out.shape)
    gq, sg, gd = _q(go, DIMS["sample"])
    wq_t, sw_t, wd_t = _q(wt, DIMS["tensor"])
    gi = fqt.qconv2d_input(gq, sg, wq_t, sw_t, list(x.shape), s, p, d, g, torch.float32)
    torch.testing.assert_close(gi, torch.nn.grad.conv2d_input(x.shape, wd_t, gd, s, p, d, g))
    gq_c, sg_c, gd_c = _q(go, DIMS["channel"])
    gw = fqt.qconv2d_weight(xq, sx, gq_c, sg_c, list(wt.shape), s, p, d, g, torch.float32)
    torch.testing.assert_close(gw, torch.nn.grad.conv2d_weight(xd, wt.shape, gd_c, s, p, d, g))


@pytest.mark.parametrize("groups", [1, 3])
def test_scale_layouts_integer_and_dequantized_paths(groups):
    """Every (operand layout) the pass can produce gives the product of the dequantized operands: layouts whose
    scales vary only along the free dim take the integer path (per-sample x, per-input-channel W for grad_input,
    per-channel x for grad_weight), the others the dequantized path; both match torch."""
    torch.manual_seed(groups)
    s, p, d = [2, 1], [1, 0], [1, 1]
    x, wt = torch.randn(3, 6, 9, 8), torch.randn(9, 6 // groups, 3, 3)
    go = torch.randn(F.conv2d(x, wt, None, s, p, d, groups).shape)
    for xl, wl in itertools.product(["tensor", "sample", "channel"], ["tensor", "wchannel"]):
        xq, sx, xd = _q(x, DIMS[xl])
        wq, sw, wd = _q(wt, DIMS[wl])
        integer = qc.scale_ok("output", "input", sx.shape) and qc.scale_ok("output", "weight", sw.shape)
        assert integer == (xl != "channel")
        out = fqt.qconv2d(xq, sx, wq, sw, None, s, p, d, groups, torch.float32)
        torch.testing.assert_close(out, F.conv2d(xd, wd, None, s, p, d, groups))
    for gl, wl in itertools.product(["sample", "channel"], ["tensor", "wchannel", "wcin"]):
        gq, sg, gd = _q(go, DIMS[gl])
        wq, sw, wd = _q(wt, DIMS[wl])
        assert (qc.scale_ok("grad_input", "grad_output", sg.shape) and qc.scale_ok("grad_input", "weight", sw.shape)
                ) == (gl == "sample" and wl != "wchannel")
        gi = fqt.qconv2d_input(gq, sg, wq, sw, list(x.shape), s, p, d, groups, torch.float32)
        torch.testing.assert_close(gi, torch.nn.grad.conv2d_input(x.shape, wd, gd, s, p, d, groups))
    for xl, gl in itertools.product(["tensor", "channel", "sample"], ["channel", "sample"]):
        xq, sx, xd = _q(x, DIMS[xl])
        gq, sg, gd = _q(go, DIMS[gl])
        gw = fqt.qconv2d_weight(xq, sx, gq, sg, list(wt.shape), s, p, d, groups, torch.float32)
        torch.testing.assert_close(gw, torch.nn.grad.conv2d_weight(xd, wt.shape, gd, s, p, d, groups))
    # a full-precision operand (None scale): the float product
    out = fqt.qconv2d(x, None, wt, None, None, s, p, d, groups, torch.float32)
    torch.testing.assert_close(out, F.conv2d(x, wt, None, s, p, d, groups))


def test_fake_impls_give_the_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x8, w8, g8 = _codes((2, 4, 11, 9)), _codes((6, 2, 3, 3)), _codes((2, 6, 6, 5))
    s = torch.ones(1, 1, 1, 1)
    args = ([2, 2], [1, 2], [1, 2], 2)
    real = fqt.qconv2d(x8, s, w8, s, None, *args, torch.float32)
    with FakeTensorMode() as mode:
        fx8, fw8, fs = mode.from_tensor(x8), mode.from_tensor(w8), mode.from_tensor(s)
        fake = fqt.qconv2d(fx8, fs, fw8, fs, None, *args, torch.float32)
    assert tuple(fake.shape) == tuple(real.shape) == (2, 6, 6, 5)  # (11+2-2-1)//2+1, (9+4-4-1)//2+1
    assert fqt.qconv2d_input(g8, s, w8, s, [2, 4, 11, 9], *args, torch.float32).shape == (2, 4, 11, 9)
    assert fqt.qconv2d_weight(x8, s, g8, s, [6, 2, 3, 3], *args, torch.float32).shape == (6, 2, 3, 3)


# -- the pass -------------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, groups=1, bias=True):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=bias)
        self.c2 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=groups, bias=bias)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("groups,bias", [(1, True), (6, False)])
def test_pass_rewrites_all_three_gemms_and_saves_int8(groups, bias):
    torch.manual_seed(0)
    net, x = Net(groups, bias), torch.randn(2, 3, 9, 11)
    _, cgs = run_and_capture(net, (x,), {"bits": "W8A8G8"})
    cg = cgs[0]
    recs = [r for r in cg.records if r["op"].startswith("convolution")]
    # c1's input does not require grad: no grad_input GEMM (output_mask[0] False)
    assert sorted((r["site"], r["role"]) for r in recs) == sorted(
        [("c1", "output"), ("c1", "grad_weight"), ("c2", "output"), ("c2", "grad_input"), ("c2", "grad_weight")])
    assert all(r["status"] == "quantized" and r["integer_gemm"] for r in recs), recs
    fw, bw = _targets(cg.forward), _targets(cg.backward)
    assert aten.convolution.default not in fw and aten.convolution_backward.default not in bw
    assert fw.count(fqt.qconv2d.default) == 2
    assert bw.count(fqt.qconv2d_input.default) == 1 and bw.count(fqt.qconv2d_weight.default) == 2
    assert bw.count(aten.sum.dim_IntList) >= (2 if bias else 0)  # bias grads: reductions, full precision
    # what backward reads from forward: the conv inputs as int8 codes, never as fp32 (relu output is fp32 for
    # threshold_backward, shape (2, 6, 5, 6), a non-GEMM save)
    saved = [n.meta["val"] for n in cg.forward.graph.output_node().args[0][1:] if hasattr(n, "meta")]
    int8 = sorted(tuple(v.shape) for v in saved if isinstance(v, torch.Tensor) and v.dtype == torch.int8)
    assert int8 == [(2, 3, 9, 11), (2, 6, 5, 6)]
    fp32_4d = [tuple(v.shape) for v in saved if isinstance(v, torch.Tensor) and v.dtype == torch.float32
               and v.dim() == 4 and v.numel() > 1]
    assert (2, 3, 9, 11) not in fp32_4d and fp32_4d.count((2, 6, 5, 6)) <= 1


def test_pass_numerics_equal_dequantized_reference():
    """With nearest rounding everywhere, the compiled conv's output, input grad and weight grad equal torch's conv
    ops on the operands dequantized with the recorded layouts (exact path, assert_close)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    x = torch.randn(3, 4, 9, 7, requires_grad=True)
    go = torch.randn(3, 6, 5, 4)
    out, cgs = run_and_capture(conv, (x,), {"bits": "W8A8G8", "rounding": "nearest"}, grad=go)
    args = ([2, 2], [1, 1], [1, 1], 2)
    _, _, xd = _q(x.detach(), DIMS["tensor"])
    _, _, wd = _q(conv.weight.detach(), DIMS["wchannel"])
    torch.testing.assert_close(out.detach(), F.conv2d(xd, wd, conv.bias.detach(), *args))
    _, _, gd = _q(go, DIMS["sample"])
    _, _, wd_t = _q(conv.weight.detach(), DIMS["tensor"])
    torch.testing.assert_close(x.grad, torch.nn.grad.conv2d_input(x.shape, wd_t, gd, *args))
    _, _, gd_c = _q(go, DIMS["channel"])
    torch.testing.assert_close(conv.weight.grad, torch.nn.grad.conv2d_weight(xd, conv.weight.shape, gd_c, *args))
    torch.testing.assert_close(conv.bias.grad, go.sum((0, 2, 3)))


def test_fp_path_keeps_aten_ops_and_equals_eager():
    torch.manual_seed(2)
    net, x = Net(), torch.randn(2, 3, 9, 11)
    ref = Net()
    ref.load_state_dict(net.state_dict())
    eager = ref(x)
    eager.sum().backward()
    out, cgs = run_and_capture(net, (x,), {"bits": "fp"})
    torch.testing.assert_close(out, eager)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    recs = [r for r in cgs[0].records if r["op"].startswith("convolution")]
    assert recs and all(r["status"] == "full_precision" and r["reason"] for r in recs)
    assert aten.convolution.default in _targets(cgs[0].forward)


def test_keep_fp_one_module_and_rules_per_role():
    torch.manual_seed(3)
    net, x = Net(), torch.randn(2, 3, 9, 11)
    opts = {"bits": "W8A8G8", "keep_fp": ["c1"], "rules": [{"module": "c2", "role": "grad_weight", "bits": 4}]}
    _, cgs = run_and_capture(net, (x,), opts)
    recs = {(r["site"], r["role"]): r for r in cgs[0].records if r["op"].startswith("convolution")}
    assert recs[("c1", "output")]["status"] == "full_precision" and "keep_fp" in recs[("c1", "output")]["reason"]
    assert recs[("c2", "grad_weight")]["operands"]["grad_output"]["bits"] == 4
    assert recs[("c2", "output")]["operands"]["input"]["bits"] == 8


def test_partially_quantized_role_uses_float_operand():
    """A rule keeping one operand in FP gives status 'partial' and a dequantized (non-integer) product."""
    torch.manual_seed(4)
    net, x = Net(), torch.randn(2, 3, 9, 11)
    ref = Net()
    ref.load_state_dict(net.state_dict())
    opts = {"bits": "W8A8G8", "rules": [{"module": "c2", "role": "output", "operand": "input", "bits": "fp"}]}
    out, cgs = run_and_capture(net, (x,), opts)
    rec = next(r for r in cgs[0].records if r["site"] == "c2" and r["role"] == "output")
    assert rec["status"] == "partial" and not rec["integer_gemm"] and rec["operands"]["input"]["bits"] is None


def test_unsupported_convs_are_recorded_not_silent():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
            self.c1d = nn.Conv1d(4, 4, 3)

        def forward(self, x):
            y = self.up(x)
            return self.c1d(y.flatten(2))

    _, cgs = run_and_capture(M(), (torch.randn(2, 3, 4, 4),), {"bits": "W8A8G8"})
    recs = [r for r in cgs[0].records if r["op"].startswith("convolution")]
    assert {r["module"] for r in recs} == {"up", "c1d"}
    assert all(r["status"] == "full_precision" for r in recs)
    reasons = " ".join(r["reason"] for r in recs)
    assert "transposed convolution" in reasons and "2-D convolution" in reasons


def test_first_last_preset_counts_conv_sites():
    """``first_last`` names the stem conv (the first site in graph order), not the first Linear."""

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3)
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.relu(self.mid(self.stem(x).mean((2, 3)))))

    _, cgs = run_and_capture(CNN(), (torch.randn(2, 1, 6, 6),), {"bits": "W4A4G8", "rules": [{"first_last": 8}]})
    bits = {(r["site"], r["role"]): r["operands"].get("weight", {}).get("bits") for r in cgs[0].records}
    assert bits[("stem", "output")] == 8 and bits[("head", "output")] == 8 and bits[("mid", "output")] == 4
