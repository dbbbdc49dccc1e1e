"""Integer conv2d as implicit GEMMs (docs/kernels.md, "6. conv"), bit-exact with `fqtc.quant.conv`.

Each of the three conv GEMMs of a site runs as one Triton kernel that computes the im2col (or col2im) addresses
inside its K loop and gathers the int8 codes straight from their NCHW storage: nothing is unfolded, nothing
intermediate is written. ``tl.dot`` accumulates ``int8 x int8`` in int32 (exact, as the reference's int32
accumulator), and the epilogue applies the scales (and the bias) with the reference's float ops in its order, so
float outputs are bit-identical too (``enable_fp_fusion=False``: no FMA contraction).

- ``output`` (``fqt::qconv2d``, reference `fqtc.quant.conv.scaled_conv2d`): rows = output positions
  ``(n, oh, ow)``, columns = output channels, K = ``(ci, kh, kw)``. The A tile reads ``x[n, ci, oh*s - p + kh*d,
  ow*s - p + kw*d]`` (zero outside the image: the padding). Epilogue ``acc * x_scale[n] * w_scale[co] + bias[co]``,
  stored in NCHW.
- ``grad_input`` (``fqt::qconv2d_input``, a transposed convolution, reference `scaled_conv2d_input`): rows = input
  positions ``(n, ih, iw)``, columns = input channels, K = ``(co, kh, kw)``. Input position ``ih`` receives tap
  ``kh`` from output row ``oh = (ih + p - kh*d) / s`` when that division is exact and ``oh`` is in range; other
  (row, tap) pairs are masked to 0. With stride ``s`` only ``1/s^2`` of the taps are live: those masked MACs are
  wasted tensor-core work (no extra memory traffic). Epilogue ``acc * g_scale[n] * w_scale[ci]``.
- ``grad_weight`` (``fqt::qconv2d_weight``, reference `scaled_conv2d_weight`): rows = output channels, columns =
  ``(ci, kh, kw)``, K = ``(n, oh, ow)``: A reads ``g`` in place, B gathers ``x`` like the ``output`` kernel's A.
  Epilogue ``acc * g_scale[co] * x_scale[ci]``. K (= N*Ho*Wo) is long and M x N small: one program per output tile
  walks the whole reduction (no split-K yet), so few programs are in flight for small layers.

Grouped convolutions and operands that are not int8 codes with epilogue-compatible scales run the reference
(`fqtc.codegen.impls` counts and warns about those calls).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from fqtc.codegen import tl_numerics as tn
from fqtc.codegen.gemm import _interpreting
from fqtc.quant.conv import scale_ok

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). GPU: the int8 GEMM kernel's H100 configs (fqtc.codegen.gemm);
# a conv's channel count is usually a multiple of 64, so BLOCK_N = 64 wastes no columns on the 64-channel stages.
# Interpreter: 64-row tiles, 16 columns (the smallest tl.dot: tests with more than 16 channels or taps then cover
# the column masks of several N tiles) and a 32-deep K step keep the numpy work small.
CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "large": (128, 128, 64, 3, 8),
    "narrow_n": (128, 64, 64, 3, 4),
    "interpreter": (64, 16, 32, 1, 4),
}


def pick_config(N: int) -> tuple[int, int, int, int, int]:
    """Tile config for a conv GEMM with ``N`` output columns."""
    if _interpreting():
        return CONFIGS["interpreter"]
    return CONFIGS["narrow_n" if N <= 64 else "large"]


@triton.jit
def _epilogue_store(acc, sa_ptr, s_sa, ra, amask, sb_ptr, s_sb, rb, bmask, bias_ptr, out_ptr, out_off,
                    HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr):
    """``((acc.float() * sa[row]) * sb[col]) + bias[col]`` then the cast (the reference's op order)."""
    sa = tl.load(sa_ptr + ra.to(tl.int64) * s_sa, mask=amask, other=1.0)
    sb = tl.load(sb_ptr + rb.to(tl.int64) * s_sb, mask=bmask, other=1.0)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rb, mask=bmask, other=0.0).to(tl.float32)[None, :]
    if OUT_BF16:
        out = tn.to_bf16_rne(out)
    else:
        out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_off, out, mask=amask[:, None] & bmask[None, :])


