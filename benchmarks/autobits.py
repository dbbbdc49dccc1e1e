"""Automatic vs uniform gradient bits at the same average (docs/bit_assignment.md): variance, accuracy/loss.

For each task and each integer budget B (where uniform ``W8A8G{B}`` spends exactly B bits per gradient element):

1. ``fqtc.calibrate`` on the first few training batches;
2. the *estimated* added gradient variance of uniform G{B} and of ``bits="auto", budget=B`` (the solver's
   objective, `fqtc.passes.autobits`), on the same calibrated problem;
3. the *measured* quantization variance of the parameter gradient: the compiled model's gradient on one fixed
   held-out batch, over ``--draws`` stochastic-rounding streams (each call advances fqtc's step counter), summed over
   all parameter elements (``meas_var``) and as the sum over parameter tensors of variance / squared FP32 gradient
   norm on that batch (``meas_nsr``, what ``auto_objective="relative"`` minimizes); next to it the *minibatch*
   variance of the FP32 gradient over ``--draws`` batches (what SGD already lives with; the statistical framework's
   yardstick);
4. training from the same initialization on the same batch order (FP32, uniform, auto with each of
   ``--objectives``), then test accuracy (CNN, Fashion-MNIST) or validation loss (char-GPT, KJV), evaluated with
   the compiled (W8A8 forward) model.

With several ``--seeds`` every step is repeated per seed (initialization, batch order, calibration batches and the
stochastic-rounding seed all change) and a summary table gives mean +- standard error over seeds per config.

Usage::

    python -m benchmarks.autobits [--quick] [--tasks cnn,gpt] [--budgets 3,4] [--seeds 0,1,2]
                                  [--objectives relative,absolute]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import fqtc
from benchmarks import data as bdata
from benchmarks import models as bmodels
from fqtc.backend import capture, fqt_backend
from fqtc.passes.autobits import uniform_solution


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def grad_at(fn: Callable, model: nn.Module, batch: Any, loss_fn: Callable) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss_fn(fn, batch).backward()
    return flat_grad(model).clone()


def total_variance(samples: list[torch.Tensor]) -> float:
    """Sum over elements of the unbiased variance across samples."""
    return float(torch.stack(samples).double().var(dim=0).sum())


def noise_to_signal(samples: list[torch.Tensor], signal: torch.Tensor, sizes: list[int]) -> float:
    """Sum over parameter tensors (``sizes``: their element counts, in ``flat_grad`` order) of the variance across
    ``samples`` over the squared norm of ``signal`` (the FP32 gradient); tensors with a zero signal are skipped."""
    var = torch.stack(samples).double().var(dim=0)
    total = 0.0
    for v, s in zip(var.split(sizes), signal.double().split(sizes)):
        sq = float(s.pow(2).sum())
        total += float(v.sum()) / sq if sq > 0 else 0.0
    return total


def estimated(model: nn.Module, batch: Any, loss_fn: Callable, options: dict, budget: int
              ) -> tuple[float, float, dict]:
    """(auto, uniform G{budget}) estimated added variance of the parameter gradients (absolute, whatever the
    objective) on the calibrated problem, and auto's bits per unit: the `AutoPlan` the auto compile with
    ``options`` solved (``joint.meta["fqt_auto"]``), uniform evaluated on the same units."""
    torch._dynamo.reset()
    with capture() as cgs:
        fn = torch.compile(model, backend=partial(fqt_backend, options=options))
        loss_fn(fn, batch).backward()
    model.zero_grad(set_to_none=True)
    plan = next(c for c in cgs if c.joint is not None).joint.meta["fqt_auto"]
    uni = uniform_solution(plan.variance_units, budget)
    return plan.estimated_variance(plan.solution.bits), uni.total_variance, plan.solution.bits


def measured(model: nn.Module, options: dict, batch: Any, loss_fn: Callable, draws: int) -> tuple[float, float]:
    """(total variance, summed per-tensor noise-to-signal) of the compiled model's gradient over ``draws``."""
    signal = grad_at(model, model, batch, loss_fn)  # eager FP32
    sizes = [p.numel() for p in model.parameters() if p.grad is not None]
    torch._dynamo.reset()
    fn = torch.compile(model, backend=partial(fqt_backend, options=options))
    grads = [grad_at(fn, model, batch, loss_fn) for _ in range(draws)]
    model.zero_grad(set_to_none=True)
    return total_variance(grads), noise_to_signal(grads, signal, sizes)


def train(model: nn.Module, options: dict | None, batches: list, loss_fn: Callable, lr: float,
          evaluate: Callable) -> tuple[float, float]:
    """Train on ``batches`` (Adam) with the fqt backend (or eager FP32 for None); returns (metric, seconds).

    Every run starts at fqt step 0, so configs draw common random numbers: a quantizer whose spec (bits included)
    is the same in two configs rounds with the same stream in both (paired comparison; without the reset two runs
    with identical bits differed by up to a point on the CNN at 3 gradient bits)."""
    torch._dynamo.reset()
    fqtc.set_step(0)
    fn = model if options is None else torch.compile(model, backend=partial(fqt_backend, options=options))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(fn, b).backward()
        opt.step()
    secs = time.perf_counter() - t0
    with torch.no_grad():
        return evaluate(fn), secs


