"""Inspect what the fqt backend did to a model: one row per GEMM, memory saved for backward, SQNR, graphs.

``fqtc.explain(model, *example_inputs, options=...)`` compiles the model with the fqt backend, runs one forward and
one backward pass on the example inputs (without touching ``.grad`` or the step counter) and returns a `Report`
built only from the ``node.meta["fqt"]`` records the passes wrote (fqtc/passes/README.md: one source of truth), so
what inspect shows is what the compiled graphs do:

- ``report.sites``: one `Site` per GEMM (``output``/``grad_input``/``grad_weight``) with its bits, quantizer,
  rounding, status (``quantized``/``partial``/``full_precision``) and the reason; no silent fallback;
- ``report.memory``: bytes of the tensors saved for backward, fqt vs the same model compiled with ``bits="fp"``;
- ``report.saved``: one row per non-GEMM saved activation (`fqtc.passes.save_act`): op, bits, storage, bytes
  saved vs fp32;
- ``report.sites[i].sqnr_db`` (``sqnr=True``): the SQNR of each GEMM's output against the same product of the
  unquantized operands, measured on the example inputs;
- ``str(report)`` (a rich table), ``to_dict()``/``to_json()``, ``graph("forward"|"backward"|"joint")``,
  ``to_dot()``/``to_svg()``.

Per-step logging of chosen sites (option ``log_sqnr``) goes through the ``fqt::observe`` op (`fqtc.ops.observe`):
the rewrite pass inserts it after the quantizers of matching sites; each call logs the operand's quantization SQNR
and range to the ``fqtc.debug`` logger and appends a record that `sqnr_log` (re-exported here) returns.
"""

from fqtc.inspect.driver import explain
from fqtc.inspect.report import Memory, Report, SavedTensor, Site
from fqtc.ops.observe import clear_sqnr_log, sqnr_db, sqnr_log

__all__ = ["Memory", "Report", "SavedTensor", "Site", "explain", "sqnr_db", "sqnr_log", "clear_sqnr_log"]
