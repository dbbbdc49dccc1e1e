"""Per-node bit rules: precedence, globs, module type, role/operand targeting, presets, warnings.

Structural tests: each compiles a small model with the fqt backend and reads the decisions from the GEMM records
(``node.meta["fqt"]``) and, where it matters, from the ``fqt::quantize`` nodes the rewrite inserted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fqtc import FQTConfig
from fqtc.config import Rule
from tests.helpers import run_and_capture


class Proj(nn.Module):
    """A projection that is not an nn.Linear (its GEMM site's module_type is 'Proj')."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.proj = Proj(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(self.enc(x))))


def _compile(options: dict) -> dict[tuple[str, str], dict]:
    """Compile Net with ``options``, run forward+backward, return {(site, role): record}."""
    torch.manual_seed(0)
    _, cgs = run_and_capture(Net(), (torch.randn(6, 8),), options)
    recs = {(r["site"], r["role"]): r for cg in cgs for r in cg.records}
    assert len(recs) == 11  # 4 sites x 3 GEMMs, minus the first site's grad_input (its input needs no grad)
    return recs


def _bits(recs, site, role, operand):
    return recs[(site, role)]["operands"][operand]["bits"]


def _why(recs, site, role, operand):
    return recs[(site, role)]["operands"][operand]["reason"]


def test_glob_and_later_rule_wins_and_keep_fp_beats_rules():
    recs = _compile({"bits": "W8A8G8", "keep_fp": ["head"], "rules": [
        {"module": "enc.*", "bits": 4},
        {"module": "enc.2", "role": "grad_weight", "operand": "grad_output", "bits": 6},  # later: wins on enc.2
        {"module": "head", "bits": 3},  # loses against keep_fp
    ]})
    assert _bits(recs, "enc.0", "output", "input") == 4 and _bits(recs, "enc.2", "output", "weight") == 4
    assert _bits(recs, "enc.2", "grad_weight", "grad_output") == 6
    assert "role=grad_weight" in _why(recs, "enc.2", "grad_weight", "grad_output")
    assert _bits(recs, "enc.2", "grad_weight", "input") == 4
    assert _bits(recs, "proj", "output", "input") == 8  # glob does not reach it: bit-string default
    assert _why(recs, "proj", "output", "input") == "default W8A8G8"
    for role in ("output", "grad_input", "grad_weight"):
        assert recs[("head", role)]["status"] == "full_precision"
        assert _why(recs, "head", role, "input" if role != "grad_input" else "grad_output") == "keep_fp 'head'"


def test_module_type_and_role_targeting():
    recs = _compile({"bits": "W8A8G8", "rules": [
        {"module_type": "Linear", "role": "grad_weight", "operand": "grad_output", "bits": 3},
        {"module_type": "Proj", "bits": 5},
    ]})
    for site in ("enc.0", "enc.2", "head"):
        assert recs[(site, "grad_weight")]["module_type"] == "Linear"
        assert _bits(recs, site, "grad_weight", "grad_output") == 3
        assert _bits(recs, site, "grad_weight", "input") == 8  # operand targeting: only grad_output
        assert _bits(recs, site, "output", "input") == 8  # role targeting: forward untouched
    assert _bits(recs, "head", "grad_input", "grad_output") == 8
    assert recs[("proj", "output")]["module_type"] == "Proj"
    for role, op in (("output", "weight"), ("grad_input", "grad_output"), ("grad_weight", "grad_output")):
        assert _bits(recs, "proj", role, op) == 5
        assert _why(recs, "proj", role, op) == "rule(module=*, module_type=Proj, bits=5)"


def test_rule_bits_reach_the_quantize_nodes():
    torch.manual_seed(0)
    _, cgs = run_and_capture(Net(), (torch.randn(6, 8),), {"bits": "W8A8G8", "rules": [
        {"module": "proj", "role": "grad_weight", "operand": "grad_output", "bits": 3}]})
    joint = cgs[0].joint
    bits = sorted(n.args[1] for n in joint.graph.nodes if n.target == torch.ops.fqt.quantize.default)
    assert bits.count(3) == 1 and set(bits) == {3, 8}


def test_first_last_preset_expands_to_rules_with_reason():
    recs = _compile({"bits": "W4A4G4", "rules": [{"first_last": 8}]})
    for site in ("enc.0", "head"):
        for (s, role), r in recs.items():
            if s == site:
                assert all(op["bits"] == 8 for op in r["operands"].values()), (site, role)
    assert _why(recs, "enc.0", "output", "weight") == "preset first_last: first site 'enc.0' bits=8"
    assert _why(recs, "head", "grad_input", "grad_output") == "preset first_last: last site 'head' bits=8"
    assert _bits(recs, "enc.2", "output", "input") == 4 and _bits(recs, "proj", "grad_weight", "grad_output") == 4


def test_preset_narrowed_and_overridden_by_later_rule():
    recs = _compile({"bits": "W4A4G4", "rules": [
        {"first_last": "fp", "role": "output"},  # forward GEMMs of first/last site in full precision
        {"module": "head", "role": "output", "operand": "weight", "bits": 6},  # later rule wins on head's weight
    ]})
    assert recs[("enc.0", "output")]["status"] == "full_precision"
    assert _bits(recs, "enc.0", "grad_weight", "grad_output") == 4  # role-narrowed: backward keeps the default
    assert _bits(recs, "head", "output", "input") is None and _bits(recs, "head", "output", "weight") == 6
    assert recs[("head", "output")]["status"] == "partial"


def test_rules_matching_nothing_warn():
    with pytest.warns(UserWarning) as caught:
        _compile({"rules": [{"module_type": "Conv2d", "bits": 4}, {"module": "decoder.*", "bits": 4},
                            {"module": "enc.*", "bits": 6}]})
    msgs = [str(w.message) for w in caught if "matched no GEMM operand" in str(w.message)]
    assert len(msgs) == 2
    assert any("module_type=Conv2d" in m for m in msgs) and any("module=decoder.*" in m for m in msgs)


def test_backward_rules_do_not_warn_in_inference_graphs():
    """An inference graph (no_grad) has no backward GEMMs: a rule naming a backward role has nothing to match there
    and does not warn; a rule for the forward that matches nothing still does."""
    import warnings

    from tests.helpers import compile_fqt

    torch.manual_seed(0)
    model = compile_fqt(Net(), {"rules": [{"role": "grad_weight", "operand": "input", "granularity": "channel"},
                                          {"module": "nowhere", "role": "output", "bits": 4}]})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(torch.randn(6, 8))
    msgs = [str(w.message) for w in caught if "matched no GEMM operand" in str(w.message)]
    assert len(msgs) == 1 and "module=nowhere" in msgs[0], msgs


def test_resolve_precedence_without_graph():
    cfg = FQTConfig.from_options({"bits": "W8A8G8", "keep_fp": ["grad_input"], "rules": [
        {"module_type": "Linear", "bits": 4},
        {"module": "fc", "operand": "grad_output", "rounding": "nearest"},  # no bits: keeps the 4 from above
    ]})
    spec, why = cfg.resolve("fc", "grad_weight", "grad_output", "Linear")
    assert (spec.bits, spec.rounding, spec.granularity) == (4, "nearest", "channel")
    assert why == "rule(module=fc, operand=grad_output)"
    assert cfg.resolve("fc", "grad_input", "grad_output", "Linear") == (None, "keep_fp 'grad_input'")
    assert cfg.resolve("fc", "output", "input", "Conv2d")[0].bits == 8
    assert cfg.bits_set_by_user("fc", "grad_weight", "grad_output", "Linear")
    assert not cfg.bits_set_by_user("fc", "grad_weight", "grad_output", "Conv2d")
    # a preset matches nothing until it is expanded over the sites (in graph order)
    pre = FQTConfig.from_options({"rules": [{"last": 6, "operand": "weight"}]})
    assert not pre.rules[0].matches("a", "output", "weight")
    exp = pre.expand_presets(["a", "b#1", "c*d"])
    assert [r.module for r in exp.rules] == ["c[*]d"]  # exact match: glob characters escaped
    assert exp.resolve("c*d", "output", "weight")[0].bits == 6 and exp.resolve("cxd", "output", "weight")[0].bits == 8


@pytest.mark.parametrize("rules, match", [
    ([{"first_last": 8, "bits": 4}], r"'rules\[0\]'.*the preset's value is its bits"),
    ([{"first_last": 8, "module": "fc"}], r"'rules\[0\].module'.*no module glob in a preset"),
    ([{"first_last": 8, "last": 8}], r"'rules\[0\]'.*one preset per rule"),
    ([{"preset": "middle", "bits": 8}], r"'rules\[0\].preset': got 'middle'; allowed: first_last, first, last"),
    ([{"first_last": 12}], r"'rules\[0\].bits': got 12"),
    ([{"module_type": 3, "bits": 4}], r"'rules\[0\].module_type'"),
])
def test_bad_rules_name_the_problem(rules, match):
    with pytest.raises(ValueError, match=match):
        FQTConfig.from_options({"rules": rules})


def test_rule_describe():
    assert Rule(module_type="Linear", role="grad_weight", bits=4).describe() == (
        "rule(module=*, module_type=Linear, role=grad_weight, bits=4)")
    assert Rule.from_option({"first_last": "fp"}, 0).describe() == "rule(preset=first_last, bits=fp)"
