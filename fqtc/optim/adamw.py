"""`fqtc.optim.AdamW`: torch.optim.AdamW's update, fused with LWQ re-encoding for `LatentWeight` parameters."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from fqtc.optim.base import DEFAULT_MU_INTERVAL, DEFAULT_MU_RULE, LatentOptimizer, _check_lr, _common_defaults


class AdamW(LatentOptimizer):
    """AdamW with decoupled weight decay and bias correction, as ``torch.optim.AdamW`` (amsgrad not supported).

    Args:
        params: parameters or parameter groups; `LatentWeight` parameters get one fused ``fqt::lwq_update`` each.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``; ``lr`` may be a one-element tensor (as in
            `fqtc.optim.SGD`: no recompiles of a compiled step under an LR schedule).
        state_bits: 32 (fp32 m and v) or 8 (m and sqrt(v) 8-bit block-quantized, as the LWQ authors' code).
        seed, refresh, mu_interval, mu_rule: as in `fqtc.optim.SGD`.
    """

    kind = "adamw"

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 state_bits: int = 32, seed: int = 0,
                 refresh: bool = True, mu_interval: int = DEFAULT_MU_INTERVAL,
                 mu_rule: str | Sequence[float] = DEFAULT_MU_RULE) -> None:
        _check_lr("AdamW", lr)
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: need lr, eps, weight_decay >= 0 and betas in [0, 1), got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}, betas={betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        **_common_defaults(state_bits, seed, refresh, mu_interval, mu_rule))
        super().__init__(params, defaults)

    def _hparams(self, group: dict[str, Any]) -> list[float]:
        b1, b2 = group["betas"]
        return [float(group["lr"]), float(b1), float(b2), float(group["eps"]), float(group["weight_decay"])]
