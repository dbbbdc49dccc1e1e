"""`LatentWeight`: a parameter stored as LWQ codes (integer weight + low-bit residual + per-row scale).

A traceable wrapper tensor subclass (``__tensor_flatten__``): eager ops see the latent float weight
``s*(q + r)`` (``__torch_dispatch__`` decodes it through ``fqt::lwq_dequantize``); AOTAutograd receives the inner
tensors ``q``, ``r``, ``s``, ``mu`` as graph inputs followed by that one op, which `fqtc.passes.lwq` recognizes so
GEMMs read the integer codes directly. Autograd sits above the subclass, so ``.grad`` is a plain fp32 tensor; the
optimizers in `fqtc.optim` update the codes in place with one fused ``fqt::lwq_update`` per parameter.

Storage per element: ``q`` int8 (W8) or int4 packed two per byte (W4); ``r`` L-bit residual code, packed two per
byte for L <= 4 (so L2/L3 also take 4 bits of storage), int8 for L > 4; plus one fp32 scale per row and a
one-byte importance level per tensor. See docs/latent_weights.md.

`prepare(model, options)` converts a model's GEMM weights (``nn.Linear``, ``nn.Conv*``) in place.
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

import fqtc.ops  # noqa: F401  (registers fqt::lwq_*)
from fqtc.config import FQTConfig
from fqtc.ops.stepcounter import counter_for
from fqtc.optim import latent_shard as _shard
from fqtc.quant import lwq as _lwq

# Modules whose ``weight`` is a GEMM operand and becomes a LatentWeight.
GEMM_MODULES: tuple[type[torch.nn.Module], ...] = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d,
                                                   torch.nn.Conv3d)
# LWQ integer-weight stream offset: keeps prepare's initial encoding stream apart from update streams.
_INIT_STEP = 0


class LatentWeight(Tensor):
    """A float32 weight held as LWQ codes. Use `LatentWeight.from_float` or `fqtc.prepare`.

    Inner tensors: ``q`` (int8 codes, or uint8 packed int4), ``r`` (residual codes, packed for L <= 4), ``s``
    (fp32 per-row scale, keepdim), ``mu`` (uint8 0-d importance level). Static metadata: ``wbits``, ``lbits``,
    ``stream`` (the stochastic-rounding stream id of this parameter).
    """

    q: Tensor
    r: Tensor
    s: Tensor
    mu: Tensor

    @staticmethod
    def __new__(cls, q: Tensor, r: Tensor, s: Tensor, mu: Tensor, shape: tuple[int, ...], wbits: int, lbits: int,
                stream: int = 0, requires_grad: bool = False) -> "LatentWeight":
        return Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32, device=q.device,
                                             requires_grad=requires_grad)

    def __init__(self, q: Tensor, r: Tensor, s: Tensor, mu: Tensor, shape: tuple[int, ...], wbits: int, lbits: int,
                 stream: int = 0, requires_grad: bool = False) -> None:
        self.q, self.r, self.s, self.mu = q, r, s, mu
        self.wbits, self.lbits, self.stream = int(wbits), int(lbits), int(stream)

    # -- traceable-subclass protocol -------------------------------------------------------------------------
    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        return ["q", "r", "s", "mu"], (tuple(self.shape), self.wbits, self.lbits, self.stream)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, Tensor], ctx: tuple, outer_size, outer_stride) -> "LatentWeight":
        shape, wbits, lbits, stream = ctx
        return LatentWeight(inner["q"], inner["r"], inner["s"], inner["mu"], tuple(shape), wbits, lbits, stream)

    def __repr__(self) -> str:
        # no data access here: reprs are taken of fake tensors during tracing (logging), where .item() fails
        return (f"LatentWeight(shape={tuple(self.shape)}, W{self.wbits}+L{self.lbits}, "
                f"requires_grad={self.requires_grad})")

    # -- construction / decoding ---------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, w: Tensor, wbits: int = 8, lbits: int = 4, seed: int = 0, stream: int = 0,
                   mu: int = 0) -> "LatentWeight":
        """Encode a float weight: per-row scale with headroom, q = round(w/s), stochastically rounded residual."""
        _lwq.weight_qmax(wbits)
        _lwq.residual_max(lbits)
        if w.dim() < 1 or not w.dtype.is_floating_point:
            raise ValueError(f"LatentWeight.from_float needs a floating-point tensor with >= 1 dim, got {w.dtype} "
                             f"{tuple(w.shape)}")
        w = w.detach().float()
        s = _lwq.init_scale(w, wbits)
        q, rc, s, _ = _lwq.encode_latent(w, s, wbits, lbits, mu, seed, _INIT_STEP, stream, refresh=True)
        return cls(_lwq.store_codes(q, wbits), _lwq.store_codes(rc, lbits), s,
                   torch.tensor(mu, dtype=torch.uint8, device=w.device), tuple(w.shape), wbits, lbits, stream)

    def dequantize(self) -> Tensor:
        """The latent float weight ``s*(q + r)`` (a plain fp32 tensor)."""
        rows, s = _shard.row_layout(self)
        w = torch.ops.fqt.lwq_dequantize.default(self.q, self.r, s, self.mu, rows, self.wbits, self.lbits)
        return w if rows == list(self.shape) else w.view(self.shape)

    def int_codes(self) -> Tensor:
        """The integer weight's int8 codes (unpacked), what the GEMMs use with scale ``s``."""
        return _lwq.load_codes(self.q, self.wbits, self.shape)

    def residual_codes(self) -> Tensor:
        return _lwq.load_codes(self.r, self.lbits, self.shape)

    def storage_bytes(self) -> int:
        """Bytes actually held by the inner tensors."""
        return sum(t.numel() * t.element_size() for t in (self.q, self.r, self.s, self.mu))

    def _inner(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.q, self.r, self.s, self.mu

    # -- FSDP2 extension points (fqtc.optim.latent_shard, docs/distributed.md) -------------------------------------
    def fsdp_pre_all_gather(self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...],
                            module: torch.nn.Module, mp_policy: Any) -> tuple[tuple[Tensor, ...], Any]:
        """FSDP2 all-gathers this row shard's integer codes and scales, not a decoded fp32 copy."""
        return _shard.pre_all_gather(self, mesh, outer_size, mp_policy)

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[Tensor, ...], metadata: Any, param_dtype: torch.dtype,
                             *, out: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]] | None:
        """The unsharded parameter FSDP2 hands to the module: the integer weight over the gathered codes."""
        return _shard.post_all_gather(self, all_gather_outputs, metadata, out)  # type: ignore[arg-type]

    # -- dispatch ----------------------------------------------------------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.detach.default, aten.alias.default):
            x = args[0]
            return LatentWeight(x.q, x.r, x.s, x.mu, tuple(x.shape), x.wbits, x.lbits, x.stream)
        if func is aten.clone.default:
            x = args[0]
            return LatentWeight(x.q.clone(), x.r.clone(), x.s.clone(), x.mu.clone(), tuple(x.shape), x.wbits,
                                x.lbits, x.stream)
        if func is aten._to_copy.default and isinstance(args[0], LatentWeight) and set(kwargs) <= {"device"}:
            x, dev = args[0], kwargs.get("device")
            return LatentWeight(*(t.to(dev) for t in x._inner()), tuple(x.shape), x.wbits, x.lbits, x.stream)
        if func is aten.copy_.default and isinstance(args[0], LatentWeight):
            dst, src = args[0], args[1]
            if isinstance(src, LatentWeight):
                if (src.wbits, src.lbits, tuple(src.shape)) != (dst.wbits, dst.lbits, tuple(dst.shape)):
                    raise ValueError(
                        f"LatentWeight.copy_: source W{src.wbits}+L{src.lbits} {tuple(src.shape)} does not match "
                        f"target W{dst.wbits}+L{dst.lbits} {tuple(dst.shape)}; prepare the model with the same "
                        "bit string before loading the state dict")
                for a, b in zip(dst._inner(), src._inner()):
                    a.copy_(b)
            else:  # a float tensor: encode it (e.g. loading a full-precision checkpoint into a prepared model)
                enc = LatentWeight.from_float(src.to(dst.q.device), dst.wbits, dst.lbits, stream=dst.stream)
                for a, b in zip(dst._inner(), enc._inner()):
                    a.copy_(b)
            return dst
        if func in (aten.is_same_size.default,):
            return tuple(args[0].shape) == tuple(args[1].shape)
        out = _row_op(func, args, kwargs)
        if out is not NotImplemented:
            return out
        _reject_mutation(func, args, kwargs)
        args, kwargs = tree_map_only(LatentWeight, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)


