"""The ``fqtc`` command line: ``fqtc demo | inspect | export | bench``.

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


# ``fqtc bench <name> [args]``: each benchmark is a module with ``main(argv) -> int``; add yours here.
_BENCHES: dict[str, str] = {
    "kernels": "fqtc.codegen.bench",  # Triton kernels: traffic model vs minimum, CUDA timings (docs/kernels.md)
}


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module(_BENCHES[args.name]).main(args.rest) or 0)


def _load_model_and_inputs(args: argparse.Namespace):
    """``MODULE:FACTORY`` -> model (factory called with ``--kwargs``), one seeded random input per ``--input-shape``."""
    import importlib
    import json

    import torch

    if ":" not in args.target:
        raise SystemExit(f"fqtc {args.cmd}: expected MODULE:FACTORY (e.g. benchmarks.models:MLP), got {args.target!r}")
    mod_name, factory = args.target.split(":", 1)
    if "" not in sys.path:
        sys.path.insert(0, "")  # so MODULE may be a file of the current directory, as with python -m
    try:
        fn = getattr(importlib.import_module(mod_name), factory)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"fqtc {args.cmd}: cannot load {args.target!r}: {e}") from e
    model = fn(**json.loads(args.kwargs))
    torch.manual_seed(args.seed)
    inputs = []
    for shape in args.input_shape or []:
        dims = [int(d) for d in shape.split(",") if d]
        if args.input_dtype == "long":
            inputs.append(torch.randint(0, args.input_high, dims))
        else:
            inputs.append(torch.randn(dims))
    if not inputs:
        raise SystemExit(f"fqtc {args.cmd}: give --input-shape, e.g. --input-shape 8,64")
    options = json.loads(args.options) if args.options else None
    return model, inputs, options


def _cmd_inspect(args: argparse.Namespace) -> int:
    from fqtc.inspect import explain

    model, inputs, options = _load_model_and_inputs(args)
    report = explain(model, *inputs, options=options, sqnr=args.sqnr)
    if args.json:
        print(report.to_json())
    else:
        print(report)
    for which in args.graph or []:
        print(f"--- {which} graph ---")
        print(report.graph(which))
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(report.to_dot(args.dot_graph))
        print(f"wrote {args.dot}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fqtc.config import FQTConfig
    from fqtc.export.onnx import export_onnx

    model, inputs, options = _load_model_and_inputs(args)
    optimizer = None
    if FQTConfig.from_options(options).bits.latent is not None:  # latent bits (e.g. W8A8G8L4): LWQ storage
        from fqtc.optim.latent import prepare

        prepare(model, options)
    if args.optimizer and not args.inference:
        from fqtc import optim

        cls = {"sgd": optim.SGD, "adamw": optim.AdamW}[args.optimizer]
        kw = {"momentum": args.momentum} if args.optimizer == "sgd" else {}
        optimizer = cls(model.parameters(), lr=args.lr, state_bits=args.state_bits, **kw)
    elif args.optimizer:
        raise SystemExit("fqtc export: --optimizer exports the update graph of a training export; drop --inference")
    try:
        paths = export_onnx(model, inputs, args.out, options=options, training=not args.inference, sr=args.sr,
                            optimizer=optimizer)
    except ValueError as e:
        if optimizer is None and "optimizer" in str(e):
            raise SystemExit(f"fqtc export: {e} (on the command line: --optimizer sgd|adamw --lr LR)") from e
        raise
    for path in paths:
        print(f"wrote {path}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="MODULE:FACTORY", help="e.g. benchmarks.models:MLP (called with --kwargs)")
    p.add_argument("--input-shape", action="append", metavar="D0,D1,...",
                   help="shape of one example input (repeat for several inputs), e.g. 8,64")
    p.add_argument("--input-dtype", choices=("float", "long"), default="float",
                   help="float: N(0,1) inputs; long: token ids in [0, --input-high)")
    p.add_argument("--input-high", type=int, default=64, help="upper bound of long inputs (vocabulary size)")
    p.add_argument("--kwargs", default="{}", help="JSON keyword arguments of the factory")
    p.add_argument("--options", default=None, help='JSON fqt options, e.g. \'{"bits": "W4A8G8"}\'')
    p.add_argument("--seed", type=int, default=0, help="seed of the example inputs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fqtc", description="fully quantized training compiler for PyTorch")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="train an MLP and a CNN on scikit-learn digits: FP32 vs fqt W8A8G8 vs W4A4G8")
    d.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the demo's own)")
    d.add_argument("--quick", action="store_true", help="a few steps per run (smoke test)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_cmd_demo)

    b = sub.add_parser("bench", help="benchmarks: " + ", ".join(sorted(_BENCHES)))
    b.add_argument("name", choices=sorted(_BENCHES), help="which benchmark")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of that benchmark (see fqtc bench NAME --help)")
    b.set_defaults(fn=_cmd_bench)

    i = sub.add_parser("inspect", help="table of every GEMM: role, bits, quantizer, status, reason (fqtc.explain)")
    _add_model_args(i)
    i.add_argument("--sqnr", action="store_true", help="measure each GEMM's output SQNR on the example inputs")
    i.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    i.add_argument("--graph", action="append", choices=("joint", "forward", "backward", "inference"),
                   help="also print this rewritten graph with annotations (repeatable)")
    i.add_argument("--dot", default=None, metavar="PATH", help="write the annotated graph as DOT to PATH")
    i.add_argument("--dot-graph", default="joint", choices=("joint", "forward", "backward", "inference"))
    i.set_defaults(fn=_cmd_inspect)

    e = sub.add_parser("export", help="write the quantized forward/backward (and update) graphs as ONNX "
                                      "(fqtc.export_onnx)")
    _add_model_args(e)
    e.add_argument("--out", required=True, metavar="PATH.onnx", help="PATH.forward.onnx and PATH.backward.onnx")
    e.add_argument("--inference", action="store_true", help="export the inference graph to PATH.onnx instead")
    e.add_argument("--sr", choices=("random", "counter"), default="random",
                   help="stochastic rounding: RandomUniformLike, or com.fqt::CounterUniform (same bits as PyTorch)")
    e.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="also write PATH.update.onnx, one fqtc.optim step (needed with latent bits, e.g. W8A8G8L4)")
    e.add_argument("--lr", type=float, default=1e-3, help="learning rate of --optimizer")
    e.add_argument("--momentum", type=float, default=0.0, help="momentum of --optimizer sgd")
    e.add_argument("--state-bits", type=int, choices=(8, 32), default=32, help="optimizer state bits")
    e.set_defaults(fn=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
