"""LWQ ops: latent-weight dequantize/unpack for graphs, and the fused per-parameter optimizer update.

- ``fqt::lwq_dequantize(q, r, s, mu, shape, wbits, lbits)``: the latent float weight ``s*(q + r)``. Parameters
  stored as `fqtc.optim.LatentWeight` reach AOT graphs as their inner tensors followed by this one op;
  `fqtc.passes.lwq` recognizes it.
- ``fqt::lwq_unpack(q, shape, wbits)``: int8 integer codes of ``shape`` from their storage (unpacks int4), what
  the rewrite feeds straight into ``fqt::qgemm``.
- ``fqt::lwq_update(...)``: one fused step per latent parameter (papers.md section 3, "update step"): decode the
  latent weight, apply the optimizer math (SGD or AdamW; optimizer states fp32 or 8-bit block-quantized), refresh
  scales, re-encode with counter-based stochastic rounding of the residual. Mutates the codes, scale, importance
  level and states in place. Returns ``[mean |dw|/s, saturated fraction]`` (float32, 2 elements).

Reference implementations call `fqtc.quant.lwq`; a CUDA kernel registers for the same ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fqtc.quant import lwq as _lwq


@torch.library.custom_op("fqt::lwq_dequantize", mutates_args=())
def lwq_dequantize(q: Tensor, r: Tensor, s: Tensor, mu: Tensor, shape: list[int], wbits: int, lbits: int) -> Tensor:
    """Latent float weight from LWQ storage (int8/packed-int4 integer codes, packed residual, per-row scale)."""
    qc = _lwq.load_codes(q, wbits, shape)
    rc = _lwq.load_codes(r, lbits, shape)
    return _lwq.decode(qc, rc, s, lbits, int(mu))


@lwq_dequantize.register_fake
def _(q, r, s, mu, shape, wbits, lbits):
    return s.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("fqt::lwq_unpack", mutates_args=())
def lwq_unpack(q: Tensor, shape: list[int], wbits: int) -> Tensor:
    """int8 integer-weight codes of ``shape`` (unpacks int4 storage; a copy for int8 storage)."""
    return _lwq.load_codes(q, wbits, shape).clone()


@lwq_unpack.register_fake
def _(q, shape, wbits):
    return q.new_empty(shape, dtype=torch.int8)


# -- optimizer math (shared by latent and plain parameters, so both follow torch.optim's formulas) ------------------
SGD_HPARAMS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
ADAMW_HPARAMS = ("lr", "beta1", "beta2", "eps", "weight_decay")


def state_tensors(kind: str, hp: list[float], shape: list[int], state_bits: int, device=None) -> list[Tensor]:
    """Freshly initialized optimizer state tensors of one parameter (zeros), in their storage format."""
    n = 1
    for d in shape:
        n *= d
    nb = -(-n // _lwq.STATE_BLOCK)

    def one(signed: bool) -> list[Tensor]:
        if state_bits == 32:
            return [torch.zeros(shape, dtype=torch.float32, device=device)]
        return [torch.zeros(n, dtype=torch.int8 if signed else torch.uint8, device=device),
                torch.zeros(nb, dtype=torch.float32, device=device)]

    if kind == "sgd":
        return one(True) if hp[1] != 0 else []
    if kind == "adamw":
        return one(True) + one(False)
    raise ValueError(f"unknown optimizer kind {kind!r}; allowed: sgd, adamw")


def _load_states(kind: str, states: list[Tensor], shape: list[int]) -> list[Tensor]:
    if not states or states[0].dtype == torch.float32:
        return [s.float() for s in states]
    out = []
    for i in range(0, len(states), 2):
        x = _lwq.dequantize_state(states[i], states[i + 1], shape)
        if states[i].dtype == torch.uint8:  # Adam's second moment is stored as sqrt(v)
            x = x * x
        out.append(x)
    return out


def _store_states(states: list[Tensor], values: list[Tensor]) -> None:
    if not states:
        return
    if states[0].dtype == torch.float32:
        for st, v in zip(states, values):
            st.copy_(v)
        return
    for j, i in enumerate(range(0, len(states), 2)):
        signed = states[i].dtype == torch.int8
        # sqrt(v) correctly rounded (float64, rounded once): torch's CPU fp32 sqrt is not on every code path (its
        # result depended on the thread count), ONNX Runtime's is
        v = values[j] if signed else values[j].double().sqrt().float()
        codes, amax = _lwq.quantize_state(v, signed=signed)
        states[i].copy_(codes)
        states[i + 1].copy_(amax)


def optimizer_math(kind: str, p: Tensor, g: Tensor, st: list[Tensor], hp: list[float], step: Tensor,
                   lr_t: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """One step of torch.optim.SGD / AdamW on float tensors. Returns (new parameter, new state values).

    ``step`` is a 0-d int64 tensor (from 1), so the math traces without a host sync (compiled optimizer step).
    ``lr_t``, a 0-d tensor learning rate, replaces ``hp[0]``: a compiled step then reads it as a graph input, so an
    LR schedule that updates it in place does not recompile the step (torch.optim's tensor-``lr`` convention). The
    expressions mirror the float path's rounding: ``lr * g`` casts lr to fp32 either way, ``1 - lr * wd`` is formed
    in float64 and rounded once (as Python forms it), and ``lr / bc1`` is ``bc1.reciprocal() * lr`` (what
    ``float / Tensor`` computes).
    """
    g = g.float()
    step = step.to(torch.float32)
    if kind == "sgd":
        lr, momentum, dampening, wd, nesterov = hp
        if lr_t is not None:
            lr = lr_t.float()
        if wd != 0:
            g = g + wd * p
        if momentum != 0:
            # torch.optim.SGD: the first step sets the buffer to the gradient
            buf = torch.where(step <= 1, g, momentum * st[0] + (1 - dampening) * g)
            g = g + momentum * buf if nesterov else buf
            return p - lr * g, [buf]
        return p - lr * g, []
    if kind == "adamw":
        lr, b1, b2, eps, wd = hp
        if lr_t is not None:
            lr = lr_t.float()
            p = p * (1 - lr_t.double() * wd).float()
        else:
            p = p * (1 - lr * wd)
        m = st[0] * b1 + (1 - b1) * g  # the lerp torch.optim uses, written out
        v = st[1] * b2 + (1 - b2) * g * g
        bc1 = 1 - torch.pow(b1, step)
        bc2 = 1 - torch.pow(b2, step)
        # sqrt in float64, rounded once: correctly rounded, so a GPU kernel can match it bit for bit (torch's CPU
        # fp32 sqrt is not, docs/kernels.md)
        denom = (v.double().sqrt().float() / torch.sqrt(bc2.double()).float()) + eps
        step_size = bc1.reciprocal() * lr if lr_t is not None else lr / bc1
        return p - step_size * m / denom, [m, v]
    raise ValueError(f"unknown optimizer kind {kind!r}; allowed: sgd, adamw")


def plain_update(p: Tensor, g: Tensor, states: list[Tensor], kind: str, hp: list[float], step: Tensor,
                 lr_t: Tensor | None = None) -> None:
    """In-place update of a plain (non-latent) parameter with the same math and state formats (``lr_t``: a tensor
    learning rate replacing ``hp[0]``, `optimizer_math`)."""
    st = _load_states(kind, states, list(p.shape))
    new_p, new_st = optimizer_math(kind, p.detach().float(), g, st, hp, step, lr_t)
    p.detach().copy_(new_p)
    _store_states(states, new_st)


def update_magnitude(q: Tensor, r: Tensor, s: Tensor, mu: Tensor, grad: Tensor, states: list[Tensor], kind: str,
                     hparams: list[float], shape: list[int], wbits: int, lbits: int, step: Tensor,
                     lr: Tensor | None = None) -> Tensor:
    """``[sum |dw|, sum s, elements, rows]`` (float64) of the update ``fqt::lwq_update`` would make, changing
    nothing: the shards of a parameter add these up to choose one importance level from the whole parameter's rho
    (`fqtc.optim.base.LatentOptimizer`, passed back as the op's ``mu_next``)."""
    w = _lwq.decode(_lwq.load_codes(q, wbits, shape), _lwq.load_codes(r, lbits, shape), s, lbits, int(mu))
    w_new, _ = optimizer_math(kind, w, grad.reshape(shape), _load_states(kind, states, shape), hparams, step, lr)
    return torch.stack([(w_new - w).abs().double().sum(), s.double().sum(),
                        torch.tensor(float(w.numel()), dtype=torch.float64, device=w.device),
                        torch.tensor(float(s.shape[0] if s.dim() else 1), dtype=torch.float64, device=w.device)])


@torch.library.custom_op("fqt::lwq_update", mutates_args=("q", "r", "s", "mu", "states"))
def lwq_update(
    q: Tensor, r: Tensor, s: Tensor, mu: Tensor, grad: Tensor, states: list[Tensor], kind: str, hparams: list[float],
    shape: list[int], wbits: int, lbits: int, seed: int, stream: int, step: Tensor, skip: Tensor,
    refresh: bool, mu_interval: int, lr: Tensor | None = None, mu_thresholds: list[float] | None = None,
    index_offset: int = 0, mu_next: int = -1,
) -> Tensor:
    """Fused LWQ optimizer step of one latent parameter: decode -> optimizer math -> re-encode (SR residual).

    ``lr`` (optional 0-d tensor) is the learning rate when the optimizer's group holds it as a tensor; it then
    replaces ``hparams[0]`` and is read here, inside the op, so a compiled optimizer step keeps it as a graph input
    instead of baking its value (an LR schedule does not recompile the step).

    ``step`` (0-d int64) is the optimizer's step number, from 1: it keys the residual's random stream together
    with (seed, stream) and drives bias correction. ``skip`` (0-d bool) leaves everything unchanged (a step with
    inf/nan gradients). The importance level ``mu`` is re-selected every ``mu_interval`` steps from
    rho = mean(s) / mean|dw| (0 disables it), against ``mu_thresholds`` (None: `fqtc.quant.lwq.MU_THRESHOLDS`).

    A row shard of a parameter (FSDP2, docs/distributed.md) passes ``index_offset``, the element index of its first
    element in the whole parameter, so its residual draws the unsharded parameter's random numbers, and
    ``mu_next`` (>= 0), the level the shards chose together from the whole parameter's rho
    (`fqtc.optim.base.LatentOptimizer`), used at re-selection steps in place of this shard's own rho.
    """
    stats = torch.zeros(2, dtype=torch.float32, device=q.device)
    if bool(skip):
        return stats
    t = int(step)
    mu_old = int(mu)
    qc = _lwq.load_codes(q, wbits, shape)
    rc = _lwq.load_codes(r, lbits, shape)
    w = _lwq.decode(qc, rc, s, lbits, mu_old)
    st = _load_states(kind, states, shape)
    w_new, st_new = optimizer_math(kind, w, grad.reshape(shape), st, hparams, step, lr)
    delta = (w_new - w).abs()
    mean_rel = (delta / s).mean()
    mu_new = mu_old
    if mu_interval > 0 and (t == 1 or t % mu_interval == 0):
        if mu_next >= 0:
            mu_new = int(mu_next)
        else:
            mean_delta = float(delta.mean())
            rho = float(s.mean()) / mean_delta if mean_delta > 0 else float("inf")
            mu_new = _lwq.select_mu(rho, lbits, mu_thresholds)
    qn, rn, sn, sat = _lwq.encode_latent(w_new, s, wbits, lbits, mu_new, seed, step, stream, refresh=refresh,
                                         index_offset=index_offset)
    q.copy_(_lwq.store_codes(qn, wbits).view(q.shape))
    r.copy_(_lwq.store_codes(rn, lbits).view(r.shape))
    s.copy_(sn)
    mu.fill_(mu_new)
    _store_states(states, st_new)
    stats[0] = mean_rel
    stats[1] = sat.float().mean()
    return stats


@lwq_update.register_fake
def _(q, r, s, mu, grad, states, kind, hparams, shape, wbits, lbits, seed, stream, step, skip, refresh, mu_interval,
      lr=None, mu_thresholds=None, index_offset=0, mu_next=-1):
    return q.new_empty(2, dtype=torch.float32)
