"""``fqt::lwq_update`` kernel (decode -> SGD -> scale refresh -> re-encode with the SR residual) vs the op's
reference implementation under the Triton interpreter: the updated integer codes, residual codes and scales are
bit-identical; the two float statistics are means (summed in another order) and compared with assert_close."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from fqtc.codegen import impls  # noqa: E402
from fqtc.codegen import lwq as klwq  # noqa: E402
from fqtc.optim.latent import LatentWeight  # noqa: E402

lwq_update = torch.ops.fqt.lwq_update.default


def _latent(shape, wbits, lbits, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.1
    return LatentWeight.from_float(w, wbits=wbits, lbits=lbits, seed=seed, stream=77), g


def _run(fn, lw, grad, hp, step, refresh, mu_interval=0, states=()):
    q, r, s, mu = lw.q.clone(), lw.r.clone(), lw.s.clone(), lw.mu.clone()
    states = [t.clone() for t in states]
    stats = fn(q, r, s, mu, grad, states, "sgd", hp, list(lw.shape), lw.wbits, lw.lbits, 5, lw.stream,
               torch.tensor(step), torch.tensor(False), refresh, mu_interval)
    return q, r, s, mu, stats, *states


@pytest.mark.parametrize("wbits,lbits", [(8, 4), (4, 4), (8, 8), (4, 2)])
@pytest.mark.parametrize("refresh", [True, False])
def test_lwq_sgd_matches_reference(wbits, lbits, refresh):
    lw, g = _latent((12, 40), wbits, lbits)
    # a large step on two rows pushes them past the integer range: the refresh (or the clip) must fire
    grad = torch.randn(lw.shape, generator=g)
    grad[2] *= 400.0
    grad[5] *= -400.0
    hp = [0.01, 0.0, 0.0, 0.05, 0.0]  # lr, momentum, dampening, weight decay, nesterov
    got = _run(klwq.lwq_update, lw, grad, hp, 3, refresh)
    want = _run(lwq_update, lw, grad, hp, 3, refresh)
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got[4], want[4], rtol=1e-5, atol=1e-7)
    assert not torch.equal(got[0], lw.q) or not torch.equal(got[1], lw.r)  # the step changed the codes
    if refresh:
        assert not torch.equal(got[2], lw.s)  # some rows were rescaled


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.1), (True, 0.0)])
def test_lwq_sgd_momentum_matches_reference(nesterov, dampening):
    """Momentum buffer (fp32 state, updated in place): step 1 sets it to the gradient, step 2 accumulates."""
    lw, g = _latent((8, 24), 4, 4, seed=3)
    hp = [0.02, 0.9, dampening, 0.01, float(nesterov)]
    buf = torch.zeros(lw.shape)
    for step in (1, 2):
        grad = torch.randn(lw.shape, generator=g)
        got = _run(klwq.lwq_update, lw, grad, hp, step, True, states=[buf])
        want = _run(lwq_update, lw, grad, hp, step, True, states=[buf])
        for a, b in zip(got[:4] + got[5:], want[:4] + want[5:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(got[4], want[4], rtol=1e-5, atol=1e-7)
        assert not torch.equal(got[5], buf)  # the buffer moved
        lw.q.copy_(want[0])
        lw.r.copy_(want[1])
        lw.s.copy_(want[2])
        buf = want[5]


def test_lwq_conv_weight_shape():
    lw, g = _latent((6, 3, 2, 2), 8, 4, seed=1)  # rows = output channels, E = 12
    grad = torch.randn(lw.shape, generator=g)
    hp = [0.05, 0.0, 0.0, 0.0, 0.0]
    got = _run(klwq.lwq_update, lw, grad, hp, 2, True)
    want = _run(lwq_update, lw, grad, hp, 2, True)
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lwq_uncovered_cases_fall_back_counted():
    lw, g = _latent((4, 10), 8, 4)
    grad = torch.randn(lw.shape, generator=g)
    with pytest.raises(ValueError, match="re-selection"):
        _run(klwq.lwq_update, lw, grad, [0.01, 0.0, 0.0, 0.0, 0.0], 1, True, mu_interval=10)
    impls.FALLBACKS.clear()
    with pytest.warns(UserWarning, match="re-selection"):
        got = _run(impls.lwq_update_cuda, lw, grad, [0.01, 0.0, 0.0, 0.0, 0.0], 10, True, mu_interval=10)
    want = _run(lwq_update, lw, grad, [0.01, 0.0, 0.0, 0.0, 0.0], 10, True, mu_interval=10)
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sum(impls.FALLBACKS.values()) == 1


def test_lwq_adamw_runs_reference_counted():
    """AdamW has no kernel (torch's CPU fp32 sqrt is not correctly rounded, so no kernel could match it bit for
    bit): its CUDA impl runs the reference body, warned and counted."""
    lw, g = _latent((4, 10), 8, 4)
    grad = torch.randn(lw.shape, generator=g)
    hp = [1e-3, 0.9, 0.999, 1e-8, 0.01]
    states = [torch.zeros(lw.shape), torch.zeros(lw.shape)]
    impls.FALLBACKS.clear()
    with pytest.warns(UserWarning, match="adamw"):
        got = impls.lwq_update_cuda(lw.q.clone(), lw.r.clone(), lw.s.clone(), lw.mu.clone(), grad,
                                    [t.clone() for t in states], "adamw", hp, list(lw.shape), 8, 4, 5, 77,
                                    torch.tensor(1), torch.tensor(False), True, 0)
    want = lwq_update(lw.q.clone(), lw.r.clone(), lw.s.clone(), lw.mu.clone(), grad, [t.clone() for t in states],
                      "adamw", hp, list(lw.shape), 8, 4, 5, 77, torch.tensor(1), torch.tensor(False), True, 0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert sum(impls.FALLBACKS.values()) == 1
