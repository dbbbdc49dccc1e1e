"""Int8 stochastic-rounding gradient communication (fqtc/distributed.py), 2 gloo processes on the CPU.

Statistical tier: averaged over many rounding steps, the communicated mean gradient converges to the exact mean
(a z-test on the pooled per-element error, which a rounding bias of 1% of a step fails). Exact tier: the ranks get
identical bits, every call's error is below one quantization step, a NaN bucket reaches every rank. End to end:
``DDP(torch.compile(model, backend="fqt"))`` with `register_int8_grad_comm` trains with ranks in sync and gradients
within one step of the fp32 all-reduce.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from tests.helpers import ResidualBlock, exit_rank, init_gloo, spawn_gloo_ranks

DRAWS = 400


def _grad(rank: int, n: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(n, generator=g) * torch.logspace(-2, 0, n)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ResidualBlock(), ResidualBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def _fsdp_grads(rank: int) -> dict:
    """One FSDP2 step (blocks compiled with fqt, then sharded: torchtitan's order) with fp32 and with int8
    reduce-scatter, from the same weights and batch: the full gradients, parameters after SGD, bytes."""
    from torch.distributed.fsdp import fully_shard

    import fqtc
    from fqtc.distributed import register_int8_fsdp_reduce_scatter

    res = {}
    for comm in ("fp32", "int8"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = _Net()
        for b in m.blocks:
            b.compile(backend="fqt")
            fully_shard(b)
        fully_shard(m)
        state = register_int8_fsdp_reduce_scatter(m, seed=1) if comm == "int8" else None
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        fqtc.set_step(0)
        x = torch.randn(6, 16, generator=torch.Generator().manual_seed(rank))
        m(x).pow(2).mean().backward()
        res[f"fsdp_{comm}_grads"] = [p.grad.full_tensor().clone() for p in m.parameters()]
        opt.step()
        res[f"fsdp_{comm}_params"] = [p.full_tensor().clone() for p in m.parameters()]
        if state is not None:
            res["fsdp_bytes"] = (state.payload_bytes, state.fp32_payload_bytes)
    return res


def _worker(rank: int, port: int, out: str) -> None:
    import fqtc
    from fqtc.distributed import Int8CommState, int8_sr_allreduce, int8_sr_reduce_scatter, register_int8_grad_comm

    init_gloo(rank, port)
    torch.set_num_threads(1)
    try:
        state = Int8CommState(seed=3)
        g = _grad(rank)
        draws = torch.stack([int8_sr_allreduce(g, state) for _ in range(DRAWS)])
        nan = g.clone()
        nan[5] = float("nan") if rank == 1 else nan[5]
        nan_out = int8_sr_allreduce(nan, state, bucket=1)
        # end to end: DDP over the compiled model, int8 gradient communication
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
        ddp = nn.parallel.DistributedDataParallel(torch.compile(model, backend="fqt"))
        comm = register_int8_grad_comm(ddp, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        grads, params = [], []
        for step in range(2):
            fqtc.set_step(step)
            x = torch.randn(8, 12, generator=torch.Generator().manual_seed(100 * step + rank))
            ddp(x).pow(2).mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
            params.append([p.detach().clone() for p in model.parameters()])
        # FSDP2 reduce-scatter: repeated calls on one buffer (statistics), then FSDP2 training end to end
        rs_state = Int8CommState(seed=5)
        rs_draws = torch.stack([int8_sr_reduce_scatter(_grad(rank, 1024), rs_state) for _ in range(DRAWS)])
        fsdp = _fsdp_grads(rank)
        torch.save({"draws": draws, "nan": nan_out, "bytes": (state.payload_bytes, state.fp32_payload_bytes),
                    "fallbacks": state.fp32_fallbacks, "ddp_grads": grads, "params": params,
                    "ddp_bytes": (comm.payload_bytes, comm.fp32_payload_bytes), "rs_draws": rs_draws,
                    "rs_bytes": (rs_state.payload_bytes, rs_state.fp32_payload_bytes), **fsdp}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    exit_rank()  # reached only when the rank saved its results



@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed without gloo")
    out = str(tmp_path_factory.mktemp("int8comm") / "res")
    return spawn_gloo_ranks(_worker, out)


def test_ranks_identical_and_error_below_one_step(results):
    d0, d1 = results[0]["draws"], results[1]["draws"]
    assert torch.equal(d0, d1)
    exact = (_grad(0) + _grad(1)) / 2
    scale = torch.maximum(_grad(0).abs().max(), _grad(1).abs().max()) / 127
    assert (d0 - exact).abs().max() <= scale * (1 + 1e-5)
    assert len({tuple(r.tolist()) for r in d0[:20]}) == 20  # every call draws new rounding bits


def test_unbiased_z_test(results):
    """Pooled z-test: the mean over DRAWS calls and 512 elements of (estimate - exact) / sd is N(0, 1/(n)) when
    unbiased; a rounding bias of 1% of a step moves it by ~0.01 * step / sd * sqrt(n) >> 4."""
    d = results[0]["draws"]
    exact = (_grad(0) + _grad(1)) / 2
    scale = torch.maximum(_grad(0).abs().max(), _grad(1).abs().max()).item() / 127
    err = (d - exact).double()
    # per element: the average of two independent SR errors, variance (f0(1-f0) + f1(1-f1)) / 4 * scale^2
    var = torch.zeros_like(exact, dtype=torch.float64)
    for g in (_grad(0), _grad(1)):
        f = (g.double() / scale) - torch.floor(g.double() / scale)
        var += f * (1 - f) / 4 * scale ** 2
    keep = var > 0
    z_elem = err[:, keep].mean(0) / torch.sqrt(var[keep] / d.shape[0])
    z = z_elem.sum() / math.sqrt(keep.sum().item())
    assert abs(z.item()) < 4.0, z
    bias = 0.01 * scale  # the power of the test: a 1%-of-a-step bias
    z_biased = (z_elem + bias / torch.sqrt(var[keep] / d.shape[0])).sum() / math.sqrt(keep.sum().item())
    assert abs(z_biased.item()) > 8.0


def test_payload_bytes_quarter_of_fp32(results):
    sent, fp32 = results[0]["bytes"]
    assert fp32 == (DRAWS + 1) * 512 * 4
    # DRAWS int8 buckets (1 byte per element + the fp32 abs-max and flag) and one NaN bucket sent in fp32
    assert sent == DRAWS * (512 + 8) + (8 + 512 * 4)
    sent, fp32 = results[0]["ddp_bytes"]
    assert sent / fp32 < 0.3


def test_nan_bucket_reaches_every_rank_in_fp32(results):
    for r in results:
        assert r["fallbacks"] == 1
        assert torch.isnan(r["nan"][5]) and torch.isfinite(r["nan"][torch.arange(512) != 5]).all()


def test_ddp_with_int8_comm_trains_in_sync(results):
    import fqtc

    r0, r1 = results
    for a, b in zip(r0["params"][-1], r1["params"][-1]):
        assert torch.equal(a, b)
    # the same two shards' fqt gradients in this process: the int8-communicated mean is within one step of theirs
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    f = torch.compile(model, backend="fqt")
    local = []
    for rank in range(2):
        fqtc.set_step(0)
        x = torch.randn(8, 12, generator=torch.Generator().manual_seed(rank))
        f(x).pow(2).mean().backward()
        local.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    flat = [torch.cat([g.flatten() for g in gs]) for gs in local]
    got = torch.cat([g.flatten() for g in r0["ddp_grads"][0]])
    want = (flat[0] + flat[1]) / 2
    step = torch.maximum(flat[0].abs().max(), flat[1].abs().max()) / 127
    assert (got - want).abs().max() <= step * (1 + 1e-5)
    assert not torch.equal(got, want)  # it really went through int8


def test_reduce_scatter_unbiased_within_one_step_and_quarter_bytes(results):
    """int8_sr_reduce_scatter: rank r gets chunk r of the mean; every call within one step of it (one scale per
    chunk, shared by the ranks), new bits per call, unbiased by the pooled z-test, 1 byte per element sent."""
    g0, g1 = _grad(0, 1024), _grad(1, 1024)
    for r, res in enumerate(results):
        d = res["rs_draws"]
        exact = ((g0 + g1) / 2)[r * 512:(r + 1) * 512]
        scale = torch.maximum(g0[r * 512:(r + 1) * 512].abs().max(), g1[r * 512:(r + 1) * 512].abs().max()) / 127
        assert (d - exact).abs().max() <= scale * (1 + 1e-5)
        assert len({tuple(x.tolist()) for x in d[:20]}) == 20
        var = torch.zeros(512, dtype=torch.float64)
        for g in (g0, g1):
            c = g[r * 512:(r + 1) * 512].double() / scale.item()
            var += (c - torch.floor(c)) * (1 - c + torch.floor(c)) / 4 * scale.item() ** 2
        keep = var > 0
        z = ((d - exact).double()[:, keep].mean(0) / torch.sqrt(var[keep] / d.shape[0])).sum() / math.sqrt(
            keep.sum().item())
        assert abs(z.item()) < 4.0, z
        sent, fp32 = res["rs_bytes"]
        assert fp32 == DRAWS * 1024 * 4 and sent == DRAWS * (1024 + 4 * 4)  # codes + (amax, flag) per chunk


def test_fsdp2_with_int8_reduce_scatter_trains_in_sync(results):
    """FSDP2 (compile each block with fqt, then shard) with register_int8_fsdp_reduce_scatter: the ranks hold the
    same full parameters after SGD, the gradients went through int8 (they differ from the fp32 reduce-scatter's)
    and stay within 5% relative error of them; the payload is under 0.3x of fp32's."""
    r0, r1 = results
    for a, b in zip(r0["fsdp_int8_params"], r1["fsdp_int8_params"]):
        assert torch.equal(a, b)
    got = torch.cat([g.flatten() for g in r0["fsdp_int8_grads"]])
    want = torch.cat([g.flatten() for g in r0["fsdp_fp32_grads"]])
    assert not torch.equal(got, want)
    rel = ((got - want).norm() / want.norm()).item()
    sent, fp32 = r0["fsdp_bytes"]
    print(f"FSDP2 int8 reduce-scatter: relative gradient error {rel:.4f}, payload {sent / fp32:.3f}x of fp32")
    assert rel < 0.05, rel
    assert sent / fp32 < 0.3
