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
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from fqtc.config import AUTO_OPTION_KEYS, FQTConfig

CHOICES: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
_LINEAR_GEMMS = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default)


@dataclass
class UnitStats:
    """Calibrated statistics of one ``grad_output`` quantizer (one backward GEMM)."""

    site: str
    role: str
    module: str
    module_type: str
    spec: tuple[str, str, str]  # (quantizer, rounding, "tensor" | "group") it was calibrated for
    variance: dict[int, float] = field(default_factory=dict)  # bits -> added variance of the product
    out_sq: float = 0.0
    numel: int = 0
    numel_expr: str = "0"
    symbols: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    propagation: float | None = None  # measured factor to the parameter gradients (propagation="measured")
    # measured factor to the sum of per-parameter-tensor noise-to-signal ratios (auto_objective="relative")
    propagation_relative: float | None = None


@dataclass
class Calibration:
    """Statistics per (site, role) for the automatic bit policy; pass as ``options["calibration"]``."""

    units: dict[tuple[str, str], UnitStats]
    steps: int

    def table(self) -> str:
        """One line per unit: site, role, element count, variance at 4 and 8 bits, squared product norm."""
        lines = [f"{'site':<24} {'role':<12} {'numel':>14} {'V@4':>10} {'V@8':>10} {'|out|^2':>10}"]
        for (site, role), st in self.units.items():
            lines.append(f"{site:<24} {role:<12} {st.numel_expr:>14} {st.variance[4]:>10.3g} "
                         f"{st.variance[8]:>10.3g} {st.out_sq:>10.3g}")
        return "\n".join(lines)


def _grouping(granularity: str) -> str:
    return "tensor" if granularity == "tensor" else "group"


def element_variance(g: torch.Tensor, bits: int, quantizer: str, rounding: str,
                     reduce_dims: Sequence[int]) -> torch.Tensor:
    """Per-element variance of quantizing ``g`` at ``bits`` with one scale per group of ``reduce_dims``.

    Pure tensor function. Stochastic rounding: exact ``s^2 f(1-f)`` given the scales; nearest: ``s^2/12``.
    """
    from fqtc.quant import gradq
    from fqtc.quant.uniform import absmax_scale

    g = g.float()
    reduce = list(range(g.dim())) if quantizer == "ptq" else [d % g.dim() for d in reduce_dims]
    if quantizer in ("uniform", "ptq", "psq", "scq"):
        s = absmax_scale(g, bits, reduce)  # the scales the uniform quantizer would use
        if rounding == "nearest":
            return (s * s / 12).expand_as(g)
        return gradq.sr_variance(g, s)
    if quantizer in ("bhq", "aq"):
        q = gradq.grad_quantize(g, quantizer, bits, reduce, "stochastic")
        return gradq.variance_bound(g, q, quantizer, reduce)
    raise ValueError(f"fqt: bits='auto' needs a variance estimate for grad quantizer {quantizer!r}; it has none "
                     "(aq_topk is biased). Use uniform/ptq/psq/scq/bhq/aq, or fix these bits with a rule")


def gemm_variance(g: torch.Tensor, other: torch.Tensor, var: torch.Tensor) -> float:
    """Added variance of ``g @ other`` when ``g``'s elements carry independent noise of variance ``var``:
    sum_{m,k} var[..., m, k] * ||other[..., k, :]||^2 (batched over leading dims)."""
    gain = other.float().pow(2).sum(-1)  # (..., K)
    return float((var * gain.unsqueeze(-2)).sum())


def conv_grad_input_variance(var: torch.Tensor, weight: torch.Tensor, groups: int) -> float:
    """Added variance of a conv's ``grad_input`` when ``grad_output`` (N, C, H, W) carries noise ``var``: each
    element reaches the input gradient through every tap of its output channel's filter, sum var * ||W[c]||^2
    (exact away from the padding border, where taps fall outside and this slightly overestimates)."""
    return float((var.sum((0, 2, 3)) * weight.float().pow(2).sum((1, 2, 3))).sum())


