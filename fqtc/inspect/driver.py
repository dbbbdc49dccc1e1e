"""The driver of `fqtc.explain`: compile a model with the fqt backend, run one forward and one backward pass on
example inputs without touching ``.grad``, the step counter or BatchNorm buffers, and build the `Report`
(`fqtc.inspect.report`). `compile_and_capture`, `preserve_step`, `preserve_buffers`, `KeepAll`, `clone_args`,
`grad_like` and `storage_key` are shared with the ONNX export (`fqtc.export.onnx`)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
from functools import partial
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import Tensor

from fqtc import coverage
from fqtc.config import BitConfig, FQTConfig
from fqtc.inspect.report import Memory, Report, SavedTensor, Site
from fqtc.ops.observe import sqnr_db


# -- explain -----------------------------------------------------------------------------------------------------
def _saved_tensors(cg: Any) -> list[SavedTensor]:
    """Tensors the forward graph saves for backward = the backward graph's non-tangent placeholders."""
    out: list[SavedTensor] = []
    if cg.backward is None:
        return out
    for n in cg.backward.graph.nodes:
        if n.op != "placeholder" or n.name.startswith("tangents"):
            continue
        val = n.meta.get("val")
        if not isinstance(val, Tensor):
            continue
        try:
            numel = int(val.numel())
        except (TypeError, RuntimeError):  # symbolic size: not measurable from meta
            continue
        kind = "input" if n.name.startswith("primals") else "activation"
        out.append(SavedTensor(n.name, str(val.dtype).replace("torch.", ""), [int(s) for s in val.shape],
                               numel * val.element_size(), kind))
    return out


def _flat_tensors(out: Any) -> list[Tensor]:
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t for t in leaves if isinstance(t, Tensor)]


def grad_like(t: Tensor) -> Tensor:
    """The ``grad_output`` explain feeds backward: seeded N(0, 1), not ones. A constant gradient makes every
    column of the backward gradients constant, which a per-column quantizer represents exactly (infinite SQNR)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(t.shape, generator=g, dtype=torch.float32).to(device=t.device, dtype=t.dtype)


def _run_once(compiled: Any, inputs: Sequence[Any], model: torch.nn.Module) -> None:
    """One forward and (when anything needs grad) one backward, without touching ``.grad``."""
    outs = [t for t in _flat_tensors(compiled(*inputs)) if t.requires_grad]
    wrt = [p for p in model.parameters() if p.requires_grad]
    wrt += [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    if outs and wrt:
        torch.autograd.grad(outs, wrt, [grad_like(o) for o in outs], allow_unused=True)


def compile_and_capture(model: torch.nn.Module, inputs: Sequence[Any], config: FQTConfig,
                         record_args: bool = False) -> tuple[list[Any], dict[int, dict[str, list]]]:
    from fqtc.backend import capture, fqt_backend

    with capture() as cgs, coverage.silenced(model):  # inspection reports what ran outside; it does not warn
        compiled = torch.compile(model, backend=partial(fqt_backend, options=config))
        _run_once(compiled, inputs, model)
    args: dict[int, dict[str, list]] = {}
    if record_args and cgs:
        # Re-run with a hook on each forward graph module to get its exact runtime inputs (parameters, data);
        # `_gemm_sqnr` replays them in an fx.Interpreter that keeps every intermediate value.
        handles = []
        for i, cg in enumerate(cgs):
            args[i] = {}
            for which in ("forward", "inference"):
                gm = getattr(cg, which)
                if gm is not None:
                    handles.append(gm.register_forward_pre_hook(partial(_record_args, args[i], which)))
        try:
            with coverage.silenced(model):
                _run_once(compiled, inputs, model)
        finally:
            for h in handles:
                h.remove()
    return list(cgs), args


def _record_args(store: dict[str, list], which: str, mod: Any, a: tuple) -> None:
    """Snapshot a graph's runtime inputs: clones, because the graph updates some in place (BatchNorm running
    statistics are copied into their buffers at the end of the forward graph), and the storage keys of the
    originals under ``<which>.keys`` (so exporters can name parameters and buffers)."""
    store[which] = [x.detach().clone() if isinstance(x, Tensor) else x for x in a]
    store[which + ".keys"] = [storage_key(x) if isinstance(x, Tensor) else None for x in a]


def storage_key(t: Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.dtype)


def clone_args(args: Sequence[Any]) -> list[Any]:
    return [a.clone() if isinstance(a, Tensor) else a for a in args]


@contextlib.contextmanager
def preserve_buffers(model: torch.nn.Module):
    """Restore the model's buffers (BatchNorm running statistics) after the extra runs inspect/export make."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


