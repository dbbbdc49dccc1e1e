"""Configuration of fully quantized training: bit strings, per-operand QuantSpecs and rules.

`FQTConfig.from_options(options)` turns the ``options`` dict given to
``torch.compile(model, backend="fqt", options=...)`` into a frozen, validated config. Every invalid option raises
``ValueError`` naming the option, the bad value and what is allowed.

Two modules: `fqtc.config.spec` (the vocabulary and the value types `QuantSpec`, `BitConfig`, `Rule`) and
`fqtc.config.options` (`FQTConfig`: option parsing, validation and per-operand resolution). Every name is
importable from ``fqtc.config``.
"""

from fqtc.config.options import (  # noqa: F401
    _OPTION_KEYS,
    AUTO_OBJECTIVES,
    AUTO_OPTION_KEYS,
    GRAD_QUANTIZER_GRANULARITY,
    SAVE_FP_KINDS,
    FQTConfig,
)
from fqtc.config.spec import (  # noqa: F401
    AVERAGE_BIT_QUANTIZERS,
    BLOCK_SIZES,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_GRANULARITY,
    GRANULARITIES,
    MAX_BITS,
    MIN_BITS,
    ONE_BIT_QUANTIZERS,
    OPERANDS,
    PRESETS,
    QUANTIZERS,
    ROLES,
    ROTATIONS,
    ROUNDINGS,
    BitConfig,
    QuantSpec,
    Rule,
    _glob_escape,
    validate_bits,
)
