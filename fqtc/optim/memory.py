"""Training-state memory measured from the tensors actually held (bytes per parameter, docs/latent_weights.md)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fqtc.optim.latent import LatentWeight


def _tensor_bytes(x: Any, seen: set[int]) -> int:
    if isinstance(x, LatentWeight):
        return sum(_tensor_bytes(t, seen) for t in x._inner())
    if isinstance(x, Tensor):
        # one count per storage (views and detached aliases share it); a storage's full size is what is held
        storage = x.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(x, dict):
        return sum(_tensor_bytes(v, seen) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in x)
    return 0


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """Bytes of weights (incl. latent codes and scales) and optimizer state, and bytes per parameter.

    Counts the storage of every tensor reachable from ``model.parameters()`` and ``optimizer.state`` (each storage
    once); gradients and activations are not training *state* and are excluded. ``params`` is the number of
    logical parameter elements.
    """
    seen: set[int] = set()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    weight_bytes = sum(_tensor_bytes(p if isinstance(p, LatentWeight) else p.detach(), seen) for p in params)
    opt_bytes = _tensor_bytes(list(optimizer.state.values()), seen) if optimizer is not None else 0
    return {"params": n, "weight_bytes": weight_bytes, "optimizer_bytes": opt_bytes,
            "bytes_per_param": (weight_bytes + opt_bytes) / max(n, 1)}
