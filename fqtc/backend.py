"""The ``fqt`` torch.compile backend: AOTAutograd with fqtc's passes on the joint forward-backward graph.

Found by ``torch.compile(model, backend="fqt")`` through the ``torch_dynamo_backends`` entry point
(``fqt = "fqtc.backend:fqt_backend"``). This module must not call ``register_backend("fqt")`` itself: Dynamo
registers the entry point when it loads it, and a second registration raises ``duplicate name: fqt``. Two threads
whose first ``torch.compile(..., backend="fqt")`` calls race both load the entry point and both register it; on
import this module makes a second registration of this same function under ``"fqt"`` harmless
(`_thread_safe_registration`), so every racing thread gets the backend instead of a crash.

Option errors raise `OptionError`, a ``ValueError`` Dynamo passes through unchanged: at the first call for
``torch.compile(..., options=...)`` (torch hands a backend its options only then), at once for `fqtc.compile`.

Flow: Dynamo FX graph -> ``aot_autograd(partition_fn=...)`` traces the joint graph -> inside ``partition_fn``
the passes (sites, assign, rewrite, save) run on it -> min-cut partition -> forward and backward graphs, run as FX
modules (``compiler="eager"``, the CPU reference path) or compiled by Inductor (``compiler="inductor"``).
Inference (no-grad) graphs get the same passes on the forward-only graph.
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.exc import ShortenTraceback
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition
from torch.nn.attention import SDPBackend, sdpa_kernel

import fqtc.ops  # noqa: F401  (registers the fqt:: ops)
from fqtc import coverage
from fqtc.codegen.inductor_cpu import lower_for_inductor
from fqtc.codegen.lower import wrap_compiler
from fqtc.config import FQTConfig
from fqtc.ops.stepcounter import bound, counter_for, counter_of_params, tag_params
from fqtc.passes import PassResult, run_passes
from fqtc.passes.layout import expand_layout
from fqtc.passes.lwq import flat_param_mask
from fqtc.passes.optim_step import mark_optimizer_updates


class OptionError(ValueError, ShortenTraceback):
    """An invalid fqt option. A ``ValueError``; also a Dynamo ``ShortenTraceback``, which Dynamo re-raises as is,
    so the user sees this error (not ``BackendCompilerFailed``) and never a silent fallback to full precision."""

    def __init__(self, message: str) -> None:
        ShortenTraceback.__init__(self, message, first_useful_frame=None)


def _config(options: Mapping[str, Any] | FQTConfig | None) -> FQTConfig:
    try:
        return FQTConfig.from_options(options)
    except ValueError as e:
        if isinstance(e, OptionError):
            raise
        raise OptionError(str(e)) from e


class _Registry(dict):
    """Dynamo's backend registry, where a second registration of `fqt_backend` under ``"fqt"`` is harmless.

    ``register_backend`` raises ``duplicate name`` when the name is present; for ``"fqt"`` holding this module's
    function the membership test answers no, so a racing thread re-stores the same function, and a later lookup
    finds its entry point already consumed (None) and reads the registered function."""

    def __contains__(self, name: object) -> bool:
        if name == "fqt" and dict.get(self, "fqt") is globals().get("fqt_backend"):
            return False
        return dict.__contains__(self, name)


def _thread_safe_registration() -> None:
    """Make concurrent first lookups of ``backend="fqt"`` safe.

    ``torch._dynamo.backends.registry.lookup_backend`` checks the registry, loads the entry point (importing this
    module) and registers the function, without a lock: threads whose first lookups overlap all load it and all
    register, and every registration after the first raises ``duplicate name: fqt``. Each of them runs the
    duplicate check after this module's import has finished, so the registry is swapped for `_Registry` here."""
    from torch._dynamo.backends import registry

    fns = getattr(registry, "_COMPILER_FNS", None)
    if isinstance(fns, dict) and not isinstance(fns, _Registry):
        registry._COMPILER_FNS = _Registry(fns)


@dataclass
class CompiledGraph:
    """What the backend did to one Dynamo graph: the config, the rewritten graphs and every GEMM's record."""

    config: FQTConfig
    param_names: list[str | None]
    joint: fx.GraphModule | None = None
    forward: fx.GraphModule | None = None
    backward: fx.GraphModule | None = None
    inference: fx.GraphModule | None = None
    result: PassResult | None = None
    # the graphs as handed to the graph compiler after fqtc's codegen passes (Inductor receives copies)
    compiled: list[fx.GraphModule] = field(default_factory=list)
    compilers: list[str] = field(default_factory=list)  # "eager" or "inductor", per compiled graph

    @property
    def records(self) -> list[dict]:
        return self.result.records if self.result else []


