"""Inspect what the fqt backend did to a model: one row per GEMM, memory saved for backward, SQNR, graphs.

``fqtc.explain(model, *example_inputs, options=...)`` compiles the model with the fqt backend, runs one forward and
one backward pass on the example inputs (without touching ``.grad`` or the step counter) and returns a `Report`
built only from the ``node.meta["fqt"]`` records the passes wrote (fqtc/passes/README.md: one source of truth), so
what inspect shows is what the compiled graphs do:

- ``report.sites``: one `Site` per GEMM (``output``/``grad_input``/``grad_weight``) with its bits, quantizer,
  rounding, status (``quantized``/``partial``/``full_precision``) and the reason; no silent fallback;
- ``report.memory``: bytes of the tensors saved for backward, fqt vs the same model compiled with ``bits="fp"``;
- ``report.saved``: one row per non-GEMM saved activation (`fqtc.passes.save_act`): op, bits, storage, bytes
  saved vs fp32;
- ``report.sites[i].sqnr_db`` (``sqnr=True``): the SQNR of each GEMM's output against the same product of the
  unquantized operands, measured on the example inputs;
- ``str(report)`` (a rich table), ``to_dict()``/``to_json()``, ``graph("forward"|"backward"|"joint")``,
  ``to_dot()``/``to_svg()``.

Per-step logging of chosen sites (option ``log_sqnr``) goes through the ``fqt::observe`` op (`fqtc.ops.observe`):
the rewrite pass inserts it after the quantizers of matching sites; each call logs the operand's quantization SQNR
and range to the ``fqtc.debug`` logger and appends a record that `sqnr_log` (re-exported here) returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import operator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import Tensor

from fqtc import coverage
from fqtc.config import BitConfig, FQTConfig
from fqtc.ops.observe import clear_sqnr_log, sqnr_db, sqnr_log

__all__ = ["Report", "Site", "explain", "sqnr_db", "sqnr_log", "clear_sqnr_log"]


# -- report ------------------------------------------------------------------------------------------------------
@dataclass
class Site:
    """One GEMM as the passes recorded it. Operand dicts map ``input``/``weight``/``grad_output`` (``input2`` for
    the second activation of a ``bmm``) to a value, None for a full-precision operand."""

    name: str
    module: str
    module_type: str
    role: str
    op: str
    node: str
    graph: int
    shapes: dict[str, Any]
    bits: dict[str, int | None]
    granularity: dict[str, str | None]
    quantizer: dict[str, str | None]
    rounding: dict[str, str | None]
    status: str
    reason: str
    integer_gemm: bool
    notes: list[str] = field(default_factory=list)
    sqnr_db: float | None = None

    @staticmethod
    def from_record(rec: Mapping[str, Any], graph: int) -> "Site":
        ops = rec.get("operands") or {}

        def per(key: str) -> dict[str, Any]:
            return {name: (o.get(key) if o.get("bits") is not None else None) for name, o in ops.items()}

        return Site(
            name=str(rec.get("site", rec.get("node", "?"))), module=str(rec.get("module", "")),
            module_type=str(rec.get("module_type", "")), role=str(rec.get("role", "?")), op=str(rec.get("op", "?")),
            node=str(rec.get("node", "")), graph=graph, shapes=dict(rec.get("shapes") or {}),
            bits={name: o.get("bits") for name, o in ops.items()}, granularity=per("granularity"),
            quantizer=per("quantizer"), rounding=per("rounding"), status=str(rec.get("status", "?")),
            reason=str(rec.get("reason", "")), integer_gemm=bool(rec.get("integer_gemm", False)),
            notes=list(rec.get("notes") or []),
        )

    def spec_str(self) -> str:
        """``input:int8/tensor/rn weight:fp`` — one token per operand."""
        parts = []
        for name, b in self.bits.items():
            if b is None:
                parts.append(f"{name}:fp")
                continue
            r = "sr" if self.rounding.get(name) == "stochastic" else "rn"
            q = self.quantizer.get(name)
            extra = "" if q in (None, "uniform") else f"/{q}"
            parts.append(f"{name}:int{b}/{self.granularity.get(name)}/{r}{extra}")
        return " ".join(parts) or "-"


@dataclass
class SavedTensor:
    """One tensor the forward graph saves for backward."""

    name: str
    dtype: str
    shape: list[int]
    bytes: int
    kind: str  # "activation" (extra memory held until backward) or "input" (a graph input: parameter or data)


@dataclass
class Memory:
    """Tensors saved for backward: fqt vs the same model compiled with ``bits="fp"`` (FP32 baseline)."""

    fqt: list[SavedTensor]
    fp32: list[SavedTensor]

    @staticmethod
    def _total(items: list[SavedTensor], kind: str | None = None) -> int:
        return sum(t.bytes for t in items if kind is None or t.kind == kind)

    @property
    def fqt_bytes(self) -> int:
        return self._total(self.fqt)

    @property
    def fp32_bytes(self) -> int:
        return self._total(self.fp32)

    @property
    def fqt_activation_bytes(self) -> int:
        return self._total(self.fqt, "activation")

    @property
    def fp32_activation_bytes(self) -> int:
        return self._total(self.fp32, "activation")

    def to_dict(self) -> dict[str, Any]:
        return {
            "fqt_bytes": self.fqt_bytes, "fp32_bytes": self.fp32_bytes,
            "fqt_activation_bytes": self.fqt_activation_bytes, "fp32_activation_bytes": self.fp32_activation_bytes,
            "fqt": [dataclasses.asdict(t) for t in self.fqt], "fp32": [dataclasses.asdict(t) for t in self.fp32],
        }


@dataclass
class Report:
    """What `explain` found. ``graphs`` holds the backend's `CompiledGraph` objects (not serialised)."""

    config: str
    sites: list[Site]
    memory: Memory | None
    counters: list[dict[str, int]]
    graphs: list[Any] = field(default_factory=list, repr=False)
    saved: list[dict[str, Any]] = field(default_factory=list)  # non-GEMM saved activations, `_saved_activations`
    # GEMM modules no fqt graph received (full precision): module, type, cause, reason, fix (`fqtc.coverage`)
    outside: list[dict[str, str]] = field(default_factory=list)

    # -- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:  # JSON has no inf: SQNR of an exact product is written as the string "inf"
            return "inf" if isinstance(v, float) and math.isinf(v) else v

        sites = []
        for s in self.sites:
            d = dataclasses.asdict(s)
            d["sqnr_db"] = clean(d["sqnr_db"])
            sites.append(d)
        return {"config": self.config, "sites": sites, "memory": self.memory.to_dict() if self.memory else None,
                "counters": self.counters, "saved": self.saved, "outside": self.outside}

    def to_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Report":
        """Inverse of `to_dict` (graphs are not serialised)."""
        sites = []
        for s in d["sites"]:
            s = dict(s)
            if s.get("sqnr_db") == "inf":
                s["sqnr_db"] = math.inf
            sites.append(Site(**s))
        mem = None
        if d.get("memory"):
            m = d["memory"]
            mem = Memory([SavedTensor(**t) for t in m["fqt"]], [SavedTensor(**t) for t in m["fp32"]])
        return Report(d["config"], sites, mem, list(d.get("counters") or []), saved=list(d.get("saved") or []),
                      outside=list(d.get("outside") or []))

    @staticmethod
    def from_json(text: str) -> "Report":
        return Report.from_dict(json.loads(text))

    # -- rendering ---------------------------------------------------------------------------------------------
    def table(self):
        """The site table as a ``rich.table.Table``."""
        from rich.table import Table

        t = Table(title=f"fqt GEMM sites ({self.config})")
        for col in ("site", "role", "op", "shapes (a x b -> out)", "operands", "status", "reason", "SQNR dB"):
            t.add_column(col, overflow="fold")
        for s in self.sites:
            sh = s.shapes
            shapes = f"{sh.get('a')} x {sh.get('b')} -> {sh.get('out')}" if "a" in sh else f"-> {sh.get('out')}"
            sq = "" if s.sqnr_db is None else ("inf" if math.isinf(s.sqnr_db) else f"{s.sqnr_db:.1f}")
            status = s.status + ("" if s.integer_gemm or s.status != "quantized" else " (dequant)")
            t.add_row(s.name, s.role, s.op, shapes, s.spec_str(), status, s.reason, sq)
        return t

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=160, record=True, force_terminal=False, color_system=None)
        with console.capture() as cap:
            console.print(self.table())
            if self.memory is not None:
                m = self.memory
                ratio = m.fp32_bytes / m.fqt_bytes if m.fqt_bytes else math.inf
                console.print(
                    f"saved for backward: fqt {m.fqt_bytes} B vs FP32 {m.fp32_bytes} B ({ratio:.2f}x); of which "
                    f"activations (not graph inputs) fqt {m.fqt_activation_bytes} B vs FP32 "
                    f"{m.fp32_activation_bytes} B"
                )
            for r in self.saved:
                console.print(f"saved activation {r['node']} ({r['op']}, {r['storage']}): {r['bytes']} B vs "
                              f"fp32 {r['fp32_bytes']} B")
            for o in self.outside:
                console.print(f"outside every fqt graph (full precision): {o['module']} ({o['type']}): "
                              f"{o['reason']}. Fix: {o['fix']}")
        return cap.get()

    def graph(self, which: str = "joint", index: int = 0) -> str:
        """The rewritten graph (``joint``, ``forward``, ``backward`` or ``inference``) as text, each GEMM and fqt
        node annotated with its ``node.meta["fqt"]`` record."""
        gm = self._graph_module(which, index)
        lines = []
        for n in gm.graph.nodes:
            text = n.format_node() or n.name
            rec = n.meta.get("fqt")
            if rec:
                text += "    # fqt: " + _annotation(rec)
            lines.append(text)
        return "\n".join(lines)

    def _graph_module(self, which: str, index: int) -> fx.GraphModule:
        allowed = ("joint", "forward", "backward", "inference")
        if which not in allowed:
            raise ValueError(f"Report.graph: unknown graph {which!r}; allowed: {', '.join(allowed)}")
        if not self.graphs:
            raise ValueError("Report.graph: this report holds no graphs (it was loaded from JSON); run explain()")
        if not 0 <= index < len(self.graphs):
            raise ValueError(f"Report.graph: index {index} out of range; the model compiled {len(self.graphs)} graphs")
        gm = getattr(self.graphs[index], which)
        if gm is None:
            raise ValueError(f"Report.graph: graph {index} has no {which} graph (inference-only graphs have "
                             "'inference'; training graphs have 'joint', 'forward', 'backward')")
        return gm

    def to_networkx(self, which: str = "joint", index: int = 0):
        """The graph as a ``networkx.DiGraph``; fqt nodes and GEMMs carry their record and a fill colour."""
        import networkx as nx

        gm = self._graph_module(which, index)
        g = nx.DiGraph(name=f"fqt {which} graph {index}")
        for n in gm.graph.nodes:
            rec = n.meta.get("fqt")
            label = f"{n.name}\\n{_target_name(n)}"
            attrs: dict[str, Any] = {"label": label, "shape": "box"}
            if rec:
                attrs["label"] = label + "\\n" + _annotation(rec).replace('"', "'")
                full = rec.get("status") == "full_precision"
                attrs.update(style="filled", fillcolor="lightpink" if full else "lightblue")
            g.add_node(n.name, **attrs)
            for inp in n.all_input_nodes:
                g.add_edge(inp.name, n.name)
        return g

    def to_dot(self, which: str = "joint", index: int = 0) -> str:
        """DOT text of the annotated graph (networkx + pydot)."""
        from networkx.drawing.nx_pydot import to_pydot

        return to_pydot(self.to_networkx(which, index)).to_string()

    def to_svg(self, which: str = "joint", index: int = 0) -> str:
        """SVG of the annotated graph; needs the Graphviz ``dot`` program."""
        import shutil

        from networkx.drawing.nx_pydot import to_pydot

        if shutil.which("dot") is None:
            raise RuntimeError("Report.to_svg needs the Graphviz 'dot' program (apt-get install graphviz); "
                               "Report.to_dot() gives the DOT text without it")
        return to_pydot(self.to_networkx(which, index)).create_svg().decode()


