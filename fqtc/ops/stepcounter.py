"""The stochastic-rounding step counter, one per trained model, and the ``fqt::step`` op that reads it.

Stochastic rounding keys on (seed, step, stream, element) (`fqtc.quant.rng`): the step makes draws differ from one
training step to the next (a repeating stream would correlate the rounding errors of every step) and the same seed
replays them. The step belongs to the model being trained:

- the fqt backend gives each compiled model (the ``nn.Module`` whose parameters a Dynamo graph reads) its own
  `StepCounter`; graphs without an owning module (a compiled function) share the process's default counter;
- a training graph's forward reads the step and advances it; an inference graph (``torch.no_grad()``,
  ``torch.inference_mode()``) and a forward of a module in ``eval()`` mode read it without advancing it;
- the value is the module's persistent buffer ``fqt_step`` (0-d int64): ``model.state_dict()`` saves it and
  ``load_state_dict`` restores it, so a resumed run continues the exact stream. The Python int is authoritative (no
  device sync per step); each change is written to the buffer, which ``load_state_dict`` reads back.

A graph calls ``torch.ops.fqt.step.default(device, advance)``; the backend runs each compiled call `bound` to its
model's counter, found through the parameters the call receives (Dynamo shares one graph among instances of a
class, so the counter is a run-time lookup, never a constant in the graph).
"""

from __future__ import annotations

import contextlib
import gc
import threading
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor

BUFFER = "fqt_step"  # the buffer name in the owning module's state_dict
_MAX_STEP = 2**63 - 1


class StepCounter:
    """One model's stochastic-rounding step: a Python int guarded by a lock, mirrored in its ``fqt_step`` buffer."""

    def __init__(self, module: torch.nn.Module | None = None, value: int = 0) -> None:
        self.value = value
        self.lock = threading.Lock()
        self.module = weakref.ref(module) if module is not None else None

    def take(self, advance: bool) -> int:
        """The current step; advanced by one when ``advance`` (a training forward) and the owner is in train mode."""
        mod = self.module() if self.module is not None else None
        with self.lock:
            value = self.value
            if advance and (mod is None or mod.training):
                self.value += 1
                self._mirror(mod)
        return value

    def set(self, value: int) -> None:
        with self.lock:
            self.value = value
            self._mirror(self.module() if self.module is not None else None)

    def _mirror(self, mod: torch.nn.Module | None) -> None:
        # the buffer follows every change (an asynchronous fill, no host sync), so copies of the module carry it
        buf = mod._buffers.get(BUFFER) if mod is not None else None
        if buf is not None:
            with torch.no_grad():
                buf.fill_(self.value)


# Counters are found by the id of their module and of the parameters they were found through (never stored on the
# objects themselves, so modules still deepcopy and pickle; a copy gets its own counter, starting from its buffer).
_default = StepCounter()
_by_module: dict[int, StepCounter] = {}
_by_param: dict[int, StepCounter] = {}
_registry_lock = threading.RLock()
_last: list[StepCounter] = [_default]  # the counter a graph read most recently (get_step() without a model)
_current = threading.local()  # the counter of the compiled call running in this thread (`bound`)


def _check_step(value: Any, who: str) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_STEP:
        raise ValueError(f"{who}: step must be an int in [0, 2**63 - 1], got {value!r}")
    return value


