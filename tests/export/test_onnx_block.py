"""ONNX export of the block-scaled ops (`fqtc.export.onnx_block`): ``fqt::quantize_block`` codes and compact scales
bit-exact under onnxruntime (1 x b groups and b x b tiles, ragged sizes, both roundings with ``sr="counter"``,
non-finite and all-zero blocks); ``fqt::block_gemm`` through opset-21 blocked ``DequantizeLinear`` + ``MatMul``
within an fp32 rounding bound of the reference's per-K-block int32 accumulation (`_gemm_bound`), bit-exact where
every sum is exact.

Tolerance of ``fqt::block_gemm``: with ``S = |A| @ |B|`` (A, B the dequantized operands, exact in float64) and
``u = 2^-24``, the ONNX graph rounds each dequantized element once and its fp32 ``MatMul`` over K terms adds at most
``gamma_K * S`` in any summation order, FMA or not, so it lies within ``(K + 2) u S`` of the exact product; the
reference's ``acc + P_j * fl(sa_j * sb_j)`` over the KB = ceil(K/block) blocks (P_j exact int32, below 2^24 so
exact in fp32) lies within ``(KB + 2) u S``; the bias adds one rounding on each side. Hence
``|onnx - ref| <= (K + KB + 6) u (S + |bias|)`` (x1.01 for the second-order terms), and ``|onnx - exact| <=
(K + 4) u (S + |bias|)``. A misplaced scale (a wrong tile, block or axis) errs by O(S), orders of magnitude beyond.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fqtc.export import onnx as fx_onnx
from fqtc.quant import block as qb
from tests.export.test_onnx_gradq import _assert_exact, _run_op

U = 2.0 ** -24


def _x(shape, seed=0, dtype=torch.float32):
    """N(0, 1) values whose blocks span three decades (so block scales differ from one another)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return (x * 10.0 ** (-3 * torch.rand(shape, generator=g))).to(dtype)


def _model(tmp_path):
    return onnx.load(str(tmp_path / "op.onnx"))


def _quantize_block_fn(bits, dims, block, rounding, seed=3, stream=12345):
    def fn(x, step):
        return torch.ops.fqt.quantize_block.default(x, bits, dims, block, rounding, seed, stream, step)
    return fn


# -- fqt::quantize_block -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape,dims,block,bits", [
    ((5, 70), [1], 32, 8),         # 1 x b groups along the last dim, ragged last block (70 = 2*32 + 6)
    ((70, 6), [0], 16, 4),         # groups along dim 0 (a weight's K), ragged
    ((33, 70), [0, 1], 32, 8),     # b x b tiles, ragged in both dims
    ((2, 20, 48), [-1], 16, 6),    # 3-D groups, K a multiple of the block
    ((3, 40, 24), [1, 2], 16, 5),  # 3-D tiles over the last two dims, ragged
])
def test_quantize_block_bit_exact(tmp_path, shape, dims, block, bits, rounding):
    x = _x(shape)
    ds = {d % len(shape) for d in dims}
    x[tuple(slice(0, block) if i in ds else 0 for i in range(len(shape)))] = 0.0  # an all-zero block: scale 1
    step = torch.tensor(7, dtype=torch.int64)
    ref, got, ops = _run_op(tmp_path, _quantize_block_fn(bits, dims, block, rounding), (x, step))
    assert ref[1].shape == torch.Size(qb.scale_shape(shape, dims, block))
    assert (ref[1] == 1.0).any() and ref[1].unique().numel() > 3
    for name, r, g in zip(("codes", "scale"), ref, got):
        _assert_exact(g, r, name)
    assert ops["ReduceMax"] >= 1 and ops["Round" if rounding == "nearest" else "Floor"] == 1
    if shape != (2, 20, 48):
        assert ops["Pad"] == 1 and ops["Slice"] == 1  # the ragged path was exercised


