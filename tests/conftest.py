"""Shared test set-up.

``TRITON_INTERPRET=1`` must be set before any Triton kernel is defined (the interpreter is chosen when
``@triton.jit`` runs), so it is set here, before test modules import fqtc.codegen. With ``FQTC_TEST_DEVICE=cuda``
the kernels are compiled for the GPU instead and tests/codegen/conftest.py runs them on CUDA copies of the tests'
CPU tensors (docs/kernels.md, "Running the kernel tests on a GPU").
"""

import os

if os.environ.get("FQTC_TEST_DEVICE", "cpu") == "cuda":
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite runs fqt graphs as FX modules (``compiler="eager"``) unless a test asks for another compiler: the
# default ``auto`` compiles CPU graphs with Inductor (tens of seconds per model on two cores), and
# tests/compile/test_inductor_cpu.py shows that path computes the eager path's bits.
os.environ.setdefault("FQTC_COMPILER", "eager")

import pytest  # noqa: E402
import torch  # noqa: E402

# tests/test_mutations.py runs chosen tests in a subprocess against a deliberately broken fqtc (tests/mutations.py)
if os.environ.get("FQTC_MUTATION"):
    from tests.mutations import install

    install(os.environ["FQTC_MUTATION"])


@pytest.fixture(autouse=True)
def _reset():
    """Dynamo caches compiled graphs per code object; a graph compiled with one options dict would be reused by a
    later test that compiles the same function with other options. Reset before each test, and pin matmul
    precision so eager references are computed the same way in every test."""
    torch._dynamo.reset()
    torch.set_float32_matmul_precision("highest")
    yield
    torch._dynamo.reset()

