"""ONNX export of the data-dependent gradient quantizers: AQ / AQ top-k (``fqt::grad_quantize``) and
BHQ (``fqt::bhq``; its halves ``fqt::bhq_quantize`` / ``fqt::bhq_invert``). With ``sr="counter"`` (or nearest
rounding) onnxruntime reproduces PyTorch bit for bit: the op alone on crafted gradients (dominant rows, zero and
non-finite groups, 3-D, other groupings), and inside the MLP's backward graph."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fqtc.export import onnx as fx_onnx
from fqtc.quant import gradq
from tests.export.test_onnx import _export_and_run


def _run_op(tmp_path, fn, args, sr="counter"):
    """Export ``fn(*args)`` (a graph of one fqt op) and return (PyTorch outputs, ORT outputs, op counts)."""
    gm = make_fx(fn)(*args)
    names = [f"in{i}" for i in range(len(args))]
    path = str(tmp_path / "op.onnx")
    fx_onnx.export_graph(gm, args, path, "graph", names, sr)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    ref = gm(*args)
    ref = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    got = ort.InferenceSession(path).run(None, {n: a.numpy() for n, a in zip(names, args)})
    return ref, [torch.from_numpy(np.asarray(g)) for g in got], collections.Counter(n.op_type for n in model.graph.node)


def _grad(shape, seed=0):
    """A gradient whose groups (rows of dim 0) span four decades: AQ keeps only some, BHQ pairs them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    rows = 10.0 ** (-4 * torch.rand(shape[0], generator=g))
    return x * rows.view(-1, *[1] * (len(shape) - 1))


def _grouped(shape, dims, seed=0):
    """`_grad` with the spread across the groups of ``dims`` (columns for ``[0]``)."""
    return _grad(shape[::-1], seed).t().contiguous() if dims == [0] else _grad(shape, seed)


def _assert_exact(got, ref, msg=""):
    assert got.dtype == ref.dtype and got.shape == ref.shape, msg
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True, msg=msg)


@pytest.mark.parametrize("quantizer,bits,dims,shape", [
    ("aq", 1, [1], (12, 16)),       # keep ~1/4 of the rows, unbiased 1/p reweighting
    ("aq", 2, [0], (16, 12)),       # groups are columns
    ("aq", 1, [1, 2], (10, 3, 4)),  # 3-D, groups over two dims
    ("aq_topk", 2, [1], (12, 16)),  # deterministic top-m rows
])
def test_aq_op_bit_exact(tmp_path, quantizer, bits, dims, shape):
    rounding = "nearest" if dims == [0] else "stochastic"
    x = _grouped(shape, dims)
    if dims == [0]:
        x[:, 2] = 0.0  # an all-zero group is never kept (p = 0)
    else:
        x[2] = 0.0
    step = torch.tensor(7, dtype=torch.int64)

    def fn(x, step):
        return torch.ops.fqt.grad_quantize.default(x, quantizer, bits, dims, rounding, 3, 12345, step)

    ref, got, ops = _run_op(tmp_path, fn, (x, step))
    assert ops["TopK"] >= 1
    for name, r, g in zip(("codes", "scale"), ref, got):
        _assert_exact(g, r, name)
    g_count = ref[1].numel()
    dropped = int(((ref[1] == 1.0) & (ref[0].float().abs().sum(dim=dims, keepdim=True) == 0)).sum())
    assert 0 < dropped < g_count  # the test exercises both kept and dropped groups


@pytest.mark.parametrize("quantizer", ["aq", "aq_topk"])
def test_aq_op_nonfinite_group_is_kept_and_propagates(tmp_path, quantizer):
    x = _grad((12, 8), seed=1)
    x[4, 3] = float("inf")
    x[9, 0] = float("nan")
    step = torch.tensor(2**33 + 1, dtype=torch.int64)  # the step's high word enters the key

    def fn(x, step):
        return torch.ops.fqt.grad_quantize.default(x, quantizer, 1, [1], "stochastic", 0, 99, step)

    ref, got, _ = _run_op(tmp_path, fn, (x, step))
    assert not torch.isfinite(ref[1][4]).all() and torch.isnan(ref[1][9]).all()
    for r, g in zip(ref, got):
        _assert_exact(g, r)