def test_quantize_block_divides_by_the_scale(tmp_path):
    """Values within an ulp of a half-way code: ``x / s`` is a true division (`fqtc.quant.uniform`), which a
    multiply by the reciprocal would round differently for some of them."""
    s = torch.tensor(3.0) / 127  # the scale of every block below (each block's abs-max is 3)
    half = (torch.arange(127, dtype=torch.float32) + 0.5) * s
    up, down = torch.nextafter(half, torch.tensor(1e9)), torch.nextafter(half, torch.tensor(-1e9))
    vals = torch.cat([half, up, -down, torch.zeros(13 * 31 - 3 * 127)])
    x = torch.cat([torch.full((13, 1), 3.0), vals.view(13, 31)], dim=1)  # 13 rows of one 32-element block
    full = qb.expand_scale(qb.quantize_block(x, 8, [1], 32)[1], x.shape, [1], 32)
    assert (torch.round(x / full) != torch.round(x * (1 / full))).any()  # the case is real
    ref, got, _ = _run_op(tmp_path, _quantize_block_fn(8, [1], 32, "nearest"), (x, torch.tensor(0)))
    for r, g in zip(ref, got):
        _assert_exact(g, r)


def test_quantize_block_stochastic_stream(tmp_path):
    """Same (seed, stream, step): the same codes on every run, equal to the reference; another step (its high word
    included) draws other bits, again equal to the reference's."""
    x = _x((24, 50), seed=1)
    fn = _quantize_block_fn(4, [1], 16, "stochastic")
    ref, got, _ = _run_op(tmp_path, fn, (x, torch.tensor(5, dtype=torch.int64)))
    sess = ort.InferenceSession(str(tmp_path / "op.onnx"))
    again = sess.run(None, {"in0": x.numpy(), "in1": np.array(5, dtype=np.int64)})[0]
    np.testing.assert_array_equal(again, got[0].numpy())
    _assert_exact(got[0], ref[0])
    other_step = torch.tensor(2 ** 33 + 5, dtype=torch.int64)
    other = torch.from_numpy(sess.run(None, {"in0": x.numpy(), "in1": other_step.numpy()})[0])
    _assert_exact(other, fn(x, other_step)[0])
    assert not torch.equal(other, got[0])  # the step keys the draws
    # the deterministic stream differs from nearest rounding (a real SR path)
    assert not torch.equal(got[0], _quantize_block_fn(4, [1], 16, "nearest")(x, other_step)[0])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dims", [[1], [0, 1]])
def test_quantize_block_nonfinite_blocks(tmp_path, dims):
    """A NaN makes its block's scale NaN and an Inf its block's scale Inf; their codes are 0 (`fqtc.quant.uniform`'s
    policy); every other block is unaffected."""
    x = _x((20, 40), seed=2)
    x[3, 35] = float("nan")  # ragged last block of row 3
    x[17, 2] = float("inf")
    step = torch.tensor(1, dtype=torch.int64)
    ref, got, _ = _run_op(tmp_path, _quantize_block_fn(4, dims, 16, "stochastic"), (x, step))
    assert torch.isnan(ref[1]).any() and torch.isinf(ref[1]).any()
    for r, g in zip(ref, got):
        _assert_exact(g, r)


def test_quantize_block_half_input(tmp_path):
    """An fp16 input is quantized from x.float(), as the reference does."""
    x = _x((12, 40), seed=4, dtype=torch.float16)
    ref, got, ops = _run_op(tmp_path, _quantize_block_fn(8, [0, 1], 16, "nearest"), (x, torch.tensor(0)))
    assert ops["Cast"] >= 1
    for r, g in zip(ref, got):
        _assert_exact(g, r)


