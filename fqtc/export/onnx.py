"""Export fqt's quantized training graphs (forward, backward, latent-weight update) to ONNX, opset 21.

``fqtc.export_onnx(model, example_inputs, path)`` compiles the model with the fqt backend, takes the partitioned
forward and backward graphs the partitioner produced (the graphs that run in training) and exports each with
``torch.onnx.export(dynamo=True)``; aten ops use torch's own ONNX translations, fqt ops the translations below
(docs/inspect_export.md has the full table):

| fqt op | ONNX |
|---|---|
| ``fqt::step`` | a graph input ``fqt_step`` (int64 scalar): the runtime owns the step counter |
| ``fqt::quantize`` (nearest, 8 bits, per-tensor/per-axis scale) | ``ReduceMax(Abs)``/qmax scale, ``QuantizeLinear`` |
| ``fqt::quantize`` (nearest, other) | ``Round(x / s)``, ``Clip(-qmax, qmax)``, ``Cast(INT8)`` |
| ``fqt::quantize`` (stochastic, ``sr="random"``) | ``Floor(x / s + RandomUniformLike(x))``, ``Clip``, ``Cast`` |
| ``fqt::quantize`` (stochastic, ``sr="counter"``) | ``Floor(x / s + com.fqt::CounterUniform(...))``: bit-exact |
| ``fqt::qgemm`` (int8 operands, scales off the reduction axis) | ``MatMulInteger``, ``Cast``, ``Mul`` by the scales |
| ``fqt::qgemm`` (other) | ``Mul(Cast(codes), scale)`` per operand (the dequantized product), ``MatMul`` |
| ``fqt::quantize_block`` | ``Pad``/``Reshape`` into blocks, per-block scale and rounding (`fqtc.export.onnx_block`) |
| ``fqt::block_gemm`` | opset-21 blocked ``DequantizeLinear`` (``block_size`` along K) per operand, ``MatMul`` |
| ``fqt::observe`` (``log_sqnr``) | ``Identity`` of the scale (logging is a PyTorch-side debug switch) |
| ``fqt::grad_quantize`` (PTQ/PSQ/SCQ) | as ``fqt::quantize`` over the groups (the same non-finite policy, ``IsNaN``) |
| ``fqt::grad_quantize`` (AQ, AQ top-k) | ``TopK``/``CumSum`` group sampling (`fqtc.export.onnx_gradq`), then as PSQ |
| ``fqt::bhq`` | the block Householder transform from ``TopK``/``CumSum``/masks, ``ScatterElements(add)`` |
| ``fqt::bhq_quantize`` / ``fqt::bhq_invert`` | the two halves of ``fqt::bhq`` (codes of ``T x``, the transform) |
| ``fqt::lwq_unpack``, ``fqt::lwq_dequantize`` | nibble unpacking, codebook ``Gather`` (`fqtc.export.onnx_lwq`) |
| ``fqt::lwq_step`` (update graph) | decode, SGD/AdamW math, re-encode with SR (`fqtc.export.onnx_lwq`) |
| ``fqt::qconv2d`` | ``ConvInteger`` + scale epilogue (or ``Conv`` on dequantized operands) |
| ``fqt::qconv2d_input`` | ``ConvTranspose`` on fp32-cast codes + scale epilogue |
| ``fqt::qconv2d_weight`` | grouped ``ConvInteger`` over the batch (x regrouped, g^T), ``Slice``, ``Transpose`` |

The ``com.fqt`` domain (version 1) holds what no standard op expresses. Each of its ops ships as a model-local
``FunctionProto`` whose body uses only standard ops, so any ONNX runtime runs it:

- ``com.fqt::Mix32(x: uint32) -> uint32``: the ``lowbias32`` integer hash of `fqtc.quant.rng`.
- ``com.fqt::CounterUniform(like: float, key: uint32[]) -> float``: U[0, 1) per element of ``like`` from the
  counter-based stream (element index, key), identical bits to `fqtc.quant.rng.uniform_like`.

A graph with an fqt op that has no translation yet fails before export with a `NotImplementedError` naming the
op (no silent fallback); an aten op torch cannot export fails with torch's error, re-raised naming the op.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import re
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import Tensor

from fqtc.config import FQTConfig
from fqtc.export._common import (
    _SR_MODE,
    FQT_DOMAIN,
    FQT_DOMAIN_VERSION,
)
from fqtc.export._names import grad_names, graph_outputs, saved_names
from fqtc.export.onnx_ops import OPSET, TRANSLATIONS, fqt_functions, register_schemas
from fqtc.inspect import driver as _inspect

SR_MODES = ("random", "counter")

__all__ = ["FQT_DOMAIN", "OPSET", "TRANSLATIONS", "ExportedGraph", "export_graph", "export_onnx", "fqt_functions"]


# -- graph preparation --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ExportedGraph:
    """One exported graph: where it was written and how its inputs/outputs map to the FX graph."""

    which: str
    path: str
    input_names: list[str]
    output_names: list[str]


def _op_name(target: Any) -> str:
    name = getattr(target, "name", None)
    return name() if callable(name) else str(target)


def check_exportable(gm: fx.GraphModule, which: str = "graph") -> None:
    """Raise `NotImplementedError` naming every fqt op of ``gm`` that has no ONNX translation."""
    missing: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        if n.target.namespace == "fqt" and n.target not in TRANSLATIONS and n.target != torch.ops.fqt.step.default:
            missing.setdefault(_op_name(n.target), []).append(n.name)
    if missing:
        ops = "; ".join(f"{op} (nodes {', '.join(nodes)})" for op, nodes in missing.items())
        known = ", ".join(sorted(_op_name(t) for t in TRANSLATIONS))
        raise NotImplementedError(
            f"fqtc.export_onnx: the {which} graph uses fqt op(s) with no ONNX translation: {ops}. Translated fqt "
            f"ops: fqt::step, {known}. Add a translation to fqtc.export.onnx.TRANSLATIONS, or keep the sites that "
            "use the op in full precision (option keep_fp) to export the rest."
        )


def _prepare(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[int]]:
    """A copy of ``gm`` with ``fqt::step`` turned into an input ``fqt_step`` and ``None`` outputs dropped.
    Returns (copy, positions of the kept outputs in the original output tuple)."""
    gm = copy.deepcopy(gm)
    g = gm.graph
    steps = list(g.find_nodes(op="call_function", target=torch.ops.fqt.step.default))
    placeholders = list(g.find_nodes(op="placeholder"))
    for s in steps:
        with g.inserting_after(placeholders[-1] if placeholders else next(iter(g.nodes))):
            ph = g.placeholder("fqt_step")
        ph.meta["val"] = s.meta.get("val")
        s.replace_all_uses_with(ph)
        g.erase_node(s)
    out = g.output_node()
    vals = out.args[0]
    vals = list(vals) if isinstance(vals, (tuple, list)) else [vals]
    kept = [i for i, v in enumerate(vals) if isinstance(v, fx.Node)]
    out.args = (tuple(vals[i] for i in kept),)
    g.lint()
    gm.recompile()
    return gm, kept


_REGISTRY: list[Any] = []
_DECOMPOSE = ("aten::_native_batch_norm_legit_functional", "aten::_native_batch_norm_legit", "aten::native_batch_norm",
              "aten::_native_batch_norm_legit.no_stats")


def _torch_onnx_export(gm: fx.GraphModule, args: tuple, names: list[str]) -> Any:
    """``torch.onnx.export(dynamo=True, custom_translation_table=TRANSLATIONS)``, reusing one translation registry:
    torch rebuilds it from torchlib on every call (2.5 s here, measured with cProfile), which dominated exporting
    a forward/backward pair. Falls back to the public call if the internal entry point moves."""
    try:
        from torch.onnx._internal.exporter import _core, _registration
    except ImportError:
        _core = None
    if _core is None or not hasattr(_core, "export"):
        return torch.onnx.export(gm, args, dynamo=True, opset_version=OPSET, custom_translation_table=TRANSLATIONS,
                                 input_names=names, optimize=False, verbose=False, report=False)
    if not _REGISTRY or _REGISTRY[0][1] != tuple(TRANSLATIONS.items()):
        registry = _registration.ONNXRegistry.from_torchlib(opset_version=OPSET)
        # Training-mode batch norm becomes BatchNormalization(training_mode=1), which onnxruntime's inference
        # build runs with the running statistics (measured: ResNet forward outputs at 1-7 dB SQNR vs PyTorch).
        # Without a registry entry the exporter decomposes it into mean/var/rsqrt ops, which run as traced.
        for name in _DECOMPOSE:
            registry.functions.pop(name, None)
        for target, fn in TRANSLATIONS.items():
            registry.register_op(target, fn, is_complex=False)
        _REGISTRY[:] = [(registry, tuple(TRANSLATIONS.items()))]
    return _core.export(gm, args, registry=_REGISTRY[0][0], input_names=names, optimize=False, verbose=False,
                        report=False, opset_version=OPSET)


def _unique(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}_{k}")
    return out


def export_graph(gm: fx.GraphModule, args: Sequence[Any], path: str, which: str = "graph",
                 input_names: Sequence[str] | None = None, sr: str = "random",
                 metadata: Mapping[str, str] | None = None,
                 output_names: Sequence[str | None] | None = None) -> ExportedGraph:
    """Export one fqt graph module (forward, backward, inference or update) to ``path``.

    ``args`` are its inputs in placeholder order; a ``fqt::step`` node becomes the input ``fqt_step``, which must be
    given last-but-placeholders order as `export_onnx` does (after the original placeholders). ``None`` outputs
    (gradients of inputs that need none) are dropped. ``output_names`` renames the (kept) outputs (``None``
    keeps the exporter's name, as does leaving it out; a graph input's name outputs that input unchanged). The
    model is checked with ``onnx.checker.check_model(full_check=True)`` before it is written.
    """
    import onnx

    if sr not in SR_MODES:
        raise ValueError(f"fqtc.export_onnx: sr={sr!r}; allowed: {', '.join(SR_MODES)}")
    check_exportable(gm, which)
    prepared, kept = _prepare(gm)
    placeholders = [n.name for n in prepared.graph.find_nodes(op="placeholder")]
    if len(args) != len(placeholders):
        raise ValueError(f"fqtc.export_onnx: {which} graph has {len(placeholders)} inputs {placeholders}, "
                         f"got {len(args)} example values")
    names = _unique(list(input_names) if input_names is not None else placeholders)
    outs = prepared.graph.output_node().args[0]
    out_names = _unique([o.name for o in outs])
    register_schemas()
    _SR_MODE[0] = sr
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            prog = _torch_onnx_export(prepared, tuple(args), names)
    except Exception as e:  # name the op torch could not translate (a clear error naming the op)
        text = str(e)
        ours = re.search(r"fqtc\.export_onnx: [^\n]*", text)
        if ours:
            raise NotImplementedError(ours.group(0)) from e
        m = re.search(r"No ONNX function found for ([^\s'\"]+)", text)
        node = re.search(r"Error when translating node %(\w+) : [^\n]*?target=([^\]]+)\]", text)
        what = f"op {m.group(1).rstrip('.')}" if m else (f"node {node.group(1)} ({node.group(2)})" if node else "an op")
        raise NotImplementedError(f"fqtc.export_onnx: exporting the {which} graph failed on {what}; keep the sites "
                                  f"that use it in full precision or add a translation. Cause: "
                                  f"{text.splitlines()[0] if text else type(e).__name__}") from e
    finally:
        _SR_MODE[0] = "random"
    model = prog.model_proto
    if output_names is not None:
        if len(output_names) != len(model.graph.output):
            raise ValueError(f"fqtc.export_onnx: {len(output_names)} output names for the {which} graph's "
                             f"{len(model.graph.output)} outputs")
        graph_input_names = {i.name for i in model.graph.input}
        for o, new_name in zip(model.graph.output, output_names):
            if new_name is None or new_name == o.name:
                continue
            if new_name in graph_input_names:  # an input passed through (a saved parameter): output it as is
                o.name = new_name
                continue
            model.graph.node.append(onnx.helper.make_node("Identity", [o.name], [new_name]))  # keeps producers
            o.name = new_name
    uses_fqt = any(n.domain == FQT_DOMAIN for n in model.graph.node)
    if uses_fqt:
        model.functions.extend(fqt_functions())
        if not any(o.domain == FQT_DOMAIN for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(FQT_DOMAIN, FQT_DOMAIN_VERSION))
    model.doc_string = f"fqtc {which} graph (quantized training); fqt op translations: fqtc/export/onnx_ops.py"
    for k, v in (metadata or {}).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    model.metadata_props.append(onnx.StringStringEntryProto(key="fqt.graph", value=which))
    # output i of the ONNX model is output kept[i] of the FX graph, the FX node out_names[i]
    model.metadata_props.append(onnx.StringStringEntryProto(key="fqt.output_positions", value=json.dumps(kept)))
    model.metadata_props.append(onnx.StringStringEntryProto(key="fqt.output_names", value=json.dumps(out_names)))
    onnx.checker.check_model(model, full_check=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(model, path)
    return ExportedGraph(which, path, [i.name for i in model.graph.input], [o.name for o in model.graph.output])


# -- model-level API ----------------------------------------------------------------------------------------------
def graph_inputs(model: torch.nn.Module, example_inputs: Sequence[Any], options: Mapping[str, Any] | FQTConfig | None
                 = None, training: bool = True) -> list[dict[str, Any]]:
    """Compile ``model`` with fqt and return, per Dynamo graph, the graph modules and their runtime inputs:
    ``{"cg": CompiledGraph, "forward"/"backward"/"inference": (GraphModule, [args], [names])}``. The forward args
    end with the step value; backward args are the forward's saved outputs and seeded N(0,1) tangents."""
    config = dataclasses.replace(FQTConfig.from_options(options), compiler="eager")
    ctx = contextlib.nullcontext() if training else torch.no_grad()
    with _inspect.preserve_step(), _inspect.preserve_buffers(model), ctx:
        cgs, recorded = _inspect.compile_and_capture(model, example_inputs, config, record_args=True)
    out = []
    from fqtc.ops import get_step

    for i, cg in enumerate(cgs):
        entry: dict[str, Any] = {"cg": cg}
        fwd_name = "forward" if cg.forward is not None else "inference"
        gm = getattr(cg, fwd_name)
        if gm is None or fwd_name not in recorded.get(i, {}):
            continue
        args = list(recorded[i][fwd_name])
        phs = list(gm.graph.find_nodes(op="placeholder"))
        names = _input_names(model, phs, recorded[i].get(fwd_name + ".keys", []))
        has_step = bool(list(gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.step.default)))
        step = torch.tensor(get_step(model), dtype=torch.int64)
        input_names = list(names)
        if has_step:
            args.append(step)
            names.append("fqt_step")
        entry[fwd_name] = (gm, args, names)
        if training and cg.backward is not None:
            # the backward graph reads forward outputs by name: run the forward (same step) to get them
            interp = _inspect.KeepAll(_prepare(gm)[0])
            with _inspect.preserve_step():
                interp.run(*_inspect.clone_args(args))  # the forward updates BatchNorm buffers in place
            env = {n.name: v for n, v in interp.env.items()}
            step_names = {s.name for s in gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.step.default)}
            saved = saved_names(gm, cg.backward, input_names, step_names)
            bargs, bnames = [], []
            for n in cg.backward.graph.find_nodes(op="placeholder"):
                val = n.meta.get("val")
                if n.name.startswith("tangents"):
                    bargs.append(_inspect.grad_like(val))
                elif n.name in step_names:
                    bargs.append(step)  # the step node's value, saved for backward
                elif n.name in env:
                    bargs.append(env[n.name])
                else:
                    raise RuntimeError(f"fqtc.export_onnx: backward input {n.name!r} is not a forward output")
                bnames.append(saved.get(n.name, n.name))
            entry["backward"] = (cg.backward, bargs, bnames)
            entry["forward.output_names"] = [saved.get(o.name) for o in graph_outputs(gm) if isinstance(o, fx.Node)]
            entry["backward.output_names"] = grad_names(cg.backward, input_names)
        out.append(entry)
    return out


