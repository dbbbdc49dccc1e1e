"""Test helpers importable from any test module (``from tests.helpers import ...``)."""

from __future__ import annotations

from functools import partial

import torch

from fqtc.backend import capture, fqt_backend


class ResidualBlock(torch.nn.Module):
    """``x + b(relu(a(x)))`` with Linear(16, 32) and Linear(32, 16): the block the data-parallel tests shard."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20*log10(||ref|| / ||ref - x||) (torchao's compute_error)."""
    ref, x = ref.detach().double(), x.detach().double()
    err = (ref - x).norm()
    return float("inf") if err == 0 else float(20 * torch.log10(ref.norm() / err))


def compile_fqt(model, options=None):
    """torch.compile with the fqt backend and explicit options (bypasses the entry-point lookup)."""
    return torch.compile(model, backend=partial(fqt_backend, options=options))


def run_and_capture(model, inputs, options=None, grad=None):
    """Compile ``model`` with fqt, run forward (+ backward with ``grad`` or sum()), return (out, CompiledGraphs)."""
    with capture() as cgs:
        out = compile_fqt(model, options)(*inputs)
        if out.requires_grad:
            out.backward(grad if grad is not None else torch.ones_like(out))
    return out, cgs


def gemm_evidence(gm) -> list[tuple[str, list[str]]]:
    """(op name, per-operand evidence) of every fqt GEMM op in a forward/backward graph (`fqtc.passes.verify`):
    ``"int8"`` codes with a scale, ``"dequantized"`` output of an fqt quantizer, or ``"float"``."""
    from fqtc.passes.verify import GEMM_OPS, operand_evidence

    return [(n.target.name(), operand_evidence(n)) for n in gm.graph.nodes
            if n.op == "call_function" and n.target in GEMM_OPS]


def assert_quantized_graphs(cg, n_forward: int, n_backward: int | None = None) -> None:
    """Evidence that a compiled graph really runs quantized GEMMs: ``n_forward`` / ``n_backward`` fqt GEMM ops in
    the forward / backward graphs (None: not checked), every one reading int8 codes with scales, no aten GEMM left,
    and every GEMM record's status ``quantized`` (set from the graph by `fqtc.passes.verify`)."""
    aten = torch.ops.aten
    gemms = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.convolution.default,
             aten.convolution_backward.default)
    for gm, n in ((cg.forward if cg.forward is not None else cg.inference, n_forward), (cg.backward, n_backward)):
        if n is None:
            continue
        ev = gemm_evidence(gm)
        assert len(ev) == n, ev
        assert all(e == ["int8", "int8"] for _, e in ev), ev
        assert not [x for x in gm.graph.nodes if x.op == "call_function" and x.target in gemms]
    assert cg.records and all(r["status"] == "quantized" and "evidence" in r for r in cg.records), cg.records


def loopback_ifname() -> str:
    """Name of the loopback network interface (``lo`` on Linux)."""
    import socket

    names = [n for _, n in socket.if_nameindex() if n.startswith("lo")]
    return names[0] if names else "lo"


def init_gloo(rank: int, port: int, world_size: int = 2) -> None:
    """``init_process_group("gloo")`` for ranks on this machine, pinned to the loopback interface.

    Gloo otherwise binds the address the machine's hostname resolves to; where that address is not reachable from
    the machine itself (seen on CI machines), every collective waits for the 30-minute default timeout. A short
    timeout turns any remaining hang into an error."""
    import datetime
    import faulthandler
    import os
    import signal

    import torch._inductor.config as inductor_config
    import torch.distributed as dist

    # a rank the parent finds still running at its deadline prints every thread's stack before it is killed
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # Inductor compiles in the rank's own process: no compile-worker pool per rank (two ranks on two cores)
    inductor_config.compile_threads = 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_ifname())
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))


def exit_rank() -> None:
    """End a rank that has saved its results and destroyed its process group, without tearing down its objects.

    Destroying a DDP module or compiled graphs after the process group is gone can block in C++ destructors (seen
    on CI: the worker had returned, its result was saved, and the process never exited). What a test checks is in
    the saved file, so the rank leaves at once."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo_ranks(worker, out: str, nprocs: int = 2, timeout_s: float = 300.0) -> list:
    """Run ``worker(rank, port, out)`` in ``nprocs`` spawned processes (each calls `init_gloo`) and return what each
    saved with ``torch.save(..., f"{out}.{rank}")``. Ranks still running after ``timeout_s`` are killed and the
    test fails (a hung collective must not stall the suite)."""
    import os
    import socket
    import time

    import pytest
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    old = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_ifname())  # inherited by the spawned ranks
    try:
        ctx = mp.start_processes(worker, args=(port, out), nprocs=nprocs, join=False, start_method="spawn")
    finally:
        if old is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            import signal

            for p in ctx.processes:  # their stacks (faulthandler, registered by init_gloo) go to the test's stderr
                if p.is_alive():
                    os.kill(p.pid, signal.SIGUSR1)
            time.sleep(2)
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{nprocs} gloo ranks of {worker.__module__}.{worker.__name__} still running after "
                        f"{timeout_s:.0f} s: killed")
    return [torch.load(f"{out}.{r}") for r in range(nprocs)]
