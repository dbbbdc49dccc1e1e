"""Block scaling through the compiler: option and rule resolution, the rewrite (``fqt::quantize_block`` +
``fqt::block_gemm``, shared b x b tiles for operands two GEMMs read), the compiled numerics against the
reference functions, Inductor's lowering bit for bit, convolutions keeping their layout, and explain."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fqtc
from fqtc.config import FQTConfig
from fqtc.quant import block as B
from tests.helpers import assert_quantized_graphs, compile_fqt, run_and_capture, sqnr

fqt = torch.ops.fqt
BLOCK = {"granularity": "block", "rounding": "nearest"}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 10))


def _nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def test_options_and_rules_resolve_block_specs():
    cfg = FQTConfig.from_options({"granularity": "block", "block_size": 64})
    for role, operand in (("output", "input"), ("output", "weight"), ("grad_input", "grad_output"),
                          ("grad_weight", "grad_output"), ("grad_weight", "input")):
        spec, _ = cfg.resolve("fc", role, operand)
        assert (spec.granularity, spec.block_size) == ("block", 64)
    # a rule turns one operand to blocks; its block size defaults to 32
    cfg = FQTConfig.from_options({"rules": [{"operand": "input", "granularity": "block"}]})
    assert cfg.resolve("fc", "output", "input")[0].short_str() == "int8/block32/rn"
    assert cfg.resolve("fc", "output", "weight")[0].granularity == "channel"
    # gradient quantizers keep their own layouts under the option
    cfg = FQTConfig.from_options({"granularity": "block", "grad_quantizer": "psq"})
    assert cfg.resolve("fc", "grad_input", "grad_output")[0].granularity != "block"
    for bad, match in (({"granularity": "token"}, "'granularity'"), ({"block_size": 48}, "'block_size'"),
                       ({"rules": [{"operand": "input", "block_size": 8}]}, r"rules\[0\].block_size")):
        with pytest.raises(ValueError, match=match):
            FQTConfig.from_options(bad)


def test_rewrite_shares_tiles_and_blocks_the_gradient():
    m, x = _mlp(), torch.randn(40, 48)
    _, cgs = run_and_capture(m, (x,), BLOCK)
    cg = cgs[0]
    assert_quantized_graphs(cg, n_forward=2, n_backward=3)
    fw, bw = cg.forward, cg.backward
    assert len(_nodes(fw, fqt.block_gemm.default)) == 2 and not _nodes(fw, fqt.qgemm.default)
    assert len(_nodes(bw, fqt.block_gemm.default)) == 3 and not _nodes(bw, fqt.qgemm.default)
    q_fw = _nodes(fw, fqt.quantize_block.default)
    # forward: the input and weight of each Linear as b x b tiles; the inputs' codes are saved for grad_weight
    assert sorted(tuple(n.args[2]) for n in q_fw) == [(0, 1)] * 4
    recs = {(r["site"], r["role"]): r for r in cg.records}
    assert recs[("2", "grad_input")]["operands"]["grad_output"]["block_dims"] == [1]  # reduction over outputs
    assert recs[("2", "grad_weight")]["operands"]["grad_output"]["block_dims"] == [0]  # reduction over samples
    assert all(r["evidence"] == "fqt::block_gemm(int8, int8)" for r in cg.records)
    # the backward re-quantizes no forward activation: its quantize_block nodes are the gradients' (and the
    # recomputed weight's, which is cheaper than saving its codes)
    bw_ops = sorted(n.meta["fqt"]["operand"] for n in _nodes(bw, fqt.quantize_block.default))
    assert "input" not in bw_ops and bw_ops.count("grad_output") == 3


def test_compiled_numerics_equal_the_reference_functions():
    """Nearest rounding everywhere: the output, the input gradient and the weight gradient of a Linear equal the
    reference functions applied by hand to the same tensors (exact)."""
    torch.manual_seed(3)
    lin = nn.Linear(80, 40)
    x = torch.randn(37, 80, requires_grad=True)
    go = torch.randn(37, 40)
    out, _ = run_and_capture(lin, (x,), {**BLOCK, "block_size": 16}, grad=go)
    w, xd = lin.weight.detach(), x.detach()
    xc, xs = B.quantize_block(xd, 8, [0, 1], 16)
    wc, ws = B.quantize_block(w, 8, [0, 1], 16)
    torch.testing.assert_close(out.detach(), B.block_gemm(xc, xs, wc.t(), ws.t(), 16, lin.bias.detach()),
                               rtol=0, atol=0)
    gc, gs = B.quantize_block(go, 8, [1], 16)
    torch.testing.assert_close(x.grad, B.block_gemm(gc, gs, wc, ws, 16), rtol=0, atol=0)
    gc0, gs0 = B.quantize_block(go, 8, [0], 16)
    torch.testing.assert_close(lin.weight.grad, B.block_gemm(gc0.t(), gs0.t(), xc, xs, 16), rtol=0, atol=0)


def test_operand_one_gemm_reads_in_blocks_takes_groups():
    """A rule setting blocks on the output GEMM's operands alone: the backward GEMMs read their own (default)
    quantization of the weight and the input, so the output GEMM's operands get 1 x b groups along K (finer than
    b x b tiles) in the training graph and in the inference graph alike, and the output equals the reference."""
    torch.manual_seed(6)
    lin = nn.Linear(80, 40)
    x = torch.randn(37, 80, requires_grad=True)
    opts = {"rules": [{"role": "output", "operand": "input", "granularity": "block", "block_size": 16},
                      {"role": "output", "operand": "weight", "granularity": "block", "block_size": 16}]}
    out, cgs = run_and_capture(lin, (x,), opts)
    recs = {r["role"]: r for r in cgs[0].records}
    assert recs["output"]["operands"]["weight"]["block_dims"] == [1]  # W [N, K]: groups along K
    assert recs["output"]["operands"]["input"]["block_dims"] == [1]
    assert recs["grad_input"]["operands"]["weight"]["granularity"] == "tensor"
    assert recs["grad_weight"]["operands"]["input"]["granularity"] == "tensor"
    xc, xs = B.quantize_block(x.detach(), 8, [1], 16)
    wc, ws = B.quantize_block(lin.weight.detach(), 8, [1], 16)
    expect = B.block_gemm(xc, xs, wc.t(), ws.t(), 16, lin.bias.detach())
    torch.testing.assert_close(out.detach(), expect, rtol=0, atol=0)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(compile_fqt(lin, opts)(x.detach()), expect, rtol=0, atol=0)
    # the same rules on both GEMMs reading the weight: one set of shared b x b tiles again
    both = {"rules": [{"operand": "weight", "granularity": "block", "block_size": 16}]}
    _, cgs = run_and_capture(lin, (x,), both)
    recs = {r["role"]: r for r in cgs[0].records}
    assert recs["output"]["operands"]["weight"]["block_dims"] == [0, 1]
    assert recs["grad_input"]["operands"]["weight"]["block_dims"] == [0, 1]


def test_inference_graph_quantizes_like_the_training_forward():
    """granularity="block": the inference graph (no backward GEMMs) keeps the b x b tiles of the training graph's
    forward, so evaluation sees the numerics training saw."""
    m, x = _mlp(), torch.randn(24, 48)
    train_out = compile_fqt(m, {**BLOCK})(x)
    torch._dynamo.reset()
    with torch.no_grad():
        eval_out = compile_fqt(m, {**BLOCK})(x)
    torch.testing.assert_close(eval_out, train_out.detach(), rtol=0, atol=0)


_OUTPUT_GROUPS = {"rules": [{"role": "output", "operand": "input", "granularity": "block"},
                            {"role": "output", "operand": "weight", "granularity": "block"}]}


@pytest.mark.parametrize("opts", [{"granularity": "block"}, _OUTPUT_GROUPS], ids=["tiles", "output_groups"])
def test_inductor_lowering_is_bit_exact(opts):
    x = torch.randn(24, 48)
    grads = {}
    for compiler in ("eager", "inductor"):
        torch._dynamo.reset()
        m = _mlp()
        out = compile_fqt(m, {**opts, "compiler": compiler})(x)
        out.pow(2).mean().backward()
        grads[compiler] = (out.detach(), [p.grad for n, p in m.named_parameters() if n.endswith("weight")])
    torch.testing.assert_close(grads["inductor"][0], grads["eager"][0], rtol=0, atol=0)
    for a, b in zip(grads["inductor"][1], grads["eager"][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_attention_bmm_and_latent_weights_take_blocks():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, t):
            return (self.q(t) @ self.k(t).transpose(-1, -2)).softmax(-1) @ t

    torch.manual_seed(4)
    _, cgs = run_and_capture(Attn(), (torch.randn(2, 16, 32),), {"granularity": "block", "block_size": 16})
    recs = [r for cg in cgs for r in cg.records]
    assert {r["site"] for r in recs} >= {"q", "k", "bmm", "bmm_1"}
    assert all(r["status"] == "quantized" and r["evidence"] == "fqt::block_gemm(int8, int8)" for r in recs)
    # latent weights: the block spec quantizes the latent weight itself (its per-row codes are another layout)
    lm = fqtc.prepare(_mlp(), {"bits": "W8A8G8L4"})
    _, cgs = run_and_capture(lm, (torch.randn(8, 48),), {"bits": "W8A8G8L4", "granularity": "block"})
    assert all(r["evidence"] == "fqt::block_gemm(int8, int8)" for r in cgs[0].records)


def test_convolutions_keep_their_layout_and_say_so():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    _, cgs = run_and_capture(net, (torch.randn(2, 3, 8, 8),), {"granularity": "block"})
    recs = cgs[0].records
    conv = [r for r in recs if r["site"] == "0"]
    assert conv and all(r["status"] == "quantized" for r in conv)
    assert all("block scaling applies to linear and bmm GEMMs" in o["reason"]
               for r in conv for o in r["operands"].values())
    assert all(r["evidence"] == "fqt::block_gemm(int8, int8)" for r in recs if r["site"] == "2")


def test_one_block_size_per_gemm():
    opts = {"rules": [{"operand": "input", "granularity": "block", "block_size": 16},
                      {"operand": "weight", "granularity": "block", "block_size": 64}]}
    with pytest.raises(Exception, match="one block_size"):
        run_and_capture(_mlp(), (torch.randn(4, 48),), opts)


def test_explain_names_the_block_size():
    rep = fqtc.explain(_mlp(), torch.randn(8, 48), options={"granularity": "block", "block_size": 64})
    text = str(rep)
    assert "input:int8/block64/rn" in text and "weight:int8/block64/rn" in text


def test_rotation_composes_with_blocks():
    """rotate="hadamard" rotates the block-quantized operands of the output GEMM and un-rotates the backward GEMMs
    that read the same codes: the gradients stay close to FP32's (a missing un-rotation leaves them at ~0 dB)."""
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    ref = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    ref.load_state_dict(m.state_dict())
    x = torch.randn(16, 64)
    ref(x).sum().backward()
    _, cgs = run_and_capture(m, (x,), {"granularity": "block", "rotate": "hadamard", "rounding": "nearest"})
    recs = {(r["site"], r["role"]): r for r in cgs[0].records}
    assert all(any(n.startswith("rotated:") for n in recs[(s, "output")]["notes"]) for s in ("0", "2"))
    assert any("un-rotated" in n for n in recs[("2", "grad_input")]["notes"])
    assert all(r["evidence"] == "fqt::block_gemm(int8, int8)" for r in recs.values())
    for p, q in zip(m.parameters(), ref.parameters()):
        assert sqnr(q.grad, p.grad) > 20
