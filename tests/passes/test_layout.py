"""Option ``layout`` (fqtc/passes/layout.py): ``auto`` measures the crest factor of each Linear input on the first
batch and gives a graph with outlier features the outlier-robust ``token_rot`` layout of docs/outliers.md.

Structural tier: which layout each graph got, with the reason in the records; a user rule still wins; an
unmeasurable graph warns and keeps the default. Exact tier: ``layout="auto"`` on an outlier model computes the same
bits as the documented explicit options (token rules + ``rotate="hadamard"``), and the measuring run changes no
buffer and no random state.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from fqtc.backend import capture
from fqtc.config import FQTConfig
from fqtc.passes import layout as L

TOKEN_ROT_OPTIONS = {"rotate": "hadamard", "rules": [dict(r) for r in L.TOKEN_ROT_RULES]}


class Outliers(nn.Module):
    """A LayerNorm whose gain has one channel 200x the rest (as pretrained transformers learn: an input crest
    factor of about 40), then a block of Linears, BatchNorm and dropout (state the measuring run must leave
    alone)."""

    def __init__(self, d: int = 256, outlier: float = 200.0) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        with torch.no_grad():
            self.ln.weight[3] = outlier
        self.fc1 = nn.Linear(d, 128)
        self.bn = nn.BatchNorm1d(128)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(self.ln(x))))))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def _x(n: int = 32, d: int = 256) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0))


def _records(model: nn.Module, options: dict, x: torch.Tensor):
    torch.manual_seed(0)
    with capture() as cgs:
        out = torch.compile(model, backend="fqt", options={"compiler": "eager", **options})(x)
        out.sum().backward()
    return [r for cg in cgs for r in cg.records]


def _op(records, module: str, role: str, operand: str) -> dict:
    (rec,) = [r for r in records if r["module"] == module and r["role"] == role]
    return rec["operands"][operand] | {"notes": rec.get("notes", [])}


def test_crest_factor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    assert 3.0 < L.crest_factor(x) < 6.0  # Gaussian: max of 262k draws is ~4.6 sigma
    x[:, 3] *= 60.0
    assert L.crest_factor(x) > 24.0
    assert L.crest_factor(torch.zeros(3, 4)) is None and L.crest_factor(torch.empty(0, 4)) is None


def test_auto_picks_token_rot_for_outlier_features_only():
    torch.manual_seed(0)
    recs = _records(Outliers(), {}, _x())
    inp = _op(recs, "fc1", "output", "input")
    assert inp["granularity"] == "token" and inp["reason"].startswith("layout auto: token_rot")
    assert "fc1" in inp["reason"] or "fc2" in inp["reason"]
    assert _op(recs, "fc1", "grad_input", "weight")["granularity"] == "channel"
    assert _op(recs, "fc1", "grad_weight", "input")["granularity"] == "channel"
    assert any(n.startswith("rotated: randomized Hadamard") for n in inp["notes"])
    # a model trained from scratch keeps the default layout and reason
    torch.manual_seed(0)
    recs = _records(_mlp(), {}, _x())
    inp = _op(recs, "0", "output", "input")
    assert inp["granularity"] != "token" and inp["reason"] == "default W8A8G8"
    assert not any(n.startswith("rotated") for n in inp["notes"])


def test_explicit_layouts_and_user_rules():
    torch.manual_seed(0)
    recs = _records(_mlp(), {"layout": "token_rot"}, _x())
    inp = _op(recs, "0", "output", "input")
    assert inp["granularity"] == "token" and inp["reason"].startswith("layout token_rot")
    torch.manual_seed(0)
    recs = _records(Outliers(), {"layout": "default"}, _x())
    assert _op(recs, "fc1", "output", "input")["reason"] == "default W8A8G8"
    # the user's rules come after the layout's: they win on the operands they name
    torch.manual_seed(0)
    recs = _records(Outliers(), {"rules": [{"role": "output", "operand": "input", "granularity": "tensor"}]}, _x())
    assert _op(recs, "fc1", "output", "input")["granularity"] == "tensor"
    assert _op(recs, "fc1", "grad_input", "weight")["reason"].startswith("layout auto")
    with pytest.raises(ValueError, match="layout.*auto, default, token_rot"):
        FQTConfig.from_options({"layout": "tokenrot"})


def _grads(options: dict) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Outliers()
    torch._dynamo.reset()
    torch.manual_seed(1)  # the same dropout masks in both runs
    out = torch.compile(model, backend="fqt", options={"compiler": "eager", **options})(_x())
    out.square().sum().backward()
    return [p.grad for p in model.parameters()]


def test_auto_layout_equals_the_documented_options_bit_for_bit():
    auto = _grads({})
    explicit = _grads({"layout": "default", **TOKEN_ROT_OPTIONS})
    default = _grads({"layout": "default"})
    for a, b in zip(auto, explicit):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(auto, default))


def test_measuring_run_leaves_state_alone():
    torch.manual_seed(0)
    model = Outliers().train()
    seen = {}

    def grab(gm, example_inputs):
        seen.update(gm=gm, inputs=list(example_inputs))
        return gm.forward

    x = _x()
    torch.compile(model, backend=grab)(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    crests = L.linear_input_crests(seen["gm"], seen["inputs"])
    assert torch.equal(torch.random.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the measured values are the crest factors of the Linears' real inputs
    with torch.no_grad():
        h = model.ln(x)
    assert crests["fc1"] == pytest.approx(L.crest_factor(h), rel=1e-5)
    assert crests["fc1"] >= L.OUTLIER_CREST > crests["fc2"]


def test_unmeasurable_graph_warns_and_keeps_the_default():
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = {}

    def grab(gm, example_inputs):
        seen.update(gm=gm, inputs=list(example_inputs))
        return gm.forward

    torch.compile(Outliers(), backend=grab)(_x())
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in seen["inputs"]]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cfg = L.expand_layout(FQTConfig(), seen["gm"], fake)
    assert cfg.rules == () and cfg.layout == "default"
    assert any("layout='auto' cannot measure" in str(m.message) for m in w)
    # block scaling is its own outlier remedy: no layout rules added
    cfg = L.expand_layout(FQTConfig(granularity="block"), seen["gm"], seen["inputs"])
    assert cfg.rules == ()


class OutlierAttention(nn.Module):
    """Outlier LayerNorm, then q/k/v Linears feeding SDPA: Linear and batched-product sites in one graph."""

    def __init__(self, d: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        with torch.no_grad():
            self.ln.weight[3] = 200.0
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln(x)
        q, k, v = (m(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)


def test_token_rot_covers_every_site_without_spurious_warnings():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        recs = _records(OutlierAttention(), {}, x)
    # the Linears take the graph input, so no grad_input GEMM exists for the layout's grad_input rule: no warning
    assert not [m for m in w if "matched no GEMM" in str(m.message)]
    lin = [r for r in recs if r["module_type"] == "Linear" and r["role"] == "output"]
    assert len(lin) == 3 and all(r["operands"]["input"]["granularity"] == "token" for r in lin)
    # attention's products: both operands per token along their last dim (docs/outliers.md), so the forward
    # products multiply dequantized operands, and their records say why
    bmm = [r for r in recs if r["op"] == "bmm" and r["role"] == "output"]
    assert len(bmm) == 2
    for r in bmm:
        ops = r["operands"].values()
        assert all(o["granularity"] == "token" and o["reason"].startswith("layout auto") for o in ops)
        assert not r["integer_gemm"] and any("reduction axis" in n for n in r["notes"])