def conv_grad_weight_variance(var: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                              padding: Sequence[int], dilation: Sequence[int], groups: int) -> float:
    """Added variance of a conv's ``grad_weight``: element (n, c, h, w) of ``grad_output`` multiplies the input
    patch under output position (h, w) (in c's channel group), so it adds var * ||patch||^2."""
    n, c = var.shape[:2]
    kh, kw = weight.shape[2:]
    patches = F.unfold(x.float().pow(2), (kh, kw), dilation=list(dilation), padding=list(padding),
                       stride=list(stride))  # (N, Cin*kh*kw, L)
    energy = patches.view(n, groups, -1, patches.shape[-1]).sum(2)  # (N, groups, L)
    return float((var.reshape(n, groups, c // groups, -1) * energy.unsqueeze(2)).sum())


def _shape_expr(node: Any) -> str | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if not isinstance(val, torch.Tensor):
        return None
    return "*".join(f"({d})" for d in val.shape) if val.dim() else "1"


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
    from fqtc.fx_utils import graph_fake_mode

    loss_fn = loss_fn or _default_loss
    spec_opts = {k: v for k, v in (options or {}).items() if k != "bits" and k not in AUTO_OPTION_KEYS}
    spec_cfg = FQTConfig.from_options(spec_opts)
    acc: dict[tuple[str, str], UnitStats] = {}
    sums: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: defaultdict(float))

    def unit(rec: dict, role: str, g_node: Any, g: torch.Tensor) -> tuple[tuple[str, str], Any] | None:
        """Stats entry and spec of one (site, role); None when that gradient stays in full precision."""
        key = (rec["site"], role)
        mod = rec["module"] or rec["site"]
        spec, _ = spec_cfg.resolve(mod, role, "grad_output", rec.get("module_type", ""))
        if spec is None:
            return None
        if key not in acc:
            acc[key] = UnitStats(rec["site"], role, rec["module"], rec.get("module_type", ""),
                                 (spec.quantizer, spec.rounding, _grouping(spec.granularity)),
                                 numel_expr=_shape_expr(g_node) or str(g.numel()))
        s = sums[key]
        s["numel"] += g.numel()
        s["n"] += 1
        return key, spec

    def observe(node: Any, args: tuple, out: Any) -> None:
        rec = node.meta["fqt"]
        with torch.no_grad():
            if node.target in _LINEAR_GEMMS and rec.get("role") in ("grad_input", "grad_weight"):
                names = list(rec.get("operands", {}))
                if "grad_output" not in names:
                    return
                a_i = 1 if node.target == torch.ops.aten.addmm.default else 0
                idx = names.index("grad_output")
                a, b = args[a_i], args[a_i + 1]
                g_node = node.args[a_i + idx]
                g, other = (a, b) if idx == 0 else (b.transpose(-1, -2), a.transpose(-1, -2))
                got = unit(rec, rec["role"], g_node, g)
                if got is None:
                    return
                key, spec = got
                reduce = list(range(g.dim())) if spec.granularity == "tensor" else [-1]
                for bits in CHOICES:
                    var = element_variance(g, bits, spec.quantizer, spec.rounding, reduce)
                    sums[key][bits] += gemm_variance(g, other, var)
                sums[key]["out_sq"] += float(out.float().pow(2).sum())
            elif node.target == torch.ops.aten.convolution_backward.default and not args[7]:
                from fqtc.passes.conv import conv_reduce_dims

                g, x, w = args[0], args[1], args[2]
                stride, padding, dilation, groups = args[4], args[5], args[6], args[9]
                for role, i in (("grad_input", 0), ("grad_weight", 1)):
                    if out[i] is None:
                        continue
                    got = unit(rec, role, node.args[0], g)
                    if got is None:
                        continue
                    key, spec = got
                    reduce = conv_reduce_dims(spec, "grad_output", f"site {rec['site']!r}")
                    for bits in CHOICES:
                        var = element_variance(g, bits, spec.quantizer, spec.rounding, reduce)
                        sums[key][bits] += (conv_grad_input_variance(var, w, groups) if role == "grad_input" else
                                            conv_grad_weight_variance(var, x, w, stride, padding, dilation, groups))
                    sums[key]["out_sq"] += float(out[i].float().pow(2).sum())

    params = [p for p in model.parameters()]
    saved = [p.grad for p in params]
    compiled = torch.compile(model, backend=partial(fqt_backend, options={"bits": "fp", "compiler": "eager"},
                                                    observer=observe), dynamic=dynamic)
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
    if not acc:
        raise ValueError("fqtc.calibrate: no backward GEMM was observed (does the loss depend on a Linear/matmul "
                         "with parameters that require grad?)")
    symbols: dict[str, int] = {}
    for cg in cgs:
        if cg.joint is None:
            continue
        fm = graph_fake_mode(cg.joint.graph)
        env = getattr(fm, "shape_env", None) if fm is not None else None
        if env is not None:
            vals = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val  # renamed
            symbols.update({str(k): int(v) for k, v in vals.items()})
    for key, st in acc.items():
        s = sums[key]
        n = s["n"]
        st.variance = {b: s[b] / n for b in CHOICES}
        st.out_sq = s["out_sq"] / n
        st.numel = int(s["numel"] / n)
        st.steps = int(n)
        st.symbols = dict(symbols)
    if propagation == "measured":
        _measure_propagation(model, first, loss_fn, acc, spec_opts, draws)
    for p, gr in zip(params, saved):
        p.grad = gr
    return Calibration(acc, steps)


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
