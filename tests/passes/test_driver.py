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


@pytest.fixture()
def joint(monkeypatch):
    """A Linear-ReLU-Linear joint graph as the backend's partition_fn receives it, before any pass, with the
    names of its weight placeholders."""
    captured = {}
    real = fqtc.backend.run_passes

    def spy(gm, config, weight_nodes):
        captured["gm"] = copy.deepcopy(gm)
        captured["weights"] = {n.name for n in weight_nodes}
        return real(gm, config, weight_nodes)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    monkeypatch.setattr(fqtc.backend, "run_passes", spy)
    compile_fqt(model)(torch.randn(3, 8)).sum().backward()
    monkeypatch.undo()
    gm = captured["gm"]
    return gm, {n for n in gm.graph.nodes if n.name in captured["weights"]}


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
    for name in ("rotate", "conv", "save", "verify"):
        run_pass(name, gm, ctx)
    assert [r["status"] for r in ctx.records] == ["quantized"] * 5  # read back from the rewritten graph
    with pytest.raises(ValueError, match="unknown fqt pass 'rewrit'; passes: lwq, sites"):
        run_pass("rewrit", gm, ctx)


def test_run_passes_times_every_pass(joint):
    gm, weights = joint
    result = fqtc.passes.run_passes(gm, FQTConfig(), weights)
    assert list(result.timings) == [name for name, _, _ in PASSES]
    assert all(result.counters[f"pass:{name}"] == 1 for name, _, _ in PASSES)
