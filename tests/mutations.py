"""Mutations of fqtc that the suite must catch (tests/test_mutations.py): each one breaks a property the README
claims, and ``FQTC_MUTATION=<name>`` installs it when tests/conftest.py is imported, so a pytest run in a subprocess
tests the mutated package. Every mutation is a monkeypatch of a module attribute looked up at call time."""

from __future__ import annotations

import torch


def rewrite_skipped() -> None:
    """The rewrite passes do nothing: GEMMs stay aten ops while assign's plans say ``quantized``."""
    import fqtc.passes as P

    P.rewrite = lambda gm, plans, config: {"gemms_rewritten": 0, "quantize_nodes": 0}
    P.rewrite_convs = lambda gm, sites, config: ([], {"conv_sites": 0, "conv_gemms_rewritten": 0,
                                                      "conv_quantize_nodes": 0})


def exact_quantizer() -> None:
    """8-bit ``fqt::quantize`` made exact: code sign(x), one scale |x| per element (the GEMMs then multiply the
    dequantized operands, which equal the inputs)."""
    from fqtc.quant import uniform

    orig = uniform.quantize

    def quantize(x, bits, reduce_dims, *args, **kwargs):
        if bits != 8:
            return orig(x, bits, reduce_dims, *args, **kwargs)
        xf = x.float()
        return torch.sign(xf).to(torch.int8), torch.where(xf != 0, xf.abs(), torch.ones_like(xf))

    uniform.quantize = quantize


def per_tensor_weights() -> None:
    """Weights of the ``output`` GEMM per tensor instead of per output channel."""
    from fqtc import config

    config.DEFAULT_GRANULARITY[("output", "weight")] = "tensor"


def per_tensor_grad_output() -> None:
    """``grad_output`` of ``grad_input`` per tensor instead of per sample."""
    from fqtc import config

    config.DEFAULT_GRANULARITY[("grad_input", "grad_output")] = "tensor"


def sr_bias() -> None:
    """Stochastic rounding with E[u] = 0.51: every rounding biased upward by 1% of a step."""
    from fqtc.quant import uniform

    for name in ("uniform_like", "uniform_like_key"):
        orig = getattr(uniform, name)
        setattr(uniform, name, lambda *a, _f=orig, **kw: _f(*a, **kw) * 0.98 + 0.02)


def linear_state_codec() -> None:
    """8-bit optimizer states with a linear block code instead of square-root companding."""
    from fqtc.quant import lwq

    def quantize_state(x, signed=True, block=lwq.STATE_BLOCK):
        xb, pad = lwq._blocks(x, block)
        amax = xb.abs().amax(dim=1, keepdim=True)
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        levels = 127.0 if signed else 255.0
        c = torch.round(levels * xb / safe)
        codes = (c.to(torch.int8) if signed else c.to(torch.uint8)).reshape(-1)
        return (codes[: codes.numel() - pad] if pad else codes), amax.reshape(-1)

    def dequantize_state(codes, amax, shape, block=lwq.STATE_BLOCK):
        levels = 127.0 if codes.dtype == torch.int8 else 255.0
        c = codes.float()
        n = c.numel()
        pad = (-n) % block
        if pad:
            c = torch.cat([c, c.new_zeros(pad)])
        return (c.view(-1, block) / levels * amax.view(-1, 1)).reshape(-1)[:n].view(*shape)

    lwq.quantize_state, lwq.dequantize_state = quantize_state, dequantize_state


MUTATIONS = {f.__name__: f for f in (rewrite_skipped, exact_quantizer, per_tensor_weights, per_tensor_grad_output,
                                     sr_bias, linear_state_codec)}


def install(name: str) -> None:
    if name not in MUTATIONS:
        raise ValueError(f"FQTC_MUTATION={name!r}; allowed: {', '.join(MUTATIONS)}")
    MUTATIONS[name]()
