"""`FQTConfig`: the validated configuration of fully quantized training, built from the ``options`` dict given to
``torch.compile(model, backend="fqt", options=...)`` by `FQTConfig.from_options`; it resolves the `QuantSpec` of
every GEMM operand (keep_fp, bit string default, rules, the gradient quantizer's layout). Every invalid option
raises ``ValueError`` naming the option, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from fqtc.config.spec import (
    _UNSET,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_GRANULARITY,
    MAX_BITS,
    MIN_BITS,
    ONE_BIT_QUANTIZERS,
    QUANTIZERS,
    ROTATIONS,
    ROUNDINGS,
    BitConfig,
    QuantSpec,
    Rule,
    _bad,
    _glob_escape,
    check_block_size,
)

_OPTION_KEYS = (
    "bits", "seed", "rounding", "forward_rounding", "grad_rounding", "rules", "keep_fp",
    "partitioner", "compiler", "grad_quantizer", "log_sqnr", "budget", "calibration", "auto_objective",
    "auto_min_bits", "save_fp", "rotate", "rotate_block", "calibration_steps", "granularity", "block_size",
    "layout",
)
# Values of option ``layout`` (fqtc/passes/layout.py, docs/outliers.md).
LAYOUTS: tuple[str, ...] = ("auto", "default", "token_rot")
# Saved-for-backward activations option ``save_fp`` can keep in fp32 (fqtc/passes/save_act.py), or "all".
SAVE_FP_KINDS: tuple[str, ...] = ("batch_norm", "layer_norm", "gelu", "silu", "softmax", "log_softmax", "tanh",
                                  "sigmoid")
# Objectives of the automatic gradient-bit policy (docs/bit_assignment.md): "relative" sums each parameter
# tensor's noise-to-signal ratio, "absolute" sums the added variance over all parameter-gradient elements.
AUTO_OBJECTIVES: tuple[str, ...] = ("relative", "absolute")
# Options that only mean something with bits="auto" (fqtc.calibrate strips them from the options it is given).
AUTO_OPTION_KEYS: tuple[str, ...] = ("budget", "calibration", "auto_objective", "auto_min_bits", "calibration_steps")


@dataclass(frozen=True)
class FQTConfig:
    """Everything the ``fqt`` backend needs to decide how each GEMM is quantized.

    Args:
        bits: weights/activations/gradients (and latent) bits, parsed from strings like ``"W8A8G8"``.
        seed: seed of the counter-based stochastic-rounding stream; the same seed replays the same bits.
        forward_rounding: rounding of ``input`` and ``weight`` operands (papers: deterministic).
        grad_rounding: rounding of ``grad_output`` (papers: stochastic, which makes the FQT gradient an unbiased
            estimator of the QAT gradient).
        grad_quantizer: the quantizer applied to ``grad_output``.
        rules: overrides, applied in order (later wins), see `Rule`.
        keep_fp: module-path globs or roles whose GEMMs stay in full precision (debug switch).
        log_sqnr: site/module-path globs or roles whose quantizers log their SQNR and range on every step
            (debug switch, docs/inspect_export.md): to the ``fqtc.debug`` logger and to `fqtc.inspect.sqnr_log`.
            ``True`` = all.
        partitioner: ``min_cut`` (default) or ``default``, the AOTAutograd partitioner run after the rewrite.
        compiler: ``auto`` (default), ``eager`` or ``inductor``. ``eager`` runs the fw/bw graphs as FX modules
            (the reference path, each fqt op a separate call); ``inductor`` compiles them with Inductor, which on
            CPU inlines the fqt ops so their quantizers fuse into the surrounding loops, bit-identical to ``eager``
            (docs/kernels.md, "CPU graphs under Inductor"). ``auto`` takes ``inductor`` for CPU training and
            inference graphs and ``eager`` for CUDA graphs (which run fqtc's own Triton kernels) and for the
            latent-weight update graphs of a compiled optimizer step. The environment variable ``FQTC_COMPILER``
            changes the default.
        budget: with ``bits="auto"``: the average bits per quantized gradient element (``grad_output`` operands,
            weighted by element count), a number from 2 to 8, e.g. 4.5 (docs/bit_assignment.md).
        calibration: with ``bits="auto"``: the `fqtc.calibrate.Calibration` returned by ``fqtc.calibrate``.
            Without it the backend calibrates online: the first ``calibration_steps`` training steps run in full
            precision while the same statistics are collected, then each graph is compiled once more with the
            solved bits (docs/bit_assignment.md).
        calibration_steps: with ``bits="auto"`` and no ``calibration``: how many training steps (forward +
            backward) are observed before the bits are solved (default 4, 1..1000).
        auto_objective: with ``bits="auto"``: what the solver minimizes. ``"relative"`` (default): the sum over
            parameter tensors of the added gradient variance divided by that tensor's squared gradient norm (the
            noise-to-signal ratio; scale-invariant, so a small layer cannot be starved). ``"absolute"``: the added
            variance summed over all parameter-gradient elements (dominated by the layers with large gradients).
        auto_min_bits: with ``bits="auto"``: the fewest bits the solver may give any gradient quantizer (2..8, at
            most ``budget``; default 2). Rules may still set fewer.
        save_fp: kinds of saved-for-backward activations kept in fp32 instead of 8-bit codes (debug switch,
            docs/saved_activations.md): any of `SAVE_FP_KINDS` or ``"all"``.
        layout: operand layout of the GEMM sites (docs/outliers.md). ``"default"``: the per-role defaults.
            ``"token_rot"``: the outlier-robust layout for pretrained transformers (per-token inputs, per-channel
            weights in ``grad_input``, per-channel inputs for ``grad_weight``, Hadamard rotation of each Linear's
            ``output`` GEMM). ``"auto"`` (default): ``token_rot`` for a
            graph whose first batch shows outlier features (a Linear input with crest factor >= 24), ``default``
            otherwise (`fqtc.passes.layout`). Expressed as rules placed before ``rules``, which still win.
    """

    bits: BitConfig = field(default_factory=BitConfig)
    seed: int = 0
    forward_rounding: str = "nearest"
    grad_rounding: str = "stochastic"
    grad_quantizer: str = "uniform"
    rules: tuple[Rule, ...] = ()
    keep_fp: tuple[str, ...] = ()
    log_sqnr: tuple[str, ...] = ()
    partitioner: str = "min_cut"
    # FQTC_COMPILER sets the default (e.g. ``eager`` to debug a model without editing its options)
    compiler: str = field(default_factory=lambda: os.environ.get("FQTC_COMPILER", "auto"))
    budget: float | None = None
    calibration: Any = field(default=None, compare=False, repr=False)
    auto_objective: str = "relative"
    auto_min_bits: int = MIN_BITS
    calibration_steps: int = 4
    save_fp: tuple[str, ...] = ()
    rotate: str = "none"
    rotate_block: int = 64
    granularity: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    layout: str = "auto"

    def __post_init__(self) -> None:
        sf = (self.save_fp,) if isinstance(self.save_fp, str) else self.save_fp
        if not isinstance(sf, (tuple, list)) or any(k not in SAVE_FP_KINDS + ("all",) for k in sf):
            raise _bad("save_fp", self.save_fp, "a list of " + ", ".join(SAVE_FP_KINDS) + ", or 'all'")
        object.__setattr__(self, "save_fp", tuple(sf))
        if self.budget is not None:
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not (MIN_BITS <= b <= MAX_BITS):
                raise _bad("budget", b, f"a number from {MIN_BITS} to {MAX_BITS} (average gradient bits, e.g. 4.5)")
        if self.auto_objective not in AUTO_OBJECTIVES:
            raise _bad("auto_objective", self.auto_objective, ", ".join(AUTO_OBJECTIVES))
        m = self.auto_min_bits
        if isinstance(m, bool) or not isinstance(m, int) or not (MIN_BITS <= m <= MAX_BITS):
            raise _bad("auto_min_bits", m, f"an integer from {MIN_BITS} to {MAX_BITS}")
        if self.budget is not None and m > self.budget:
            raise _bad("auto_min_bits", m, f"at most the budget ({self.budget}): every gradient quantizer at "
                       f"{m} bits already averages more than the budget allows")
        if self.bits.auto:
            if self.budget is None:
                raise _bad("budget", None, "a number from 2 to 8 when bits='auto', e.g. options={'bits': 'auto', "
                           "'budget': 4.5}")
            if self.calibration is not None and not hasattr(self.calibration, "units"):
                raise _bad("calibration", self.calibration,
                           "the result of fqtc.calibrate(model, batches, loss_fn), or no calibration (the backend "
                           "then calibrates online on the first calibration_steps training steps)")
        cs = self.calibration_steps
        if isinstance(cs, bool) or not isinstance(cs, int) or not 1 <= cs <= 1000:
            raise _bad("calibration_steps", cs, "an integer from 1 to 1000 (training steps observed before the "
                       "bits are solved)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise _bad("seed", self.seed, "an integer in [0, 2**63 - 1] (the ops take it as int64)")
        for name in ("forward_rounding", "grad_rounding"):
            if getattr(self, name) not in ROUNDINGS:
                raise _bad(name, getattr(self, name), ", ".join(ROUNDINGS))
        if self.grad_quantizer not in QUANTIZERS:
            raise _bad("grad_quantizer", self.grad_quantizer, ", ".join(QUANTIZERS))
        if self.bits.gradient == 1 and not self.bits.auto and self.grad_quantizer not in ONE_BIT_QUANTIZERS:
            raise ValueError(f"fqt option 'bits': G1 (one bit per gradient element) needs grad_quantizer='aq' (an "
                             f"average of one bit) or 'psq' (two levels per sample), got {self.grad_quantizer!r}; "
                             f"other quantizers take G2..G8")
        if self.partitioner not in ("min_cut", "default"):
            raise _bad("partitioner", self.partitioner, "min_cut, default")
        if self.compiler not in ("auto", "eager", "inductor"):
            raise _bad("compiler", self.compiler, "auto, eager, inductor")
        if self.rotate not in ROTATIONS:
            raise _bad("rotate", self.rotate, ", ".join(ROTATIONS))
        if self.granularity not in (None, "block"):
            raise _bad("granularity", self.granularity, "'block' (block scaling of every uniform quantizer of linear "
                       "and bmm GEMMs) or unset (the per-role defaults); set other granularities with rules")
        check_block_size("block_size", self.block_size)
        if self.layout not in LAYOUTS:
            raise _bad("layout", self.layout, ", ".join(LAYOUTS) + " (docs/outliers.md)")
        rb = self.rotate_block
        if isinstance(rb, bool) or not isinstance(rb, int) or not 16 <= rb <= 256 or rb & (rb - 1):
            raise _bad("rotate_block", rb, "a power of two from 16 to 256 (the Hadamard block along K)")

    @staticmethod
    def from_options(options: Mapping[str, Any] | "FQTConfig" | None = None) -> "FQTConfig":
        """Build a config from the backend's ``options`` dict (None gives the default W8A8G8)."""
        if options is None:
            return FQTConfig()
        if isinstance(options, FQTConfig):
            return options
        if not isinstance(options, Mapping):
            raise _bad("options", options, "a dict of fqt options")
        unknown = set(options) - set(_OPTION_KEYS)
        if unknown:
            raise ValueError(
                f"unknown fqt option(s) {sorted(unknown)}; allowed options: {', '.join(_OPTION_KEYS)}"
            )
        kw: dict[str, Any] = {}
        if "bits" in options:
            kw["bits"] = options["bits"] if isinstance(options["bits"], BitConfig) else BitConfig.parse(options["bits"])
        if "seed" in options:
            kw["seed"] = options["seed"]
        if "rounding" in options:
            r = options["rounding"]
            if r not in ROUNDINGS:
                raise _bad("rounding", r, ", ".join(ROUNDINGS))
            kw["forward_rounding"] = kw["grad_rounding"] = r
        for k in ("forward_rounding", "grad_rounding", "grad_quantizer", "partitioner", "compiler", "budget",
                  "calibration", "auto_objective", "auto_min_bits", "save_fp", "rotate", "rotate_block",
                  "calibration_steps", "granularity", "block_size", "layout"):
            if k in options:
                kw[k] = options[k]
        for k in ("budget", "auto_objective", "auto_min_bits", "calibration_steps"):
            if k in options and not kw.get("bits", BitConfig()).auto:
                # user-facing check only: configs derived with dataclasses.replace (e.g. an FP reference) keep it
                raise _bad(k, options[k], "only together with bits='auto' (or 'W8A8Gauto'); the bit string sets "
                           "the bits otherwise")
        if "rules" in options:
            kw["rules"] = _parse_rules(options["rules"])
        if "keep_fp" in options:
            kf = options["keep_fp"]
            if isinstance(kf, str):
                kf = (kf,)
            if not isinstance(kf, Sequence) or not all(isinstance(x, str) for x in kf):
                raise _bad("keep_fp", kf, "a module-path glob, a role, or a list of them")
            kw["keep_fp"] = tuple(kf)
        if "log_sqnr" in options:
            ls = options["log_sqnr"]
            ls = ("*",) if ls is True else (() if ls in (False, None) else ((ls,) if isinstance(ls, str) else ls))
            if not isinstance(ls, Sequence) or not all(isinstance(x, str) for x in ls):
                raise _bad("log_sqnr", options["log_sqnr"], "True, a site/module-path glob, a role, or a list of them")
            kw["log_sqnr"] = tuple(ls)
        return FQTConfig(**kw)

    # -- spec resolution ------------------------------------------------------------------------------------
    def rotation(self, module: str, module_type: str = "") -> str:
        """``"hadamard"`` or ``"none"`` for the ``output`` GEMM of one site: the last matching rule with ``rotate``
        wins over the option (``keep_fp`` sites are not quantized, so nothing is rotated there)."""
        out = self.rotate
        for r in self.rules:
            if r.rotate is not None and r.matches(module, "output", r.operand or "input", module_type):
                out = r.rotate
        return out

    def default_spec(self, role: str, operand: str) -> QuantSpec | None:
        """The spec before rules: bits from the bit string, granularity from `DEFAULT_GRANULARITY`."""
        bits = {"input": self.bits.activation, "weight": self.bits.weight, "grad_output": self.bits.gradient}[operand]
        if bits is None:
            return None
        gran = DEFAULT_GRANULARITY.get((role, operand), "tensor")
        if operand == "grad_output":
            if self.granularity == "block" and self.grad_quantizer == "uniform":
                gran = "block"
            return QuantSpec(bits, gran, self.grad_rounding, self.grad_quantizer, self.block_size)
        return QuantSpec(bits, self.granularity or gran, self.forward_rounding, "uniform", self.block_size)

    def resolve(self, module: str, role: str, operand: str, module_type: str = "") -> tuple[QuantSpec | None, str]:
        """The spec of one operand of one GEMM and the reason for it (``"default W8A8G8"``, ``"rule(...)"``).

        Precedence, highest first: ``keep_fp`` (module glob or role) > ``rules`` in order, the last matching rule
        wins (a rule that sets no bits keeps the bits below it and changes only its other fields) > the automatic
        policy (``bits="auto"``: its decisions are rules placed before the user's, see
        `fqtc.passes.autobits.expand_config`) > the bit-string default. Presets must be expanded first
        (`expand_presets`).
        """
        for pat in self.keep_fp:
            if pat == role or fnmatch.fnmatchcase(module, pat):
                return None, f"keep_fp {pat!r}"
        default = self.default_spec(role, operand)
        spec, reason = default, f"default {self.bits}"
        fallback = default or QuantSpec(8, DEFAULT_GRANULARITY.get((role, operand), "tensor"),
                                        self.grad_rounding if operand == "grad_output" else self.forward_rounding,
                                        block_size=self.block_size)
        for rule in self.rules:
            if rule.matches(module, role, operand, module_type):
                # a rule that changes only rounding etc. keeps an automatic decision's reason next to its own
                keep = reason.startswith("auto:") and not rule.sets_bits
                spec = rule.apply(spec, fallback)
                reason = f"{reason}; {rule.describe()}" if keep else rule.describe()
        if spec is not None and spec.quantizer != "uniform":
            spec = _grad_quantizer_layout(spec, role, operand, module)
        return spec, reason

    def bits_set_by_user(self, module: str, role: str, operand: str, module_type: str = "") -> bool:
        """Are this operand's bits fixed by ``keep_fp`` or a rule (so the automatic policy must not choose them)?"""
        if any(pat == role or fnmatch.fnmatchcase(module, pat) for pat in self.keep_fp):
            return True
        return any(r.sets_bits and r.matches(module, role, operand, module_type) for r in self.rules)

    def expand_presets(self, site_keys: Sequence[str]) -> "FQTConfig":
        """Replace preset rules by one ordinary rule per site they name, in place in the rule order.

        ``site_keys`` are the sites' module paths (or site names when a GEMM has no module), in graph order. The
        expanded rules match the module path exactly and carry the label ``preset first_last: first site 'fc1'``,
        which becomes the recorded reason. A module whose GEMM is both first and last gets one rule.
        """
        if not any(r.preset for r in self.rules):
            return self
        out: list[Rule] = []
        for rule in self.rules:
            if rule.preset is None:
                out.append(rule)
                continue
            picks: list[tuple[str, str]] = []
            if site_keys and rule.preset in ("first_last", "first"):
                picks.append(("first", site_keys[0]))
            if site_keys and rule.preset in ("first_last", "last") and site_keys[-1] not in [k for _, k in picks]:
                picks.append(("last", site_keys[-1]))
            if not picks:  # no sites: keep the unexpanded preset so assign warns that it matched nothing
                out.append(rule)
            for which, key in picks:
                label = f"preset {rule.preset}: {which} site {key!r}" + (
                    "" if rule.bits is _UNSET else f" bits={'fp' if rule.bits is None else rule.bits}")
                out.append(dataclasses.replace(rule, preset=None, module=_glob_escape(key), label=label))
        return dataclasses.replace(self, rules=tuple(out))

    def logs_sqnr(self, site: str, module: str, role: str) -> bool:
        """Does option ``log_sqnr`` select this GEMM (a glob over the site name or module path, or a role)?"""
        return any(pat == role or fnmatch.fnmatchcase(site, pat) or fnmatch.fnmatchcase(module, pat)
                   for pat in self.log_sqnr)

    def short_str(self) -> str:
        return (f"{self.bits} seed={self.seed} fwd={self.forward_rounding} "
                f"grad={self.grad_rounding}/{self.grad_quantizer}")


