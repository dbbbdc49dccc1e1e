"""Crest factor of every Linear input on the first batch: what option ``layout="auto"`` measures.

    .venv/bin/python benchmarks/crest.py          # ~1 min on 2 cores (SmolLM2 and EfficientNet need their packages)

For each workload the model runs one forward in full precision under ``torch.no_grad`` on the batch the other
benchmarks train on; a forward hook on every ``nn.Linear`` takes ``fqtc.quant.uniform.crest_factor`` of its input
(``max|x| / rms(x)``, the value the backend computes from the Dynamo graph). Reported: per model the number of
Linears, the smallest, median and largest crest factor, the Linear with the largest, and the layout ``auto`` picks
(``token_rot`` when the largest reaches ``OUTLIER_CREST``).

Workloads: benchmarks/step_time.py's ``mlp``, ``gpt``, ``cnn`` (models trained from scratch, at initialization) and
``minilm`` (pretrained all-MiniLM-L6-v2); ``make demo``'s digits MLP; SmolLM2-135M on KJV windows
(benchmarks/finetune_lm.py) and EfficientNet-Lite0 with its new 10-class head on Fashion-MNIST
(benchmarks/finetune_cnn.py), each skipped with the reason when its package or data is missing.
Output: ``<out>/crest.md`` and ``<out>/crest.json`` (``--out``, default benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fqtc.passes.layout import OUTLIER_CREST  # noqa: E402
from fqtc.quant.uniform import crest_factor  # noqa: E402


def linear_crests(model: nn.Module, inputs: tuple) -> dict[str, float]:
    crests: dict[str, float] = {}

    def hook(path: str) -> Callable:
        def fn(mod: nn.Module, args: tuple, out: Any) -> None:
            c = crest_factor(args[0])
            if c is not None:
                crests[path] = max(c, crests.get(path, 0.0))
        return fn

    handles = [m.register_forward_hook(hook(p)) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return crests


def workloads() -> dict[str, Callable[[], tuple[nn.Module, tuple]]]:
    from benchmarks import step_time as st

    args = argparse.Namespace(batch=256, width=1024, minilm_dropout="off")

    def bench(name: str):
        def build():
            w = st.build_workload(name, args, "cpu")
            return w.model, w.inputs
        return build

    def demo():
        from fqtc.demo import DigitsMLP, load_digits_split

        torch.manual_seed(0)
        return DigitsMLP(), (load_digits_split(0)[0][:64],)

    def smollm2():
        from benchmarks import finetune_lm as fl

        lm, tok = fl.load_smollm2()
        train, _ = fl.load_kjv()
        ids = fl.windows(tok, train, 64, limit=4)
        return fl.CausalLM(lm), (ids[:, :-1],)

    def effnet():
        from benchmarks import finetune_cnn as fc

        torch.manual_seed(0)
        model = fc.load_model()
        model._fc = nn.Linear(model._fc.in_features, 10)
        x, _ = fc.load_fmnist(fc.DATA, "train")
        return model.eval(), (fc.prep(x[:32], 64),)

    return {"mlp": bench("mlp"), "gpt": bench("gpt"), "cnn": bench("cnn"), "demo-mlp": demo,
            "minilm": bench("minilm"), "smollm2": smollm2, "effnet-lite0": effnet}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.step_time import publish, run_record

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for name, build in workloads().items():
        try:
            model, inputs = build()
        except (ImportError, SystemExit, FileNotFoundError, OSError) as e:
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
            print(rows[-1], flush=True)
            continue
        crests = linear_crests(model, inputs)
        vals = sorted(crests.values())
        top = max(crests, key=crests.get)
        rows.append({"model": name, "linears": len(vals), "min": vals[0], "median": vals[len(vals) // 2],
                     "max": vals[-1], "max_linear": top,
                     "auto_layout": "token_rot" if vals[-1] >= OUTLIER_CREST else "default"})
        print(rows[-1], flush=True)
    result = {"rows": rows, **run_record("crest.py", argv), "torch": torch.__version__, "threshold": OUTLIER_CREST}
    publish(result, render(result), args.out, "crest", not args.no_save)
    return result


def render(result: dict[str, Any]) -> str:
    info = result["machine"]
    lines = [
        "# Crest factor of the Linear inputs on the first batch (benchmarks/crest.py)", "",
        f"- machine: {info['cpu']} ({info['cpu_count']} CPUs); torch {result['torch']}",
        f"- command: `{result['command']}`; date {result['date']}",
        f"- crest factor = max|x| / rms(x) of each nn.Linear's input; option layout=\"auto\" picks token_rot when "
        f"the largest reaches {result['threshold']:g} (fqtc/passes/layout.py)", "",
        "| model | Linears | min | median | max | largest at | layout auto |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | – | – | – | – | skipped: {r['error']} | – |")
            continue
        lines.append(f"| {r['model']} | {r['linears']} | {r['min']:.1f} | {r['median']:.1f} | {r['max']:.1f} | "
                     f"{r['max_linear']} | {r['auto_layout']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
