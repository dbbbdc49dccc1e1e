"""fqtc.explain: one row per GEMM with role, bits and status from node.meta["fqt"]; FP sites with the
reason; table, JSON, annotated graphs, DOT; measured SQNR and saved-for-backward memory; option log_sqnr."""

import json
import logging
import math

import pytest
import torch

import fqtc
from benchmarks.models import MLP, CharGPT, SmallCNN
from fqtc.inspect import Report, clear_sqnr_log, sqnr_db, sqnr_log
from fqtc.quant.uniform import dequantize, quantize
from tests.helpers import compile_fqt


def _mlp():
    torch.manual_seed(0)
    return MLP(in_features=32, hidden=(24, 16), num_classes=8)


def _roles(report, site):
    return sorted(s.role for s in report.sites if s.name == site)


def _qgemm_count(report):
    cg = report.graphs[0]
    return sum(1 for gm in (cg.forward, cg.backward) for n in gm.graph.nodes
               if n.target == torch.ops.fqt.qgemm.default)


def test_explain_mlp_lists_every_gemm_with_role_and_bits():
    x = torch.randn(6, 32, requires_grad=True)  # input needs grad: the first layer has a grad_input GEMM too
    r = fqtc.explain(_mlp(), x, options={"bits": "W4A8G6"}, memory=False)
    for site in ("net.1", "net.3", "net.5"):
        assert _roles(r, site) == ["grad_input", "grad_weight", "output"]
    assert len(r.sites) == 9
    expect = {"output": {"input": 8, "weight": 4}, "grad_input": {"grad_output": 6, "weight": 4},
              "grad_weight": {"grad_output": 6, "input": 8}}
    for s in r.sites:
        assert s.status == "quantized" and s.bits == expect[s.role], (s.name, s.role, s.bits)
        assert s.module_type == "Linear" and s.reason == "default W4A8G6"
        assert s.op == ("addmm" if s.role == "output" else "mm")
        assert s.rounding["grad_output" if s.role != "output" else "input"] == (
            "stochastic" if s.role != "output" else "nearest")
    assert r.sites[0].shapes == {"a": [6, 32], "b": [32, 24], "out": [6, 24]}
    # structural: every GEMM the report calls quantized is an fqt::qgemm in the graphs that run (no silent fallback)
    assert _qgemm_count(r) == 9


def test_input_without_grad_has_no_grad_input_gemm():
    r = fqtc.explain(_mlp(), torch.randn(6, 32), memory=False)
    assert _roles(r, "net.1") == ["grad_weight", "output"]
    assert len(r.sites) == 8


def test_site_forced_to_fp_shows_fp_with_reason():
    r = fqtc.explain(_mlp(), torch.randn(6, 32), options={"keep_fp": ["net.3", "grad_weight"]}, memory=False)
    by = {(s.name, s.role): s for s in r.sites}
    for role in ("output", "grad_input", "grad_weight"):
        s = by[("net.3", role)]
        assert s.status == "full_precision" and s.reason == "keep_fp 'net.3'"
        assert set(s.bits.values()) == {None}
    s = by[("net.5", "grad_weight")]
    assert s.status == "full_precision" and s.reason == "keep_fp 'grad_weight'"
    assert by[("net.5", "output")].status == "quantized"
    # the FP GEMMs are still aten mm/addmm in the graphs, annotated with the same reason
    assert "keep_fp 'net.3'" in r.graph("forward") and "aten.addmm" in r.graph("forward")
    assert _qgemm_count(r) == 3  # net.1 output, net.5 output and grad_input; the other 5 GEMMs stay FP
    text = str(r)
    assert "full_precision" in text and "keep_fp 'net.3'" in text


def test_table_json_graph_and_dot():
    r = fqtc.explain(_mlp(), torch.randn(6, 32), sqnr=True)
    text = str(r)
    for s in r.sites:
        assert s.name in text
    assert "saved for backward" in text and "SQNR dB" in text
    # JSON round-trips (inf SQNR of FP GEMMs is written as "inf")
    d = json.loads(r.to_json())
    assert len(d["sites"]) == len(r.sites) and d["memory"]["fqt_bytes"] == r.memory.fqt_bytes
    back = Report.from_json(r.to_json())
    assert back.to_dict() == r.to_dict()
    assert str(back).splitlines()[3:] == text.splitlines()[3:]
    # annotated graphs
    fw, bw = r.graph("forward"), r.graph("backward")
    assert "fqt.qgemm" in fw and "# fqt: net.1/output quantized" in fw
    assert "# fqt: quantize net.3/grad_input/grad_output int8/sample/stochastic" in bw
    assert "step counter" in r.graph("joint")
    with pytest.raises(ValueError, match="unknown graph 'bogus'; allowed: joint, forward, backward, inference"):
        r.graph("bogus")
    with pytest.raises(ValueError, match="loaded from JSON"):
        back.graph("forward")
    dot = r.to_dot("backward")
    assert dot.startswith("strict digraph") and "qgemm" in dot and "lightblue" in dot


def test_sqnr_measured_per_gemm():
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    r8 = fqtc.explain(_mlp(), x, sqnr=True, memory=False)
    r4 = fqtc.explain(_mlp(), x, options={"bits": "W4A4G4"}, sqnr=True, memory=False)
    # measured here: 8-bit GEMMs 38.4-44.3 dB, 4-bit 13.7-20.2 dB (~6 dB per bit: int8 ~24 dB above int4)
    for s8, s4 in zip(r8.sites, r4.sites):
        assert (s8.name, s8.role) == (s4.name, s4.role)
        assert s8.sqnr_db > 30, (s8.name, s8.role, s8.sqnr_db)
        assert 5 < s4.sqnr_db < 25, (s4.name, s4.role, s4.sqnr_db)
        assert s8.sqnr_db - s4.sqnr_db > 12
    fp = fqtc.explain(_mlp(), x, options={"keep_fp": ["net.5"]}, sqnr=True, memory=False)
    assert all(math.isinf(s.sqnr_db) for s in fp.sites if s.name == "net.5")