class KeepAll(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)


def _gemm_sqnr(cg: Any, graph_args: dict[str, list]) -> dict[str, float]:
    """SQNR (dB) of every rewritten GEMM's output vs the same product of its unquantized operands, keyed by the
    qgemm node name. The operands' full-precision bases are taken from the same run (forward values for saved
    activations), so each figure is the error that GEMM's quantizers introduce, not the accumulated error."""
    envs: dict[str, Any] = {}
    nodes: dict[str, fx.Node] = {}
    gms = []
    for which in ("forward", "inference", "backward"):  # forward first: backward placeholders alias its outputs
        gm = getattr(cg, which)
        if gm is None:
            continue
        if which == "backward":
            # backward reads the forward outputs of the same names (saved tensors) and one tangent per output
            run_args = []
            for n in gm.graph.find_nodes(op="placeholder"):
                val = n.meta.get("val")
                run_args.append(grad_like(val) if n.name.startswith("tangents") and isinstance(val, Tensor)
                                else envs.get(n.name))
        elif which in graph_args:
            run_args = graph_args[which]
        else:
            continue
        interp = KeepAll(gm)
        interp.run(*clone_args(run_args))  # graphs may update inputs in place (BatchNorm buffers)
        for n, v in interp.env.items():
            envs.setdefault(n.name, v) if n.op == "placeholder" else envs.__setitem__(n.name, v)
            if n.op != "placeholder" or n.name not in nodes:
                nodes[n.name] = n
        gms.append(gm)

    from fqtc.passes.common import IDENTITIES, TRANSPOSES

    def resolve(n: fx.Node) -> fx.Node:
        return nodes.get(n.name, n) if n.op == "placeholder" else n

    def fp_operand(arg: Any, scale: Any) -> Tensor | None:
        if not isinstance(arg, fx.Node):
            return None
        if scale is None:
            return envs.get(arg.name)
        chain: list[fx.Node] = []
        n = resolve(arg)
        while n.op == "call_function" and n.target in TRANSPOSES + IDENTITIES:
            if n.target in TRANSPOSES:
                chain.append(n)
            n = resolve(n.args[0])
        if (n.meta.get("fqt") or {}).get("kind") == "codes_decode":  # codes carrying a ReLU mask (save_act)
            n = nodes.get(n.meta["fqt"]["codes"], n)
        if n.target is not operator.getitem or not isinstance(n.args[0], fx.Node):
            return None
        q = resolve(n.args[0])
        if (q.meta.get("fqt") or {}).get("kind") != "quantize" or not isinstance(q.args[0], fx.Node):
            return None
        base = envs.get(q.args[0].name)
        if base is None:
            return None
        for t in reversed(chain):
            base = t.target(base, *t.args[1:], **t.kwargs)
        return base

    out: dict[str, float] = {}
    for gm in gms:
        for n in gm.graph.nodes:
            rec = n.meta.get("fqt") or {}
            if "role" not in rec or "kind" in rec or not _is_fqt_op(n.target):
                continue
            # fqt GEMM ops take (codes, scale) pairs first, a None scale marking a full-precision operand
            # (fqt::qgemm, fqt::qconv2d*): the reference is the same op on the unquantized operands.
            args = list(n.args)
            if len(args) < 4 or not all(isinstance(args[i], fx.Node) for i in (0, 2)):
                continue
            fa, fb = fp_operand(args[0], args[1]), fp_operand(args[2], args[3])
            got = envs.get(n.name)
            if fa is None or fb is None or not isinstance(got, Tensor):
                continue
            ref_args = [fa.float(), None, fb.float(), None] + [
                envs[a.name] if isinstance(a, fx.Node) else a for a in args[4:]]
            ref = n.target(*ref_args, **n.kwargs)
            out[n.name] = sqnr_db(ref, got)
    return out