def _target_name(n: fx.Node) -> str:
    if n.op != "call_function":
        return n.op
    return str(n.target).replace("aten.", "").replace(".default", "")


def _annotation(rec: Mapping[str, Any]) -> str:
    kind = rec.get("kind")
    if kind == "step":
        return "step counter (saved for backward, never recomputed)"
    if kind == "quantize":
        spec = rec.get("spec") or {}
        return (f"quantize {rec.get('site')}/{rec.get('role')}/{rec.get('operand')} int{spec.get('bits')}"
                f"/{spec.get('granularity')}/{spec.get('rounding')}/{spec.get('quantizer')}")
    if kind is not None:
        return f"{kind} " + " ".join(f"{k}={v}" for k, v in rec.items() if k != "kind" and isinstance(v, (str, int)))
    site = Site.from_record(rec, 0)
    return f"{site.name}/{site.role} {site.status} [{site.spec_str()}] ({site.reason})"


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


def _grad_like(t: Tensor) -> Tensor:
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
        torch.autograd.grad(outs, wrt, [_grad_like(o) for o in outs], allow_unused=True)


def _compile_and_capture(model: torch.nn.Module, inputs: Sequence[Any], config: FQTConfig,
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
    store[which + ".keys"] = [_storage_key(x) if isinstance(x, Tensor) else None for x in a]


def _storage_key(t: Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.dtype)


def _clone_args(args: Sequence[Any]) -> list[Any]:
    return [a.clone() if isinstance(a, Tensor) else a for a in args]


@contextlib.contextmanager
def _preserve_buffers(model: torch.nn.Module):
    """Restore the model's buffers (BatchNorm running statistics) after the extra runs inspect/export make."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


class _KeepAll(fx.Interpreter):
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
                run_args.append(_grad_like(val) if n.name.startswith("tangents") and isinstance(val, Tensor)
                                else envs.get(n.name))
        elif which in graph_args:
            run_args = graph_args[which]
        else:
            continue
        interp = _KeepAll(gm)
        interp.run(*_clone_args(run_args))  # graphs may update inputs in place (BatchNorm buffers)
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
def _preserve_step():
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
    with _preserve_step(), _preserve_buffers(model):
        cgs, graph_args = _compile_and_capture(model, example_inputs, config, record_args=sqnr)
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
            fp_cgs, _ = _compile_and_capture(model, example_inputs, fp_cfg)
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

