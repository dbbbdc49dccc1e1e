"""Checkpoint-resume driver for tests/optim/test_optim.py (run in a fresh process by the test).

``python -m tests.optim.ckpt_run full N OUT`` trains N steps and writes the losses; ``... save K CKPT OUT`` trains
K steps and saves model, optimizer and the fqt step counter; ``... resume N CKPT OUT`` loads them into a freshly
built model and trains up to step N. All losses go to OUT as JSON.
"""

from __future__ import annotations

import json
import sys
from functools import partial

import torch

import fqtc
from fqtc.backend import fqt_backend
from fqtc.optim import SGD

OPTIONS = {"bits": "W8A8G8L4", "seed": 3}


def build() -> tuple[torch.nn.Module, SGD, torch.nn.Module]:
    torch.manual_seed(0)
    fqtc.set_step(0)  # the fqt backend's stochastic-rounding step counter is process-global
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    fqtc.prepare(model, OPTIONS)
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9, state_bits=8, mu_interval=2)
    compiled = torch.compile(model, backend=partial(fqt_backend, options=OPTIONS))
    return model, opt, compiled


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)


def train(compiled, opt, start: int, stop: int) -> list[float]:
    losses = []
    for t in range(start, stop):
        x, y = batch(t)
        loss = torch.nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def main(argv: list[str]) -> None:
    mode = argv[0]
    model, opt, compiled = build()
    if mode == "full":
        n, out = int(argv[1]), argv[2]
        losses = train(compiled, opt, 0, n)
    elif mode == "save":
        k, ckpt, out = int(argv[1]), argv[2], argv[3]
        losses = train(compiled, opt, 0, k)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "fqt_step": fqtc.get_step(), "t": k},
                   ckpt)
    elif mode == "resume":
        n, ckpt, out = int(argv[1]), argv[2], argv[3]
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        fqtc.set_step(state["fqt_step"])
        losses = train(compiled, opt, state["t"], n)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    with open(out, "w") as f:
        json.dump(losses, f)


if __name__ == "__main__":
    main(sys.argv[1:])
