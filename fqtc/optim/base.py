"""Shared machinery of fqtc's optimizers: fused LWQ updates for `LatentWeight` parameters, plain updates for the rest.

Each step: one finiteness check over all gradients (``found_inf``, a 0-d bool tensor also exposed as
``optimizer.found_inf`` so a loss scaler can react); then one ``fqt::lwq_update`` per latent parameter (decode ->
optimizer math -> re-encode with stochastic rounding, skipped inside the op when ``found_inf``) and the same
optimizer math on plain parameters (biases, norms), left unchanged when ``found_inf``. No host synchronization is
needed, so ``torch.compile(optimizer.step, backend="fqt")`` traces the whole step into one graph.

Optimizer states are fp32 (``state_bits=32``) or 8-bit block-quantized (``state_bits=8``, `fqtc.quant.lwq`
``quantize_state``) for latent and plain parameters alike.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from fqtc.ops import lwq as _ops
from fqtc.optim.latent import LatentWeight
from fqtc.quant import lwq as _lwq

# Paper: the importance level is re-selected every 100 steps (papers.md section 3).
DEFAULT_MU_INTERVAL = 100
# fqtc's calibrated rho thresholds (`fqtc.quant.lwq.MU_THRESHOLDS`); "paper" selects the paper's.
DEFAULT_MU_RULE = "fqtc"


class LatentOptimizer(torch.optim.Optimizer):
    """Base class: subclasses set ``kind`` and implement ``_hparams(group)`` (the op's float hyperparameters)."""

    kind: str = ""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        sb = defaults.get("state_bits", 32)
        if sb not in (8, 32):
            raise ValueError(f"{type(self).__name__}: state_bits must be 32 (fp32 states) or 8 (8-bit block-wise "
                             f"quantized states), got {sb!r}")
        super().__init__(params, defaults)
        self.found_inf: Tensor = torch.zeros((), dtype=torch.bool)
        self.last_stats: dict[int, Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch.optim's; a group may set its own importance-level rule, as ``mu_rule`` (a name or three
        thresholds) or as resolved ``mu_thresholds``. Both are checked here: an unknown rule must not be ignored."""
        if "mu_rule" in param_group or "mu_thresholds" in param_group:
            param_group = dict(param_group)
            rule = param_group.pop("mu_rule", param_group.get("mu_thresholds"))
            param_group["mu_thresholds"] = list(_lwq.mu_thresholds(rule))
        super().add_param_group(param_group)

    def _hparams(self, group: dict[str, Any]) -> list[float]:
        raise NotImplementedError

    def _step_hparams(self, group: dict[str, Any]) -> tuple[list[float], Tensor | None]:
        """``(hparams, lr tensor)`` for one step. A group whose ``lr`` is a tensor (torch.optim's convention for
        compiled steps with LR schedules) passes it as a tensor and puts 0.0 in ``hparams[0]``, which the ops
        ignore when the tensor is given: reading the tensor's value here would bake it into a compiled step."""
        lr = group["lr"]
        if isinstance(lr, Tensor):
            return self._hparams({**group, "lr": 0.0}), lr
        return self._hparams(group), None

    def _init_state(self, p: Tensor, group: dict[str, Any], hp: list[float]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
            state["buffers"] = _ops.state_tensors(self.kind, hp, list(p.shape), group["state_bits"], p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return loss
        # inf/nan anywhere skips the whole step (as GradScaler does), with no host sync
        found_inf = torch.stack([~torch.isfinite(g).all() for g in grads]).any()
        self.found_inf = found_inf
        keep = (~found_inf).to(torch.int64)
        for group in self.param_groups:
            hp, lr_t = self._step_hparams(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p, group, hp)
                state["step"].add_(keep)
                if isinstance(p, LatentWeight):
                    stats = torch.ops.fqt.lwq_update.default(
                        p.q, p.r, p.s, p.mu, p.grad, state["buffers"], self.kind, hp, list(p.shape), p.wbits,
                        p.lbits, group["seed"], p.stream, state["step"], found_inf, group["refresh"],
                        group["mu_interval"], lr_t, group.get("mu_thresholds"))
                    state["stats"] = stats
                else:
                    self._plain_step(p, state, hp, found_inf, lr_t)
        return loss

    def _plain_step(self, p: Tensor, state: dict[str, Any], hp: list[float], found_inf: Tensor,
                    lr_t: Tensor | None = None) -> None:
        old_p = p.detach().clone()
        old_buf = [b.clone() for b in state["buffers"]]
        _ops.plain_update(p, p.grad, state["buffers"], self.kind, hp, state["step"].clamp(min=1), lr_t)
        p.detach().copy_(torch.where(found_inf, old_p, p.detach()))
        for b, ob in zip(state["buffers"], old_buf):
            b.copy_(torch.where(found_inf, ob, b))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch.optim's, but keeps the stored dtypes (8-bit codes must not be cast to the parameter's float)."""
        saved = copy.deepcopy(state_dict["state"])
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, st in saved.items():
            p = params[int(idx)]
            self.state[p] = {k: _to_device(v, p.device) for k, v in st.items()}


def _to_device(v: Any, device: torch.device) -> Any:
    if isinstance(v, Tensor):
        return v.to(device)
    if isinstance(v, (list, tuple)):
        return type(v)(_to_device(x, device) for x in v)
    return v


def _check_lr(name: str, lr: Any) -> None:
    """A learning rate is a number or a one-element float tensor (for compiled steps under an LR schedule)."""
    if isinstance(lr, Tensor) and (lr.numel() != 1 or not lr.is_floating_point()):
        raise ValueError(f"{name}: a tensor lr must be a one-element float tensor (e.g. torch.tensor(1e-3)), got "
                         f"shape {list(lr.shape)} dtype {lr.dtype}")


def _common_defaults(state_bits: int, seed: int, refresh: bool, mu_interval: int,
                     mu_rule: str | Sequence[float] = DEFAULT_MU_RULE) -> dict[str, Any]:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int (the stochastic-rounding stream key), got {seed!r}")
    if not isinstance(mu_interval, int) or mu_interval < 0:
        raise ValueError(f"mu_interval must be a non-negative int (0 keeps mu fixed), got {mu_interval!r}")
    # the group holds the resolved thresholds (saved with the optimizer's state dict); a group loaded from a
    # checkpoint without them uses the op's default, fqtc's rule
    thresholds = list(_lwq.mu_thresholds(mu_rule))
    return {"state_bits": state_bits, "seed": seed, "refresh": bool(refresh), "mu_interval": mu_interval,
            "mu_thresholds": thresholds}
