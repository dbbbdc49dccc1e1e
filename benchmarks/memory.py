"""Training-state memory of latent weight quantization (docs/latent_weights.md), measured side by side in one run.

    .venv/bin/python -m benchmarks.memory [--steps 2] [--no-peak]

Table 1, bytes per parameter of training *state* (weights incl. latent codes and scales + optimizer states), summed
from the tensors actually held after a training step (`fqtc.optim.training_state_bytes`, one count per storage):

- FP32 SGD-momentum (torch.optim), FP32 AdamW (torch.optim);
- fqt W8+L4 and W4+L4 (`fqtc.prepare`) with `fqtc.optim.SGD` momentum and `fqtc.optim.AdamW`, states 8-bit.

Table 2, peak process memory (max RSS) of a training step of the ResNet-20-style CNN and the char-GPT, each
configuration in a fresh subprocess: ``step_peak_mb`` is the process's memory
high-water mark during the steps after a reset (VmHWM), ``step_added_mb`` its growth over the RSS before the
steps (imports, model, data and optimizer state already allocated). Models run eager
(no ``torch.compile``) so only the parameter/optimizer storage differs between rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["fp32-sgd", "fp32-adamw", "W8L4-sgd8", "W8L4-adamw8", "W4L4-sgd8", "W4L4-adamw8"]


def build(model_name: str) -> tuple[torch.nn.Module, callable]:
    from benchmarks.models import CharGPT, lm_loss, resnet20

    torch.manual_seed(0)
    if model_name == "resnet20":
        model = resnet20(in_channels=1, num_classes=10)
        x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
        return model, lambda m: torch.nn.functional.cross_entropy(m(x), y)
    if model_name == "chargpt":
        model = CharGPT(vocab_size=65, dim=128, heads=4, layers=4, max_len=64)
        idx = torch.randint(0, 65, (32, 64))
        return model, lambda m: lm_loss(m(idx[:, :-1]), idx[:, 1:])
    raise ValueError(f"unknown model {model_name!r}; use resnet20 or chargpt")


def make_optimizer(model: torch.nn.Module, config: str) -> torch.optim.Optimizer:
    import fqtc
    from fqtc.optim import SGD, AdamW

    if config == "fp32-sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if config == "fp32-adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    bits, opt = config.split("-")
    fqtc.prepare(model, {"bits": bits.replace("W8", "W8A8G8").replace("W4", "W4A8G8")})
    if opt == "sgd8":
        return SGD(model.parameters(), lr=0.01, momentum=0.9, state_bits=8)
    return AdamW(model.parameters(), lr=1e-3, state_bits=8)


def state_row(model_name: str, config: str, steps: int) -> dict:
    from fqtc.optim import training_state_bytes

    model, loss_fn = build(model_name)
    opt = make_optimizer(model, config)
    for _ in range(steps):
        loss_fn(model).backward()
        opt.step()
        opt.zero_grad()
    mem = training_state_bytes(model, opt)
    return {"model": model_name, "config": config, "params": mem["params"],
            "weight_B/param": mem["weight_bytes"] / mem["params"],
            "optim_B/param": mem["optimizer_bytes"] / mem["params"], "total_B/param": mem["bytes_per_param"]}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_child(model_name: str, config: str, steps: int) -> dict:
    """Runs in a fresh process: one configuration's training steps, reports peak and step-added memory.

    The import of torch/fqtc peaks higher than a small model's step, so the high-water mark is reset after the
    model, optimizer state and data exist (one warm-up step, ``/proc/self/clear_refs`` = 5 resets VmHWM), and the
    step's own peak is VmHWM minus the RSS at that point."""
    model, loss_fn = build(model_name)
    opt = make_optimizer(model, config)
    loss_fn(model).backward()
    opt.step()  # creates the optimizer state
    opt.zero_grad()
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mb("VmRSS")
    for _ in range(steps):
        loss_fn(model).backward()
        opt.step()
        opt.zero_grad()
    peak = _status_mb("VmHWM")
    return {"model": model_name, "config": config, "rss_before_step_mb": base, "step_peak_mb": peak,
            "step_added_mb": peak - base,
            "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--no-peak", action="store_true", help="skip the subprocess peak-memory table")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        torch.set_num_threads(1)
        print(json.dumps(peak_child(args.child[0], args.child[1], args.steps)))
        return
    from benchmarks.accuracy import environment, markdown_table

    t0 = time.time()
    rows = [state_row(m, c, args.steps) for m in ("resnet20", "chargpt") for c in CONFIGS]
    print("\n## memory: training-state bytes per parameter\n")
    print("command: python -m benchmarks.memory " + " ".join(sys.argv[1:]))
    print("environment: " + ", ".join(f"{k}={v}" for k, v in environment().items()))
    print(markdown_table(rows))
    if not args.no_peak:
        peak_rows = []
        for m in ("resnet20", "chargpt"):
            for c in CONFIGS:
                out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", m, c, "--steps",
                                      str(args.steps)], cwd=ROOT, capture_output=True, text=True, check=True)
                peak_rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print("\n## memory: peak process memory of a training step (fresh process per row, 1 thread)\n")
        print(markdown_table(peak_rows))
    print(f"\nwall time: {time.time() - t0:.0f} s, {platform.node()}")


if __name__ == "__main__":
    main()
