"""Latent weights under FSDP2: 2 gloo processes on the CPU (docs/distributed.md, "Latent weights under FSDP2").

Each rank prepares the same model (``W8A8G8L4``), compiles every block and the head with fqt, then shards them
(torchtitan's order), trains two steps with `fqtc.optim.AdamW` and saves a DCP checkpoint. The test checks:

- sharding keeps each rank's rows as codes: the local tensor is a `LatentWeight` equal, bit for bit, to those rows
  of the unsharded weight;
- the all-gather moves codes: FSDP's all-gather bytes per step are at most 0.3x those of the same model in fp32;
- the gradients equal the mean of the two shards' single-process fqt gradients, bit for bit, where the
  single-process model holds the gathered parameter (the integer weight ``s*q``: residual zero);
- `fqtc.optim` steps the local shards exactly as a single-process step of the whole parameter with the same
  gradient (element offsets and one importance level per parameter), at steps 1 (a level re-selection) and 2;
- ``torch.distributed.checkpoint`` round-trips the codes bit for bit on 2 ranks and into 1 process (2 -> 1).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from tests.helpers import exit_rank, init_gloo, spawn_gloo_ranks

OPTS = {"bits": "W8A8G8L4"}
LR = 3e-5  # rho of blocks.0.a.weight: ~1000 on its first rows, ~30 on the rest, ~500 overall


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(100 * step + rank))


def _model(latent: bool = True, seed: int = 0) -> Net:
    import fqtc

    torch.manual_seed(seed)
    m = Net()
    with torch.no_grad():  # rows of very different size: each half alone would choose another importance level
        m.blocks[0].a.weight[:64] *= 30
    return fqtc.prepare(m, OPTS) if latent else m


def _compile(m: Net) -> Net:
    for b in m.blocks:
        b.compile(backend="fqt", options=OPTS)
    m.head.compile(backend="fqt", options=OPTS)
    return m


def _codes(m: nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    """Every latent weight's (integer codes, residual codes, scale, level), unpacked, of the whole parameter."""
    from fqtc.optim.latent import LatentWeight

    out = {}
    for n, p in m.named_parameters():
        lw = p.to_local() if hasattr(p, "full_tensor") else p
        if lw is not p and isinstance(lw, LatentWeight):  # a sharded latent weight: gather its shards' codes
            parts = [lw.int_codes(), lw.residual_codes(), lw.s]
            full = []
            for t in parts:
                bufs = [torch.empty_like(t) for _ in range(dist.get_world_size())]
                dist.all_gather(bufs, t.contiguous())
                full.append(torch.cat(bufs))
            out[n] = (*full, lw.mu.clone())
        elif isinstance(p, LatentWeight):
            out[n] = (p.int_codes().clone(), p.residual_codes().clone(), p.s.clone(), p.mu.clone())
    return out


class _CountingAllGather:
    """FSDP2's default all-gather, counting the bytes each rank hands to it."""

    def __init__(self, box: list[int]) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

        self.inner, self.box = DefaultAllGather(), box

    def allocate(self, size, *, dtype, device):
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.box.append(input_tensor.numel() * input_tensor.element_size())
        return self.inner(output_tensor, input_tensor, group, async_op)


def _shard(m: Net, box: list[int]) -> Net:
    from torch.distributed.fsdp import fully_shard

    for b in m.blocks:
        fully_shard(b)
    fully_shard(m.head)
    fully_shard(m)
    for mod in (*m.blocks, m.head, m):
        mod.set_custom_all_gather(_CountingAllGather(box))
    return m


