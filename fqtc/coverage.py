"""No silent full precision: find the GEMM modules whose parameters reached no fqt graph, and warn once.

The fqt backend quantizes only what Dynamo hands it. GEMMs can stay outside every fqt graph, in full precision:

- ``rnn``: Dynamo does not trace ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``. It breaks the graph at the call and skips the
  rest of the frame, so the recurrent layer and every layer after it run eagerly in FP32;
- ``skipped``: Dynamo compiled no graph that reads any of the model's parameters (it skipped the frame);
- ``wrapper``: a ``torch.compiler.disable`` wrapper on a module's ``forward`` hid its GEMMs from Dynamo;
- ``graph_break``: a graph break (or a wrapper Dynamo does not trace) left the module's GEMMs between graphs.

The backend records every parameter its graphs receive (`record`); `check` compares a model's GEMM modules
against them and warns once per model and cause with a `FullPrecisionWarning` naming the modules, the reason and
the fix; `outside` returns the same findings for `fqtc.explain` (docs/inspect_export.md).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from typing import Any, Iterable, Iterator

import torch
from torch import nn

GEMM_MODULES: tuple[type, ...] = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.RNNBase, nn.RNNCellBase,
                                  nn.MultiheadAttention)

REASONS: dict[str, tuple[str, str]] = {
    "rnn": ("Dynamo does not trace nn.LSTM/nn.GRU/nn.RNN: it breaks the graph at the call and skips the rest of the "
            "frame, so the recurrent layer and the layers after it run eagerly in full precision",
            "write the recurrence with nn.LSTMCell/nn.Linear in a Python loop, or move the recurrent layer into its "
            "own module and compile the other layers separately (model.head.compile(backend='fqt'))"),
    "skipped": ("Dynamo compiled no graph that reads the model's parameters (it skipped the frame)",
                "run torch._dynamo.explain(model)(*inputs) to see why and remove the cause, or compile the "
                "submodules that Dynamo can trace"),
    "wrapper": ("a torch.compiler.disable wrapper hides the module's forward from Dynamo",
                "remove the wrapper, or compile the wrapped module itself with backend='fqt'"),
    "graph_break": ("a graph break or a wrapper Dynamo does not trace (a custom autograd.Function, a hook) left "
                    "these GEMMs outside the fqt graphs",
                    "remove the graph break (torch._dynamo.explain(model)(*inputs) lists them; "
                    "torch.compile(..., fullgraph=True) makes it an error), or compile the module itself"),
}


class FullPrecisionWarning(UserWarning):
    """A compiled model ran GEMMs in full precision outside every fqt graph (`fqtc.coverage`)."""


_lock = threading.Lock()
_consumed: dict[int, weakref.ref] = {}  # id(param) -> weakref(param): the parameters some fqt graph received
_warned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> causes already warned about
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> True once checked after a backward


def _forget(key: int, table: dict[int, Any] | None = None) -> Any:
    def drop(_: weakref.ref) -> None:
        with _lock:
            (_consumed if table is None else table).pop(key, None)
    return drop


def record(params: Iterable[torch.Tensor]) -> None:
    """Note that an fqt graph received these parameters (called by the backend for every graph it compiles)."""
    with _lock:
        for p in params:
            ref = _consumed.get(id(p))
            if ref is None or ref() is not p:
                _consumed[id(p)] = weakref.ref(p, _forget(id(p)))


def _received(p: torch.Tensor | None) -> bool:
    ref = _consumed.get(id(p)) if p is not None else None
    return ref is not None and ref() is p


def _was_consumed(p: torch.Tensor) -> bool:
    if _received(p):
        return True
    # FSDP2: the module holds the sharded DTensor, the graphs receive its all-gathered (unsharded) parameter
    full = _fsdp_unsharded.get(id(p))
    return full is not None and full[0]() is p and _received(full[1]())


# id(sharded parameter) -> (weakref(sharded), weakref(unsharded parameter)) of FSDP2 parameters (`_map_fsdp`)
_fsdp_unsharded: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _map_fsdp(model: nn.Module) -> None:
    """Link each FSDP2 sharded parameter of ``model`` to the unsharded parameter FSDP hands the forward (FSDP2 keeps
    one unsharded parameter object per sharded one and only frees its storage between uses)."""
    for m in model.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            groups = get_state()._fsdp_param_groups
        except Exception:  # noqa: BLE001  (FSDP internals: an unknown layout only loses the mapping)
            continue
        for group in groups or ():
            for fp in getattr(group, "fsdp_params", ()):
                sharded, full = getattr(fp, "sharded_param", None), getattr(fp, "_unsharded_param", None)
                if sharded is not None and full is not None:
                    key = id(sharded)
                    _fsdp_unsharded[key] = (weakref.ref(sharded, _forget(key, _fsdp_unsharded)), weakref.ref(full))


def _disabled(m: nn.Module) -> bool:
    fwd = m.__dict__.get("forward", type(m).forward)
    return bool(getattr(fwd, "_torchdynamo_disable", False))


def outside(model: nn.Module) -> list[dict[str, str]]:
    """The GEMM modules of ``model`` with a trainable parameter that no fqt graph received: one dict per module
    with ``module`` (its path), ``type``, ``cause`` (a key of `REASONS`), ``reason`` and ``fix``."""
    model = getattr(model, "_orig_mod", model)
    _map_fsdp(model)
    modules = list(model.named_modules())
    any_consumed = any(_was_consumed(p) for p in model.parameters())
    rnn = any(isinstance(m, nn.RNNBase) and not any(_was_consumed(p) for p in m.parameters()) for _, m in modules)
    disabled = [name for name, m in modules if _disabled(m)]
    found = []
    for name, m in modules:
        if not isinstance(m, GEMM_MODULES):
            continue
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own or any(_was_consumed(p) for p in own):
            continue
        if not any_consumed:
            cause = "skipped"
        elif any(name == d or name.startswith(d + ".") or d == "" for d in disabled):
            cause = "wrapper"
        elif rnn:
            cause = "rnn"
        else:
            cause = "graph_break"
        reason, fix = REASONS[cause]
        found.append({"module": name or type(m).__name__, "type": type(m).__name__, "cause": cause,
                      "reason": reason, "fix": fix})
    return found


def check(model: nn.Module, stacklevel: int = 2) -> list[dict[str, str]]:
    """Warn (`FullPrecisionWarning`, once per model and cause) about the GEMM modules of ``model`` that ran
    outside every fqt graph; returns `outside`'s findings."""
    model = getattr(model, "_orig_mod", model)
    found = outside(model)
    by_cause: dict[str, list[str]] = {}
    for f in found:
        by_cause.setdefault(f["cause"], []).append(f["module"])
    with _lock:
        done = _warned.setdefault(model, set())
        new = [c for c in by_cause if c not in done]
        done.update(new)
    for cause in new:
        names = by_cause[cause]
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        reason, fix = REASONS[cause]
        warnings.warn(f"fqtc: {type(model).__name__} trains these GEMM modules in full precision, outside every "
                      f"fqt graph: {shown}. Reason: {reason}. Fix: {fix}. fqtc.explain(model, *inputs) lists them "
                      "(docs/inspect_export.md).", FullPrecisionWarning, stacklevel=stacklevel)
    return found