# Grouping of each gradient quantizer per backward GEMM (docs/gradient_quantizers.md): it replaces the
# spec's granularity, so assign's scale-vs-reduction-axis check and the records describe what really runs. PTQ: one
# scale; PSQ/BHQ: per sample in both GEMMs (for grad_weight the sample scales lie along the reduction axis: a
# dequantized product); SCQ/AQ: samples for grad_input, output channels for grad_weight (integer GEMMs).
GRAD_QUANTIZER_GRANULARITY: dict[str, dict[str, str]] = {
    "ptq": {"grad_input": "tensor", "grad_weight": "tensor"},
    "psq": {"grad_input": "sample", "grad_weight": "sample"},
    "bhq": {"grad_input": "sample", "grad_weight": "sample"},
    "scq": {"grad_input": "sample", "grad_weight": "channel"},
    "aq": {"grad_input": "sample", "grad_weight": "channel"},
    "aq_topk": {"grad_input": "sample", "grad_weight": "channel"},
}


def _grad_quantizer_layout(spec: QuantSpec, role: str, operand: str, module: str) -> QuantSpec:
    if operand != "grad_output":
        raise ValueError(
            f"fqt: quantizer {spec.quantizer!r} applies to the grad_output operand only, but a rule gives it to "
            f"{operand!r} of {role!r} in module {module!r}; add \"operand\": \"grad_output\" to that rule")
    return dataclasses.replace(spec, granularity=GRAD_QUANTIZER_GRANULARITY[spec.quantizer][role])


def _parse_rules(rules: Any) -> tuple[Rule, ...]:
    if isinstance(rules, Mapping):
        # shorthand {glob: "fp" | bits}: keep modules in FP or set all their bits
        out = []
        for i, (glob, val) in enumerate(rules.items()):
            out.append(Rule.from_option({"module": glob, "bits": val}, i))
        return tuple(out)
    if isinstance(rules, (list, tuple)):
        return tuple(Rule.from_option(r, i) for i, r in enumerate(rules))
    raise _bad("rules", rules, "a list of rule dicts, or a dict {module_glob: bits | 'fp'}")
