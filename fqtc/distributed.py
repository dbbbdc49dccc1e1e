"""Low-bit gradient communication for data-parallel training: int8 codes with stochastic rounding on the wire.

Data-parallel training averages every gradient across ranks once per step. `int8_sr_allreduce` replaces the fp32
all-reduce of one flat gradient buffer by:

1. a shared scale: the buffer's abs-max, all-reduced with ``MAX`` (with a non-finite flag: two fp32 per rank),
   ``scale = amax / 127``;
2. int8 codes ``floor(g / scale + u)`` with stochastic rounding, ``u`` drawn from fqtc's counter-based generator
   (`fqtc.quant.rng`) keyed by (seed, step, rank and bucket), so ``E[scale * code] = g`` element by element and the
   ranks' rounding noises are independent (the uniform quantizer of `fqtc.quant.uniform`);
3. an all-gather of the int8 codes (1 byte per element per rank), an exact int32 sum of the gathered codes, and one
   dequantization ``sum * scale / world_size``.

Every rank computes the same sum from the same gathered codes, so the ranks stay bit-identical. The result is an
unbiased estimate of the mean gradient with per-element error at most ``scale`` (each rank's rounding error is below
one step; their average is too). A bucket holding a NaN or Inf has no finite scale: it is all-reduced in fp32
instead, so the non-finite value reaches every rank (a loss scaler or the user sees it), and the state counts it.

Payload: each rank hands ``numel`` bytes (plus two fp32) to the collectives, against ``4 * numel`` bytes for the
fp32 all-reduce's input; what travels on the wire also depends on the collective's algorithm (an all-gather
delivers ``(world_size - 1) * numel`` bytes to each rank, a ring all-reduce ``2 * (world_size - 1) / world_size *
4 * numel``), so the saving is largest at small world sizes (benchmarks/distributed.py measures it).

Use with DDP::

    ddp = DDP(torch.compile(model, backend="fqt"))
    fqtc.distributed.register_int8_grad_comm(ddp, seed=0)

and with FSDP2 (`int8_sr_reduce_scatter`: one shared scale per destination chunk, an ``all_to_all`` of int8 codes)::

    fully_shard(block) for each block; fully_shard(model)
    fqtc.distributed.register_int8_fsdp_reduce_scatter(model, seed=0)

Also here: `get_model_state_dict` / `set_model_state_dict` (`fqtc.optim.checkpoint`), state dicts that
``torch.distributed.checkpoint`` saves and reloads on any world size, latent weights included.
"""

# no ``from __future__ import annotations``: DDP checks the hook's annotations as objects (dist.GradBucket)
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter  # FSDP2's custom-comm interface

from fqtc.optim.checkpoint import get_model_state_dict, set_model_state_dict
from fqtc.quant import uniform

# keeps the streams of different buckets and ranks apart (rank-major); any bucket count below this is distinct
_STREAMS_PER_RANK = 1 << 16


@dataclass
class Int8CommState:
    """State of the int8 gradient communication of one data-parallel model.

    ``seed``: stochastic-rounding seed (same meaning as the backend's ``seed`` option); ``process_group``: the
    group to reduce over (None: the default group); ``step``: calls so far per bucket index (the rounding step, so
    each call draws new bits); ``payload_bytes`` / ``fp32_payload_bytes``: bytes handed to the collectives so far,
    and what the fp32 all-reduce would have been handed; ``fp32_fallbacks``: buckets sent in fp32 because they held
    a NaN or Inf.
    """

    seed: int = 0
    process_group: dist.ProcessGroup | None = None
    step: dict[int, int] = field(default_factory=dict)
    payload_bytes: int = 0
    fp32_payload_bytes: int = 0
    fp32_fallbacks: int = 0


def _check_fp32(grad: torch.Tensor, fix: str) -> None:
    if grad.dtype != torch.float32:
        raise TypeError(f"int8 gradient communication expects fp32 gradients, got {grad.dtype}; {fix}")


