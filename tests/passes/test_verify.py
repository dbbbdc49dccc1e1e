"""passes/verify.py: a GEMM's status comes from the rewritten graph. A plan the graph does not carry out is reported
as such, never as ``quantized``."""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn

import fqtc.passes as P
from tests.helpers import run_and_capture


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_rewritten_gemms_carry_evidence():
    _, cgs = run_and_capture(_net(), (torch.randn(3, 8),), {"bits": "W8A8G8"})
    recs = cgs[0].records
    assert len(recs) == 5 and all(r["status"] == "quantized" and r["integer_gemm"] for r in recs)
    assert all(r["evidence"] == "fqt::qgemm(int8, int8)" for r in recs)


def test_planned_but_not_rewritten_is_not_quantized(monkeypatch):
    monkeypatch.setattr(P, "rewrite", lambda gm, plans, config: {"gemms_rewritten": 0, "quantize_nodes": 0})
    _, cgs = run_and_capture(_net(), (torch.randn(3, 8),), {"bits": "W8A8G8"})
    recs = cgs[0].records
    assert len(recs) == 5
    for r in recs:
        assert r["status"] == "full_precision" and not r["integer_gemm"], r
        assert "not rewritten" in r["evidence"] and "planned quantized" in r["reason"]


def test_operand_left_float_downgrades_status(monkeypatch):
    """A quantized operand that does not reach the GEMM (the qgemm reads the float weight instead) is not counted."""
    R = importlib.import_module("fqtc.passes.rewrite")
    orig = R.rewrite

    def rewrite_then_bypass(gm, plans, config):
        out = orig(gm, plans, config)
        for n in gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.qgemm.default):
            if n.meta["fqt"]["role"] == "output":  # the weight operand: t(codes) -> t(W), no scale
                q = n.args[2]
                while q.target is not torch.ops.fqt.quantize.default:
                    q = q.args[0]
                with gm.graph.inserting_before(n):
                    wt = gm.graph.call_function(torch.ops.aten.t.default, (q.args[0],))
                wt.meta["val"] = q.args[0].meta["val"].t()
                n.update_arg(2, wt)
                n.update_arg(3, None)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return out

    monkeypatch.setattr(P, "rewrite", rewrite_then_bypass)
    _, cgs = run_and_capture(_net(), (torch.randn(3, 8),), {"bits": "W8A8G8"})
    out = [r for r in cgs[0].records if r["role"] == "output"]
    assert len(out) == 2 and all(r["status"] == "partial" and not r["integer_gemm"] for r in out), out
    assert all(r["evidence"] == "fqt::qgemm(int8, float)" for r in out)
    assert all(r["status"] == "quantized" for r in cgs[0].records if r["role"] != "output")