def _row_op(func, args: tuple, kwargs: dict) -> Any:
    """Row-range ops FSDP2 applies when sharding (fqtc.optim.latent_shard), answered on the codes; NotImplemented
    for every other use, which then decodes."""
    aten = torch.ops.aten
    x = args[0]
    if not isinstance(x, LatentWeight) or x.dim() == 0:
        return NotImplemented
    if func is aten.split.Tensor and (args[2] if len(args) > 2 else kwargs.get("dim", 0)) in (0, -x.dim()):
        return _shard.split_rows(x, int(args[1]))
    if func is aten.slice.Tensor:
        dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1:])[:4]
        if dim in (0, -x.dim()) and step == 1:
            rows = x.shape[0]
            start = min(max(start or 0, 0), rows) if (start or 0) >= 0 else max(rows + start, 0)
            end = rows if end is None else (min(end, rows) if end >= 0 else max(rows + end, 0))
            return _shard.row_view(x, start, max(start, end))
    if func is aten.new_zeros.default and list(args[1])[1:] == list(x.shape[1:]) and \
            kwargs.get("dtype", torch.float32) == torch.float32:
        return _shard.zeros_rows(x, args[1])
    if func in (aten.view.default, aten._unsafe_view.default):
        return _shard.reshape_alias(x, args[1])
    if func is aten.as_strided.default and list(args[1]) == list(x.shape) and \
            tuple(args[2]) == x.stride() and (args[3] if len(args) > 3 else 0) in (0, None):
        return _shard.reshape_alias(x, args[1])
    return NotImplemented


