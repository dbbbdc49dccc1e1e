"""fqtc's graph passes over the AOTAutograd joint graph (see README.md in this folder for the invariants).

One driver runs them: every pass is a function ``(gm, ctx) -> None`` over a `PassContext` (the config, the GEMM
sites, plans, records and counters), listed in order in `PASSES` (the table of README.md, which a test keeps in
step). `run_pass` runs one of them under a wrapper that times it, counts it and logs it to the ``fqtc.passes``
logger (``TORCH_LOGS="+fqtc"`` or ``logging.getLogger("fqtc.passes").setLevel(logging.DEBUG)``); tests can run a
single pass on a captured joint graph with it.
"""

from __future__ import annotations

import fnmatch
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from fqtc.config import FQTConfig
from fqtc.passes import gradquant  # noqa: F401  (registers the gradient-quantizer lowerings)
from fqtc.passes.assign import GemmPlan, assign
from fqtc.passes.autobits import apply_auto
from fqtc.passes.conv import rewrite_convs
from fqtc.passes.lwq import mark_latent_weights
from fqtc.passes.rewrite import rewrite
from fqtc.passes.rotate import rotate_linear_sites
from fqtc.passes.save import tag_saves
from fqtc.passes.save_act import quantize_saved_activations
from fqtc.passes.sites import Site, find_sites
from fqtc.passes.verify import verify_records

log = logging.getLogger("fqtc.passes")


def _register_torch_log() -> None:
    """``TORCH_LOGS="+fqtc"`` (or ``torch._logging.set_logs(fqtc=logging.DEBUG)``) sets the level of fqtc's loggers."""
    try:
        from torch._logging._internal import register_log

        register_log("fqtc", "fqtc")
    except Exception:  # noqa: BLE001  (a torch without this registry: the loggers still work through logging)
        pass


_register_torch_log()


@dataclass
class PassResult:
    sites: list[Site]
    plans: list[GemmPlan]
    records: list[dict] = field(default_factory=list)  # one per GEMM, the node.meta["fqt"] records
    counters: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # pass name -> seconds


@dataclass
class PassContext:
    """What the passes read and decide. ``config`` may be replaced by a pass (presets and ``bits="auto"`` become
    rules); ``records`` are the GEMM records (``node.meta["fqt"]``) once `verify` has read them back."""

    config: FQTConfig
    weight_nodes: set[fx.Node] = field(default_factory=set)
    latent: set[fx.Node] = field(default_factory=set)
    sites: list[Site] = field(default_factory=list)  # every kind, in forward graph order
    unlinked: list[dict] = field(default_factory=list)  # records of GEMM nodes find_sites left in full precision
    plans: list[GemmPlan] = field(default_factory=list)  # assign's plans of the linear and bmm GEMMs
    rewrite_records: list[dict] = field(default_factory=list)  # records a rewriter wrote (convolution GEMMs)
    records: list[dict] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def result(self) -> PassResult:
        counters = dict(self.counters, sites=len(self.sites), latent_weights=len(self.latent))
        return PassResult(self.sites, self.plans, self.records, counters, dict(self.timings))


def _lwq(gm: fx.GraphModule, ctx: PassContext) -> None:
    ctx.latent = mark_latent_weights(gm)  # LatentWeight parameters: their dequantized nodes are weights
    ctx.weight_nodes = set(ctx.weight_nodes) | ctx.latent


def _sites(gm: fx.GraphModule, ctx: PassContext) -> None:
    ctx.sites, ctx.unlinked = find_sites(gm, ctx.weight_nodes)


def _presets(gm: fx.GraphModule, ctx: PassContext) -> None:
    # presets such as first_last count the sites of every kind (a CNN's first site is its stem conv): expand them
    # over all sites in graph order before assign reads the rules; bits="auto": the solver's decisions become rules
    ctx.config = ctx.config.expand_presets([s.module or s.name for s in ctx.sites])
    ctx.config = apply_auto(gm, ctx.config, ctx.sites)


def _assign(gm: fx.GraphModule, ctx: PassContext) -> None:
    ctx.plans = assign(ctx.sites, ctx.config)


def _rewrite_gemms(gm: fx.GraphModule, ctx: PassContext, sites: list[Site]) -> None:
    chosen = {id(s) for s in sites}
    ctx.counters.update(rewrite(gm, [p for p in ctx.plans if id(p.site) in chosen], ctx.config))


def _rewrite_convs(gm: fx.GraphModule, ctx: PassContext, sites: list[Site]) -> None:
    records, counters = rewrite_convs(gm, sites, ctx.config)  # 2-D convolution sites
    ctx.rewrite_records.extend(records)
    ctx.counters.update(counters)


# site kind -> its rewriter (pt2e's annotate -> convert: assign annotated every site, the rewriter of its kind
# converts it). Linear and bmm GEMMs share one rewriter, so a tensor both read is quantized once.
REWRITERS: dict[str, Callable[[fx.GraphModule, PassContext, list[Site]], None]] = {
    "linear": _rewrite_gemms,
    "bmm": _rewrite_gemms,
    "conv": _rewrite_convs,
}


