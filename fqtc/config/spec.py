"""The vocabulary of fqt's configuration and its value types: roles, operands, granularities, roundings and
quantizers; a resolved per-operand `QuantSpec`; the parsed bit string `BitConfig`; a per-module `Rule`; the
default granularity per (role, operand). `fqtc.config.options` builds the validated `FQTConfig` from them.

Vocabulary (see docs/architecture.md): a GEMM site has three GEMMs, ``output``, ``grad_input`` and
``grad_weight``; its operands are ``input``, ``weight`` and ``grad_output``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Mapping

ROLES: tuple[str, ...] = ("output", "grad_input", "grad_weight")
OPERANDS: tuple[str, ...] = ("input", "weight", "grad_output")
GRANULARITIES: tuple[str, ...] = ("tensor", "token", "sample", "channel", "block")
# Elements per scale along the reduction dim for granularity "block" (fqtc/quant/block.py; docs/options.md).
BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
# Quantizers for the grad_output operand come from the statistical-framework and 1-bit FQT papers
# (docs/gradient_quantizers.md). "uniform" is the plain symmetric quantizer at the spec's granularity.
# ptq/psq/scq/bhq/aq/aq_topk apply to grad_output only and choose their own
# grouping per role (`GRAD_QUANTIZER_GRANULARITY`); aq/aq_topk take an *average* of bits, down to 1 (``G1``).
QUANTIZERS: tuple[str, ...] = ("uniform", "ptq", "psq", "scq", "bhq", "aq", "aq_topk")
AVERAGE_BIT_QUANTIZERS: tuple[str, ...] = ("aq", "aq_topk")
# quantizers that take G1: AQ's average of one bit, and PSQ's two-level (±max) form, the per-sample 1-bit baseline
# of the 1-bit FQT paper (`fqtc.quant.gradq.psq_two_level`)
ONE_BIT_QUANTIZERS: tuple[str, ...] = (*AVERAGE_BIT_QUANTIZERS, "psq")
MIN_BITS, MAX_BITS = 2, 8

_BITS_RE = re.compile(r"^W(\d+)A(\d+)G(\d+|AUTO)(?:L(\d+))?$")
# Rule presets (docs/bit_assignment.md): each expands, once the GEMM sites are known, into ordinary rules on the
# sites it names.
PRESETS: tuple[str, ...] = ("first_last", "first", "last")


def _bad(option: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"fqt option {option!r}: got {value!r}; allowed: {allowed}")


def _glob_escape(text: str) -> str:
    """A glob matching exactly ``text`` under fnmatch (``*``, ``?``, ``[`` wrapped in brackets)."""
    return re.sub(r"([*?\[])", r"[\1]", text)


@dataclass(frozen=True)
class QuantSpec:
    """How one operand of one GEMM is quantized.

    Args:
        bits: integer bits of the symmetric code, 2..8 (codes in [-(2^(b-1)-1), 2^(b-1)-1]).
        granularity: which elements share one scale. ``tensor``: one scale; ``token``/``sample``: one scale per
            row (token of an activation, sample of a gradient); ``channel``: one scale per output channel of a
            weight, per feature column of an activation or gradient; ``block``: one scale per ``block_size``
            elements along the GEMM's reduction dim (b x b tiles for the weight and the forward input, which two
            GEMMs read along different dims; docs/options.md, "Block scaling").
        rounding: ``nearest`` (deterministic) or ``stochastic`` (unbiased, counter-based random stream).
        quantizer: the algorithm (``uniform``; gradient quantizers such as ``psq``/``bhq`` where available).
    """

    bits: int = 8
    granularity: str = "tensor"
    rounding: str = "nearest"
    quantizer: str = "uniform"
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        check_block_size("block_size", self.block_size)
        if self.quantizer not in QUANTIZERS:
            raise _bad("quantizer", self.quantizer, ", ".join(QUANTIZERS))
        validate_bits("bits", self.bits, quantizer=self.quantizer)
        if self.granularity not in GRANULARITIES:
            raise _bad("granularity", self.granularity, ", ".join(GRANULARITIES))
        if self.rounding not in ROUNDINGS:
            raise _bad("rounding", self.rounding, ", ".join(ROUNDINGS))
        if self.quantizer not in QUANTIZERS:
            raise _bad("quantizer", self.quantizer, ", ".join(QUANTIZERS))

    def short_str(self) -> str:
        r = "sr" if self.rounding == "stochastic" else "rn"
        g = f"block{self.block_size}" if self.granularity == "block" else self.granularity
        return f"int{self.bits}/{g}/{r}" + ("" if self.quantizer == "uniform" else f"/{self.quantizer}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.granularity != "block":  # the block size means nothing for other granularities
            d.pop("block_size")
        return d


def check_block_size(option: str, value: Any) -> int:
    if isinstance(value, bool) or value not in BLOCK_SIZES:
        raise _bad(option, value, "one of " + ", ".join(map(str, BLOCK_SIZES)) + " (elements per scale along the "
                   "reduction dim)")
    return value


def validate_bits(option: str, bits: Any, quantizer: str | None = None) -> int:
    """Bits 2..8; 1 only for `ONE_BIT_QUANTIZERS` (AQ's average of one bit, PSQ's two levels; ``quantizer=None``:
    not known yet)."""
    low = 1 if quantizer is None or quantizer in ONE_BIT_QUANTIZERS else MIN_BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or not (low <= bits <= MAX_BITS):
        if bits == 1:
            raise ValueError(f"fqt option {option!r}: 1 bit per gradient element needs quantizer 'aq' (an average "
                             f"of one bit) or 'psq' (two levels per sample); quantizer {quantizer!r} takes "
                             f"{MIN_BITS} to {MAX_BITS} bits")
        raise _bad(option, bits, f"an integer from {MIN_BITS} to {MAX_BITS} (1 only with quantizer 'aq' or 'psq')")
    return bits


@dataclass(frozen=True)
class BitConfig:
    """Bits of weights, activations, gradients and (optionally) latent weights: ``W8A8G8`` or ``W4A8G8L4``.

    ``None`` means that operand stays in full precision (the bit string ``"fp"``).

    ``auto`` (bit strings ``"auto"`` = ``"W8A8Gauto"``, or ``"W4A8Gauto"``): the bits of every ``grad_output``
    quantizer are chosen per GEMM by the solver of `fqtc.passes.autobits` under ``FQTConfig.budget``; ``gradient``
    then holds the fallback shown before the solve (8) and is not used for quantized gradients.
    """

    weight: int | None = 8
    activation: int | None = 8
    gradient: int | None = 8
    latent: int | None = None
    auto: bool = False

    @staticmethod
    def parse(text: str) -> "BitConfig":
        allowed = "a string such as 'W8A8G8', 'W4A8G8L4', 'fp', 'auto' or 'W8A8Gauto'"
        if not isinstance(text, str):
            raise _bad("bits", text, allowed)
        if text.strip().lower() in ("fp", "fp32", "none"):
            return BitConfig(None, None, None, None)
        if text.strip().lower() == "auto":
            return BitConfig(8, 8, 8, None, auto=True)
        m = _BITS_RE.match(text.strip().upper())
        if not m:
            raise _bad("bits", text, allowed)
        w, a, g, lat = m.groups()
        auto = g == "AUTO"
        for name, v in (("W", w), ("A", a), ("G", "8" if auto else g)):
            if not ((1 if name == "G" else MIN_BITS) <= int(v) <= MAX_BITS):  # G1: AQ only, checked by FQTConfig
                raise _bad("bits", text, f"{name} bits from {MIN_BITS} to {MAX_BITS} (e.g. 'W8A8G8')")
        if lat is not None and not (2 <= int(lat) <= 8):
            raise _bad("bits", text, "L (latent residual) bits from 2 to 8")
        return BitConfig(int(w), int(a), 8 if auto else int(g), int(lat) if lat is not None else None, auto=auto)

    def __str__(self) -> str:
        if self.weight is None and self.activation is None and self.gradient is None:
            return "fp"
        g = "auto" if self.auto else (self.gradient or "fp")
        s = f"W{self.weight or 'fp'}A{self.activation or 'fp'}G{g}"
        return s + (f"L{self.latent}" if self.latent else "")


_UNSET = object()


@dataclass(frozen=True)
class Rule:
    """Overrides the spec of matching (site, role, operand) triples. Later rules win over earlier ones.

    Precedence (docs/bit_assignment.md): ``keep_fp`` > rules, in order, the last matching rule wins > the automatic
    policy (``bits="auto"``, gradient bits only, for operands whose bits no rule set) > the bit-string default.
    All conditions of a rule must hold for it to match (module glob AND module type AND role AND operand).

    Args:
        module: glob over the module path of the site (``"encoder.*.fc1"``); ``"*"`` matches all.
        role: ``output``/``grad_input``/``grad_weight`` or None for all three GEMMs.
        operand: ``input``/``weight``/``grad_output`` or None for all operands.
        bits: new bits, or None to keep the matched operands in full precision (the string ``"fp"`` in options).
        granularity, rounding, quantizer, block_size: override those fields (None keeps the default's).
        module_type: glob over the class name of the site's module (``"Linear"``, ``"Conv*"``); None matches all.
        preset: a named preset (`PRESETS`), written ``{"first_last": 8}`` in options: ``first_last`` keeps the
            first and last GEMM sites in graph order at ``bits``, ``first``/``last`` one of them. A preset matches
            nothing itself; `FQTConfig.expand_presets` turns it into one rule per named site once sites are known.
        label: the reason recorded for operands this rule decides (default: `describe`); set by presets and by
            the automatic policy.
        rotate: ``"hadamard"`` or ``"none"``: rotate (or not) the ``output`` GEMM of the matched Linear sites
            (option ``rotate``); such a rule sets nothing else and may name only ``module``/``module_type``/``role``.
        warn_unmatched: warn when the rule matches no operand of a graph (the user's rules); False for rules fqtc
            writes over every site itself (option ``layout``), which a graph may simply not need.
    """

    module: str = "*"
    role: str | None = None
    operand: str | None = None
    bits: Any = _UNSET
    granularity: str | None = None
    rounding: str | None = None
    quantizer: str | None = None
    module_type: str | None = None
    preset: str | None = None
    label: str | None = None
    rotate: str | None = None
    block_size: int | None = None
    warn_unmatched: bool = True

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise _bad("rules[].preset", self.preset, ", ".join(PRESETS))
        if self.module_type is not None and not isinstance(self.module_type, str):
            raise _bad("rules[].module_type", self.module_type, "a class-name glob such as 'Linear' or 'Conv*'")
        if self.role is not None and self.role not in ROLES:
            raise _bad("rules[].role", self.role, ", ".join(ROLES))
        if self.operand is not None and self.operand not in OPERANDS:
            raise _bad("rules[].operand", self.operand, ", ".join(OPERANDS))
        if self.bits is not _UNSET and self.bits is not None:
            validate_bits("rules[].bits", self.bits, quantizer=self.quantizer)
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise _bad("rules[].granularity", self.granularity, ", ".join(GRANULARITIES))
        if self.rounding is not None and self.rounding not in ROUNDINGS:
            raise _bad("rules[].rounding", self.rounding, ", ".join(ROUNDINGS))
        if self.block_size is not None:
            check_block_size("rules[].block_size", self.block_size)
        if self.rotate is not None and self.rotate not in ROTATIONS:
            raise _bad("rules[].rotate", self.rotate, ", ".join(ROTATIONS))
        if self.rotate is not None and self.role not in (None, "output"):
            raise _bad("rules[].role", self.role, "'output' or none with 'rotate' (the rotation applies to the "
                       "output GEMM's input and weight; the backward GEMMs that share their codes are un-rotated)")
        if self.quantizer is not None and self.quantizer not in QUANTIZERS:
            raise _bad("rules[].quantizer", self.quantizer, ", ".join(QUANTIZERS))
        if self.quantizer not in (None, "uniform") and self.operand != "grad_output":
            raise _bad("rules[].operand", self.operand, f"'grad_output' with quantizer {self.quantizer!r} (gradient "
                       "quantizers apply to grad_output only), e.g. {'operand': 'grad_output', 'quantizer': "
                       f"'{self.quantizer}'}}")

    def matches(self, module: str, role: str, operand: str, module_type: str = "") -> bool:
        """Does the rule apply to this operand? A preset never matches before `FQTConfig.expand_presets`."""
        return (
            self.preset is None
            and fnmatch.fnmatchcase(module, self.module)
            and (self.module_type is None or fnmatch.fnmatchcase(module_type, self.module_type))
            and (self.role is None or self.role == role)
            and (self.operand is None or self.operand == operand)
        )

    @property
    def sets_bits(self) -> bool:
        """Does the rule set bits (or full precision)? Rules that only change rounding etc. do not."""
        return self.bits is not _UNSET

    def apply(self, spec: QuantSpec | None, default: QuantSpec) -> QuantSpec | None:
        if self.bits is None:
            return None
        base = spec if spec is not None else default
        changes: dict[str, Any] = {}
        if self.bits is not _UNSET:
            changes["bits"] = self.bits
        for f in ("granularity", "rounding", "quantizer", "block_size"):
            if getattr(self, f) is not None:
                changes[f] = getattr(self, f)
        return dataclasses.replace(base, **changes)

    def describe(self) -> str:
        if self.label:
            return self.label
        parts = [f"preset={self.preset}"] if self.preset else [f"module={self.module}"]
        if self.module_type:
            parts.append(f"module_type={self.module_type}")
        if self.role:
            parts.append(f"role={self.role}")
        if self.operand:
            parts.append(f"operand={self.operand}")
        parts.append("bits=fp" if self.bits is None else ("" if self.bits is _UNSET else f"bits={self.bits}"))
        return "rule(" + ", ".join(p for p in parts if p) + ")"

    @staticmethod
    def from_option(item: Any, index: int) -> "Rule":
        """One rule from its options form: ``{"module": "fc1", "role": "grad_weight", "bits": 4}``,
        ``{"module_type": "Linear", "bits": 6}``, or a preset ``{"first_last": 8}`` (``{"first_last": 8, "role":
        "grad_weight"}`` narrows it)."""
        if isinstance(item, Rule):
            return item
        if not isinstance(item, Mapping):
            raise _bad(f"rules[{index}]", item, "a dict such as {'module': 'fc1', 'role': 'grad_weight', 'bits': 4}")
        allowed = {"module", "role", "operand", "bits", "granularity", "rounding", "quantizer", "module_type",
                   "preset", "rotate", "block_size", *PRESETS}
        unknown = set(item) - allowed
        if unknown:
            raise _bad(f"rules[{index}]", sorted(unknown), "keys " + ", ".join(sorted(allowed)))
        kw = dict(item)
        presets = [p for p in PRESETS if p in kw]
        if len(presets) + ("preset" in kw) > 1:
            raise _bad(f"rules[{index}]", dict(item), "one preset per rule, e.g. {'first_last': 8}")
        if presets:
            if "bits" in kw:
                raise _bad(f"rules[{index}]", dict(item), f"the preset's value is its bits: {{'{presets[0]}': 8}}")
            kw["preset"], kw["bits"] = presets[0], kw.pop(presets[0])
        if kw.get("preset") is not None and "module" in kw:
            raise _bad(f"rules[{index}].module", kw["module"], "no module glob in a preset rule (it names its sites)")
        if "bits" in kw and isinstance(kw["bits"], str):
            if kw["bits"].lower() not in ("fp", "fp32", "none"):
                raise _bad(f"rules[{index}].bits", kw["bits"], f"an integer {MIN_BITS}..{MAX_BITS} or 'fp'")
            kw["bits"] = None
        try:
            return Rule(**kw)
        except ValueError as e:  # name the offending rule by its index in the options list
            raise ValueError(str(e).replace("'rules[].", f"'rules[{index}].")) from None


# Default granularity per (role, operand). Scales must not vary along a GEMM's reduction axis for the product to
# stay an integer GEMM with the scales in the epilogue, so e.g. grad_output is per-sample for grad_input
# (reduction over output channels) and per-channel for grad_weight (reduction over samples): the SCQ layout of the
# 1-bit FQT paper, and the official StatQuant code's per-tensor/per-column choices
# (docs/options.md, "Granularity defaults").
DEFAULT_GRANULARITY: dict[tuple[str, str], str] = {
    ("output", "input"): "tensor",
    ("output", "weight"): "channel",
    ("grad_input", "grad_output"): "sample",
    ("grad_input", "weight"): "tensor",
    ("grad_weight", "grad_output"): "channel",
    ("grad_weight", "input"): "tensor",
}

# Rotations of a GEMM's reduction dimension before quantizing (fqtc/quant/rotate.py; option rotate in docs/options.md).
ROTATIONS: tuple[str, ...] = ("none", "hadamard")