def _next_call(state: Int8CommState, bucket: int, rank: int) -> tuple[int, int]:
    """(rounding step, stream) of this call: calls so far on ``bucket``; rank-major streams keep ranks and buckets
    apart."""
    step = state.step.get(bucket, 0)
    state.step[bucket] = step + 1
    return step, rank * _STREAMS_PER_RANK + bucket % _STREAMS_PER_RANK


def _shared_amax(rows: torch.Tensor, state: Int8CommState, group: dist.ProcessGroup | None) -> torch.Tensor | None:
    """Per-row abs-max of ``rows`` ``[R, n]`` over every rank (keepdim ``[R, 1]``), from one ``MAX`` all-reduce of
    ``[abs-max..., non-finite flag...]`` (``2 R`` floats: a MAX over NaN is not reliably NaN, so the flags carry
    it); None when a row holds a NaN or Inf on some rank."""
    finite = torch.isfinite(rows)
    r = rows.shape[0]
    stat = torch.cat([torch.where(finite, rows.abs(), 0.0).amax(1) if rows.numel() else rows.new_zeros(r),
                      (~finite).any(1).float()])
    dist.all_reduce(stat, op=dist.ReduceOp.MAX, group=group)
    state.payload_bytes += stat.numel() * 4
    return None if stat[r:].any() else stat[:r].view(r, 1)


def int8_sr_allreduce(grad: torch.Tensor, state: Int8CommState, bucket: int = 0) -> torch.Tensor:
    """The mean of ``grad`` over the ranks of ``state.process_group``, communicated as int8 stochastic-rounding
    codes (module doc). ``grad`` is a flat fp32 tensor; returns a new tensor of the same shape (every rank gets the
    same bits). ``bucket`` keeps the rounding streams of different gradient buffers apart."""
    _check_fp32(grad, "cast the gradients or leave this hook off")
    group = state.process_group
    world = dist.get_world_size(group)
    step, stream = _next_call(state, bucket, dist.get_rank(group))
    state.fp32_payload_bytes += grad.numel() * 4
    amax = _shared_amax(grad.reshape(1, -1), state, group)
    if amax is None:
        out = grad.clone()
        dist.all_reduce(out, group=group)
        state.payload_bytes += grad.numel() * 4
        state.fp32_fallbacks += 1
        return out / world
    codes, scale = uniform.quantize(grad, 8, [0], "stochastic", seed=state.seed, step=step, stream=stream,
                                    amax=amax.view(1))
    gathered = [torch.empty_like(codes) for _ in range(world)]
    dist.all_gather(gathered, codes, group=group)
    state.payload_bytes += codes.numel()
    total = torch.stack(gathered).to(torch.int32).sum(0)  # exact: |sum| <= 127 * world_size
    return total.float() * scale / world


