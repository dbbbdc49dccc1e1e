"""Fused Triton kernels for the fqt ops and the pass that selects them on CUDA graphs (docs/kernels.md).

Importing this package never imports Triton: kernels live in submodules (`quantize`, `gemm`) loaded on demand, and
`register_cuda_kernels` installs them as the CUDA implementations of the fqt ops only when Triton and a CUDA device
are present. CPU graphs keep the reference implementations (`fqtc.quant`). docs/kernels.md describes each kernel,
its reference, its traffic model and its tuning constants.
"""

from __future__ import annotations

import importlib.util

import torch

_registered = False


def triton_available() -> bool:
    """Triton is importable (the kernels can be built or interpreted)."""
    return importlib.util.find_spec("triton") is not None


def cuda_kernels_available() -> bool:
    """Triton is importable and a CUDA device is present: the fused kernels can run for real."""
    return triton_available() and torch.cuda.is_available()


def register_cuda_kernels(force: bool = False) -> bool:
    """Register the Triton kernels as the ``cuda`` implementations of ``fqt::quantize``, ``fqt::qgemm``,
    ``fqt::qgemm_fused_quant``, ``fqt::grad_quantize`` and ``fqt::bhq`` (`fqtc.codegen.impls.CUDA_IMPLS`).
    Idempotent; returns whether they are registered.

    Without CUDA (or Triton) nothing is registered and CUDA tensors (if any) keep the reference implementations.
    ``force`` registers even without a CUDA device (for tests of the registration itself).
    """
    global _registered
    if _registered:
        return True
    if not (triton_available() and (force or torch.cuda.is_available())):
        return False
    import fqtc.ops  # noqa: F401  (the ops must exist before kernels are registered for them)
    from fqtc.codegen import impls

    for op, fn in impls.CUDA_IMPLS.items():
        ns, name = op.split("::")
        if hasattr(getattr(torch.ops, ns), name):  # ops of features not installed are skipped
            torch.library.register_kernel(op, "cuda")(fn)
    _registered = True
    return True


__all__ = ["cuda_kernels_available", "register_cuda_kernels", "triton_available"]
