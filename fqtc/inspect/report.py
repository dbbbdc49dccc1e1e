"""The report of `fqtc.explain`: one `Site` per GEMM, the saved-for-backward `Memory`, and the `Report` with its
table, JSON, graph text and DOT/SVG views. Built only from the ``node.meta["fqt"]`` records the passes wrote
(fqtc/passes/README.md: one source of truth); `fqtc.inspect.driver` compiles the model and fills it."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch.fx as fx


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
    block_size: dict[str, int | None] = field(default_factory=dict)  # operands with granularity "block"

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
            notes=list(rec.get("notes") or []), block_size={k: v for k, v in per("block_size").items() if v},
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
            g = self.granularity.get(name)
            g = f"block{self.block_size[name]}" if g == "block" and name in self.block_size else g
            parts.append(f"{name}:int{b}/{g}/{r}{extra}")
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
        g = spec.get("granularity")
        g = f"block{spec.get('block_size')} over dims {rec.get('block_dims')}" if g == "block" else g
        return (f"quantize {rec.get('site')}/{rec.get('role')}/{rec.get('operand')} int{spec.get('bits')}"
                f"/{g}/{spec.get('rounding')}/{spec.get('quantizer')}")
    if kind is not None:
        return f"{kind} " + " ".join(f"{k}={v}" for k, v in rec.items() if k != "kind" and isinstance(v, (str, int)))
    site = Site.from_record(rec, 0)
    return f"{site.name}/{site.role} {site.status} [{site.spec_str()}] ({site.reason})"


