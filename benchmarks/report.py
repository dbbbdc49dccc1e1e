"""Regenerate the benchmark tables and plots from the result files in benchmarks/results/.

    .venv/bin/python benchmarks/report.py            # rewrite the generated tables, result pages and plots
    .venv/bin/python benchmarks/report.py --check    # exit 1 (and show a diff) where a table differs from its JSON

The benchmarks write their measurements as JSON under benchmarks/results/ (``--out``); this script is the only
writer of the tables built from them, so a table in benchmarks/README.md or docs/ is never hand-edited prose. It
runs nothing and times nothing: it reads the JSON files that exist and skips the outputs whose JSON is missing.

Generated here:

- ``results/step_time.json`` (benchmarks/step_time.py) -> ``results/step_time.md`` (full tables with the machine
  lines), ``results/step_time.png`` (ratio to FP32 eager), and the ratio table in benchmarks/README.md, "Step time
  and memory";
- ``results/outliers.json`` (benchmarks/outliers.py) -> ``results/outliers.md`` and the table in docs/outliers.md,
  "Measured on a real checkpoint";
- ``results/accuracy_<section>.json`` (``python -m benchmarks.accuracy --section <section>``) -> the table in
  benchmarks/README.md for section ``gradq`` ("Gradient quantizers: accuracy vs QAT"); the other sections
  (``lwq``, ``models``) write the same JSON, but their README tables predate it and are still prose;
- ``results/distributed.json`` (benchmarks/distributed.py) -> ``results/distributed.md`` and the "Data-parallel"
  section of benchmarks/README.md, once a run has written it.
- ``results/finetune_cnn.json`` (benchmarks/finetune_cnn.py) -> ``results/finetune_cnn.md`` and the "Fine-tuning a
  pretrained CNN" section of benchmarks/README.md, once a run has written it;
- ``results/finetune_lm.json`` (benchmarks/finetune_lm.py) -> ``results/finetune_lm.md`` and the "Fine-tuning a
  pretrained LM" section of benchmarks/README.md, once a run has written it;
- ``results/finetune.json`` (benchmarks/finetune.py) -> ``results/finetune.md`` and the "Fine-tuning" section of
  benchmarks/README.md, once a run has written it;
- ``results/finetune_lm_ptq.json`` (benchmarks/finetune_lm.py ``--steps 0``) -> ``results/finetune_lm_ptq.md`` and
  the table in docs/outliers.md, "4-bit weights on a decoder LM".

A generated table sits between ``<!-- report.py: NAME -->`` and ``<!-- /report.py: NAME -->`` lines; the text
around it (command, machine, reading) stays hand-written.

Benchmarks that still only print (their README tables are prose, copied from the terminal): benchmarks/memory.py
(LWQ training-state memory), benchmarks/autobits.py, benchmarks/gradient_variance.py (writes its plot, prints the
table), ``fqtc bench kernels`` (traffic model), benchmarks/gpu_check.py (writes JSON for a GPU run, no table yet),
and the step-time table of benchmarks/README.md's first section (an older MLP-only run).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")
README = os.path.join(ROOT, "benchmarks", "README.md")
OUTLIERS_DOC = os.path.join(ROOT, "docs", "outliers.md")


def load(name: str) -> dict[str, Any] | None:
    """``benchmarks/results/<name>`` parsed, or None when that benchmark has not written it."""
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# -- step time -----------------------------------------------------------------------------------------------------
STEP_TIME_MODELS = {
    "mlp": "MLP 784-1024-1024-10, b256",
    "cnn": "CNN (BN, depthwise), b128",
    "gpt": "GPT 2x256, T128, b8",
    "minilm": "MiniLM-L6 fine-tuning, b16 x 64",
}
# (config, column header, bold): the default compiler="auto" runs `fqt ... inductor` on CPU
STEP_TIME_COLUMNS = [
    ("fp32-inductor", "FP32 Inductor", False),
    ("fqt-W8A8G8-eager", "fqt W8A8G8 eager", False),
    ("fqt-W8A8G8-inductor", "fqt W8A8G8 inductor", True),
    ("fqt-W4A8G8-inductor", "fqt W4A8G8 inductor", False),
    ("torchao-int8mp-eager", "torchao int8 MP eager", False),
    ("torchao-int8mp-inductor", "torchao int8 MP Inductor", False),
]


def step_time_ratios(result: dict[str, Any]) -> str:
    """Median step relative to FP32 eager, one row per model and thread count ("fails" where the config raised)."""
    head = ["model", "threads"] + [f"**{h}**" if bold else h for _, h, bold in STEP_TIME_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in result["models"]:
        for i, table in enumerate(result["tables"]):
            rows = {r["config"]: r for r in table["rows"] if r["model"] == model}
            cells = [STEP_TIME_MODELS.get(model, model) if i == 0 else "", str(table["threads"])]
            for config, _, bold in STEP_TIME_COLUMNS:
                r = rows.get(config)
                if r is None:
                    cells.append("")
                elif r.get("vs_fp32_eager") is None:
                    cells.append("fails")
                else:
                    v = f"{r['vs_fp32_eager']:.2f}x"
                    cells.append(f"**{v}**" if bold else v)
            lines.append("|" + "|".join(f" {c} " if c else " " for c in cells) + "|")  # "| |": an empty cell
    return "\n".join(lines)


# -- outliers ------------------------------------------------------------------------------------------------------
# docs/outliers.md shows the configurations a reader chooses between, with the layouts spelled out
OUTLIERS_DOC_ROWS = ["W8A8G8 default", "W8A8G8 default +rotate", "W8A8G8 default +grad_input weight per channel",
                     "W8A8G8 token", "W8A8G8 token +rotate",
                     "W8A8G8 block32", "W8A8G8 block32 +rotate", "W4A8G8 token +rotate", "W4A8G8 block32 +rotate",
                     "W8A8G8 default options (layout auto)", "W4A8G8 default options (layout auto)"]


def outliers_doc_table(result: dict[str, Any]) -> str:
    rows = {r["config"]: r for r in result["rows"]}
    lines = ["| config | median dB | worst dB | saved activations vs FP32 |", "|---|---|---|---|"]
    for name in OUTLIERS_DOC_ROWS:
        r = rows[name]
        label = name.replace(" token", " token layout").replace(" block32", " block scaling (32)").replace(
            " +rotate", " + rotate").replace(" +grad_input weight per channel", ", per-channel weight in grad_input")
        lines.append(f"| {label} | {r['median_db']:.1f} | {r['worst_db']:.1f} | {r['saved_act_vs_fp32']:.2f}x |")
    return "\n".join(lines)


# -- accuracy sections ---------------------------------------------------------------------------------------------
def accuracy_table(result: dict[str, Any], drop: tuple[str, ...] = ("options",)) -> str:
    """The rows `benchmarks.accuracy` printed, without the columns in ``drop`` (the options dict is in the JSON)."""
    from benchmarks.accuracy import markdown_table

    return markdown_table([{k: v for k, v in r.items() if k not in drop} for r in result["rows"]])


# -- what is generated where ---------------------------------------------------------------------------------------
# (file, block name, result file, renderer): the block between the file's report.py markers
def _page(module: str, fn: str) -> Callable[[dict[str, Any]], str]:
    def render(result: dict[str, Any]) -> str:
        import importlib

        return getattr(importlib.import_module(module), fn)(result)
    return render


def _untitled(module: str, fn: str) -> Callable[[dict[str, Any]], str]:
    """A benchmark's own result page without its ``# title`` line, for a section of benchmarks/README.md."""
    page = _page(module, fn)
    return lambda result: "\n".join(ln for ln in page(result).splitlines() if not ln.startswith("# ")).strip()


