"""Integer GEMM with scales in the epilogue: the reference every GEMM kernel is tested against.

``int_gemm(a, b)`` computes the exact int32 product of int8 codes. On CPU two exact implementations exist and one
is chosen per machine (docs/kernels.md, "The CPU integer GEMM"):

* ``"int_mm"``: ``torch._int_mm`` (oneDNN/MKL int8 GEMM, int32 accumulation). On CPUs with int8 dot-product
  instructions (AVX-512 VNNI, AVX-VNNI, AMX) it is 3-5x faster than fp32 ``mm``; on AVX2-only CPUs it is a slow
  generic loop, 50-100x slower than fp32.
* ``"fp32"``: fp32 GEMM on the codes in K-chunks of at most 1024. Every partial sum is an integer below
  1024*127^2 < 2^24, so fp32 is exact, and it runs at fp32 speed.

Both give the same int32 result bit for bit, so the choice changes speed, never the numbers. `cpu_gemm_path` makes
it once per process: the CPU must report int8 dot-product instructions, and a small probe must show ``_int_mm``
exact and faster than fp32 ``mm``. ``FQTC_CPU_INT_GEMM=int_mm|fp32`` overrides it.

A batched product with a right operand per batch (attention's per-head ``bmm``) has no batched ``_int_mm``: the
``"int_mm"`` path loops over the batch. Where every per-batch product is small and ``K`` fits one exact fp32 chunk,
one fp32 batched GEMM on the codes is faster than that loop (`gemm_path`, measured in docs/kernels.md).
"""

from __future__ import annotations

import functools
import os
import time

import torch

K_CHUNK = 1024  # 1024 * 127 * 127 = 16,516,096 < 2**24: exact partial sums in fp32
# int32 accumulation holds K products of magnitude <= 128*128 while K*2^14 < 2^31
INT32_K_LIMIT = (1 << 31) // (128 * 128) - 1
CPU_GEMM_PATHS = ("int_mm", "fp32")
# per-batch products of at most this many multiply-adds (M*K*N) run as one fp32 batched GEMM where K <= K_CHUNK,
# instead of a loop of _int_mm calls (docs/kernels.md, "The CPU integer GEMM": 4x faster at 64x32x64 per batch,
# equal at 128x64x128 on 1 thread and 2.6x faster on 2, 1.8x slower at 512x64x512)
BMM_FP32_MACS = 1 << 21
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni")


def cpu_int8_dot_flags() -> list[str]:
    """The int8 dot-product instruction sets the CPU reports (``/proc/cpuinfo`` flags; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [fl for fl in _VNNI_FLAGS if fl in have]
    except OSError:
        pass
    return []


# `_int_mm` is taken unless the probe finds it this much slower than fp32 `mm`. On CPUs with int8 dot products it
# measured 0.3-0.5x of fp32 (docs/kernels.md); a CPU that lacks them is 50-100x slower (../shared/feasibility.md,
# section 3). The margin keeps a busy machine, whose timings swing by tens of percent, from flipping the choice.
PROBE_MARGIN = 1.5


def _min_ms(fn, reps: int = 9) -> float:
    """The fastest of ``reps`` timed calls: other processes only ever add time, so the minimum is the estimate of
    the kernel's own cost that load disturbs least."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


