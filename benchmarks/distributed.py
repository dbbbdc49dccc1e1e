"""Data-parallel fqt on torch.distributed: bytes communicated per step, step time and loss curves (gloo, CPU).

    .venv/bin/python benchmarks/distributed.py                      # 2 and 4 ranks, 60 steps
    .venv/bin/python benchmarks/distributed.py --world 2 --steps 10 # smoke run, < 1 min

Task: scikit-learn's digits (real 8x8 images, shipped in the scikit-learn wheel; benchmarks/data.py), an MLP
64-512-512-10, SGD (lr 0.05, momentum 0.9), global batch 128 split evenly across the ranks; every configuration
sees the same global batches in the same order.

Configurations (each rank holds one process, one thread):

- ``fp32-ddp``: ``DDP(model)``, FP32;
- ``fqt-ddp``: ``DDP(torch.compile(model, backend="fqt"))``, W8A8G8, fp32 gradient all-reduce;
- ``fqt-ddp-int8``: the same with ``fqtc.distributed.register_int8_grad_comm`` (int8 stochastic-rounding codes);
- ``fp32-fsdp2`` / ``fqt-fsdp2``: ``fully_shard(model)``, then (fqt) ``torch.compile(model, backend="fqt")`` (the
  whole-model order of docs/distributed.md; a bare ``nn.Linear`` compiled and then sharded on its own never reaches
  the backend, so per-layer sharding of this MLP would train in FP32);
- ``fqt-fsdp2-int8``: the same with ``fqtc.distributed.register_int8_fsdp_reduce_scatter`` (int8 codes in the
  gradient reduce-scatter; the parameter all-gathers stay fp32);
- ``fqt-fsdp2-latent``: ``fqtc.prepare(model, {"bits": "W8A8G8L4"})`` (latent weights), then ``fully_shard`` and
  ``torch.compile`` as ``fqt-fsdp2``, stepped by ``fqtc.optim.SGD`` (same hyperparameters): each rank keeps its rows
  as codes and the all-gathers move the integer codes and row scales (docs/distributed.md). A weight whose row
  count does not divide the world size (the 10-row head at 4 ranks) keeps an fp32 weight (the row says so).

Every fqt row also reports how many GEMMs its compiled graphs quantized (``quantized GEMMs``, from the graphs'
records): a configuration that silently trained in FP32 shows 0 there.

Reported per configuration and world size: the median step time (forward + backward + optimizer step; with more
ranks than cores the processes share cores, so 4-rank times are oversubscribed on a 2-core machine); the gradient
and parameter bytes each rank hands to the collectives per step — for DDP measured by a communication hook that
counts every bucket (the fp32 configurations count through a hook doing DDP's default all-reduce); for FSDP2 the
parameter all-gathers measured by a counting all-gather (``set_custom_all_gather``) plus the gradient reduce-scatter,
computed from the parameter count for fp32 gradients and measured by its state for ``fqt-fsdp2-int8``; and the
training loss at a few steps beside the single-process loss of the same model on the whole global batch (fqt
single-process for fqt rows, fqt with latent weights for the latent row, FP32 for FP32 rows), with the largest gap
over all steps.

Beside the table: CPU, int8 dot-product flags, torch version, command, load average before and after, date.
Output: ``<out>/distributed.md`` and ``<out>/distributed.json`` (``--out``, default benchmarks/results).
"""

# no ``from __future__ import annotations``: DDP checks a comm hook's annotations as objects

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = ("fp32-ddp", "fqt-ddp", "fqt-ddp-int8", "fp32-fsdp2", "fqt-fsdp2", "fqt-fsdp2-int8", "fqt-fsdp2-latent")
LATENT = {"bits": "W8A8G8L4"}
GLOBAL_BATCH = 128
REPORT_STEPS = (0, 10, 20, 40, 59)


class _MLP(nn.Module):
    """64-512-512-10 ReLU MLP (a module with its own forward: FSDP2's ``fully_shard`` on an ``nn.Sequential`` root
    left nothing for the fqt backend to compile under torch 2.13, so the benchmark would train FP32)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 512), nn.Linear(512, 512), nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _MLP()


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from benchmarks.data import load_digits

    d = load_digits()
    x = d.x_train.flatten(1)
    y = d.y_train
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (GLOBAL_BATCH,), generator=g)
        out.append((x[idx], y[idx]))
    return out


class _Counter:
    """DDP communication hook state: counts the bytes handed to the collectives (fp32 default all-reduce)."""

    def __init__(self) -> None:
        self.payload_bytes = 0


def _counting_allreduce(state: _Counter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buf = bucket.buffer()
    state.payload_bytes += buf.numel() * buf.element_size()
    return dist.all_reduce(buf / dist.get_world_size(), async_op=True).get_future().then(lambda f: f.value()[0])


class _CountingAllGather:
    """FSDP2's default all-gather, counting the bytes this rank hands to it."""

    def __init__(self) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

        self.inner, self.payload_bytes = DefaultAllGather(), 0

    def allocate(self, size, *, dtype, device):
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.payload_bytes += input_tensor.numel() * input_tensor.element_size()
        return self.inner(output_tensor, input_tensor, group, async_op)


