"""The noise-prediction network ε_θ(x_t, t, y): a small U-Net for 28×28 images.

Residual blocks with GroupNorm and a time (and class) embedding applied as scale and
shift, self-attention at the lowest resolution, skip connections between the down and
up paths. The class embedding has one extra row, the learned null class, which stands
for "no label" in classifier-free guidance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_core.config import ModelParams

GROUPS = 8


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style embedding of integer timesteps: [cos(t·f_k), sin(t·f_k)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(GROUPS, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        for p in self.conv2.parameters():  # zero weight and bias: each block starts as the identity
            nn.init.zeros_(p)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(GROUPS, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        for p in self.proj.parameters():
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """ε_θ(x_t, t, y). `num_classes=None` builds an unconditional model.

    `forward(x, t, labels)` takes t as integer timestep indices in [0, T) and labels in
    [0, num_classes], where `num_classes` itself is the null class ("no label").

    Each level of the down path keeps the output of each of its blocks as a skip, and the
    matching up level has as many blocks, each taking one skip. Between levels the up path
    upsamples and convolves straight to the next level's (narrower) width: that keeps the
    up path, which costs most, near the down path's cost.
    """

    def __init__(
        self,
        channels: list[int],
        blocks_per_level: int = 1,
        attention_heads: int = 4,
        dropout: float = 0.0,
        num_classes: int | None = None,
        image_channels: int = 1,
        patch_size: int = 1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.time_dim = channels[0]
        emb_dim = 4 * channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None

        # patch_size p > 1: the network runs at 28/p pixels on p×p patches folded into channels
        folded = image_channels * patch_size**2
        # at patch_size 1 nothing to do, and no copy in the training step
        self.fold: nn.Module = nn.PixelUnshuffle(patch_size) if patch_size > 1 else nn.Identity()
        self.unfold: nn.Module = nn.PixelShuffle(patch_size) if patch_size > 1 else nn.Identity()
        self.inp = nn.Conv2d(folded, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        width = channels[0]
        for level, c in enumerate(channels):
            for _ in range(blocks_per_level):
                self.down.append(ResBlock(width, c, emb_dim, dropout))
                width = c
            if level < len(channels) - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))

        self.mid1 = ResBlock(width, width, emb_dim, dropout)
        self.mid_attn = SelfAttention(width, attention_heads)
        self.mid2 = ResBlock(width, width, emb_dim, dropout)

        self.up = nn.ModuleList()
        for level, c in reversed(list(enumerate(channels))):
            for _ in range(blocks_per_level):
                self.up.append(ResBlock(width + c, c, emb_dim, dropout))
                width = c
            if level > 0:
                width = channels[level - 1]
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, width, 3, padding=1))
                )

        self.out = nn.Sequential(nn.GroupNorm(GROUPS, width), nn.SiLU(), nn.Conv2d(width, folded, 3, padding=1))
        for p in self.out[-1].parameters():
            nn.init.zeros_(p)

    @property
    def null_class(self) -> int:
        if self.num_classes is None:
            raise AttributeError("an unconditional UNet has no null class")
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(sinusoidal_embedding(t, self.time_dim))
        if self.class_emb is not None:
            if labels is None:
                labels = torch.full_like(t, self.null_class)
            emb = emb + self.class_emb(labels)
        emb = F.silu(emb)

        h = self.inp(self.fold(x))
        skips = []
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
                skips.append(h)
            else:
                h = layer(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:  # a block takes its skip; an upsampling layer takes h alone
            h = layer(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.unfold(self.out(h))


def build_unet(params: ModelParams, num_classes: int | None) -> UNet:
    return UNet(
        channels=list(params.channels),
        blocks_per_level=params.blocks_per_level,
        attention_heads=params.attention_heads,
        dropout=params.dropout,
        num_classes=num_classes,
        patch_size=params.patch_size,
    )
