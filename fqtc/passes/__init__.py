"""fqtc's graph passes over the AOTAutograd joint graph (see README.md in this folder for the invariants)."""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

import torch.fx as fx

from fqtc.config import FQTConfig
from fqtc.passes import gradquant  # noqa: F401  (registers the gradient-quantizer lowerings)
from fqtc.passes.assign import GemmPlan, assign
from fqtc.passes.autobits import apply_auto
from fqtc.passes.conv import rewrite_convs, site_keys_in_order
from fqtc.passes.lwq import mark_latent_weights
from fqtc.passes.rewrite import rewrite
from fqtc.passes.rotate import rotate_linear_sites
from fqtc.passes.save import tag_saves
from fqtc.passes.save_act import quantize_saved_activations
from fqtc.passes.sites import GemmSite, find_sites
from fqtc.passes.verify import verify_records


@dataclass
class PassResult:
    sites: list[GemmSite]
    plans: list[GemmPlan]
    records: list[dict] = field(default_factory=list)  # one per GEMM, the node.meta["fqt"] records
    counters: dict[str, int] = field(default_factory=dict)


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
                          "fqtc.explain() lists them", stacklevel=3)


def run_passes(gm: fx.GraphModule, config: FQTConfig, weight_nodes: set[fx.Node]) -> PassResult:
    """lwq -> sites -> assign -> rewrite -> rotate -> conv -> save -> verify -> save_act, in place on ``gm``.

    Returns what was decided."""
    latent = mark_latent_weights(gm)  # LatentWeight parameters: their dequantized nodes are weights
    weight_nodes = set(weight_nodes) | latent
    sites, unlinked = find_sites(gm, weight_nodes)
    # presets such as first_last count conv sites too (a CNN's first site is its stem conv): expand them over all
    # sites in graph order before assign and the conv pass read the rules
    config = config.expand_presets(site_keys_in_order(gm, sites))
    config = apply_auto(gm, config, sites)  # bits="auto": the solver's decisions become rules
    with warnings.catch_warnings(record=True) as assign_warnings:
        warnings.simplefilter("always")
        plans = assign(sites, config)
    counters = rewrite(gm, plans, config)
    counters.update(rotate_linear_sites(gm, config))  # option rotate: Hadamard-rotated output GEMMs
    conv_records, conv_counters, conv_rules = rewrite_convs(gm, config)  # 2-D convolution sites
    counters.update(conv_counters)
    for w in assign_warnings:  # assign warns about rules matching no GEMM; one matching a conv operand did match
        if not any(f"fqt: {d} matched no GEMM operand" in str(w.message) for d in conv_rules):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    counters.update(tag_saves(gm))
    records = [p.node.meta["fqt"] for p in plans]
    # the rewritten GEMM's record lives on the qgemm node now; re-read it from there
    by_orig = {n.meta["fqt"].get("original_node"): n.meta["fqt"] for n in gm.graph.nodes
               if n.meta.get("fqt", {}).get("original_node")}
    records = [by_orig.get(r["node"], r) for r in records] + unlinked + conv_records
    verify_records(gm, records)  # status from the rewritten graph, not from the plan
    _warn_unmatched_keep_fp(config, records)
    # a graph whose GEMMs are all kept in full precision is the FP path (a graph without GEMMs is not)
    any_quantized = not records or any(r.get("status") == "quantized" for r in records)
    # 8-bit non-GEMM saved tensors, packed masks
    counters.update(quantize_saved_activations(gm, config, any_quantized))
    counters["sites"] = len(sites)
    counters["latent_weights"] = len(latent)
    return PassResult(sites, plans, records, counters)