def _latent_model(world: int) -> tuple[nn.Module, list[str]]:
    """The model with latent weights; weights whose rows do not divide ``world`` go back to fp32 (their names)."""
    import fqtc

    m = fqtc.prepare(_model(), LATENT)
    kept = []
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear) and mod.weight.shape[0] % world:
            mod.weight = nn.Parameter(mod.weight.dequantize())
            kept.append(name)
    return m, kept


def _build(config: str) -> tuple[nn.Module, nn.Module, Any]:
    from torch.distributed.fsdp import fully_shard

    import fqtc
    from fqtc.distributed import register_int8_fsdp_reduce_scatter, register_int8_grad_comm

    m = _model()
    fqt = config.startswith("fqt")
    if "fsdp2" in config:
        kept: list[str] = []
        if config.endswith("latent"):
            m, kept = _latent_model(dist.get_world_size())
        fully_shard(m)
        gather = _CountingAllGather()
        m.set_custom_all_gather(gather)
        gather.kept_fp32 = kept
        state = register_int8_fsdp_reduce_scatter(m, seed=0) if config.endswith("int8") else None
        opts = LATENT if config.endswith("latent") else {"bits": "W8A8G8"}
        return m, torch.compile(m, backend="fqt", options=opts) if fqt else m, (state, gather)
    inner = torch.compile(m, backend="fqt", options={"bits": "W8A8G8"}) if fqt else m
    ddp = nn.parallel.DistributedDataParallel(inner)
    if config == "fqt-ddp-int8":
        return m, ddp, register_int8_grad_comm(ddp, seed=0)
    state = _Counter()
    ddp.register_comm_hook(state, _counting_allreduce)
    del fqtc
    return m, ddp, state


