"""Integer 2-D convolution and its two gradients with scales in the epilogue: the conv reference numerics.

A convolution site has the same three GEMMs as a linear site (docs/architecture.md): ``output = conv(x, W)``,
``grad_input = conv_transpose(g, W)`` and ``grad_weight = conv_weight(x, g)`` (implicit GEMMs). With int8 codes
each is an exact integer sum, computed here without an int8 kernel:

* ``output`` and ``grad_input`` run ``F.conv2d`` / the transposed convolution on the codes cast to fp32. Every
  output element is a sum of ``K`` products of magnitude <= 127^2, and every partial sum an integer of magnitude
  <= K*127^2. With ``K <= K_CHUNK = 1024`` that is < 2^24, so fp32 represents every partial sum exactly, whatever
  the summation order or blocking of the conv algorithm (direct or im2col+GEMM; CPU conv does not use Winograd or
  FFT). ``K`` is ``(C_in/groups)*kh*kw`` for ``output`` and ``(C_out/groups)*kh*kw`` for ``grad_input``; larger
  ``K`` is split into channel chunks whose int32 results are added.
* ``grad_weight`` reduces over ``N*H_out*W_out`` (times nothing else: one product per sample and position), far
  above 1024 in total, so it runs ``conv2d_weight`` in fp32 on chunks of samples whose reduction length
  ``n_chunk*H_out*W_out`` stays <= K_CHUNK (exact by the same bound) and adds the chunks' int32 results. When one
  sample alone has more than K_CHUNK output positions it runs in float64 (exact for K < 2^38). On the CPU this is
  an order of magnitude faster than im2col followed by the K-chunked `fqtc.quant.gemm.int_gemm`, which it replaces.
* On devices other than CPU the reference runs in float64 (exact for K < 2^38): GPU conv libraries may use TF32,
  Winograd or FFT algorithms, which are not exact on integer inputs. Fused kernels in `fqtc.codegen` replace it.

Scales: an operand's scale must be constant along that GEMM's reduction axes for it to move to the epilogue. The
allowed varying dim per (role, operand) is `SCALE_FREE_DIM` (e.g. weights per output channel for ``output``,
gradients per sample for ``grad_input``, per channel for ``grad_weight``). Otherwise, or when an operand is in
full precision, the functions convolve the dequantized fp32 operands: the same product of the quantized values,
without an integer reduction.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fqtc.quant.gemm import K_CHUNK

# (role, operand) -> the one tensor dim along which that operand's scale may vary and stay in the epilogue.
# output:      x[N,Ci,H,W] reduces over (Ci,kh,kw) -> per sample;   W[Co,Ci/g,kh,kw] reduces over (Ci/g,kh,kw) -> per Co
# grad_input:  g[N,Co,Ho,Wo] reduces over (Co,kh,kw) -> per sample; W reduces over (Co,kh,kw) -> per Ci/g
# grad_weight: x reduces over (N,H,W) -> per Ci;                    g reduces over (N,Ho,Wo) -> per Co
SCALE_FREE_DIM: dict[tuple[str, str], int] = {
    ("output", "input"): 0,
    ("output", "weight"): 0,
    ("grad_input", "grad_output"): 0,
    ("grad_input", "weight"): 1,
    ("grad_weight", "input"): 1,
    ("grad_weight", "grad_output"): 1,
}


def scale_ok(role: str, operand: str, scale_shape: Sequence[int]) -> bool:
    """True when a keepdim scale of this shape is constant along the reduction axes of the ``role`` GEMM."""
    free = SCALE_FREE_DIM[(role, operand)]
    return all(int(s) == 1 for d, s in enumerate(scale_shape) if d != free)


def _exact_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.float64


def _check_codes(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype != torch.int8:
            raise TypeError(f"integer conv expects int8 codes, got {t.dtype}")


def _chunks(n: int, k_per_channel: int) -> list[tuple[int, int]]:
    """Channel ranges whose reduction length ``channels * k_per_channel`` stays <= K_CHUNK (at least 1 channel)."""
    step = max(1, K_CHUNK // max(1, k_per_channel))
    if k_per_channel > K_CHUNK:
        raise ValueError(f"a single channel's kernel window ({k_per_channel} taps) exceeds the exact fp32 bound "
                         f"K_CHUNK={K_CHUNK}; use a smaller kernel")
    return [(c0, min(n, c0 + step)) for c0 in range(0, n, step)]


def _group_slice(t: torch.Tensor, groups: int, c0: int, c1: int, dim: int) -> torch.Tensor:
    """Channels [c0, c1) of every group along ``dim`` (group-major channel layout, as conv uses)."""
    shape = list(t.shape)
    per = shape[dim] // groups
    v = t.reshape(*shape[:dim], groups, per, *shape[dim + 1:]).narrow(dim + 1, c0, c1 - c0)
    return v.reshape(*shape[:dim], groups * (c1 - c0), *shape[dim + 1:])


def int_conv2d(x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], groups: int) -> torch.Tensor:
    """Exact int32 ``conv2d(x, w)`` for int8 codes ``x[N,Ci,H,W]``, ``w[Co,Ci/g,kh,kw]``."""
    _check_codes(x, w)
    dt = _exact_dtype(x.device)
    cin_g, kk = w.shape[1], w.shape[2] * w.shape[3]
    acc = None
    for c0, c1 in ([(0, cin_g)] if dt == torch.float64 else _chunks(cin_g, kk)):
        xs = _group_slice(x, groups, c0, c1, 1).to(dt)
        ws = w[:, c0:c1].to(dt)
        part = F.conv2d(xs, ws, None, stride, padding, dilation, groups).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def int_conv2d_input(input_size: Sequence[int], w: torch.Tensor, g: torch.Tensor, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """Exact int32 gradient of ``conv2d`` w.r.t. its input (a transposed conv) for int8 ``w`` and ``g[N,Co,Ho,Wo]``."""
    _check_codes(w, g)
    dt = _exact_dtype(g.device)
    cout, kk = w.shape[0], w.shape[2] * w.shape[3]
    cout_g = cout // groups
    acc = None
    for c0, c1 in ([(0, cout_g)] if dt == torch.float64 else _chunks(cout_g, kk)):
        gs = _group_slice(g, groups, c0, c1, 1).to(dt)
        ws = _group_slice(w, groups, c0, c1, 0).to(dt)
        part = torch.nn.grad.conv2d_input(list(input_size), ws, gs, stride, padding, dilation, groups)
        part = part.to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def int_conv2d_weight(x: torch.Tensor, weight_size: Sequence[int], g: torch.Tensor, stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """Exact int32 gradient of ``conv2d`` w.r.t. its weight for int8 ``x`` and ``g``, reduced over N*Ho*Wo."""
    _check_codes(x, g)
    n, positions = x.shape[0], g.shape[2] * g.shape[3]
    if g.shape[0] != n:
        raise ValueError(f"grad_output has {g.shape[0]} samples, the input {n}")
    size = [int(v) for v in weight_size]
    dt = _exact_dtype(x.device)
    if dt == torch.float64 or positions > K_CHUNK:  # float64: exact for any realistic reduction length
        return torch.nn.grad.conv2d_weight(x.double(), size, g.double(), stride, padding, dilation,
                                           groups).to(torch.int32)
    step = max(1, K_CHUNK // positions)  # samples per chunk: a reduction of <= K_CHUNK integer products
    acc = None
    for i in range(0, n, step):
        part = torch.nn.grad.conv2d_weight(x[i:i + step].float(), size, g[i:i + step].float(), stride, padding,
                                           dilation, groups).to(torch.int32)
        acc = part if acc is None else acc + part
    if acc is None:  # an empty batch
        acc = torch.zeros(size, dtype=torch.int32, device=x.device)
    return acc


def _per_channel(scale: torch.Tensor, dim: int, groups: int, repeat_over_groups: bool) -> torch.Tensor:
    """A keepdim scale that varies along ``dim`` as a flat vector (repeated per group if it indexes a per-group dim)."""
    v = scale.reshape(-1) if scale.numel() > 1 else scale.reshape(1)
    return v.repeat(groups) if repeat_over_groups and v.numel() > 1 else v


def _deq(t: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    return t.float() if s is None else t.float() * s


def _integer(a: torch.Tensor, sa: torch.Tensor | None, b: torch.Tensor, sb: torch.Tensor | None,
             role: str, names: tuple[str, str]) -> bool:
    return (a.dtype == torch.int8 and b.dtype == torch.int8 and sa is not None and sb is not None
            and scale_ok(role, names[0], sa.shape) and scale_ok(role, names[1], sb.shape))


def scaled_conv2d(x: torch.Tensor, x_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor | None,
                  bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``conv2d(x_scale*x, w_scale*w) + bias``: exact integer conv with scales in the epilogue when possible."""
    if _integer(x, x_scale, w, w_scale, "output", ("input", "weight")):
        acc = int_conv2d(x, w, stride, padding, dilation, groups).float()
        out = acc * x_scale.reshape(-1, 1, 1, 1) * w_scale.reshape(1, -1, 1, 1)
    else:
        out = F.conv2d(_deq(x, x_scale), _deq(w, w_scale), None, stride, padding, dilation, groups)
    if bias is not None:
        out = out + bias.float().reshape(1, -1, 1, 1)
    return out.to(out_dtype)


