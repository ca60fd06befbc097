"""Vision Transformer with timm's module and parameter names, so published checkpoints load as-is.

Pathology foundation models (UNI, Virchow, H-optimus, Prov-GigaPath, Kaiko, Lunit, CONCH's
image tower) are published as state dicts of timm's ``VisionTransformer``
(``timm/models/vision_transformer.py``). timm itself cannot be imported beside the pinned CPU
torch: its package imports torchvision at import time (``timm/layers/create_norm.py`` and
``timm/data/transforms.py`` in 1.0.31), and PyPI's torchvision 0.28 (torch 2.13's pair) fails to
load next to the CPU wheel ("operator torchvision::nms does not exist": its ``_C.so`` links
``libc10_cuda.so``). So the inference path those models use is written out here, in timm's
names and arithmetic (pre-norm blocks, fused qkv, LayerScale, GELU MLP or timm's
``SwiGLUPacked``, class and register tokens, with or without position embeddings for the
prefix tokens). ``tests/test_presets.py`` checks it against timm's own code where timm is
installed. Everything here is TorchScript-able, so an imported encoder saves as a ``.pt``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

READOUTS = ("class", "class+mean", "tokens")


@dataclass(frozen=True)
class ViTConfig:
    """A timm ``VisionTransformer``'s constructor arguments (the ones these models set).

    ``mlp_ratio`` gives the MLP width as timm computes it, ``int(embed_dim * mlp_ratio)``;
    with ``swiglu`` that width is fc1's output, split into the gate and the value halves
    (timm's ``SwiGLUPacked``). ``init_values`` set means LayerScale (``ls1``/``ls2``).
    ``no_embed_class`` means the position embeddings cover only the patch tokens.
    ``readout``: ``class`` (the class token, timm's ``global_pool='token'``), ``class+mean``
    (the class token and the mean of the patch tokens, registers excluded: Virchow's
    embedding) or ``tokens`` (the whole normalised sequence, for heads built on top).
    """

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None
    swiglu: bool = False
    reg_tokens: int = 0
    no_embed_class: bool = False
    norm_eps: float = 1e-6
    readout: str = "class"

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def output_dim(self) -> int:
        return 2 * self.embed_dim if self.readout == "class+mean" else self.embed_dim


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens: one strided convolution (timm's ``patch_embed.proj``)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, as timm's ``Attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 → exact GELU → fc2 (timm's ``Mlp``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUPacked(nn.Module):
    """timm's ``SwiGLUPacked``: fc1 gives [x1, x2]; ``silu(x1) * x2`` → fc2 (half the width)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        if hidden % 2:
            raise ValueError(f"SwiGLU width must be even, got {hidden}")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.act(x1) * x2)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias)
        self.ls1 = LayerScale(dim, config.init_values) if config.init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = (SwiGLUPacked if config.swiglu else Mlp)(dim, config.mlp_hidden)
        self.ls2 = LayerScale(dim, config.init_values) if config.init_values is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """(N, 3, img_size, img_size) → (N, output_dim) embeddings, or the token sequence."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.readout = config.readout
        self.num_prefix_tokens = 1 + config.reg_tokens
        self.no_embed_class = config.no_embed_class
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, config.reg_tokens, dim)) if config.reg_tokens else None
        embed_len = config.num_patches if config.no_embed_class else config.num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, dim))
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        for p in (self.cls_token, self.pos_embed, self.reg_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)  # random weights (tests, benchmarks) behave like trained ones

    def _prefix(self, batch: int) -> torch.Tensor:
        cls = self.cls_token.expand(batch, -1, -1)
        reg = self.reg_token
        if reg is None:
            return cls
        return torch.cat([cls, reg.expand(batch, -1, -1)], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised token sequence: class token, registers, then the patch tokens."""
        x = self.patch_embed(x)
        prefix = self._prefix(x.shape[0])
        if self.no_embed_class:
            x = torch.cat([prefix, x + self.pos_embed], dim=1)
        else:
            x = torch.cat([prefix, x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        if self.readout == "tokens":
            return x
        if self.readout == "class+mean":
            return torch.cat([x[:, 0], x[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)
        return x[:, 0]
