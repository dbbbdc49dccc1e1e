"""``fqtc demo``: train a small MLP and a small CNN on scikit-learn's bundled digits (no download), in FP32 eager and
under ``backend="fqt"`` at W8A8G8 and W4A4G8, and print accuracy, loss, saved-activation bytes and step time.

Saved-activation bytes are measured, not computed: every tensor autograd saves for backward during one training
step passes through ``torch.autograd.graph.saved_tensors_hooks``; parameters (alive anyway) are excluded.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's 1797 8x8 digits, scaled to [0, 1], split with a fixed permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.head(x.flatten(1))


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": DigitsMLP, "cnn": DigitsCNN}
CONFIGS: dict[str, dict[str, Any] | None] = {"fp32": None, "W8A8G8": {"bits": "W8A8G8"}, "W4A4G8": {"bits": "W4A4G8"}}


@dataclass
class RunResult:
    model: str
    config: str
    test_acc: float
    final_loss: float
    saved_bytes: int
    step_ms: float
    compile_s: float


class _SavedBytes:
    """Sums the bytes autograd saves for backward (parameters excluded) while active."""

    def __init__(self, params: list[torch.Tensor]):
        self.ptrs = {p.data_ptr() for p in params}
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in self.ptrs:
            self.total += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def train(
    model_name: str,
    options: dict[str, Any] | None,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    max_steps: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    data=None,
) -> tuple[RunResult, Any]:
    """Train one model on digits; ``options=None`` is FP32 eager, otherwise ``torch.compile(backend="fqt")``.

    Returns the result row and the compiled graph records (None for FP32).
    """
    from fqtc.backend import capture

    xtr, ytr, xte, yte = data if data is not None else load_digits_split(seed)
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    fn: Callable = model
    if options is not None:
        fn = torch.compile(model, backend="fqt", options={"seed": seed, **options})
    steps_per_epoch = (len(ytr) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    times: list[float] = []
    compile_s, saved, loss_v, step = 0.0, 0, float("nan"), 0
    with capture() as cgs:
        for _ in range(epochs):
            perm = torch.randperm(len(ytr), generator=g)
            for i in range(0, len(ytr), batch_size):
                if step >= total:
                    break
                idx = perm[i : i + batch_size]
                t0 = time.perf_counter()
                # saved bytes are counted on the first step only: the Python pack hook would otherwise be timed
                # with every step (it costs compiled graphs, which save more, smaller tensors, the most)
                with _SavedBytes(list(model.parameters())) if step == 0 else contextlib.nullcontext() as sb:
                    loss = F.cross_entropy(fn(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                dt = time.perf_counter() - t0
                if step == 0:
                    compile_s, saved = dt, sb.total
                else:
                    times.append(dt)
                loss_v = loss.item()
                step += 1
                if progress:
                    progress(step, total)
    with torch.no_grad():
        # evaluate with the same numerics as training (the compiled model runs its quantized inference graph)
        acc = (fn(xte).argmax(1) == yte).float().mean().item() * 100
    row = RunResult(model_name, "fp32" if options is None else str(options.get("bits")), acc, loss_v, saved,
                    statistics.median(times) * 1e3 if times else float("nan"), compile_s)
    return row, (cgs[0] if cgs else None)


def _bar(label: str) -> Callable[[int, int], None]:
    last = [-1]

    def show(i: int, n: int) -> None:
        w = 30
        k = int(w * i / n)
        if k == last[0] and i != n:
            return
        last[0] = k
        sys.stderr.write(f"\r  {label:<16} [{'#' * k}{'.' * (w - k)}] {i}/{n}")
        if i == n:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def format_table(rows: list[RunResult]) -> str:
    head = f"{'model':<6} {'config':<8} {'test acc %':>10} {'final loss':>10} {'saved act. KiB':>14} " \
           f"{'step ms':>8} {'1st step s':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.model:<6} {r.config:<8} {r.test_acc:>10.2f} {r.final_loss:>10.4f} "
                     f"{r.saved_bytes / 1024:>14.1f} {r.step_ms:>8.2f} {r.compile_s:>10.2f}")
    return "\n".join(lines)


def format_sites(records: list[dict]) -> str:
    lines = [f"{'site':<8} {'role':<12} {'op':<22} {'status':<15} operands"]
    for r in records:
        ops = ", ".join(
            f"{k}={'fp' if v.get('bits') is None else 'int%d/%s/%s' % (v['bits'], v['granularity'], v['rounding'])}"
            for k, v in r["operands"].items())
        lines.append(f"{r['site']:<8} {r['role']:<12} {r['op']:<22} {r['status']:<15} {ops or r['reason']}")
    return "\n".join(lines)


def run_demo(epochs: int | None = None, quick: bool = False, seed: int = 0) -> list[RunResult]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_digits_split(seed)
    print(f"fqtc demo: scikit-learn digits, {len(data[1])} train / {len(data[3])} test images, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    rows: list[RunResult] = []
    first_records = None
    for model_name, ep in (("mlp", epochs or 25), ("cnn", epochs or 12)):
        for cfg_name, options in CONFIGS.items():
            torch._dynamo.reset()
            row, cg = train(model_name, options, epochs=ep, seed=seed, max_steps=5 if quick else None,
                            progress=_bar(f"{model_name} {cfg_name}"), data=data)
            rows.append(row)
            if cg is not None and model_name == "cnn" and cfg_name == "W8A8G8":
                first_records = cg.records
    print()
    print(format_table(rows))
    if first_records:
        print("\nGEMM sites of the CNN at W8A8G8 (fqtc.explain() gives the full report):")
        print(format_sites(first_records))
    return rows