@functools.lru_cache(maxsize=1)
def probe_cpu_gemm() -> dict:
    """Decide the CPU integer GEMM once per process: capability, int8-dot flags and a ~10 ms probe.

    Returns ``{"path", "reason", "capability", "flags", "int_mm_ms", "fp32_ms"}`` (what `fqtc.explain` and the
    benchmarks print beside their timings). Safe to call while a graph is being traced: the probe runs on real
    tensors outside any fake or proxy mode."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return _probe()


def _probe() -> dict:
    cap = torch.backends.cpu.get_cpu_capability()
    flags = cpu_int8_dot_flags()
    info: dict = {"capability": cap, "flags": flags, "int_mm_ms": None, "fp32_ms": None}
    forced = os.environ.get("FQTC_CPU_INT_GEMM")
    if forced:
        if forced not in CPU_GEMM_PATHS:
            raise ValueError(f"FQTC_CPU_INT_GEMM={forced!r}: allowed values are {', '.join(CPU_GEMM_PATHS)}")
        return {**info, "path": forced, "reason": "forced by FQTC_CPU_INT_GEMM"}
    if not flags:
        return {**info, "path": "fp32", "reason": f"no int8 dot-product instructions (capability {cap})"}
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (128, 512), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (512, 256), dtype=torch.int8, generator=g)
    if not torch.equal(torch._int_mm(a, b), _fp32_gemm(a, b)):
        return {**info, "path": "fp32", "reason": "torch._int_mm is not exact on this CPU"}
    af, bf = a.float(), b.float()
    info["int_mm_ms"] = _min_ms(lambda: torch._int_mm(a, b))
    info["fp32_ms"] = _min_ms(lambda: torch.mm(af, bf))
    if info["int_mm_ms"] < PROBE_MARGIN * info["fp32_ms"]:
        return {**info, "path": "int_mm", "reason": f"int8 dot products ({', '.join(flags)}): _int_mm "
                f"{info['int_mm_ms']:.3f} ms vs fp32 mm {info['fp32_ms']:.3f} ms"}
    return {**info, "path": "fp32", "reason": f"_int_mm {info['int_mm_ms']:.3f} ms is over {PROBE_MARGIN}x fp32 "
            f"mm's {info['fp32_ms']:.3f} ms"}


def cpu_gemm_path() -> str:
    """``"int_mm"`` or ``"fp32"``: the exact CPU integer GEMM this process uses (`probe_cpu_gemm`)."""
    return probe_cpu_gemm()["path"]


def _fp32_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    k = a.shape[-1]
    if k <= K_CHUNK:
        return torch.matmul(a.float(), b.float()).to(torch.int32)
    acc = None
    for k0 in range(0, k, K_CHUNK):
        part = torch.matmul(a[..., k0 : k0 + K_CHUNK].float(), b[..., k0 : k0 + K_CHUNK, :].float()).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def _int_mm_2d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # int32 accumulation is exact while K*128^2 < 2^31 (K <= INT32_K_LIMIT); the int32 result type of both paths
    # carries the same bound
    return torch._int_mm(a, b)


def _int_mm_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dim() == 2 and b.dim() == 2:
        return _int_mm_2d(a, b)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if b.dim() == 2 or all(s == 1 for s in b.shape[:-2]):
        # a shared right operand (x[B,T,K] @ W[K,N]): one GEMM over all rows
        b2 = b.reshape(b.shape[-2], b.shape[-1])
        a_full = a.expand(*batch, *a.shape[-2:])
        out = _int_mm_2d(a_full.reshape(-1, a.shape[-1]), b2)
        return out.view(*batch, a.shape[-2], b.shape[-1])
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = torch.empty(a3.shape[0], a3.shape[1], b3.shape[2], dtype=torch.int32, device=a.device)
    for i in range(a3.shape[0]):  # attention's bmm: one int8 GEMM per (batch, head), written in place
        torch._int_mm(a3[i], b3[i], out=out[i])
    return out.view(*batch, a.shape[-2], b.shape[-1])


def _per_batch_rhs(a_shape, b_shape) -> bool:
    """True when ``a @ b`` has a right operand per batch (no single GEMM over all rows)."""
    return len(b_shape) > 2 and not all(s == 1 for s in b_shape[:-2]) and len(a_shape) >= 2


def gemm_path(a_shape, b_shape, path: str | None = None) -> str:
    """The exact implementation `int_gemm` runs on the CPU for int8 operands of these shapes: ``"int_mm"`` or
    ``"fp32"``.

    ``path`` forces one (tests run both on the same codes); None takes this machine's choice (`cpu_gemm_path`),
    except that a batched product with a right operand per batch takes ``"fp32"`` (one batched fp32 GEMM, exact:
    ``K <= K_CHUNK``) when each per-batch product has at most `BMM_FP32_MACS` multiply-adds, where the ``"int_mm"``
    path's loop of small ``_int_mm`` calls costs more than the arithmetic."""
    if path is not None:
        if path not in CPU_GEMM_PATHS:
            raise ValueError(f"unknown integer GEMM path {path!r}; allowed: {', '.join(CPU_GEMM_PATHS)}")
        return path
    chosen = cpu_gemm_path()
    if chosen == "int_mm" and _per_batch_rhs(a_shape, b_shape):
        m, k, n = a_shape[-2], a_shape[-1], b_shape[-1]
        if k <= K_CHUNK and m * k * n <= BMM_FP32_MACS:
            return "fp32"
    return chosen


