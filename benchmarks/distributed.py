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
  gradient reduce-scatter; the parameter all-gathers stay fp32).

Every fqt row also reports how many GEMMs its compiled graphs quantized (``quantized GEMMs``, from the graphs'
records): a configuration that silently trained in FP32 shows 0 there.

Reported per configuration and world size: the median step time (forward + backward + optimizer step; with more
ranks than cores the processes share cores, so 4-rank times are oversubscribed on a 2-core machine); the gradient
bytes each rank hands to the collectives per step — for DDP measured by a communication hook that counts every
bucket (the fp32 configurations count through a hook doing DDP's default all-reduce), for FSDP2 computed from the
shard sizes (all-gather of the fp32 shards in forward and again in backward, reduce-scatter of the fp32 gradients),
labelled as computed (``fqt-fsdp2-int8``: the all-gathers computed, the reduce-scatter payload measured by its
state); and the training loss at a few steps beside the single-process loss of the same model on the
whole global batch (fqt single-process for fqt rows, FP32 for FP32 rows), with the largest gap over all steps.

Beside the table: CPU, int8 dot-product flags, torch version, command, load average before and after, date.
Output: ``<out>/distributed.md`` and ``<out>/distributed.json`` (``--out``, default benchmarks/results).
"""

# no ``from __future__ import annotations``: DDP checks a comm hook's annotations as objects

import argparse
import datetime
import json
import os
import shlex
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

CONFIGS = ("fp32-ddp", "fqt-ddp", "fqt-ddp-int8", "fp32-fsdp2", "fqt-fsdp2", "fqt-fsdp2-int8")
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


def _build(config: str) -> tuple[nn.Module, nn.Module, Any]:
    from torch.distributed.fsdp import fully_shard

    import fqtc
    from fqtc.distributed import register_int8_fsdp_reduce_scatter, register_int8_grad_comm

    m = _model()
    fqt = config.startswith("fqt")
    if "fsdp2" in config:
        fully_shard(m)
        state = register_int8_fsdp_reduce_scatter(m, seed=0) if config.endswith("int8") else None
        return m, torch.compile(m, backend="fqt", options={"bits": "W8A8G8"}) if fqt else m, state
    inner = torch.compile(m, backend="fqt", options={"bits": "W8A8G8"}) if fqt else m
    ddp = nn.parallel.DistributedDataParallel(inner)
    if config == "fqt-ddp-int8":
        return m, ddp, register_int8_grad_comm(ddp, seed=0)
    state = _Counter()
    ddp.register_comm_hook(state, _counting_allreduce)
    del fqtc
    return m, ddp, state


def _fsdp_bytes(m: nn.Module, world: int) -> int:
    """Per rank per step: all-gather the fp32 shards twice (forward, backward) + reduce-scatter the fp32 gradients."""
    n = sum(p.numel() for p in m.parameters())
    shard = -(-n // world)
    return 2 * shard * 4 + n * 4


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
                    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
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
                if config.endswith("fsdp2"):
                    bytes_step, how = _fsdp_bytes(m, world), "computed"
                elif config.endswith("fsdp2-int8"):
                    shard = -(-sum(p.numel() for p in m.parameters()) // world)
                    bytes_step = 2 * shard * 4 + state.payload_bytes // steps
                    how = "all-gather computed, reduce-scatter measured"
                else:
                    bytes_step, how = state.payload_bytes // steps, "measured"
                n_q = sum(1 for cg in graphs for r in cg.records if r.get("status") == "quantized")
                res[config] = {"losses": losses, "step_ms": statistics.median(times[2:] or times) * 1e3,
                               "bytes_per_step": bytes_step, "bytes_how": how, "quantized_gemms": n_q}
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
    for kind in ("fp32", "fqt"):
        torch._dynamo.reset()
        m = _model()
        f = torch.compile(m, backend="fqt", options={"bits": "W8A8G8"}) if kind == "fqt" else m
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
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
    from benchmarks.step_time import machine_info

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
                ref = single["fqt" if config.startswith("fqt") else "fp32"]
                gaps = [abs(a - b) for a, b in zip(r["losses"], ref)]
                row.update(step_ms=r["step_ms"], bytes_per_step=r["bytes_per_step"], bytes_how=r["bytes_how"],
                           quantized_gemms=r["quantized_gemms"],
                           bytes_vs_fp32_ddp=(r["bytes_per_step"] / fp32_bytes) if fp32_bytes else None,
                           losses={s: r["losses"][s] for s in REPORT_STEPS if s < len(r["losses"])},
                           single_losses={s: ref[s] for s in REPORT_STEPS if s < len(ref)}, max_loss_gap=max(gaps))
            rows.append(row)
            print(row, flush=True)
    info = machine_info("cpu")
    result = {"rows": rows, "machine": info, "torch": torch.__version__, "load_before": load_before,
              "load_after": os.getloadavg(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "command": "python benchmarks/distributed.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "steps": args.steps}
    md = _markdown(result)
    print(md)
    if not args.no_save:
        with open(os.path.join(args.out, "distributed.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.out, "distributed.json"), "w") as f:
            json.dump(result, f, indent=1)
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
        "computed from shard sizes)", "",
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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