def check_after_backward(owner: nn.Module, outputs: Any) -> None:
    """Check ``owner`` once, when the gradient reaches one of ``outputs`` (a training forward has then run to its
    end: every graph it compiles exists). Called by the backend after each training call until the check ran."""
    if _checked.get(owner):
        return
    t = next((o for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])
              if isinstance(o, torch.Tensor) and o.requires_grad), None)
    if t is None:
        return
    ref = weakref.ref(owner)

    def hook(grad: torch.Tensor) -> None:
        m = ref()
        if m is not None and not _checked.get(m):
            _checked[m] = True
            check(m, stacklevel=3)

    t.register_hook(hook)


def watch(compiled: nn.Module, model: nn.Module) -> None:
    """Check ``model`` after the first training call of ``compiled`` (`fqtc.compile`'s module): this also sees a
    model for which Dynamo compiled no graph at all, which the backend never hears of."""
    ref = weakref.ref(model)

    def after(mod: nn.Module, args: Any, out: Any) -> None:
        m = ref()
        if m is None or not torch.is_grad_enabled() or not mod.training:
            return
        handle.remove()
        _checked[m] = True
        check(m, stacklevel=4)

    handle = compiled.register_forward_hook(after)


@contextlib.contextmanager
def silenced(model: nn.Module) -> Iterator[None]:
    """No `FullPrecisionWarning` for ``model`` inside the block, and its warn-once state as before (inspection,
    export: `fqtc.explain` reports what ran outside instead, and later training still warns)."""
    model = getattr(model, "_orig_mod", model)
    with _lock:
        checked, warned = _checked.get(model), set(_warned.get(model, ()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FullPrecisionWarning)
            yield
    finally:
        with _lock:
            if checked is None:
                _checked.pop(model, None)
            else:
                _checked[model] = checked
            _warned[model] = warned