def int8_sr_hook(state: Int8CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook (``DistributedDataParallel.register_comm_hook``) running `int8_sr_allreduce` on each
    gradient bucket."""
    out = int8_sr_allreduce(bucket.buffer(), state, bucket.index())
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(out)
    return fut


def register_int8_grad_comm(ddp: torch.nn.parallel.DistributedDataParallel, seed: int = 0,
                            process_group: dist.ProcessGroup | None = None) -> Int8CommState:
    """Make ``ddp`` average its gradients through int8 stochastic-rounding codes (`int8_sr_hook`); returns the state
    (bytes communicated, fallbacks). Register before the first backward."""
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_int8_grad_comm expects a DistributedDataParallel module, got {type(ddp).__name__}; "
                        "wrap the model first: DDP(torch.compile(model, backend='fqt'))")
    state = Int8CommState(seed=seed, process_group=process_group)
    ddp.register_comm_hook(state, int8_sr_hook)
    return state


def int8_sr_reduce_scatter(flat: torch.Tensor, state: Int8CommState, group: dist.ProcessGroup | None = None,
                           average: bool = True, bucket: int = 0) -> torch.Tensor:
    """Reduce-scatter of ``flat`` (fp32, ``world_size * n`` elements: chunk ``j`` belongs to rank ``j``) through int8
    stochastic-rounding codes; returns this rank's chunk of the mean (``average``) or sum over ranks.

    Each chunk ``j`` gets one scale shared by every rank (its abs-max over the ranks, in one ``MAX`` all-reduce of
    ``2 * world_size`` floats with the non-finite flags), each rank rounds its chunks to int8 codes with its own
    counter stream, an ``all_to_all`` hands rank ``j`` every rank's codes of chunk ``j`` (``n`` bytes per rank and
    destination), and the int32 sum of the codes is dequantized once: unbiased, with per-element error below one
    step, as `int8_sr_allreduce`. A chunk holding a NaN or Inf sends the whole call in fp32."""
    _check_fp32(flat, "set the FSDP reduce dtype to float32 (MixedPrecisionPolicy(reduce_dtype=torch.float32)) or "
                "leave it off")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if flat.numel() % world:
        raise ValueError(f"reduce-scatter input of {flat.numel()} elements does not split into {world} ranks")
    step, stream = _next_call(state, bucket, rank)
    chunks = flat.view(world, -1)
    state.fp32_payload_bytes += flat.numel() * 4
    amax = _shared_amax(chunks, state, group)
    if amax is None:
        out = torch.empty(chunks.shape[1], dtype=torch.float32, device=flat.device)
        dist.reduce_scatter_tensor(out, flat.contiguous(), group=group)
        state.payload_bytes += flat.numel() * 4
        state.fp32_fallbacks += 1
        return out / world if average else out
    codes, scale = uniform.quantize(chunks, 8, [1], "stochastic", seed=state.seed, step=step, stream=stream, amax=amax)
    received = torch.empty_like(codes)
    dist.all_to_all_single(received, codes, group=group)
    state.payload_bytes += codes.numel()
    total = received.to(torch.int32).sum(0)  # exact: |sum| <= 127 * world_size
    out = total.float() * scale[rank]
    return out / world if average else out


class Int8ReduceScatter(ReduceScatter):
    """FSDP2 reduce-scatter (``FSDPModule.set_custom_reduce_scatter``) running `int8_sr_reduce_scatter`; one per
    FSDP module, ``bucket`` keeping their rounding streams apart. FSDP's ``SUM`` and ``AVG`` reductions are
    supported; a pre-multiplied sum (a custom gradient divide factor) raises."""

    def __init__(self, state: Int8CommState, bucket: int) -> None:
        self.state, self.bucket = state, bucket

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op, async_op: bool = False):
        if op == dist.ReduceOp.AVG:
            average = True
        elif op == dist.ReduceOp.SUM:
            average = False
        else:
            raise ValueError(f"int8 reduce-scatter supports FSDP's SUM and AVG reductions, got {op}; leave "
                             "set_reduce_scatter_divide_factor at its default")
        output_tensor.copy_(int8_sr_reduce_scatter(input_tensor, self.state, group, average, self.bucket))
        return None


def register_int8_fsdp_reduce_scatter(model: torch.nn.Module, seed: int = 0) -> Int8CommState:
    """Make every FSDP2 module in ``model`` (``fully_shard``-ed, fp32 gradients) reduce-scatter its gradients
    through int8 stochastic-rounding codes (`Int8ReduceScatter`); returns the shared state (bytes, fallbacks).
    Register after ``fully_shard`` and before the first backward."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods:
        raise TypeError("register_int8_fsdp_reduce_scatter found no FSDP2 module; call fully_shard on the model "
                        "(and its blocks) first")
    state = Int8CommState(seed=seed)
    for i, m in enumerate(mods):
        m.set_custom_reduce_scatter(Int8ReduceScatter(state, i))
    return state


__all__ = ["Int8CommState", "Int8ReduceScatter", "get_model_state_dict", "int8_sr_allreduce", "int8_sr_hook",
           "int8_sr_reduce_scatter", "register_int8_fsdp_reduce_scatter", "register_int8_grad_comm",
           "set_model_state_dict"]