def _input_names(model: torch.nn.Module, placeholders: Sequence[fx.Node], keys: Sequence[tuple | None]
                 ) -> list[str]:
    """ONNX input names of a forward graph: ``param.<fqn>``/``buffer.<fqn>`` for the model's tensors (matched by
    storage, so the names are the model's own), the FX placeholder name for data inputs."""
    from fqtc.optim.latent import LatentWeight

    owned: dict[tuple, str] = {}
    for kind, items in (("buffer", model.named_buffers()), ("param", model.named_parameters())):
        for name, t in items:
            if isinstance(t, LatentWeight):  # graphs read its inner tensors (the update graph's names too)
                for inner in ("q", "r", "s", "mu"):
                    owned[_inspect.storage_key(getattr(t, inner))] = f"lwq.{name}.{inner}"
            else:
                owned[_inspect.storage_key(t)] = f"{kind}.{name}"
    names = [owned.get(k, n.name) if k is not None else n.name
             for n, k in zip(placeholders, list(keys) + [None] * len(placeholders))]
    return _unique(names)


def export_onnx(model: torch.nn.Module, example_inputs: Sequence[Any] | Tensor, path: str,
                options: Mapping[str, Any] | FQTConfig | None = None, training: bool = True,
                sr: str = "random", optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Write the fqt-quantized graphs of ``model`` as ONNX (opset 21) and return the paths written.

    Args:
        model: the module; compiled with the fqt backend on ``example_inputs`` (its ``.grad`` and the fqt step
            counter are left unchanged).
        example_inputs: the inputs of one forward call (a tensor or a sequence of them).
        path: ``"dir/name.onnx"``. With ``training=True``: ``dir/name.forward.onnx`` (inputs: parameters as
            ``param.<name>``, data, ``fqt_step``; outputs: the model outputs, then the tensors saved for backward,
            named after the input they are or ``saved.<fx name>``) and ``dir/name.backward.onnx`` (inputs: the saved
            tensors under the forward outputs' names, ``tangents_*``; outputs: ``grad.<name>`` per parameter and
            ``grad.<input>`` per data input that needs a gradient), so a runtime wires the graphs by name. With
            ``training=False``: the inference graph at ``path``. A model Dynamo splits into several graphs gets
            ``.g<i>`` before the suffix. With ``training=True`` and an ``optimizer`` (needed
            when the model has latent weights, `fqtc.prepare`): also ``dir/name.update.onnx``, one optimizer step
            (`fqtc.export.onnx_lwq`: inputs ``lwq.<name>.{q,r,s,mu}`` / ``param.<name>``, ``grad.<name>``,
            ``state.<name>.step``, ``state.<name>.buffers.<i>``; outputs ``<input>.new``, ``stats.<name>``,
            ``found_inf``).
        options: the fqt options (as for ``torch.compile``).
        training: export the training pair (forward + backward) or the inference graph.
        sr: stochastic rounding as ``"random"`` (standard ``RandomUniformLike``: not the same draws as PyTorch) or
            ``"counter"`` (``com.fqt::CounterUniform``: the same bits as fqtc's counter-based stream).
        optimizer: a `fqtc.optim` optimizer over the model's parameters: its kind, hyperparameters and current
            state define the update graph (the optimizer and model are not modified).

    Raises:
        NotImplementedError: the graphs use an op with no ONNX translation; the message names it.
        ValueError: ``training=True`` on a model with latent weights but no ``optimizer`` (the update graph needs
            one), or an ``optimizer`` with ``training=False``.
        TypeError: ``optimizer`` is not a `fqtc.optim` optimizer.
    """
    from fqtc.optim.latent import LatentWeight

    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    if not str(path).endswith(".onnx"):
        raise ValueError(f"fqtc.export_onnx: path must end with .onnx, got {path!r}")
    latent = [n for n, p in model.named_parameters() if isinstance(p, LatentWeight)]
    if training and latent and optimizer is None:
        raise ValueError(f"fqtc.export_onnx: the model has latent weights ({', '.join(latent[:3])}"
                         f"{', ...' if len(latent) > 3 else ''}), so training=True also writes their update graph, "
                         "which needs the optimizer: pass optimizer=fqtc.optim.SGD(...) or AdamW(...) (the one you "
                         "train with), or training=False for the inference graph")
    if optimizer is not None and not training:
        raise ValueError("fqtc.export_onnx: optimizer= is for the training export (the update graph); "
                         "drop it or pass training=True")
    if optimizer is not None:
        from fqtc.optim.base import LatentOptimizer

        if not isinstance(optimizer, LatentOptimizer):
            raise TypeError(f"fqtc.export_onnx: optimizer must be a fqtc.optim optimizer (SGD, AdamW), got "
                            f"{type(optimizer).__name__}; torch.optim optimizers cannot update latent weights")
    graphs = graph_inputs(model, example_inputs, options, training)
    if not graphs:
        raise RuntimeError("fqtc.export_onnx: the fqt backend compiled no graph for this model and input")
    if training and not any("forward" in e for e in graphs):
        raise ValueError("fqtc.export_onnx: training=True, but the model compiled no training graph (nothing "
                         "requires grad); make a parameter or input require grad, or pass training=False")
    stem = str(path)[: -len(".onnx")]
    written: list[str] = []
    for i, entry in enumerate(graphs):
        gtag = f".g{i}" if len(graphs) > 1 else ""
        records = json.dumps([_jsonable(r) for r in entry["cg"].records])
        meta = {"fqt.config": entry["cg"].config.short_str(), "fqt.records": records}
        for which in (("forward", "backward") if training else ("inference", "forward")):
            if which not in entry:
                continue
            gm, args, names = entry[which]
            if training:
                p = f"{stem}{gtag}.{which}.onnx"
            else:
                p = f"{stem}{gtag}.onnx"
            export_graph(gm, args, p, which, names, sr, meta, entry.get(which + ".output_names"))
            written.append(p)
            if not training:
                break
    if optimizer is not None:
        from fqtc.export import onnx_lwq

        gm, args, names, out_names = onnx_lwq.update_graph(optimizer, model)
        p = f"{stem}.update.onnx"
        meta = {"fqt.optimizer": type(optimizer).__name__}
        export_graph(gm, args, p, "update", names, sr, meta, out_names)
        written.append(p)
    return written


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)
