"""Memory: backward reads int8 forward codes (+ fp32 scales), never fp32 activations or a saved int8 weight copy."""

import operator

import torch
import torch.nn as nn

from tests.helpers import run_and_capture

fqt = torch.ops.fqt
STRIP = (torch.ops.aten.t.default, torch.ops.aten.transpose.int, torch.ops.aten.permute.default)


def _source(n):
    while n.op == "call_function" and n.target in STRIP:
        n = n.args[0]
    return n


def _saved(cg):
    """Backward-graph placeholders that the forward saved (not tangents), name -> fake value."""
    return {n.name: n for n in cg.backward.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")}


def _param_placeholders(cg):
    return {n for n in cg.backward.graph.nodes if n.op == "placeholder" and n.name.startswith("primals")}


def test_backward_gemms_read_int8_saved_activations_and_recompute_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
    x = torch.randn(16, 3, 32)  # no grad: first site has no grad_input
    _, (cg,) = run_and_capture(model, (x,))
    saved = _saved(cg)
    qgemms = cg.backward.graph.find_nodes(op="call_function", target=fqt.qgemm.default)
    assert len(qgemms) == 5  # 3 grad_weight + 2 grad_input
    for q in qgemms:
        rec = q.meta["fqt"]
        a, sa, b, sb = (_source(x) for x in q.args[:4])
        for codes, scale, name in ((a, sa, "a"), (b, sb, "b")):
            if codes.op == "placeholder":  # saved by forward: must be int8 codes + a small fp32 scale
                assert codes.meta["val"].dtype == torch.int8, (rec["site"], rec["role"], codes.name)
                assert scale.op == "placeholder" and scale.meta["val"].dtype == torch.float32
                assert scale.meta["val"].numel() <= max(codes.meta["val"].shape)
            else:  # produced in backward: a getitem of a quantize of a gradient or of a *parameter*
                assert codes.target is operator.getitem
                qn = codes.args[0]
                assert qn.target == fqt.quantize.default
                src = qn.args[0]
                if rec["role"] == "grad_input" and qn.meta["fqt"]["operand"] == "weight":
                    assert src.op == "placeholder" and src.name.startswith("primals"), "weights re-quantized"
    # no int8 saved tensor has a weight's shape: weight codes are recomputed, not saved twice
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    for n in saved.values():
        v = n.meta["val"]
        if v.dtype == torch.int8:
            assert tuple(v.shape) not in weight_shapes, f"{n.name}: an int8 weight copy is saved"
    # every saved activation is int8; fp32 saved tensors are parameters and scales (tiny): GELU's backward reads
    # 8-bit codes of its input too (fqtc/passes/save_act.py)
    fp32_big = [n.name for n in saved.values() if n.meta["val"].dtype == torch.float32 and n.meta["val"].numel() > 64
                and n not in _param_placeholders(cg)]
    assert fp32_big == [], fp32_big


def test_saved_activation_bytes_shrink_4x():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    x = torch.randn(128, 64)

    def saved_bytes(options):
        torch._dynamo.reset()
        _, (cg,) = run_and_capture(model, (x,), options)
        # parameters stay alive anyway; everything else the forward hands to backward counts (x included)
        pshapes = {tuple(p.shape) for p in model.parameters()}
        return sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in _saved(cg).values()
                   if tuple(n.meta["val"].shape) not in pshapes)

    fp, q8 = saved_bytes({"bits": "fp"}), saved_bytes({"bits": "W8A8G8"})
    # three 128x64 activations (x and two layer outputs): fp32 98,304 bytes; int8 24,576 bytes + per-tensor scales
    # (4 B each) + the step counter (8 B)
    assert fp == 3 * 128 * 64 * 4
    assert q8 <= 3 * 128 * 64 + 64, q8


def test_relu_backward_saves_its_mask_in_the_codes_not_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(24, 32, requires_grad=True)
    out, (cg,) = run_and_capture(model, (x,))
    pshapes = {tuple(p.shape) for p in model.parameters()}
    saved = [n.meta["val"] for n in _saved(cg).values() if tuple(n.meta["val"].shape) not in pshapes]
    dtypes = sorted(str(v.dtype) for v in saved if v.numel() > 64)
    # x codes + two ReLU-output codes (int8) whose sign bits carry the two ReLU masks; no fp32 activation, no bool
    assert dtypes == ["torch.int8", "torch.int8", "torch.int8"], dtypes
    assert cg.result.counters["relu_masks"] == 2 and cg.result.counters["relu_masks_in_codes"] == 2
    # exact: the FP path with the mask rewrite equals eager
    model.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    _, (cg_fp,) = run_and_capture(model, (x2,), {"bits": "fp"})
    ref = x.detach().clone().requires_grad_(True)
    model.zero_grad()
    model(ref).backward(torch.ones(24, 8))
    torch.testing.assert_close(x2.grad, ref.grad)
