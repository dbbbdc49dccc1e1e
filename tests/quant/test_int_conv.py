"""The CPU integer convolution: every implementation (`fqtc.quant.conv.CONV_PATHS`, forced) returns the exact int32
of ``output``, ``grad_input`` and ``grad_weight`` (float64 convolutions of the codes, exact at these sizes), and the
per-process choice follows the integer GEMM's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fqtc.quant import conv as qc
from fqtc.quant import conv_onednn, gemm

# (N, C_in, C_out, H, W, (kh, kw), stride, padding, dilation, groups)
CASES = [
    (2, 5, 7, 9, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (3, 6, 4, 11, 8, (3, 3), (2, 2), (0, 0), (1, 1), 2),  # grouped, stride 2
    (2, 8, 8, 9, 9, (3, 3), (1, 1), (2, 2), (2, 2), 8),  # depthwise, dilation 2
    (2, 6, 6, 12, 7, (5, 5), (3, 3), (2, 2), (1, 1), 6),  # depthwise 5x5 stride 3
    (2, 4, 6, 9, 10, (3, 2), (2, 3), (4, 1), (1, 2), 1),  # padding wider than the kernel's reach, anisotropic
    (2, 8, 16, 10, 10, (3, 3), (2, 2), (1, 1), (1, 1), 1),  # stride 2, odd input (output_padding-like rows)
    (1, 5, 7, 6, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1),  # pointwise
]


def _codes(shape, gen):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)  # full range, -128 included


def _refs(x, w, go, s, p, d, g):
    out = F.conv2d(x.double(), w.double(), None, s, p, d, g)
    gi = torch.nn.grad.conv2d_input(x.shape, w.double(), go.double(), s, p, d, g) if go is not None else None
    gw = torch.nn.grad.conv2d_weight(x.double(), w.shape, go.double(), s, p, d, g) if go is not None else None
    return out, gi, gw


def _eq(got, ref):
    assert got.dtype == torch.int32 and got.is_contiguous()
    assert torch.equal(got.double(), ref), f"max error {(got.double() - ref).abs().max().item()}"


@pytest.mark.parametrize("path", qc.CONV_PATHS)
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_every_path_exact(path, case):
    if path == "onednn" and not conv_onednn.onednn_available():
        pytest.skip("no oneDNN int8 conv in this torch build")
    if path != "fp32" and not gemm.cpu_int8_dot_flags():
        pytest.skip("the int8 kernels are only exact where the CPU has int8 dot products (VNNI/AMX)")
    n, ci, co, h, wd, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(len(CASES) * ci + co)
    x, w = _codes((n, ci, h, wd), gen), _codes((co, ci // g, *k), gen)
    out_ref = F.conv2d(x.double(), w.double(), None, s, p, d, g)
    go = _codes(tuple(out_ref.shape), gen)
    _, gi_ref, gw_ref = _refs(x, w, go, s, p, d, g)
    _eq(qc.int_conv2d(x, w, s, p, d, g, path=path), out_ref)
    _eq(qc.int_conv2d_input(x.shape, w, go, s, p, d, g, path=path), gi_ref)
    _eq(qc.int_conv2d_weight(x, w.shape, go, s, p, d, g, path=path), gw_ref)


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_float_code_values_take_the_fp32_path_exactly(case):
    """The compiled CPU graphs hand the fp32-emulated path float32 code values (converted where the codes are
    produced): the accumulators equal the int8 codes' exactly, and other dtypes are refused."""
    n, ci, co, h, wd, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(7 * ci + co)
    x, w = _codes((n, ci, h, wd), gen), _codes((co, ci // g, *k), gen)
    go = _codes(tuple(F.conv2d(x.float(), w.float(), None, s, p, d, g).shape), gen)
    out, gi, gw = _refs(x, w, go, s, p, d, g)
    for got, ref in ((qc.conv2d_acc(x.float(), w.float(), s, p, d, g), out),
                     (qc.conv2d_input_acc(x.shape, w.float(), go.float(), s, p, d, g), gi),
                     (qc.conv2d_weight_acc(x.float(), w.shape, go.float(), s, p, d, g), gw)):
        assert got.dtype == torch.float32 and torch.equal(got.double(), ref)
    with pytest.raises(TypeError, match="int8 codes"):
        qc.conv2d_acc(x.double(), w.double(), s, p, d, g)


@pytest.mark.parametrize("path", qc.CONV_PATHS)
def test_large_reductions_exact(path):
    """Sums far above 2^24 (odd, so no fp32 value equals them): the fp32 and oneDNN paths must chunk the reduction
    and add in int32; 128 x 3x3 = 1152 taps crosses K_CHUNK, grad_weight reduces over 3*13*13*... positions."""
    if path == "onednn" and not conv_onednn.onednn_available():
        pytest.skip("no oneDNN int8 conv in this torch build")
    if path != "fp32" and not gemm.cpu_int8_dot_flags():
        pytest.skip("the int8 kernels are only exact where the CPU has int8 dot products (VNNI/AMX)")
    x = torch.full((2, 129, 5, 5), 127, dtype=torch.int8)
    w = torch.full((3, 129, 3, 3), -127, dtype=torch.int8)
    out = qc.int_conv2d(x, w, (1, 1), (0, 0), (1, 1), 1, path=path)
    assert int(out.min()) == -129 * 9 * 127 * 127 and abs(int(out.min())) > 2**24
    _eq(out, F.conv2d(x.double(), w.double()))
    g = torch.full((2, 130, 3, 3), -128, dtype=torch.int8)
    w2 = torch.full((130, 2, 3, 3), -128, dtype=torch.int8)
    gi = qc.int_conv2d_input((2, 2, 5, 5), w2, g, (1, 1), (0, 0), (1, 1), 1, path=path)
    _eq(gi, torch.nn.grad.conv2d_input((2, 2, 5, 5), w2.double(), g.double(), (1, 1), (0, 0), (1, 1), 1))
    xg = torch.full((9, 3, 31, 31), 127, dtype=torch.int8)  # 9*31*31 = 8649 positions per weight
    gg = torch.full((9, 4, 31, 31), 127, dtype=torch.int8)
    gw = qc.int_conv2d_weight(xg, (4, 3, 1, 1), gg, (1, 1), (0, 0), (1, 1), 1, path=path)
    assert int(gw.max()) == 9 * 31 * 31 * 127 * 127 > 2**24
    _eq(gw, torch.nn.grad.conv2d_weight(xg.double(), (4, 3, 1, 1), gg.double(), (1, 1), (0, 0), (1, 1), 1))


def test_int_mm_weight_grad_splits_long_reductions(monkeypatch):
    """The int_mm grad_weight splits N*Ho*Wo at INT32_K_LIMIT; a small limit makes the split run (and must not
    change the result)."""
    if not gemm.cpu_int8_dot_flags():
        pytest.skip("int_mm is only exact where the CPU has int8 dot products (VNNI/AMX)")
    monkeypatch.setattr(qc, "INT32_K_LIMIT", 50)
    gen = torch.Generator().manual_seed(3)
    x, go = _codes((3, 4, 7, 7), gen), _codes((3, 6, 7, 7), gen)
    gw = qc.int_conv2d_weight(x, (6, 4, 3, 3), go, (1, 1), (1, 1), (1, 1), 1, path="int_mm")
    _eq(gw, torch.nn.grad.conv2d_weight(x.double(), (6, 4, 3, 3), go.double(), (1, 1), (1, 1), (1, 1), 1))


def test_path_follows_the_gemm_choice(monkeypatch):
    """FQTC_CPU_INT_GEMM=fp32 (the GEMM's emulated path) makes every conv fp32-emulated; with int_mm, grouped and
    depthwise convs and strided grad_input stay fp32-emulated and the rest run an int8 kernel."""
    gemm.probe_cpu_gemm.cache_clear()
    try:
        monkeypatch.setenv("FQTC_CPU_INT_GEMM", "fp32")
        for role in qc.CONV_ROLES:
            assert qc.conv_path(role, (8, 8, 3, 3), (1, 1), 1) == "fp32"
        gemm.probe_cpu_gemm.cache_clear()
        monkeypatch.setenv("FQTC_CPU_INT_GEMM", "int_mm")
        assert qc.conv_path("grad_weight", (8, 8, 3, 3), (1, 1), 1) == "int_mm"
        assert qc.conv_path("grad_weight", (8, 1, 3, 3), (1, 1), 8) == "fp32"
        onednn = qc.probe_onednn_conv() is None
        assert qc.conv_path("output", (8, 8, 3, 3), (2, 2), 1) == ("onednn" if onednn else "int_mm")
        assert qc.conv_path("grad_input", (8, 8, 3, 3), (1, 1), 1) == ("onednn" if onednn else "int_mm")
        assert qc.conv_path("output", (8, 128, 3, 3), (1, 1), 1) == "int_mm"  # K = 1152 > ONEDNN_K_CHUNK
        assert qc.conv_path("grad_input", (128, 8, 3, 3), (1, 1), 1) == "int_mm"
        assert qc.conv_path("grad_input", (8, 8, 3, 3), (2, 2), 1) == "fp32"
        for role in qc.CONV_ROLES:  # depthwise and grouped stay fp32-emulated
            assert qc.conv_path(role, (8, 1, 3, 3), (1, 1), 8) == "fp32"
            assert qc.conv_path(role, (8, 2, 3, 3), (1, 1), 4) == "fp32"
        assert qc.conv_path("output", (8, 8, 3, 3), (1, 1), 1, device="meta") == "fp32"
        with pytest.raises(ValueError):
            qc.conv_path("forward", (8, 8, 3, 3), (1, 1), 1)
    finally:
        gemm.probe_cpu_gemm.cache_clear()


def test_onednn_probe_passes_where_the_cpu_has_int8_dot_products():
    if not gemm.cpu_int8_dot_flags() or not conv_onednn.onednn_available():
        pytest.skip("needs VNNI/AMX and a torch build with oneDNN's int8 conv")
    assert qc.probe_onednn_conv() is None


def test_unknown_path_rejected():
    x = torch.zeros((1, 2, 4, 4), dtype=torch.int8)
    with pytest.raises(ValueError):
        qc.int_conv2d(x, torch.zeros((2, 2, 3, 3), dtype=torch.int8), (1, 1), (0, 0), (1, 1), 1, path="fbgemm")


def test_onednn_probe_is_the_same_under_a_fake_mode():
    """The probe may first run while a graph is traced (the Inductor lowering decides the conv path there): it
    must test the real kernel, not fail on fake tensors and cache that failure for the process."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    conv_onednn.probe_onednn_conv.cache_clear()
    try:
        with FakeTensorMode():
            traced = conv_onednn.probe_onednn_conv()
        conv_onednn.probe_onednn_conv.cache_clear()
        assert traced == conv_onednn.probe_onednn_conv()
    finally:
        conv_onednn.probe_onednn_conv.cache_clear()
