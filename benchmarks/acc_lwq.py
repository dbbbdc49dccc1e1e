"""Accuracy section ``lwq``: FP32 latent weights vs LWQ residuals (L8/L4/L2) vs plain stochastic rounding.

    python -m benchmarks.accuracy --section lwq [--quick] [--lwq-models cnn,gpt] [--lwq-epochs 2]

Every configuration trains the same model from the same initialization on the same batches, compiled with the fqt
backend (W8A8G8: int8 forward and backward GEMMs where the backend rewrites them), with the same optimizer math
(`fqtc.optim.SGD` momentum 0.9 + cosine decay for the CNN, `fqtc.optim.AdamW` for the char-GPT); only the storage
of the GEMM weights differs:

- ``fp32-latent``: fp32 parameters (the backend quantizes them per channel for the GEMMs) -- the reference;
- ``L8`` / ``L4`` / ``L2``: `fqtc.prepare` with ``W8A8G8L<b>``: int8 integer weight + b-bit residual;
- ``int8-SR (no residual)``: the weights *are* int8 codes with a per-row scale (absmax/127, re-computed each step)
  and each update is stochastically rounded onto that grid -- torchao's int8 weight-only quantized training, the
  baseline LWQ must beat (issue 8).

Evaluation uses the compiled model under ``torch.no_grad`` (integer GEMMs), on the full Fashion-MNIST test set and
on fixed KJV validation windows.
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial
from typing import Any

import torch

CONFIGS = ["fp32-latent", "L8", "L4", "L2", "int8-SR (no residual)"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lwq-models", default="cnn", help="comma list of cnn, gpt")
    p.add_argument("--lwq-epochs", type=float, default=2.0, help="CNN epochs")
    p.add_argument("--lwq-train", type=int, default=None, help="CNN training images (default all 60000)")
    p.add_argument("--lwq-steps", type=int, default=None, help="cap on CNN optimizer steps (reduced runs)")
    p.add_argument("--lwq-test", type=int, default=None, help="CNN test images (default all 10000)")
    p.add_argument("--lwq-fp-conv", action="store_true",
                   help="keep the CNN's convolutions in full precision (the CPU conv reference path is slow)")
    p.add_argument("--lwq-gpt-steps", type=int, default=600)
    p.add_argument("--lwq-configs", default=",".join(CONFIGS))


def _gemm_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    from fqtc.optim.latent import GEMM_MODULES

    return [m.weight for m in model.modules() if isinstance(m, GEMM_MODULES)]


class Int8SR:
    """Weights held as int8 codes x per-row scale; after each optimizer step, stochastically round onto the grid.

    The per-row scale is absmax/127 of the new weight (as torchao's ``quantize_int8_rowwise``); SR draws come from
    fqtc's counter-based stream so runs are reproducible.
    """

    def __init__(self, weights: list[torch.nn.Parameter], seed: int) -> None:
        self.weights, self.seed, self.t = weights, seed, 0
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        from fqtc.quant.uniform import quantize

        for i, w in enumerate(self.weights):
            q, s = quantize(w, 8, list(range(1, w.dim())), "stochastic", self.seed, self.t, 7919 + i)
            w.copy_(q.float() * s)
        self.t += 1


def _configure(model: torch.nn.Module, config: str, seed: int):
    import fqtc

    hook = None
    if config.startswith("L"):
        fqtc.prepare(model, {"bits": f"W8A8G8{config}", "seed": seed})
    elif config.startswith("int8-SR"):
        hook = Int8SR(_gemm_weights(model), seed)
    return hook


def _latent_bytes(model: torch.nn.Module) -> float:
    from fqtc.optim import training_state_bytes

    ws = _gemm_weights(model)
    n = sum(w.numel() for w in ws)
    sub = torch.nn.ParameterList(ws)
    b = training_state_bytes(sub)["weight_bytes"]
    return b / n


def run_cnn(args: Any, config: str) -> dict:
    import fqtc
    from benchmarks.data import load_fashion_mnist
    from benchmarks.models import SmallCNN
    from fqtc.backend import fqt_backend
    from fqtc.optim import SGD

    data = load_fashion_mnist()
    n_train = args.lwq_train or (10000 if args.quick else None)
    if n_train or args.lwq_test:
        data = data.subset(n_train=n_train, n_test=args.lwq_test, seed=args.seed)
    epochs = 1.0 if args.quick else args.lwq_epochs
    torch.manual_seed(args.seed)
    fqtc.set_step(0)
    model = SmallCNN(1, (32, 64), 10, 28)
    hook = _configure(model, config, args.seed)
    opts: dict[str, Any] = {"bits": "W8A8G8", "seed": args.seed}
    if args.lwq_fp_conv:
        opts["keep_fp"] = ["conv1", "conv2"]
    cmodel = torch.compile(model, backend=partial(fqt_backend, options=opts))
    batch = 128
    steps = int(math.ceil(len(data.x_train) / batch * epochs))
    if args.lwq_steps:
        steps = min(steps, args.lwq_steps)
    lr0 = 0.05
    opt = SGD(model.parameters(), lr=lr0, momentum=0.9, weight_decay=5e-4, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(data.x_train), generator=g)
    t0 = time.time()
    losses = []
    for t in range(steps):
        start = (t * batch) % len(perm)
        if start + batch > len(perm):
            perm = torch.randperm(len(data.x_train), generator=g)
            start = 0
        idx = perm[start:start + batch]
        for group in opt.param_groups:  # cosine decay to 0
            group["lr"] = 0.5 * lr0 * (1 + math.cos(math.pi * t / steps))
        loss = torch.nn.functional.cross_entropy(cmodel(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if hook is not None:
            hook.project()
        losses.append(float(loss.detach()))
    train_s = time.time() - t0
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data.x_test), 1000):
            correct += int((cmodel(data.x_test[i:i + 1000]).argmax(1) == data.y_test[i:i + 1000]).sum())
    return {"model": "cnn (Fashion-MNIST)" + (", fp conv" if args.lwq_fp_conv else ""), "config": config,
            "steps": steps, "batch": batch, "test_images": len(data.x_test),
            "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
            "test_acc_%": 100.0 * correct / len(data.x_test), "gemm_weight_B/param": _latent_bytes(model),
            "train_s": train_s}


def run_gpt(args: Any, config: str) -> dict:
    import fqtc
    from benchmarks.data import load_kjv
    from benchmarks.models import CharGPT, lm_loss
    from fqtc.backend import fqt_backend
    from fqtc.optim import AdamW

    data = load_kjv(max_chars=400_000 if args.quick else 2_000_000)
    steps = 150 if args.quick else args.lwq_gpt_steps
    torch.manual_seed(args.seed)
    fqtc.set_step(0)
    model = CharGPT(vocab_size=data.vocab_size, dim=64, heads=4, layers=2, max_len=64)
    hook = _configure(model, config, args.seed)
    cmodel = torch.compile(model, backend=partial(fqt_backend, options={"bits": "W8A8G8", "seed": args.seed}))
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for t in range(steps):
        x, y = data.batch("train", 32, 64, g)
        loss = lm_loss(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if hook is not None:
            hook.project()
    train_s = time.time() - t0
    gv = torch.Generator().manual_seed(1234)
    vals = []
    with torch.no_grad():
        for _ in range(10):
            x, y = data.batch("val", 64, 64, gv)
            vals.append(float(lm_loss(cmodel(x), y)))
    return {"model": "char-GPT (KJV)", "config": config, "steps": steps, "val_loss": sum(vals) / len(vals),
            "gemm_weight_B/param": _latent_bytes(model), "train_s": train_s}


def run(args: Any) -> list[dict]:
    rows = []
    configs = [c for c in args.lwq_configs.split(",") if c]
    for name in args.lwq_models.split(","):
        fn = {"cnn": run_cnn, "gpt": run_gpt}[name.strip()]
        for c in configs:
            torch._dynamo.reset()
            row = fn(args, c)
            print(row, flush=True)
            rows.append(row)
    return rows
