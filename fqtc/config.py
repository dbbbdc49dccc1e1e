"""Configuration of fully quantized training: bit strings, per-operand QuantSpecs and rules.

`FQTConfig.from_options(options)` turns the ``options`` dict given to
``torch.compile(model, backend="fqt", options=...)`` into a frozen, validated config. Every invalid option raises
``ValueError`` naming the option, the bad value and what is allowed.

Vocabulary (see docs/architecture.md): a GEMM site has three GEMMs, ``output``, ``grad_input`` and
``grad_weight``; its operands are ``input``, ``weight`` and ``grad_output``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

ROLES: tuple[str, ...] = ("output", "grad_input", "grad_weight")
OPERANDS: tuple[str, ...] = ("input", "weight", "grad_output")
GRANULARITIES: tuple[str, ...] = ("tensor", "token", "sample", "channel")
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
# Quantizers for the grad_output operand come from the statistical-framework and 1-bit FQT papers
# (../docs/numerics.md). "uniform" is the plain symmetric quantizer at the spec's granularity.
QUANTIZERS: tuple[str, ...] = ("uniform",)
MIN_BITS, MAX_BITS = 2, 8

_BITS_RE = re.compile(r"^W(\d+)A(\d+)G(\d+)(?:L(\d+))?$")


def _bad(option: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"fqt option {option!r}: got {value!r}; allowed: {allowed}")


@dataclass(frozen=True)
class QuantSpec:
    """How one operand of one GEMM is quantized.

    Args:
        bits: integer bits of the symmetric code, 2..8 (codes in [-(2^(b-1)-1), 2^(b-1)-1]).
        granularity: which elements share one scale. ``tensor``: one scale; ``token``/``sample``: one scale per
            row (token of an activation, sample of a gradient); ``channel``: one scale per output channel of a
            weight, per feature column of an activation or gradient.
        rounding: ``nearest`` (deterministic) or ``stochastic`` (unbiased, counter-based random stream).
        quantizer: the algorithm (``uniform``; gradient quantizers such as ``psq``/``bhq`` where available).
    """

    bits: int = 8
    granularity: str = "tensor"
    rounding: str = "nearest"
    quantizer: str = "uniform"

    def __post_init__(self) -> None:
        validate_bits("bits", self.bits)
        if self.granularity not in GRANULARITIES:
            raise _bad("granularity", self.granularity, ", ".join(GRANULARITIES))
        if self.rounding not in ROUNDINGS:
            raise _bad("rounding", self.rounding, ", ".join(ROUNDINGS))
        if self.quantizer not in QUANTIZERS:
            raise _bad("quantizer", self.quantizer, ", ".join(QUANTIZERS))

    def short_str(self) -> str:
        r = "sr" if self.rounding == "stochastic" else "rn"
        return f"int{self.bits}/{self.granularity}/{r}" + ("" if self.quantizer == "uniform" else f"/{self.quantizer}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_bits(option: str, bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS):
        raise _bad(option, bits, f"an integer from {MIN_BITS} to {MAX_BITS}")
    return bits


@dataclass(frozen=True)
class BitConfig:
    """Bits of weights, activations, gradients and (optionally) latent weights: ``W8A8G8`` or ``W4A8G8L4``.

    ``None`` means that operand stays in full precision (the bit string ``"fp"``).
    """

    weight: int | None = 8
    activation: int | None = 8
    gradient: int | None = 8
    latent: int | None = None

    @staticmethod
    def parse(text: str) -> "BitConfig":
        if not isinstance(text, str):
            raise _bad("bits", text, "a string such as 'W8A8G8', 'W4A8G8L4' or 'fp'")
        if text.strip().lower() in ("fp", "fp32", "none"):
            return BitConfig(None, None, None, None)
        m = _BITS_RE.match(text.strip().upper())
        if not m:
            raise _bad("bits", text, "a string such as 'W8A8G8', 'W4A8G8L4' or 'fp'")
        w, a, g, lat = m.groups()
        for name, v in (("W", w), ("A", a), ("G", g)):
            if not (MIN_BITS <= int(v) <= MAX_BITS):
                raise _bad("bits", text, f"{name} bits from {MIN_BITS} to {MAX_BITS} (e.g. 'W8A8G8')")
        if lat is not None and not (2 <= int(lat) <= 8):
            raise _bad("bits", text, "L (latent residual) bits from 2 to 8")
        return BitConfig(int(w), int(a), int(g), int(lat) if lat is not None else None)

    def __str__(self) -> str:
        if self.weight is None and self.activation is None and self.gradient is None:
            return "fp"
        s = f"W{self.weight or 'fp'}A{self.activation or 'fp'}G{self.gradient or 'fp'}"
        return s + (f"L{self.latent}" if self.latent else "")


_UNSET = object()


@dataclass(frozen=True)
class Rule:
    """Overrides the spec of matching (site, role, operand) triples. Later rules win over earlier ones.

    Args:
        module: glob over the module path of the site (``"encoder.*.fc1"``); ``"*"`` matches all.
        role: ``output``/``grad_input``/``grad_weight`` or None for all three GEMMs.
        operand: ``input``/``weight``/``grad_output`` or None for all operands.
        bits: new bits, or None to keep the matched operands in full precision (the string ``"fp"`` in options).
        granularity, rounding, quantizer: override those fields (None keeps the default's).
    """

    module: str = "*"
    role: str | None = None
    operand: str | None = None
    bits: Any = _UNSET
    granularity: str | None = None
    rounding: str | None = None
    quantizer: str | None = None

    def __post_init__(self) -> None:
        if self.role is not None and self.role not in ROLES:
            raise _bad("rules[].role", self.role, ", ".join(ROLES))
        if self.operand is not None and self.operand not in OPERANDS:
            raise _bad("rules[].operand", self.operand, ", ".join(OPERANDS))
        if self.bits is not _UNSET and self.bits is not None:
            validate_bits("rules[].bits", self.bits)
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise _bad("rules[].granularity", self.granularity, ", ".join(GRANULARITIES))
        if self.rounding is not None and self.rounding not in ROUNDINGS:
            raise _bad("rules[].rounding", self.rounding, ", ".join(ROUNDINGS))
        if self.quantizer is not None and self.quantizer not in QUANTIZERS:
            raise _bad("rules[].quantizer", self.quantizer, ", ".join(QUANTIZERS))

    def matches(self, module: str, role: str, operand: str) -> bool:
        return (
            fnmatch.fnmatchcase(module, self.module)
            and (self.role is None or self.role == role)
            and (self.operand is None or self.operand == operand)
        )

    def apply(self, spec: QuantSpec | None, default: QuantSpec) -> QuantSpec | None:
        if self.bits is None:
            return None
        base = spec if spec is not None else default
        changes: dict[str, Any] = {}
        if self.bits is not _UNSET:
            changes["bits"] = self.bits
        for f in ("granularity", "rounding", "quantizer"):
            if getattr(self, f) is not None:
                changes[f] = getattr(self, f)
        return dataclasses.replace(base, **changes)

    def describe(self) -> str:
        parts = [f"module={self.module}"]
        if self.role:
            parts.append(f"role={self.role}")
        if self.operand:
            parts.append(f"operand={self.operand}")
        parts.append("bits=fp" if self.bits is None else ("" if self.bits is _UNSET else f"bits={self.bits}"))
        return "rule(" + ", ".join(p for p in parts if p) + ")"

    @staticmethod
    def from_option(item: Any, index: int) -> "Rule":
        if isinstance(item, Rule):
            return item
        if not isinstance(item, Mapping):
            raise _bad(f"rules[{index}]", item, "a dict such as {'module': 'fc1', 'role': 'grad_weight', 'bits': 4}")
        allowed = {"module", "role", "operand", "bits", "granularity", "rounding", "quantizer"}
        unknown = set(item) - allowed
        if unknown:
            raise _bad(f"rules[{index}]", sorted(unknown), "keys " + ", ".join(sorted(allowed)))
        kw = dict(item)
        if "bits" in kw and isinstance(kw["bits"], str):
            if kw["bits"].lower() not in ("fp", "fp32", "none"):
                raise _bad(f"rules[{index}].bits", kw["bits"], f"an integer {MIN_BITS}..{MAX_BITS} or 'fp'")
            kw["bits"] = None
        return Rule(**kw)


# Default granularity per (role, operand). Scales must not vary along a GEMM's reduction axis for the product to
# stay an integer GEMM with the scales in the epilogue, so e.g. grad_output is per-sample for grad_input
# (reduction over output channels) and per-channel for grad_weight (reduction over samples): the SCQ layout of the
# 1-bit FQT paper, and the official StatQuant code's per-tensor/per-column choices (docs/numerics.md).
DEFAULT_GRANULARITY: dict[tuple[str, str], str] = {
    ("output", "input"): "tensor",
    ("output", "weight"): "channel",
    ("grad_input", "grad_output"): "sample",
    ("grad_input", "weight"): "tensor",
    ("grad_weight", "grad_output"): "channel",
    ("grad_weight", "input"): "tensor",
}

_OPTION_KEYS = (
    "bits", "seed", "rounding", "forward_rounding", "grad_rounding", "rules", "keep_fp",
    "partitioner", "compiler", "grad_quantizer", "log_sqnr",
)


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
        partitioner: ``min_cut`` (default) or ``default``, the AOTAutograd partitioner run after the rewrite.
        compiler: ``eager`` (run fw/bw graphs as FX modules) or ``inductor`` (compile them with Inductor).
    """

    bits: BitConfig = field(default_factory=BitConfig)
    seed: int = 0
    forward_rounding: str = "nearest"
    grad_rounding: str = "stochastic"
    grad_quantizer: str = "uniform"
    rules: tuple[Rule, ...] = ()
    keep_fp: tuple[str, ...] = ()
    partitioner: str = "min_cut"
    compiler: str = "eager"

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise _bad("seed", self.seed, "a non-negative integer")
        for name in ("forward_rounding", "grad_rounding"):
            if getattr(self, name) not in ROUNDINGS:
                raise _bad(name, getattr(self, name), ", ".join(ROUNDINGS))
        if self.grad_quantizer not in QUANTIZERS:
            raise _bad("grad_quantizer", self.grad_quantizer, ", ".join(QUANTIZERS))
        if self.partitioner not in ("min_cut", "default"):
            raise _bad("partitioner", self.partitioner, "min_cut, default")
        if self.compiler not in ("eager", "inductor"):
            raise _bad("compiler", self.compiler, "eager, inductor")

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
        for k in ("forward_rounding", "grad_rounding", "grad_quantizer", "partitioner", "compiler"):
            if k in options:
                kw[k] = options[k]
        if "rules" in options:
            kw["rules"] = _parse_rules(options["rules"])
        if "keep_fp" in options:
            kf = options["keep_fp"]
            if isinstance(kf, str):
                kf = (kf,)
            if not isinstance(kf, Sequence) or not all(isinstance(x, str) for x in kf):
                raise _bad("keep_fp", kf, "a module-path glob, a role, or a list of them")
            kw["keep_fp"] = tuple(kf)
        return FQTConfig(**kw)

    # -- spec resolution ------------------------------------------------------------------------------------
    def default_spec(self, role: str, operand: str) -> QuantSpec | None:
        """The spec before rules: bits from the bit string, granularity from `DEFAULT_GRANULARITY`."""
        bits = {"input": self.bits.activation, "weight": self.bits.weight, "grad_output": self.bits.gradient}[operand]
        if bits is None:
            return None
        gran = DEFAULT_GRANULARITY.get((role, operand), "tensor")
        if operand == "grad_output":
            return QuantSpec(bits, gran, self.grad_rounding, self.grad_quantizer)
        return QuantSpec(bits, gran, self.forward_rounding, "uniform")

    def resolve(self, module: str, role: str, operand: str) -> tuple[QuantSpec | None, str]:
        """The spec of one operand of one GEMM and the reason for it (``"default W8A8G8"``, ``"rule(...)"``)."""
        for pat in self.keep_fp:
            if pat == role or fnmatch.fnmatchcase(module, pat):
                return None, f"keep_fp {pat!r}"
        default = self.default_spec(role, operand)
        spec, reason = default, f"default {self.bits}"
        fallback = default or QuantSpec(8, DEFAULT_GRANULARITY.get((role, operand), "tensor"),
                                        self.grad_rounding if operand == "grad_output" else self.forward_rounding)
        for rule in self.rules:
            if rule.matches(module, role, operand):
                spec, reason = rule.apply(spec, fallback), rule.describe()
        return spec, reason

    def short_str(self) -> str:
        return f"{self.bits} seed={self.seed} fwd={self.forward_rounding} grad={self.grad_rounding}/{self.grad_quantizer}"


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
