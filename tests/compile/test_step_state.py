"""The stochastic-rounding step counter belongs to the compiled model (fqtc/ops/stepcounter.py)."""

from __future__ import annotations

import copy
import threading

import torch
import torch.nn as nn

import fqtc

OPTIONS = {"seed": 5, "bits": "W4A4G4"}  # 4-bit gradients: a different step gives visibly different gradients


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))


def _batch(t: int) -> torch.Tensor:
    return torch.randn(6, 12, generator=torch.Generator().manual_seed(100 + t))


def _train_step(model: nn.Module, compiled, t: int) -> torch.Tensor:
    model.zero_grad()
    compiled(_batch(t)).square().sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _run(steps: int = 3) -> list[torch.Tensor]:
    m = _model()
    c = torch.compile(m, backend="fqt", options=OPTIONS)
    return [_train_step(m, c, t) for t in range(steps)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_two_models_same_seed_get_identical_gradients_interleaved():
    ref = _run()
    m1, m2 = _model(), _model()
    c1 = torch.compile(m1, backend="fqt", options=OPTIONS)
    c2 = torch.compile(m2, backend="fqt", options=OPTIONS)
    g1, g2 = [], []
    for t in range(3):  # interleaved: a process-wide counter would give each model every other step
        g1.append(_train_step(m1, c1, t))
        g2.append(_train_step(m2, c2, t))
    assert _same(g1, ref) and _same(g2, ref)
    assert fqtc.get_step(m1) == fqtc.get_step(m2) == 3
    assert not torch.equal(ref[0], ref[1])  # the step does change the bits (the test could fail)


def test_evaluations_do_not_advance_the_step():
    ref = _run()
    m = _model()
    c = torch.compile(m, backend="fqt", options=OPTIONS)
    got = []
    for t in range(3):
        got.append(_train_step(m, c, t))
        with torch.no_grad():
            c(_batch(50 + t))  # an inference graph reads the step, never advances it
        m.eval()
        c(_batch(60 + t))  # eval() mode with grad enabled: read only too
        m.train()
    assert _same(got, ref)
    assert fqtc.get_step(m) == 3


def test_two_threads_training_separate_models_do_not_interfere():
    ref = _run(4)
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)
    # the models are built here: _model() seeds torch's global generator, which two threads would share and
    # interleave (different initial weights, not a step-counter effect)
    models = [_model() for _ in range(2)]

    def worker(k: int) -> None:
        try:
            m = models[k]
            c = torch.compile(m, backend="fqt", options=OPTIONS)
            barrier.wait()
            results[k] = [_train_step(m, c, t) for t in range(4)]
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert _same(results[0], ref) and _same(results[1], ref)


def test_state_dict_saves_the_step_and_resume_is_bit_exact():
    m = _model()
    c = torch.compile(m, backend="fqt", options=OPTIONS)
    for t in range(2):
        _train_step(m, c, t)
    ckpt = copy.deepcopy(m.state_dict())
    assert int(ckpt["fqt_step"]) == 2
    rest = [_train_step(m, c, t) for t in (2, 3)]
    # a new process's model: fqtc.compile creates the counter at once, so the checkpoint loads before the first call
    m2 = _model()
    c2 = fqtc.compile(m2, OPTIONS)
    m2.load_state_dict(ckpt)
    assert fqtc.get_step(m2) == 2
    assert _same([_train_step(m2, c2, t) for t in (2, 3)], rest)


def test_checkpoint_without_step_loads_and_set_step_semantics():
    m = _model()
    c = torch.compile(m, backend="fqt", options=OPTIONS)
    _train_step(m, c, 0)
    plain = {k: v for k, v in m.state_dict().items() if k != "fqt_step"}  # e.g. written by plain PyTorch
    m.load_state_dict(plain)  # strict: the step is kept, not reported missing
    assert fqtc.get_step(m) == 1 and fqtc.get_step() == 1  # no model: the counter used last
    fqtc.set_step(7, m)
    assert fqtc.get_step(m) == 7 and int(m.state_dict()["fqt_step"]) == 7
    other = _model()
    fqtc.set_step(4)  # no model: every counter
    assert fqtc.get_step(m) == 4 and fqtc.get_step(other) == 0  # a counter created later starts at 0
    twin = copy.deepcopy(m)  # a copy gets its own counter, starting from the copied buffer
    fqtc.set_step(9, m)
    assert fqtc.get_step(twin) == 4


def test_bad_step_values_are_rejected():
    import pytest

    for bad in (-1, 2**63, 1.5, True):
        with pytest.raises(ValueError, match=r"step must be an int in \[0, 2\*\*63 - 1\]"):
            fqtc.set_step(bad)
