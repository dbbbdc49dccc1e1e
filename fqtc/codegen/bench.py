"""``fqtc bench kernels``: modelled (analytic) memory traffic and FLOPs of each Triton kernel vs the minimum, and on
CUDA the measured time and TFLOP/s (``triton.testing.do_bench``).

The traffic figures are a model, not a measurement: nothing here counts bytes on a device. A kernel written to read
each input once is modelled at the minimum by construction (its design bytes are its input and output bytes), so a
1.00x row says the code is laid out to read once, not that a GPU was seen doing it; only the CUDA timing columns are
measured. The traffic model counts DRAM bytes. The minimum reads every input once and writes every output once. The
design figure follows the kernel's code as the codegen pass launches it: the read-once paths hold a whole row
(column) in one tile; a scale whose group does not fit one tile (per tensor, long rows, tall columns) and BHQ's row
ranges take the group abs-max from the input's producer (`fqtc.codegen.lower`: an ``aten.amax`` Inductor fuses into
the producer's kernel), so the kernel reads its input once and the statistic (4 bytes per group) is one more input;
a GEMM reads each operand once from DRAM with tile re-reads served by L2 under grouped ordering (``GROUP_M`` row
slabs of A and the matching B panels in flight must fit in L2; when they do not, the model charges the prologue's
amax sweep a second read of A). Rows marked "own statistic" are the same kernels called without the producer's
statistic (direct API use), and ``stat/amax (standalone)`` is what the statistic costs when the producer is a graph
input or an extern kernel that Inductor cannot fuse it into. docs/kernels.md explains each line.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

L2_BYTES = 50 * 2**20  # H100 SXM L2 (50 MiB): the budget the grouped-ordering working set must fit
SMS = 132  # H100 SXM streaming multiprocessors: programs in flight per wave
FUSED_RATIO_LIMIT = 1.1  # bound for every fused kernel (docs/kernels.md, "Traffic model")

_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


@dataclass
class KernelModel:
    """One kernel at one shape: design and minimum DRAM bytes, FLOPs (integer MACs count 2), and what it fuses."""

    kernel: str
    shape: str
    bytes: float
    min_bytes: float
    flops: float
    fused: bool
    note: str = ""
    run: Callable[[], object] | None = None  # CUDA only: launches the kernel (timed by do_bench)

    @property
    def ratio(self) -> float:
        return self.bytes / self.min_bytes


def _producer(of: str = "x") -> str:
    """Note of a kernel whose statistic comes from its input's producer (`fqtc.codegen.lower`)."""
    return f"amax from the producer (aten.amax fused into {of}'s producer by Inductor)"


