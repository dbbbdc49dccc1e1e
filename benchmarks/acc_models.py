"""Accuracy section ``models``: FP32 vs fqt W8A8G8 vs W4A4G8 on real data.

* Fashion-MNIST, `SmallCNN` (two 3x3 conv layers + two Linear): test accuracy after the same number of steps,
  same initialisation, same batches. Target: W8A8G8 within 0.5 point of FP32.
* KJV text, char-level `CharGPT` (SDPA attention, tied embedding head): validation loss on the held-out last 6
  books. Target: W8A8G8 within 2% of FP32.

FP32 is the eager model; fqt runs are ``torch.compile(model, backend="fqt", options={"bits": ...})``; every
conv, Linear and attention GEMM, forward and backward, is quantized (tests/compile/test_models.py checks that).
Evaluation runs the compiled model (quantized forward) in eval mode. A training-curve PNG per task is written
to ``--out``.

    python -m benchmarks.accuracy --section models [--quick] [--tasks cnn,gpt] [--configs fp32,W8A8G8,W4A4G8]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import fqtc
from benchmarks import data as bdata
from benchmarks import models as bmodels

CONFIGS = ("fp32", "W8A8G8", "W4A4G8")
TARGETS = {"cnn": ("W8A8G8", 0.5), "gpt": ("W8A8G8", 2.0)}  # config, allowed gap (points / percent)


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models section")
    g.add_argument("--tasks", default="cnn,gpt", help="comma list of cnn (Fashion-MNIST), gpt (KJV)")
    g.add_argument("--configs", default=",".join(CONFIGS), help="comma list of fp32 and fqt bit strings")
    g.add_argument("--cnn-train", type=int, default=None, help="training images (default all 60k; quick 12k)")
    g.add_argument("--cnn-epochs", type=float, default=None, help="epochs (default 3; quick 2)")
    g.add_argument("--cnn-batch", type=int, default=128)
    g.add_argument("--gpt-steps", type=int, default=None, help="training steps (default 2000; quick 400)")
    g.add_argument("--gpt-dim", type=int, default=None, help="model width (default 128; quick 64)")
    g.add_argument("--gpt-layers", type=int, default=None, help="layers (default 4; quick 2)")
    g.add_argument("--gpt-seq", type=int, default=None, help="sequence length (default 128; quick 64)")
    g.add_argument("--gpt-batch", type=int, default=32)
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def _compile(model: torch.nn.Module, config: str) -> Callable:
    if config == "fp32":
        return model
    return fqtc.compile(model, {"bits": config, "seed": 0})


def _plot(curves: dict[str, list[tuple[int, float]]], title: str, ylabel: str, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smooth(pts: list[tuple[int, float]], k: int = 20) -> list[tuple[int, float]]:
    out, acc = [], []
    for s, v in pts:
        acc.append(v)
        if len(acc) == k:
            out.append((s, sum(acc) / k))
            acc = []
    return out


# -- Fashion-MNIST CNN -------------------------------------------------------------------------------------------
def run_cnn(args: Any, config: str, data: bdata.ImageData) -> tuple[dict, list[tuple[int, float]]]:
    epochs = args.cnn_epochs or (2 if args.quick else 3)
    bs = args.cnn_batch
    n = len(data.x_train)
    steps = int(math.ceil(epochs * n / bs))
    torch.manual_seed(args.seed)
    fqtc.set_step(0)
    model = bmodels.SmallCNN(1, (32, 64), 10, 28, 128)
    fn = _compile(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(args.seed)
    curve: list[tuple[int, float]] = []
    t0 = time.time()
    step = 0
    while step < steps:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            idx = perm[i: i + bs]
            loss = F.cross_entropy(fn(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            curve.append((step, float(loss.detach())))
            step += 1
            if step >= steps:
                break
    train_s = time.time() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data.x_test), 1000):
            correct += int((fn(data.x_test[i: i + 1000]).argmax(1) == data.y_test[i: i + 1000]).sum())
    acc = 100.0 * correct / len(data.x_test)
    row = {"task": "Fashion-MNIST SmallCNN", "config": config, "metric": "test acc %", "value": round(acc, 2),
           "steps": steps, "train_images": n, "test_images": len(data.x_test),
           "final_train_loss": round(sum(v for _, v in curve[-50:]) / len(curve[-50:]), 4),
           "ms_per_step": round(1000 * train_s / steps, 1)}
    return row, curve


# -- KJV char-GPT ----------------------------------------------------------------------------------------------
def run_gpt(args: Any, config: str, text: bdata.TextData) -> tuple[dict, list[tuple[int, float]]]:
    steps = args.gpt_steps or (400 if args.quick else 2000)
    dim = args.gpt_dim or (64 if args.quick else 128)
    layers = args.gpt_layers or (2 if args.quick else 4)
    seq = args.gpt_seq or (64 if args.quick else 128)
    bs = args.gpt_batch
    torch.manual_seed(args.seed)
    fqtc.set_step(0)
    model = bmodels.CharGPT(text.vocab_size, dim, 4, layers, seq)
    fn = _compile(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    curve: list[tuple[int, float]] = []
    t0 = time.time()
    for step in range(steps):
        x, y = text.batch("train", bs, seq, g)
        loss = bmodels.lm_loss(fn(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append((step, float(loss.detach())))
    train_s = time.time() - t0
    # validation: fixed windows tiling the held-out books (same windows for every config)
    model.eval()
    val = text.val
    nwin = (len(val) - 1) // seq
    losses = []
    with torch.no_grad():
        for i in range(0, nwin, 64):
            starts = torch.arange(i, min(nwin, i + 64)) * seq
            x = torch.stack([val[s: s + seq] for s in starts.tolist()])
            y = torch.stack([val[s + 1: s + seq + 1] for s in starts.tolist()])
            losses.append(float(bmodels.lm_loss(fn(x), y)) * len(starts))
    vloss = sum(losses) / nwin
    row = {"task": f"KJV char-GPT d{dim} L{layers} T{seq}", "config": config, "metric": "val loss (nats/char)",
           "value": round(vloss, 4), "steps": steps, "params": bmodels.num_params(model),
           "final_train_loss": round(sum(v for _, v in curve[-50:]) / len(curve[-50:]), 4),
           "ms_per_step": round(1000 * train_s / steps, 1)}
    return row, curve


def run(args: Any) -> list[dict]:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c != "fp32":
            fqtc.FQTConfig.from_options({"bits": c})  # validate early with fqt's own error message
    rows: list[dict] = []
    for task in tasks:
        if task == "cnn":
            data = bdata.load_fashion_mnist()
            n_train = args.cnn_train or (12000 if args.quick else None)
            if n_train:
                data = data.subset(n_train, None, seed=args.seed)
            runner: Callable = lambda c: run_cnn(args, c, data)  # noqa: E731
            title, ylabel = "Fashion-MNIST SmallCNN", "train loss (avg of 20 steps)"
        elif task == "gpt":
            text = bdata.load_kjv()
            runner = lambda c: run_gpt(args, c, text)  # noqa: E731
            title, ylabel = "KJV char-GPT", "train loss (avg of 20 steps)"
        else:
            raise SystemExit(f"unknown task {task!r}; allowed: cnn, gpt")
        task_rows, curves = [], {}
        for c in configs:
            torch._dynamo.reset()
            row, curve = runner(c)
            print(row, flush=True)
            task_rows.append(row)
            curves[c] = _smooth(curve)
        base = next((r for r in task_rows if r["config"] == "fp32"), None)
        target_cfg, gap = TARGETS[task]
        for r in task_rows:
            if base is None or r is base:
                continue
            if task == "cnn":
                r["delta_vs_fp32"] = round(r["value"] - base["value"], 2)
                if r["config"] == target_cfg:
                    r["target"] = f">= fp32 - {gap} pt"
                    r["met"] = "yes" if r["delta_vs_fp32"] >= -gap else "no"
            else:
                r["delta_vs_fp32"] = f"{100 * (r['value'] - base['value']) / base['value']:+.2f}%"
                if r["config"] == target_cfg:
                    r["target"] = f"<= fp32 + {gap}%"
                    r["met"] = "yes" if r["value"] <= base["value"] * (1 + gap / 100) else "no"
        png = _plot(curves, title, ylabel, os.path.join(args.out, f"curve_{task}.png"))
        for r in task_rows:
            r["plot"] = png
        rows += task_rows
    return rows