# -- tasks ---------------------------------------------------------------------------------------------------------
def cnn_task(args: argparse.Namespace, seed: int = 0) -> dict:
    d = bdata.load_fashion_mnist().subset(args.cnn_train, args.cnn_test)
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(0, len(d.x_train), (args.cnn_steps, args.cnn_batch), generator=g)
    batches = [(d.x_train[i], d.y_train[i]) for i in order]

    def loss_fn(fn, b):
        return F.cross_entropy(fn(b[0]), b[1])

    def evaluate(fn):
        correct = 0
        for i in range(0, len(d.x_test), 500):
            correct += int((fn(d.x_test[i:i + 500]).argmax(-1) == d.y_test[i:i + 500]).sum())
        return 100.0 * correct / len(d.x_test)

    torch.manual_seed(seed)
    model = bmodels.SmallCNN(1, (32, 64), 10, 28)
    held = (d.x_test[:args.cnn_batch], d.y_test[:args.cnn_batch])
    return dict(name=f"SmallCNN / Fashion-MNIST ({args.cnn_train} train imgs, {args.cnn_steps} steps x "
                     f"{args.cnn_batch})", model=model, batches=batches, loss_fn=loss_fn, evaluate=evaluate,
                held=held, lr=1e-3, metric="test acc %")


def gpt_task(args: argparse.Namespace, seed: int = 0) -> dict:
    d = bdata.load_kjv(max_chars=args.gpt_chars)
    g = torch.Generator().manual_seed(seed)
    batches = [d.batch("train", args.gpt_batch, args.gpt_seq, g) for _ in range(args.gpt_steps)]
    val = [d.batch("val", args.gpt_batch, args.gpt_seq, torch.Generator().manual_seed(1 + i)) for i in range(8)]

    def loss_fn(fn, b):
        return bmodels.lm_loss(fn(b[0]), b[1])

    def evaluate(fn):
        return sum(float(loss_fn(fn, b)) for b in val) / len(val)

    torch.manual_seed(seed)
    model = bmodels.CharGPT(d.vocab_size, dim=args.gpt_dim, heads=4, layers=2, max_len=args.gpt_seq)
    return dict(name=f"CharGPT d{args.gpt_dim} L2 / KJV ({args.gpt_steps} steps x {args.gpt_batch}x{args.gpt_seq})",
                model=model, batches=batches, loss_fn=loss_fn, evaluate=evaluate, held=val[0], lr=3e-3,
                metric="val loss")


