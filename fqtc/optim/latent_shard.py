"""Row shards of a `LatentWeight`: the tensor operations FSDP2 applies to a parameter, and its all-gather extension.

FSDP2 (``fully_shard``) shards a parameter along dim 0 (its rows) and rebuilds it before each use with an
all-gather. A latent weight is stored per row (int8 or packed int4 integer codes, a residual code per element, one
scale per row), so a row range of it is again a latent weight. This module gives FSDP2 what it needs, following its
tensor-subclass extension points (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``, as torchao's float8 weights):

- sharding at ``fully_shard`` time: ``torch.chunk`` along dim 0 (`split_rows`), ``new_zeros`` (`zeros_rows`), ``narrow``
  along dim 0 (`row_view`) and the flat alias FSDP keeps (`reshape_alias`); each returns a `LatentWeight` whose inner
  tensors are views of (or new) codes, never a decoded fp32 copy;
- the all-gather (`pre_all_gather`, `post_all_gather`): each rank sends its integer codes and row scales only; the
  gathered parameter is the integer weight ``s*q``, which is what the forward GEMM reads from a latent weight
  (`fqtc.passes.lwq`). The residual codes stay on the rank that owns the rows: they are the optimizer's part of the
  latent weight, read and written only by `fqtc.optim`'s update of the local shard. Bytes moved per element: 1 (W8)
  or 1/2 (W4) plus 4 per row, against 4 for an fp32 all-gather (docs/distributed.md).

Constraints, each raised with the fix: rows evenly divisible by the FSDP world size (FSDP pads uneven shards, and
its all-gather extension then requires every input in the parameter's padded shape), packed codes that do not
straddle two shards, and no ``MixedPrecisionPolicy.param_dtype`` (the gathered weight is consumed as integer codes).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from fqtc.quant import lwq as _lwq

# The functions take and return `fqtc.optim.latent.LatentWeight`s (built with ``type(x)(...)``); annotated as
# Tensor under the name ``LatentWeight``: that module imports this one, so the class itself is not imported here.
LatentWeight = Tensor


def _row_numel(x: LatentWeight) -> int:
    return math.prod(x.shape[1:]) if x.dim() > 1 else 1


def _rebuild(x: LatentWeight, q: Tensor, r: Tensor, s: Tensor, mu: Tensor, shape: Sequence[int]) -> LatentWeight:
    return type(x)(q, r, s, mu, tuple(shape), x.wbits, x.lbits, x.stream)


def _check_packed_boundary(x: LatentWeight, row: int, what: str) -> None:
    """Packed codes hold two elements per byte over the flattened tensor: a row boundary must fall between bytes."""
    if (x.wbits <= 4 or x.lbits <= 4) and (row * _row_numel(x)) % 2 and row != x.shape[0]:
        raise ValueError(
            f"{what}: LatentWeight W{x.wbits}+L{x.lbits} {tuple(x.shape)} packs two codes per byte, and row {row} "
            f"starts in the middle of a byte (odd row length {_row_numel(x)}); shard it into row ranges of even "
            "element count (e.g. an even number of rows per rank), or use W8+L8 storage")


def row_view(x: LatentWeight, start: int, end: int) -> LatentWeight:
    """Rows ``[start, end)`` of ``x`` as a `LatentWeight` whose inner tensors are views of ``x``'s (writes to the view
    reach ``x``; the importance level is shared)."""
    _check_packed_boundary(x, start, "row_view")
    _check_packed_boundary(x, end, "row_view")
    n = _row_numel(x)

    def part(t: Tensor, bits: int) -> Tensor:
        if bits <= 4:
            return t[start * n // 2:(end * n + 1) // 2]
        return t[start:end]

    return _rebuild(x, part(x.q, x.wbits), part(x.r, x.lbits), x.s[start:end], x.mu, (end - start, *x.shape[1:]))


def split_rows(x: LatentWeight, split_size: int) -> list[LatentWeight]:
    """``torch.split(x, split_size, dim=0)`` (what ``torch.chunk`` runs) as row views."""
    rows = x.shape[0]
    return [row_view(x, a, min(a + split_size, rows)) for a in range(0, rows, split_size)]


def zeros_rows(x: LatentWeight, size: Sequence[int]) -> LatentWeight:
    """``x.new_zeros(size)`` for a row count ``size[0]`` with ``x``'s row shape: all codes and scales zero."""
    shape = tuple(int(d) for d in size)
    q = torch.zeros(_lwq.stored_numel(shape, x.wbits) if x.wbits <= 4 else shape,
                    dtype=x.q.dtype, device=x.q.device)
    r = torch.zeros(_lwq.stored_numel(shape, x.lbits) if x.lbits <= 4 else shape,
                    dtype=x.r.dtype, device=x.r.device)
    s = torch.zeros((shape[0], *x.s.shape[1:]), dtype=x.s.dtype, device=x.s.device)
    return _rebuild(x, q, r, s, x.mu.clone(), shape)


def reshape_alias(x: LatentWeight, size: Sequence[int]) -> LatentWeight:
    """An alias of ``x`` with another shape of the same row-major elements (FSDP keeps ``param.view(-1)``).

    Its inner tensors are ``x``'s; `row_layout` recovers the rows for decoding, so the alias decodes to
    ``x.dequantize().view(size)``.
    """
    numel = x.numel()
    shape = [int(d) for d in size]
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = numel // known if known else 0
    if math.prod(shape) != numel:
        raise RuntimeError(f"shape {list(size)} is invalid for a LatentWeight of {numel} elements")
    return _rebuild(x, x.q, x.r, x.s, x.mu, shape)