_history: deque[CompiledGraph] = deque(maxlen=64)
_captures: list[list[CompiledGraph]] = []
_lock = threading.Lock()


def _publish(cg: CompiledGraph) -> None:
    with _lock:
        _history.append(cg)
        for c in _captures:
            c.append(cg)


@contextlib.contextmanager
def capture() -> Iterator[list[CompiledGraph]]:
    """Collect the `CompiledGraph` of every graph the fqt backend compiles inside the ``with`` block."""
    bucket: list[CompiledGraph] = []
    with _lock:
        _captures.append(bucket)
    try:
        yield bucket
    finally:
        with _lock:  # by identity: nested captures hold equal lists
            _captures[:] = [b for b in _captures if b is not bucket]


def compiled_graphs() -> list[CompiledGraph]:
    """The most recent graphs compiled by the fqt backend (bounded history, newest last)."""
    return list(_history)


_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)")


def _param_name(placeholder: fx.Node) -> str:
    """The parameter's FQN (``"net.1.weight"``) from Dynamo's source (``L['self']._modules['net']...``)."""
    ga = placeholder.meta.get("grapharg")
    src = getattr(getattr(ga, "source", None), "name", None)
    if isinstance(src, str) and src.startswith("L["):
        body = src[src.index("]") + 1:]
        parts = [a or b for a, b in _SOURCE_PART.findall(body)]
        if parts:
            return ".".join(parts)
    return placeholder.name  # unknown spelling: keep Dynamo's placeholder name rather than guess


def _owner_module(placeholders: list[fx.Node], is_param: list[bool]) -> torch.nn.Module | None:
    """The ``nn.Module`` whose parameters this Dynamo graph reads (the model being trained), or None.

    Dynamo names each parameter input by its source, rooted in a local of the traced frame (``L['self']...`` in a
    ``forward``, ``L['fn']...`` for a compiled module, ``L['model']...`` in a compiled train step); that local's
    value in the frame Dynamo is translating is the owner.
    """
    from torch._dynamo.source import LocalSource
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    f_locals = getattr(getattr(getattr(tx, "output", None), "root_tx", None), "f_locals", None) or {}
    for ph, param in zip(placeholders, is_param):
        src = getattr(ph.meta.get("grapharg"), "source", None)
        while src is not None and not isinstance(src, LocalSource):
            src = getattr(src, "base", None)
        if param and src is not None and isinstance(f_locals.get(src.local_name), torch.nn.Module):
            return f_locals[src.local_name]
    return None


def _bind_step(gm: fx.GraphModule, advance: bool) -> None:
    """``advance`` the step counter in the graph's ``fqt::step`` node: a training forward advances it, an inference
    graph only reads it (`fqtc.ops.stepcounter`)."""
    for n in gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.step.default):
        n.args = (n.args[0], advance)
    gm.recompile()


def _with_step_counter(compiled: Callable, example_inputs: list[Any], is_param: list[bool],
                       owner: torch.nn.Module | None) -> Callable:
    """``compiled`` run bound to the step counter of the model whose parameters each call receives."""
    idx = [i for i, p in enumerate(is_param) if p][:1]
    if not idx:
        return compiled  # no parameter: the default counter
    levels = 0
    if owner is not None:
        counter = counter_for(owner)
        names = {id(p): n for n, p in getattr(owner, "_orig_mod", owner).named_parameters()}
        name = names.get(id(example_inputs[idx[0]]))
        levels = name.count(".") if name is not None else 0
        tag_params(counter, [p for _, p in getattr(owner, "_orig_mod", owner).named_parameters()])

    def run(*args: Any) -> Any:  # Dynamo calls a backend's callable with the graph inputs, unboxed
        with bound(counter_of_params([args[idx[0]]], levels)):
            return compiled(*args)

    return run


GemmObserver = Callable[[fx.Node, tuple, Any], None]