def int_gemm(a: torch.Tensor, b: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """Exact int32 ``a @ b`` for int8 codes (2-D ``mm`` or batched, batch dims broadcast).

    ``path`` (CPU only): ``"int_mm"`` or ``"fp32"``; None takes `gemm_path`'s choice for these shapes on this
    machine. Both are exact, so the result does not depend on it. Other devices run the fp32-chunked form (the CUDA
    graphs use the Triton kernels in `fqtc.codegen` instead)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int_gemm expects int8 codes, got {a.dtype} and {b.dtype}")
    if path is not None and path not in CPU_GEMM_PATHS:
        raise ValueError(f"unknown integer GEMM path {path!r}; allowed: {', '.join(CPU_GEMM_PATHS)}")
    if a.numel() == 0 or b.numel() == 0:  # an empty batch, or K = 0: an (all-zero) int32 result of the right shape
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        return torch.zeros(*batch, a.shape[-2], b.shape[-1], dtype=torch.int32, device=a.device)
    if a.device.type == "cpu" and gemm_path(a.shape, b.shape, path) == "int_mm":
        return _int_mm_gemm(a, b)
    return _fp32_gemm(a, b)


def scale_along_k(a_scale: torch.Tensor | None, b_scale: torch.Tensor | None) -> bool:
    """True when a scale varies along the reduction axis, so scales cannot sit in the epilogue."""
    return (a_scale is not None and a_scale.dim() > 0 and a_scale.shape[-1] != 1) or (
        b_scale is not None and b_scale.dim() > 1 and b_scale.shape[-2] != 1
    )


def not_integer_reason(a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor,
                       b_scale: torch.Tensor | None) -> str | None:
    """Why ``scaled_gemm(a, a_scale, b, b_scale)`` multiplies dequantized floats instead of running the exact
    integer GEMM with scales in the epilogue, or None when it runs the integer GEMM. The one test every consumer
    uses (the reference below, the CUDA implementations, the codegen pass on fake values)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        return "an operand is not int8 codes (a partially quantized GEMM)"
    if a_scale is None or b_scale is None:
        return "an operand has no scale (full-precision operand)"
    if scale_along_k(a_scale, b_scale):
        return "a scale varies along the reduction axis (no epilogue scaling possible)"
    return None


def dequantize_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                        bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``acc * a_scale * b_scale + bias`` in fp32, cast to ``out_dtype``: the epilogue of an integer GEMM, in this
    operation order (kernels and the compiled CPU graphs reproduce it bit for bit)."""
    out = acc.float() * a_scale * b_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def scaled_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    b: torch.Tensor,
    b_scale: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(a_scale*a) @ (b_scale*b) + bias`` for int8 codes or float operands.

    Both operands int8 with scales constant along K: exact integer GEMM, then ``acc * a_scale * b_scale`` in fp32
    (the epilogue). Otherwise (a float operand, or a scale along K) the dequantized operands are multiplied in
    fp32: the same mathematical product of the quantized values, without an integer GEMM.
    """
    if not_integer_reason(a, a_scale, b, b_scale) is None:
        return dequantize_epilogue(int_gemm(a, b), a_scale, b_scale, bias, out_dtype)
    a_hp = a.float() if a_scale is None else a.float() * a_scale
    b_hp = b.float() if b_scale is None else b.float() * b_scale
    out = torch.matmul(a_hp, b_hp)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
