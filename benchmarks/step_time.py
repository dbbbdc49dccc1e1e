"""Training-step time of fqt vs FP32 eager, measured side by side in one run.

    .venv/bin/python benchmarks/step_time.py [--width 1024] [--batch 256] [--steps 20] [--device cuda]

A 3-layer MLP (Linear-ReLU x2 + Linear), MSE loss, SGD step. Rows: FP32 eager; fqt W8A8G8 with the eager graph
runner (the CPU reference path: quantize + exact fp32-emulated int8 GEMM); optionally fqt with Inductor
(``--inductor``). Prints median step time and the ratio to FP32 eager. CPU numbers say nothing about GPU speed.
With ``--device cuda`` the fqt rows run the codegen pass's fused Triton kernels (docs/kernels.md) and each step is
timed to a `torch.cuda.synchronize`; FP32 eager runs with TF32 off (true FP32).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn as nn


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


def bench(fn, model, x, t, steps: int) -> tuple[float, float]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    first = 0.0
    for i in range(steps + 1):
        _sync(x)
        t0 = time.perf_counter()
        loss = ((fn(x) - t) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(x)
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        else:
            times.append(dt)
    return statistics.median(times) * 1e3, first


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--inductor", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()
    torch.manual_seed(0)
    w = a.width
    torch.backends.cuda.matmul.allow_tf32 = False

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w)).to(a.device)

    x, t = torch.randn(a.batch, w, device=a.device), torch.randn(a.batch, w, device=a.device)
    rows = []
    m = make()
    rows.append(("fp32 eager", *bench(m, m, x, t, a.steps)))
    for name, opts in [("fqt W8A8G8 (eager graphs)", {"bits": "W8A8G8"}),
                       ("fqt W4A4G8 (eager graphs)", {"bits": "W4A4G8"})] + (
            [("fqt W8A8G8 (inductor)", {"bits": "W8A8G8", "compiler": "inductor"})] if a.inductor else []):
        torch._dynamo.reset()
        m = make()
        rows.append((name, *bench(torch.compile(m, backend="fqt", options=opts), m, x, t, a.steps)))
    base = rows[0][1]
    where = (torch.cuda.get_device_name() if a.device == "cuda"
             else f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"torch {torch.__version__}, {where}; MLP 3x{w}, batch {a.batch}, {a.steps} steps (median)")
    print("| config | step ms | vs fp32 eager | first step s |\n|---|---|---|---|")
    for name, ms, first in rows:
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x | {first:.2f} |")


if __name__ == "__main__":
    main()
