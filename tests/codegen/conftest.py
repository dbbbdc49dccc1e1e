"""Kernel tests on a real GPU: ``FQTC_TEST_DEVICE=cuda pytest tests/codegen``.

The kernel tests build CPU tensors and compare a kernel's result with the reference implementation on those
tensors. By default the kernels run in the Triton interpreter on the CPU tensors themselves (tests/conftest.py
sets ``TRITON_INTERPRET=1``). With ``FQTC_TEST_DEVICE=cuda`` every kernel entry point the tests call
(`fqtc.codegen.{quantize,gemm,gradq,lwq,conv,block}` and the ``*_cuda`` op implementations in `fqtc.codegen.impls`) is
wrapped for the session: its CPU tensor arguments are copied to the GPU, the compiled kernel runs there, tensor
results come back to the CPU, and arguments the kernel updated in place (the LWQ update's codes, scales and
optimizer state) are copied back into the caller's tensors. The references keep running on the CPU, so each test
compares the GPU kernel's bits with the CPU reference's bits, unchanged. Calls that already receive CUDA tensors
(a kernel entry point calling another) pass straight through.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import pytest
import torch

ON_CUDA = os.environ.get("FQTC_TEST_DEVICE", "cpu") == "cuda"
_MODULES = ("quantize", "gemm", "gradq", "lwq", "conv", "block", "impls")


def _any_cuda(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.is_cuda
    if isinstance(obj, (list, tuple)):
        return any(_any_cuda(o) for o in obj)
    if isinstance(obj, dict):
        return any(_any_cuda(o) for o in obj.values())
    return False


def _to(obj: Any, device: str, moved: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.device.type == device:
            return obj
        new = obj.to(device)
        moved.append((obj, new))
        return new
    if isinstance(obj, list):
        return [_to(o, device, moved) for o in obj]
    if isinstance(obj, tuple):
        return type(obj)(*(_to(o, device, moved) for o in obj)) if hasattr(obj, "_fields") else \
            tuple(_to(o, device, moved) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, moved) for k, v in obj.items()}
    return obj


def _back(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, list):
        return [_back(o) for o in obj]
    if isinstance(obj, tuple):
        return type(obj)(*(_back(o) for o in obj)) if hasattr(obj, "_fields") else tuple(_back(o) for o in obj)
    return obj


def on_gpu(fn: Callable) -> Callable:
    """``fn`` with its CPU tensor arguments copied to CUDA, its results copied back, in-place updates mirrored."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _any_cuda(args) or _any_cuda(kwargs):
            return fn(*args, **kwargs)
        moved: list[tuple[torch.Tensor, torch.Tensor]] = []
        gargs = _to(list(args), "cuda", moved)
        gkwargs = _to(kwargs, "cuda", moved)
        out = fn(*gargs, **gkwargs)
        torch.cuda.synchronize()
        for cpu_t, gpu_t in moved:  # mirror in-place updates (the LWQ update writes its codes and state)
            g = gpu_t.cpu()
            if not torch.equal(g, cpu_t):
                cpu_t.copy_(g)
        return _back(out)

    wrapper.__fqtc_on_gpu__ = True  # type: ignore[attr-defined]
    return wrapper


@pytest.fixture(scope="session", autouse=True)
def _kernels_on_gpu():
    """Route the kernel entry points through `on_gpu` for the whole session when FQTC_TEST_DEVICE=cuda."""
    if not ON_CUDA:
        yield
        return
    if not torch.cuda.is_available():
        pytest.exit("FQTC_TEST_DEVICE=cuda but torch sees no CUDA device", returncode=2)
    import importlib

    patched: list[tuple[Any, str, Any]] = []
    for name in _MODULES:
        mod = importlib.import_module(f"fqtc.codegen.{name}")
        for attr, fn in list(vars(mod).items()):
            if attr.startswith("_") or not callable(fn) or isinstance(fn, type):
                continue
            if getattr(fn, "__module__", None) != mod.__name__ or hasattr(fn, "fn"):  # skip imports and @triton.jit
                continue
            if name != "impls" and not _public_launcher(mod, attr):
                continue
            patched.append((mod, attr, fn))
            setattr(mod, attr, on_gpu(fn))
    yield
    for mod, attr, fn in patched:
        setattr(mod, attr, fn)


def _public_launcher(mod: Any, attr: str) -> bool:
    """Kernel launchers take tensors and launch Triton; support checks and shape helpers stay as they are."""
    return attr in {"quantize", "scaled_gemm", "qgemm_fused_quant", "grad_quantize", "bhq", "lwq_update",
                    "scaled_conv2d", "scaled_conv2d_input", "scaled_conv2d_weight"}
