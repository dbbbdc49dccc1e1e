"""Smoke tests of documented options, functions and CLI flags that no other test reaches (README.md, docs/options.md,
docs/inspect_export.md): each runs the feature once and checks the effect it is documented to have."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fqtc
from fqtc.backend import capture
from tests.helpers import assert_quantized_graphs, compile_fqt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP_ARGS = ["benchmarks.models:MLP", "--input-shape", "4,64", "--kwargs", '{"hidden": [16]}']


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))


def _step(model, options, x):
    with capture() as cgs:
        out = compile_fqt(model, options)(x)
        out.square().sum().backward()
    return out.detach(), [p.grad for p in model.parameters()], cgs[0]


@pytest.mark.parametrize("partitioner", ["min_cut", "default"])
def test_partitioner_option_same_numerics(partitioner):
    """``partitioner`` changes what backward recomputes, not the bits: nearest rounding everywhere, both equal the
    min-cut run."""
    x = torch.randn(8, 16)
    opts = {"bits": "W8A8G8", "rounding": "nearest"}
    ref = _step(_mlp(), opts, x)
    got = _step(_mlp(), {**opts, "partitioner": partitioner}, x)
    assert torch.equal(got[0], ref[0])
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_quantized_graphs(got[2], 2, 3)


def test_compiler_inductor_through_the_backend():
    """``compiler="inductor"``: both graphs go to Inductor; the GEMMs get the eager graphs' codes (GELU is
    Inductor's own fp32 code, so the outputs agree to fp32 tolerance)."""
    x = torch.randn(8, 16)
    opts = {"bits": "W8A8G8", "rounding": "nearest"}
    eager = _step(_mlp(), {**opts, "compiler": "eager"}, x)
    ind = _step(_mlp(), {**opts, "compiler": "inductor"}, x)
    assert ind[2].compilers == ["inductor", "inductor"] and eager[2].compilers == ["eager", "eager"]
    torch.testing.assert_close(ind[0], eager[0])
    for a, b in zip(ind[1], eager[1]):
        torch.testing.assert_close(a, b)


def test_forward_rounding_stochastic():
    """``forward_rounding="stochastic"``: forward quantizers draw, so two steps on the same input differ (nearest:
    identical), and the forward graph's quantize nodes say ``stochastic``."""
    x = torch.randn(8, 16)
    outs = {}
    for rounding in ("nearest", "stochastic"):
        model = _mlp()
        with capture() as cgs:
            fn = compile_fqt(model, {"bits": "W4A4G8", "forward_rounding": rounding})
            outs[rounding] = (fn(x).detach(), fn(x).detach())
        fw = [n for n in cgs[0].forward.graph.find_nodes(op="call_function", target=torch.ops.fqt.quantize.default)
              if n.meta.get("fqt", {}).get("operand") in ("input", "weight")]
        assert len(fw) == 4 and all(n.args[3] == rounding for n in fw)
    assert torch.equal(*outs["nearest"])
    assert not torch.equal(*outs["stochastic"])


def test_fqtc_compile_with_typed_config():
    model = _mlp()
    with capture() as cgs:
        fqtc.compile(model, fqtc.FQTConfig.from_options({"bits": "W4A8G8"}))(torch.randn(8, 16)).sum().backward()
    recs = cgs[0].records
    assert_quantized_graphs(cgs[0], 2, 3)
    assert {r["operands"]["weight"]["bits"] for r in recs if "weight" in r["operands"]} == {4}


def test_report_to_networkx_and_svg():
    r = fqtc.explain(_mlp(), torch.randn(8, 16))
    g = r.to_networkx("forward")
    qgemms = [n for n in g.nodes if n.startswith("qgemm")]
    assert len(qgemms) == 2 and all(g.nodes[n]["fillcolor"] == "lightblue" for n in qgemms)
    assert all(g.in_degree(n) >= 4 for n in qgemms)  # codes, scales of both operands
    if shutil.which("dot") is None:
        with pytest.raises(RuntimeError, match="Graphviz"):
            r.to_svg("forward")
    else:
        assert "<svg" in r.to_svg("forward")


def test_cli_inspect_graph_dot_sqnr(tmp_path, capsys):
    from fqtc.cli import main

    dot = tmp_path / "g.dot"
    assert main(["inspect", *MLP_ARGS, "--sqnr", "--graph", "forward", "--graph", "backward", "--dot", str(dot),
                 "--dot-graph", "backward"]) == 0
    out = capsys.readouterr().out
    assert "--- forward graph ---" in out and "--- backward graph ---" in out and "fqt.qgemm" in out
    assert f"wrote {dot}" in out and dot.read_text().startswith("strict digraph")
    table = out.split("--- forward graph ---")[0]
    assert "SQNR dB" in table
    rows = [ln for ln in table.splitlines() if " quantized" in ln]
    assert rows and all(any(c.isdigit() for c in ln.split("quantized")[-1]) for ln in rows)


def test_cli_export_counter_sr_adamw_8bit_states(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from fqtc.cli import main

    out = tmp_path / "m.onnx"
    assert main(["export", *MLP_ARGS, "--options", '{"bits": "W8A8G8L4"}', "--out", str(out), "--sr", "counter",
                 "--optimizer", "adamw", "--state-bits", "8", "--lr", "0.01"]) == 0
    printed = capsys.readouterr().out
    for which in ("forward", "backward", "update"):
        assert f"wrote {tmp_path / f'm.{which}.onnx'}" in printed
    bw = onnx.load(str(tmp_path / "m.backward.onnx"))
    assert "CounterUniform" in {n.op_type for n in bw.graph.node} | {f.name for f in bw.functions}
    upd = onnx.load(str(tmp_path / "m.update.onnx"))
    elem = {i.name: i.type.tensor_type.elem_type for i in upd.graph.input}
    state = [k for k in elem if "state" in k or "exp_avg" in k or ".m" in k or ".v" in k]
    assert any(elem[k] in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for k in state), elem


@pytest.mark.parametrize("refresh", [True, False])
def test_optimizer_refresh_option(refresh):
    """``refresh=False`` keeps each row's latent-weight scale fixed; the default refreshes it when the weight grows
    past its range."""
    torch.manual_seed(0)
    model = fqtc.prepare(nn.Sequential(nn.Linear(16, 8)), {"bits": "W8A8G8L4"})
    w = model[0].weight
    s0 = w.s.clone()
    opt = fqtc.optim.SGD(model.parameters(), lr=1.0, refresh=refresh)
    w.grad = -torch.ones(w.shape)  # every weight grows by 1: far past the initial per-row range
    model[0].bias.grad = torch.zeros(8)
    opt.step()
    assert torch.equal(w.s, s0) != refresh


def test_fqtc_autotune_env_turns_timing_off():
    pytest.importorskip("triton")
    code = "import fqtc.codegen.gemm as g; print(g.TUNER.enabled)"
    env = {**os.environ, "FQTC_AUTOTUNE": "0"}
    got = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "False"
    from fqtc.codegen import tuning

    assert tuning.autotune_enabled() == (os.environ.get("FQTC_AUTOTUNE", "1") != "0")


def test_entry_point_options_are_the_documented_keys():
    """docs/options.md documents every key FQTConfig accepts (and no other)."""
    from fqtc.config import _OPTION_KEYS

    doc = open(os.path.join(ROOT, "docs", "options.md")).read()
    missing = [k for k in _OPTION_KEYS if f"`{k}`" not in doc]
    assert not missing, missing