BLOCKS: list[tuple[str, str, str, Callable[[dict[str, Any]], str]]] = [
    (README, "step_time_ratios", "step_time.json", step_time_ratios),
    (README, "accuracy_gradq", "accuracy_gradq.json", accuracy_table),
    (OUTLIERS_DOC, "outliers", "outliers.json", outliers_doc_table),
    (README, "distributed", "distributed.json", _untitled("benchmarks.distributed", "_markdown")),
    (README, "finetune", "finetune.json", _untitled("benchmarks.finetune", "render")),
    (README, "finetune_lm", "finetune_lm.json", _untitled("benchmarks.finetune_lm", "render")),
    (README, "finetune_cnn", "finetune_cnn.json", _untitled("benchmarks.finetune_cnn", "render")),
    (OUTLIERS_DOC, "finetune_lm_ptq", "finetune_lm_ptq.json", _untitled("benchmarks.finetune_lm", "render")),
]


# (whole result page, result file, renderer): pages the benchmark itself writes beside its JSON
PAGES: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    (os.path.join(RESULTS, "step_time.md"), "step_time.json", _page("benchmarks.step_time", "render_markdown")),
    (os.path.join(RESULTS, "outliers.md"), "outliers.json", _page("benchmarks.outliers", "render")),
    (os.path.join(RESULTS, "distributed.md"), "distributed.json", _page("benchmarks.distributed", "_markdown")),
    (os.path.join(RESULTS, "finetune.md"), "finetune.json", _page("benchmarks.finetune", "render")),
    (os.path.join(RESULTS, "finetune_lm.md"), "finetune_lm.json", _page("benchmarks.finetune_lm", "render")),
    (os.path.join(RESULTS, "finetune_cnn.md"), "finetune_cnn.json", _page("benchmarks.finetune_cnn", "render")),
    (os.path.join(RESULTS, "finetune_lm_ptq.md"), "finetune_lm_ptq.json", _page("benchmarks.finetune_lm", "render")),
]
# (plot, result file, module, function(result, path))
PLOTS: list[tuple[str, str, str, str]] = [
    (os.path.join(RESULTS, "step_time.png"), "step_time.json", "benchmarks.step_time", "plot"),
]


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- report.py: {name} -->", f"<!-- /report.py: {name} -->"


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the lines between ``name``'s markers replaced by ``body``; a missing marker is an error."""
    begin, end = _markers(name)
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"report.py: expected one {begin} ... {end} block")
    return pattern.sub(lambda _: f"{begin}\n{body.rstrip()}\n{end}", text)


