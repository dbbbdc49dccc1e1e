"""oneDNN's int8 convolution as an exact integer conv (the ``"onednn"`` path of `fqtc.quant.conv`).

oneDNN's int8 conv (``torch.ops.onednn.qconv2d_pointwise``) takes uint8 activations ``code + 128`` with zero point
128 and int8 weights, and returns fp32 with all scales 1.0. Its products are integer dot products accumulated in
int32 where the CPU has int8 dot products (VNNI/AMX); the only rounding step is the fp32 output, exact while the
sums stay within 2^24 (`ONEDNN_K_CHUNK`). docs/kernels.md, "The CPU integer convolution", has the measurements.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from fqtc.quant.gemm import K_CHUNK

# oneDNN's fp32 output is exact while both its uint8-domain accumulator sum((x+128)*w) and the zero-point
# compensation 128*sum(w) stay within 2^24, whichever of them it converts to fp32 first: 512*255*128 < 2^24.
# (At 585 taps of x=127, w=-127 its 3x3 kernel is off by one: it compensates in fp32.)
ONEDNN_K_CHUNK = 512




def channel_chunks(n: int, k_per_channel: int, limit: int = K_CHUNK) -> list[tuple[int, int]]:
    """Channel ranges whose reduction length ``channels * k_per_channel`` stays <= ``limit`` (at least 1 channel)."""
    step = max(1, limit // max(1, k_per_channel))
    if k_per_channel > limit:
        raise ValueError(f"a single channel's kernel window ({k_per_channel} taps) exceeds the exact fp32 bound "
                         f"K_CHUNK={K_CHUNK}; use a smaller kernel")
    return [(c0, min(n, c0 + step)) for c0 in range(0, n, step)]


def even_chunks(n: int, k_per_channel: int, limit: int) -> list[tuple[int, int]]:
    """`channel_chunks` with the same number of chunks but equal sizes (64 channels x 9 taps, limit 512: 32 + 32)."""
    count = len(channel_chunks(n, k_per_channel, limit))
    size = -(-n // count)
    return [(c0, min(n, c0 + size)) for c0 in range(0, n, size)]


def group_slice(t: torch.Tensor, groups: int, c0: int, c1: int, dim: int) -> torch.Tensor:
    """Channels [c0, c1) of every group along ``dim`` (group-major channel layout, as conv uses)."""
    shape = list(t.shape)
    per = shape[dim] // groups
    v = t.reshape(*shape[:dim], groups, per, *shape[dim + 1:]).narrow(dim + 1, c0, c1 - c0)
    return v.reshape(*shape[:dim], groups * (c1 - c0), *shape[dim + 1:])


def onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def onednn_conv(xu: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int) -> torch.Tensor:
    """oneDNN int8 conv of ``xu`` (uint8 = code + 128, zero point 128) and int8 ``w``; fp32 output, scales 1.0.

    The accumulator is int32 (u8 x s8 dot products; padding is filled with the zero point, i.e. code 0); its
    conversion to fp32 is exact while
    ``|acc| <= 2^24``. The zero-point compensation ``128*sum(w)`` may be subtracted after that conversion (measured:
    the 3x3 kernel is off by one at 585 taps of ``x=127, w=-127``), so callers chunk the reduction to
    `ONEDNN_K_CHUNK` taps, where the uint8-domain sum is below 2^24 too. The output is channels_last."""
    co = w.shape[0]
    ones = torch.ones(co, dtype=torch.float32)
    zps = torch.zeros(co, dtype=torch.int64)
    st, pd, dl = [int(v) for v in stride], [int(v) for v in padding], [int(v) for v in dilation]
    packed = torch.ops.onednn.qconv_prepack(w.contiguous(), ones, 1.0, 128, st, pd, dl, groups, list(xu.shape))
    return torch.ops.onednn.qconv2d_pointwise(xu, 1.0, 128, packed, ones, zps, None, st, pd, dl, groups, 1.0, 0,
                                              torch.float32, "none", [], None)


def to_u8_nhwc(x: torch.Tensor) -> torch.Tensor:
    """int8 codes -> uint8 ``code + 128`` in channels_last: flipping the sign bit adds 128 modulo 256."""
    return x.view(torch.uint8).bitwise_xor(128).contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=1)
def probe_onednn_conv() -> str | None:
    """Why oneDNN's int8 conv cannot be used on this machine, or None when it can (checked once per process).

    Without int8 dot-product instructions oneDNN multiplies u8 x s8 pairs with ``vpmaddubsw``, which saturates the
    int16 pair sums; so the path follows the GEMM's choice (`fqtc.quant.gemm.cpu_gemm_path` is ``"int_mm"`` only
    where the CPU has VNNI/AMX) and full-range probes must equal the exact result, including constant extremes at
    `ONEDNN_K_CHUNK` taps (the largest reduction `onednn_chunked` hands it). Safe to call while a graph is being
    traced (as `fqtc.quant.gemm.probe_cpu_gemm`): the probe runs on real tensors outside any fake or proxy mode."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return _probe_onednn()


