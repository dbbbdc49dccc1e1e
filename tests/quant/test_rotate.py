"""Randomized Hadamard rotation (fqtc/quant/rotate.py): orthogonal, invertible, product-preserving, keyed signs."""

from __future__ import annotations

import pytest
import torch

import fqtc.ops  # noqa: F401
from fqtc.quant import rotate as R


@pytest.mark.parametrize("block", [16, 64, 256])
def test_hadamard_is_symmetric_orthonormal(block):
    h = R.hadamard(block).double()
    torch.testing.assert_close(h, h.t(), rtol=0, atol=0)
    torch.testing.assert_close(h @ h, torch.eye(block, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("block,k", [(16, 48), (64, 384), (128, 256)])
def test_rotated_operands_keep_the_product(block, k):
    """(x R)(W R)^T = x W^T: exact at fp to 1e-5 relative to the product's scale."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 3, k, generator=g), torch.randn(11, k, generator=g)
    xr, wr = R.rotate(x, 2, block, 5, 9), R.rotate(w, 1, block, 5, 9)
    ref = x @ w.t()
    torch.testing.assert_close(xr @ wr.t(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(R.rotate(xr, 2, block, 5, 9, inverse=True), x, rtol=0, atol=1e-5)
    # another stream draws other signs: the rotated tensor changes, the product does not
    assert not torch.allclose(R.rotate(x, 2, block, 5, 10), xr)


def test_rotation_spreads_an_outlier_channel():
    """One channel 100x the rest: after rotation its energy is spread over its block, so the row range shrinks."""
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    x[:, 7] *= 100
    xr = R.rotate(x, 1, 64, 0, 3)
    torch.testing.assert_close(xr.pow(2).sum(1), x.pow(2).sum(1), rtol=1e-5, atol=0)  # norms kept
    assert xr.abs().amax(1).mean() < 0.2 * x.abs().amax(1).mean()


def test_op_matches_reference_and_handles_empty_and_nan():
    x = torch.randn(4, 32)
    x[1, 5] = float("nan")
    got = torch.ops.fqt.rotate(x, 1, 16, 0, 1, False)
    want = R.rotate(x, 1, 16, 0, 1)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert got[1, :16].isnan().all() and not got[1, 16:].isnan().any()  # NaN stays inside its block
    assert torch.ops.fqt.rotate(torch.empty(0, 32), 1, 16, 0, 1, False).shape == (0, 32)


def test_rotation_block_and_errors():
    assert R.rotation_block(384, 64) == 64 and R.rotation_block(48, 256) == 16 and R.rotation_block(10, 64) is None
    for bad in (8, 48, 512, True):
        with pytest.raises(ValueError, match="power of two"):
            R.check_block(bad)
    with pytest.raises(ValueError, match="not a multiple"):
        R.rotate(torch.randn(2, 40), 1, 16, 0, 0)
