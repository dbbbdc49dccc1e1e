"""Block-scaling kernels (`fqtc.codegen.block`) vs `fqtc.quant.block` under the Triton interpreter.

Codes, scales and GEMM outputs must be bit-identical to the reference (``rtol=0, atol=0``). The kernels are called
through their op implementations (`fqtc.codegen.impls.quantize_block_cuda` / `block_gemm_cuda`, which
tests/codegen/conftest.py moves to the GPU under ``FQTC_TEST_DEVICE=cuda``), and every kernel test asserts that no
call fell back to the reference, so a case the kernels stop covering fails here instead of passing on the
reference's own bits. Sizes are ragged (37, 45, 80 with blocks of 16 and 32) so every mask is exercised.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import fqtc.ops  # noqa: E402,F401  (registers fqt::quantize_block, fqt::block_gemm)
from fqtc.codegen import block as kb  # noqa: E402
from fqtc.codegen import impls  # noqa: E402
from fqtc.quant import block as rb  # noqa: E402
from fqtc.quant.uniform import quantize  # noqa: E402
from tests.codegen.inputs import SEED, STEP, STREAM  # noqa: E402
from tests.codegen.inputs import x_with_ties as _x  # noqa: E402


def _eq(a, b, nan=False):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=nan)


def _kq(x, bits, dims, block, rounding):
    """The kernel through the op implementation; fails if the call ran the reference instead."""
    impls.FALLBACKS.clear()
    out = impls.quantize_block_cuda(x, bits, dims, block, rounding, SEED, STREAM, STEP)
    assert not impls.FALLBACKS, dict(impls.FALLBACKS)
    return out


def _rq(x, bits, dims, block, rounding):
    return rb.quantize_block(x, bits, dims, block, rounding, seed=SEED, step=STEP, stream=STREAM)


def _kgemm(a, sa, b, sb, block, bias=None, out_dtype=torch.float32):
    impls.FALLBACKS.clear()
    out = impls.block_gemm_cuda(a, sa, b, sb, block, bias, out_dtype)
    assert not impls.FALLBACKS, dict(impls.FALLBACKS)
    return out


# -- quantize_block ------------------------------------------------------------------------------------------------
QUANT_CASES = [
    ((37, 80), [1], 16),        # 1 x b groups along the last dim
    ((45, 37), [-1], 32),       # ... with a ragged last group
    ((37, 80), [0], 32),        # groups along dim 0 (a weight's reduction dim in grad_input)
    ((37, 80), [0, 1], 16),     # b x b tiles
    ((37, 45), [0, 1], 32),     # ... ragged in both dims
    ((2, 37, 45), [2], 16),     # batched: groups along the last dim
    ((2, 37, 45), [1], 16),     # batched: groups along the second-to-last dim
    ((2, 37, 45), [1, 2], 32),  # batched tiles
    ((3, 5, 40), [0], 16),      # groups along the first of three dims
    ((127,), [0], 64),          # 1-D
]


@pytest.mark.parametrize("shape,dims,block", QUANT_CASES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_block_matches_reference(shape, dims, block, rounding):
    x = _x(shape)
    codes, scale = _kq(x, 8, dims, block, rounding)
    ref_codes, ref_scale = _rq(x, 8, dims, block, rounding)
    assert list(scale.shape) == rb.scale_shape(shape, dims, block)
    _eq(codes, ref_codes)
    _eq(scale, ref_scale)


@pytest.mark.parametrize("dims", [[1], [0], [0, 1]])
def test_quantize_block_low_bits_and_bf16(dims):
    x = _x((37, 80), torch.bfloat16, seed=1)
    for bits in (4, 2):
        codes, scale = _kq(x, bits, dims, 16, "stochastic")
        ref_codes, ref_scale = _rq(x, bits, dims, 16, "stochastic")
        _eq(codes, ref_codes)
        _eq(scale, ref_scale)


@pytest.mark.parametrize("dims,block", [([0, 1], 32), ([0], 32), ([1], 16)])
def test_quantize_block_swept_tiles(monkeypatch, dims, block):
    """Blocks bigger than one program's register tile (b x b tiles of 128 and 256 on a GPU): the rows are swept
    twice (abs-max, then codes) in chunks; forced here by shrinking the tile budget."""
    monkeypatch.setattr(kb, "TILE_ELEMS", 64)
    x = _x((37, 80), seed=2)
    for rounding in ("nearest", "stochastic"):
        codes, scale = _kq(x, 8, dims, block, rounding)
        ref_codes, ref_scale = _rq(x, 8, dims, block, rounding)
        _eq(codes, ref_codes)
        _eq(scale, ref_scale)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf in the interpreter
@pytest.mark.parametrize("dims", [[1], [0], [0, 1]])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_block_zero_and_non_finite_blocks(dims, rounding):
    """An all-zero block gets scale 1 and zero codes; a NaN block a NaN scale, an Inf block an Inf scale, both
    zero codes; every other block is untouched (`fqtc.quant.uniform`'s non-finite policy, per block)."""
    x = _x((37, 80), seed=3)
    x[16:32, 32:48] = 0.0  # one whole block in every layout with block 16
    x[5, 7] = float("nan")
    x[20, 70] = float("inf")
    codes, scale = _kq(x, 8, dims, 16, rounding)
    ref_codes, ref_scale = _rq(x, 8, dims, 16, rounding)
    _eq(codes, ref_codes)
    _eq(scale, ref_scale, nan=True)
    full = rb.expand_scale(scale, x.shape, dims, 16)
    assert (full[16:32, 32:48] == 1).all() and (codes[16:32, 32:48] == 0).all()
    assert torch.isnan(full[5, 7]) and torch.isinf(full[20, 70])
    assert torch.isnan(scale).sum() == 1 and torch.isinf(scale).sum() == 1  # only the two blocks
    assert codes[5, 7] == 0 and codes[20, 70] == 0


def test_quantize_block_round_half_even_ties():
    """A block whose abs-max is qmax has scale 1, so ``x / s`` hits exact .5 ties: nearest goes to even."""
    ties = (torch.arange(-64, 64, dtype=torch.float32) + 0.5).view(8, 16)
    ties[:, 0] = 127.0  # every 1 x 16 group's abs-max is 127 -> scale 1
    codes, scale = _kq(ties, 8, [1], 16, "nearest")
    ref_codes, ref_scale = _rq(ties, 8, [1], 16, "nearest")
    assert (ref_scale == 1).all()
    _eq(codes, ref_codes)
    _eq(scale, ref_scale)


@pytest.mark.parametrize("dims", [[1], [0], [0, 1]])
def test_quantize_block_true_division(dims):
    """``x / scale`` is a true IEEE division: inputs next to the .5 ties of scale 100/127, where multiplying by the
    reciprocal rounds to the other code."""
    s = torch.tensor(100.0) / 127
    k = torch.arange(-120, 120, dtype=torch.float32) + 0.5
    y = k * s
    cand = torch.cat([y, torch.nextafter(y, y + 1), torch.nextafter(y, y - 1)])
    cand = cand[torch.round(cand / s) != torch.round(cand * (1 / s))]
    x = cand.repeat(-(-1024 // len(cand)))[:1024].view(32, 32).clone()
    x[[0, 16], :] = 100.0  # every block of 16 (groups along either dim, tiles) has abs-max 100: scale s
    x[:, [0, 16]] = 100.0
    ref_codes, ref_scale = _rq(x, 8, dims, 16, "nearest")
    assert (ref_scale == s).all()
    assert not torch.equal(ref_codes, torch.round(x * (1 / s)).clamp(-127, 127).to(torch.int8))
    codes, scale = _kq(x, 8, dims, 16, "nearest")
    _eq(codes, ref_codes)
    _eq(scale, ref_scale)


def test_quantize_block_stream_is_keyed():
    """Stochastic codes depend on the seed (the stream is keyed, not constant) and differ from nearest."""
    x = _x((37, 80), seed=4)
    sr, _ = _kq(x, 4, [0, 1], 16, "stochastic")
    impls.FALLBACKS.clear()
    other, _ = impls.quantize_block_cuda(x, 4, [0, 1], 16, "stochastic", SEED + 1, STREAM, STEP)
    assert not torch.equal(sr, other)
    assert not torch.equal(sr, _kq(x, 4, [0, 1], 16, "nearest")[0])


# -- block_gemm ----------------------------------------------------------------------------------------------------
def _codes(shape, dims, block, seed, rounding="stochastic"):
    return rb.quantize_block(_x(shape, seed=seed), 8, dims, block, rounding, seed=seed, step=STEP, stream=STREAM)


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("a_dims,b_dims", [([0, 1], [0]), ([1], [0, 1]), ([0, 1], [0, 1]), ([1], [0])])
def test_block_gemm_matches_reference(block, a_dims, b_dims):
    """M=37, K=80, N=45: tiles on one side and groups on the other (and both alike); K ragged for block 32."""
    a, sa = _codes((37, 80), a_dims, block, 1)
    b, sb = _codes((80, 45), b_dims, block, 2)
    _eq(_kgemm(a, sa, b, sb, block), rb.block_gemm(a, sa, b, sb, block))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_gemm_bias_and_output_cast(out_dtype):
    a, sa = _codes((37, 80), [0, 1], 32, 3)
    b, sb = _codes((80, 45), [0], 32, 4)
    for bias in (_x((45,), seed=5), _x((37, 45), torch.bfloat16, seed=6)):
        _eq(_kgemm(a, sa, b, sb, 32, bias, out_dtype), rb.block_gemm(a, sa, b, sb, 32, bias, out_dtype))


def test_block_gemm_per_tensor_and_per_row_side():
    """One side block-scaled, the other with a scale constant along K (per tensor, per row / column): the K loop
    still applies it once per block, in the reference's order."""
    a, sa = _codes((37, 75), [1], 16, 7)  # K = 75: ragged last block of 11
    b, sb = _codes((75, 45), [0, 1], 16, 8)
    at, sat = quantize(_x((37, 75), seed=9), 8, [0, 1])  # per tensor: [1, 1]
    bt, sbt = quantize(_x((75, 45), seed=10), 8, [0, 1])
    ar, sar = quantize(_x((37, 75), seed=11), 8, [1])  # per row: [37, 1]
    bias = _x((45,), seed=12)
    for args in ((at, sat, b, sb), (a, sa, bt, sbt), (ar, sar, b, sb)):
        _eq(_kgemm(*args, 16, bias), rb.block_gemm(*args, 16, bias))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_block_gemm_non_finite_scale():
    """A NaN scale in one K-block of one tile poisons exactly the outputs the reference poisons."""
    x = _x((37, 80), seed=13)
    x[3, 40] = float("nan")
    a, sa = rb.quantize_block(x, 8, [0, 1], 16)
    b, sb = _codes((80, 45), [0], 16, 14)
    out = _kgemm(a, sa, b, sb, 16)
    _eq(out, rb.block_gemm(a, sa, b, sb, 16), nan=True)
    assert torch.isnan(out[:16]).all() and not torch.isnan(out[16:]).any()


def test_block_gemm_transposed_and_batched_operands():
    """The grad_weight form ``t(g) @ x`` (strided codes, transposed tile scales) and batched / broadcast codes."""
    g, sg = _codes((80, 37), [0, 1], 16, 15)  # tiles of g -> t(g) [37, 80] with scale t(sg) [3, 5]
    x, sx = _codes((80, 45), [0], 16, 16)
    _eq(_kgemm(g.t(), sg.t(), x, sx, 16), rb.block_gemm(g.t(), sg.t(), x, sx, 16))
    a, sa = _codes((2, 20, 48), [2], 16, 17)  # batched activation groups [2, 20, 3]
    w, sw = _codes((48, 24), [0, 1], 16, 18)  # a shared weight's tiles [3, 2]
    bias = _x((2, 1, 24), seed=19)
    _eq(_kgemm(a, sa, w, sw, 16, bias), rb.block_gemm(a, sa, w, sw, 16, bias))
    b, sb = _codes((2, 48, 24), [1], 16, 20)  # batched right operand, groups along K
    _eq(_kgemm(a, sa, b, sb, 16), rb.block_gemm(a, sa, b, sb, 16))


# -- fallbacks and the op implementations -----------------------------------------------------------------------------
def test_fallbacks_are_counted():
    """Layouts the kernels do not cover run the reference with a warning and a count (never silently)."""
    impls.FALLBACKS.clear()
    x = _x((4, 20, 40))
    with pytest.warns(UserWarning, match="reference implementation"):
        got = impls.quantize_block_cuda(x, 8, [0, 2], 16, "nearest", 0, 0, torch.tensor(0))
    want = rb.quantize_block(x, 8, [0, 2], 16)
    _eq(got[0], want[0])
    _eq(got[1], want[1])
    a, sa = _codes((20, 48), [1], 16, 1)
    b, sb = _codes((48, 24), [0], 16, 2)
    with pytest.warns(UserWarning, match="reference implementation"):
        out = impls.block_gemm_cuda(a, sa.repeat_interleave(2, dim=1), b, sb, 16, None, torch.float32)
    _eq(out, rb.block_gemm(a, sa.repeat_interleave(2, dim=1), b, sb, 16))  # scale varies inside a K-block
    with pytest.warns(UserWarning, match="not int8 codes"):
        out = impls.block_gemm_cuda(a.float(), sa, b, sb, 16, None, torch.float32)
    _eq(out, rb.block_gemm(a.float(), sa, b, sb, 16))  # a float operand
    assert sum(impls.FALLBACKS.values()) == 3
    assert {op for op, _ in impls.FALLBACKS} == {"fqt::quantize_block", "fqt::block_gemm"}


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="block size"):
        impls.quantize_block_cuda(_x((4, 32)), 8, [1], 24, "nearest", 0, 0, torch.tensor(0))
    with pytest.raises(ValueError, match="block size"):
        kb.quantize_block(_x((4, 32)), 8, [1], 8)
    with pytest.raises(ValueError, match="unknown rounding"):
        kb.quantize_block(_x((4, 32)), 8, [1], 16, "up")
    a, sa = _codes((8, 32), [1], 16, 1)
    with pytest.raises(ValueError, match="does not cover"):
        kb.block_gemm(a.float(), sa, a.t().contiguous(), sa.t(), 16)


def test_op_impls_match_ops():
    assert impls.CUDA_IMPLS["fqt::quantize_block"] is impls.quantize_block_cuda
    assert impls.CUDA_IMPLS["fqt::block_gemm"] is impls.block_gemm_cuda
    x = _x((24, 48))
    step = torch.tensor(5)
    got = impls.quantize_block_cuda(x, 8, [0, 1], 16, "stochastic", SEED, STREAM, step)
    want = torch.ops.fqt.quantize_block(x, 8, [0, 1], 16, "stochastic", SEED, STREAM, step)
    for g, r in zip(got, want):
        _eq(g, r)
    w, sw = _codes((48, 12), [0], 16, 2)
    _eq(_kgemm(got[0], got[1], w, sw, 16),
        torch.ops.fqt.block_gemm(want[0], want[1], w, sw, 16, None, torch.float32))
