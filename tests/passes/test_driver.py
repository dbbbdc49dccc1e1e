"""The pass driver (fqtc/passes/__init__.py): one table of passes that README.md lists in the same order, each run
timed, counted and logged, and a single pass runnable on a captured joint graph."""

from __future__ import annotations

import copy
import logging
import os
import re

import pytest
import torch
import torch.nn as nn

import fqtc.backend
from fqtc.config import FQTConfig
from fqtc.passes import PASSES, PassContext, run_pass
from tests.helpers import compile_fqt

README = os.path.join(os.path.dirname(fqtc.passes.__file__), "README.md")


def test_readme_table_lists_the_driver_passes_in_order():
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| `([\w.]+)`", open(README).read(), flags=re.M)
    assert [(int(o), name, f) for o, name, f in rows] == [(i, n, f) for i, (n, f, _) in enumerate(PASSES)]


def _capture(monkeypatch, model, *inputs):
    """The joint graph of ``model`` as the backend's partition_fn receives it, before any pass, and its weight
    placeholders."""
    captured = {}
    real = fqtc.backend.run_passes

    def spy(gm, config, weight_nodes):
        captured["gm"] = copy.deepcopy(gm)
        captured["weights"] = {n.name for n in weight_nodes}
        return real(gm, config, weight_nodes)

    torch._dynamo.reset()
    monkeypatch.setattr(fqtc.backend, "run_passes", spy)
    compile_fqt(model)(*inputs).sum().backward()
    monkeypatch.undo()
    gm = captured["gm"]
    return gm, {n for n in gm.graph.nodes if n.name in captured["weights"]}


class ConvAttn(nn.Module):
    """A stem convolution, a Linear and a bmm: one site of each kind."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).flatten(2)  # (N, 4, 16)
        q = self.proj(h)
        return torch.bmm(q, h.transpose(1, 2))


def test_one_site_model_for_every_gemm_kind(monkeypatch):
    """One find step yields the sites of every kind in forward order; one assign counts rule hits over all kinds (a
    rule only a convolution matches does not warn); the rewrite dispatches on the kind."""
    torch.manual_seed(0)
    gm, weights = _capture(monkeypatch, ConvAttn(), torch.randn(2, 1, 4, 4))
    config = FQTConfig.from_options({"rules": [{"module": "stem", "role": "output", "operand": "weight", "bits": 4},
                                               {"module": "head*", "bits": 4}]})
    ctx = PassContext(config, weights)
    for name in ("lwq", "sites", "presets"):
        run_pass(name, gm, ctx)
    assert [(s.kind, s.name) for s in ctx.sites] == [("conv", "stem"), ("linear", "proj"), ("bmm", "bmm")]
    # the stem reads the graph input, which needs no gradient: no grad_input GEMM
    assert [sorted(s.roles) for s in ctx.sites] == [["grad_weight", "output"],
                                                   ["grad_input", "grad_weight", "output"],
                                                   ["grad_input", "grad_weight", "output"]]
    with pytest.warns(UserWarning, match="matched no GEMM operand") as caught:
        run_pass("assign", gm, ctx)
    assert [str(w.message).split(" matched")[0] for w in caught if "matched no GEMM" in str(w.message)] == [
        "fqt: rule(module=head*, bits=4)"]
    assert ctx.sites[0].specs[("output", "weight")][0].bits == 4
    broken = {k: v for k, v in fqtc.passes.REWRITERS.items() if k != "conv"}
    monkeypatch.setattr(fqtc.passes, "REWRITERS", broken)
    with pytest.raises(NotImplementedError, match="no rewriter for GEMM site kind 'conv' \\(site 'stem'\\)"):
        run_pass("rewrite", copy.deepcopy(gm), ctx)
    monkeypatch.undo()
    run_pass("rewrite", gm, ctx)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    fqt = torch.ops.fqt
    assert targets.count(fqt.qgemm.default) == 6
    assert [targets.count(t) for t in (fqt.qconv2d.default, fqt.qconv2d_input.default,
                                       fqt.qconv2d_weight.default)] == [1, 0, 1]
    for name in ("rotate", "save", "verify"):
        run_pass(name, gm, ctx)
    assert sorted((r["site"], r["role"]) for r in ctx.records if r["status"] == "quantized") == sorted(
        [("stem", "output"), ("stem", "grad_weight")]
        + [(s, r) for s in ("proj", "bmm") for r in ("output", "grad_input", "grad_weight")])


@pytest.fixture()
def joint(monkeypatch):
    """A Linear-ReLU-Linear joint graph as the backend's partition_fn receives it, before any pass, with the
    names of its weight placeholders."""
    torch.manual_seed(0)
    return _capture(monkeypatch, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(3, 8))


def _qgemms(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.fqt.qgemm.default]


def test_single_passes_on_a_captured_joint_graph(joint, caplog):
    gm, weights = joint
    ctx = PassContext(FQTConfig(), weights)
    for name in ("lwq", "sites", "presets", "assign"):
        run_pass(name, gm, ctx)
    assert len(ctx.sites) == 2 and len(ctx.plans) == 5  # 2 outputs, 2 grad_weight, 1 grad_input
    assert _qgemms(gm) == []  # nothing rewritten yet: assign only plans
    with caplog.at_level(logging.DEBUG, logger="fqtc.passes"):
        run_pass("rewrite", gm, ctx)
    assert len(_qgemms(gm)) == 5
    assert any("pass rewrite" in r.getMessage() for r in caplog.records)
    assert ctx.counters["pass:rewrite"] == 1 and ctx.timings["rewrite"] > 0
    for name in ("rotate", "save", "verify"):
        run_pass(name, gm, ctx)
    assert [r["status"] for r in ctx.records] == ["quantized"] * 5  # read back from the rewritten graph
    with pytest.raises(ValueError, match="unknown fqt pass 'rewrit'; passes: lwq, sites"):
        run_pass("rewrit", gm, ctx)


def test_run_passes_times_every_pass(joint):
    gm, weights = joint
    result = fqtc.passes.run_passes(gm, FQTConfig(), weights)
    assert list(result.timings) == [name for name, _, _ in PASSES]
    assert all(result.counters[f"pass:{name}"] == 1 for name, _, _ in PASSES)