class _ObservingInterpreter(fx.Interpreter):
    """Runs a forward/backward graph node by node and hands every GEMM node that carries a record to an observer.

    Calibration hook (`fqtc.calibrate`, docs/bit_assignment.md): the observer gets ``(node, args, out)``, the node (its
    ``meta["fqt"]`` record, its symbolic ``meta["val"]``) with the real argument values and result of this step.
    """

    def __init__(self, gm: fx.GraphModule, observer: GemmObserver) -> None:
        super().__init__(gm)
        self.observer = observer

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function" and "role" in n.meta.get("fqt", {}):
            args, _ = self.fetch_args_kwargs_from_env(n)  # still in env: freed only after run_node returns
            self.observer(n, args, out)
        return out


def _resolve_compiler(config: FQTConfig, gm: fx.GraphModule, example_inputs: Any) -> str:
    """``config.compiler`` with ``auto`` resolved for this graph (see `FQTConfig`)."""
    if config.compiler != "auto":
        return config.compiler
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
    # the LWQ update mutates the latent storage in place: it stays one fused op, run as an FX call
    lwq_step = bool(gm.graph.find_nodes(op="call_function", target=torch.ops.fqt.lwq_update.default))
    return "eager" if on_cuda or lwq_step else "inductor"


def _make_compiler(config: FQTConfig, observer: GemmObserver | None = None,
                   cg: CompiledGraph | None = None) -> Callable:
    """The fw/bw graph compiler: FX modules (``eager``, with the calibration observer when given) or Inductor."""

    def eager(gm: fx.GraphModule, example_inputs: Any) -> Callable:
        if observer is not None:
            interp = _ObservingInterpreter(gm, observer)
            return make_boxed_func(lambda *args: interp.run(*args))
        return make_boxed_func(gm)

    def inductor(gm: fx.GraphModule, example_inputs: Any) -> Callable:
        from torch._inductor.compile_fx import compile_fx_inner

        # CPU: fqt ops become aten ops Inductor fuses with their producers (fqtc/codegen/inductor_cpu.py)
        gm, done = lower_for_inductor(gm)
        if cg is not None:
            cg.compiled.append(gm)
            for rec in cg.records:
                if rec.get("node") in done["codegen"]:
                    rec["codegen"] = done["codegen"][rec["node"]]
        if done["fallback_random"]:  # CPU dropout runs the eager kernel (inductor_cpu.lower_for_inductor)
            import torch._inductor.config as inductor_config

            with inductor_config.patch(fallback_random=True):
                return compile_fx_inner(gm, example_inputs)
        return compile_fx_inner(gm, example_inputs)

    def compile_graph(gm: fx.GraphModule, example_inputs: Any) -> Callable:
        which = "eager" if observer is not None else _resolve_compiler(config, gm, example_inputs)
        if cg is not None:
            cg.compilers.append(which)
        return (inductor if which == "inductor" else eager)(gm, example_inputs)

    return compile_graph


_FIND_OWNER = object()


