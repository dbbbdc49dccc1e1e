"""Shared test set-up.

``TRITON_INTERPRET=1`` must be set before any Triton kernel is defined (the interpreter is chosen when
``@triton.jit`` runs), so it is set here, before test modules import fqtc.codegen.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _reset():
    """Dynamo caches compiled graphs per code object; a graph compiled with one options dict would be reused by a
    later test that compiles the same function with other options. Reset before each test, and pin matmul
    precision so eager references are computed the same way in every test."""
    torch._dynamo.reset()
    torch.set_float32_matmul_precision("highest")
    yield
    torch._dynamo.reset()

