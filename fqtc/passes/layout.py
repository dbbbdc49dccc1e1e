"""Operand layout of the Linear GEMMs (option ``layout``): the default per-role layout, the outlier-robust layout of
docs/outliers.md, or a choice between the two from the graph's first batch.

Pretrained transformers carry outlier features: a few input channels of a Linear 10-300x larger than the rest
(docs/outliers.md measures all-MiniLM-L6-v2 and SmolLM2-135M). A per-tensor input scale then leaves the other
channels a handful of levels, and fine-tuning at W8A8G8 loses accuracy (+14-16% loss on those checkpoints). The
``token_rot`` layout (per-token inputs, per-channel weights in ``grad_input``, per-channel inputs for
``grad_weight``, a randomized Hadamard rotation of each Linear's ``output`` GEMM) matches FP32 there, and costs
time: it quantizes each Linear input twice and rotates both operands of the ``output`` GEMM.

``layout="auto"`` (the default) decides per graph from real values: before tracing, the backend runs the Dynamo
graph once in full precision on the example inputs it was handed (the first batch, under ``torch.no_grad``, the
CPU random state restored afterwards, no buffer changed) and measures the crest factor ``max|x| / rms(x)`` of every
Linear's input. Gaussian-like activations have a crest factor of 4-7 over a batch; the models trained from scratch
in benchmarks/step_time.py stay at or below 11.1 at initialization, while the pretrained checkpoints reach 96
(MiniLM, the FFN down-projections) and 320 (SmolLM2): benchmarks/results/crest.md. A graph with a Linear input
at or above `OUTLIER_CREST` gets the ``token_rot`` layout on all its GEMM sites; others keep the default layout,
which is faster. The decision is recorded as the reason of every operand it sets (``fqtc.explain()``), with the
input that triggered it.

The layout is expressed as rules placed before the user's own, so a user rule still wins on the operands it names.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Sequence

import torch
import torch.fx as fx

from fqtc.config import FQTConfig
from fqtc.config.spec import Rule
from fqtc.passes.common import module_of
from fqtc.quant.uniform import crest_factor

log = logging.getLogger("fqtc.passes")

# Crest factor (max|x| / rms x) of a Linear input from which a graph gets the outlier-robust layout: twice the
# largest value of the from-scratch models measured (11.1), a quarter of MiniLM's largest (96.5).
OUTLIER_CREST = 24.0
# The outlier-robust layout (docs/outliers.md): per-token inputs for `output`, the weight per input channel in
# `grad_input` (its scales folded into the gradient), the saved input per channel for `grad_weight`.
TOKEN_ROT_RULES: tuple[dict[str, str], ...] = (
    {"role": "output", "operand": "input", "granularity": "token"},
    {"role": "grad_input", "operand": "weight", "granularity": "channel"},
    {"role": "grad_weight", "operand": "input", "granularity": "channel"},
)
_LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)


class _LinearInputs(fx.Interpreter):
    """Runs a Dynamo graph and keeps the largest crest factor of each Linear module's input."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.crests: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target in _LINEAR_TARGETS:
            args, _ = self.fetch_args_kwargs_from_env(n)
            c = crest_factor(args[0]) if isinstance(args[0], torch.Tensor) else None
            if c is not None:
                key = module_of(n)[0] or n.name
                self.crests[key] = max(c, self.crests.get(key, 0.0))
        return super().run_node(n)


def _concrete(x: Any) -> Any:
    """An example input as the run takes it: a tensor other than a parameter cloned, a symbolic size (a graph with a
    dynamic batch) as the value it had in this call, read without adding a guard."""
    if isinstance(x, torch.Tensor):
        return x if isinstance(x, torch.nn.Parameter) else x.clone()
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = x.node.hint
        if hint is None:
            raise ValueError("a symbolic size has no example value")
        return hint
    return x