def _worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # gloo binds the address the hostname resolves to unless told otherwise; pin it to loopback (all ranks are on
    # this machine, and a hostname address unreachable from the machine itself hangs every collective)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    import fqtc
    from fqtc.backend import capture

    batches = _batches(steps)
    per = GLOBAL_BATCH // world
    res: dict[str, Any] = {}
    try:
        for config in CONFIGS:
            torch._dynamo.reset()
            try:
                with capture() as graphs:  # every graph the configuration compiles, for its quantized-GEMM count
                    m, f, state = _build(config)
                    sgd = fqtc.optim.SGD if config.endswith("latent") else torch.optim.SGD
                    opt = sgd(m.parameters(), lr=0.05, momentum=0.9)
                    losses, times = [], []
                    for step, (x, y) in enumerate(batches):
                        fqtc.set_step(step)
                        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
                        t0 = time.perf_counter()
                        loss = F.cross_entropy(f(xs), ys)
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        times.append(time.perf_counter() - t0)
                        full = loss.detach().clone()
                        dist.all_reduce(full)
                        losses.append(full.item() / world)
                extra = {}
                if "fsdp2" in config:
                    state, gather = state
                    n = sum(p.numel() for p in m.parameters())
                    rs, rs_how = (state.payload_bytes // steps, "measured") if state else (n * 4, "computed")
                    bytes_step = gather.payload_bytes // steps + rs
                    how = f"all-gather measured, reduce-scatter {rs_how}"
                    extra = {"all_gather_bytes": gather.payload_bytes // steps, "kept_fp32": gather.kept_fp32}
                else:
                    bytes_step, how = state.payload_bytes // steps, "measured"
                n_q = sum(1 for cg in graphs for r in cg.records if r.get("status") == "quantized")
                res[config] = {"losses": losses, "step_ms": statistics.median(times[2:] or times) * 1e3,
                               "bytes_per_step": bytes_step, "bytes_how": how, "quantized_gemms": n_q, **extra}
            except Exception as e:  # noqa: BLE001  (a failing configuration reports its error; others go on)
                res[config] = {"error": f"{type(e).__name__}: {e}"[:300]}
            dist.barrier()
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def _single_process(steps: int) -> dict[str, list[float]]:
    """Losses of the same model on the whole global batch in one process: FP32 and fqt."""
    import fqtc

    out = {}
    for kind in ("fp32", "fqt", "fqt-latent"):
        torch._dynamo.reset()
        m = fqtc.prepare(_model(), LATENT) if kind == "fqt-latent" else _model()
        opts = LATENT if kind == "fqt-latent" else {"bits": "W8A8G8"}
        f = torch.compile(m, backend="fqt", options=opts) if kind != "fp32" else m
        opt = (fqtc.optim.SGD if kind == "fqt-latent" else torch.optim.SGD)(m.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for step, (x, y) in enumerate(_batches(steps)):
            fqtc.set_step(step)
            loss = F.cross_entropy(f(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        out[kind] = losses
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.step_time import publish, run_record

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", default="2,4", help="comma-separated world sizes (default 2,4)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.world.split(",")]
    load_before = os.getloadavg()
    single = _single_process(args.steps)
    rows = []
    for world in worlds:
        path = os.path.join(args.out if not args.no_save else "/tmp", f".distributed_{world}.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        mp.start_processes(_worker, args=(world, _free_port(), args.steps, path), nprocs=world, join=True,
                           start_method="spawn")
        res = torch.load(path)
        os.remove(path)
        fp32_bytes = res.get("fp32-ddp", {}).get("bytes_per_step")
        for config in CONFIGS:
            r = res[config]
            row: dict[str, Any] = {"world": world, "config": config}
            if "error" in r:
                row["error"] = r["error"]
            else:
                ref = single["fqt-latent" if config.endswith("latent") else
                             "fqt" if config.startswith("fqt") else "fp32"]
                gaps = [abs(a - b) for a, b in zip(r["losses"], ref)]
                row.update(step_ms=r["step_ms"], bytes_per_step=r["bytes_per_step"], bytes_how=r["bytes_how"],
                           quantized_gemms=r["quantized_gemms"],
                           bytes_vs_fp32_ddp=(r["bytes_per_step"] / fp32_bytes) if fp32_bytes else None,
                           losses={s: r["losses"][s] for s in REPORT_STEPS if s < len(r["losses"])},
                           single_losses={s: ref[s] for s in REPORT_STEPS if s < len(ref)}, max_loss_gap=max(gaps))
                for k in ("all_gather_bytes", "kept_fp32"):
                    if k in r:
                        row[k] = r[k]
            rows.append(row)
            print(row, flush=True)
    result = {"rows": rows, **run_record("distributed.py", argv), "torch": torch.__version__,
              "load_before": load_before, "load_after": os.getloadavg(), "steps": args.steps}
    publish(result, _markdown(result), args.out, "distributed", not args.no_save)
    return result


def _markdown(result: dict[str, Any]) -> str:
    info = result["machine"]
    fl = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["int8_dot_flags"].items())
    lines = [
        "# Data-parallel fqt: bytes, step time, loss (benchmarks/distributed.py)", "",
        f"- machine: {info['cpu']} ({info['cpu_count']} CPUs); int8 dot flags: {fl}; torch {result['torch']}",
        f"- command: `{result['command']}`; {result['steps']} steps; date {result['date']}",
        "- load average before {:.2f}/{:.2f}/{:.2f}, after {:.2f}/{:.2f}/{:.2f}".format(
            *result["load_before"], *result["load_after"]),
        "- gloo, one process per rank, one thread each; digits MLP 64-512-512-10, global batch 128; bytes = gradient "
        "and parameter payload one rank hands to the collectives per step (DDP: measured by a counting hook; FSDP2: "
        "all-gathers measured by a counting all-gather, reduce-scatter as the bytes column says)", "",
        "| ranks | config | quantized GEMMs | step ms | bytes/step | vs fp32 DDP | bytes | loss @0/10/20/40/59 "
        "| single-process loss | max loss gap | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['world']} | {r['config']} |  |  |  |  |  |  |  |  | {r['error']} |")
            continue
        ls = "/".join(f"{v:.3f}" for v in r["losses"].values())
        ss = "/".join(f"{v:.3f}" for v in r["single_losses"].values())
        ratio = f"{r['bytes_vs_fp32_ddp']:.2f}x" if r["bytes_vs_fp32_ddp"] is not None else ""
        lines.append(f"| {r['world']} | {r['config']} | {r.get('quantized_gemms', '')} | {r['step_ms']:.2f} | "
                     f"{r['bytes_per_step']} | {ratio} | "
                     f"{r['bytes_how']} | {ls} | {ss} | {r['max_loss_gap']:.3f} |  |")
    fp32_ag = {r["world"]: r["all_gather_bytes"] for r in result["rows"]
               if r["config"] == "fp32-fsdp2" and "all_gather_bytes" in r}
    latent = [r for r in result["rows"] if r["config"] == "fqt-fsdp2-latent" and "all_gather_bytes" in r]
    if latent:
        lines += ["", "Latent weights under FSDP2: parameter all-gather bytes one rank hands to the collectives per "
                  "step, measured (counting all-gather), `fqt-fsdp2-latent` against `fp32-fsdp2`", "",
                  "| ranks | latent all-gather bytes | fp32 all-gather bytes | ratio | weights kept fp32 |",
                  "|---|---|---|---|---|"]
        for r in latent:
            ref = fp32_ag.get(r["world"])
            ratio = f"{r['all_gather_bytes'] / ref:.3f}x" if ref else ""
            lines.append(f"| {r['world']} | {r['all_gather_bytes']} | {ref or ''} | {ratio} | "
                         f"{', '.join(r['kept_fp32']) or 'none'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
