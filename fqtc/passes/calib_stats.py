"""Per-GEMM gradient statistics for the automatic bit policy (docs/bit_assignment.md, "Variance estimates"):
`GradientStats` observes the backward GEMMs of full-precision fqt graphs (the backend's ``observer`` hook) and
returns a `Calibration`. `fqtc.calibrate` drives it over given batches; the backend drives it over a model's first
training steps when ``bits="auto"`` comes without ``calibration`` (online calibration). Pure statistics on the
observed tensors and the GEMM records in ``node.meta["fqt"]``; no graph rewriting."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from fqtc.config import AUTO_OPTION_KEYS, BitConfig, FQTConfig

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


# Options of the full-precision graphs the statistics are observed on (the observer needs the FX-module compiler).
FP_OBSERVER_OPTIONS: dict[str, Any] = {"bits": "fp", "compiler": "eager"}


class GradientStats:
    """Collects the per-(site, role) gradient statistics of `calibrate` from the backward GEMMs of full-precision
    fqt graphs: pass `observe` as the backend's ``observer`` (with `FP_OBSERVER_OPTIONS`), run training steps, then
    call `result`. The fqt backend uses it directly for ``bits="auto"`` without ``calibration`` (online
    calibration, docs/bit_assignment.md)."""

    def __init__(self, options: Mapping[str, Any] | FQTConfig | None = None) -> None:
        # the quantizer specs come from the options; "bits" and the bits="auto" options do not matter here
        if isinstance(options, FQTConfig):
            self.spec_opts: dict[str, Any] = {}
            self.spec_cfg = dataclasses.replace(options, bits=BitConfig(), budget=None, calibration=None)
        else:
            self.spec_opts = {k: v for k, v in (options or {}).items() if k != "bits" and k not in AUTO_OPTION_KEYS}
            self.spec_cfg = FQTConfig.from_options(self.spec_opts)
        self.acc: dict[tuple[str, str], UnitStats] = {}
        self.sums: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: defaultdict(float))

    def steps_seen(self) -> int:
        """Backward passes observed so far (the most any unit was observed)."""
        return int(max((s["n"] for s in self.sums.values()), default=0))

    def _unit(self, rec: dict, role: str, g_node: Any, g: torch.Tensor) -> tuple[tuple[str, str], Any] | None:
        """Stats entry and spec of one (site, role); None when that gradient stays in full precision."""
        key = (rec["site"], role)
        mod = rec["module"] or rec["site"]
        spec, _ = self.spec_cfg.resolve(mod, role, "grad_output", rec.get("module_type", ""))
        if spec is None:
            return None
        if key not in self.acc:
            self.acc[key] = UnitStats(rec["site"], role, rec["module"], rec.get("module_type", ""),
                                      (spec.quantizer, spec.rounding, _grouping(spec.granularity)),
                                      numel_expr=_shape_expr(g_node) or str(g.numel()))
        s = self.sums[key]
        s["numel"] += g.numel()
        s["n"] += 1
        return key, spec

    def observe(self, node: Any, args: tuple, out: Any) -> None:
        """The backend observer: records one backward GEMM's statistics."""
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
                got = self._unit(rec, rec["role"], g_node, g)
                if got is None:
                    return
                key, spec = got
                reduce = list(range(g.dim())) if spec.granularity == "tensor" else [-1]
                for bits in CHOICES:
                    var = element_variance(g, bits, spec.quantizer, spec.rounding, reduce)
                    self.sums[key][bits] += gemm_variance(g, other, var)
                self.sums[key]["out_sq"] += float(out.float().pow(2).sum())
            elif node.target == torch.ops.aten.convolution_backward.default and not args[7]:
                from fqtc.passes.conv import conv_reduce_dims

                g, x, w = args[0], args[1], args[2]
                stride, padding, dilation, groups = args[4], args[5], args[6], args[9]
                for role, i in (("grad_input", 0), ("grad_weight", 1)):
                    if out[i] is None:
                        continue
                    got = self._unit(rec, role, node.args[0], g)
                    if got is None:
                        continue
                    key, spec = got
                    reduce = conv_reduce_dims(spec, "grad_output", f"site {rec['site']!r}")
                    for bits in CHOICES:
                        var = element_variance(g, bits, spec.quantizer, spec.rounding, reduce)
                        self.sums[key][bits] += (
                            conv_grad_input_variance(var, w, groups) if role == "grad_input" else
                            conv_grad_weight_variance(var, x, w, stride, padding, dilation, groups))
                    self.sums[key]["out_sq"] += float(out[i].float().pow(2).sum())

    def result(self, cgs: Sequence[Any], steps: int) -> Calibration:
        """The `Calibration` of what was observed; ``cgs``: the compiled graphs (`fqtc.backend.capture`) whose shape
        symbols the element counts may use."""
        from fqtc.fx_utils import graph_fake_mode

        if not self.acc:
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
        for key, st in self.acc.items():
            s = self.sums[key]
            n = s["n"]
            st.variance = {b: s[b] / n for b in CHOICES}
            st.out_sq = s["out_sq"] / n
            st.numel = int(s["numel"] / n)
            st.steps = int(n)
            st.symbols = dict(symbols)
        return Calibration(self.acc, steps)


