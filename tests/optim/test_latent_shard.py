"""Row shards of a LatentWeight (fqtc.optim.latent_shard): the tensor ops FSDP2 applies when it shards a parameter,
the all-gather extension's checks, the checkpoint entries, and the shard-aware pieces of the update (element offsets
of the random stream, an importance level chosen from outside)."""

from __future__ import annotations

import pytest
import torch

import fqtc
from fqtc.optim import latent_shard
from fqtc.optim.latent import LatentWeight
from fqtc.quant import lwq as _lwq
from fqtc.quant.rng import uniform_like


def _lw(wbits: int = 8, lbits: int = 4, shape=(8, 6)) -> LatentWeight:
    return LatentWeight.from_float(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), wbits, lbits)


def _eq(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [(8, 4), (4, 4), (8, 8), (4, 2)])
def test_fsdp_sharding_ops_keep_codes(bits):
    lw = _lw(*bits)
    full = lw.dequantize()
    chunks = torch.chunk(lw, 2, dim=0)  # what fully_shard runs
    assert all(isinstance(c, LatentWeight) for c in chunks)
    _eq(torch.cat([c.dequantize() for c in chunks]), full)
    padded = lw.new_zeros((4, 6))
    assert isinstance(padded, LatentWeight)
    padded.narrow(0, 0, 4).copy_(chunks[1])  # a view: the copy lands in `padded`
    _eq(padded.int_codes(), lw.int_codes()[4:])
    _eq(padded.residual_codes(), lw.residual_codes()[4:])
    flat = padded.view(-1)  # the flat alias FSDP keeps decodes to the same values
    assert isinstance(flat, LatentWeight) and flat.shape == (24,)
    _eq(flat.dequantize(), padded.dequantize().view(-1))
    _eq(torch.as_strided(lw, (8, 6), (6, 1), 0).dequantize(), full)
    # slicing rows is a view: an in-place update of it is refused like one of the whole parameter
    with pytest.raises(RuntimeError, match="fqtc.optim"):
        lw[2:4].add_(1.0)


def test_packed_codes_refuse_a_shard_boundary_inside_a_byte():
    lw = _lw(4, 4, shape=(4, 3))  # 3 elements per row: row 1 starts in the middle of a byte
    with pytest.raises(ValueError, match="middle of a byte"):
        torch.chunk(lw, 4, dim=0)
    assert len(torch.chunk(_lw(8, 8, shape=(4, 3)), 4, dim=0)) == 4  # unpacked storage has no such boundary


class _Mesh:
    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n


def test_all_gather_extension_checks_and_payload():
    lw = _lw(8, 4)
    shard = torch.chunk(lw, 2)[0]
    with pytest.raises(ValueError, match="do not divide evenly"):
        shard.fsdp_pre_all_gather(_Mesh(3), torch.Size([8, 6]), (6, 1), None, None)
    mp = type("MP", (), {"param_dtype": torch.bfloat16})()
    with pytest.raises(ValueError, match="param_dtype"):
        shard.fsdp_pre_all_gather(_Mesh(2), torch.Size([8, 6]), (6, 1), None, mp)
    inputs, meta = shard.fsdp_pre_all_gather(_Mesh(2), torch.Size([8, 6]), (6, 1), None, None)
    assert [t.dtype for t in inputs] == [torch.int8, torch.float32]  # codes and row scales, no residual
    # two ranks' inputs concatenated (what the all-gather delivers) rebuild the integer weight s*q
    outs = [torch.cat([a, b]) for a, b in zip(inputs, torch.chunk(lw, 2)[1].fsdp_pre_all_gather(
        _Mesh(2), torch.Size([8, 6]), (6, 1), None, None)[0])]
    full, inner = shard.fsdp_post_all_gather(tuple(outs), meta, torch.float32)
    _eq(full.dequantize(), lw.s * lw.int_codes().float())
    assert shard.fsdp_post_all_gather(tuple(outs), meta, torch.float32, out=full) is None


def test_checkpoint_entries_round_trip_and_check_bits():
    lw, other = _lw(4, 4), LatentWeight.from_float(torch.randn(8, 6), 4, 4)
    entries = latent_shard.to_entries(lw)
    assert entries[0].dtype == torch.int8 and entries[0].shape == (8, 6)
    latent_shard.load_entries(other, *entries)
    for a, b in zip(other._inner(), lw._inner()):
        _eq(a, b)
    with pytest.raises(ValueError, match="bit string"):
        latent_shard.load_entries(_lw(4, 2), *latent_shard.to_entries(_lw(8, 4)))
    with pytest.raises(ValueError, match="shape"):
        latent_shard.load_entries(_lw(8, 4, shape=(4, 6)), *entries)


def test_random_stream_offset_matches_the_whole_tensor():
    x = torch.empty(10, 7)
    full = uniform_like(x, seed=3, step=5, stream=11)
    _eq(uniform_like(x[4:], seed=3, step=5, stream=11, offset=4 * 7), full[4:])


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_update_magnitude_and_forced_level(kind):
    """The statistics the shards sum reproduce the op's own rho, and ``mu_next`` sets the level it encodes with."""
    from fqtc.ops import lwq as ops

    lw, g = _lw(8, 4), torch.randn(8, 6)
    hp = [1e-3, 0.0, 0.0, 0.0, 0.0] if kind == "sgd" else [1e-3, 0.9, 0.999, 1e-8, 0.0]
    st = ops.state_tensors(kind, hp, [8, 6], 32)
    step = torch.tensor(1)
    d_sum, s_sum, n, rows = ops.update_magnitude(lw.q, lw.r, lw.s, lw.mu, g, st, kind, hp, [8, 6], 8, 4, step)
    assert (n, rows) == (48, 8)
    want = _lwq.select_mu(float(s_sum / rows) / float(d_sum / n), 4)
    a, b = lw.clone(), lw.clone()
    args = (kind, hp, [8, 6], 8, 4, 0, 0, step, torch.tensor(False), True, 1)
    torch.ops.fqt.lwq_update.default(a.q, a.r, a.s, a.mu, g, [t.clone() for t in st], *args)
    assert int(a.mu) == want
    forced = (want + 1) % 4
    torch.ops.fqt.lwq_update.default(b.q, b.r, b.s, b.mu, g, [t.clone() for t in st], *args, None, None, 0, forced)
    assert int(b.mu) == forced


def test_fqtc_distributed_is_reachable_from_the_package():
    assert callable(fqtc.distributed.get_model_state_dict)