def _is_fqt_op(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "fqt"


@contextlib.contextmanager
def preserve_step():
    from fqtc.ops.stepcounter import restore, snapshot

    steps = snapshot()  # every model's step counter: inspecting a model must not move any training stream
    try:
        yield
    finally:
        restore(steps)


def explain(model: torch.nn.Module, *example_inputs: Any, options: Mapping[str, Any] | FQTConfig | None = None,
            sqnr: bool = False, memory: bool = True) -> Report:
    """Compile ``model`` with the fqt backend and report every GEMM's quantization decisions.

    Args:
        model: the module to inspect (unchanged: ``.grad``, buffers and the fqt step counter are restored).
        example_inputs: positional inputs of one forward call. Make an input ``requires_grad`` to see the
            ``grad_input`` GEMM of the first layer.
        options: the fqt options dict (or an `FQTConfig`), as given to ``torch.compile(..., options=...)``. The
            graphs run as FX modules (``compiler="eager"``) so their values can be inspected.
        sqnr: also measure each rewritten GEMM's output SQNR vs the unquantized product on these inputs.
        memory: also compile with ``bits="fp"`` and compare the bytes saved for backward.

    Returns:
        A `Report`; ``print(report)`` shows the table.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fqtc.explain: model must be a torch.nn.Module, got {type(model).__name__}")
    if not example_inputs:
        raise ValueError("fqtc.explain: give at least one example input, e.g. explain(model, torch.randn(8, 64))")
    config = dataclasses.replace(FQTConfig.from_options(options), compiler="eager")
    if config.bits.auto and config.calibration is None:
        # the backend would run these inputs through its online calibration, in full precision: not the graph
        # that trains after it
        raise ValueError("fqtc.explain: bits='auto' without 'calibration' is calibrated online during the first "
                         "training steps, so there is no quantized graph to explain yet; pass "
                         "options['calibration'] = fqtc.calibrate(model, batches, loss_fn)")
    with preserve_step(), preserve_buffers(model):
        cgs, graph_args = compile_and_capture(model, example_inputs, config, record_args=sqnr)
        outside = coverage.outside(model)  # GEMM modules no fqt graph received, e.g. all of them if Dynamo skipped
        sites: list[Site] = []
        for i, cg in enumerate(cgs):
            measured = _gemm_sqnr(cg, graph_args.get(i, {})) if sqnr else {}
            for rec in cg.records:
                s = Site.from_record(rec, i)
                if sqnr:
                    s.sqnr_db = measured.get(s.node, math.inf if s.status == "full_precision" else None)
                sites.append(s)
        mem = None
        if memory and any(cg.backward is not None for cg in cgs):
            # FP32 baseline: same partitioner, every GEMM in full precision (rules could re-enable bits)
            fp_cfg = dataclasses.replace(config, bits=BitConfig.parse("fp"), rules=(), keep_fp=(), log_sqnr=())
            fp_cgs, _ = compile_and_capture(model, example_inputs, fp_cfg)
            mem = Memory([t for cg in cgs for t in _saved_tensors(cg)],
                         [t for cg in fp_cgs for t in _saved_tensors(cg)])
    counters = [dict(cg.result.counters) if cg.result else {} for cg in cgs]
    return Report(config.short_str(), sites, mem, counters, cgs, _saved_activations(cgs), outside)


def _saved_activations(cgs: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per non-GEMM saved activation the passes rewrote (records of kind ``saved_activation`` and
    ``relu_mask``, fqtc/passes/save_act.py): op, bits, storage, fp32 bytes and the bytes now saved instead."""
    rows = []
    for i, cg in enumerate(cgs):
        for n in (cg.joint.graph.nodes if cg.joint is not None else ()):
            rec = n.meta.get("fqt") or {}
            if rec.get("kind") not in ("saved_activation", "relu_mask"):
                continue
            storage = rec.get("storage") or (f"int{rec['bits']} codes + scale over dims {rec.get('reduce_dims')}, "
                                             f"{rec.get('rounding')}")
            rows.append({"graph": i, "node": n.name, "op": rec.get("op"), "bits": rec.get("bits"),
                         "storage": storage, "shape": rec.get("shape"), "fp32_bytes": rec.get("fp32_bytes"),
                         "bytes": rec.get("bytes")})
    return rows

