"""End-to-end check of the CUDA path: the same training run on the CPU reference path and on CUDA (Triton kernels).

    python -m benchmarks.gpu_check [--steps 8] [--json out.json]

For each model (MLP, SmallCNN, CharGPT at small sizes) and each config, the model is trained from one initialisation
on the same batches twice: on the CPU (the reference implementations of the fqt ops) and on CUDA (the backend's
codegen pass lowers quantize->qgemm chains to the fused Triton kernels and the ops dispatch to the kernels). It
prints per run:

- the loss of every step on both devices and the largest relative difference. Integer codes are bit-identical
  between kernel and reference for identical inputs (tests/codegen), but the non-GEMM ops (softmax, LayerNorm, conv
  in full precision, reductions) run on different hardware, so tiny float differences can move a value across a
  rounding boundary; the trajectories therefore agree closely, not bit for bit;
- the SQNR of the first step's parameter gradients on CUDA against FP32 eager on CUDA (the quantization error on
  the GPU path, comparable with the CPU figures of the compile tests);
- what the codegen pass did (fused / unfused chains, from ``node.meta["fqt"]["codegen"]``) and every fallback to a
  reference implementation the CUDA op implementations counted (`fqtc.codegen.impls.FALLBACKS`).

Needs a CUDA device; exits 2 without one.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.models import MLP, CharGPT, SmallCNN
from fqtc.backend import capture
from fqtc.ops import set_step

GPU = "cuda"  # the device of the "cuda" runs (a dry run of this script on the CPU sets it to "cpu")


def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    err = (ref.double() - x.double()).pow(2).sum().item()
    sig = ref.double().pow(2).sum().item()
    return math.inf if err == 0 else 10 * math.log10(sig / err)


def _tasks() -> dict[str, tuple[Callable[[], nn.Module], Callable[[int, torch.Generator], tuple], Callable]]:
    def mlp_data(i: int, g: torch.Generator):
        return torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)

    def cnn_data(i: int, g: torch.Generator):
        return torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)

    def gpt_data(i: int, g: torch.Generator):
        x = torch.randint(0, 65, (8, 33), generator=g)
        return x[:, :-1], x[:, 1:]

    def ce(out, y):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))

    return {
        "MLP": (lambda: MLP(in_features=64, hidden=(256, 128)), mlp_data, ce),
        "SmallCNN": (lambda: SmallCNN(widths=(16, 32)), cnn_data, ce),
        "CharGPT": (lambda: CharGPT(vocab_size=65, dim=64, heads=4, layers=2, max_len=32), gpt_data, ce),
    }


def _codegen_summary(graphs) -> dict[str, Any]:
    fused = unfused = 0
    kernels: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for cg in graphs:
        for gm in (cg.forward, cg.backward, cg.inference):
            if gm is None:
                continue
            for n in gm.graph.nodes:
                rec = n.meta.get("fqt", {}).get("codegen") if isinstance(n.meta.get("fqt"), dict) else None
                if not rec or n.op != "call_function" or "fqt" not in str(n.target):
                    continue
                if rec.get("fused"):
                    fused += 1
                else:
                    unfused += 1
                    reasons[rec.get("reason", "?")] = reasons.get(rec.get("reason", "?"), 0) + 1
                kernels[rec["kernel"]] = kernels.get(rec["kernel"], 0) + 1
    return {"fused": fused, "unfused": unfused, "kernels": kernels, "unfused_reasons": reasons}


def run(name: str, options: dict, steps: int, lr: float = 0.05) -> dict[str, Any]:
    make, data, loss_fn = _tasks()[name]
    from fqtc.codegen import impls

    torch.manual_seed(0)
    init = make().state_dict()
    out: dict[str, Any] = {"model": name, "options": options}
    losses: dict[str, list[float]] = {}
    first_grads: dict[str, dict[str, torch.Tensor]] = {}
    for dev in ("cpu", "cuda", "cuda-fp32"):
        torch._dynamo.reset()
        device = GPU if dev.startswith("cuda") else "cpu"
        model = make().to(device)
        model.load_state_dict(init)
        fn = model if dev == "cuda-fp32" else torch.compile(model, backend="fqt", options=options)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(1)
        impls.FALLBACKS.clear()
        set_step(0)  # same stochastic-rounding stream on both devices
        ls = []
        with capture() as graphs:
            for i in range(steps if dev != "cuda-fp32" else 1):
                x, y = data(i, g)
                loss = loss_fn(fn(x.to(device)), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if i == 0:
                    first_grads[dev] = {k: p.grad.detach().cpu().clone() for k, p in model.named_parameters()
                                        if p.grad is not None}
                opt.step()
                ls.append(loss.item())
        losses[dev] = ls
        if dev == "cuda":
            out["codegen"] = _codegen_summary(graphs)
            out["fallbacks"] = {f"{op}: {why}": n for (op, why), n in impls.FALLBACKS.items()}
    out["loss_cpu"] = losses["cpu"]
    out["loss_cuda"] = losses["cuda"]
    out["max_rel_loss_diff"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses["cpu"], losses["cuda"]))
    out["grad_sqnr_cuda_vs_fp32_db"] = {k: round(_sqnr(first_grads["cuda-fp32"][k], v), 1)
                                        for k, v in first_grads["cuda"].items()}
    out["grad_sqnr_cpu_vs_cuda_db"] = {k: round(_sqnr(first_grads["cpu"][k], v), 1)
                                       for k, v in first_grads["cuda"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--models", default="MLP,SmallCNN,CharGPT")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"python {platform.python_version()}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = []
    for name in a.models.split(","):
        for options in ({"bits": "W8A8G8"}, {"bits": "W4A4G8", "grad_quantizer": "psq"}):
            try:
                r = run(name, options, a.steps)
            except Exception as e:  # report and go on: one broken config must not hide the others
                import traceback

                traceback.print_exc()
                r = {"model": name, "options": options, "error": f"{type(e).__name__}: {e}"}
            results.append(r)
            print(json.dumps(r, default=str))
            sys.stdout.flush()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