def counter_for(module: torch.nn.Module) -> StepCounter:
    """The step counter owned by ``module``, created on first use together with its ``fqt_step`` buffer (an existing
    buffer, e.g. of a loaded or copied model, gives the initial value) and the load_state_dict hooks that read
    it back."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"fqtc: expected a torch.nn.Module, got {type(module).__name__}")
    module = getattr(module, "_orig_mod", module)  # a torch.compile'd module: its original module owns the counter
    with _registry_lock:
        counter = _by_module.get(id(module))
        if counter is not None:
            return counter
        buf = module._buffers.get(BUFFER)
        counter = StepCounter(module, _check_step(int(buf), "fqt_step buffer") if buf is not None else 0)
        _by_module[id(module)] = counter
        weakref.finalize(module, _by_module.pop, id(module), None)
    if buf is None:
        module.register_buffer(BUFFER, torch.tensor(counter.value, dtype=torch.int64))
    if _read_buffer not in module._load_state_dict_post_hooks.values():
        module.register_load_state_dict_pre_hook(_fill_missing)
        module.register_load_state_dict_post_hook(_read_buffer)
    return counter


def _fill_missing(module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # a submodule compiled on its own (e.g. each block, compiled before FSDP2 shards it) gets its counter at its
    # first compiled call; a checkpoint taken after training holds it, so a fresh model loading that checkpoint
    # creates the counter here, before load_state_dict reaches the submodule
    for k in state_dict:
        if k.startswith(prefix) and k.endswith("." + BUFFER):
            try:
                sub = module.get_submodule(k[len(prefix):-len(BUFFER) - 1])
            except AttributeError:
                continue
            if BUFFER not in sub._buffers:
                counter_for(sub)
    # a checkpoint written before the model was trained with fqt (or by plain PyTorch) has no step: keep ours
    key, buf = prefix + BUFFER, module._buffers.get(BUFFER)
    if key not in state_dict and buf is not None:
        counter = _by_module.get(id(module))
        state_dict[key] = torch.tensor(counter.value if counter is not None else int(buf), dtype=torch.int64)


def _read_buffer(module: torch.nn.Module, incompatible_keys: Any) -> None:
    counter, buf = _by_module.get(id(module)), module._buffers.get(BUFFER)
    if counter is not None and buf is not None:
        counter.set(_check_step(int(buf), "load_state_dict"))


def _parent_modules(obj: Any) -> list[torch.nn.Module]:
    """The modules holding ``obj`` as a parameter or submodule (found through the garbage collector's referrers:
    ``obj`` <- the ``_parameters``/``_modules`` dict <- the module, or its ``__dict__``)."""
    found: list[torch.nn.Module] = []
    for d in gc.get_referrers(obj):
        if not isinstance(d, dict):
            continue
        for holder in gc.get_referrers(d):
            cands = [holder] if isinstance(holder, torch.nn.Module) else (
                [m for m in gc.get_referrers(holder) if isinstance(m, torch.nn.Module) and m.__dict__ is holder]
                if isinstance(holder, dict) else [])
            for m in cands:
                if (m._parameters is d or m._modules is d) and all(m is not f for f in found):
                    found.append(m)
    return found


def counter_of_params(params: list[Tensor], levels: int) -> StepCounter:
    """The counter of the model whose parameters ``params`` a compiled graph receives: found by the first
    parameter's id, else by walking ``levels`` modules up from the parameter's module (the depth at which the
    graph's owner held it when the graph was compiled; a second instance of the same class shares that graph)."""
    if not params:
        return _default
    counter = _by_param.get(id(params[0]))
    if counter is not None:
        return counter
    with _registry_lock:
        mods = _parent_modules(params[0])
        for _ in range(levels):
            if not mods:
                break
            up = _parent_modules(mods[0])
            if not up:
                break
            mods = up
        counter = counter_for(mods[0]) if mods else _default
        tag_params(counter, params)
    return counter


def tag_params(counter: StepCounter, params: list[Tensor]) -> None:
    """Remember that ``params`` belong to ``counter``'s model (the next calls find the counter at once)."""
    with _registry_lock:
        for p in params:
            if id(p) not in _by_param:
                _by_param[id(p)] = counter
                weakref.finalize(p, _by_param.pop, id(p), None)


@contextlib.contextmanager
def bound(counter: StepCounter) -> Iterator[None]:
    """Run a compiled call whose ``fqt::step`` nodes read ``counter`` (per thread)."""
    prev = getattr(_current, "counter", None)
    _current.counter = counter
    try:
        yield
    finally:
        _current.counter = prev


def get_step(model: torch.nn.Module | None = None) -> int:
    """The step number the next training forward of ``model`` will use.

    Without ``model``: the step of the counter a compiled graph read most recently (in a one-model script, that
    model's step; the process's default counter before any graph ran, or once that model is gone).
    """
    if model is not None:
        return counter_for(model).value
    last = _last[0]
    if last.module is not None and last.module() is None:  # that model is gone: the default counter
        return _default.value
    return last.value


def set_step(step: int, model: torch.nn.Module | None = None) -> None:
    """Set the next step number of ``model``'s counter (resume a stochastic-rounding stream where it stopped).

    Without ``model``: set every counter of the process (each compiled model's and the default one) to ``step``.
    """
    step = _check_step(step, "set_step")
    if model is not None:
        counter_for(model).set(step)
        return
    with _registry_lock:
        counters = [_default, *_by_module.values()]
    for c in counters:
        c.set(step)


def snapshot() -> tuple[list[tuple[StepCounter, int]], StepCounter]:
    """Every counter with its value (`restore` puts them back): tools that run a model without training it."""
    with _registry_lock:
        return [(c, c.value) for c in [_default, *_by_module.values()]], _last[0]


def restore(state: tuple[list[tuple[StepCounter, int]], StepCounter]) -> None:
    """Put back the values `snapshot` returned; counters created since are removed with their ``fqt_step`` buffer
    (the inspected model leaves as it came)."""
    values, last = state
    kept = {id(c) for c, _ in values}
    for c, v in values:
        c.set(v)
    with _registry_lock:
        for key, c in list(_by_module.items()):
            mod = c.module() if c.module is not None else None
            if id(c) not in kept:
                del _by_module[key]
                if mod is not None:
                    mod._buffers.pop(BUFFER, None)
        for key, c in list(_by_param.items()):
            if id(c) not in kept:
                del _by_param[key]
        _last[0] = last


@torch.library.custom_op("fqt::step", mutates_args=())
def step(device: torch.device, advance: bool = True) -> Tensor:
    """The current step (0-d int64) of the model whose compiled call is running in this thread (`bound`; the
    default counter outside one), advanced when ``advance``. Saved for backward, never recomputed, so the forward
    and backward of one training step draw from the same stream."""
    counter = getattr(_current, "counter", None) or _default
    _last[0] = counter
    return torch.tensor(counter.take(advance), dtype=torch.int64, device=device)


@step.register_fake
def _(device: torch.device, advance: bool = True) -> Tensor:
    return torch.empty((), dtype=torch.int64, device=device)
