"""Inputs shared by the kernel tests: the stochastic-rounding key and test tensors with rounding ties."""

from __future__ import annotations

import torch

STEP = torch.tensor(2**32 + 7)  # exercises the high word of the step in the key derivation
SEED, STREAM = 1234, 0xDEADBEEF  # stream above 2^31: the kernels' uint32 view of an int64 argument


def x_with_ties(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Gaussian values times 3 whose first elements are ties (half-even) and a tiny value."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x.view(-1)[:3] = torch.tensor([0.5, -2.5, 1e-3])
    return x.to(dtype)
