"""Model state dicts for ``torch.distributed.checkpoint`` (DCP) with latent weights, on any world size.

DCP saves each tensor of a state dict by element ranges and reloads them into tensors sharded another way, which
needs tensors it can split by rows. A `LatentWeight` packs two codes per byte over the whole tensor, so its state
dict entry is replaced by four plain tensors, ``<name>.lwq_codes`` / ``lwq_residual`` (int8, the weight's shape),
``lwq_scale`` (fp32, one per row) and ``lwq_level`` (the 0-d importance level); under FSDP2 the first three are
``DTensor``s sharded like the parameter. Every other entry is the model's own.

Usage (the same on every world size; a checkpoint saved by 2 ranks loads on 1, and back)::

    sd = fqtc.distributed.get_model_state_dict(model)
    torch.distributed.checkpoint.save(sd, checkpoint_id=path)
    ...
    sd = fqtc.distributed.get_model_state_dict(model)      # the new model: the layout to load into
    torch.distributed.checkpoint.load(sd, checkpoint_id=path)
    fqtc.distributed.set_model_state_dict(model, sd)

Codes round-trip bit for bit. ``model.state_dict()`` / ``load_state_dict`` keep working as before for
``torch.save`` checkpoints on an unchanged world size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fqtc.ops.stepcounter import counter_for
from fqtc.optim import latent_shard as _shard
from fqtc.optim import sharded as _sharded
from fqtc.optim.latent import LatentWeight


def _latent_params(model: torch.nn.Module) -> dict[str, Tensor]:
    """Parameters of ``model`` (by state-dict name) whose local tensor is a `LatentWeight`."""
    return {n: p for n, p in model.named_parameters() if isinstance(_sharded.local(p), LatentWeight)}


def _like(p: Tensor, t: Tensor) -> Tensor:
    """``t`` (the rank's rows of an entry of ``p``) as a DTensor laid out like ``p`` when ``p`` is sharded."""
    if not _sharded.is_sharded(p):
        return t
    shape = (p.shape[0], *t.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return _sharded.DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def get_model_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` with each latent weight as its four code entries (module docstring).

    Submodules compiled in place (``block.compile(...)``) get their stochastic-rounding step counter
    (`fqtc.ops.stepcounter`) here if they have none yet, so the state dict of a fresh model asks a checkpoint for
    every step counter a trained one saved."""
    for mod in model.modules():
        if getattr(mod, "_compiled_call_impl", None) is not None:
            counter_for(mod)
    sd = model.state_dict()
    for name, p in _latent_params(model).items():
        if name not in sd:
            raise KeyError(f"latent weight {name!r} is not in the model's state dict")
        sd.pop(name)
        codes, residual, scale, level = _shard.to_entries(_sharded.local(p))
        for suffix, t in zip(_shard.ENTRY_SUFFIXES, (_like(p, codes), _like(p, residual), _like(p, scale), level)):
            sd[f"{name}.{suffix}"] = t
    return sd


def _rows_for(p: Tensor, t: Tensor) -> Tensor:
    """The rank's rows of a loaded entry ``t`` for parameter ``p`` (plain tensor)."""
    if _sharded.is_sharded(t):
        if _sharded.is_sharded(p) and t.placements == p.placements:
            return t.to_local()
        t = t.full_tensor()
    if _sharded.is_sharded(p):
        start = _sharded.row_offset(p)
        return t[start:start + _sharded.local(p).shape[0]]
    return t


def set_model_state_dict(model: torch.nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
    """Load a state dict of `get_model_state_dict`'s form (from any world size) into ``model``: latent weights from
    their code entries (bit for bit), everything else through ``model.load_state_dict``."""
    sd = dict(state_dict)
    for name, p in _latent_params(model).items():
        entries = [f"{name}.{suffix}" for suffix in _shard.ENTRY_SUFFIXES]
        missing = [e for e in entries if e not in sd]
        if missing:
            if strict:
                raise KeyError(f"set_model_state_dict: {missing} missing for latent weight {name!r}; save with "
                               "fqtc.distributed.get_model_state_dict")
            continue
        lw = _sharded.local(p)
        codes, residual, scale, level = (_rows_for(p, sd.pop(e)) if i < 3 else sd.pop(e)
                                         for i, e in enumerate(entries))
        with torch.no_grad():
            _shard.load_entries(lw, codes, residual, scale, _sharded.local(level))
    result = model.load_state_dict(sd, strict=False)
    latent = set(_latent_params(model))
    missing = [k for k in result.missing_keys if k not in latent]
    if strict and (missing or result.unexpected_keys):
        raise KeyError(f"set_model_state_dict: missing keys {missing}, unexpected keys {result.unexpected_keys}")
