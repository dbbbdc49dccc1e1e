"""Integer 2-D convolution and its two gradients with scales in the epilogue: the conv reference numerics.

A convolution site has the same three GEMMs as a linear site (docs/architecture.md): ``output = conv(x, W)``,
``grad_input = conv_transpose(g, W)`` and ``grad_weight = conv_weight(x, g)`` (implicit GEMMs). With int8 codes
each is an exact integer sum. On the CPU three exact implementations exist (`CONV_PATHS`); `conv_path` picks one
per process and conv shape (docs/kernels.md, "The CPU integer convolution", has the measurements). All return the
same int32, so the choice changes speed, never the numbers:

* ``"onednn"`` (``output``, ``grad_input``): oneDNN's int8 conv (``torch.ops.onednn.qconv2d_pointwise``) on
  uint8 activations ``code + 128`` with zero point 128 and int8 weights, fp32 output with all scales 1.0. Its
  products are integer dot products accumulated in int32 (VNNI/AMX; without them oneDNN's ``vpmaddubsw`` saturates
  int16 pair sums, so the path is only taken where `fqtc.quant.gemm.cpu_gemm_path` found int8 dot products and
  `probe_onednn_conv` checks it). The only rounding step is the fp32 output: exact while the uint8-domain sum
  ``|sum((x+128)*w)| <= K*255*128`` and the result stay within 2^24, i.e. ``K <= ONEDNN_K_CHUNK = 512`` taps per
  call (oneDNN may subtract the zero-point compensation after the fp32 conversion: at 585 taps it is off by one);
  larger reductions are split into channel chunks added in int32. ``grad_input`` is a plain stride-1 conv with
  dilation ``d`` of the flipped, transposed weight over ``g`` with ``stride-1`` zeros inserted
  (`_zero_inserted`).
* ``"int_mm"`` (all three): an int8 im2col built from a strided view of the zero-padded NHWC codes (``F.unfold``
  has no int8 kernel) times the weight matrix through ``torch._int_mm`` (`fqtc.quant.gemm.int_gemm`), int32
  accumulation: exact while ``K*2^14 < 2^31`` (``K`` < 131072; ``grad_weight`` splits its ``N*H_out*W_out``
  reduction at `fqtc.quant.gemm.INT32_K_LIMIT`). ``grad_weight = g^T[C_out, N*Ho*Wo] @ im2col(x)``; ``grad_input``
  is the zero-inserted conv above.
* ``"fp32"`` (the reference, and the path where the GEMM is fp32-emulated): ``output`` and ``grad_input`` run
  ``F.conv2d`` / the transposed convolution on the codes cast to fp32. Every output element is a sum of ``K``
  products of magnitude <= 128^2, every partial sum an integer of magnitude <= K*128^2; with
  ``K <= K_CHUNK = 1024`` that is <= 2^24, so fp32 represents every partial sum exactly, whatever the summation
  order or blocking of the conv algorithm (direct or im2col+GEMM; CPU conv does not use Winograd or FFT). ``K`` is
  ``(C_in/groups)*kh*kw`` for ``output`` and ``(C_out/groups)*kh*kw`` for ``grad_input``; larger ``K`` is split
  into channel chunks whose int32 results are added. ``grad_weight`` reduces over ``N*H_out*W_out``, so it runs
  ``conv2d_weight`` in fp32 on chunks of samples whose reduction length ``n_chunk*H_out*W_out`` stays <= K_CHUNK
  and adds the chunks' int32 results; when one sample alone has more than K_CHUNK output positions it runs in
  float64 (exact for K < 2^38).
* On devices other than CPU the reference runs in float64 (exact for K < 2^38): GPU conv libraries may use TF32,
  Winograd or FFT algorithms, which are not exact on integer inputs. Fused kernels in `fqtc.codegen` replace it.

Every path returns the int32 sum exactly while it fits int32 (``K*2^14 < 2^31``); beyond that no int32 result is
exact and the paths may differ.

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

from fqtc.quant.conv_onednn import ONEDNN_K_CHUNK, onednn_chunked, probe_onednn_conv, to_u8_nhwc
from fqtc.quant.conv_onednn import channel_chunks as _chunks
from fqtc.quant.conv_onednn import group_slice as _group_slice
from fqtc.quant.gemm import INT32_K_LIMIT, K_CHUNK, cpu_gemm_path, int_gemm

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


CONV_PATHS = ("onednn", "int_mm", "fp32")
CONV_ROLES = ("output", "grad_input", "grad_weight")
def _exact_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.float64


def _check_codes(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype not in (torch.int8, torch.float32):
            raise TypeError(f"integer conv expects int8 codes (or their float32 values), got {t.dtype}")


def float_codes(*ts: torch.Tensor) -> bool:
    """True when the codes arrive as float32 values (exact integers in [-128, 127]): only the fp32-emulated path
    takes them, and it convolves them without converting (the compiled CPU graphs convert in the loop that
    produces the codes, docs/kernels.md)."""
    return any(t.dtype == torch.float32 for t in ts)


def conv_path(role: str, weight_size: Sequence[int], stride: Sequence[int], groups: int,
              device: torch.device | str = "cpu") -> str:
    """The exact implementation this process uses for one conv GEMM: ``"onednn"``, ``"int_mm"`` or ``"fp32"``.

    ``role`` is ``"output"``, ``"grad_input"`` or ``"grad_weight"``. Off the CPU it is ``"fp32"`` (the float64
    reference). On the CPU it follows `fqtc.quant.gemm.cpu_gemm_path` (``FQTC_CPU_INT_GEMM=fp32`` forces
    ``"fp32"``), then the per-shape rules measured in docs/kernels.md ("The CPU integer convolution"):

    * grouped and depthwise convs (``groups > 1``), all three roles: fp32-emulated. Per-group int8 GEMMs have
      ``K = C/groups*kh*kw`` (9 for depthwise) and are 2x (grouped) to 30x (depthwise) slower; oneDNN's int8 conv
      is no consistent win there (0.75-1.7x the fp32-emulated time across two runs, 1.7x slower for a strided
      depthwise ``grad_input``).
    * ``grad_weight``: the int8 implicit GEMM (2-3x faster than fp32-emulated).
    * ``grad_input`` with stride > 1: fp32-emulated (the int8 paths convolve a zero-inserted gradient, wasting
      ``1 - 1/stride^2`` of the MACs, and measured slower).
    * ``output`` and stride-1 ``grad_input``: oneDNN's int8 conv when its reduction ``K`` (``C_in*kh*kw``, resp.
      ``C_out*kh*kw``) fits one exact `ONEDNN_K_CHUNK` call and `probe_onednn_conv` passes, else the int8
      implicit GEMM (several exact 512-tap oneDNN calls cost more than one int8 GEMM over all of ``K``)."""
    if role not in CONV_ROLES:
        raise ValueError(f"unknown conv role {role!r}; allowed: {', '.join(CONV_ROLES)}")
    if torch.device(device).type != "cpu" or cpu_gemm_path() != "int_mm" or groups != 1:
        return "fp32"
    if role == "grad_weight":
        return "int_mm"
    if role == "grad_input" and any(int(s) != 1 for s in stride):
        return "fp32"
    co, cig, kh, kw = (int(v) for v in weight_size)
    k = (cig if role == "output" else co) * kh * kw
    return "onednn" if k <= ONEDNN_K_CHUNK and probe_onednn_conv() is None else "int_mm"


def _resolve(path: str | None, role: str, device: torch.device, weight_size: Sequence[int],
             stride: Sequence[int], groups: int, *codes: torch.Tensor) -> str:
    if float_codes(*codes):
        return "fp32"
    if path is None:
        return conv_path(role, weight_size, stride, groups, device)
    if path not in CONV_PATHS:
        raise ValueError(f"unknown integer conv path {path!r}; allowed: {', '.join(CONV_PATHS)}")
    if device.type != "cpu":
        return "fp32"
    return path


def _nhwc_padded(x: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    """``x[N,C,H,W]`` as a zero-padded contiguous ``[N, H+2p0, W+2p1, C]`` (code 0 is the value 0)."""
    n, c, h, w = x.shape
    xp = x.new_zeros((n, h + 2 * padding[0], w + 2 * padding[1], c))
    xp[:, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = x.permute(0, 2, 3, 1)
    return xp


def _im2col(xp: torch.Tensor, kh: int, kw: int, ho: int, wo: int, stride: Sequence[int], dilation: Sequence[int],
            c0: int, c1: int) -> torch.Tensor:
    """int8 im2col ``[N*Ho*Wo, kh*kw*(c1-c0)]`` (tap-major, channel-minor) of padded NHWC ``xp``, channels [c0, c1).

    `F.unfold` has no int8 kernel; a strided view ``[N,Ho,Wo,kh,kw,C]`` of ``xp`` gathers every window and one
    ``reshape`` copies it."""
    n = xp.shape[0]
    sn, sh, sw, sc = xp.stride()
    v = xp.as_strided((n, ho, wo, kh, kw, xp.shape[3]),
                      (sn, stride[0] * sh, stride[1] * sw, dilation[0] * sh, dilation[1] * sw, sc))
    return v[..., c0:c1].reshape(n * ho * wo, kh * kw * (c1 - c0))


def _int_mm_conv(xp: torch.Tensor, w: torch.Tensor, ho: int, wo: int, stride: Sequence[int],
                 dilation: Sequence[int], groups: int) -> torch.Tensor:
    """int32 ``[N*Ho*Wo, Co]`` conv of padded NHWC int8 ``xp`` with ``w[Co,Ci/g,kh,kw]``: im2col + one int8 GEMM
    per group (``torch._int_mm`` accumulates in int32: exact while K*2^14 < 2^31, K = Ci/g*kh*kw)."""
    co, cig, kh, kw = w.shape
    cog = co // groups
    wm = w.permute(2, 3, 1, 0)  # [kh, kw, Ci/g, Co]: the im2col's (tap, channel) order
    parts = [int_gemm(_im2col(xp, kh, kw, ho, wo, stride, dilation, gi * cig, (gi + 1) * cig),
                      wm[..., gi * cog:(gi + 1) * cog].reshape(kh * kw * cig, cog), path="int_mm")
             for gi in range(groups)]
    return parts[0] if groups == 1 else torch.cat(parts, 1)


def _nchw(acc: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """``[N*H*W, C]`` as an ``[N, C, H, W]`` view (`_as` makes it contiguous in its dtype conversion)."""
    return acc.view(n, h, w, acc.shape[1]).permute(0, 3, 1, 2)


def _out_hw(h: int, k: int, s: int, p: int, d: int) -> int:
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


def _fp32_conv2d(x, w, stride, padding, dilation, groups):
    """Exact accumulator of the fp32-emulated conv: the float conv itself when one chunk holds the whole reduction
    (every value an exact integer), else the chunks' int32 results added."""
    dt = _exact_dtype(x.device)
    cin_g, kk = w.shape[1], w.shape[2] * w.shape[3]
    chunks = [(0, cin_g)] if dt == torch.float64 else _chunks(cin_g, kk)
    if len(chunks) == 1:
        return F.conv2d(x.to(dt), w.to(dt), None, stride, padding, dilation, groups)
    acc = None
    for c0, c1 in chunks:
        xs = _group_slice(x, groups, c0, c1, 1).to(dt)
        ws = w[:, c0:c1].to(dt)
        part = F.conv2d(xs, ws, None, stride, padding, dilation, groups).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def _as(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An exact accumulator (int32, or integer-valued fp32/fp64, any layout) as a contiguous ``dtype`` tensor in one
    copy. Every path's integer-valued float equals its int32 sum, so ``_as(acc, float32)`` is ``int32_sum.float()``
    bit for bit (both round the same integer to the nearest fp32)."""
    return acc.to(dtype, memory_format=torch.contiguous_format)


def int_conv2d(x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], groups: int, path: str | None = None) -> torch.Tensor:
    """Exact int32 ``conv2d(x, w)`` for int8 codes ``x[N,Ci,H,W]``, ``w[Co,Ci/g,kh,kw]``.

    ``path`` forces an implementation (`CONV_PATHS`); None takes `conv_path`. All paths give the same int32."""
    return _as(_conv2d_exact(x, w, stride, padding, dilation, groups, path), torch.int32)


def conv2d_acc(x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], groups: int, path: str | None = None) -> torch.Tensor:
    """``int_conv2d(...).float()`` without the int32 round trip where a path's own output is exact (oneDNN's fp32
    output, the single-chunk fp32 emulation): the accumulator the dequantize epilogue reads."""
    return _as(_conv2d_exact(x, w, stride, padding, dilation, groups, path), torch.float32)


def _conv2d_exact(x, w, stride, padding, dilation, groups, path):
    _check_codes(x, w)
    path = _resolve(path, "output", x.device, w.shape, stride, groups, x, w)
    if path == "onednn":
        return onednn_chunked(to_u8_nhwc(x), w, stride, padding, dilation, groups)
    if path == "int_mm":
        ho = _out_hw(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])
        wo = _out_hw(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])
        acc = _int_mm_conv(_nhwc_padded(x, padding), w, ho, wo, stride, dilation, groups)
        return _nchw(acc, x.shape[0], ho, wo)
    return _fp32_conv2d(x, w, stride, padding, dilation, groups)


def _zero_inserted(g: torch.Tensor, input_size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int], fill: int) -> torch.Tensor:
    """The transposed conv's input as a plain conv's: ``g[N,Co,Ho,Wo]`` with ``stride-1`` zeros between its
    positions, placed at offset ``P = d*(k-1) - p`` in an NHWC buffer of ``H + d*(k-1)`` rows (``fill`` elsewhere).

    ``grad_input[ih] = sum_k g[oh] w[k]`` over ``oh*s - p + k*d = ih``; with ``k' = K-1-k`` that is
    ``sum_k' buf[ih + k'*d] * flip(w)[k']`` for ``buf[P + oh*s] = g[oh]``: a stride-1 conv with dilation ``d``
    producing exactly ``H`` rows. Positions of ``g`` falling outside the buffer (``P < 0``, or a padding wider than
    the kernel's reach) only ever meet the padding and are dropped."""
    n, co, ho, wo = g.shape
    lens, sl_buf, sl_g = [], [], []
    for ax, o in ((0, ho), (1, wo)):
        k, s, d = int(kernel[ax]), int(stride[ax]), int(dilation[ax])
        off = d * (k - 1) - int(padding[ax])
        length = int(input_size[2 + ax]) + d * (k - 1)
        lo = max(0, -(off // s) if off < 0 else 0)  # first oh with off + oh*s >= 0
        hi = min(o, (length - 1 - off) // s + 1)   # one past the last oh with off + oh*s < length
        lens.append(length)
        sl_g.append(slice(lo, max(lo, hi)))
        sl_buf.append(slice(off + lo * s, off + lo * s + max(0, hi - lo - 1) * s + 1, s))
    buf = g.new_full((n, lens[0], lens[1], co), fill)
    if sl_g[0].stop > sl_g[0].start and sl_g[1].stop > sl_g[1].start:
        buf[:, sl_buf[0], sl_buf[1]] = g[:, :, sl_g[0], sl_g[1]].permute(0, 2, 3, 1)
    return buf


def _flipped_transposed(w: torch.Tensor, groups: int) -> torch.Tensor:
    """``w[Co,Ci/g,kh,kw]`` as the weight of the transposed conv: ``[Ci, Co/g, kh, kw]``, spatially flipped."""
    co, cig, kh, kw = w.shape
    wt = w.reshape(groups, co // groups, cig, kh, kw).transpose(1, 2).reshape(groups * cig, co // groups, kh, kw)
    return wt.flip(2, 3).contiguous()


def int_conv2d_input(input_size: Sequence[int], w: torch.Tensor, g: torch.Tensor, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int,
                     path: str | None = None) -> torch.Tensor:
    """Exact int32 gradient of ``conv2d`` w.r.t. its input (a transposed conv) for int8 ``w`` and ``g[N,Co,Ho,Wo]``.

    ``path`` forces an implementation (`CONV_PATHS`); None takes `conv_path`. All paths give the same int32."""
    return _as(_conv2d_input_exact(input_size, w, g, stride, padding, dilation, groups, path), torch.int32)


def conv2d_input_acc(input_size: Sequence[int], w: torch.Tensor, g: torch.Tensor, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int,
                     path: str | None = None) -> torch.Tensor:
    """``int_conv2d_input(...).float()``, as `conv2d_acc` is to `int_conv2d`."""
    return _as(_conv2d_input_exact(input_size, w, g, stride, padding, dilation, groups, path), torch.float32)


def _conv2d_input_exact(input_size, w, g, stride, padding, dilation, groups, path):
    _check_codes(w, g)
    path = _resolve(path, "grad_input", g.device, w.shape, stride, groups, w, g)
    if path in ("onednn", "int_mm"):
        n, ci, h, wd = (int(v) for v in input_size)
        wt = _flipped_transposed(w, groups)
        one = (1, 1)
        if path == "onednn":
            # uint8 zero-inserted buffer filled with the zero point 128 (code 0), channels_last as oneDNN wants
            buf = _zero_inserted(g.view(torch.uint8).bitwise_xor(128), input_size, w.shape[2:], stride, padding,
                                 dilation, 128)
            return onednn_chunked(buf.permute(0, 3, 1, 2), wt, one, (0, 0), dilation, groups)
        buf = _zero_inserted(g, input_size, w.shape[2:], stride, padding, dilation, 0)
        return _nchw(_int_mm_conv(buf, wt, h, wd, one, dilation, groups), n, h, wd)
    dt = _exact_dtype(g.device)
    cout, kk = w.shape[0], w.shape[2] * w.shape[3]
    cout_g = cout // groups
    chunks = [(0, cout_g)] if dt == torch.float64 else _chunks(cout_g, kk)
    acc = None
    for c0, c1 in chunks:
        gs = _group_slice(g, groups, c0, c1, 1).to(dt)
        ws = _group_slice(w, groups, c0, c1, 0).to(dt)
        part = torch.nn.grad.conv2d_input(list(input_size), ws, gs, stride, padding, dilation, groups)
        if len(chunks) == 1:  # one exact float conv: its integer values are the accumulator
            return part
        part = part.to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def _int_mm_conv2d_weight(x: torch.Tensor, size: list[int], g: torch.Tensor, stride, padding, dilation,
                          groups: int) -> torch.Tensor:
    """grad_weight as ``g^T[Co, N*Ho*Wo] @ im2col(x)[N*Ho*Wo, kh*kw*Ci/g]`` per group, int32 accumulation; the
    reduction is split every `INT32_K_LIMIT` positions so no single GEMM exceeds the int32-exact length."""
    co, cig, kh, kw = size
    n, _, ho, wo = g.shape
    m, cog = n * ho * wo, co // groups
    xp = _nhwc_padded(x, padding)
    gt = g.transpose(0, 1).reshape(co, m)  # [Co, N*Ho*Wo]: copies g once
    parts = []
    for gi in range(groups):
        cols = _im2col(xp, kh, kw, ho, wo, stride, dilation, gi * cig, (gi + 1) * cig)
        acc = None
        for m0 in range(0, m, INT32_K_LIMIT):
            part = int_gemm(gt[gi * cog:(gi + 1) * cog, m0:m0 + INT32_K_LIMIT].contiguous(),
                            cols[m0:m0 + INT32_K_LIMIT], path="int_mm")
            acc = part if acc is None else acc + part
        parts.append(acc)
    acc = parts[0] if groups == 1 else torch.cat(parts, 0)
    return acc.view(co, kh, kw, cig).permute(0, 3, 1, 2)


def int_conv2d_weight(x: torch.Tensor, weight_size: Sequence[int], g: torch.Tensor, stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], groups: int,
                      path: str | None = None) -> torch.Tensor:
    """Exact int32 gradient of ``conv2d`` w.r.t. its weight for int8 ``x`` and ``g``, reduced over N*Ho*Wo.

    ``path`` forces an implementation (`CONV_PATHS`; ``"onednn"`` has no weight-gradient kernel and runs
    ``"int_mm"``); None takes `conv_path`. All paths give the same int32."""
    return _as(_conv2d_weight_exact(x, weight_size, g, stride, padding, dilation, groups, path), torch.int32)


def conv2d_weight_acc(x: torch.Tensor, weight_size: Sequence[int], g: torch.Tensor, stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], groups: int,
                      path: str | None = None) -> torch.Tensor:
    """``int_conv2d_weight(...).float()``, as `conv2d_acc` is to `int_conv2d`."""
    return _as(_conv2d_weight_exact(x, weight_size, g, stride, padding, dilation, groups, path), torch.float32)


def _conv2d_weight_exact(x, weight_size, g, stride, padding, dilation, groups, path):
    _check_codes(x, g)
    n, positions = x.shape[0], g.shape[2] * g.shape[3]
    if g.shape[0] != n:
        raise ValueError(f"grad_output has {g.shape[0]} samples, the input {n}")
    size = [int(v) for v in weight_size]
    path = _resolve(path, "grad_weight", x.device, size, stride, groups, x, g)
    if path in ("onednn", "int_mm") and n > 0:
        return _int_mm_conv2d_weight(x, size, g, stride, padding, dilation, groups)
    dt = _exact_dtype(x.device)
    if dt == torch.float64 or positions > K_CHUNK:  # float64: exact for any realistic reduction length
        return torch.nn.grad.conv2d_weight(x.double(), size, g.double(), stride, padding, dilation, groups)
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


def output_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """``output`` from its fp32 accumulator (`conv2d_acc`): ``acc * x_scale[n] * w_scale[co] (+ bias[co])``."""
    out = acc * x_scale.reshape(-1, 1, 1, 1) * w_scale.reshape(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.float().reshape(1, -1, 1, 1)
    return out.to(out_dtype)


def input_epilogue(acc: torch.Tensor, g_scale: torch.Tensor, w_scale: torch.Tensor, groups: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``grad_input`` from its fp32 accumulator (`conv2d_input_acc`): ``acc * g_scale[n] * w_scale[ci]``."""
    sw = _per_channel(w_scale, 1, groups, True)  # per input channel of a group -> per input channel
    return (acc * g_scale.reshape(-1, 1, 1, 1) * sw.reshape(1, -1, 1, 1)).to(out_dtype)


def weight_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, g_scale: torch.Tensor, weight_size: Sequence[int],
                    groups: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``grad_weight`` from its fp32 accumulator (`conv2d_weight_acc`): ``acc * g_scale[co] * x_scale[ci]``."""
    cout, cin_g = int(weight_size[0]), int(weight_size[1])
    sx = x_scale.reshape(-1)
    # dW[o, j] uses input channel (group of o)*cin_g + j: per-channel input scales are gathered per group
    sx = sx.reshape(groups, cin_g).repeat_interleave(cout // groups, 0) if sx.numel() > 1 else sx.reshape(1, 1)
    return (acc * g_scale.reshape(-1, 1, 1, 1) * sx.reshape(sx.shape[0], sx.shape[1], 1, 1)).to(out_dtype)


def integer_operands(role: str, a: torch.Tensor, sa: torch.Tensor | None, b: torch.Tensor,
                     sb: torch.Tensor | None) -> bool:
    """True when the ``role`` GEMM runs as an exact integer conv with both scales in its epilogue (int8 codes on
    both sides, each scale constant along the reduction axes); else the reference convolves dequantized operands.
    Operands in the order the ``scaled_conv2d*`` functions take them after the int8 tensors' roles:
    ``output`` (input, weight), ``grad_input`` (grad_output, weight), ``grad_weight`` (input, grad_output)."""
    names = {"output": ("input", "weight"), "grad_input": ("grad_output", "weight"),
             "grad_weight": ("input", "grad_output")}[role]
    return _integer(a, sa, b, sb, role, names)


def scaled_conv2d(x: torch.Tensor, x_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor | None,
                  bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``conv2d(x_scale*x, w_scale*w) + bias``: exact integer conv with scales in the epilogue when possible."""
    if integer_operands("output", x, x_scale, w, w_scale):
        return output_epilogue(conv2d_acc(x, w, stride, padding, dilation, groups), x_scale, w_scale, bias,
                               out_dtype)
    out = F.conv2d(_deq(x, x_scale), _deq(w, w_scale), None, stride, padding, dilation, groups)
    if bias is not None:
        out = out + bias.float().reshape(1, -1, 1, 1)
    return out.to(out_dtype)


def scaled_conv2d_input(input_size: Sequence[int], w: torch.Tensor, w_scale: torch.Tensor | None, g: torch.Tensor,
                        g_scale: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int], groups: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gradient of ``conv2d`` w.r.t. its input from quantized ``g`` (grad_output) and ``w``."""
    if integer_operands("grad_input", g, g_scale, w, w_scale):
        acc = conv2d_input_acc(input_size, w, g, stride, padding, dilation, groups)
        return input_epilogue(acc, g_scale, w_scale, groups, out_dtype)
    out = torch.nn.grad.conv2d_input(list(input_size), _deq(w, w_scale), _deq(g, g_scale), stride, padding,
                                     dilation, groups)
    return out.to(out_dtype)


def scaled_conv2d_weight(x: torch.Tensor, x_scale: torch.Tensor | None, weight_size: Sequence[int], g: torch.Tensor,
                         g_scale: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                         dilation: Sequence[int], groups: int, out_dtype: torch.dtype = torch.float32
                         ) -> torch.Tensor:
    """Gradient of ``conv2d`` w.r.t. its weight from quantized ``x`` (input) and ``g`` (grad_output)."""
    if integer_operands("grad_weight", x, x_scale, g, g_scale):
        acc = conv2d_weight_acc(x, weight_size, g, stride, padding, dilation, groups)
        return weight_epilogue(acc, x_scale, g_scale, weight_size, groups, out_dtype)
    out = torch.nn.grad.conv2d_weight(_deq(x, x_scale), list(weight_size), _deq(g, g_scale), stride, padding,
                                      dilation, groups)
    return out.to(out_dtype)