@triton.jit
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, sx_ptr, sw_ptr, bias_ptr, out_ptr,
    NB, CI, H, W, CO, HO, WO, KH, KW,
    SH, SW, PH, PW, DH, DW,
    s_xn, s_xc, s_xh, s_xw, s_wo, s_wc, s_wh, s_ww, s_sx, s_sw,
    HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(CO, BLOCK_N)
    pid_m = pid // num_n  # the N tiles of one row block run side by side: they share its gathered A in L2
    pid_n = pid % num_n
    L = HO * WO
    M = NB * L
    K = CI * KH * KW
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < CO
    # row -> (sample, output row, output column)
    n_i = rm // L
    pos = rm % L
    oh = pos // WO
    ow = pos % WO
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_row = x_ptr + n_i.to(tl.int64) * s_xn
    w_col = w_ptr + rn.to(tl.int64) * s_wo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        # reduction index -> (input channel, kernel row, kernel column): the im2col address, computed in place
        ci = rk // (KH * KW)
        kh = (rk // KW) % KH
        kw = rk % KW
        ih = ih0[:, None] + (kh * DH)[None, :]
        iw = iw0[:, None] + (kw * DW)[None, :]
        am = mmask[:, None] & kmask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_row[:, None] + ci[None, :].to(tl.int64) * s_xc + ih.to(tl.int64) * s_xh
                    + iw.to(tl.int64) * s_xw, mask=am, other=0)
        b = tl.load(w_col[None, :] + (ci * s_wc + kh * s_wh + kw * s_ww).to(tl.int64)[:, None],
                    mask=kmask[:, None] & nmask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    # NCHW output: (n, co, oh, ow) at n*CO*L + co*L + pos
    out_off = (n_i.to(tl.int64) * CO * L + pos)[:, None] + rn.to(tl.int64)[None, :] * L
    _epilogue_store(acc, sx_ptr, s_sx, n_i, mmask, sw_ptr, s_sw, rn, nmask, bias_ptr, out_ptr, out_off, HAS_BIAS,
                    OUT_BF16)


@triton.jit
def _conv2d_input_kernel(
    g_ptr, w_ptr, sg_ptr, sw_ptr, out_ptr,
    NB, CI, H, W, CO, HO, WO, KH, KW,
    SH, SW, PH, PW, DH, DW,
    s_gn, s_gc, s_gh, s_gw, s_wo, s_wc, s_wh, s_ww, s_sg, s_sw,
    OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(CI, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    L = H * W
    M = NB * L
    K = CO * KH * KW
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < CI
    # row -> (sample, input row, input column)
    n_i = rm // L
    pos = rm % L
    ih = pos // W
    iw = pos % W
    g_row = g_ptr + n_i.to(tl.int64) * s_gn
    w_col = w_ptr + rn.to(tl.int64) * s_wc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        co = rk // (KH * KW)
        kh = (rk // KW) % KH
        kw = rk % KW
        # the output position whose window puts tap (kh, kw) on this input position: oh*s = ih + p - kh*d
        th = ih[:, None] + PH - (kh * DH)[None, :]
        tw = iw[:, None] + PW - (kw * DW)[None, :]
        oh = th // SH
        ow = tw // SW
        live = (th >= 0) & (tw >= 0) & (oh * SH == th) & (ow * SW == tw) & (oh < HO) & (ow < WO)
        am = mmask[:, None] & kmask[None, :] & live
        a = tl.load(g_row[:, None] + co[None, :].to(tl.int64) * s_gc + oh.to(tl.int64) * s_gh
                    + ow.to(tl.int64) * s_gw, mask=am, other=0)
        b = tl.load(w_col[None, :] + (co.to(tl.int64) * s_wo + kh * s_wh + kw * s_ww)[:, None],
                    mask=kmask[:, None] & nmask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    out_off = (n_i.to(tl.int64) * CI * L + pos)[:, None] + rn.to(tl.int64)[None, :] * L
    _epilogue_store(acc, sg_ptr, s_sg, n_i, mmask, sw_ptr, s_sw, rn, nmask, out_ptr, out_ptr, out_off, False,
                    OUT_BF16)


@triton.jit
def _conv2d_weight_kernel(
    x_ptr, g_ptr, sx_ptr, sg_ptr, out_ptr,
    NB, CI, H, W, CO, HO, WO, KH, KW,
    SH, SW, PH, PW, DH, DW,
    s_xn, s_xc, s_xh, s_xw, s_gn, s_gc, s_gh, s_gw, s_sx, s_sg,
    OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    NCOL = CI * KH * KW
    num_n = tl.cdiv(NCOL, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    L = HO * WO
    K = NB * L
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channels
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (ci, kh, kw)
    mmask = rm < CO
    nmask = rn < NCOL
    ci = rn // (KH * KW)
    kh = (rn // KW) % KH
    kw = rn % KW
    g_row = g_ptr + rm.to(tl.int64) * s_gc
    x_col = x_ptr + ci.to(tl.int64) * s_xc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        # reduction index -> (sample, output row, output column)
        n_k = rk // L
        pos = rk % L
        oh = pos // WO
        ow = pos % WO
        a = tl.load(g_row[:, None] + (n_k.to(tl.int64) * s_gn + oh * s_gh + ow * s_gw)[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0)
        ih = (oh * SH - PH)[:, None] + (kh * DH)[None, :]
        iw = (ow * SW - PW)[:, None] + (kw * DW)[None, :]
        bm = kmask[:, None] & nmask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_col[None, :] + n_k.to(tl.int64)[:, None] * s_xn + ih.to(tl.int64) * s_xh
                    + iw.to(tl.int64) * s_xw, mask=bm, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    # dW [CO, CI, KH, KW] contiguous: (co, j) at co*NCOL + j; the input scale is per input channel ci = j // (KH*KW)
    out_off = rm.to(tl.int64)[:, None] * NCOL + rn[None, :]
    _epilogue_store(acc, sg_ptr, s_sg, rm, mmask, sx_ptr, s_sx, ci, nmask, out_ptr, out_ptr, out_off, False,
                    OUT_BF16)


def _unsupported(role: str, operands: dict[str, tuple[torch.Tensor, torch.Tensor | None]], groups: int) -> str | None:
    """Why the implicit-GEMM kernels cannot run one conv GEMM (None if they can): groups, operand types, scales."""
    if groups != 1:
        return "grouped convolution has no implicit-GEMM kernel"
    if any(t.dtype != torch.int8 or s is None for t, s in operands.values()):
        return "an operand is not int8 codes with a scale"
    if not all(scale_ok(role, name, s.shape) for name, (_, s) in operands.items()):
        return "a scale varies along the conv's reduction axes"
    return None


def conv2d_supported(x, x_scale, w, w_scale, groups: int) -> str | None:
    """None when `scaled_conv2d` covers ``fqt::qconv2d`` with these operands, else the reason."""
    return _unsupported("output", {"input": (x, x_scale), "weight": (w, w_scale)}, groups)


def conv2d_input_supported(g, g_scale, w, w_scale, groups: int) -> str | None:
    """None when `scaled_conv2d_input` covers ``fqt::qconv2d_input`` with these operands, else the reason."""
    return _unsupported("grad_input", {"grad_output": (g, g_scale), "weight": (w, w_scale)}, groups)


def conv2d_weight_supported(x, x_scale, g, g_scale, groups: int) -> str | None:
    """None when `scaled_conv2d_weight` covers ``fqt::qconv2d_weight`` with these operands, else the reason."""
    return _unsupported("grad_weight", {"input": (x, x_scale), "grad_output": (g, g_scale)}, groups)


def _flat_scale(s: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A keepdim scale varying along at most one dim as (flat fp32 vector, stride): stride 0 for a per-tensor scale."""
    v = s.reshape(-1).to(torch.float32).contiguous()
    return v, (1 if v.numel() > 1 else 0)


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _geometry(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    dh, dw = (int(v) for v in dilation)
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"conv kernel: need stride, dilation >= 1 and padding >= 0, got stride={list(stride)}, "
                         f"padding={list(padding)}, dilation={list(dilation)}")
    return sh, sw, ph, pw, dh, dw


def _launch(kernel, m: int, n: int, args: tuple, out_dtype: torch.dtype, **flags) -> None:
    bm, bn, bk, stages, warps = pick_config(n)
    if m and n:
        kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
            *args, OUT_BF16=out_dtype == torch.bfloat16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
            num_stages=stages, enable_fp_fusion=False, **flags)


def scaled_conv2d(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  groups: int = 1, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton twin of `fqtc.quant.conv.scaled_conv2d` for int8 codes, groups=1 (implicit GEMM)."""
    why = conv2d_supported(x, x_scale, w, w_scale, groups)
    if why:
        raise ValueError(f"conv2d kernel: {why}")
    sh, sw_, ph, pw, dh, dw = _geometry(stride, padding, dilation)
    nb, ci, h, wd = x.shape
    co, ci_w, kh, kw = w.shape
    if ci_w != ci:
        raise ValueError(f"conv2d kernel: input has {ci} channels, weight expects {ci_w}")
    ho, wo = _out_size(h, kh, sh, ph, dh), _out_size(wd, kw, sw_, pw, dw)
    out = torch.empty((nb, co, max(ho, 0), max(wo, 0)), dtype=out_dtype, device=x.device)
    sx, s_sx = _flat_scale(x_scale)
    swv, s_sw = _flat_scale(w_scale)
    b = bias.contiguous() if bias is not None else out
    if out.numel():
        _launch(_conv2d_fwd_kernel, nb * ho * wo, co,
                (x, w, sx, swv, b, out, nb, ci, h, wd, co, ho, wo, kh, kw, sh, sw_, ph, pw, dh, dw,
                 *x.stride(), *w.stride(), s_sx, s_sw), out_dtype, HAS_BIAS=bias is not None)
    return out


def scaled_conv2d_input(input_size: Sequence[int], w: torch.Tensor, w_scale: torch.Tensor, g: torch.Tensor,
                        g_scale: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int], groups: int = 1, out_dtype: torch.dtype = torch.float32
                        ) -> torch.Tensor:
    """Triton twin of `fqtc.quant.conv.scaled_conv2d_input` for int8 codes, groups=1 (transposed conv as an
    implicit GEMM)."""
    why = conv2d_input_supported(g, g_scale, w, w_scale, groups)
    if why:
        raise ValueError(f"conv2d_input kernel: {why}")
    sh, sw_, ph, pw, dh, dw = _geometry(stride, padding, dilation)
    nb, ci, h, wd = (int(v) for v in input_size)
    co, ci_w, kh, kw = w.shape
    if ci_w != ci or g.shape[1] != co or g.shape[0] != nb:
        raise ValueError(f"conv2d_input kernel: shapes disagree: input_size={list(input_size)}, weight "
                         f"{list(w.shape)}, grad_output {list(g.shape)}")
    ho, wo = g.shape[2], g.shape[3]
    out = torch.empty((nb, ci, h, wd), dtype=out_dtype, device=g.device)
    sg, s_sg = _flat_scale(g_scale)
    swv, s_sw = _flat_scale(w_scale)
    _launch(_conv2d_input_kernel, nb * h * wd, ci,
            (g, w, sg, swv, out, nb, ci, h, wd, co, ho, wo, kh, kw, sh, sw_, ph, pw, dh, dw,
             *g.stride(), *w.stride(), s_sg, s_sw), out_dtype)
    return out


def scaled_conv2d_weight(x: torch.Tensor, x_scale: torch.Tensor, weight_size: Sequence[int], g: torch.Tensor,
                         g_scale: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                         dilation: Sequence[int], groups: int = 1, out_dtype: torch.dtype = torch.float32
                         ) -> torch.Tensor:
    """Triton twin of `fqtc.quant.conv.scaled_conv2d_weight` for int8 codes, groups=1 (implicit GEMM over
    N*H_out*W_out)."""
    why = conv2d_weight_supported(x, x_scale, g, g_scale, groups)
    if why:
        raise ValueError(f"conv2d_weight kernel: {why}")
    sh, sw_, ph, pw, dh, dw = _geometry(stride, padding, dilation)
    co, ci, kh, kw = (int(s) for s in weight_size)
    nb, ci_x, h, wd = x.shape
    ho, wo = _out_size(h, kh, sh, ph, dh), _out_size(wd, kw, sw_, pw, dw)
    if ci_x != ci or tuple(g.shape) != (nb, co, ho, wo):
        raise ValueError(f"conv2d_weight kernel: grad_output {list(g.shape)} does not match the convolution of "
                         f"input {list(x.shape)} with weight {list(weight_size)}: expected {[nb, co, ho, wo]}")
    out = torch.empty((co, ci, kh, kw), dtype=out_dtype, device=x.device)
    sx, s_sx = _flat_scale(x_scale)
    sg, s_sg = _flat_scale(g_scale)
    _launch(_conv2d_weight_kernel, co, ci * kh * kw,
            (x, g, sx, sg, out, nb, ci, h, wd, co, ho, wo, kh, kw, sh, sw_, ph, pw, dh, dw,
             *x.stride(), *g.stride(), s_sx, s_sg), out_dtype)
    return out
