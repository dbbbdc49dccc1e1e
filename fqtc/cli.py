"""The ``fqtc`` command line: ``fqtc demo | train | inspect | export | bench``.

Each verb lives in its own ``_cmd_<verb>`` function registered in `build_parser`; heavy imports happen inside the
command so ``fqtc --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from fqtc.demo import run_demo

    run_demo(epochs=args.epochs, quick=args.quick, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fqtc", description="fully quantized training compiler for PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="train an MLP and a CNN on scikit-learn digits: FP32 vs fqt W8A8G8 vs W4A4G8")
    d.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the demo's own)")
    d.add_argument("--quick", action="store_true", help="a few steps per run (smoke test)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
