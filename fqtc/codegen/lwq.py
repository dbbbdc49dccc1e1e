"""Triton kernels for ``fqt::lwq_update`` (docs/latent_weights.md): decode -> optimizer step -> re-encode, one pass.

Reference: `fqtc.ops.lwq.lwq_update` with `fqtc.quant.lwq.decode`, `fqtc.ops.lwq.optimizer_math` ("sgd" or
"adamw") and `fqtc.quant.lwq.encode_latent` (scale refresh + dual quantizer with the stochastic non-uniform
residual). A program owns whole rows (output channels), so the per-row scale refresh (which needs the row's amax of
``w/s`` before any element is encoded) happens in registers: the packed integer weight, the packed residual, the
gradient and the fp32 optimizer states are read once, and the new codes, scales and states written once.

The two kernels share `_decode` (mirrors `decode`) and `_encode_store` (mirrors `encode_latent` + the op's
statistics); only the optimizer math in between differs, line for line with `optimizer_math`:

- SGD with weight decay, momentum (fp32 buffer, updated in place), dampening and Nesterov;
- AdamW with decoupled weight decay, fp32 ``m`` and ``v`` (updated in place) and bias correction. The reference
  takes the root of ``v`` in float64 and rounds once (``v.double().sqrt().float()``, correctly rounded), and the
  kernel does the same (``tl.sqrt`` on fp64, then the cast); torch's CPU fp32 ``sqrt`` is not correctly rounded
  (docs/kernels.md), which is why the reference does not use it. The per-step scalars ``lr / bc1`` and
  ``sqrt(bc2)`` are computed by `adamw_step_scalars` with the reference's own torch expressions on the step's
  device (no host sync) and read by the kernel from memory.

Coverage: integer weights W4 (packed) or W8, residuals L2..L8, rows of even length when a code is packed (a packed
byte then never straddles two rows' programs). Steps that re-select the importance level ``mu`` (every
``mu_interval`` steps: a global mean over the update, decided on the host) and 8-bit block-companded optimizer
states run the reference implementation; `fqtc.codegen.impls` counts each such call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fqtc.codegen import tl_numerics as tn
from fqtc.quant import lwq as _lwq
from fqtc.quant.rng import GOLDEN, mix32_int

MAX_ROW = 8192  # a row of the weight lives in registers (fp32 working values)
TILE_ELEMS = 4096


@triton.jit
def _load_codes(ptr, rows64, rmask, cols, m, E, PACKED: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_E: tl.constexpr):
    """int32 codes of a (BLOCK_R, BLOCK_E) tile; packed storage: uint8, element 2i in the low nibble."""
    if PACKED:
        half = tl.arange(0, BLOCK_E // 2)
        pm = rmask[:, None] & (half[None, :] < E // 2)
        b = tl.load(ptr + rows64[:, None] * (E // 2) + half[None, :], mask=pm, other=0).to(tl.int32)
        lo = ((b & 0xF) ^ 8) - 8
        hi = (((b >> 4) & 0xF) ^ 8) - 8
        return tl.reshape(tl.join(lo, hi), (BLOCK_R, BLOCK_E))
    else:
        return tl.load(ptr + rows64[:, None] * E + cols[None, :], mask=m, other=0).to(tl.int32)


@triton.jit
def _store_codes(ptr, c, rows64, rmask, cols, m, E, PACKED: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    if PACKED:
        half = tl.arange(0, BLOCK_E // 2)
        lo, hi = tl.split(tl.reshape(c, (BLOCK_R, BLOCK_E // 2, 2)))
        byte = (lo & 0xF) | ((hi & 0xF) << 4)
        tl.store(ptr + rows64[:, None] * (E // 2) + half[None, :], byte.to(tl.uint8),
                 mask=rmask[:, None] & (half[None, :] < E // 2))
    else:
        tl.store(ptr + rows64[:, None] * E + cols[None, :], c.to(tl.int8), mask=m)


@triton.jit
def _row_tile(R, E, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's ``BLOCK_R`` weight rows (whole rows of ``E`` elements): int64 row ids, row mask, column ids
    and the element mask."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols = tl.arange(0, BLOCK_E)
    return rows.to(tl.int64), rmask, cols, rmask[:, None] & (cols[None, :] < E)


@triton.jit
def _decode(q_ptr, r_ptr, s_ptr, lv_ptr, rows64, rmask, cols, m, E, M: tl.constexpr, W_PACKED: tl.constexpr,
            L_PACKED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """`fqtc.quant.lwq.decode`: ``w = s * (q + sign(rc) * levels[|rc|])``; returns (w, s)."""
    qc = _load_codes(q_ptr, rows64, rmask, cols, m, E, W_PACKED, BLOCK_R, BLOCK_E)
    rc = _load_codes(r_ptr, rows64, rmask, cols, m, E, L_PACKED, BLOCK_R, BLOCK_E)
    s = tl.load(s_ptr + rows64, mask=rmask, other=1.0)
    lvl = tl.load(lv_ptr + tl.minimum(tl.abs(rc), M))
    sgn = tl.where(rc > 0, 1.0, tl.where(rc < 0, -1.0, 0.0))
    return s[:, None] * (qc.to(tl.float32) + sgn * lvl), s


@triton.jit
def _encode_store(w, w_new, s, q_ptr, r_ptr, s_ptr, lv_ptr, stats_ptr, step_ptr, rows64, rmask, cols, m, offs, E,
                  qmax, hq, key0, stream, M: tl.constexpr, REFRESH: tl.constexpr, W_PACKED: tl.constexpr,
                  L_PACKED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """`fqtc.quant.lwq.encode_latent` (scale refresh + dual quantizer) and the op's per-row statistics."""
    rel = tl.where(m, tl.math.div_rn(tl.abs(w_new - w), s[:, None]), 0.0)
    # scale refresh: rows whose largest |w/s| would round to +-qmax grow to amax / (headroom * qmax)
    s_new = s
    if REFRESH:
        t_amax = tl.max(tl.where(m, tl.abs(tl.math.div_rn(w_new, s[:, None])), 0.0), axis=1)
        s_new = tl.where(t_amax > qmax - 0.5, tl.math.div_rn(s * t_amax, tl.zeros_like(s) + hq), s)
    # dual quantizer: q = round(t), residual r = t - q by stochastic non-uniform rounding on the levels
    t = tl.math.div_rn(w_new, s_new[:, None])
    u = tn.uniform01(offs, tn.stream_key(key0, step_ptr, stream))
    qf = tn.round_half_even(t)
    sat = tl.abs(qf) > qmax
    qf = tl.minimum(tl.maximum(qf, -qmax), qmax)
    r = tl.minimum(tl.maximum(t - qf, -0.5), 0.5)
    mag = tl.minimum(tl.abs(r), 0.5)
    k = tl.zeros((BLOCK_R, BLOCK_E), tl.int32)
    for j in tl.static_range(1, M + 1):  # searchsorted(levels, mag, right=True) - 1
        k += (tl.load(lv_ptr + j) <= mag).to(tl.int32)
    k = tl.minimum(k, M - 1)
    lo = tl.load(lv_ptr + k)
    hi = tl.load(lv_ptr + k + 1)
    p = tl.math.div_rn(mag - lo, hi - lo)
    mcode = (k + (u < p).to(tl.int32)).to(tl.float32)
    code = tl.where(r > 0, mcode, tl.where(r < 0, -mcode, 0.0))
    carry = code >= M
    can = carry & (qf < qmax)
    qf = tl.where(can, qf + 1.0, qf)
    code = tl.where(can, -M * 1.0, code)
    code = tl.where(carry & (~can), (M - 1) * 1.0, code)
    sat = sat | (carry & (~can))
    _store_codes(q_ptr, qf.to(tl.int32), rows64, rmask, cols, m, E, W_PACKED, BLOCK_R, BLOCK_E)
    _store_codes(r_ptr, code.to(tl.int32), rows64, rmask, cols, m, E, L_PACKED, BLOCK_R, BLOCK_E)
    tl.store(s_ptr + rows64, s_new, mask=rmask)
    tl.store(stats_ptr + rows64 * 2, tl.sum(rel, axis=1), mask=rmask)
    tl.store(stats_ptr + rows64 * 2 + 1, tl.sum(tl.where(m & sat, 1.0, 0.0), axis=1), mask=rmask)


