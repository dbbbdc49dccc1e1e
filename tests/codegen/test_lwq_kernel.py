"""``fqt::lwq_update`` kernels (decode -> SGD or AdamW -> scale refresh -> re-encode with the SR residual) vs
the op's reference implementation under the Triton interpreter: the updated integer codes, residual codes, scales
and fp32 optimizer states are bit-identical; the two float statistics are means (summed in another order) and
compared with assert_close."""

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


def _run_adamw(fn, lw, grad, hp, step, states, refresh=True, mu_interval=0):
    q, r, s, mu = lw.q.clone(), lw.r.clone(), lw.s.clone(), lw.mu.clone()
    states = [t.clone() for t in states]
    stats = fn(q, r, s, mu, grad, states, "adamw", hp, list(lw.shape), lw.wbits, lw.lbits, 5, lw.stream,
               torch.tensor(step), torch.tensor(False), refresh, mu_interval)
    return q, r, s, mu, stats, *states


@pytest.mark.parametrize("shape,wbits,lbits", [((12, 40), 8, 4), ((6, 3, 2, 2), 4, 4), ((7, 13), 8, 8),
                                               ((5, 18), 4, 2)])
def test_lwq_adamw_matches_reference(shape, wbits, lbits):
    """Three AdamW steps from zero states (bias correction changes every step): integer codes, residual codes,
    scales and both fp32 moments bit-identical to the reference. Odd row counts and row lengths exercise the masks;
    two rows get huge gradients so the scale refresh fires, and zero gradients leave v = 0 (denominator = eps)."""
    lw, g = _latent(shape, wbits, lbits, seed=11)
    hp = [2e-3, 0.9, 0.999, 1e-6, 0.05]  # lr, beta1, beta2, eps, weight decay
    states = [torch.zeros(shape), torch.zeros(shape)]
    for step in (1, 2, 3):
        grad = torch.randn(shape, generator=g)
        grad[1] *= 1e4
        grad.view(shape[0], -1)[3, ::3] = 0.0
        # AdamW's step is ~lr per element: scale it to the grid so the codes move and rows outgrow the range
        hp[0] = float(lw.s.mean()) * (40.0 if step == 2 else 0.7)
        got = _run_adamw(klwq.lwq_update, lw, grad, hp, step, states)
        want = _run_adamw(lwq_update, lw, grad, hp, step, states)
        for a, b in zip(got[:4] + got[5:], want[:4] + want[5:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(got[4], want[4], rtol=1e-5, atol=1e-7)
        assert not torch.equal(got[0], lw.q) and not torch.equal(got[1], lw.r)  # the step moved the codes
        assert not torch.equal(got[6], states[1])  # the second moment moved
        if step == 2:
            assert not torch.equal(got[2], lw.s)  # the large step made the refresh fire
        lw.q.copy_(want[0])
        lw.r.copy_(want[1])
        lw.s.copy_(want[2])
        states = list(want[5:])


def test_lwq_adamw_cuda_impl_runs_the_kernel():
    """The op's CUDA impl takes the AdamW kernel for fp32 states (no fallback counted)."""
    lw, g = _latent((4, 10), 8, 4)
    grad = torch.randn(lw.shape, generator=g)
    hp = [1e-3, 0.9, 0.999, 1e-8, 0.01]
    states = [torch.zeros(lw.shape), torch.zeros(lw.shape)]
    impls.FALLBACKS.clear()
    got = _run_adamw(impls.lwq_update_cuda, lw, grad, hp, 1, states)
    want = _run_adamw(lwq_update, lw, grad, hp, 1, states)
    for a, b in zip(got[:4] + got[5:], want[:4] + want[5:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not impls.FALLBACKS


def test_lwq_adamw_8bit_states_fall_back_counted():
    """8-bit block-companded AdamW states have no kernel: the CUDA impl runs the reference body, warned and
    counted."""
    from fqtc.ops.lwq import state_tensors

    lw, g = _latent((4, 10), 8, 4)
    grad = torch.randn(lw.shape, generator=g)
    hp = [1e-3, 0.9, 0.999, 1e-8, 0.01]
    states = state_tensors("adamw", hp, list(lw.shape), 8)
    with pytest.raises(ValueError, match="8-bit"):
        _run_adamw(klwq.lwq_update, lw, grad, hp, 1, states)
    impls.FALLBACKS.clear()
    with pytest.warns(UserWarning, match="8-bit"):
        got = _run_adamw(impls.lwq_update_cuda, lw, grad, hp, 1, states)
    want = _run_adamw(lwq_update, lw, grad, hp, 1, states)
    for a, b in zip(got[:4] + got[5:], want[:4] + want[5:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sum(impls.FALLBACKS.values()) == 1


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_tensor_lr_kernel_matches_reference(kind):
    """A tensor learning rate (a group's ``lr`` held as a tensor, hparams[0] then 0.0): the CUDA implementation
    reads it once and the kernel's result equals the reference op's tensor-lr math bit for bit."""
    lw, g = _latent((9, 30), 8, 4, seed=5)
    lr = torch.tensor(3e-3)
    if kind == "sgd":
        hp, states = [0.0, 0.9, 0.0, 0.01, 0.0], [torch.zeros(lw.shape)]
    else:
        hp, states = [0.0, 0.9, 0.999, 1e-6, 0.05], [torch.zeros(lw.shape), torch.zeros(lw.shape)]
    impls.FALLBACKS.clear()
    for step in (1, 2):
        grad = torch.randn(lw.shape, generator=g)
        outs = []
        for fn in (impls.lwq_update_cuda, lwq_update):
            q, r, s, mu = lw.q.clone(), lw.r.clone(), lw.s.clone(), lw.mu.clone()
            st = [t.clone() for t in states]
            stats = fn(q, r, s, mu, grad, st, kind, hp, list(lw.shape), lw.wbits, lw.lbits, 5, lw.stream,
                       torch.tensor(step), torch.tensor(False), True, 0, lr)
            outs.append((q, r, s, mu, *st, stats))
        for a, b in zip(outs[0][:-1], outs[1][:-1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(outs[0][0], lw.q) or not torch.equal(outs[0][1], lw.r)
    assert not impls.FALLBACKS  # the kernel ran