def test_quantize_block_random_mode(tmp_path):
    """``sr="random"``: the runtime's own RandomUniformLike; scales stay bit-exact and every code is x/s rounded
    down or up."""
    x = _x((16, 70), seed=5)
    step = torch.tensor(3, dtype=torch.int64)
    ref, got, ops = _run_op(tmp_path, _quantize_block_fn(4, [1], 32, "stochastic"), (x, step), sr="random")
    assert ops["RandomUniformLike"] == 1
    _assert_exact(got[1], ref[1])
    y = x / qb.expand_scale(ref[1], x.shape, [1], 32)
    lo = torch.floor(y).clamp(-7, 7)
    hi = torch.ceil(y).clamp(-7, 7)
    c = got[0].float()
    assert ((c == lo) | (c == hi)).all()
    assert not torch.equal(got[0], ref[0])  # the runtime's draws, not fqtc's stream (1120 codes: almost surely)


# -- fqt::block_gemm -------------------------------------------------------------------------------------------------
def _codes(shape, seed, hi=127):
    return torch.randint(-hi, hi + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def _scales(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (10.0 ** (-3 * torch.rand(shape, generator=g))).float()


def _deq64(codes, scale, k_axis, block):
    """The dequantized operand in float64 (exact: an int8 times an fp32 scale), via the reference's own scale
    expansion (`fqtc.quant.block._row_scale` / `_expand_k`, as `block_gemm`'s fallback path uses them)."""
    rows_axis = -2 if k_axis == -1 else -1
    s = qb._row_scale(scale, codes.shape[rows_axis], rows_axis, block)
    s = qb._expand_k(s, codes.shape[k_axis], k_axis, block)
    return codes.double() * s.double()


def _gemm_bound(a64, b64, bias, k, block, exact_side=False):
    """Elementwise fp32 rounding bound (module docstring): vs the reference, or (``exact_side``) vs the exact
    product."""
    s = a64.abs() @ b64.abs()
    if bias is not None:
        s = s + bias.double().abs()
    kb = -(-k // block)
    n = (k + 4) if exact_side else (k + kb + 6)
    return 1.01 * n * U * s


def _blocked_dq(model):
    """{axis: block_size} of the blocked DequantizeLinear nodes, and the count of non-blocked ones."""
    blocked, plain = {}, 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("block_size", 0):
            blocked[attrs.get("axis", 1)] = attrs["block_size"]
        else:
            plain += 1
    return blocked, plain


# (a shape, a_scale shape, b shape, b_scale shape, block, bias, {axis: block_size} expected, plain DQ count)
_CASES = {
    "tiles_x_groups": ((33, 70), (2, 3), (70, 20), (3, 20), 32, True, {1: 32, 0: 32}, 0),
    "groups_x_tiles": ((9, 70), (9, 5), (70, 20), (5, 2), 16, True, {1: 16, 0: 16}, 0),
    "groups_x_groups": ((9, 70), (9, 5), (70, 20), (5, 20), 16, True, {1: 16, 0: 16}, 0),  # output GEMM, groups
    "tensor_x_tiles": ((9, 70), (1, 1), (70, 20), (5, 2), 16, True, {0: 16}, 1),
    "tiles_x_tensor": ((33, 70), (3, 5), (70, 20), (1, 1), 16, True, {1: 16}, 1),
    "tiles_x_columns": ((33, 70), (2, 3), (70, 20), (1, 20), 32, False, {1: 32}, 1),
    "batched_tiles_x_groups": ((2, 17, 70), (2, 2, 5), (70, 12), (5, 12), 16, True, {2: 16, 0: 16}, 0),
    "batched_rows_x_groups": ((2, 17, 70), (2, 17, 1), (70, 12), (3, 12), 32, True, {0: 32}, 0),  # Mul path
}


@pytest.mark.parametrize("case", list(_CASES))
def test_block_gemm_within_fp32_bound(tmp_path, case):
    a_shape, sa_shape, b_shape, sb_shape, block, with_bias, want_blocked, want_plain = _CASES[case]
    a, b = _codes(a_shape, 1), _codes(b_shape, 2)
    sa, sb = _scales(sa_shape, 3), _scales(sb_shape, 4)
    n = b_shape[-1]
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5)) * 1e3 if with_bias else None
    args = (a, sa, b, sb) + ((bias,) if with_bias else ())

    def fn(a, sa, b, sb, *bias):
        return torch.ops.fqt.block_gemm.default(a, sa, b, sb, block, bias[0] if bias else None, torch.float32)

    ref, got, ops = _run_op(tmp_path, fn, args)
    ref, got = ref[0], got[0]
    assert got.dtype == ref.dtype == torch.float32 and got.shape == ref.shape
    assert qb.block_form(a, sa, b, sb, block) is None  # the reference takes its blocked int32 path
    model = _model(tmp_path)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    blocked, plain = _blocked_dq(model)
    assert blocked == want_blocked and plain == want_plain, (blocked, plain)
    assert ops["MatMul"] == 1 and ops["MatMulInteger"] == 0
    k = a_shape[-1]
    a64, b64 = _deq64(a, sa, -1, block), _deq64(b, sb, -2, block)
    exact = a64 @ b64 + (bias.double() if bias is not None else 0.0)
    err_ref = (got.double() - ref.double()).abs()
    err_exact = (got.double() - exact).abs()
    assert (err_ref <= _gemm_bound(a64, b64, bias, k, block)).all(), float(err_ref.max())
    assert (err_exact <= _gemm_bound(a64, b64, bias, k, block, exact_side=True)).all(), float(err_exact.max())
    # the reference itself obeys its half of the bound (the bound's premise)
    assert ((ref.double() - exact).abs() <= _gemm_bound(a64, b64, bias, k, block)).all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_block_gemm_bit_exact_when_sums_are_exact(tmp_path, out_dtype):
    """Power-of-two scales and small codes: every product and partial sum is exact in fp32 on both sides, so the
    ONNX graph must equal the reference bit for bit (any misplaced scale shows)."""
    block = 16
    a, b = _codes((20, 40), 6, hi=15), _codes((40, 24), 7, hi=15)
    pa = torch.randint(-3, 1, (2, 3), generator=torch.Generator().manual_seed(8))
    pb = torch.randint(-3, 1, (3, 24), generator=torch.Generator().manual_seed(9))
    sa, sb = 2.0 ** pa.float(), 2.0 ** pb.float()  # tiles x groups, 4 different exponents each
    bias = torch.randint(-500, 500, (24,), generator=torch.Generator().manual_seed(10)).float() / 64

    def fn(a, sa, b, sb, bias):
        return torch.ops.fqt.block_gemm.default(a, sa, b, sb, block, bias, out_dtype)

    ref, got, _ = _run_op(tmp_path, fn, (a, sa, b, sb, bias))
    _assert_exact(got[0], ref[0])
    exact = _deq64(a, sa, -1, block) @ _deq64(b, sb, -2, block) + bias.double()
    assert torch.equal(ref[0].double(), exact.to(out_dtype).double())


def test_quantize_block_then_block_gemm(tmp_path):
    """The training-graph pattern: b x b tiles of an activation, 1 x b groups of a weight along K (stochastic),
    then the block GEMM: codes and scales bit-exact, the product within the fp32 bound."""
    block = 32
    x, w = _x((33, 70), seed=11), _x((70, 20), seed=12)
    bias = torch.randn(20, generator=torch.Generator().manual_seed(13))
    step = torch.tensor(9, dtype=torch.int64)

    def fn(x, w, bias, step):
        ca, sa = torch.ops.fqt.quantize_block.default(x, 8, [0, 1], block, "nearest", 0, 1, step)
        cb, sb = torch.ops.fqt.quantize_block.default(w, 8, [0], block, "stochastic", 0, 2, step)
        return ca, sa, cb, sb, torch.ops.fqt.block_gemm.default(ca, sa, cb, sb, block, bias, torch.float32)

    ref, got, _ = _run_op(tmp_path, fn, (x, w, bias, step))
    for r, g in zip(ref[:4], got[:4]):
        _assert_exact(g, r)
    blocked, _ = _blocked_dq(_model(tmp_path))
    assert blocked == {1: block, 0: block}
    a64, b64 = _deq64(ref[0], ref[1], -1, block), _deq64(ref[2], ref[3], -2, block)
    err = (got[4].double() - ref[4].double()).abs()
    assert (err <= _gemm_bound(a64, b64, bias, 70, block)).all(), float(err.max())


def test_block_gemm_graph_is_standard_onnx(tmp_path):
    """No com.fqt function in a block GEMM graph: blocked DequantizeLinear is a standard opset-21 op, and a model
    carrying it passes the full checker (run by `_run_op`) and the shape inference of the opset-21 schema."""
    a, b = _codes((8, 48), 1), _codes((48, 8), 2)
    sa, sb = _scales((8, 3), 3), _scales((3, 8), 4)

    def fn(a, sa, b, sb):
        return torch.ops.fqt.block_gemm.default(a, sa, b, sb, 16, None, torch.float32)

    _run_op(tmp_path, fn, (a, sa, b, sb))
    model = onnx.shape_inference.infer_shapes(_model(tmp_path), strict_mode=True)
    assert not any(n.domain == "com.fqt" for n in model.graph.node)
    assert _blocked_dq(model) == ({1: 16, 0: 16}, 0)


def test_block_gemm_refuses_a_scale_that_is_neither_per_row_nor_per_tile(tmp_path):
    a, b = _codes((33, 70), 1), _codes((70, 20), 2)
    sa, sb = _scales((4, 3), 3), _scales((3, 20), 4)  # 4 row entries: neither 33 rows nor ceil(33/32) = 2 tiles

    def fn(a, sa, b, sb):
        return torch.ops.fqt.block_gemm.default(a, sa, b, sb, 32, None, torch.float32)

    with pytest.raises(ValueError, match="neither per row nor per tile"):
        fn(a, sa, b, sb)  # the reference refuses it ...
    gm = make_fx(lambda a, sa, b, sb: torch.ops.fqt.block_gemm.default(a, sa, b, sb, 32, None, torch.float32),
                 tracing_mode="fake")(a, sa, b, sb)
    with pytest.raises(NotImplementedError, match="block_gemm") as info:  # ... and so does the translation
        fx_onnx.export_graph(gm, (a, sa, b, sb), str(tmp_path / "bad.onnx"), "graph", ["a", "sa", "b", "sb"],
                             "counter")
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("neither per row nor per tile" in m for m in chain), chain
    assert not (tmp_path / "bad.onnx").exists()


def test_model_with_block_scaling_exports_and_runs(tmp_path):
    """A whole model compiled with granularity="block": forward and backward graphs export, the forward runs in
    onnxruntime with blocked DequantizeLinear and matches the compiled model within fp32 rounding."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch.nn as nn

    import fqtc

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(8, 48)
    opts = {"granularity": "block", "rounding": "nearest"}
    paths = fqtc.export_onnx(m, (x,), str(tmp_path / "blk.onnx"), options=opts, sr="counter")
    assert len(paths) == 2
    fw = onnx.load(paths[0])
    blocked = [n for n in fw.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    assert len(blocked) >= 2
    sess = ort.InferenceSession(paths[0])
    params = dict(m.named_parameters())
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("param."):
            feeds[i.name] = params[i.name[len("param."):]].detach().numpy()
        elif i.name == "fqt_step":
            feeds[i.name] = np.array(0, dtype=np.int64)
        else:
            feeds[i.name] = x.numpy()
    got = torch.from_numpy(sess.run(None, feeds)[0])
    want = torch.compile(m, backend="fqt", options={**opts, "compiler": "eager"})(x).detach()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
