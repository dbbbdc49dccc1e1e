"""fqtc: a torch.compile backend for fully quantized training.

Use it without importing fqtc::

    model = torch.compile(model, backend="fqt", options={"bits": "W8A8G8", "seed": 0})

or through the typed API: ``fqtc.compile(model, FQTConfig(...))``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from fqtc.config import BitConfig, FQTConfig, QuantSpec, Rule
from fqtc.ops import get_step, set_step

__version__ = "0.1.0"


def compile(model: torch.nn.Module, config: FQTConfig | Mapping[str, Any] | None = None, **compile_kwargs: Any):
    """``torch.compile(model, backend=fqt_backend)`` with a typed config (or an options dict)."""
    from functools import partial

    from fqtc.backend import fqt_backend

    cfg = FQTConfig.from_options(config)
    return torch.compile(model, backend=partial(fqt_backend, options=cfg), **compile_kwargs)


__all__ = ["BitConfig", "FQTConfig", "QuantSpec", "Rule", "compile", "get_step", "set_step", "__version__"]
