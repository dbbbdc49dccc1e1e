"""Accuracy benchmarks of fully quantized training vs FP32, one section per feature.

Usage::

    python -m benchmarks.accuracy --section models [--quick] [--out benchmarks/results]
    python -m benchmarks.accuracy --list

Each section is a module ``benchmarks.<module>`` exposing ``run(args) -> list[dict]`` (one dict per table row,
measured in this run) and optionally ``add_args(parser)`` for its own flags. The CLI prints the rows as a Markdown
table together with the command, machine and library versions, so the output can be pasted into
benchmarks/README.md as is. Sections may also write files (plots, JSON) under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from typing import Any

# section name -> module under benchmarks/
SECTIONS: dict[str, str] = {
    "models": "benchmarks.acc_models",  # CNN on Fashion-MNIST, char-GPT on KJV: FP32 vs W8A8G8 vs W4A4G8
    "gradq": "benchmarks.acc_gradq",  # gradient quantizers
    "lwq": "benchmarks.acc_lwq",  # low-bit latent weights
}


def environment() -> dict[str, str]:
    """Machine and versions recorded next to every table."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def load_section(name: str):
    if name not in SECTIONS:
        raise SystemExit(f"unknown section {name!r}; available: {', '.join(SECTIONS)}")
    try:
        return importlib.import_module(SECTIONS[name])
    except ModuleNotFoundError as e:
        if e.name == SECTIONS[name]:
            raise SystemExit(f"section {name!r}: module {SECTIONS[name]} does not exist yet") from e
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--section")
    known, _ = pre.parse_known_args(argv)

    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--section", choices=sorted(SECTIONS), help="which benchmark section to run")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    p.add_argument("--quick", action="store_true", help="reduced sizes (minutes on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results", help="folder for plots and JSON results")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    module = load_section(known.section) if known.section else None
    if module is not None and hasattr(module, "add_args"):
        module.add_args(p)
    args = p.parse_args(argv)
    if args.list or not args.section:
        for k, v in SECTIONS.items():
            print(f"{k:10s} {v}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    rows = module.run(args)
    env = environment()
    print(f"\n## accuracy --section {args.section}\n")
    print("command: python -m benchmarks.accuracy " + " ".join(argv))
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"wall time: {time.time() - t0:.0f} s\n")
    print(markdown_table(rows))
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    with open(os.path.join(args.out, f"accuracy_{args.section}.json"), "w") as f:
        json.dump({"command": argv, "env": env, "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
