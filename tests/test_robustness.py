"""Bad inputs and options: empty batches, non-finite values through saved masks, option errors, backend lookup."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fqtc
from fqtc.backend import OptionError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_empty_batch_gives_an_empty_result_like_eager(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        m, x = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(0, 8)
    else:
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
        x = torch.randn(0, 3, 6, 6)
    ref = copy.deepcopy(m)
    ref(x).sum().backward()
    c = torch.compile(m, backend="fqt", options={"grad_quantizer": "psq"})
    y = c(x)
    y.sum().backward()
    assert y.shape == ref(x).shape
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)  # zeros, as in eager
    with torch.no_grad():
        assert c(x).shape == y.shape


@pytest.mark.parametrize("act", ["relu", "relu6", "gelu", "layernorm", "batchnorm"])
def test_nan_and_inf_inputs_never_give_finite_gradients_where_eager_gives_nan(act):
    # every saved mask / 8-bit saved activation on the way: a non-finite value is never hidden (it may spread
    # further than in eager: a per-tensor scale of a group holding Inf is Inf)
    make = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "layernorm": lambda: nn.LayerNorm(16),
            "batchnorm": lambda: nn.BatchNorm1d(16)}[act]
    for bits in ("W8A8G8", "fp"):
        for bad in (float("nan"), float("inf")):
            torch.manual_seed(0)
            m = nn.Sequential(nn.Linear(8, 16), make(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
            ref = copy.deepcopy(m)
            x = torch.randn(5, 8)
            x[1, 2] = bad
            ref(x).square().sum().backward()
            torch.compile(m, backend="fqt", options={"bits": bits})(x).square().sum().backward()
            for (name, p), q in zip(m.named_parameters(), ref.parameters()):
                hidden = ~q.grad.isfinite() & p.grad.isfinite()
                assert not hidden.any(), (bits, bad, name, int(hidden.sum()))
            assert not all(q.grad.isfinite().all() for q in ref.parameters())  # eager does give non-finite ones


def test_seed_range_is_validated():
    with pytest.raises(ValueError, match=r"'seed'.*\[0, 2\*\*63 - 1\]"):
        fqtc.FQTConfig.from_options({"seed": 2**63})
    with pytest.raises(ValueError, match="'seed'"):
        fqtc.FQTConfig.from_options({"seed": -1})
    m = nn.Linear(4, 3)  # the largest seed runs
    torch.compile(m, backend="fqt", options={"seed": 2**63 - 1})(torch.randn(2, 4)).sum().backward()
    assert m.weight.grad.isfinite().all()


def test_keep_fp_glob_matching_nothing_warns():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        torch.compile(m, backend="fqt", options={"keep_fp": ["fc9*", "0"]})(torch.randn(2, 4)).sum().backward()
    msgs = [str(w.message) for w in got if "keep_fp" in str(w.message)]
    assert len(msgs) == 1 and "'fc9*'" in msgs[0] and "matched no GEMM" in msgs[0], msgs


def test_bad_option_reaches_the_user_as_value_error_never_a_silent_fallback():
    m = nn.Linear(4, 3)
    c = torch.compile(m, backend="fqt", options={"bits": "W9A8G8"})
    with pytest.raises(ValueError, match="fqt option 'bits'") as info:
        c(torch.randn(2, 4))
    assert isinstance(info.value, OptionError)
    assert m.weight.grad is None
    with pytest.raises(ValueError, match="fqt option 'seed'"):  # fqtc.compile: at once
        fqtc.compile(m, {"seed": 2**63})


def test_first_backend_lookup_from_several_threads_is_safe():
    # a fresh process: the first lookup of "fqt" loads the entry point (here it is already registered)
    script = textwrap.dedent("""
        import threading, torch
        errors, done = [], []
        barrier = threading.Barrier(4)
        def work():
            try:
                barrier.wait(timeout=60)
                f = torch.compile(lambda x, w: x @ w, backend="fqt", options={"compiler": "eager"})
                done.append(f(torch.randn(4, 8), torch.randn(8, 3)).shape)
            except BaseException as e:
                errors.append(repr(e))
        threads = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in threads]
        [t.join(timeout=240) for t in threads]
        assert not errors and len(done) == 4, errors
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