def _quantize_models(R: int, C: int, dt: str, max_block: int, tile: int) -> list[KernelModel]:
    e = _SIZE[dt]
    shape = f"{R}x{C} {dt}"
    out = []
    # per row: read x once (the row fits one tile, or the row amax comes from the producer), write codes + scales
    given = 0 if C <= max_block else 4 * R  # the producer's statistic: one fp32 per row
    note = "read-once: the row fits one tile" if not given else f"row > MAX_BLOCK: {_producer()}"
    b = e * R * C + R * C + 4 * R + given
    out.append(KernelModel("quantize/row", shape, b, b, 0, True, note))
    b = e * R * C + R * C / 2 + 4 * R + given
    out.append(KernelModel("quantize/row/int4", shape, b, b, 0, True, "packed 2 codes/byte; " + note))
    block_r = max(2, tile // min(128, max_block))
    given = 0 if R <= block_r else 4 * C
    b = e * R * C + R * C + 4 * C + given
    out.append(KernelModel("quantize/col", shape, b, b, 0, True,
                           "read-once: the column fits one tile" if not given else f"column > one tile: {_producer()}"))
    b = e * R * C + R * C + 4 + 4
    out.append(KernelModel("quantize/tensor", shape, b, b, 0, True, _producer()))
    out.append(KernelModel("quantize/tensor (own statistic)", shape, 2 * e * R * C + R * C + 4, e * R * C + R * C + 4,
                           0, False, "no amax given: partial-amax pass + quantize pass, x read twice"))
    out.append(KernelModel("stat/amax (standalone)", shape, e * R * C + 4, e * R * C + 4, 0, False,
                           "the statistic when x's producer is a graph input or an extern kernel: one read of x"))
    return out


def _gemm_models(M: int, N: int, K: int, a_dt: str, out_dt: str, bm: int, bn: int, group: int) -> list[KernelModel]:
    ea, eo = _SIZE[a_dt], _SIZE[out_dt]
    flops = 2.0 * M * N * K
    shape = f"{M}x{N}x{K} a:{a_dt} out:{out_dt}"
    b_bytes = K * N + 4 * N  # int8 weight codes + per-column scale
    bias = eo * N
    out_bytes = eo * M * N
    res = []
    # plain int8 GEMM: every operand once
    a_codes = M * K + 4 * M
    g = a_codes + b_bytes + bias + out_bytes
    res.append(KernelModel("gemm/int8", shape, g, g, flops, False, "scales, bias, cast in the epilogue"))
    # working set of one wave under grouped ordering: GROUP_M slabs of A (float) + the B panels of the wave
    n_panels = max(1, min(SMS // max(1, min(group, -(-M // bm))), -(-N // bn)))
    ws = min(group, -(-M // bm)) * bm * K * ea + n_panels * bn * K
    l2_ok = ws <= L2_BYTES
    fused_min = ea * M * K + b_bytes + bias + out_bytes + M * K + 4 * M  # + the activation codes/scales written
    sweep_extra = 0 if l2_ok else ea * M * K
    res.append(KernelModel("gemm/fused_quant/row", shape, fused_min + 4 * M, fused_min + 4 * M, flops, True,
                           "row " + _producer("A")
                           + "; A from an extern kernel or graph input: the own-statistic line"))
    res.append(KernelModel("gemm/fused_quant/row (own statistic)", shape, fused_min + sweep_extra, fused_min, flops,
                           False, f"no amax given: row sweep in L2 (wave working set {ws / 2**20:.1f} MiB "
                                  f"{'<=' if l2_ok else '>'} L2 {L2_BYTES / 2**20:.0f} MiB)"))
    res.append(KernelModel("gemm/fused_quant/tensor", shape, fused_min + 4, fused_min + 4, flops, True,
                           "per-tensor " + _producer("A")))
    res.append(KernelModel("gemm/fused_quant/tensor (own statistic)", shape, fused_min + ea * M * K, fused_min, flops,
                           False, "no amax given: a partial-amax pass over A before any tile is quantized"))
    unfused = (ea * M * K + M * K + 4 * M) + (M * K + 4 * M + b_bytes + bias + out_bytes)
    res.append(KernelModel("chain quantize/row + gemm", shape, unfused, fused_min, flops, False,
                           "unfused reference of the line above: codes written then re-read"))
    rq_min = ea * M * K + b_bytes + bias + M * N + 4 * M + M * K + 4 * M + 4 * M
    res.append(KernelModel("gemm/fused_quant/row+requant", shape, rq_min, rq_min, flops, True,
                           "output kept only as int8 codes + row scales (N <= MAX_REQUANT_N); row amax from A's "
                           "producer"))
    return res


def _grad_lwq_models(M: int, N: int, K: int, g_dt: str) -> list[KernelModel]:
    """Gradient quantizers on the M x K grad_output, and the LWQ update of the N x K weight (W4, L4, SGD)."""
    eg = _SIZE[g_dt]
    res = []
    shape = f"{M}x{K} {g_dt}"
    psq = eg * M * K + M * K + 4 * M
    res.append(KernelModel("gradq/psq", shape, psq, psq, 0, True, "per-row quantize kernel, gradient NaN policy"))
    # BHQ: the fused kernel reads g once (its 3 passes re-read one group's rows from L1/L2) and writes fp32 once;
    # the transform is built from the row ranges, which come from g's producer (4 bytes per row)
    bhq_min = eg * M * K + 4 * M * K + 4 * M
    res.append(KernelModel("gradq/bhq", shape, bhq_min, bhq_min, 0, True,
                           "row ranges: " + _producer("g")))
    res.append(KernelModel("gradq/bhq (own statistic)", shape, bhq_min - 4 * M + eg * M * K, bhq_min - 4 * M, 0,
                           False, "no row ranges given: one more read of g to build the transform"))
    wshape = f"{N}x{K} W4L4 grad:{g_dt}"
    lwq = N * K / 2 + N * K / 2 + 4 * N + eg * N * K  # packed q, packed r, scales, gradient
    lwq_out = N * K / 2 + N * K / 2 + 4 * N
    res.append(KernelModel("lwq_update/sgd", wshape, lwq + lwq_out, lwq + lwq_out, 0, True,
                           "decode, step, refresh, re-encode: each byte once"))
    mom = lwq + lwq_out + 8 * N * K  # + fp32 momentum read and written
    res.append(KernelModel("lwq_update/sgd+momentum", wshape, mom, mom, 0, True, "fp32 momentum buffer in place"))
    adamw = lwq + lwq_out + 16 * N * K  # + fp32 m and v, each read and written
    res.append(KernelModel("lwq_update/adamw", wshape, adamw, adamw, 0, True,
                           "fp32 m and v in place; sqrt in fp64 as the reference"))
    return res


def _conv_models(n: int, c: int, h: int, w: int, co: int, k: int, out_dt: str) -> list[KernelModel]:
    """The three implicit-GEMM conv kernels of `fqtc.codegen.conv` on a stride-1 'same' k x k convolution.

    DRAM model: a kernel gathers every (position, tap) pair with its own load, so its A operand is served to the
    SMs ``k*k`` times per N tile (the virtual im2col matrix); those re-reads come from L2 when the input rows the
    programs of two consecutive waves touch fit in L2 (a window's other taps are read by the same or a
    neighbouring row block, a few programs apart). When they do not, the model charges every re-read to DRAM.
    ``grad_weight`` has few programs (no split-K): those of one wave stream the whole reduction side by side, so
    each wave reads ``x`` and ``g`` once.
    """
    from fqtc.codegen.conv import CONFIGS

    eo = _SIZE[out_dt]
    shape = f"{n}x{c}x{h}x{w}->{co} k{k}"
    x, wc, y = n * c * h * w, co * c * k * k, n * co * h * w  # int8 elements: input, weight, grad_output
    flops = 2.0 * n * h * w * co * c * k * k

    def cfg(cols: int) -> tuple[int, int]:
        return CONFIGS["narrow_n" if cols <= 64 else "large"][:2]

    def gather(rows: int, cols: int, chans: int, src: int) -> tuple[float, str, bool]:
        """DRAM bytes of a gathered operand ``src`` (rows = positions, chans = channels gathered per position)."""
        bm, bn = cfg(cols)
        n_tiles = -(-cols // bn)
        per_wave = min(rows, SMS * bm // n_tiles)  # positions of the row blocks in flight
        ws = 2 * per_wave * chans + k * k * chans * cols  # two waves' input rows + the weight
        fits = ws <= L2_BYTES
        reread = k * k * n_tiles
        note = (f"gathers {reread}x from L2 ({k * k} taps x {n_tiles} N tile(s)); DRAM once: 2-wave footprint "
                f"{ws / 2**20:.1f} MiB <= L2" if fits else
                f"2-wave footprint {ws / 2**20:.1f} MiB > L2: every one of the {reread} gathers from DRAM")
        return (src if fits else src * reread), note, fits

    res = []
    a, note, _ = gather(n * h * w, co, c, x)
    fwd_min = x + wc + 4 * n + 4 * co + eo * co + eo * y  # codes, weight, scales, bias, NCHW output
    res.append(KernelModel("conv/output (implicit gemm)", shape, fwd_min - x + a, fwd_min, flops, True, note))
    a, note, _ = gather(n * h * w, c, co, y)
    gi_min = y + wc + 4 * n + 4 * c + eo * x
    res.append(KernelModel("conv/grad_input (implicit gemm)", shape, gi_min - y + a, gi_min, flops, True, note))
    bm, bn = cfg(c * k * k)
    progs = -(-co // bm) * -(-(c * k * k) // bn)
    waves = -(-progs // SMS)
    gw_min = x + y + 4 * c + 4 * co + eo * wc
    res.append(KernelModel("conv/grad_weight (implicit gemm)", shape, gw_min + (waves - 1) * (x + y), gw_min, flops,
                           True, f"{progs} programs ({waves} wave{'s' if waves > 1 else ''}) stream N*H*W: "
                                 f"x, g read once per wave; no split-K"))
    return res


CONV_SHAPES = [(32, 64, 56, 56, 64, 3), (32, 256, 14, 14, 256, 3)]  # ResNet-50 stage-1/3 3x3 convs


def models(shapes: list[tuple[int, int, int]], a_dtype: str = "bf16", out_dtype: str = "bf16",
           conv_shapes: list[tuple[int, int, int, int, int, int]] | None = None) -> list[KernelModel]:
    """Analytic models of every kernel at the given (M, N, K) shapes and conv shapes ``(N, C, H, W, C_out, k)``
    (default `CONV_SHAPES`), with H100 tile configs."""
    from fqtc.codegen.gemm import CONFIGS, GROUP_M, MAX_REQUANT_N, shape_class
    from fqtc.codegen.quantize import MAX_BLOCK, TILE_ELEMS

    res: list[KernelModel] = []
    for M, N, K in shapes:
        res += _quantize_models(M, K, a_dtype, MAX_BLOCK, TILE_ELEMS)
        bm, bn = CONFIGS[shape_class(M)][:2]  # the class default (before autotuning)
        res += [m for m in _gemm_models(M, N, K, a_dtype, out_dtype, bm, bn, GROUP_M)
                if "requant" not in m.kernel or N <= MAX_REQUANT_N]
        res += _grad_lwq_models(M, N, K, a_dtype)
    for cs in CONV_SHAPES if conv_shapes is None else conv_shapes:
        res += _conv_models(*cs, out_dtype)
    return res


def _attach_runs(ms: list[KernelModel], shapes, a_dtype: str, out_dtype: str, device: str = "cuda",
                 conv_shapes: list[tuple[int, int, int, int, int, int]] | None = None) -> None:
    """Give each model a closure that launches its kernel on ``device`` (tests use the interpreter on CPU)."""
    import torch

    from fqtc.codegen import gemm as kg
    from fqtc.codegen import gradq as kgq
    from fqtc.codegen import quantize as kq

    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    exact: dict[tuple[str, str], Callable[[], object]] = {}  # (kernel, shape) for rows not keyed by M
    for M, N, K in shapes:
        exact.update(_lwq_runs(N, K, tdt[a_dtype], a_dtype, device))
    for cs in CONV_SHAPES if conv_shapes is None else conv_shapes:
        exact.update(_conv_runs(*cs, tdt[out_dtype], device))
    for m in ms:
        if (m.kernel, m.shape) in exact:
            m.run = exact[(m.kernel, m.shape)]
    for M, N, K in shapes:
        x = torch.randn(M, K, device=device, dtype=tdt[a_dtype])
        w8, sw = kq.quantize(torch.randn(K, N, device=device), 8, [0])
        x8, sx = kq.quantize(x, 8, [1])
        step = torch.zeros((), dtype=torch.int64, device=device)
        # the producer statistics the codegen pass supplies (launched as the pass would: given where it gives them)
        a_t = x.abs().amax(dim=(0, 1), keepdim=True)
        a_rows = x.abs().amax(dim=1, keepdim=True)
        a_r = x.abs().amax(dim=1, keepdim=True) if K > kq.MAX_BLOCK else None
        a_c = x.abs().amax(dim=0, keepdim=True) if M > kq.col_block(M, K)[0] else None
        runs = {
            "quantize/row": lambda x=x, a=a_r: kq.quantize(x, 8, [1], "stochastic", seed=0, step=0, stream=0, amax=a),
            "quantize/row/int4": lambda x=x, a=a_r: kq.quantize(x, 4, [1], "stochastic", seed=0, step=0, stream=0,
                                                                pack_int4=True, amax=a),
            "quantize/col": lambda x=x, a=a_c: kq.quantize(x, 8, [0], "stochastic", seed=0, step=0, stream=0, amax=a),
            "quantize/tensor": lambda x=x, a=a_t: kq.quantize(x, 8, [0, 1], "stochastic", seed=0, step=0, stream=0,
                                                              amax=a),
            "quantize/tensor (own statistic)": lambda x=x: kq.quantize(x, 8, [0, 1], "stochastic", seed=0, step=0,
                                                                       stream=0),
            # one reduction kernel computing max |x| (what Inductor emits for a standalone aten.amax(aten.abs(x)))
            "stat/amax (standalone)": lambda x=x: torch.linalg.vector_norm(x, float("inf")),
            "gemm/int8": lambda: kg.scaled_gemm(x8, sx, w8, sw, None, tdt[out_dtype]),
            "gemm/fused_quant/row": lambda: kg.qgemm_fused_quant(x, 8, [1], "stochastic", 0, 0, step, w8, sw, None,
                                                                 tdt[out_dtype], amax=a_rows),
            "gemm/fused_quant/row (own statistic)": lambda: kg.qgemm_fused_quant(
                x, 8, [1], "stochastic", 0, 0, step, w8, sw, None, tdt[out_dtype]),
            "gemm/fused_quant/tensor": lambda: kg.qgemm_fused_quant(x, 8, [0, 1], "stochastic", 0, 0, step, w8, sw,
                                                                    None, tdt[out_dtype], amax=a_t),
            "gemm/fused_quant/tensor (own statistic)": lambda: kg.qgemm_fused_quant(
                x, 8, [0, 1], "stochastic", 0, 0, step, w8, sw, None, tdt[out_dtype]),
            "gemm/fused_quant/row+requant": lambda: kg.qgemm_fused_quant(
                x, 8, [1], "stochastic", 0, 0, step, w8, sw, None, tdt[out_dtype], requant=kg.Requant(8), amax=a_rows),
            "gradq/psq": lambda x=x: kgq.grad_quantize(x, "psq", 4, [-1], "stochastic", 0, step, 0),
            "gradq/bhq": lambda x=x: kgq.bhq(x, 4, [-1], "stochastic", 0, step, 0, a_rows),
            "gradq/bhq (own statistic)": lambda x=x: kgq.bhq(x, 4, [-1], "stochastic", 0, step, 0),
        }
        for m in ms:
            if m.shape.startswith(f"{M}x") and m.kernel in runs:
                m.run = runs[m.kernel]


def _lwq_runs(N: int, K: int, g_dtype, g_dt: str, device: str) -> dict:
    """Closures for the LWQ update rows (W4L4 N x K weight, updated in place at every call)."""
    import torch

    from fqtc.codegen import lwq as klwq
    from fqtc.optim.latent import LatentWeight

    lw = LatentWeight.from_float(torch.randn(N, K, device=device) * 0.05, wbits=4, lbits=4)
    grad = torch.randn(N, K, device=device, dtype=g_dtype) * 1e-3
    step = torch.ones((), dtype=torch.int64, device=device)
    skip = torch.zeros((), dtype=torch.bool, device=device)
    buf = [torch.zeros(N, K, device=device)]
    mv = [torch.zeros(N, K, device=device), torch.zeros(N, K, device=device)]
    shape = f"{N}x{K} W4L4 grad:{g_dt}"

    def run(kind, hp, states):
        return lambda: klwq.lwq_update(lw.q, lw.r, lw.s, lw.mu, grad, states, kind, hp, [N, K], 4, 4, 0, 0, step,
                                       skip, True, 0)

    return {("lwq_update/sgd", shape): run("sgd", [1e-3, 0.0, 0.0, 1e-4, 0.0], []),
            ("lwq_update/sgd+momentum", shape): run("sgd", [1e-3, 0.9, 0.0, 1e-4, 0.0], buf),
            ("lwq_update/adamw", shape): run("adamw", [1e-3, 0.9, 0.999, 1e-8, 1e-2], mv)}


def _conv_runs(n: int, c: int, h: int, w: int, co: int, k: int, out_dtype, device: str) -> dict:
    """Closures for the implicit-GEMM conv rows (stride 1, 'same' padding, the default scale layouts)."""
    import torch

    from fqtc.codegen import conv as kc
    from fqtc.codegen import quantize as kq

    x8, sx = kq.quantize(torch.randn(n, c * h * w, device=device), 8, [1])  # per sample
    w8, sw = kq.quantize(torch.randn(co, c * k * k, device=device), 8, [1])  # per output channel
    g8, sg = kq.quantize(torch.randn(n, co * h * w, device=device), 8, [1])  # per sample
    x8, w8, g8 = x8.view(n, c, h, w), w8.view(co, c, k, k), g8.view(n, co, h, w)
    sx, sw, sg = sx.view(n, 1, 1, 1), sw.view(co, 1, 1, 1), sg.view(n, 1, 1, 1)
    sxc = torch.rand(1, c, 1, 1, device=device)  # grad_weight: per input channel
    sgc = torch.rand(1, co, 1, 1, device=device)  # grad_weight: per output channel
    swi = torch.rand(1, c, 1, 1, device=device)  # grad_input: per input channel
    bias = torch.randn(co, device=device)
    p, one = (k // 2, k // 2), (1, 1)
    shape = f"{n}x{c}x{h}x{w}->{co} k{k}"
    return {
        ("conv/output (implicit gemm)", shape): lambda: kc.scaled_conv2d(x8, sx, w8, sw, bias, one, p, one,
                                                                         out_dtype=out_dtype),
        ("conv/grad_input (implicit gemm)", shape): lambda: kc.scaled_conv2d_input(
            [n, c, h, w], w8, swi, g8, sg, one, p, one, out_dtype=out_dtype),
        ("conv/grad_weight (implicit gemm)", shape): lambda: kc.scaled_conv2d_weight(
            x8, sxc, [co, c, k, k], g8, sgc, one, p, one, out_dtype=out_dtype),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fqtc bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", default=None, metavar="MxNxK",
                   help="GEMM shape (repeatable); quantize kernels run on the MxK activation. "
                        "Default: 4096x4096x4096, 8192x11008x4096, 16x4096x4096, 4096x256x4096")
    p.add_argument("--a-dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--out-dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args(argv)
    shapes_txt = args.shape or ["4096x4096x4096", "8192x11008x4096", "16x4096x4096", "4096x256x4096"]
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in shapes_txt]
        assert all(len(s) == 3 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        p.error(f"--shape takes MxNxK with positive integers, got {shapes_txt}")
    ms = models(shapes, args.a_dtype, args.out_dtype)

    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        _attach_runs(ms, shapes, args.a_dtype, args.out_dtype)
    hdr = f"{'kernel':40} {'shape':30} {'MB moved':>10} {'MB min':>10} {'ratio':>6} {'GFLOP':>8}"
    hdr += f" {'ms':>8} {'TFLOP/s':>8} {'TB/s':>6}" if cuda else ""
    print(hdr)
    print("-" * len(hdr))
    bad = []
    for m in ms:
        line = (f"{m.kernel:40} {m.shape:30} {m.bytes / 1e6:10.2f} {m.min_bytes / 1e6:10.2f} {m.ratio:6.2f} "
                f"{m.flops / 1e9:8.1f}")
        if cuda and m.run is not None:
            import triton.testing

            t = triton.testing.do_bench(m.run)
            line += f" {t:8.3f} {m.flops / t / 1e9:8.1f} {m.bytes / t / 1e9:6.2f}"
        print(line + f"  {m.note}")
        if m.fused and m.ratio > FUSED_RATIO_LIMIT:
            bad.append(m)
    print()
    print(f"fused kernels modelled over {FUSED_RATIO_LIMIT}x the minimum: "
          + (", ".join(f"{m.kernel} {m.shape} ({m.ratio:.2f}x)" for m in bad) if bad else "none"))
    if not cuda:
        print("no CUDA device: measured time and TFLOP/s are skipped (traffic columns are modelled, not measured)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
