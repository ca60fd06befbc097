"""CONCH's image tower, as its repository builds it, without the text side.

https://github.com/mahmoodlab/CONCH (``conch/open_clip_custom``): ``coca_model._build_vision_tower``
makes a timm ``VisionTransformer`` (ViT-B/16, 448 px, ``dynamic_img_size``) whose forward is
``forward_features`` (the normalised tokens); ``vision_tower.VisualModel`` pools them with an
``AttentionalPooler`` (one learned query, 8 heads, d_model 512 over the 768-wide tokens) and a
LayerNorm. ``encode_image(x, proj_contrast=False, normalize=False)`` returns that 512-vector:
the embedding the card recommends for linear probes and multiple-instance learning, and the one
TRIDENT's ``conch_v1`` uses. Parameter names follow ``model.visual`` (``trunk``,
``attn_pool_contrast``, ``ln_contrast``).
"""
from __future__ import annotations

import torch
from torch import nn

from nic_fast.encoders.vit import ViTConfig, VisionTransformer

TRUNK = ViTConfig(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, readout="tokens")
EMBED_DIM = 512  # conch_ViT-B-16.json: "embed_dim"
POOLER_HEADS = 8  # "attn_pooler_heads"


class AttentionalPooler(nn.Module):
    """open_clip's pooler: LayerNormed learned queries attend to the LayerNormed tokens."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class ConchImageTower(nn.Module):
    """(N, 3, 448, 448) → (N, 512): CONCH's ``encode_image(proj_contrast=False, normalize=False)``."""

    def __init__(self, trunk: ViTConfig = TRUNK) -> None:
        super().__init__()
        self.trunk = VisionTransformer(trunk)
        self.attn_pool_contrast = AttentionalPooler(EMBED_DIM, trunk.embed_dim, POOLER_HEADS, n_queries=1)
        self.ln_contrast = nn.LayerNorm(EMBED_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk(x))[:, 0])
