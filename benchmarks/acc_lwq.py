"""Accuracy section ``lwq``: FP32 latent weights vs LWQ residuals (L8/L4/L2) vs plain stochastic rounding.

    python -m benchmarks.accuracy --section lwq [--quick] [--lwq-models cnn,gpt] [--lwq-epochs 2]

Every configuration trains the same model from the same initialization on the same batches, compiled with the fqt
backend (W8A8G8: int8 forward and backward GEMMs where the backend rewrites them), with the same optimizer math
(`fqtc.optim.SGD` momentum 0.9 + cosine decay for the CNN, `fqtc.optim.AdamW` for the char-GPT); only the storage
of the GEMM weights differs:

- ``fp32-latent``: fp32 parameters (the backend quantizes them per channel for the GEMMs) -- the reference;
- ``L8`` / ``L4`` / ``L2``: `fqtc.prepare` with ``W8A8G8L<b>``: int8 integer weight + b-bit residual;
- ``int8-SR (no residual)``: the weights *are* int8 codes with a per-row scale (absmax/127, re-computed each step)
  and each update is stochastically rounded onto that grid -- torchao's int8 weight-only quantized training, the
  baseline LWQ must beat;
- ``W4 fp32-latent`` / ``W4 L4`` / ``int4-SR (no residual)``: the same three storages with 4-bit integer weights
  (backend ``W4A8G8``; `fqtc.prepare` with ``W4A8G8L4``; SR onto the per-row absmax/7 grid), where one integer
  step is 18x coarser and plain SR's rounding noise is correspondingly larger (``W4_CONFIGS``).

LWQ configs take two suffixes: ``"W4 L4 mu3"`` pins the residual codebook at importance level 3 (encoded at that
level, optimizer ``mu_interval=0``), and ``"W4 L4 paper"`` / ``"W4 L4 fqtc"`` picks the optimizer's importance-level
rule (``mu_rule``) for that config instead of ``--lwq-mu-rule``. LWQ rows report ``upd_over_s``, the mean update in
integer steps (``|dw| / s``, the inverse of the rule's rho) over all steps and over the last 10% of them, and
``mu_end``, each latent weight's final importance level.

Evaluation uses the compiled model under ``torch.no_grad`` (integer GEMMs), on the full Fashion-MNIST test set and
on fixed KJV validation windows.
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial
from typing import Any

import torch

CONFIGS = ["fp32-latent", "L8", "L4", "L2", "int8-SR (no residual)"]
W4_CONFIGS = ["W4 fp32-latent", "W4 L4", "int4-SR (no residual)"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lwq-models", default="cnn",
                   help="comma list of cnn, gpt, gpt-ft and cnn-ft (the fine-tuning regimes)")
    p.add_argument("--lwq-epochs", type=float, default=2.0, help="CNN epochs")
    p.add_argument("--lwq-train", type=int, default=None, help="CNN training images (default all 60000)")
    p.add_argument("--lwq-steps", type=int, default=None, help="cap on CNN optimizer steps (reduced runs)")
    p.add_argument("--lwq-test", type=int, default=None, help="CNN test images (default all 10000)")
    p.add_argument("--lwq-fp-conv", action="store_true",
                   help="keep the CNN's convolutions in full precision (the CPU conv reference path is slow)")
    p.add_argument("--lwq-gpt-steps", type=int, default=600)
    p.add_argument("--lwq-ft-pretrain", type=int, default=600, help="gpt-ft, cnn-ft: FP32 pre-training steps")
    p.add_argument("--lwq-ft-steps", type=int, default=300, help="gpt-ft, cnn-ft: fine-tuning steps per config")
    p.add_argument("--lwq-ft-lr", type=float, default=3e-4, help="gpt-ft, cnn-ft: fine-tuning AdamW learning rate")
    p.add_argument("--lwq-ft-eval-at", default="",
                   help="gpt-ft: comma list of fine-tuning steps after which the validation loss is also recorded "
                        "(columns val_loss@N); the evaluations do not change the training trajectory")
    p.add_argument("--lwq-configs", default=",".join(CONFIGS))
    p.add_argument("--lwq-mu-interval", type=int, default=100,
                   help="steps between the LWQ optimizer's importance-level re-selections (100: the paper's "
                        "interval, fqtc's default; 0: keep the uniform residual codebook)")
    p.add_argument("--lwq-mu-rule", default="fqtc", choices=["fqtc", "paper"],
                   help="the LWQ optimizer's importance-level thresholds (mu_rule): fqtc's calibrated ones "
                        "(default) or the paper's")


class UpdateLog:
    """Per-step LWQ statistics of a latent optimizer: mean ``|dw| / s`` (the update in integer steps, the inverse of
    the importance rule's rho) over the latent GEMM weights, and the importance levels they end with."""

    def __init__(self) -> None:
        self.upd: list[float] = []
        self.mu: list[int] = []

    def record(self, opt: Any) -> None:
        from fqtc.optim.latent import LatentWeight

        vals, mus = [], []
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state.get(p, {})
                if isinstance(p, LatentWeight) and "stats" in st:
                    vals.append(float(st["stats"][0]))
                    mus.append(int(p.mu))
        if vals:
            self.upd.append(sum(vals) / len(vals))
            self.mu = mus

    def row(self) -> dict[str, Any]:
        """Result columns: mean update / step over all steps and over the last 10%; final mu per latent weight."""
        if not self.upd:
            return {}
        tail = self.upd[-max(1, len(self.upd) // 10):]
        return {"upd_over_s": sum(self.upd) / len(self.upd), "upd_over_s_last10%": sum(tail) / len(tail),
                "mu_end": "".join(str(m) for m in self.mu)}


def _step(loss: torch.Tensor, opt: Any, hook: Any = None, log: UpdateLog | None = None) -> None:
    """Backward and one optimizer step; ``log`` records the LWQ statistics, ``hook`` re-projects SR weights."""
    loss.backward()
    opt.step()
    if log is not None:
        log.record(opt)
    opt.zero_grad()
    if hook is not None:
        hook.project()


def _gemm_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    from fqtc.optim.latent import GEMM_MODULES

    return [m.weight for m in model.modules() if isinstance(m, GEMM_MODULES)]


class Int8SR:
    """Weights held as int8 codes x per-row scale; after each optimizer step, stochastically round onto the grid.

    The per-row scale is absmax/qmax of the new weight (absmax/127 at 8 bits, as torchao's
    ``quantize_int8_rowwise``); SR draws come from fqtc's counter-based stream so runs are reproducible.
    """

    def __init__(self, weights: list[torch.nn.Parameter], seed: int, bits: int = 8) -> None:
        self.weights, self.seed, self.t, self.bits = weights, seed, 0, bits
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        from fqtc.quant.uniform import quantize

        for i, w in enumerate(self.weights):
            q, s = quantize(w, self.bits, list(range(1, w.dim())), "stochastic", seed=self.seed, step=self.t,
                            stream=7919 + i)
            w.copy_(q.float() * s)
        self.t += 1


def _configure(model: torch.nn.Module, config: str, seed: int):
    import fqtc

    name, mu = _pinned_mu(config)
    if name.startswith("L"):
        fqtc.prepare(model, {"bits": f"W8A8G8{name}", "seed": seed})
    elif name.startswith("W4 L"):
        fqtc.prepare(model, {"bits": f"W4A8G8{name[3:]}", "seed": seed})
    if mu is not None:
        _repin(model, mu, seed)
    if config.startswith(("int8-SR", "int4-SR")):
        return Int8SR(_gemm_weights(model), seed, bits=_wbits(config))
    return None


def _pinned_mu(config: str) -> tuple[str, int | None]:
    """``"W4 L4 mu3"`` -> ``("W4 L4", 3)``: an LWQ config whose residual codebook is pinned at importance level 3
    (encoded at that level, optimizer ``mu_interval=0``); other configs -> ``(config, None)``."""
    name = _rule(config)[0]
    head, _, last = name.rpartition(" ")
    if head and last.startswith("mu") and last[2:].isdigit():
        return head, int(last[2:])
    return name, None


def _rule(config: str) -> tuple[str, str | None]:
    """``"W4 L4 paper"`` -> ``("W4 L4", "paper")``: an LWQ config run with the named importance-level rule instead
    of ``--lwq-mu-rule``; other configs -> ``(config, None)``."""
    head, _, last = config.rpartition(" ")
    if head and last in ("paper", "fqtc"):
        return head, last
    return config, None


def _mu_rule(args: Any, config: str) -> str:
    return _rule(config)[1] or args.lwq_mu_rule


def _repin(model: torch.nn.Module, mu: int, seed: int) -> None:
    """Re-encode every LatentWeight of ``model`` with the residual codebook of level ``mu``."""
    from fqtc.optim.latent import LatentWeight

    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, LatentWeight):
            enc = LatentWeight.from_float(w.dequantize(), w.wbits, w.lbits, seed=seed, stream=w.stream, mu=mu)
            for a, b in zip(w._inner(), enc._inner()):
                a.copy_(b)


def _mu_interval(args: Any, config: str) -> int:
    """The optimizer's importance-level schedule for ``config``: 0 (fixed) when the config pins mu."""
    return 0 if _pinned_mu(config)[1] is not None else args.lwq_mu_interval


def _label(config: str, args: Any) -> str:
    """The config's name in result rows; LWQ configs carry the optimizer's importance-level schedule."""
    name, mu = _pinned_mu(config)
    if mu is not None:
        return f"{name} (mu fixed at {mu})"
    if name.split()[-1] not in ("L2", "L4", "L8"):
        return config
    if args.lwq_mu_interval == 0:
        return name + " (mu_interval 0)"
    return name + f" (mu_interval {args.lwq_mu_interval}, {_mu_rule(args, config)} rule)"


def _wbits(config: str) -> int:
    return 4 if config.startswith(("W4 ", "int4")) else 8


def _cnn_options(args: Any, config: str) -> dict[str, Any]:
    """Backend options of the CNN modes: the config's integer weight width, convolutions kept FP on request."""
    opts: dict[str, Any] = {"bits": f"W{_wbits(config)}A8G8", "seed": args.seed}
    if args.lwq_fp_conv:
        opts["keep_fp"] = ["conv1", "conv2"]
    return opts


def _latent_bytes(model: torch.nn.Module) -> float:
    from fqtc.optim import training_state_bytes

    ws = _gemm_weights(model)
    n = sum(w.numel() for w in ws)
    sub = torch.nn.ParameterList(ws)
    b = training_state_bytes(sub)["weight_bytes"]
    return b / n


def run_cnn(args: Any, config: str) -> dict:
    import fqtc
    from benchmarks.data import load_fashion_mnist
    from benchmarks.models import SmallCNN
    from fqtc.backend import fqt_backend
    from fqtc.optim import SGD

    data = load_fashion_mnist()
    n_train = args.lwq_train or (10000 if args.quick else None)
    if n_train or args.lwq_test:
        data = data.subset(n_train=n_train, n_test=args.lwq_test, seed=args.seed)
    epochs = 1.0 if args.quick else args.lwq_epochs
    torch.manual_seed(args.seed)
    fqtc.set_step(0)
    model = SmallCNN(1, (32, 64), 10, 28)
    hook = _configure(model, config, args.seed)
    cmodel = torch.compile(model, backend=partial(fqt_backend, options=_cnn_options(args, config)))
    batch = 128
    steps = int(math.ceil(len(data.x_train) / batch * epochs))
    if args.lwq_steps:
        steps = min(steps, args.lwq_steps)
    lr0 = 0.05
    opt = SGD(model.parameters(), lr=lr0, momentum=0.9, weight_decay=5e-4, seed=args.seed,
              mu_interval=_mu_interval(args, config), mu_rule=_mu_rule(args, config))
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(data.x_train), generator=g)
    t0 = time.time()
    losses = []
    log = UpdateLog()
    for t in range(steps):
        start = (t * batch) % len(perm)
        if start + batch > len(perm):
            perm = torch.randperm(len(data.x_train), generator=g)
            start = 0
        idx = perm[start:start + batch]
        for group in opt.param_groups:  # cosine decay to 0
            group["lr"] = 0.5 * lr0 * (1 + math.cos(math.pi * t / steps))
        loss = torch.nn.functional.cross_entropy(cmodel(data.x_train[idx]), data.y_train[idx])
        _step(loss, opt, hook, log)
        losses.append(float(loss.detach()))
    train_s = time.time() - t0
    return {"model": "cnn (Fashion-MNIST)" + (", fp conv" if args.lwq_fp_conv else ""), "config": _label(config, args),
            "steps": steps, "batch": batch, "test_images": len(data.x_test),
            "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
            **_evaluate(cmodel, data.x_test, data.y_test), "gemm_weight_B/param": _latent_bytes(model),
            **log.row(), "train_s": train_s}


def _gpt_train(model: torch.nn.Module, cmodel: Any, data: Any, steps: int, lr: float, gen: torch.Generator,
               seed: int, hook: Any = None, mu_interval: int = 100, log: UpdateLog | None = None,
               mu_rule: str = "fqtc", eval_at: tuple[int, ...] = ()) -> dict[str, float]:
    """``steps`` AdamW steps (weight decay 0.01, batches of 32 x 64 characters); ``hook`` re-projects int8-SR
    weights after each step. Returns ``{"val_loss@N": ...}`` for each N in ``eval_at``: the evaluation's forward
    calls would advance fqtc's stochastic-rounding step counter, so it is restored afterwards and the trajectory
    stays the one of a run without evaluations."""
    import fqtc
    from benchmarks.models import lm_loss
    from fqtc.optim import AdamW

    opt = AdamW(model.parameters(), lr=lr, weight_decay=0.01, seed=seed, mu_interval=mu_interval, mu_rule=mu_rule)
    curve = {}
    for t in range(1, steps + 1):
        x, y = data.batch("train", 32, 64, gen)
        _step(lm_loss(cmodel(x), y), opt, hook, log)
        if t in eval_at:
            step = fqtc.get_step()
            curve[f"val_loss@{t}"] = _gpt_val_loss(cmodel, data)
            fqtc.set_step(step)
    return curve


def _gpt_val_loss(cmodel: Any, data: Any) -> float:
    """Mean loss on 10 fixed validation batches of 64 x 64 characters."""
    from benchmarks.models import lm_loss

    gv = torch.Generator().manual_seed(1234)
    vals = []
    with torch.no_grad():
        for _ in range(10):
            x, y = data.batch("val", 64, 64, gv)
            vals.append(float(lm_loss(cmodel(x), y)))
    return sum(vals) / len(vals)


def _gpt(data: Any, seed: int) -> torch.nn.Module:
    from benchmarks.models import CharGPT

    torch.manual_seed(seed)
    return CharGPT(vocab_size=data.vocab_size, dim=64, heads=4, layers=2, max_len=64)


def run_gpt(args: Any, config: str) -> dict:
    import fqtc
    from benchmarks.data import load_kjv
    from fqtc.backend import fqt_backend

    data = load_kjv(max_chars=400_000 if args.quick else 2_000_000)
    steps = 150 if args.quick else args.lwq_gpt_steps
    fqtc.set_step(0)
    model = _gpt(data, args.seed)
    hook = _configure(model, config, args.seed)
    cmodel = torch.compile(model, backend=partial(fqt_backend, options={"bits": "W8A8G8", "seed": args.seed}))
    t0 = time.time()
    _gpt_train(model, cmodel, data, steps, 3e-3, torch.Generator().manual_seed(args.seed), args.seed, hook,
               _mu_interval(args, config), mu_rule=_mu_rule(args, config))
    train_s = time.time() - t0
    return {"model": "char-GPT (KJV)", "config": _label(config, args), "steps": steps,
            "val_loss": _gpt_val_loss(cmodel, data),
            "gemm_weight_B/param": _latent_bytes(model), "train_s": train_s}


# gpt-ft: per (seed, pre-training steps, quick), the pre-trained state and its validation loss; per fine-tuning
# setting, the fp32-latent run's final GEMM weights (the reference of w_dev_vs_fp32)
_PRETRAINED: dict[tuple, dict[str, torch.Tensor]] = {}
_PRETRAINED_VAL: dict[tuple, float] = {}
_FT_REFERENCE: dict[tuple, dict[str, torch.Tensor]] = {}


def _gemm_weight_floats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Float values of the GEMM weights (decoded latent weights for LWQ storage)."""
    from fqtc.optim.latent import GEMM_MODULES, LatentWeight

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, GEMM_MODULES):
            w = m.weight
            out[name] = (w.dequantize() if isinstance(w, LatentWeight) else w).detach().float().clone()
    return out


def run_gpt_finetune(args: Any, config: str) -> dict:
    """Fine-tuning regime: one FP32-latent pre-training run (shared by every config of the process), then
    ``--lwq-ft-steps`` AdamW steps at the small ``--lwq-ft-lr`` with the config's weight storage. Per-step updates
    are then a fraction of one int8 grid step, the regime where plain stochastic rounding's per-update variance
    (about s*|u| for an update u on a grid of step s) accumulates while LWQ's residual keeps it ~2^L smaller.
    Besides the validation loss, ``w_dev_vs_fp32`` is the RMS difference of the fine-tuned GEMM weights from the
    fp32-latent fine-tuned weights (same batches, same SR streams elsewhere), relative to the weights' RMS."""
    import fqtc
    from benchmarks.data import load_kjv
    from fqtc.backend import fqt_backend

    data = load_kjv(max_chars=400_000 if args.quick else 2_000_000)
    key = (args.seed, args.lwq_ft_pretrain, args.quick)
    opts = {"bits": "W8A8G8", "seed": args.seed}  # pre-training: W8 whatever the fine-tuning storage
    if key not in _PRETRAINED:
        fqtc.set_step(0)
        model = _gpt(data, args.seed)
        cmodel = torch.compile(model, backend=partial(fqt_backend, options=opts))
        _gpt_train(model, cmodel, data, args.lwq_ft_pretrain, 3e-3, torch.Generator().manual_seed(args.seed),
                   args.seed)
        _PRETRAINED[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _PRETRAINED_VAL[key] = _gpt_val_loss(cmodel, data)
        torch._dynamo.reset()
    model = _gpt(data, args.seed)
    model.load_state_dict(_PRETRAINED[key])
    hook = _configure(model, config, args.seed)
    fqtc.set_step(10**6)  # fine-tuning's SR streams: the same for every config
    opts = {"bits": f"W{_wbits(config)}A8G8", "seed": args.seed}
    cmodel = torch.compile(model, backend=partial(fqt_backend, options=opts))
    t0 = time.time()
    log = UpdateLog()
    eval_at = tuple(int(n) for n in args.lwq_ft_eval_at.split(",") if n.strip())
    curve = _gpt_train(model, cmodel, data, args.lwq_ft_steps, args.lwq_ft_lr,
                       torch.Generator().manual_seed(args.seed + 1), args.seed, hook, _mu_interval(args, config), log,
                       _mu_rule(args, config), eval_at)
    train_s = time.time() - t0
    dev = _w_dev(("gpt",) + key + (_wbits(config), args.lwq_ft_steps, args.lwq_ft_lr), config,
                 _gemm_weight_floats(model))
    return {"model": "char-GPT (KJV), fine-tuning", "config": _label(config, args), "seed": args.seed,
            "pretrain_steps": args.lwq_ft_pretrain, "ft_steps": args.lwq_ft_steps, "ft_lr": args.lwq_ft_lr,
            "val_loss_before_ft": _PRETRAINED_VAL[key], **curve, "val_loss": _gpt_val_loss(cmodel, data),
            "w_dev_vs_fp32": dev, "gemm_weight_B/param": _latent_bytes(model), **log.row(), "train_s": train_s}


_CNN_PRETRAINED: dict[tuple, dict] = {}


def _cnn_steps(fn: Any, opt: Any, x: torch.Tensor, y: torch.Tensor, steps: int, gen: torch.Generator,
               hook: Any = None, batch: int = 128, log: UpdateLog | None = None) -> list[float]:
    """``steps`` optimizer steps on random batches of (x, y) drawn with ``gen``; ``hook`` re-projects SR weights
    after each step. Returns the training losses."""
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(fn(x[idx]), y[idx])
        _step(loss, opt, hook, log)
        losses.append(float(loss.detach()))
    return losses


def _w_dev(key: tuple, config: str, weights: dict[str, torch.Tensor]) -> float | None:
    """``w_dev_vs_fp32`` of the fine-tuning modes: the fp32-latent run of an integer width records its weights under
    ``key``; every run of the same key gets its RMS distance from them relative to their RMS (None before one)."""
    if config in ("fp32-latent", "W4 fp32-latent"):
        _FT_REFERENCE[key] = weights
    ref = _FT_REFERENCE.get(key)
    if ref is None:
        return None
    num = sum(float((weights[k] - ref[k]).pow(2).sum()) for k in ref)
    den = sum(float(ref[k].pow(2).sum()) for k in ref)
    return math.sqrt(num / den)


def _evaluate(fn: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test accuracy (%) and mean cross-entropy (nats; a finer measure than accuracy on a few thousand images)."""
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            logits = fn(x[i:i + 1000])
            correct += int((logits.argmax(1) == y[i:i + 1000]).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, y[i:i + 1000], reduction="sum"))
    return {"test_acc_%": 100.0 * correct / len(x), "test_loss": loss / len(x)}


def run_cnn_finetune(args: Any, config: str) -> dict:
    """Fine-tuning under a domain shift: the CNN pre-trained in FP32 on Fashion-MNIST (``--lwq-ft-pretrain`` Adam
    steps, shared by every config of the process) is fine-tuned on MNIST digits for ``--lwq-ft-steps`` AdamW steps
    at ``--lwq-ft-lr`` with the config's weight storage (every GEMM weight, convolutions included). The learning
    has to come from many updates far below one integer grid step (about lr against s = amax/qmax), the regime LWQ
    is built for. ``w_dev_vs_fp32``: RMS distance of the fine-tuned weights from the fp32-latent run of the same
    integer width (W8: ``fp32-latent``, W4: ``W4 fp32-latent``), relative to their RMS."""
    import fqtc
    from benchmarks.data import load_fashion_mnist, load_mnist
    from benchmarks.models import SmallCNN
    from fqtc.backend import fqt_backend
    from fqtc.optim import AdamW

    key = (args.seed, args.lwq_ft_pretrain)
    if key not in _CNN_PRETRAINED:
        src = load_fashion_mnist()
        torch.manual_seed(args.seed)
        model = SmallCNN(1, (32, 64), 10, 28)
        _cnn_steps(model, torch.optim.Adam(model.parameters(), lr=1e-3), src.x_train, src.y_train,
                   args.lwq_ft_pretrain, torch.Generator().manual_seed(args.seed))
        _CNN_PRETRAINED[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = load_mnist()
    n_test = args.lwq_test or len(data.x_test)
    x_test, y_test = data.x_test[:n_test], data.y_test[:n_test]
    torch.manual_seed(args.seed)
    model = SmallCNN(1, (32, 64), 10, 28)
    model.load_state_dict(_CNN_PRETRAINED[key])
    acc_before = _evaluate(model, x_test, y_test)["test_acc_%"]
    hook = _configure(model, config, args.seed)
    fqtc.set_step(10**6)  # fine-tuning's SR streams: the same for every config
    cmodel = torch.compile(model, backend=partial(fqt_backend, options=_cnn_options(args, config)))
    opt = AdamW(model.parameters(), lr=args.lwq_ft_lr, weight_decay=0.0, seed=args.seed,
                mu_interval=_mu_interval(args, config), mu_rule=_mu_rule(args, config))
    t0 = time.time()
    log = UpdateLog()
    losses = _cnn_steps(cmodel, opt, data.x_train, data.y_train, args.lwq_ft_steps,
                        torch.Generator().manual_seed(args.seed + 1), hook, log=log)
    train_s = time.time() - t0
    dev = _w_dev(("cnn",) + key + (_wbits(config), args.lwq_ft_steps, args.lwq_ft_lr, args.lwq_fp_conv), config,
                 _gemm_weight_floats(model))
    return {"model": "cnn Fashion-MNIST -> MNIST fine-tuning" + (", fp conv" if args.lwq_fp_conv else ""),
            "config": _label(config, args),
            "seed": args.seed, "pretrain_steps": args.lwq_ft_pretrain,
            "ft_steps": args.lwq_ft_steps, "ft_lr": args.lwq_ft_lr, "test_images": n_test,
            "acc_before_ft_%": acc_before, **_evaluate(cmodel, x_test, y_test),
            "final_train_loss": sum(losses[-50:]) / len(losses[-50:]), "w_dev_vs_fp32": dev,
            "gemm_weight_B/param": _latent_bytes(model), **log.row(), "train_s": train_s}


def run(args: Any) -> list[dict]:
    rows = []
    configs = [c for c in args.lwq_configs.split(",") if c]
    if ("gpt-ft" in args.lwq_models or "cnn-ft" in args.lwq_models):  # w_dev_vs_fp32's references run first
        refs = [c for c in ("fp32-latent", "W4 fp32-latent") if c in configs]
        configs = refs + [c for c in configs if c not in refs]
    for name in args.lwq_models.split(","):
        fn = {"cnn": run_cnn, "gpt": run_gpt, "gpt-ft": run_gpt_finetune, "cnn-ft": run_cnn_finetune}[name.strip()]
        for c in configs:
            torch._dynamo.reset()
            row = fn(args, c)
            print(row, flush=True)
            rows.append(row)
    return rows