@pytest.mark.parametrize("shape,dims", [((12, 16), [1]), ((16, 12), [0]), ((6, 3, 5), [-1]), ((5, 2, 6), [1, 2])])
def test_bhq_op_bit_exact(tmp_path, shape, dims):
    rounding = "nearest" if dims == [0] else "stochastic"
    x = _grouped(shape, dims)
    aux = gradq.bhq_transform(x, dims)
    sizes = torch.bincount(aux["group"])
    assert int(sizes.max()) > 1  # a real block Householder transform, not the identity
    step = torch.tensor(5, dtype=torch.int64)

    def fn(x, step):
        return torch.ops.fqt.bhq.default(x, 4, dims, rounding, 1, 777, step)

    ref, got, ops = _run_op(tmp_path, fn, (x, step))
    assert ops["ScatterElements"] >= 2 and ops["TopK"] >= 2
    _assert_exact(got[0], ref[0])


def test_bhq_quantize_and_invert_bit_exact(tmp_path):
    """``fqt::bhq_quantize`` (codes, scales, transform) and ``fqt::bhq_invert`` on an integer GEMM's output, as the
    BHQ grad_input of a training graph uses them."""
    x = _grouped((12, 16), [1])
    w = torch.randint(-127, 128, (16, 5), dtype=torch.int8)
    step = torch.tensor(5, dtype=torch.int64)

    def fn(x, w, step):
        codes, scale, order, group, v, d = torch.ops.fqt.bhq_quantize.default(x, 4, [1], "stochastic", 1, 777, step)
        out = torch.ops.fqt.qgemm.default(codes, scale, w, torch.ones(1, 1), None, torch.float32)
        return codes, scale, torch.ops.fqt.bhq_invert.default(out, order, group, v, d, [1])

    ref, got, ops = _run_op(tmp_path, fn, (x, w, step))
    assert ops["ScatterElements"] >= 2 and ops["TopK"] >= 2
    for r, o in zip(ref, got):
        _assert_exact(o, r)


@pytest.mark.parametrize("case", ["zeros", "nonfinite", "one_row"])
def test_bhq_op_identity_cases(tmp_path, case):
    """bhq_transform's identity: a zero tensor, a non-finite one (NaN spreads through its reflection as in
    PyTorch), a single row."""
    x = _grad((1, 8) if case == "one_row" else (6, 8), seed=2)
    if case == "zeros":
        x.zero_()
    elif case == "nonfinite":
        x[1, 2] = float("inf")
        x[3, 3] = float("nan")
    step = torch.tensor(1, dtype=torch.int64)

    def fn(x, step):
        return torch.ops.fqt.bhq.default(x, 5, [1], "stochastic", 0, 5, step)

    ref, got, _ = _run_op(tmp_path, fn, (x, step))
    _assert_exact(got[0], ref[0])


@pytest.mark.parametrize("options", [
    {"grad_quantizer": "aq", "bits": "W8A8G1"},
    {"grad_quantizer": "bhq", "bits": "W8A8G5"},
], ids=["aq", "bhq"])
def test_mlp_backward_matches_pytorch(tmp_path, options):
    rows, ops = _export_and_run(tmp_path, options, sr="counter")
    assert ops["backward"]["TopK"] >= 2  # every grad_output quantizer of the MLP is AQ / BHQ
    if options["grad_quantizer"] == "bhq":  # grad_weight reads the dequantized T^-1 Q(T g): a float MatMul
        assert ops["backward"]["MatMul"] >= 2
    exact = 0
    for which, name, ref, got, must_be_exact in rows:
        if must_be_exact:  # codes, scales, and the weight gradients (fp32 MatMul over 6 rows: same sums here)
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"{which} {name}")
            exact += which == "backward"
        else:  # bias gradients: fp32 ReduceSum vs torch.sum (max diff measured: 4.8e-7)
            torch.testing.assert_close(got, ref, msg=f"{which} {name}")
    assert exact == 2


def test_psq_one_bit_export_is_refused_clearly(tmp_path):
    """The two-level (1-bit) PSQ has no ONNX translation: export names it and the alternatives, never a silent
    uniform-grid translation with other codes."""
    x, step = _grad((6, 8)), torch.tensor(1, dtype=torch.int64)

    def fn(x, step):
        return torch.ops.fqt.grad_quantize.default(x, "psq", 1, [1], "stochastic", 0, 5, step)

    with pytest.raises(NotImplementedError, match="two-level .*PSQ has no ONNX translation"):
        _run_op(tmp_path, fn, (x, step))