def generate() -> dict[str, str]:
    """Every generated text file's new content, by path (only for the result files that exist)."""
    out: dict[str, str] = {}
    for path, result_file, render in PAGES:
        result = load(result_file)
        if result is not None:
            out[path] = render(result)
    for path, name, result_file, render in BLOCKS:
        result = load(result_file)
        if result is None:
            continue
        if path not in out:
            with open(path) as f:
                out[path] = f.read()
        out[path] = replace_block(out[path], name, render(result))
    return out


def check() -> list[str]:
    """Unified diffs of every generated file that differs from what is on disk (empty: all up to date)."""
    diffs = []
    for path, new in generate().items():
        old = open(path).read() if os.path.exists(path) else ""
        if old != new:
            rel = os.path.relpath(path, ROOT)
            diffs.append("".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), rel, rel)))
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 where a generated file differs")
    p.add_argument("--no-plots", action="store_true", help="rewrite the text files only")
    a = p.parse_args(argv)
    if a.check:
        diffs = check()
        print("\n".join(diffs) if diffs else "benchmark tables match benchmarks/results/*.json")
        return 1 if diffs else 0
    for path, text in generate().items():
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {os.path.relpath(path, ROOT)}")
    if not a.no_plots:
        import importlib

        for path, result_file, module, fn in PLOTS:
            result = load(result_file)
            if result is not None:
                getattr(importlib.import_module(module), fn)(result, path)
                print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