def run_task(task: dict, budgets: list[int], args: argparse.Namespace, seed: int = 0) -> list[dict]:
    init = copy.deepcopy(task["model"].state_dict())
    model, loss_fn = task["model"], task["loss_fn"]
    cal_model, first = model, 0
    if args.calib_warmup:  # calibrate a copy trained FP32 for a few steps: gradients at init are unrepresentative
        cal_model = copy.deepcopy(model)
        wopt = torch.optim.Adam(cal_model.parameters(), lr=task["lr"])
        for b in task["batches"][:args.calib_warmup]:
            wopt.zero_grad(set_to_none=True)
            loss_fn(cal_model, b).backward()
            wopt.step()
        cal_model.zero_grad(set_to_none=True)
        first = args.calib_warmup
    cal = fqtc.calibrate(cal_model, task["batches"][first:first + args.calib_steps], loss_fn,
                         propagation=args.propagation)
    # minibatch (sampling) variance of the FP32 gradient over `draws` training batches, at the initialization
    samp = total_variance([grad_at(model, model, b, loss_fn) for b in task["batches"][-args.draws:]])
    model.zero_grad(set_to_none=True)
    rows = []
    if not args.auto_only:
        m = copy.deepcopy(model)
        fp_metric, fp_secs = train(m, None, task["batches"], loss_fn, task["lr"], task["evaluate"])
        rows.append(dict(task=task["name"], seed=seed, config="FP32 (eager)", avg_gbits="32", est_var="0",
                         meas_var="0", meas_nsr="0", meas_over_minibatch="0", metric=f"{fp_metric:.3f}",
                         train_s=f"{fp_secs:.0f}", bits=""))
        print(rows[-1], flush=True)
    for b in budgets:
        configs: list[tuple[str, dict, str]] = []
        if not args.auto_only:
            configs.append((f"uniform W8A8G{b}", {"bits": f"W8A8G{b}", "seed": seed}, ""))
        for obj in args.objectives.split(","):
            configs.append((f"auto W8A8Gauto budget {b} ({obj} objective, {args.propagation} propagation)",
                            {"bits": "auto", "budget": b, "calibration": cal, "auto_objective": obj, "seed": seed},
                            obj))
        est_uni = None
        for name, opts, obj in configs:
            model.load_state_dict(init)
            bits = ""
            if obj:
                est, est_uni, auto_bits = estimated(model, task["held"], loss_fn, opts, b)
                bits = " ".join(f"{k[0]}/{'gi' if k[1] == 'grad_input' else 'gw'}={v}" for k, v in auto_bits.items())
            else:
                est = None  # filled in from the auto plan's units below (the same calibrated problem)
            meas, nsr = measured(model, opts, task["held"], loss_fn, args.draws)
            m = copy.deepcopy(model)
            metric, secs = train(m, opts, task["batches"], loss_fn, task["lr"], task["evaluate"])
            rows.append(dict(task=task["name"], seed=seed, config=name, avg_gbits=str(b),
                             est_var="" if est is None else f"{est:.3g}", meas_var=f"{meas:.3g}",
                             meas_nsr=f"{nsr:.3g}", meas_over_minibatch=f"{meas / samp:.3g}",
                             metric=f"{metric:.3f}", train_s=f"{secs:.0f}", bits=bits))
            print(rows[-1], flush=True)
        for r in rows:
            if r["config"] == f"uniform W8A8G{b}" and est_uni is not None:
                r["est_var"] = f"{est_uni:.3g}"
    model.load_state_dict(init)
    for r in rows:
        r["minibatch_var"] = f"{samp:.3g}"
        r["metric_name"] = task["metric"]
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean +- standard error over seeds (sample std / sqrt(n)) per (task, config) of metric, meas_var, meas_nsr."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["config"]), []).append(r)
    out = []
    for (task, config), rs in groups.items():
        row = dict(task=task, config=config, seeds=len(rs), metric_name=rs[0]["metric_name"])
        for col in ("metric", "meas_var", "meas_nsr"):
            xs = [float(r[col]) for r in rs]
            mean = sum(xs) / len(xs)
            se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else float("nan")
            row[col] = f"{mean:.4g} ± {se:.2g}"
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="cnn,gpt")
    p.add_argument("--budgets", default="3,4")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each repeats every config")
    p.add_argument("--objectives", default="relative,absolute",
                   help="auto_objective values to run (fqtc option; comma-separated)")
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--calib-steps", type=int, default=4)
    p.add_argument("--calib-warmup", type=int, default=0,
                   help="calibrate a copy of the model after this many FP32 Adam steps on the first training "
                        "batches (0: calibrate at the initialization); training still starts from the initialization")
    p.add_argument("--propagation", default="model", choices=("model", "measured"),
                   help="fqtc.calibrate's propagation estimate")
    p.add_argument("--auto-only", action="store_true", help="skip the FP32 and uniform rows (same seeds/data)")
    p.add_argument("--cnn-train", type=int, default=12000)
    p.add_argument("--cnn-test", type=int, default=2000)
    p.add_argument("--cnn-steps", type=int, default=300)
    p.add_argument("--cnn-batch", type=int, default=64)
    p.add_argument("--gpt-chars", type=int, default=400_000)
    p.add_argument("--gpt-steps", type=int, default=300)
    p.add_argument("--gpt-batch", type=int, default=16)
    p.add_argument("--gpt-seq", type=int, default=64)
    p.add_argument("--gpt-dim", type=int, default=64)
    args = p.parse_args()
    if args.quick:
        args.cnn_train, args.cnn_test, args.cnn_steps, args.cnn_batch = 1000, 500, 20, 32
        args.gpt_chars, args.gpt_steps, args.gpt_batch, args.gpt_seq, args.gpt_dim = 50_000, 20, 8, 32, 32
        args.draws = 4
    torch.set_num_threads(max(1, torch.get_num_threads()))
    budgets = [int(b) for b in args.budgets.split(",")]
    tasks = {"cnn": cnn_task, "gpt": gpt_task}
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    t0 = time.perf_counter()
    for t in args.tasks.split(","):
        for seed in seeds:
            rows += run_task(tasks[t](args, seed), budgets, args, seed)
    cols = ["task", "seed", "config", "avg_gbits", "est_var", "meas_var", "meas_nsr", "minibatch_var",
            "meas_over_minibatch", "metric_name", "metric", "train_s", "bits"]
    print()
    print("command: " + " ".join([os.path.basename(sys.executable), "-m", "benchmarks.autobits"] + sys.argv[1:]))
    print(f"machine: {platform.machine()} {platform.processor()} cpus={os.cpu_count()} threads="
          f"{torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}; "
          f"total {time.perf_counter() - t0:.0f} s")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if len(seeds) > 1:
        scols = ["task", "config", "seeds", "metric_name", "metric", "meas_var", "meas_nsr"]
        print()
        print("mean ± standard error over seeds")
        print("| " + " | ".join(scols) + " |")
        print("|" + "---|" * len(scols))
        for r in summarize(rows):
            print("| " + " | ".join(str(r.get(c, "")) for c in scols) + " |")


if __name__ == "__main__":
    main()
