"""Benchmark models: the architectures FQT papers evaluate, scaled to train on CPU.

| model | what it exercises |
|---|---|
| `MLP` | ``addmm`` GEMMs only |
| `SmallCNN` | plain ``conv2d`` (+ bias) with max-pooling, a ``Linear`` head |
| `ResNet` (`resnet20`) | 3x3 convs without bias, BatchNorm, identity and 1x1-conv (stride 2) residual shortcuts |
| `MobileNetV2` (`mobilenet_v2_tiny`) | inverted residuals: 1x1 expand, 3x3 *depthwise* (``groups=C``), 1x1 project |
| `CharGPT` | causal self-attention through ``F.scaled_dot_product_attention`` (or ``nn.MultiheadAttention``), GELU
  MLPs, LayerNorm, token embedding tied to the output head |

All image models take ``(N, C, H, W)`` float inputs and return ``(N, num_classes)`` logits; their widths and
depths are arguments so tests can build tiny instances of the same architecture.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) x len(hidden) -> Linear."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (128, 64), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv(3x3, bias) -> ReLU -> maxpool stages and a two-layer head (the Fashion-MNIST benchmark CNN)."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, int] = (32, 64), num_classes: int = 10,
                 image_size: int = 28, hidden: int = 128) -> None:
        super().__init__()
        c1, c2 = widths
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        side = image_size // 4
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN + shortcut (identity, or 1x1 conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, sec. 4.2): stem conv, 3 stages of ``blocks`` basic blocks with widths
    ``widths`` (stride 2 between stages), global average pooling, Linear head. ``blocks=3`` is ResNet-20."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64),
                 blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths):
            stage = []
            for j in range(blocks):
                stage.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def resnet20(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> ResNet:
    """ResNet-20: 19 convs + 2 shortcut 1x1 convs + 1 Linear (widths width, 2*width, 4*width)."""
    return ResNet(in_channels, num_classes, (width, 2 * width, 4 * width), blocks=3)


class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al. 2018, table 1): 1x1 expand -> 3x3 depthwise -> 1x1 linear projection,
    BatchNorm after each conv, ReLU6 after the first two, a residual when stride is 1 and widths match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """A MobileNetV2-style net: stem conv, inverted-residual stages ``(expand, width, repeats, stride)``,
    1x1 head conv, global average pooling, Linear classifier."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 setting: tuple[tuple[int, int, int, int], ...] = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2)),
                 stem: int = 16, head: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                   nn.ReLU6()]
        cin = stem
        for t, c, n, s in setting:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def mobilenet_v2_tiny(in_channels: int = 1, num_classes: int = 10) -> MobileNetV2:
    """The smallest instance used by tests: one block per stage type, 8-16 channels."""
    return MobileNetV2(in_channels, num_classes, setting=((1, 8, 1, 1), (2, 12, 2, 2)), stem=8, head=32)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: fused QKV Linear, ``F.scaled_dot_product_attention(is_causal=True)``,
    output projection. With ``impl="mha"`` the same layer is an ``nn.MultiheadAttention`` with a causal mask."""

    def __init__(self, dim: int, heads: int, impl: str = "sdpa") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        if impl not in ("sdpa", "mha"):
            raise ValueError(f"attention impl {impl!r}; allowed: sdpa, mha")
        self.heads, self.impl = heads, impl
        if impl == "sdpa":
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
        else:
            self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        if self.impl == "mha":
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, impl: str) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, impl)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """A small GPT (pre-LN decoder) over characters; the output head reuses the token embedding (tied weights)."""

    def __init__(self, vocab_size: int = 65, dim: int = 64, heads: int = 4, layers: int = 2, max_len: int = 128,
                 attention: str = "sdpa") -> None:
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, attention) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len {self.max_len}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        # tied head: logits = LN(x) @ E^T (Press & Wolf 2017)
        return F.linear(self.ln_f(x), self.tok.weight)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def perplexity(loss: float) -> float:
    return math.exp(loss)


IMAGE_MODELS = {
    "mlp": lambda in_ch, side, nc: MLP(in_ch * side * side, (128, 64), nc),
    "cnn": lambda in_ch, side, nc: SmallCNN(in_ch, (32, 64), nc, side),
    "resnet20": lambda in_ch, side, nc: resnet20(in_ch, nc),
    "mobilenet_v2": lambda in_ch, side, nc: MobileNetV2(in_ch, nc),
}


def build_image_model(name: str, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Module:
    """An image model by name: ``mlp``, ``cnn``, ``resnet20``, ``mobilenet_v2``."""
    if name not in IMAGE_MODELS:
        raise ValueError(f"unknown image model {name!r}; available: {', '.join(IMAGE_MODELS)}")
    return IMAGE_MODELS[name](in_channels, image_size, num_classes)
