"""What fqtc's optimizers need to step parameters sharded by FSDP2 (``DTensor`` parameters, docs/distributed.md).

FSDP2 hands the optimizer ``DTensor`` parameters and gradients; each rank updates its own rows. The updates are
elementwise, so a rank steps its local tensors, with three pieces of agreement across the shards of a parameter:

- a step skipped for inf/nan is skipped on every rank (`agree_found_inf`: one MAX all-reduce);
- a latent shard draws the unsharded parameter's stochastic-rounding numbers for its elements (`element_offset`);
- a latent parameter keeps one importance level: re-selection steps sum the shards' statistics (`sum_over_shards`).

Plain tensors pass through every function unchanged, so single-process and DDP steps issue no collective.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

if dist.is_available():
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
else:  # a torch build without torch.distributed has no sharded parameters
    DTensor = Shard = None  # type: ignore[assignment,misc]


def is_sharded(t: Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's local tensor of a ``DTensor`` (the same object its updates must write), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def _groups(params: Iterable[Tensor]) -> list:
    """The process groups spanning the meshes of the sharded tensors among ``params`` (each once, in order)."""
    seen, groups = set(), []
    for p in params:
        if not is_sharded(p):
            continue
        mesh = p.device_mesh
        for dim in range(mesh.ndim):
            g = mesh.get_group(dim)
            if id(g) not in seen:
                seen.add(id(g))
                groups.append(g)
    return groups


def agree_found_inf(found_inf: Tensor, params: Iterable[Tensor]) -> Tensor:
    """``found_inf`` OR-ed over every rank holding a shard of ``params``: a skipped step is skipped everywhere."""
    groups = _groups(params)
    if not groups:
        return found_inf
    flag = found_inf.to(torch.int32).reshape(1)
    for g in groups:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=g)
    return flag[0].bool()


def sum_over_shards(x: Tensor, p: Tensor) -> Tensor:
    """``x`` summed over the ranks holding shards of ``p`` (a new tensor; ``x`` itself if ``p`` is not sharded)."""
    groups = _groups([p])
    if not groups:
        return x
    x = x.clone()
    for g in groups:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=g)
    return x


def row_offset(p: Tensor) -> int:
    """Index, in the whole parameter, of the first row of the rank's shard of ``p`` (sharded along dim 0)."""
    row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
    return element_offset(p) // row if row else 0


def element_offset(p: Tensor) -> int:
    """Row-major index, in the whole parameter, of the first element of the rank's shard of ``p``.

    fqtc's latent weights are sharded by rows (FSDP2's default ``Shard(0)``); a shard along another dim has no
    contiguous range of element indices and is refused with the fix."""
    if any(isinstance(pl, Shard) and pl.dim != 0 for pl in p.placements):
        raise ValueError(f"a LatentWeight sharded as {p.placements} over {tuple(p.shape)}: latent weights are "
                         "stored by rows, shard them along dim 0 (FSDP2's default placement)")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
    return int(offset[0]) * row if offset else 0