def _worker(rank: int, port: int, out: str) -> None:
    init_gloo(rank, port)
    torch.set_num_threads(1)
    res: dict = {}
    try:
        import torch.distributed.checkpoint as dcp

        import fqtc
        from fqtc.optim.latent import LatentWeight

        torch._dynamo.reset()
        full = _codes(_model())  # the unsharded codes every rank starts from
        m = _shard(_compile(_model()), box := [])
        res["local"] = {}
        for n, p in m.named_parameters():
            if n in full:
                lw = p.to_local()
                assert isinstance(lw, LatentWeight), (n, type(lw))
                res["local"][n] = (lw.int_codes().clone(), lw.residual_codes().clone(), lw.s.clone())
        res["full"] = full
        opt = fqtc.optim.AdamW(m.parameters(), lr=LR)
        res["steps"] = []
        for step in (1, 2):
            before = _codes(m)
            before.update({n: p.full_tensor().clone() for n, p in m.named_parameters() if n not in before})
            box.clear()
            m(_batch(rank, step)).pow(2).mean().backward()
            grads = {n: p.grad.full_tensor().clone() for n, p in m.named_parameters()}
            ag_bytes = sum(box)
            opt.step()
            opt.zero_grad()
            res["steps"].append((before, grads, _codes(m), ag_bytes))
        # the same model in fp32, sharded the same way: FSDP's all-gather bytes of one step
        fp = _shard(_model(latent=False), fp_box := [])
        fp(_batch(rank, 1)).pow(2).mean().backward()
        res["fp32_bytes"] = sum(fp_box)
        # DCP: save from 2 ranks, load into a fresh 2-rank model (bit for bit), leave the files for the 1-rank load
        dcp.save(fqtc.distributed.get_model_state_dict(m), checkpoint_id=out + ".dcp")
        fresh = _shard(_compile(_model(seed=7)), [])  # a resumed run: built and compiled, not yet called
        sd = fqtc.distributed.get_model_state_dict(fresh)
        dcp.load(sd, checkpoint_id=out + ".dcp")
        fqtc.distributed.set_model_state_dict(fresh, sd)
        res["saved"], res["reloaded"] = _codes(m), _codes(fresh)
        res["counters"] = [[int(b.fqt_step) for b in x.blocks] for x in (m, fresh)]  # the blocks' SR steps
        # model.state_dict() through torch.save on the same world size: DTensors of LatentWeight shards
        import io

        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        buf.seek(0)
        again = _shard(_model(seed=9), [])
        again.load_state_dict(torch.load(buf, weights_only=False))
        res["torch_save"] = _codes(again)
        res["bias_equal"] = all(torch.equal(p.full_tensor(), q.full_tensor()) for (n, p), (_, q) in
                                zip(m.named_parameters(), fresh.named_parameters()) if n not in full)
        torch.save(res, f"{out}.{rank}")
    except Exception:
        import traceback

        torch.save({"error": traceback.format_exc()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    exit_rank()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed without gloo")
    out = str(tmp_path_factory.mktemp("latent_fsdp") / "res")
    res = spawn_gloo_ranks(_worker, out)
    for r in res:
        assert "error" not in r, r["error"]
    return res, out


def _eq(a: torch.Tensor, b: torch.Tensor, msg: str) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=msg)


def test_shards_are_codes_of_their_rows(results):
    res, _ = results
    for rank, r in enumerate(res):
        for n, (q, rc, s) in r["local"].items():
            fq, fr, fs, _ = r["full"][n]
            rows = fq.shape[0] // 2
            sl = slice(rank * rows, (rank + 1) * rows)
            _eq(q, fq[sl], n)
            _eq(rc, fr[sl], n)
            _eq(s, fs[sl], n)


def test_all_gather_moves_codes(results):
    res, _ = results
    for r in res:
        for *_, ag in r["steps"]:
            assert 0 < ag <= 0.3 * r["fp32_bytes"], (ag, r["fp32_bytes"])


def test_gradients_equal_single_process_on_the_integer_weight(results):
    """The gathered parameter is the integer weight: a single-process model holding the same codes with a zero
    residual, compiled the same way, gives each shard's fqt gradient; FSDP's gradient is their mean."""
    import fqtc

    res, _ = results
    grads: list[list[dict]] = []  # [rank][step]
    for rank in range(2):
        torch._dynamo.reset()
        m = _compile(_model())  # one model per rank: its stochastic-rounding step advances as the rank's did
        grads.append([])
        for step_i, step in enumerate((1, 2)):
            before = res[0]["steps"][step_i][0]
            for n, p in m.named_parameters():
                p.grad = None
                if isinstance(before[n], tuple):
                    q, _, s, mu = before[n]
                    fqtc.optim.latent_shard.load_entries(p, q, torch.zeros_like(q), s, mu)
                else:
                    p.data.copy_(before[n])
            m(_batch(rank, step)).pow(2).mean().backward()
            grads[rank].append({n: p.grad for n, p in m.named_parameters()})
    for step_i, step in enumerate((1, 2)):
        for r in res:
            got = r["steps"][step_i][1]
            for n in got:
                _eq(got[n], grads[0][step_i][n] / 2 + grads[1][step_i][n] / 2, f"step {step}: {n}")


def test_optimizer_steps_shards_like_the_whole_parameter(results):
    import fqtc

    res, _ = results
    m = _model()
    opt = fqtc.optim.AdamW(m.parameters(), lr=LR)
    for before, grads, after, _ in res[0]["steps"]:
        for n, p in m.named_parameters():
            if isinstance(before[n], tuple):
                q, rc, s, mu = before[n]
                fqtc.optim.latent_shard.load_entries(p, q, rc, s, mu)
            else:
                p.data.copy_(before[n])
            p.grad = grads[n]
        opt.step()
        for n, want in _codes(m).items():
            for a, b, what in zip(after[n], want, ("codes", "residual", "scale", "level")):
                _eq(a, b, f"{n} {what}")
    for a, b in zip(res[0]["steps"][1][2].values(), res[1]["steps"][1][2].values()):
        for x, y in zip(a, b):
            _eq(x, y, "ranks disagree")


def test_dcp_round_trip_and_resume_on_one_process(results):
    import torch.distributed.checkpoint as dcp

    import fqtc

    res, out = results
    saved = res[0]["saved"]
    for r in res:
        assert r["bias_equal"]
        assert r["counters"][0] == r["counters"][1] == [2, 2]  # stochastic-rounding steps resume too
        for n in saved:
            for a, b in zip(r["reloaded"][n], saved[n]):
                _eq(a, b, f"2 -> 2: {n}")
        for n in saved:
            for a, b in zip(r["torch_save"][n], saved[n]):
                _eq(a, b, f"torch.save 2 -> 2: {n}")
    one = _model(seed=11)  # world size 1: a plain prepared model
    sd = fqtc.distributed.get_model_state_dict(one)
    dcp.load(sd, checkpoint_id=out + ".dcp")
    fqtc.distributed.set_model_state_dict(one, sd)
    got = _codes(one)
    for n in saved:
        for a, b in zip(got[n], saved[n]):
            _eq(a, b, f"2 -> 1: {n}")
