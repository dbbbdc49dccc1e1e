"""fqtc's graph passes over the AOTAutograd joint graph (see README.md in this folder for the invariants)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from fqtc.config import FQTConfig
from fqtc.passes.assign import GemmPlan, assign
from fqtc.passes.rewrite import rewrite
from fqtc.passes.save import tag_saves
from fqtc.passes.sites import GemmSite, find_sites


@dataclass
class PassResult:
    sites: list[GemmSite]
    plans: list[GemmPlan]
    records: list[dict] = field(default_factory=list)  # one per GEMM, the node.meta["fqt"] records
    counters: dict[str, int] = field(default_factory=dict)


def run_passes(gm: fx.GraphModule, config: FQTConfig, weight_nodes: set[fx.Node]) -> PassResult:
    """sites -> assign -> rewrite -> save, in place on ``gm``. Returns what was decided."""
    sites, unlinked = find_sites(gm, weight_nodes)
    plans = assign(sites, config)
    counters = rewrite(gm, plans, config)
    counters.update(tag_saves(gm))
    records = [p.node.meta["fqt"] for p in plans]
    # the rewritten GEMM's record lives on the qgemm node now; re-read it from there
    by_orig = {n.meta["fqt"].get("original_node"): n.meta["fqt"] for n in gm.graph.nodes
               if n.meta.get("fqt", {}).get("original_node")}
    records = [by_orig.get(r["node"], r) for r in records] + unlinked
    counters["sites"] = len(sites)
    return PassResult(sites, plans, records, counters)