@triton.jit
def _lwq_sgd_kernel(
    q_ptr, r_ptr, s_ptr, g_ptr, buf_ptr, lv_ptr, stats_ptr, step_ptr,
    R, E, lr, wd, momentum, one_m_damp, qmax, hq, key0, stream,
    M: tl.constexpr, HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, REFRESH: tl.constexpr,
    W_PACKED: tl.constexpr, L_PACKED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows64, rmask, cols, m = _row_tile(R, E, BLOCK_R, BLOCK_E)
    w, s = _decode(q_ptr, r_ptr, s_ptr, lv_ptr, rows64, rmask, cols, m, E, M, W_PACKED, L_PACKED, BLOCK_R, BLOCK_E)
    # optimizer math (torch.optim.SGD, `fqtc.ops.lwq.optimizer_math`): weight decay, momentum buffer (fp32 state,
    # set to the gradient on the first step), Nesterov; then p - lr * g
    offs = rows64[:, None] * E + cols[None, :]
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_WD:
        g = g + wd * w
    if MOMENTUM:
        old = tl.load(buf_ptr + offs, mask=m, other=0.0)
        first = (tl.load(step_ptr) <= 1) & (offs >= 0)
        buf = tl.where(first, g, momentum * old + one_m_damp * g)
        tl.store(buf_ptr + offs, buf, mask=m)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    w_new = w - lr * g
    _encode_store(w, w_new, s, q_ptr, r_ptr, s_ptr, lv_ptr, stats_ptr, step_ptr, rows64, rmask, cols, m, offs, E,
                  qmax, hq, key0, stream, M, REFRESH, W_PACKED, L_PACKED, BLOCK_R, BLOCK_E)


@triton.jit
def _lwq_adamw_kernel(
    q_ptr, r_ptr, s_ptr, g_ptr, m_ptr, v_ptr, lv_ptr, stats_ptr, step_ptr, step_size_ptr, bc2_sqrt_ptr,
    R, E, decay, b1, one_m_b1, b2, one_m_b2, eps, qmax, hq, key0, stream,
    M: tl.constexpr, REFRESH: tl.constexpr, W_PACKED: tl.constexpr, L_PACKED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows64, rmask, cols, m = _row_tile(R, E, BLOCK_R, BLOCK_E)
    w, s = _decode(q_ptr, r_ptr, s_ptr, lv_ptr, rows64, rmask, cols, m, E, M, W_PACKED, L_PACKED, BLOCK_R, BLOCK_E)
    # optimizer math (torch.optim.AdamW, `fqtc.ops.lwq.optimizer_math` "adamw"), one op per reference op, in its
    # order; fp32 scalars are the reference's Python floats rounded to fp32, as torch does for tensor-scalar ops
    offs = rows64[:, None] * E + cols[None, :]
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    p = w * decay  # p * (1 - lr * wd)
    mo = tl.load(m_ptr + offs, mask=m, other=0.0) * b1 + one_m_b1 * g
    vo = tl.load(v_ptr + offs, mask=m, other=0.0) * b2 + one_m_b2 * g * g
    tl.store(m_ptr + offs, mo, mask=m)
    tl.store(v_ptr + offs, vo, mask=m)
    # v.double().sqrt().float(): the float64 root rounded once is the correctly rounded fp32 root
    root = tl.sqrt(vo.to(tl.float64)).to(tl.float32)
    denom = tl.math.div_rn(root, tl.load(bc2_sqrt_ptr)) + eps
    w_new = p - tl.math.div_rn(tl.load(step_size_ptr) * mo, denom)  # p - (lr / bc1) * m / denom
    _encode_store(w, w_new, s, q_ptr, r_ptr, s_ptr, lv_ptr, stats_ptr, step_ptr, rows64, rmask, cols, m, offs, E,
                  qmax, hq, key0, stream, M, REFRESH, W_PACKED, L_PACKED, BLOCK_R, BLOCK_E)


def adamw_step_scalars(hparams: list, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-step scalars of AdamW as 1-element fp32 tensors on ``step``'s device: ``(lr / bc1, sqrt(bc2))``.

    The same torch expressions as `fqtc.ops.lwq.optimizer_math` (``lr / bc1`` is ``bc1.reciprocal() * lr`` in
    torch, and ``pow`` runs on the step's device), so the kernel reads bit-identical values without a host sync.
    """
    lr, b1, b2, _, _ = (float(h) for h in hparams)
    t = step.to(torch.float32)
    bc1 = 1 - torch.pow(b1, t)
    bc2 = 1 - torch.pow(b2, t)
    return (lr / bc1).reshape(1), torch.sqrt(bc2.double()).float().reshape(1)


def _fp32_state(st: torch.Tensor, shape: list) -> bool:
    return st.dtype == torch.float32 and st.is_contiguous() and st.numel() == _numel(shape)


def unsupported(q: torch.Tensor, states: list, kind: str, hparams: list, shape: list, wbits: int, lbits: int,
                step: torch.Tensor, mu_interval: int) -> str | None:
    """None when a kernel covers this call of ``fqt::lwq_update``, else the reason."""
    if kind == "sgd":
        if hparams[1] != 0 and (len(states) != 1 or not _fp32_state(states[0], shape)):
            return "SGD momentum with 8-bit block-quantized state has no kernel"
        if hparams[1] == 0 and states:
            return "unexpected optimizer state for SGD without momentum"
    elif kind == "adamw":
        if len(states) != 2 or not all(_fp32_state(st, shape) for st in states):
            return "AdamW with 8-bit block-quantized states has no kernel"
    else:
        return f"optimizer {kind!r} has no kernel"
    if not shape:
        return "0-d parameter"
    E = 1
    for d in shape[1:]:
        E *= d
    if E > MAX_ROW:
        return f"row length {E} > MAX_ROW={MAX_ROW}"
    if (wbits <= 4 or lbits <= 4) and E % 2:
        return f"packed codes need an even row length, got {E}"
    if mu_interval > 0:
        t = int(step)
        if t == 1 or t % mu_interval == 0:
            return "importance level re-selection step (global mean of the update, decided on the host)"
    return None


def lwq_update(
    q: torch.Tensor, r: torch.Tensor, s: torch.Tensor, mu: torch.Tensor, grad: torch.Tensor, states: list,
    kind: str, hparams: list, shape: list, wbits: int, lbits: int, seed: int, stream: int, step: torch.Tensor,
    skip: torch.Tensor, refresh: bool, mu_interval: int,
) -> torch.Tensor:
    """``fqt::lwq_update`` for the covered cases (`unsupported` is None): updates q, r, s and the fp32 optimizer
    states in place, returns the op's stats ``[mean |dw|/s, saturated fraction]``."""
    why = unsupported(q, states, kind, hparams, shape, wbits, lbits, step, mu_interval)
    if why:
        raise ValueError(f"lwq_update kernel: {why}")
    stats = torch.zeros(2, dtype=torch.float32, device=q.device)
    if bool(skip):
        return stats
    R = shape[0]
    E = _numel(shape) // R
    levels = _lwq.polyline_levels(lbits, int(mu)).to(q.device)
    M = _lwq.residual_max(lbits)
    qmax = _lwq.weight_qmax(wbits)
    block_e = max(2, triton.next_power_of_2(E))
    block_r = max(1, min(triton.next_power_of_2(R), TILE_ELEMS // block_e))
    per_row = torch.empty(R, 2, dtype=torch.float32, device=q.device)
    step_t = step.to(device=q.device, dtype=torch.int64).reshape(())
    grid = (triton.cdiv(R, block_r),)
    common = dict(M=M, REFRESH=refresh, W_PACKED=wbits <= 4, L_PACKED=lbits <= 4, BLOCK_R=block_r, BLOCK_E=block_e,
                  num_warps=4, enable_fp_fusion=False)
    enc = (qmax, _lwq.DEFAULT_HEADROOM * qmax, mix32_int(seed ^ GOLDEN), stream & 0xFFFFFFFF)
    if kind == "sgd":
        lr, momentum, dampening, wd, nesterov = (float(h) for h in hparams)
        buf = states[0] if momentum != 0 else per_row_dummy(q)
        _lwq_sgd_kernel[grid](
            q, r, s, grad.contiguous(), buf, levels, per_row, step_t, R, E, lr, wd, momentum, 1 - dampening, *enc,
            HAS_WD=wd != 0, MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), **common)
    else:
        lr, b1, b2, eps, wd = (float(h) for h in hparams)
        step_size, bc2_sqrt = (t.to(q.device) for t in adamw_step_scalars(hparams, step))
        _lwq_adamw_kernel[grid](
            q, r, s, grad.contiguous(), states[0], states[1], levels, per_row, step_t, step_size, bc2_sqrt, R, E,
            1 - lr * wd, b1, 1 - b1, b2, 1 - b2, eps, *enc, **common)
    n = _numel(shape)
    stats[0] = per_row[:, 0].sum() / n
    stats[1] = per_row[:, 1].sum() / n
    return stats


def per_row_dummy(t: torch.Tensor) -> torch.Tensor:
    """A placeholder pointer for an unused state argument."""
    return torch.empty(1, dtype=torch.float32, device=t.device)


def _numel(shape: list) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