def linear_input_crests(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[str, float]:
    """Crest factor of each Linear module's input in one full-precision run of ``gm`` on ``example_inputs``.

    Nothing the caller can see changes: the run is under ``torch.no_grad``, tensor inputs other than parameters are
    cloned (a training BatchNorm updates its running statistics in place), the graph's own buffers are restored,
    and so is the CPU random state (dropout draws from it)."""
    if not any(n.op == "call_function" and n.target in _LINEAR_TARGETS for n in gm.graph.nodes):
        return {}
    args = [_concrete(x) for x in example_inputs]
    saved = [(b, b.clone()) for b in gm.buffers()]
    interp = _LinearInputs(gm)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            interp.run(*args)
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
    return interp.crests


def token_rot_rules(label: str) -> tuple[Rule, ...]:
    """The outlier-robust layout as rules over every site, each recording ``label`` as the reason of the operands it
    decides (the rotation's: a Linear ``output`` GEMM's input and weight). On attention's batched products the
    per-token rule quantizes both operands along their last dim, which is the second operand's free dim, so those
    products multiply the dequantized operands in fp32 (their records say so): measured more accurate than
    keeping them integer with per-tensor scales (docs/outliers.md). A graph without a ``grad_input`` GEMM (a first
    layer) gives that rule nothing to match: these rules do not warn about it."""
    common = {"label": label, "warn_unmatched": False}
    rotate = Rule(role="output", rotate="hadamard", **common)
    return (rotate,) + tuple(Rule(**r, **common) for r in TOKEN_ROT_RULES)


def _observable(example_inputs: Sequence[Any]) -> str | None:
    from torch._subclasses.fake_tensor import FakeTensor

    for x in example_inputs:
        if isinstance(x, FakeTensor) or (isinstance(x, torch.Tensor) and x.device.type == "meta"):
            return "its example inputs carry no values (fake or meta tensors)"
    return None


def expand_layout(config: FQTConfig, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> FQTConfig:
    """``config`` with its ``layout`` turned into rules placed before the user's (and ``layout`` set to
    ``"default"``, so expanding twice changes nothing).

    ``"token_rot"``: the outlier-robust rules on every site. ``"auto"``: the same when a Linear input of ``gm`` has a
    crest factor >= `OUTLIER_CREST` on ``example_inputs``; nothing otherwise. Block scaling (option
    ``granularity="block"``) is an outlier remedy of its own and keeps its layout; a config whose forward operands
    are all full precision has nothing to lay out."""
    if config.layout == "default":
        return config
    done = dataclasses.replace(config, layout="default")
    if config.granularity == "block" or (config.bits.activation is None and config.bits.weight is None):
        return done
    if config.layout == "token_rot":
        return dataclasses.replace(done, rules=token_rot_rules("layout token_rot (docs/outliers.md)") + config.rules)
    why = _observable(example_inputs)
    crests: dict[str, float] = {}
    if why is None:
        try:
            crests = linear_input_crests(gm, example_inputs)
        except Exception as e:  # noqa: BLE001  (the graph still compiles; the user is told which layout it got)
            why = f"running the graph on its example inputs failed ({type(e).__name__}: {e})"
    if why is not None:
        warnings.warn(f"fqt: layout='auto' cannot measure this graph's Linear inputs: {why}; it keeps the default "
                      "layout. Set layout='token_rot' for a pretrained transformer with outlier features or "
                      "layout='default' to silence this (docs/outliers.md)", stacklevel=2)
        return done
    if not crests:
        return done
    top = max(crests, key=crests.get)
    log.debug("layout auto: largest Linear input crest factor %.1f at %s", crests[top], top)
    if crests[top] < OUTLIER_CREST:
        return done
    label = (f"layout auto: token_rot, input crest factor {crests[top]:.1f} of {top} >= {OUTLIER_CREST:g} "
             "on the first batch (docs/outliers.md)")
    return dataclasses.replace(done, rules=token_rot_rules(label) + config.rules)