def fqt_backend(gm: fx.GraphModule, example_inputs: list[Any], options: Mapping[str, Any] | None = None,
                observer: GemmObserver | None = None, *, owner: Any = _FIND_OWNER, **_: Any) -> Callable:
    """``torch.compile`` backend entry point. ``options`` is parsed by `FQTConfig.from_options`.

    ``observer`` (calibration, `fqtc.calibrate`): called with every recorded GEMM node and its real values at run time;
    needs ``compiler="eager"``. ``owner``: the module whose parameters the graph reads, when the graph is compiled
    outside Dynamo's translation of the frame (found from that frame otherwise).
    """
    config = _config(options)
    if config.bits.auto and config.calibration is None and observer is None:
        return _calibrating_online(gm, example_inputs, config)
    # the layout of the Linear sites, measured on this graph's first batch where it is "auto" (passes/layout.py)
    config = expand_layout(config, gm, example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    is_param = [isinstance(x, torch.nn.Parameter) for x in example_inputs]
    names = [_param_name(p) if i < len(is_param) and is_param[i] else None for i, p in enumerate(placeholders)]
    cg = CompiledGraph(config, names)
    if owner is _FIND_OWNER:
        owner = _owner_module(placeholders, is_param)
    # CUDA graphs: fuse quantize->qgemm chains into the Triton kernels first (fqtc/codegen/lower.py, docs/kernels.md)
    compiler = wrap_compiler(_make_compiler(config, observer, cg))

    def weight_nodes_of(graph: fx.Graph) -> set[fx.Node]:
        phs = [n for n in graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
        # LatentWeight parameters arrive flattened into their inner tensors (fqtc/passes/lwq.py)
        flat = flat_param_mask(example_inputs, is_param)
        return {n for i, n in enumerate(phs) if i < len(flat) and flat[i]}

    def partition_fn(joint: fx.GraphModule, joint_inputs: Any, **kwargs: Any):
        cg.result = run_passes(joint, config, weight_nodes_of(joint.graph))
        _bind_step(joint, advance=True)
        cg.joint = joint
        part = min_cut_rematerialization_partition if config.partitioner == "min_cut" else default_partition
        fw, bw = part(joint, joint_inputs, **kwargs)
        cg.forward, cg.backward = fw, bw
        _publish(cg)
        return fw, bw

    def inference_compiler(fw: fx.GraphModule, inputs: Any) -> Callable:
        cg.result = run_passes(fw, config, weight_nodes_of(fw.graph))
        _bind_step(fw, advance=False)
        # a compiled fqtc.optim step: record its fused latent-weight updates (passes/optim_step.py)
        cg.result.counters.update(mark_optimizer_updates(fw))
        cg.inference = fw
        _publish(cg)
        return compiler(fw, inputs)

    # The joint graph is traced without Inductor's decompositions whichever compiler runs it: fqtc's passes see the
    # same graph (native norm/activation backward ops, whose saved inputs passes/save_act.py stores in 8 bits) and
    # make the same decisions for eager and Inductor; the Inductor path decomposes after the passes.
    aot = aot_autograd(fw_compiler=compiler, bw_compiler=compiler, inference_compiler=inference_compiler,
                       partition_fn=partition_fn, keep_inference_input_mutations=True)
    # Trace attention in its math form so Q.K^T and P.V (and their backward products) are visible bmm's.
    with sdpa_kernel(SDPBackend.MATH):
        compiled = aot(gm, example_inputs)
    coverage.record(x for x, p in zip(example_inputs, is_param) if p)
    run = _with_step_counter(compiled, example_inputs, is_param, owner)
    if owner is None or observer is not None:
        return run
    owner_ref = weakref.ref(getattr(owner, "_orig_mod", owner))

    def run_and_check(*args: Any) -> Any:
        # no silent full precision: once a training call's backward starts, warn about GEMM modules of the model
        # that no fqt graph received (fqtc/coverage.py)
        out = run(*args)
        m = owner_ref()
        if m is not None and torch.is_grad_enabled():
            coverage.check_after_backward(m, out)
        return out

    return run_and_check


def _calibrating_online(gm: fx.GraphModule, example_inputs: list[Any], config: FQTConfig) -> Callable:
    """``bits="auto"`` without ``calibration``: the graph first runs in full precision under the observer of
    `fqtc.calibrate.GradientStats` (the statistics ``fqtc.calibrate`` collects); once ``config.calibration_steps``
    backward passes were observed, the next training call compiles the graph once more with the solved bits and
    every later call runs that graph (docs/bit_assignment.md, "Online calibration")."""
    import copy
    import dataclasses

    from fqtc.config import BitConfig
    from fqtc.passes.calib_stats import GradientStats

    stats = GradientStats(config)
    pristine = copy.deepcopy(gm)  # AOTAutograd consumes the graph it compiles
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = _owner_module(placeholders, [isinstance(x, torch.nn.Parameter) for x in example_inputs])
    owner_ref = weakref.ref(found) if found is not None else None
    fp = dataclasses.replace(config, bits=BitConfig.parse("fp"), compiler="eager", calibration=None)
    with capture() as cgs:
        fp_run = fqt_backend(gm, example_inputs, fp, observer=stats.observe)
    state: dict[str, Any] = {"run": fp_run}
    lock = threading.Lock()

    @torch._dynamo.disable  # compiling from inside a compiled frame: keep Dynamo out of AOTAutograd's tracing
    def solve() -> None:
        with lock:
            if state["run"] is fp_run:
                cal = stats.result(cgs, stats.steps_seen())
                state["run"] = fqt_backend(pristine, example_inputs, dataclasses.replace(config, calibration=cal),
                                           owner=owner_ref() if owner_ref is not None else None)

    def run(*args: Any) -> Any:
        if state["run"] is fp_run and torch.is_grad_enabled() and stats.steps_seen() >= config.calibration_steps:
            solve()
        return state["run"](*args)

    return run


_thread_safe_registration()
