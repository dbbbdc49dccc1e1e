"""Triton kernels vs their references under the Triton interpreter (TRITON_INTERPRET=1 from tests/conftest.py).

Integer outputs (codes, SR codes, packed int4) and scales must be bit-identical to the reference; float GEMM
outputs are compared with ``assert_close`` at zero tolerance where the epilogue reproduces the reference's op
order exactly (it does: ``((acc*sa)*sb)+bias`` then the cast), default tolerance otherwise. Shapes are <= 128 with
odd sizes so every mask is exercised (docs/architecture.md: the interpreter is slow; big tiles, few programs).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from fqtc.codegen import gemm as kg  # noqa: E402
from fqtc.codegen import impls  # noqa: E402
from fqtc.codegen import quantize as kq  # noqa: E402
from fqtc.codegen.reference import pack_int4, qgemm_requant, unpack_int4  # noqa: E402
from fqtc.quant.gemm import scaled_gemm  # noqa: E402
from fqtc.quant.uniform import quantize  # noqa: E402
from tests.codegen.inputs import SEED, STEP, STREAM  # noqa: E402
from tests.codegen.inputs import x_with_ties as _x  # noqa: E402


def _eq(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- quantize ----------------------------------------------------------------------------------------------------
QUANT_CASES = [
    ((37, 50), [1]),          # per row (token)
    ((37, 50), [0]),          # per column (channel)
    ((37, 50), [0, 1]),       # per tensor
    ((3, 5, 22), [-1]),       # per row of a 3-D activation
    ((3, 5, 22), [1, 2]),     # per sample
    ((3, 5, 22), [0, 1]),     # per channel of a 3-D gradient
    ((127,), [0]),            # 1-D
]


@pytest.mark.parametrize("shape,dims", QUANT_CASES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_matches_reference(shape, dims, rounding):
    x = _x(shape)
    codes, scale = kq.quantize(x, 8, dims, rounding, seed=SEED, step=STEP, stream=STREAM)
    ref_codes, ref_scale = quantize(x, 8, dims, rounding, seed=SEED, step=STEP, stream=STREAM)
    _eq(codes, ref_codes)
    _eq(scale, ref_scale)


@pytest.mark.parametrize("dims", [[1], [0], [0, 1]])
def test_quantize_two_sweep_path(monkeypatch, dims):
    """Rows/columns longer than one tile: the amax sweep + quantize loop (not the read-once path)."""
    monkeypatch.setattr(kq, "MAX_BLOCK", 16)
    monkeypatch.setattr(kq, "TILE_ELEMS", 64)
    monkeypatch.setattr(kq, "AMAX_BLOCK", 32)
    x = _x((45, 70))
    for rounding in ("nearest", "stochastic"):
        codes, scale = kq.quantize(x, 6, dims, rounding, seed=SEED, step=STEP, stream=STREAM)
        ref_codes, ref_scale = quantize(x, 6, dims, rounding, seed=SEED, step=STEP, stream=STREAM)
        _eq(codes, ref_codes)
        _eq(scale, ref_scale)


def _eq_nan(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf in the interpreter
@pytest.mark.parametrize("dims", [[1], [0], [0, 1]])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_non_finite_matches_reference(dims, rounding):
    """NaN and Inf groups: NaN/Inf scale and zero codes exactly as the reference (GPU ``max`` drops NaN, so the
    kernels use a NaN-propagating absmax)."""
    x = _x((37, 50))
    x[5, 7], x[20, 0] = float("nan"), float("inf")
    codes, scale = kq.quantize(x, 8, dims, rounding, seed=SEED, step=STEP, stream=STREAM)
    ref_codes, ref_scale = quantize(x, 8, dims, rounding, seed=SEED, step=STEP, stream=STREAM)
    _eq(codes, ref_codes)
    _eq_nan(scale, ref_scale)
    assert not torch.isfinite(scale).all()


def test_fused_prologue_non_finite_matches_reference():
    """The quantizing GEMM prologue (per row and per tensor) with a NaN row: same codes, scales and output."""
    x = _x((21, 40))
    x[4, 9] = float("nan")
    w, sw = quantize(torch.randn(40, 24), 8, [0])
    for dims in ([1], [0, 1]):
        out, codes, scale = kg.qgemm_fused_quant(x, 8, dims, "stochastic", SEED, STREAM, STEP, w, sw)
        ref_codes, ref_scale = quantize(x, 8, dims, "stochastic", seed=SEED, step=STEP, stream=STREAM)
        _eq(codes, ref_codes)
        _eq_nan(scale, ref_scale)
        _eq_nan(out, scaled_gemm(ref_codes, ref_scale, w, sw))
        assert torch.isnan(out[4]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_low_precision_input(dtype):
    x = _x((33, 64), dtype)
    for dims in ([1], [0, 1]):
        codes, scale = kq.quantize(x, 8, dims, "stochastic", seed=SEED, step=STEP, stream=STREAM)
        ref_codes, ref_scale = quantize(x, 8, dims, "stochastic", seed=SEED, step=STEP, stream=STREAM)
        _eq(codes, ref_codes)
        _eq(scale, ref_scale)


@pytest.mark.parametrize("dims", [[1], [0], [0, 1]])
@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_packed_int4(dims, bits):
    x = _x((29, 46))
    packed, scale = kq.quantize(x, bits, dims, "stochastic", seed=SEED, step=STEP, stream=STREAM, pack_int4=True)
    ref_codes, ref_scale = quantize(x, bits, dims, "stochastic", seed=SEED, step=STEP, stream=STREAM)
    assert packed.shape == (29, 23) and packed.dtype == torch.int8
    _eq(packed, pack_int4(ref_codes))
    _eq(unpack_int4(packed), ref_codes)
    _eq(scale, ref_scale)


def test_quantize_round_half_even_ties():
    """amax = qmax gives scale 1, so x / s hits exact .5 ties: nearest rounding must go to the even neighbour."""
    ties = torch.arange(-126, 126, dtype=torch.float32) + 0.5
    x = torch.cat([ties, torch.tensor([127.0, -127.0, 0.5, 1.5])]).view(4, 64)
    x[:, 0] = 127.0  # every row's amax is 127 -> per-row scale exactly 1
    for dims in ([1], [0, 1]):
        codes, scale = kq.quantize(x, 8, dims, "nearest")
        ref_codes, ref_scale = quantize(x, 8, dims, "nearest")
        assert (ref_scale == 1).all()
        _eq(codes, ref_codes)
        _eq(scale, ref_scale)


def test_quantize_zero_groups_and_seed_sensitivity():
    x = _x((20, 30))
    x[3] = 0.0  # a zero row gets scale 1 and zero codes
    codes, scale = kq.quantize(x, 8, [1], "stochastic", seed=SEED, step=STEP, stream=STREAM)
    assert scale[3, 0] == 1.0 and (codes[3] == 0).all()
    other, _ = kq.quantize(x, 8, [1], "stochastic", seed=SEED + 1, step=STEP, stream=STREAM)
    assert not torch.equal(codes, other)  # the stream is keyed by the seed, not constant


def test_quantize_bad_input():
    with pytest.raises(NotImplementedError, match="prefix or suffix"):
        kq.quantize(_x((2, 3, 4)), 8, [0, 2])
    with pytest.raises(ValueError, match="bits <= 4"):
        kq.quantize(_x((4, 4)), 8, [1], pack_int4=True)
    with pytest.raises(ValueError, match="odd last dim"):
        kq.quantize(_x((4, 5)), 4, [1], pack_int4=True)
    with pytest.raises(ValueError, match="unknown rounding"):
        kq.quantize(_x((4, 4)), 8, [1], "up")


# -- integer GEMM ------------------------------------------------------------------------------------------------
def _codes(shape, dims, seed):
    return quantize(_x(shape, seed=seed), 8, dims)


@pytest.mark.parametrize("M,N,K", [(50, 70, 96), (128, 128, 128), (1, 17, 5), (65, 3, 129)])
@pytest.mark.parametrize("a_dims", [[1], [0, 1]])
def test_gemm_matches_reference(M, N, K, a_dims):
    a, sa = _codes((M, K), a_dims, 1)
    b, sb = _codes((K, N), [0], 2)
    bias = _x((N,), seed=3)
    _eq(kg.scaled_gemm(a, sa, b, sb, bias), scaled_gemm(a, sa, b, sb, bias))
    _eq(kg.scaled_gemm(a, sa, b, sb), scaled_gemm(a, sa, b, sb))


def test_gemm_grouped_ordering(monkeypatch):
    """Several groups of GROUP_M row blocks, the last one partial: every output tile is computed exactly once."""
    monkeypatch.setattr(kg, "GROUP_M", 2)
    a, sa = _codes((150, 40), [1], 1)  # 3 row blocks of 64 -> groups of 2 and 1
    b, sb = _codes((40, 140), [0], 2)  # 3 column blocks
    _eq(kg.scaled_gemm(a, sa, b, sb), scaled_gemm(a, sa, b, sb))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_gemm_output_cast(out_dtype):
    a, sa = _codes((40, 72), [1], 1)
    b, sb = _codes((72, 33), [0], 2)
    bias = _x((33,), torch.bfloat16, seed=3)
    _eq(kg.scaled_gemm(a, sa, b, sb, bias, out_dtype), scaled_gemm(a, sa, b, sb, bias, out_dtype))


def test_gemm_transposed_operands():
    """Strided (transposed) codes, as the grad_weight GEMM sees them: ``t(g8) @ x8``."""
    g, sg = _codes((48, 20), [0], 1)  # per-column scale of g -> per-row scale of g.T
    x, sx = _codes((48, 36), [0], 2)
    _eq(kg.scaled_gemm(g.t(), sg.t(), x, sx), scaled_gemm(g.t(), sg.t(), x, sx))


def test_bmm_matches_reference():
    a, sa = _codes((3, 20, 40), [-1], 1)
    b, sb = _codes((3, 40, 30), [-2], 2)
    _eq(kg.scaled_gemm(a, sa, b, sb), scaled_gemm(a, sa, b, sb))
    b2, sb2 = _codes((40, 30), [0], 3)  # broadcast weight over the batch
    bias = _x((3, 1, 30), seed=4)
    _eq(kg.scaled_gemm(a, sa, b2, sb2, bias), scaled_gemm(a, sa, b2, sb2, bias))
    a4, sa4 = _codes((2, 2, 9, 24), [-1], 5)  # two batch dims
    b4, sb4 = _codes((2, 2, 24, 11), [-2], 6)
    _eq(kg.scaled_gemm(a4, sa4, b4, sb4), scaled_gemm(a4, sa4, b4, sb4))


def test_gemm_bad_input():
    a, sa = _codes((8, 16), [1], 1)
    b, sb = _codes((16, 8), [0], 2)
    with pytest.raises(ValueError, match="scales constant along K"):
        kg.scaled_gemm(a.float(), sa, b, sb)
    with pytest.raises(ValueError, match="inner dims"):
        kg.scaled_gemm(a, sa, b[:8], sb)


# -- GEMM with the quantizing prologue and the requantizing epilogue --------------------------------------------
@pytest.mark.parametrize("dims", [[-1], [0, 1]])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_quant_prologue(dims, rounding, dtype):
    x = _x((50, 96), dtype)
    b, sb = _codes((96, 70), [0], 2)
    bias = _x((70,), seed=3)
    out, codes, scale = kg.qgemm_fused_quant(x, 8, dims, rounding, SEED, STREAM, STEP, b, sb, bias)
    ref_codes, ref_scale = quantize(x, 8, dims, rounding, seed=SEED, step=STEP, stream=STREAM)
    _eq(codes, ref_codes)
    _eq(scale, ref_scale)
    _eq(out, scaled_gemm(ref_codes, ref_scale, b, sb, bias))


def test_fused_quant_prologue_batched_long_k(monkeypatch):
    """Batched activation, K spanning several K-tiles (the per-row amax sweep loops)."""
    x = _x((2, 33, 150))
    b, sb = _codes((2, 150, 40), [-2], 2)
    out, codes, scale = kg.qgemm_fused_quant(x, 4, [-1], "stochastic", SEED, STREAM, STEP, b, sb)
    ref_codes, ref_scale = quantize(x, 4, [-1], "stochastic", seed=SEED, step=STEP, stream=STREAM)
    _eq(codes, ref_codes)
    _eq(scale, ref_scale)
    _eq(out, scaled_gemm(ref_codes, ref_scale, b, sb))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_requant_epilogue(rounding):
    a, sa = _codes((50, 96), [1], 1)
    b, sb = _codes((96, 70), [0], 2)
    bias = _x((70,), seed=3)
    rq = kg.Requant(bits=8, rounding=rounding, seed=SEED, stream=STREAM)
    out, codes, scale = kg.scaled_gemm(a, sa, b, sb, bias, requant=rq, step=STEP)
    ref = qgemm_requant(a, sa, b, sb, bias, torch.float32, 8, [-1], rounding, SEED, STEP, STREAM)
    _eq(out, ref[0])
    _eq(codes, ref[1])
    _eq(scale, ref[2])


def test_prologue_and_epilogue_together():
    """quantize -> GEMM -> requantize in one kernel: the chain feeding the next GEMM."""
    x = _x((3, 17, 40))
    b, sb = _codes((3, 40, 24), [-2], 2)
    rq = kg.Requant(bits=8, rounding="stochastic", seed=SEED + 1, stream=7)
    out, codes, scale, ocodes, oscale = kg.qgemm_fused_quant(x, 8, [-1], "stochastic", SEED, STREAM, STEP, b, sb,
                                                             requant=rq)
    ref_codes, ref_scale = quantize(x, 8, [-1], "stochastic", seed=SEED, step=STEP, stream=STREAM)
    ref = qgemm_requant(ref_codes, ref_scale, b, sb, None, torch.float32, 8, [-1], "stochastic", SEED + 1, STEP, 7)
    for got, want in zip((out, codes, scale, ocodes, oscale), (ref[0], ref_codes, ref_scale, ref[1], ref[2])):
        _eq(got, want)


def test_fused_bad_input():
    b, sb = _codes((16, 8), [0], 2)
    with pytest.raises(ValueError, match="per-tensor or per-row"):
        kg.qgemm_fused_quant(_x((8, 16)), 8, [0], "nearest", 0, 0, STEP, b, sb)
    a, sa = _codes((8, 16), [1], 1)
    wide, swide = _codes((16, 300), [0], 3)
    with pytest.raises(ValueError, match="MAX_REQUANT_N"):
        kg.scaled_gemm(a, sa, wide, swide, requant=kg.Requant(8))


# -- the CUDA implementations behind the fqt ops (run here on CPU tensors) ----------------------------------------
def test_op_impls_match_ops():
    x = _x((24, 40))
    w, sw = _codes((40, 12), [0], 2)
    step = torch.tensor(5)
    got = impls.quantize_cuda(x, 8, [1], "stochastic", SEED, STREAM, step)
    want = torch.ops.fqt.quantize(x, 8, [1], "stochastic", SEED, STREAM, step)
    for g, r in zip(got, want):
        _eq(g, r)
    _eq(impls.qgemm_cuda(got[0], got[1], w, sw, None, torch.float32),
        torch.ops.fqt.qgemm(got[0], got[1], w, sw, None, torch.float32))
    fused = impls.qgemm_fused_quant_cuda(x, 8, [1], "stochastic", SEED, STREAM, step, w, sw, None, torch.float32)
    ref = torch.ops.fqt.qgemm_fused_quant(x, 8, [1], "stochastic", SEED, STREAM, step, w, sw, None, torch.float32)
    for g, r in zip(fused, ref):
        _eq(g, r)


def test_op_impl_fallback_is_counted():
    """A layout the kernels do not cover runs the reference, with a warning and a counter (never silently)."""
    impls.FALLBACKS.clear()
    x = _x((2, 3, 4))
    with pytest.warns(UserWarning, match="reference implementation"):
        got = impls.quantize_cuda(x, 8, [0, 2], "nearest", 0, 0, torch.tensor(0))
    want = quantize(x, 8, [0, 2])
    _eq(got[0], want[0])
    assert sum(impls.FALLBACKS.values()) == 1


# -- statistics from the producer (docs/kernels.md): the group abs-max given, x read once -----------------------
def _amax(x, dims):
    from fqtc.quant.uniform import group_amax

    return group_amax(x, dims)


@pytest.mark.parametrize("shape,dims", QUANT_CASES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_with_producer_amax(shape, dims, rounding):
    """Given the exact group abs-max, every layout gives the reference's bits (and the no-amax result)."""
    x = _x(shape, torch.bfloat16)
    n = len(shape)
    amax = _amax(x, list(range(n)) if sorted(d % n for d in dims) == list(range(n)) else dims)
    codes, scale = kq.quantize(x, 8, dims, rounding, seed=SEED, step=STEP, stream=STREAM, amax=amax)
    ref_codes, ref_scale = quantize(x, 8, dims, rounding, seed=SEED, step=STEP, stream=STREAM, amax=amax)
    _eq(codes, ref_codes)
    _eq(scale, ref_scale)
    plain = quantize(x, 8, dims, rounding, seed=SEED, step=STEP, stream=STREAM)
    _eq(codes, plain[0])
    _eq(scale, plain[1])


