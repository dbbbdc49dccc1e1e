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
from fqtc.optim import sharded as _sharded
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

    def _init_state(self, p: Tensor, group: dict[str, Any], hp: list[float], local: Tensor) -> dict[str, Any]:
        """The state of ``p``, sized like its ``local`` tensor (the rank's shard of a sharded parameter)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64, device=local.device)
            state["buffers"] = _ops.state_tensors(self.kind, hp, list(local.shape), group["state_bits"],
                                                  local.device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss
        # inf/nan anywhere skips the whole step (as GradScaler does), with no host sync; a sharded parameter's
        # shards agree through one MAX all-reduce (fqtc.optim.sharded)
        found_inf = torch.stack([~torch.isfinite(_sharded.local(p.grad)).all() for p in params]).any()
        found_inf = _sharded.agree_found_inf(found_inf, params)
        self.found_inf = found_inf
        keep = (~found_inf).to(torch.int64)
        for group in self.param_groups:
            hp, lr_t = self._step_hparams(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                local, grad = _sharded.local(p), _sharded.local(p.grad)
                state = self._init_state(p, group, hp, local)
                state["step"].add_(keep)
                if isinstance(local, LatentWeight):
                    state["stats"] = self._latent_step(p, local, grad, state, group, hp, lr_t, found_inf)
                else:
                    self._plain_step(local, grad, state, hp, found_inf, lr_t)
        return loss

    def _latent_step(self, p: Tensor, lw: LatentWeight, grad: Tensor, state: dict[str, Any], group: dict[str, Any],
                     hp: list[float], lr_t: Tensor | None, found_inf: Tensor) -> Tensor:
        """One ``fqt::lwq_update`` of a latent parameter; for a row shard (FSDP2) also its element offset in the
        whole parameter and, at importance-level re-selection steps, the level the shards chose together."""
        shape = list(lw.shape)
        offset, mu_next = 0, -1
        if _sharded.is_sharded(p):
            offset = _sharded.element_offset(p)
            mu_next = self._shared_mu(p, lw, grad, state, group, hp, lr_t, found_inf)
        return torch.ops.fqt.lwq_update.default(
            lw.q, lw.r, lw.s, lw.mu, grad, state["buffers"], self.kind, hp, shape, lw.wbits, lw.lbits, group["seed"],
            lw.stream, state["step"], found_inf, group["refresh"], group["mu_interval"], lr_t,
            group.get("mu_thresholds"), offset, mu_next)

    def _shared_mu(self, p: Tensor, lw: LatentWeight, grad: Tensor, state: dict[str, Any], group: dict[str, Any],
                   hp: list[float], lr_t: Tensor | None, found_inf: Tensor) -> int:
        """The importance level of a sharded latent parameter at a re-selection step (-1 elsewhere): rho of the
        whole parameter, from every shard's sums, so all shards keep one level (one codebook per parameter)."""
        interval, t = group["mu_interval"], int(state["step"])
        if interval <= 0 or not (t == 1 or t % interval == 0) or bool(found_inf):
            return -1
        sums = _ops.update_magnitude(lw.q, lw.r, lw.s, lw.mu, grad, state["buffers"], self.kind, hp, list(lw.shape),
                                     lw.wbits, lw.lbits, state["step"], lr_t)
        d_sum, s_sum, n, rows = (float(v) for v in _sharded.sum_over_shards(sums, p))
        mean_delta = d_sum / n
        rho = (s_sum / rows) / mean_delta if mean_delta > 0 else float("inf")
        return _lwq.select_mu(rho, lw.lbits, group.get("mu_thresholds"))

    def _plain_step(self, p: Tensor, grad: Tensor, state: dict[str, Any], hp: list[float], found_inf: Tensor,
                    lr_t: Tensor | None = None) -> None:
        old_p = p.detach().clone()
        old_buf = [b.clone() for b in state["buffers"]]
        _ops.plain_update(p, grad, state["buffers"], self.kind, hp, state["step"].clamp(min=1), lr_t)
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