def row_layout(x: LatentWeight) -> tuple[list[int], Tensor]:
    """(the row shape ``[rows, *row dims]`` of the stored codes, the per-row scale in that layout).

    Equal to ``(shape, s)`` except for a `reshape_alias`, whose scale keeps the stored rows."""
    rows = x.s.shape[0] if x.s.dim() else 1
    if x.dim() and x.shape[0] == rows and x.s.dim() == x.dim():
        return list(x.shape), x.s
    rest = x.numel() // rows if rows else 0
    return [rows, rest], x.s.reshape(rows, 1)


# -- FSDP2 all-gather extension ------------------------------------------------------------------------------------
def pre_all_gather(x: LatentWeight, mesh: Any, outer_size: torch.Size, mp_policy: Any) -> tuple[tuple[Tensor, ...],
                                                                                                   Any]:
    """All-gather inputs of a local row shard: its integer codes and row scales (the residual stays local)."""
    world = mesh.size()
    if outer_size[0] % world:
        raise ValueError(
            f"FSDP2 shards a LatentWeight {tuple(outer_size)} over {world} ranks: its {outer_size[0]} rows do not "
            f"divide evenly, and FSDP's padding of uneven shards is not supported for latent weights; use a row "
            f"count divisible by {world}, leave this layer out of fqtc.prepare, or train with DDP")
    _check_packed_boundary(x, outer_size[0] // world, "FSDP2 all-gather")
    param_dtype = getattr(mp_policy, "param_dtype", None)
    if param_dtype not in (None, torch.float32):
        raise ValueError(
            f"MixedPrecisionPolicy(param_dtype={param_dtype}) does not apply to a LatentWeight: its all-gathered "
            "weight is integer codes that the fqt GEMMs read directly; leave param_dtype unset for latent weights")
    return (x.q, x.s), tuple(outer_size)


def post_all_gather(x: LatentWeight, outputs: Sequence[Tensor], shape: tuple[int, ...],
                    out: "LatentWeight | None" = None) -> tuple[LatentWeight, tuple[Tensor, ...]] | None:
    """The gathered parameter: a `LatentWeight` over the all-gathered codes and scales (views of FSDP's buffers)
    with a zero residual, i.e. the integer weight ``s*q``. With ``out`` (FSDP's later all-gathers into the same
    buffers) only the residual is re-zeroed: FSDP frees and re-allocates its storage between uses."""
    q, s = outputs
    if out is not None:
        # the backward graph saved the first call's (zero) residual; restoring its content is not a modification
        # of it, so its version is kept, as FSDP keeps it for the all-gather buffers it refills
        with torch.autograd._unsafe_preserve_version_counter(out.r):
            out.r.zero_()
        return None
    r = torch.zeros(_lwq.stored_numel(shape, x.lbits) if x.lbits <= 4 else shape, dtype=x.r.dtype, device=q.device)
    mu = torch.zeros((), dtype=torch.uint8, device=q.device)  # residual code 0 is level 0 under every mu
    full = _rebuild(x, q, r, s, mu, shape)
    return full, (q, r, s)


# -- checkpoint entries: codes as plain row-major tensors, resharded by torch.distributed.checkpoint ---------------
ENTRY_SUFFIXES = ("lwq_codes", "lwq_residual", "lwq_scale", "lwq_level")


def to_entries(x: LatentWeight) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(integer codes int8, residual codes int8, both in the weight's shape; row scales; importance level): plain
    tensors whose rows are the weight's rows, so a checkpoint writer can split and join them by rows."""
    return (x.int_codes().clone(), x.residual_codes().clone(), x.s.clone(), x.mu.clone())


def load_entries(x: LatentWeight, codes: Tensor, residual: Tensor, scale: Tensor, level: Tensor) -> None:
    """Write checkpoint entries (`to_entries`' form, rows of ``x``) into ``x``'s storage, bit for bit."""
    shape = tuple(x.shape)
    for name, t, want in (("codes", codes, shape), ("residual", residual, shape), ("scale", scale, tuple(x.s.shape))):
        if tuple(t.shape) != want:
            raise ValueError(f"LatentWeight checkpoint entry lwq_{name} has shape {tuple(t.shape)}, the parameter "
                             f"needs {want}; load a checkpoint of the same model")
    qmax, m_max = _lwq.weight_qmax(x.wbits), _lwq.residual_max(x.lbits)
    if codes.abs().max() > qmax or residual.abs().max() > m_max:
        raise ValueError(f"LatentWeight checkpoint codes exceed W{x.wbits}+L{x.lbits} (|q| <= {qmax}, |r| <= "
                         f"{m_max}); prepare the model with the bit string the checkpoint was saved with")
    x.q.copy_(_lwq.store_codes(codes.to(torch.int8), x.wbits).view(x.q.shape))
    x.r.copy_(_lwq.store_codes(residual.to(torch.int8), x.lbits).view(x.r.shape))
    x.s.copy_(scale)
    x.mu.copy_(level.reshape(()))