def _probe_onednn() -> str | None:
    if not onednn_available():
        return "torch.ops.onednn.qconv2d_pointwise is not available in this torch build"
    g = torch.Generator().manual_seed(0)
    cases = [
        (torch.randint(-128, 128, (2, 16, 7, 7), dtype=torch.int8, generator=g),
         torch.randint(-128, 128, (8, 16, 3, 3), dtype=torch.int8, generator=g), (2, 2), (1, 1), (1, 1), 1),
        (torch.randint(-128, 128, (2, 8, 7, 7), dtype=torch.int8, generator=g),
         torch.randint(-128, 128, (8, 1, 3, 3), dtype=torch.int8, generator=g), (1, 1), (2, 2), (2, 2), 8),
    ]
    for xv, wv in ((127, -127), (-128, -128), (127, 127)):  # the extremes at the chunk bound, 3x3 and 1x1
        cases.append((torch.full((1, ONEDNN_K_CHUNK // 9, 5, 5), xv, dtype=torch.int8),
                      torch.full((2, ONEDNN_K_CHUNK // 9, 3, 3), wv, dtype=torch.int8), (1, 1), (0, 0), (1, 1), 1))
        cases.append((torch.full((1, ONEDNN_K_CHUNK, 2, 2), xv, dtype=torch.int8),
                      torch.full((2, ONEDNN_K_CHUNK, 1, 1), wv, dtype=torch.int8), (1, 1), (0, 0), (1, 1), 1))
    try:
        for x, w, st, pd, dl, gr in cases:
            got = onednn_conv(to_u8_nhwc(x), w, st, pd, dl, gr).double()
            if not torch.equal(got, F.conv2d(x.double(), w.double(), None, st, pd, dl, gr)):
                return "oneDNN's int8 conv is not exact on this CPU"
    except RuntimeError as e:  # no oneDNN int8 kernel for this CPU / build
        return f"oneDNN's int8 conv failed: {e}"
    return None


def onednn_chunked(xu: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Exact accumulator of a conv through `onednn_conv`, input channels chunked so every reduction is <=
    ONEDNN_K_CHUNK: oneDNN's fp32 output (channels_last) for one chunk, the chunks' int32 results added else."""
    cin_g, kk = w.shape[1], w.shape[2] * w.shape[3]
    chunks = even_chunks(cin_g, kk, ONEDNN_K_CHUNK)
    if len(chunks) == 1:
        return onednn_conv(xu, w, stride, padding, dilation, groups)
    acc = None
    for c0, c1 in chunks:
        xs = group_slice(xu, groups, c0, c1, 1).contiguous(memory_format=torch.channels_last)
        part = onednn_conv(xs, w[:, c0:c1], stride, padding, dilation, groups).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