def _contains_latent(x: Any) -> bool:
    if isinstance(x, LatentWeight):
        return True
    return isinstance(x, (list, tuple)) and any(_contains_latent(v) for v in x)


def _reject_mutation(func, args: tuple, kwargs: dict) -> None:
    """In-place ATen ops would mutate a decoded temporary and be lost silently: refuse them with the fix."""
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        val = args[i] if i < len(args) else kwargs.get(a.name)
        if _contains_latent(val):
            raise RuntimeError(
                f"{func}: in-place update of a LatentWeight parameter. LatentWeight storage is updated only by "
                "fqtc.optim.SGD / fqtc.optim.AdamW (one fused fqt::lwq_update per parameter); use those instead "
                "of torch.optim, or assign a new value with param.copy_(tensor) (re-encodes it)")


# -- serialization: torch.save / torch.load of a LatentWeight (and of state dicts holding one) ---------------------
def _rebuild_latent(q, r, s, mu, shape, wbits, lbits, stream, requires_grad):
    return LatentWeight(q, r, s, mu, tuple(shape), wbits, lbits, stream, requires_grad)


def _reduce_ex(self, proto):
    return (_rebuild_latent, (self.q, self.r, self.s, self.mu, tuple(self.shape), self.wbits, self.lbits,
                              self.stream, self.requires_grad))


LatentWeight.__reduce_ex__ = _reduce_ex  # type: ignore[method-assign]
torch.serialization.add_safe_globals([_rebuild_latent, LatentWeight])


def param_stream(name: str) -> int:
    """Stable stochastic-rounding stream id of a parameter (crc32 of its name: identical in every process)."""
    return zlib.crc32(("lwq/" + name).encode()) & 0xFFFFFFFF


def prepare(model: torch.nn.Module, options: Mapping[str, Any] | FQTConfig | None = None) -> torch.nn.Module:
    """Convert the GEMM weights of ``model`` (Linear/Conv) to `LatentWeight` parameters in place; return the model.

    ``options`` are the backend's options: the bit string's ``W`` gives the integer weight (4 or 8 bits) and ``L``
    the residual bits (required: ``{"bits": "W8A8G8L4"}``). The backend's weight spec for the ``output`` GEMM
    (W bits, per-channel, nearest) then matches the storage, and `fqtc.passes.lwq` feeds the stored codes straight
    into the integer GEMM.
    """
    cfg = FQTConfig.from_options(options)
    wbits, lbits = cfg.bits.weight, cfg.bits.latent
    if lbits is None:
        raise ValueError(f"fqtc.prepare: the bit string {str(cfg.bits)!r} has no latent bits; add L<bits>, e.g. "
                         "{'bits': 'W8A8G8L4'}")
    if wbits not in (4, 8):
        raise ValueError(f"fqtc.prepare: latent-weight storage needs W8 or W4 integer weights, got W{wbits}")
    for mname, mod in model.named_modules():
        if not isinstance(mod, GEMM_MODULES):
            continue
        w = mod.weight
        if isinstance(w, LatentWeight):
            continue
        name = f"{mname}.weight" if mname else "weight"
        lw = LatentWeight.from_float(w.detach(), wbits, lbits, seed=cfg.seed, stream=param_stream(name))
        mod.weight = torch.nn.Parameter(lw, requires_grad=w.requires_grad)
    counter_for(model)  # its stochastic-rounding step lives in its state_dict (fqtc.ops.stepcounter)
    return model
