"""``fqt::observe``: per-step quantization SQNR and range of chosen operands (option ``log_sqnr``).

The rewrite pass (`fqtc.passes.rewrite`) inserts the op after the quantizers of the sites ``log_sqnr`` names; each
call logs the operand's quantization SQNR and range to the ``fqtc.debug`` logger and appends a record that
`sqnr_log` (re-exported as `fqtc.inspect.sqnr_log`) returns (docs/inspect_export.md, "Debug switches").
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque

import torch
from torch import Tensor

logger = logging.getLogger("fqtc.debug")

__all__ = ["clear_sqnr_log", "observe", "sqnr_db", "sqnr_log"]


def sqnr_db(ref: Tensor, x: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, ``20*log10(||ref|| / ||ref - x||)`` (torchao ``compute_error``)."""
    ref, x = ref.detach().double(), x.detach().double()
    err = (ref - x).norm()
    if err == 0:
        return math.inf
    if ref.norm() == 0:
        return -math.inf
    return float(20 * torch.log10(ref.norm() / err))


_log_lock = threading.Lock()
_SQNR_LOG: deque[dict] = deque(maxlen=100_000)


@torch.library.custom_op("fqt::observe", mutates_args=())
def observe(x: Tensor, codes: Tensor, scale: Tensor, step: Tensor, tag: str) -> Tensor:
    """Log the quantization SQNR and range of one operand; return a copy of ``scale``.

    The op sits between a quantizer's scale and its consumers (the scale is tiny, so the copy is free): returning
    a value the GEMM reads keeps it alive through dead-code elimination and the partitioner, which would drop a
    node with no users. Debug only: it synchronises (``.item()``) on every call.
    """
    deq = codes.float() * scale
    entry = {
        "step": int(step.item()), "tag": tag, "sqnr_db": sqnr_db(x.float(), deq),
        "amax": float(x.detach().abs().max()) if x.numel() else 0.0,
        "scale_min": float(scale.min()), "scale_max": float(scale.max()),
        "saturated": float((codes.abs() == codes.abs().max()).float().mean()) if codes.numel() else 0.0,
    }
    with _log_lock:
        _SQNR_LOG.append(entry)
    logger.info("fqt step %d %s: sqnr %.2f dB, amax %.4g, scale [%.4g, %.4g]", entry["step"], tag,
                entry["sqnr_db"], entry["amax"], entry["scale_min"], entry["scale_max"])
    return scale.clone()


@observe.register_fake
def _(x, codes, scale, step, tag):
    return torch.empty_like(scale)


def sqnr_log(clear: bool = False) -> list[dict]:
    """Records logged by ``log_sqnr`` sites so far (oldest first): step, tag (``site/role/operand``), sqnr_db,
    amax, scale_min, scale_max, saturated (fraction of codes at the largest magnitude). ``clear`` empties it."""
    with _log_lock:
        out = list(_SQNR_LOG)
        if clear:
            _SQNR_LOG.clear()
    return out


def clear_sqnr_log() -> None:
    sqnr_log(clear=True)
