"""The CPU Inductor path (fqtc/codegen/inductor_cpu.py): fqt ops inlined as aten ops compute the reference's bits.

Exact tier: Inductor's C++ code for the quantizer (abs-max, IEEE division, round-half-to-even, the counter-based
hash, non-finite groups) and for the integer GEMM's epilogue must equal the eager reference bit for bit, so a model
trained with ``compiler="inductor"`` draws exactly the codes ``compiler="eager"`` draws. Structural tier: the fqt
ops are really gone from the compiled graphs (nothing left as an extern reference call).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

import fqtc
from fqtc.backend import capture
from fqtc.quant import gemm as qgemm_ref
from fqtc.quant import rng, uniform


def _variants(x: torch.Tensor, key: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for bits, dims, rounding in [(8, [0, 1], "nearest"), (8, [1], "nearest"), (4, [0], "nearest"),
                                 (8, [1], "stochastic"), (8, [0], "stochastic"), (2, [0, 1], "stochastic")]:
        codes, scale = uniform.quantize(x, bits, dims, rounding, seed=0, step=0, stream=0, amax=None,
                                        key=key if rounding == "stochastic" else None)
        out += [codes, scale]
    return out


def test_compiled_quantizer_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 53, generator=g) * torch.logspace(-3, 3, 53)  # columns over six decades
    x[3] = 0.0  # a zero-range row: scale 1
    x[5, 7] = float("nan")  # non-finite groups: NaN / Inf scale, codes 0 (quant/uniform.py)
    x[9, 2] = float("inf")
    key = rng.stream_key(11, 1234567, 99)
    # the precomputed key gives the same draws as (seed, step, stream)
    assert torch.equal(rng.uniform_like_key(x, key), rng.uniform_like(x, seed=11, step=1234567, stream=99))
    eager = _variants(x, key)
    compiled = torch.compile(_variants, backend="inductor", fullgraph=True)(x, key)
    for e, c in zip(eager, compiled):
        assert e.dtype == c.dtype
        assert torch.equal(e, c) or (e.is_floating_point() and torch.equal(e.isnan(), c.isnan())
                                     and torch.equal(e.nan_to_num(), c.nan_to_num()))


def _mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


@pytest.mark.parametrize("options", [{},
                                     {"rules": [{"role": "grad_input", "operand": "weight", "granularity": "channel"}]},
                                     {"layout": "token_rot"}],
                         ids=["defaults", "weight_scales_folded", "token_rot"])
def test_inductor_training_step_equals_eager_graphs(options):
    x = torch.randn(24, 64)  # K = 64: a rotation block for the token_rot layout
    t = torch.randn(24, 10)
    results = {}
    for compiler in ("eager", "auto"):  # auto: Inductor for CPU graphs (FQTConfig)
        torch._dynamo.reset()
        m = _mlp(64)
        with capture() as cgs:
            f = torch.compile(m, backend="fqt", options={"bits": "W8A8G8", "compiler": compiler, **options})
            fqtc.set_step(0)  # same stochastic-rounding stream for both
            out = f(x)
            ((out - t) ** 2).mean().backward()
        results[compiler] = (out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, cgs[0])
    (out_e, grads_e, cg_e), (out_i, grads_i, cg) = results["eager"], results["auto"]
    assert cg_e.compilers == ["eager", "eager"] and cg.compilers == ["inductor", "inductor"]
    assert torch.equal(out_e, out_i)
    for name, g in grads_e.items():
        if name.endswith("weight"):  # integer GEMMs on identical codes: identical bits
            assert torch.equal(g, grads_i[name]), name
        else:  # bias gradients are fp32 sums, which Inductor reduces in another order
            assert_close(g, grads_i[name], rtol=1e-5, atol=1e-7)
    # structural: the fqt ops were inlined, the GEMMs run the machine's integer GEMM
    assert len(cg.compiled) == 2  # forward and backward, as Inductor received them
    # explain and export keep reading the fqt-level graphs
    assert any(n.target is torch.ops.fqt.qgemm.default for n in cg.forward.graph.nodes)
    for gm in cg.compiled:
        targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert torch.ops.fqt.quantize.default not in targets
        assert torch.ops.fqt.qgemm.default not in targets
        assert torch.ops.fqt.rotate.default not in targets  # the rotation inlined too (signs, Hadamard matmul)
        if qgemm_ref.cpu_gemm_path() == "int_mm":
            assert torch.ops.aten._int_mm.default in targets
    if options.get("layout") == "token_rot":
        assert any(n.target is torch.ops.fqt.rotate.default for n in cg.forward.graph.nodes)
    assert all(r["integer_gemm"] for r in cg.records)  # folded weight scales: grad_input is integer too
    kernels = {r["codegen"]["kernel"] for r in cg.records if r.get("status") == "quantized"}
    assert kernels == {f"inductor:{qgemm_ref.cpu_gemm_path()}"}


def test_inductor_path_with_dropout_trains_quantized():
    """CPU dropout stays ``aten.native_dropout``, run as the eager kernel (Inductor's per-element CPU random numbers
    cost 188 ms of a 1 s MiniLM step): the masks come from torch's generator, so under one seed the Inductor graphs
    draw the eager graphs' masks and compute their bits."""
    x0 = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    results = {}
    for compiler in ("eager", "inductor"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 32, bias=False), nn.Dropout(0.1), nn.ReLU(),
                          nn.Linear(32, 4, bias=False))
        x = x0.clone().requires_grad_(True)
        with capture() as cgs:
            f = torch.compile(m, backend="fqt", options={"compiler": compiler})
            torch.manual_seed(1)
            fqtc.set_step(0)
            out = f(x)
            (out ** 2).sum().backward()
        results[compiler] = (out.detach(), x.grad.clone(), m[1].weight.grad.clone(), cgs[0])
    (out_e, gx_e, gw_e, _), (out_i, gx_i, gw_i, cg) = results["eager"], results["inductor"]
    assert cg.compilers == ["inductor", "inductor"]
    assert {r["codegen"]["kernel"] for r in cg.records} == {f"inductor:{qgemm_ref.cpu_gemm_path()}"}
    targets = {n.target for n in cg.compiled[0].graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.native_dropout.default in targets and torch.ops.prims.inductor_random.default not in targets
    assert torch.equal(out_e, out_i) and torch.equal(gx_e, gx_i) and torch.equal(gw_e, gw_i)
    assert (gx_i == 0).float().mean() > 0.3  # the first dropout's zeros reach the input gradient


def test_dynamic_batch_lowered_and_bit_identical():
    """A dynamic batch dimension (the last, smaller batch of an epoch): one graph serves every size, with the
    quantizers and GEMMs inlined, and computes the eager graphs' bits."""
    results = {}
    for compiler in ("eager", "inductor"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
        f = torch.compile(m, backend="fqt", dynamic=True, options={"compiler": compiler})
        outs = []
        with capture() as cgs:
            for b in (16, 9, 23):
                fqtc.set_step(0)
                x = torch.randn(b, 40, generator=torch.Generator().manual_seed(b))
                out = f(x)
                out.sum().backward()
                outs.append((out.detach(), m[0].weight.grad.clone()))
                m.zero_grad()
        results[compiler] = (outs, cgs)
    (eager, _), (ind, cgs) = results["eager"], results["inductor"]
    assert len(cgs) == 1  # one dynamic graph for the three batch sizes
    assert {r["codegen"]["kernel"] for r in cgs[0].records} == {f"inductor:{qgemm_ref.cpu_gemm_path()}"}
    for (o1, g1), (o2, g2) in zip(eager, ind):
        assert torch.equal(o1, o2) and torch.equal(g1, g2)


class _ConvNet(nn.Module):
    """conv3x3-ReLU, depthwise 3x3/2-ReLU, conv1x1-ReLU, Linear: every conv path (oneDNN or int8 im2col for dense
    convs, fp32 emulation for depthwise and strided grad_input) and no reduction outside the GEMMs, so every
    gradient bit depends only on integer sums and elementwise epilogues."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.c1(x))))))
        return self.fc(x.flatten(1))


def _step_both(make_model, x: torch.Tensor, options: dict | None = None) -> tuple[tuple, tuple]:
    """One training step (loss ``sum(out**2)``, step 0; W8A8G8 unless ``options``) of a fresh model under the eager
    and the Inductor fw/bw compiler: ``(out, {name: grad}, CompiledGraph)`` for each."""
    results = {}
    for compiler in ("eager", "inductor"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = make_model()
        with capture() as cgs:
            f = torch.compile(m, backend="fqt", options={"bits": "W8A8G8", **(options or {}), "compiler": compiler})
            fqtc.set_step(0)
            out = f(x)
            (out ** 2).sum().backward()
        results[compiler] = (out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, cgs[0])
    return results["eager"], results["inductor"]


def test_inductor_conv_step_equals_eager_graphs():
    """Conv GEMMs under Inductor: the exact accumulator stays one extern op (fqt::conv2d*_acc) and its dequantize
    epilogue is inlined; output and weight gradients equal the eager graphs' bit for bit."""
    x = torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    (out_e, grads_e, _), (out_i, grads_i, cg) = _step_both(_ConvNet, x)
    assert torch.equal(out_e, out_i)
    for name, g in grads_e.items():
        if name.endswith("weight"):
            assert torch.equal(g, grads_i[name]), name
        else:  # bias gradients are fp32 sums, which Inductor reduces in another order
            assert_close(g, grads_i[name], rtol=1e-5, atol=1e-6)
    acc_ops = {torch.ops.fqt.conv2d_acc.default, torch.ops.fqt.conv2d_input_acc.default,
               torch.ops.fqt.conv2d_weight_acc.default}
    seen = set()
    for gm in cg.compiled:
        targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert not targets & {torch.ops.fqt.qconv2d.default, torch.ops.fqt.qconv2d_input.default,
                              torch.ops.fqt.qconv2d_weight.default}
        seen |= targets & acc_ops
    assert seen == acc_ops
    assert any(r["codegen"]["kernel"].startswith("inductor:conv-") for r in cg.records if "codegen" in r)


def test_stream_keys_op_equals_per_stream_keys():
    """The lowering computes every stochastic quantizer's key of a graph with one fqt::stream_keys call."""
    step = torch.tensor(2**33 + 7, dtype=torch.int64)
    streams = [0, 12345, 2**32 - 1]
    keys = torch.ops.fqt.stream_keys.default(11, streams, step)
    assert keys.tolist() == [int(torch.ops.fqt.stream_key.default(11, s, step)) for s in streams]
    assert keys.tolist() == [int(rng.stream_key(11, step, s)) for s in streams]


class _Attn(nn.Module):
    """Two heads of (x Wq)(x Wk)^T (x Wv) without softmax: every value is an integer sum or an elementwise epilogue,
    so the eager and Inductor graphs must agree bit for bit on the batched GEMMs too."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.h = heads
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.h, d // self.h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        return ((q @ k.transpose(-1, -2)) @ v).transpose(1, 2).reshape(b, t, d)


@pytest.mark.parametrize("forced", [None, "int_mm"])
def test_inductor_batched_gemms_equal_eager_graphs(forced, monkeypatch):
    """Attention's per-head products: small ones run as one exact fp32 batched GEMM (`gemm_path`), inlined so the
    codes' float conversion fuses; larger ones keep the loop of int8 GEMMs as one extern op. Either way the
    gradients equal the eager graphs' bit for bit, and each record names the form that ran."""
    if forced == "int_mm":
        if qgemm_ref.cpu_gemm_path() != "int_mm":
            pytest.skip("this CPU has no fast int8 GEMM: every product takes the fp32 path")
        monkeypatch.setattr(qgemm_ref, "BMM_FP32_MACS", 0)  # every per-head product takes the int8 loop
    x = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(2))
    (out_e, grads_e, _), (out_i, grads_i, cg) = _step_both(_Attn, x)
    assert torch.equal(out_e, out_i)
    for name, g in grads_e.items():
        assert torch.equal(g, grads_i[name]), name
    bmm = [r for r in cg.records if r["op"] in ("bmm", "matmul") and r.get("status") == "quantized"]
    assert len(bmm) == 6  # two batched products, three GEMMs each
    path = qgemm_ref.cpu_gemm_path()
    want = "inductor:fp32" if forced is None else f"inductor:{path}"
    assert {r["codegen"]["kernel"] for r in bmm} == {want}
    extern = sum(n.target is torch.ops.fqt.int_gemm.default for gm in cg.compiled for n in gm.graph.nodes)
    assert extern == (6 if want == "inductor:int_mm" else 0)


@pytest.mark.parametrize("shape", [(7,), (3, 5, 17), (64, 33)])
def test_round_codes_lowering_is_bit_exact(shape):
    """``fqt::round_codes`` lowered to one Inductor loop body (inductor_cpu.register_round_codes_lowering) gives the
    reference's codes (fqtc.quant.uniform.round_codes + to_int8_codes) for any shape, any int64 key, both roundings,
    saturating, NaN and infinite values, and ties (round half to even)."""
    from fqtc.codegen.inductor_cpu import register_round_codes_lowering

    register_round_codes_lowering()
    g = torch.Generator().manual_seed(len(shape))
    y = torch.randn(shape, generator=g) * 90
    flat = y.view(-1)
    flat[::5] = torch.arange(0, flat[::5].numel()) - 3.5  # exact .5 ties
    flat[1] = float("nan")
    if flat.numel() > 3:
        flat[2], flat[3] = float("inf"), -float("inf")
    for rounding, qmax in (("nearest", 127), ("stochastic", 127), ("stochastic", 7)):
        torch._dynamo.reset()
        f = torch.compile(lambda y, k: torch.ops.fqt.round_codes.default(y, qmax, rounding, k), dynamic=False)
        for key in (0, 12345, 2**32 - 1, 2**40 + 5, -3):
            k = torch.tensor(key, dtype=torch.int64)
            ref = uniform.to_int8_codes(uniform.round_codes(y, qmax, rounding, key=k))
            assert torch.equal(f(y, k), ref), (rounding, key)


def test_quantizers_round_through_one_lowered_op():
    """Structural: in the graphs handed to Inductor, every quantizer's rounding tail is one ``fqt::round_codes`` node
    (no hash traced as aten integer ops, which Inductor would re-expand at every read)."""
    torch._dynamo.reset()
    m = _mlp(40)
    with capture() as cgs:
        f = torch.compile(m, backend="fqt", options={"bits": "W8A8G8", "compiler": "inductor"})
        f(torch.randn(8, 40)).sum().backward()
    for gm, graph in zip(cgs[0].compiled, (cgs[0].forward, cgs[0].backward)):
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        n_q = sum(n.target is torch.ops.fqt.quantize.default for n in graph.graph.nodes)
        assert n_q > 0 and targets.count(torch.ops.fqt.round_codes.default) == n_q
        assert torch.ops.aten.bitwise_xor.Tensor not in targets and torch.ops.aten.bitwise_xor.Scalar not in targets


def test_inductor_one_bit_psq_equals_eager_graphs():
    """PSQ at one bit (two levels per sample) under Inductor: the gradient quantizer stays the reference op, so
    the step's output and every gradient equal the eager graphs' bit for bit."""
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    (out_e, grads_e, _), (out_i, grads_i, cg) = _step_both(
        lambda: nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5)), x,
        {"bits": "W8A8G1", "grad_quantizer": "psq"})
    assert torch.equal(out_e, out_i)
    for name, g in grads_e.items():
        assert torch.equal(g, grads_i[name]), name
    gq = [r for r in cg.records if r["role"] in ("grad_input", "grad_weight")]
    assert gq and all(r["operands"]["grad_output"]["quantizer"] == "psq" and r["operands"]["grad_output"]["bits"] == 1
                      for r in gq)
