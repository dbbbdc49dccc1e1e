"""`fqtc.optim.SGD`: torch.optim.SGD's update, fused with LWQ re-encoding for `LatentWeight` parameters."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from fqtc.optim.base import DEFAULT_MU_INTERVAL, DEFAULT_MU_RULE, LatentOptimizer, _check_lr, _common_defaults


class SGD(LatentOptimizer):
    """SGD with momentum, weight decay and Nesterov, as ``torch.optim.SGD`` (same formulas, same first step).

    Args:
        params: parameters or parameter groups; `LatentWeight` parameters get one fused ``fqt::lwq_update`` each.
        lr, momentum, dampening, weight_decay, nesterov: as in ``torch.optim.SGD``. ``lr`` may be a one-element
            tensor (torch.optim's convention): a compiled step then reads it as an input, so an LR scheduler that
            updates it in place does not recompile the step.
        state_bits: 32 (fp32 momentum) or 8 (8-bit block-quantized momentum: 1 byte/param + 4 bytes/256 params).
        seed: key of the residuals' stochastic-rounding stream (with the step number and the parameter's stream).
        refresh: refresh per-row scales so integer codes never saturate (papers.md; leave on).
        mu_interval: steps between re-selections of the codebook's importance level (0: keep it).
        mu_rule: how a re-selection maps rho = grid step / mean update to the level: ``"fqtc"`` (default,
            thresholds 250 / 500 / 1000, measured on int4 fine-tuning), ``"paper"`` (16.2 / 36.5 / 75.8) or three
            increasing thresholds (`fqtc.quant.lwq.mu_thresholds`). Stored in each group as ``mu_thresholds``.
    """

    kind = "sgd"

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, state_bits: int = 32,
                 seed: int = 0, refresh: bool = True, mu_interval: int = DEFAULT_MU_INTERVAL,
                 mu_rule: str | Sequence[float] = DEFAULT_MU_RULE) -> None:
        _check_lr("SGD", lr)
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr, momentum and weight_decay must be >= 0, got lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        **_common_defaults(state_bits, seed, refresh, mu_interval, mu_rule))
        super().__init__(params, defaults)

    def _hparams(self, group: dict[str, Any]) -> list[float]:
        return [float(group["lr"]), float(group["momentum"]), float(group["dampening"]),
                float(group["weight_decay"]), float(bool(group["nesterov"]))]