def _rewrite(gm: fx.GraphModule, ctx: PassContext) -> None:
    groups: dict[Callable, list[Site]] = {fn: [] for fn in REWRITERS.values()}
    for site in ctx.sites:
        fn = REWRITERS.get(site.kind)
        if fn is None:
            raise NotImplementedError(f"fqt: no rewriter for GEMM site kind {site.kind!r} (site {site.name!r}); "
                                      f"kinds with one: {', '.join(REWRITERS)}")
        groups[fn].append(site)
    for fn, sites in groups.items():
        fn(gm, ctx, sites)


def _rotate(gm: fx.GraphModule, ctx: PassContext) -> None:
    ctx.counters.update(rotate_linear_sites(gm, ctx.config))  # option rotate: Hadamard-rotated output GEMMs


def _save(gm: fx.GraphModule, ctx: PassContext) -> None:
    ctx.counters.update(tag_saves(gm))


def _verify(gm: fx.GraphModule, ctx: PassContext) -> None:
    # the rewritten GEMM's record lives on the qgemm node now; re-read it from there
    by_orig = {n.meta["fqt"].get("original_node"): n.meta["fqt"] for n in gm.graph.nodes
               if n.meta.get("fqt", {}).get("original_node")}
    planned = [p.node.meta["fqt"] for p in ctx.plans]
    ctx.records = [by_orig.get(r["node"], r) for r in planned] + ctx.unlinked + ctx.rewrite_records
    verify_records(gm, ctx.records)  # status from the rewritten graph, not from the plan
    _warn_unmatched_keep_fp(ctx.config, ctx.records)


def _save_act(gm: fx.GraphModule, ctx: PassContext) -> None:
    # a graph whose GEMMs are all kept in full precision is the FP path (a graph without GEMMs is not)
    any_quantized = not ctx.records or any(r.get("status") == "quantized" for r in ctx.records)
    ctx.counters.update(quantize_saved_activations(gm, ctx.config, any_quantized))


# The passes in the order they run (passes/README.md lists the same table): (name, file, function).
PASSES: tuple[tuple[str, str, Callable[[fx.GraphModule, PassContext], None]], ...] = (
    ("lwq", "lwq.py", _lwq),
    ("sites", "sites.py", _sites),
    ("presets", "autobits.py", _presets),
    ("assign", "assign.py", _assign),
    ("rewrite", "rewrite.py", _rewrite),
    ("rotate", "rotate.py", _rotate),
    ("save", "save.py", _save),
    ("verify", "verify.py", _verify),
    ("save_act", "save_act.py", _save_act),
)
_BY_NAME = {name: fn for name, _, fn in PASSES}


def run_pass(name: str, gm: fx.GraphModule, ctx: PassContext) -> None:
    """Run the pass ``name`` of `PASSES` on ``gm``: timed (``ctx.timings``), counted (``ctx.counters["pass:<name>"]``)
    and logged (``fqtc.passes`` logger, debug level)."""
    fn = _BY_NAME.get(name)
    if fn is None:
        raise ValueError(f"unknown fqt pass {name!r}; passes: {', '.join(_BY_NAME)}")
    t0 = time.perf_counter()
    fn(gm, ctx)
    dt = time.perf_counter() - t0
    ctx.timings[name] = ctx.timings.get(name, 0.0) + dt
    ctx.counters[f"pass:{name}"] = ctx.counters.get(f"pass:{name}", 0) + 1
    if log.isEnabledFor(logging.DEBUG):
        log.debug("pass %-8s %7.2f ms  %d nodes", name, dt * 1e3, len(gm.graph.nodes))


def _warn_unmatched_keep_fp(config: FQTConfig, records: list[dict]) -> None:
    """Warn about each ``keep_fp`` entry that matches no GEMM of this graph (as `assign` does for rules): a typo in
    a module glob would otherwise leave that module quantized without a word."""
    if not records:
        return  # a graph without GEMMs (e.g. one side of a graph break) has nothing a keep_fp entry could match
    for pat in config.keep_fp:
        if not any(pat == r.get("role") or fnmatch.fnmatchcase(r.get("module") or r.get("site") or "", pat)
                   for r in records):
            known = sorted({r.get("module") or r.get("site") or "" for r in records})
            warnings.warn(f"fqt: keep_fp entry {pat!r} matched no GEMM (a module-path glob or a role: output, "
                          f"grad_input, grad_weight); module paths with GEMMs here: {', '.join(known)}. "
                          "fqtc.explain() lists them", stacklevel=5)


def run_passes(gm: fx.GraphModule, config: FQTConfig, weight_nodes: set[fx.Node]) -> PassResult:
    """Every pass of `PASSES`, in order, in place on ``gm``. Returns what was decided."""
    ctx = PassContext(config, set(weight_nodes))
    for name, _, _ in PASSES:
        run_pass(name, gm, ctx)
    return ctx.result()