def test_sqnr_db_formula():
    ref = torch.tensor([3.0, 4.0])
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # ||ref|| / ||0.1 ref|| = 10 -> 20 dB


def test_memory_saved_for_backward():
    # batch 64: activations dominate the saved bytes; the fqt graphs save int8 codes where FP32 saves fp32
    r = fqtc.explain(_mlp(), torch.randn(64, 32))
    m = r.memory
    assert any(t.dtype == "int8" and t.kind == "activation" for t in m.fqt)
    assert not any(t.dtype == "int8" for t in m.fp32)
    assert m.fqt_bytes == sum(t.bytes for t in m.fqt) and m.fp32_bytes == sum(t.bytes for t in m.fp32)
    int8 = {tuple(t.shape) for t in m.fqt if t.dtype == "int8"}
    assert (64, 32) in int8  # the network input is saved as its int8 codes (FP32 saves the fp32 input)
    assert m.fqt_bytes < m.fp32_bytes  # measured here: 16916 B vs 20480 B


def test_explain_leaves_grads_buffers_and_step_alone():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fqtc.set_step(7)
    fqtc.explain(m, torch.randn(4, 32), sqnr=True)
    assert fqtc.get_step() == 7
    assert all(p.grad is None for p in m.parameters())
    # the compiled forward updates BatchNorm running statistics in place on every run; explain restores them
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_benchmark_models_list_every_gemm():
    torch.manual_seed(0)
    cnn = SmallCNN(in_channels=1, widths=(4, 8), num_classes=10, image_size=8, hidden=16)
    r = fqtc.explain(cnn, torch.randn(2, 1, 8, 8), memory=False)
    assert _roles(r, "conv1") == ["grad_weight", "output"]  # the image needs no grad: no grad_input GEMM
    for site in ("conv2", "fc1", "fc2"):
        assert _roles(r, site) == ["grad_input", "grad_weight", "output"]
    assert {s.module_type for s in r.sites} == {"Conv2d", "Linear"}
    assert all(s.status == "quantized" and set(s.bits.values()) == {8} for s in r.sites)

    gpt = CharGPT(vocab_size=16, dim=16, heads=2, layers=1, max_len=8)
    r = fqtc.explain(gpt, torch.randint(0, 16, (2, 8)), memory=False)
    for site in ("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.fc", "blocks.0.proj"):
        assert _roles(r, site) == ["grad_input", "grad_weight", "output"], site
    bmm = [s for s in r.sites if s.op == "bmm"]
    assert len(bmm) == 6  # Q.K^T and P.V, each with two backward products (attention traced in math form)
    assert all(set(s.bits) == {"input", "input2"} for s in bmm if s.role == "output")
    assert len(r.sites) == 4 * 3 + 6 + 3  # + the tied output head (F.linear on the embedding)


def test_log_sqnr_logs_chosen_sites_every_step(caplog):
    m = _mlp()
    x = torch.randn(6, 32)
    clear_sqnr_log()
    compiled = compile_fqt(m, {"log_sqnr": ["net.3"]})
    with caplog.at_level(logging.INFO, logger="fqtc.debug"):
        for _ in range(2):
            compiled(x).sum().backward()
    log = sqnr_log(clear=True)
    tags = {e["tag"] for e in log}
    assert tags == {"net.3/output/input", "net.3/output/weight", "net.3/grad_input/grad_output",
                    "net.3/grad_input/weight", "net.3/grad_weight/grad_output"}
    assert len(log) == 2 * len(tags) and len({e["step"] for e in log}) == 2
    # the logged figure is the operand's quantization SQNR: recompute the weight's independently
    codes, scale = quantize(m.net[3].weight.detach(), 8, [1], "nearest")
    want = sqnr_db(m.net[3].weight.detach(), dequantize(codes, scale))
    got = [e for e in log if e["tag"] == "net.3/output/weight"]
    assert got[0]["sqnr_db"] == pytest.approx(want, rel=1e-6)
    assert got[0]["amax"] == pytest.approx(float(m.net[3].weight.detach().abs().max()))
    assert sum("net.3/output/weight" in rec.getMessage() for rec in caplog.records) == 2
    with pytest.raises(ValueError, match="'log_sqnr': got 3; allowed: True, a site/module-path glob"):
        fqtc.FQTConfig.from_options({"log_sqnr": 3})


def test_log_sqnr_keeps_numerics():
    m = _mlp()
    x = torch.randn(6, 32)
    fqtc.set_step(0)
    ref = compile_fqt(m, None)(x)
    torch._dynamo.reset()
    fqtc.set_step(0)
    got = compile_fqt(m, {"log_sqnr": True})(x)
    clear_sqnr_log()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_cli_inspect(capsys):
    from fqtc.cli import main

    assert main(["inspect", "benchmarks.models:MLP", "--input-shape", "4,64", "--kwargs", '{"hidden": [16]}',
                 "--options", '{"keep_fp": ["net.3"]}', "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["role"], s["status"]) for s in d["sites"]] == [
        ("net.1", "output", "quantized"), ("net.1", "grad_weight", "quantized"),
        ("net.3", "output", "full_precision"), ("net.3", "grad_input", "full_precision"),
        ("net.3", "grad_weight", "full_precision")]


def test_explain_bad_input():
    with pytest.raises(ValueError, match="give at least one example input"):
        fqtc.explain(_mlp())
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fqtc.explain(lambda x: x, torch.randn(2))