@pytest.mark.parametrize("dims", [[1], [0], [0, 1]])
def test_quantize_producer_amax_long_groups(monkeypatch, dims):
    """Groups longer than one tile: with the amax given the kernel skips its amax sweep; a smaller-than-true amax
    (a stale statistic) saturates codes at +-qmax exactly like the reference."""
    monkeypatch.setattr(kq, "MAX_BLOCK", 16)
    monkeypatch.setattr(kq, "TILE_ELEMS", 64)
    x = _x((45, 70))
    amax = _amax(x, dims) * 0.5
    for rounding in ("nearest", "stochastic"):
        codes, scale = kq.quantize(x, 6, dims, rounding, seed=SEED, step=STEP, stream=STREAM, amax=amax)
        ref_codes, ref_scale = quantize(x, 6, dims, rounding, seed=SEED, step=STEP, stream=STREAM, amax=amax)
        _eq(codes, ref_codes)
        _eq(scale, ref_scale)
        assert (codes.abs() == 31).any()  # saturated


@pytest.mark.parametrize("dims", [[-1], [0, 1, 2]])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fused_quant_prologue_with_producer_amax(dims, rounding):
    """The GEMM prologue with the amax given (A_MODE 1 per tensor, 3 per row): same codes, scales and output."""
    x = _x((2, 33, 150), torch.bfloat16)
    b, sb = _codes((2, 150, 40), [-2], 2)
    amax = _amax(x, dims)
    out, codes, scale = kg.qgemm_fused_quant(x, 8, dims, rounding, SEED, STREAM, STEP, b, sb, amax=amax)
    ref_codes, ref_scale = quantize(x, 8, dims, rounding, seed=SEED, step=STEP, stream=STREAM)
    _eq(codes, ref_codes)
    _eq(scale, ref_scale)
    _eq(out, scaled_gemm(ref_codes, ref_scale, b, sb))


def test_producer_amax_bad_shape():
    x = _x((10, 12))
    with pytest.raises(ValueError, match="keepdim group abs-max"):
        kq.quantize(x, 8, [1], "nearest", amax=torch.ones(12))
    with pytest.raises(ValueError, match="keepdim group abs-max"):
        quantize(x, 8, [0], "nearest", amax=torch.ones(10, 1))