def scaled_conv2d_input(input_size: Sequence[int], w: torch.Tensor, w_scale: torch.Tensor | None, g: torch.Tensor,
                        g_scale: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int], groups: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gradient of ``conv2d`` w.r.t. its input from quantized ``g`` (grad_output) and ``w``."""
    if _integer(g, g_scale, w, w_scale, "grad_input", ("grad_output", "weight")):
        acc = int_conv2d_input(input_size, w, g, stride, padding, dilation, groups).float()
        sw = _per_channel(w_scale, 1, groups, True)  # per input channel of a group -> per input channel
        out = acc * g_scale.reshape(-1, 1, 1, 1) * sw.reshape(1, -1, 1, 1)
    else:
        out = torch.nn.grad.conv2d_input(list(input_size), _deq(w, w_scale), _deq(g, g_scale), stride, padding,
                                         dilation, groups)
    return out.to(out_dtype)


def scaled_conv2d_weight(x: torch.Tensor, x_scale: torch.Tensor | None, weight_size: Sequence[int], g: torch.Tensor,
                         g_scale: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                         dilation: Sequence[int], groups: int, out_dtype: torch.dtype = torch.float32
                         ) -> torch.Tensor:
    """Gradient of ``conv2d`` w.r.t. its weight from quantized ``x`` (input) and ``g`` (grad_output)."""
    if _integer(x, x_scale, g, g_scale, "grad_weight", ("input", "grad_output")):
        acc = int_conv2d_weight(x, weight_size, g, stride, padding, dilation, groups).float()
        cout, cin_g = int(weight_size[0]), int(weight_size[1])
        sx = x_scale.reshape(-1)
        # dW[o, j] uses input channel (group of o)*cin_g + j: per-channel input scales are gathered per group
        sx = sx.reshape(groups, cin_g).repeat_interleave(cout // groups, 0) if sx.numel() > 1 else sx.reshape(1, 1)
        out = acc * g_scale.reshape(-1, 1, 1, 1) * sx.reshape(sx.shape[0], sx.shape[1], 1, 1)
    else:
        out = torch.nn.grad.conv2d_weight(_deq(x, x_scale), list(weight_size), _deq(g, g_scale), stride, padding,
                                          dilation, groups)
    return out.to(out_dtype)
