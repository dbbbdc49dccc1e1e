"""fqtc: a torch.compile backend for fully quantized training.

Use it without importing fqtc::

    model = torch.compile(model, backend="fqt", options={"bits": "W8A8G8", "seed": 0})

or through the typed API: ``fqtc.compile(model, FQTConfig(...))``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from fqtc.calibrate import Calibration, calibrate  # statistics for bits="auto" (docs/bit_assignment.md)
from fqtc.config import BitConfig, FQTConfig, QuantSpec, Rule
from fqtc.export.onnx import export_onnx  # quantized training graphs -> ONNX (docs/inspect_export.md)
from fqtc.inspect import explain  # per-GEMM report of what fqt did (docs/inspect_export.md)
from fqtc.ops import get_step, set_step
from fqtc.optim.latent import prepare  # latent-weight storage (docs/latent_weights.md)

__version__ = "0.1.0"


def compile(model: torch.nn.Module, config: FQTConfig | Mapping[str, Any] | None = None, **compile_kwargs: Any):
    """``torch.compile(model, backend=fqt_backend)`` with a typed config (or an options dict).

    The model's stochastic-rounding step counter (its ``fqt_step`` buffer, docs/usage.md "Reproducibility") is
    created at once, so a checkpoint holding it loads before the first compiled call. After the first training
    call, a `fqtc.coverage.FullPrecisionWarning` names the GEMM modules that ran outside every fqt graph (also when
    Dynamo compiled no graph at all for the model)."""
    from functools import partial

    from fqtc.backend import fqt_backend
    from fqtc.coverage import watch
    from fqtc.ops.stepcounter import counter_for

    cfg = FQTConfig.from_options(config)
    if isinstance(model, torch.nn.Module):
        counter_for(model)
    compiled = torch.compile(model, backend=partial(fqt_backend, options=cfg), **compile_kwargs)
    if isinstance(model, torch.nn.Module) and isinstance(compiled, torch.nn.Module) and compiled is not model:
        watch(compiled, model)  # warns after the first training call if GEMMs ran outside every fqt graph
    return compiled


def __getattr__(name: str) -> Any:
    """``fqtc.distributed`` on first use: it imports torch.distributed's FSDP2 interfaces, which single-process
    training never needs."""
    if name == "distributed":
        import importlib

        return importlib.import_module("fqtc.distributed")
    raise AttributeError(f"module 'fqtc' has no attribute {name!r}")


__all__ = [
    "BitConfig", "Calibration", "FQTConfig", "QuantSpec", "Rule", "calibrate", "compile", "explain", "export_onnx",
    "get_step", "prepare", "set_step", "__version__",
]
