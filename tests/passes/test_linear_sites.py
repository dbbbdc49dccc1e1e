"""Structural tests of the linear GEMM rewrite: every GEMM found, linked to the right site and role, rewritten."""

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from tests.helpers import compile_fqt, run_and_capture

aten = torch.ops.aten
ROLES = {"output", "grad_input", "grad_weight"}


class MLP3(nn.Module):
    """Three Linear layers; fc2 is square and bias-free (square layers make shape-based linking ambiguous)."""

    def __init__(self, d_in=12, d=16, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d)
        self.fc2 = nn.Linear(d, d, bias=False)
        self.fc3 = nn.Linear(d, d_out)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _count(gm, target):
    return len(gm.graph.find_nodes(op="call_function", target=target)) if gm is not None else 0


@pytest.mark.parametrize("shape", [(6, 12), (2, 3, 12)], ids=["2d", "3d"])
def test_all_nine_gemms_rewritten_and_linked(shape):
    torch.manual_seed(0)
    model = MLP3()
    x = torch.randn(*shape, requires_grad=True)
    _, cgs = run_and_capture(model, (x,))
    (cg,) = cgs
    recs = cg.records
    assert len(recs) == 9
    by_site = {}
    for r in recs:
        by_site.setdefault(r["site"], set()).add(r["role"])
        assert r["status"] == "quantized", r
        assert r["integer_gemm"], r
    assert by_site == {"fc1": ROLES, "fc2": ROLES, "fc3": ROLES}
    # no GEMM survives in the partitioned graphs; 3 forward + 6 backward qgemm's
    for gm in (cg.forward, cg.backward):
        for t in (aten.mm.default, aten.addmm.default, aten.bmm.default):
            assert _count(gm, t) == 0
    assert _count(cg.forward, torch.ops.fqt.qgemm.default) == 3
    assert _count(cg.backward, torch.ops.fqt.qgemm.default) == 6
    # each record sits on a qgemm node whose meta["fqt"] is the same dict (one source of truth)
    for gm in (cg.forward, cg.backward):
        for n in gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.qgemm.default):
            assert n.meta["fqt"]["site"] in by_site
    # module type and operands per role
    r = next(r for r in recs if r["site"] == "fc2" and r["role"] == "grad_weight")
    assert r["module_type"] == "Linear" and set(r["operands"]) == {"grad_output", "input"}
    r = next(r for r in recs if r["site"] == "fc2" and r["role"] == "grad_input")
    assert set(r["operands"]) == {"grad_output", "weight"}


def test_first_layer_without_input_grad_has_no_grad_input():
    model = MLP3()
    _, cgs = run_and_capture(model, (torch.randn(4, 12),))
    roles = {(r["site"], r["role"]) for r in cgs[0].records}
    assert ("fc1", "grad_input") not in roles and ("fc1", "grad_weight") in roles
    assert len(roles) == 8


# Linking checked semantically: quantize exactly one (site, role) coarsely and everything else not at all. Only the
# gradients that GEMM feeds may change; all others must equal eager exactly. A mislinked role fails this.
AFFECTED = {
    ("fc2", "grad_weight"): {"fc2.weight"},
    ("fc2", "grad_input"): {"fc1.weight", "fc1.bias", "x"},
    ("fc3", "grad_input"): {"fc2.weight", "fc1.weight", "fc1.bias", "x"},
    ("fc1", "grad_weight"): {"fc1.weight"},
    ("fc1", "grad_input"): {"x"},
}


@pytest.mark.parametrize("site,role", sorted(AFFECTED))
def test_backward_gemms_linked_to_right_site_and_role(site, role):
    torch.manual_seed(0)
    model = MLP3()
    x = torch.randn(2, 3, 12, requires_grad=True)
    model(x).pow(2).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()} | {"x": x.grad.clone()}
    model.zero_grad(set_to_none=True)
    x.grad = None
    opts = {"bits": "fp", "rules": [{"module": site, "role": role, "bits": 2}]}
    compile_fqt(model, opts)(x).pow(2).sum().backward()
    got = {n: p.grad for n, p in model.named_parameters()} | {"x": x.grad}
    for name in ref:
        if name in AFFECTED[(site, role)]:
            assert not torch.allclose(got[name], ref[name]), f"{name} should change when {site}.{role} is 2-bit"
        else:
            assert_close(got[name], ref[name], msg=f"{name} must not change when only {site}.{role} is quantized")


def test_parameter_names_are_fqns():
    model = nn.Sequential(nn.Sequential(MLP3()), nn.Tanh())
    _, (cg,) = run_and_capture(model, (torch.randn(3, 12),))
    names = [n for n in cg.param_names if n is not None]
    assert names == [n for n, _ in model.named_parameters()], names


class _Projections(nn.Module):
    """Three Linear sites on one 3-D activation (attention's q/k/v): each flattens it with its own view node."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)


def test_sites_reshaping_one_activation_share_its_codes():
    """The three views of one activation are one tensor: it is quantized once in forward (and its codes saved
    once for the three grad_weight GEMMs), and each site's output equals its own reference exactly."""
    from fqtc.quant.uniform import dequantize, quantize

    torch.manual_seed(0)
    m = _Projections()
    x = torch.randn(2, 5, 16)
    out, cgs = run_and_capture(m, (x,), {"rounding": "nearest"})
    fw = cgs[0].forward
    inputs = [n for n in fw.graph.find_nodes(op="call_function", target=torch.ops.fqt.quantize.default)
              if n.meta["fqt"]["operand"] == "input"]
    assert len(inputs) == 1, [n.meta["fqt"]["site"] for n in inputs]
    recs = {(r["site"], r["role"]): r for r in cgs[0].records}
    assert all(recs[(s, "grad_weight")]["status"] == "quantized" for s in "qkv")
    x2 = x.reshape(10, 16)
    xq = dequantize(*quantize(x2, 8, recs[("q", "output")]["operands"]["input"]["reduce_dims"]))
    for i, s in enumerate("qkv"):
        lin = getattr(m, s)
        wq = dequantize(*quantize(lin.weight.detach(), 8, recs[(s, "output")]["operands"]["weight"]["reduce_dims"]))
        want = (xq @ wq.t() + lin.bias.detach()).reshape(2, 5, 8)
        assert_close(out.detach()[..., 8 * i:8 * (i + 1)], want, rtol=1e-5, atol=1e-6)
