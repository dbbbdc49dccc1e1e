"""Mutation check: each deliberate break of a README claim (tests/mutations.py) makes at least one fast test fail.

Each case runs a few named tests in a subprocess with ``FQTC_MUTATION=<name>`` (tests/conftest.py installs the
mutation before any test module is imported) and expects pytest's exit status 1: tests ran and some failed.
The same tests pass unmutated in the normal suite.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINEAR_REF = "tests/compile/test_gemm_reference.py::test_linear_step_equals_dequantized_reference[defaults]"
SQNR8 = "tests/compile/test_numerics_e2e.py::test_sqnr_w8a8g8"

CATCHERS = {
    "rewrite_skipped": [LINEAR_REF, SQNR8],
    "exact_quantizer": [SQNR8, LINEAR_REF],
    "per_tensor_weights": [LINEAR_REF],
    "per_tensor_grad_output": [LINEAR_REF],
    "sr_bias": ["tests/quant/test_uniform.py::test_stochastic_rounding_unbiased_and_variance_bound[8]"],
    "linear_state_codec": ["tests/quant/test_lwq.py::test_state_codec_keeps_small_values_next_to_an_outlier"],
}


def test_every_mutation_has_catchers():
    from tests.mutations import MUTATIONS

    assert set(CATCHERS) == set(MUTATIONS)


@pytest.mark.parametrize("mutation", list(CATCHERS))
def test_mutation_is_caught(mutation):
    env = {**os.environ, "FQTC_MUTATION": mutation, "FQTC_COMPILER": "eager"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", "-x",
           *CATCHERS[mutation]]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 1, f"{mutation}: exit {res.returncode}, expected 1 (a test failed)\n{tail}"
    assert "AssertionError" in res.stdout or "assert " in res.stdout, tail  # failed on an assertion, not a crash
