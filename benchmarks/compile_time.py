"""Where the first step's compile time goes: FP32 Inductor vs fqt W8A8G8 with Inductor, with and without
stochastic rounding of the gradients.

    .venv/bin/python benchmarks/compile_time.py            # GPT of benchmarks/step_time.py (~3 min on 2 cores)

Each configuration runs in its own process with a fresh, empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR`` set to a
new temporary directory), so every kernel is generated and compiled. Reported per configuration: the first training
step (forward + backward, which compiles both graphs), and torch's own compile-phase times
(``torch._dynamo.utils.compile_times``): Inductor's lowering (``GraphLowering.run``), scheduling
(``Scheduler.__init__``), code generation (``Scheduler.codegen``) and the C++ compiler (``compile_file``; kernels
compile in parallel workers, so this sum can exceed the wall time it adds).

Configurations: ``fp32`` (``torch.compile(model)``), ``fqt`` (``backend="fqt"``, ``bits="W8A8G8"``, the default
stochastic gradient rounding), ``fqt-nearest`` (the same with ``grad_rounding="nearest"``: no counter-based hash).
Output: ``<out>/compile_time.md`` and ``.json`` with machine, versions, load average and command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "fqt": {"bits": "W8A8G8"},
    "fqt-nearest": {"bits": "W8A8G8", "grad_rounding": "nearest"},
}
PHASES = ("GraphLowering.run", "Scheduler.__init__", "Scheduler.codegen", "compile_file")


def measure(config: str, threads: int) -> dict[str, Any]:
    """One configuration's first step and compile phases (run inside the child process)."""
    import time

    import torch
    import torch._dynamo.utils as du

    from benchmarks.models import CharGPT, lm_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    b, t = 8, 128
    idx = torch.randint(0, 256, (b, t + 1))
    model = CharGPT(vocab_size=256, dim=256, heads=4, layers=2, max_len=t)
    opts = CONFIGS[config]
    fn = torch.compile(model) if opts is None else torch.compile(model, backend="fqt", options=opts)
    t0 = time.perf_counter()
    lm_loss(fn(idx[:, :-1]), idx[:, 1:]).backward()
    first = time.perf_counter() - t0
    head, row = du.compile_times(repr="csv", aggregate=True)
    times = dict(zip(head, row))
    return {"config": config, "first_step_s": first, **{p: float(times.get(p) or 0.0) for p in PHASES}}


def render(result: dict[str, Any]) -> str:
    from benchmarks.step_time import machine_lines

    info = result["machine"]
    table = {"threads": result["threads"], "steps": 1, "rounds": 1, "warmup": 0, "date": result["date"],
             "loadavg_before": result["load_before"], "loadavg_after": result["load_after"]}
    lines = ["# Compile time of the first training step (benchmarks/compile_time.py)", "",
             "GPT 2 layers, d 256, 4 heads, T 128, batch 8 (benchmarks/step_time.py's `gpt`); each configuration in "
             "its own process with an empty Inductor cache.", "",
             *machine_lines(info, table, result["command"]), "",
             "| config | first step s | lowering s | scheduler s | codegen s | C++ compile s (summed over workers) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['first_step_s']:.1f} | {r['GraphLowering.run']:.1f} | "
                     f"{r['Scheduler.__init__']:.1f} | {r['Scheduler.codegen']:.1f} | {r['compile_file']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.threads)))
        return {}
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown config(s) {sorted(unknown)}; available: {', '.join(CONFIGS)}")
    from benchmarks.step_time import publish, run_record

    load_before = os.getloadavg()
    rows = []
    for config in configs:
        with tempfile.TemporaryDirectory(prefix="fqtc-inductor-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", config, "--threads",
                                  str(args.threads)], capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{config} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    result = {"rows": rows, **run_record("compile_time.py", argv), "threads": args.threads,
              "load_before": load_before, "load_after": os.getloadavg()}
    publish(result, render(result), args.out, "compile_time", not args.no_save)
    return result


if __name__ == "__main__":
    main()
