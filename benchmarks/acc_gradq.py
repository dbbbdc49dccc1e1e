"""Accuracy section ``gradq``: the benchmark CNN trained with QAT vs quantized gradients per quantizer.

QAT = W8A8 forward quantization with ``grad_output`` in full precision (rule ``{"operand": "grad_output",
"bits": "fp"}``); FQT = the same forward plus ``grad_output`` quantized by PTQ/PSQ/SCQ/BHQ/AQ at 8, 5 and 4 bits
(AQ also at an average of 1 bit). Every run starts from the same initial weights and sees the same batches; the
table reports test accuracy and the gap to QAT in points.

Run through the accuracy CLI::

    python -m benchmarks.accuracy --section gradq [--quick] [--dataset mnist|fashion_mnist]

Convolution sites: fqtc's convolution pass lowers gradient quantizers only for Linear GEMMs (it records a note
and uses the uniform quantizer at the quantizer's grouping for conv ``grad_output``), so in this CNN the quantizer
under test acts on the two Linear layers and the convolutions' gradients are quantized uniformly (same bits).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import data as bdata
from benchmarks import models as bmodels
from fqtc.backend import fqt_backend

QAT_RULE = {"operand": "grad_output", "bits": "fp"}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    p.add_argument("--quantizers", default="ptq,psq,scq,bhq,aq")
    p.add_argument("--grad-bits", default=None, help="gradient bits per quantizer (default 8,5,4; --quick 5,4)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 1500, --quick 200)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared CPUs: 1)")
    p.add_argument("--batch", type=int, default=128)


def _runs(args) -> list[tuple[str, dict[str, Any]]]:
    runs: list[tuple[str, dict[str, Any]]] = [("QAT (W8A8, FP grads)", {"bits": "W8A8G8", "rules": [QAT_RULE]})]
    qs = [q for q in args.quantizers.split(",") if q]
    bits = args.grad_bits or ("5,4" if args.quick else "8,5,4")
    for q in qs:
        for b in (int(x) for x in bits.split(",")):
            runs.append((f"{q.upper()} G{b}", {"bits": f"W8A8G{b}", "grad_quantizer": q}))
    if "aq" in qs:
        runs.append(("AQ G1", {"bits": "W8A8G1", "grad_quantizer": "aq"}))
    return runs


def _train_eval(options: dict[str, Any], data, steps: int, batch: int, seed: int) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    model = bmodels.build_image_model("cnn", 1, 28, 10)
    # static shapes: the train (batch) and eval (1000) graphs are compiled once each
    cm = torch.compile(model, backend=partial(fqt_backend, options={**options, "seed": seed}), dynamic=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = data.x_train.shape[0]
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(cm(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        opt.step()
    train_s = time.time() - t0
    correct = 0
    with torch.no_grad():
        for i in range(0, data.x_test.shape[0], 1000):
            # evaluated with the same quantized forward (W8A8) the model was trained with
            correct += int((cm(data.x_test[i:i + 1000]).argmax(1) == data.y_test[i:i + 1000]).sum())
    return 100.0 * correct / data.x_test.shape[0], float(loss), train_s


def run(args) -> list[dict]:
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch.set_num_threads(args.threads)
    data = bdata.load_mnist() if args.dataset == "mnist" else bdata.load_fashion_mnist()
    steps = args.steps or (200 if args.quick else 1500)
    rows: list[dict] = []
    qat_acc = None
    for label, options in _runs(args):
        torch._dynamo.reset()
        acc, loss, secs = _train_eval(options, data, steps, args.batch, args.seed)
        if qat_acc is None:
            qat_acc = acc
        rows.append({"run": label, "options": str(options), "steps": steps,
                     "test acc %": round(acc, 2), "gap to QAT (pts)": round(acc - qat_acc, 2),
                     "final train loss": round(loss, 4), "train s": round(secs, 1)})
        print(f"{label}: acc {acc:.2f}% loss {loss:.4f} ({secs:.0f} s)", file=sys.stderr)
    return rows
