"""Data-parallel training (DDP, gloo on CPU, 2 processes) through the fqt backend.

The supported form is ``DDP(torch.compile(model, backend="fqt"))``: DDP's gradient all-reduce runs from its
autograd hooks on the parameters, outside the compiled graphs, so each rank runs the quantized forward and backward
on its shard and DDP averages the dequantized gradients (tests/distributed/test_matrix.py covers the other DDP and
FSDP2 orders, docs/distributed.md). The test checks that, step for step, both ranks hold identical
parameters and that the averaged gradient equals the mean of the two shards' fqt gradients computed in one process
(bit for bit: halving is exact, and the step counter is set so both computations draw the same stochastic-rounding
bits).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from tests.helpers import exit_rank, init_gloo, spawn_gloo_ranks

STEPS = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _shard(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(6, 12, generator=g), torch.randint(0, 4, (6,), generator=g)


def _worker(rank: int, port: int, out: str) -> None:
    import fqtc

    init_gloo(rank, port)
    torch.set_num_threads(1)
    try:
        model = _model()
        cmodel = nn.parallel.DistributedDataParallel(torch.compile(model, backend="fqt", options={"bits": "W8A8G8"}))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        grads, params = [], []
        with fqtc.backend.capture() as graphs:
            for step in range(STEPS):
                fqtc.set_step(step)
                x, y = _shard(step, rank)
                loss = nn.functional.cross_entropy(cmodel(x), y)
                loss.backward()
                grads.append([p.grad.clone() for p in model.parameters()])
                opt.step()
                opt.zero_grad()
                params.append([p.detach().clone() for p in model.parameters()])
        n_qgemm = sum(1 for cg in graphs for r in cg.records if r.get("status") == "quantized")
        torch.save({"grads": grads, "params": params, "quantized_sites": n_qgemm}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    exit_rank()  # reached only when the rank saved its results



@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_ddp_ranks_agree_and_average_the_fqt_gradients(tmp_path):
    import fqtc
    from fqtc.backend import capture

    out = str(tmp_path / "res")
    res = spawn_gloo_ranks(_worker, out)
    assert res[0]["quantized_sites"] > 0 and res[1]["quantized_sites"] > 0  # the rewrite ran under DDP
    for step in range(STEPS):
        for a, b in zip(res[0]["params"][step], res[1]["params"][step]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the same two shards' fqt gradients in this process, averaged as DDP does (grad / world_size, then summed)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cmodel = torch.compile(model, backend="fqt", options={"bits": "W8A8G8"})
    with capture():
        for step in range(STEPS):
            local = []
            for rank in range(2):
                fqtc.set_step(step)
                x, y = _shard(step, rank)
                nn.functional.cross_entropy(cmodel(x), y).backward()
                local.append([p.grad.clone() for p in model.parameters()])
                opt.zero_grad()
            mean = [a / 2 + b / 2 for a, b in zip(*local)]
            for got, want in zip(res[0]["grads"][step], mean):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            for p, g in zip(model.parameters(), mean):
                p.grad = g
            opt.step()
            opt.zero_grad()
            for a, b in zip(res[0]["params"][step], model.parameters()):
                torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
