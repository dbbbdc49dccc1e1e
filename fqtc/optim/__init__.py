"""Latent weight quantization (LWQ, docs/latent_weights.md): low-bit parameter storage and fused optimizers.

- `LatentWeight`: a parameter held as integer weight + low-bit residual + per-row scale (`fqtc.quant.lwq`).
- `prepare(model, options)`: converts a model's GEMM weights in place (also ``fqtc.prepare``).
- `SGD`, `AdamW`: torch.optim's math, one fused ``fqt::lwq_update`` per latent parameter; ``state_bits=8`` keeps
  optimizer states 8-bit block-quantized.
- `training_state_bytes(model, optimizer)`: bytes actually held by weights and optimizer states.

See docs/latent_weights.md.
"""

from fqtc.optim.adamw import AdamW
from fqtc.optim.base import LatentOptimizer
from fqtc.optim.latent import LatentWeight, prepare
from fqtc.optim.memory import training_state_bytes
from fqtc.optim.sgd import SGD

__all__ = ["AdamW", "LatentOptimizer", "LatentWeight", "SGD", "prepare", "training_state_bytes"]
