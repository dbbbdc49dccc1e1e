"""Options validation: every bad option raises a clear error naming the option, the value and what is allowed."""

import pytest
import torch
import torch.nn as nn

from fqtc import BitConfig, FQTConfig, QuantSpec
from tests.helpers import compile_fqt


def test_bit_strings():
    assert BitConfig.parse("W8A8G8") == BitConfig(8, 8, 8, None)
    assert BitConfig.parse("w4a8g8l4") == BitConfig(4, 8, 8, 4)
    assert BitConfig.parse("fp") == BitConfig(None, None, None, None)
    assert str(BitConfig.parse("W4A8G8L4")) == "W4A8G8L4"


@pytest.mark.parametrize("bits", ["W9A8G8", "W8A1G8", "W8A8", "int8", "W8A8G8L9"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"'bits'.*allowed"):
        FQTConfig.from_options({"bits": bits})


def test_bad_options_name_option_value_and_allowed():
    with pytest.raises(ValueError, match=r"unknown fqt option\(s\) \['bitz'\].*allowed options: bits"):
        FQTConfig.from_options({"bitz": "W8A8G8"})
    with pytest.raises(ValueError, match=r"'grad_quantizer': got 'nope'; allowed: uniform"):
        FQTConfig.from_options({"grad_quantizer": "nope"})
    with pytest.raises(ValueError, match=r"'rounding': got 'up'; allowed: nearest, stochastic"):
        FQTConfig.from_options({"rounding": "up"})
    with pytest.raises(ValueError, match=r"'seed': got -1"):
        FQTConfig.from_options({"seed": -1})
    with pytest.raises(ValueError, match=r"'rules\[0\].role': got 'fwd'; allowed: output, grad_input, grad_weight"):
        FQTConfig.from_options({"rules": [{"role": "fwd", "bits": 4}]})
    with pytest.raises(ValueError, match=r"'rules\[0\]': got \['bit'\]"):
        FQTConfig.from_options({"rules": [{"bit": 4}]})
    with pytest.raises(ValueError, match=r"'rules\[0\].bits': got 12"):
        FQTConfig.from_options({"rules": [{"module": "fc1", "bits": 12}]})
    with pytest.raises(ValueError, match=r"'quantizer': got 'magic'"):
        QuantSpec(8, "tensor", "nearest", "magic")


def test_rules_resolve_in_order_later_wins():
    cfg = FQTConfig.from_options({"bits": "W8A8G8", "rules": [
        {"module": "enc.*", "bits": 4},
        {"module": "enc.fc2", "role": "grad_weight", "operand": "grad_output", "bits": 6},
        {"module": "head", "bits": "fp"},
    ]})
    spec, why = cfg.resolve("enc.fc2", "grad_weight", "grad_output")
    assert spec.bits == 6 and spec.granularity == "channel" and spec.rounding == "stochastic" and "grad_weight" in why
    assert cfg.resolve("enc.fc2", "output", "weight")[0].bits == 4
    assert cfg.resolve("enc.fc1", "output", "input")[0].bits == 4
    assert cfg.resolve("dec.fc1", "output", "input")[0].bits == 8
    assert cfg.resolve("head", "output", "input") == (None, "rule(module=head, bits=fp)")


def test_rule_matching_nothing_warns():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"rule\(module=encoder\.\*.*matched no GEMM operand"):
        compile_fqt(model, {"rules": [{"module": "encoder.*", "bits": 4}]})(torch.randn(2, 8))


def test_non_float_gemm_operand_is_a_clear_error():
    class IntMM(nn.Module):
        def forward(self, a, b):
            return torch.mm(a, b)

    a = torch.randint(0, 5, (3, 4))
    with pytest.raises(Exception, match=r"dtype is torch.int64, not floating point.*keep_fp"):
        compile_fqt(IntMM(), {})(a, a.t().contiguous())
    # kept in full precision on request: runs and equals eager
    out = compile_fqt(IntMM(), {"keep_fp": ["output"]})(a, a.t().contiguous())
    assert torch.equal(out, a @ a.t())


def test_unknown_quantizer_in_rule():
    with pytest.raises(ValueError, match=r"'rules\[0\].quantizer': got 'bhqq'"):
        FQTConfig.from_options({"rules": [{"operand": "grad_output", "quantizer": "bhqq"}]})
