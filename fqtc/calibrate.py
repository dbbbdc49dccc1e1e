"""Calibration for the automatic bit policy: per-GEMM gradient statistics from a few training steps.

Usage::

    cal = fqtc.calibrate(model, batches[:4], loss_fn)           # a few full-precision steps, no optimizer step
    opts = {"bits": "auto", "budget": 4.5, "calibration": cal}  # plus any other fqt options (rules, rounding, ...)
    model_q = torch.compile(model, backend="fqt", options=opts)

`calibrate` compiles the model with the ``fqt`` backend in full precision (so the GEMM sites, their names and
roles are exactly those the quantized compile will see), runs forward + backward on each batch, and observes
every backward GEMM through the backend's observer hook (`fqtc.backend.fqt_backend`'s ``observer``). For each
``grad_output`` quantizer (one per ``grad_input``/``grad_weight`` GEMM) it records, averaged over the steps:

- ``variance[b]`` for b = 2..8: the variance the quantizer would add to the GEMM's product at b bits. The GEMM is
  written ``G @ B`` with ``G`` the gradient (transposed when it is the second operand) and scales grouped by rows
  of ``G`` (constant along the reduction axis: the integer-GEMM layout fqtc's default granularities give) or one
  scale (``granularity="tensor"``). A per-element variance ``v[m, k]`` adds ``sum_{m,k} v[m,k] ||B[k,:]||^2``.
  ``v`` is exact for stochastic rounding given the scales, ``s^2 f (1-f)`` with ``s = amax/(2^(b-1)-1)`` and f
  the fractional part of ``x/s`` (<= s^2/4, papers.md Sec. 1); ``s^2/12`` for nearest rounding (the additive
  noise model); the variance bounds of `fqtc.quant.gradq` for BHQ and AQ.
- ``out_sq``: the squared norm of the product, which `fqtc.passes.autobits.propagation_weights` uses to carry an
  activation gradient's noise to the parameter gradients upstream.
- ``numel_expr``: the gradient's element count, symbolic in the batch/sequence sizes when compiled with
  ``dynamic=True`` (the default), so the budget's weights hold across shapes.

The quantizer, rounding and grouping each unit was calibrated for come from ``options`` (the same options the
quantized compile will use; ``bits`` and the ``bits="auto"`` options are ignored here); a compile whose specs differ
raises instead of using stale statistics. Parameter ``.grad`` values are restored afterwards.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from fqtc.passes.calib_stats import (  # noqa: F401  (re-exported: fqtc.calibrate's public names)
    CHOICES,
    FP_OBSERVER_OPTIONS,
    Calibration,
    GradientStats,
    UnitStats,
    conv_grad_input_variance,
    conv_grad_weight_variance,
    element_variance,
    gemm_variance,
)


def _default_loss(model: Callable, batch: Any) -> torch.Tensor:
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def calibrate(model: torch.nn.Module, batches: Iterable[Any],
              loss_fn: Callable[[Callable, Any], torch.Tensor] | None = None,
              options: Mapping[str, Any] | None = None, dynamic: bool = True, propagation: str = "model",
              draws: int = 8) -> Calibration:
    """Run forward + backward on each batch in full precision and record per-GEMM gradient statistics.

    Args:
        model: the module to be trained with ``bits="auto"``.
        batches: a few batches (2-8 is typical); each is passed to ``loss_fn``.
        loss_fn: ``loss_fn(compiled_model, batch) -> scalar loss``; default: ``batch = (x, y)`` and
            cross-entropy of ``model(x)`` (flattened to ``(-1, classes)``) against ``y``.
        options: the fqt options the quantized compile will use (quantizer/rounding/granularity rules are honored;
            ``bits`` and the ``bits="auto"`` options, ``budget``, ``calibration``, ``auto_objective``,
            ``auto_min_bits``, are ignored here).
        dynamic: compile with symbolic shapes so element counts are symbolic in batch/sequence sizes.
        propagation: how a quantizer's variance is carried to the parameter gradients: ``"model"`` (the
            first-order graph model of `fqtc.passes.autobits.propagation_weights`, no extra cost) or
            ``"measured"`` (one extra compile and ``draws`` steps per unit on the first batch, see
            `_measure_propagation`; recommended for models with residual paths, e.g. transformers). Both record
            the factors of both ``auto_objective`` values, so one calibration serves either.
    """
    if propagation not in ("model", "measured"):
        raise ValueError(f"fqtc.calibrate: propagation {propagation!r}; allowed: 'model', 'measured'")
    from fqtc.backend import capture, fqt_backend

    loss_fn = loss_fn or _default_loss
    stats = GradientStats(options)
    params = [p for p in model.parameters()]
    saved = [p.grad for p in params]
    compiled = torch.compile(model, backend=partial(fqt_backend, options=FP_OBSERVER_OPTIONS,
                                                    observer=stats.observe), dynamic=dynamic)
    steps = 0
    first = None
    with capture() as cgs:
        for batch in batches:
            first = batch if first is None else first
            loss = loss_fn(compiled, batch)
            loss.backward()
            steps += 1
    if steps == 0:
        raise ValueError("fqtc.calibrate: no batches given; pass a few (2-8) training batches")
    cal = stats.result(cgs, steps)
    if propagation == "measured":
        _measure_propagation(model, first, loss_fn, cal.units, stats.spec_opts, draws)
    for p, gr in zip(params, saved):
        p.grad = gr
    return cal


def _measure_propagation(model: torch.nn.Module, batch: Any, loss_fn: Callable, acc: dict[tuple[str, str], UnitStats],
                         spec_opts: dict, draws: int, bits: int = 4) -> None:
    """Measure how much of each quantizer's added variance reaches the parameter gradients.

    For each (module, role), compile the model with only that ``grad_output`` quantized (at ``bits``, with its
    calibrated spec), take the parameter gradients on ``batch`` over ``draws`` stochastic-rounding streams, and set
    ``propagation = measured total variance / estimated variance of the GEMM product`` (the ``"absolute"``
    objective's factor) and ``propagation_relative = sum_p measured variance of parameter p's gradient / ||g_p||^2
    over the same estimated variance`` (the ``"relative"`` objective's factor), ``g_p`` the full-precision gradient
    on ``batch``, over every parameter with a nonzero gradient (biases and norms included: their gradients carry
    the noise too). The first-order relative-noise model (`fqtc.passes.autobits.propagation_weights`)
    overestimates the noise where a residual path adds a large gradient the GEMMs do not see (measured 11x on a
    2-layer char-GPT); measuring costs one compile and ``draws`` steps per unit.
    """
    from fqtc.backend import fqt_backend
    from fqtc.config import Rule

    groups: dict[tuple[str, str], list[UnitStats]] = defaultdict(list)
    for st in acc.values():
        groups[(st.module or st.site, st.role)].append(st)
    base = {k: v for k, v in spec_opts.items() if k not in ("rules", "keep_fp")}
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()  # eager FP32: the signal each parameter's noise is compared with
    signal = [float(p.grad.double().pow(2).sum()) if p.grad is not None else 0.0 for p in params]
    for (mod, role), sts in groups.items():
        quantizer, rounding, grouping = sts[0].spec
        gran = "tensor" if grouping == "tensor" else None  # None: the role's default (integer-GEMM) grouping
        rule = Rule(module=mod.replace("[", "[[]").replace("*", "[*]").replace("?", "[?]"), role=role,
                    operand="grad_output", bits=bits, rounding=rounding, quantizer=quantizer, granularity=gran)
        opts = {**base, "bits": "fp", "rules": [rule]}
        torch._dynamo.reset()  # a fresh graph per unit: Dynamo would otherwise reuse the previous unit's
        fn = torch.compile(model, backend=partial(fqt_backend, options=opts))
        grads: list[list[torch.Tensor]] = [[] for _ in params]
        for _ in range(draws):
            model.zero_grad(set_to_none=True)
            loss_fn(fn, batch).backward()
            for i, p in enumerate(params):
                if p.grad is not None:
                    grads[i].append(p.grad.reshape(-1).double())
        var = [float(torch.stack(g).var(dim=0).sum()) if len(g) > 1 else 0.0 for g in grads]
        measured = sum(var)
        relative = sum(v / s for v, s in zip(var, signal) if s > 0)
        local = sum(st.variance[bits] for st in sts)
        for st in sts:
            st.propagation = measured / local if local > 0 else 1.0
            st.propagation_relative = relative / local if local > 0 else 0.0
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
