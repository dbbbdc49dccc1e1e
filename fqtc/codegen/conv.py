"""Integer conv2d as im2col + the Triton int8 GEMM (issue 6, item 6), bit-exact with `fqtc.quant.conv`.

- ``output`` (``fqt::qconv2d``): ``cols = unfold(x)`` gives ``[N, L, Ci*kh*kw]`` int8 codes, one batched GEMM with
  the weight ``[Ci*kh*kw, Co]`` gives ``[N, L, Co]`` with the per-sample input scale as the row scale, the
  per-output-channel weight scale as the column scale and the bias in the epilogue; a permute gives NCHW.
- ``grad_weight`` (``fqt::qconv2d_weight``): ``g [Co, N*L] @ cols [N*L, Ci*kh*kw]`` with the per-channel gradient
  scale per row and the per-input-channel activation scale (repeated over kh*kw) per column.

im2col materialises ``kh*kw`` copies of the activation codes (9x for 3x3) in int8: an implicit-GEMM kernel that
gathers the taps in its prologue would avoid that traffic and is the next step. ``F.unfold`` has no int8 kernel,
so the codes are unfolded as fp16 (integers <= 127 are exact) and cast back.

- ``grad_input`` (``fqt::qconv2d_input``, a transposed convolution): the GEMM ``W^T [Ci*kh*kw, Co] @ g[n] [Co, L]``
  gives per-tap integer partials (exact in the fp32 output while ``Co * 127^2 < 2^24``, i.e. ``Co <= 1040``), col2im
  (``F.fold`` in float64: exact integer sums) adds the overlapping taps, and the scales are applied after the fold
  in the reference's order (they cannot sit in the GEMM epilogue: the fold sums across taps first). This path
  writes a ``kh*kw``-times larger fp32 intermediate; an implicit-GEMM kernel would not.

Grouped convolutions keep the reference path (`fqtc.codegen.impls` counts those calls).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fqtc.codegen import gemm as _kg
from fqtc.quant.conv import scale_ok


def _cols(x: torch.Tensor, kh: int, kw: int, stride, padding, dilation) -> torch.Tensor:
    """int8 im2col ``[N, Ci*kh*kw, L]`` of int8 codes (unfolded exactly in fp16)."""
    return F.unfold(x.to(torch.float16 if x.is_cuda else torch.float32), (kh, kw), dilation=dilation,
                    padding=padding, stride=stride).to(torch.int8)


def _unsupported(role: str, operands: dict[str, tuple[torch.Tensor, torch.Tensor | None]], groups: int) -> str | None:
    """Why the im2col kernels cannot run one conv GEMM (None if they can): groups, operand types, scale layout."""
    if groups != 1:
        return "grouped convolution has no im2col kernel"
    if any(t.dtype != torch.int8 or s is None for t, s in operands.values()):
        return "an operand is not int8 codes with a scale"
    if not all(scale_ok(role, name, s.shape) for name, (_, s) in operands.items()):
        return "a scale varies along the conv's reduction axes"
    return None


def conv2d_supported(x, x_scale, w, w_scale, groups: int) -> str | None:
    return _unsupported("output", {"input": (x, x_scale), "weight": (w, w_scale)}, groups)


def scaled_conv2d(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  groups: int = 1, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton twin of `fqtc.quant.conv.scaled_conv2d` for int8 codes, groups=1."""
    why = conv2d_supported(x, x_scale, w, w_scale, groups)
    if why:
        raise ValueError(f"conv2d kernel: {why}")
    n, _, h, wd = x.shape
    co, ci, kh, kw = w.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = _cols(x, kh, kw, stride, padding, dilation).transpose(1, 2)  # [N, L, K], strided view
    wmat = w.reshape(co, ci * kh * kw).t()  # [K, Co]
    out = _kg.scaled_gemm(cols, x_scale.reshape(-1, 1, 1), wmat, w_scale.reshape(1, -1),
                          bias.reshape(1, 1, -1) if bias is not None else None, out_dtype)
    return out.transpose(1, 2).reshape(n, co, ho, wo)


def conv2d_weight_supported(x, x_scale, g, g_scale, groups: int) -> str | None:
    return _unsupported("grad_weight", {"input": (x, x_scale), "grad_output": (g, g_scale)}, groups)


def scaled_conv2d_weight(x: torch.Tensor, x_scale: torch.Tensor, weight_size: Sequence[int], g: torch.Tensor,
                         g_scale: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                         dilation: Sequence[int], groups: int = 1, out_dtype: torch.dtype = torch.float32
                         ) -> torch.Tensor:
    """Triton twin of `fqtc.quant.conv.scaled_conv2d_weight` for int8 codes, groups=1."""
    why = conv2d_weight_supported(x, x_scale, g, g_scale, groups)
    if why:
        raise ValueError(f"conv2d_weight kernel: {why}")
    co, ci, kh, kw = (int(s) for s in weight_size)
    n = x.shape[0]
    cols = _cols(x, kh, kw, stride, padding, dilation).transpose(1, 2).reshape(-1, ci * kh * kw)  # [N*L, K]
    gmat = g.reshape(n, co, -1).permute(1, 0, 2).reshape(co, -1)  # [Co, N*L]
    sx = x_scale.reshape(-1)
    sx = sx.repeat_interleave(kh * kw).reshape(1, -1) if sx.numel() > 1 else sx.reshape(1, 1)
    out = _kg.scaled_gemm(gmat, g_scale.reshape(-1, 1), cols, sx, None, out_dtype)
    return out.reshape(co, ci, kh, kw)


MAX_INPUT_GRAD_CO = 1040  # Co * 127^2 < 2^24: the GEMM's per-tap partial sums are exact in its fp32 output


def conv2d_input_supported(g, g_scale, w, w_scale, groups: int) -> str | None:
    why = _unsupported("grad_input", {"grad_output": (g, g_scale), "weight": (w, w_scale)}, groups)
    if why:
        return why
    if w.shape[0] > MAX_INPUT_GRAD_CO:
        return f"C_out={w.shape[0]} > {MAX_INPUT_GRAD_CO}: per-tap partial sums would not be exact in fp32"
    return None


def scaled_conv2d_input(input_size: Sequence[int], w: torch.Tensor, w_scale: torch.Tensor, g: torch.Tensor,
                        g_scale: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int], groups: int = 1, out_dtype: torch.dtype = torch.float32
                        ) -> torch.Tensor:
    """Triton twin of `fqtc.quant.conv.scaled_conv2d_input` for int8 codes, groups=1: GEMM + col2im."""
    why = conv2d_input_supported(g, g_scale, w, w_scale, groups)
    if why:
        raise ValueError(f"conv2d_input kernel: {why}")
    n, ci, h, wd = (int(v) for v in input_size)
    co, _, kh, kw = w.shape
    one = torch.ones((1, 1), dtype=torch.float32, device=g.device)
    wt = w.reshape(co, ci * kh * kw).t()  # [K, Co]
    gm = g.reshape(n, co, -1)  # [N, Co, L]
    taps = _kg.scaled_gemm(wt, one, gm, one, None, torch.float32)  # [N, K, L] exact integer partials
    acc = F.fold(taps.double(), (h, wd), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    acc = acc.to(torch.int32).float()  # the reference's int32 accumulator, as float
    sw = w_scale.reshape(-1) if w_scale.numel() > 1 else w_scale.reshape(1)
    out = acc * g_scale.reshape(-1, 1, 1, 1) * sw.reshape(1, -1, 1, 1)
    return out.to(out_dtype)
