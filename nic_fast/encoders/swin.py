"""CTransPath: a Swin-T with a convolutional stem, in the parameter names of its published checkpoint.

CTransPath (Wang et al., Medical Image Analysis 2022; https://github.com/Xiyue-Wang/TransPath)
is ``swin_tiny_patch4_window7_224`` of timm 0.5.4 (distributed as the ``timm-ctp`` package)
with the patch embedding replaced by ``ConvStem`` (two stride-2 3×3 conv + BN + ReLU, then a
1×1 conv) and the classifier removed; TRIDENT builds it the same way
(``trident/patch_encoder_models/model_zoo/ctranspath/ctran.py``). timm 0.5.4's Swin puts each
stage's patch merging at the *end* of the stage (``layers.{i}.downsample``), unlike timm ≥ 0.9,
so its checkpoint does not load into today's timm Swin; this module keeps the 0.5.4 layout.

The relative-position index and the shifted-window masks are fixed functions of the window
size and the grid; they are recomputed here (non-persistent buffers), and the copies the
published checkpoint carries are ignored on import. ``tests/test_presets.py`` checks the
arithmetic against timm-ctp where it is installed.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvStem(nn.Module):
    """4× downsampling stem: conv3×3/2 → BN → ReLU → conv3×3/2 → BN → ReLU → conv1×1, then LayerNorm."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_dim, out_dim = 3, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_dim),
                       nn.ReLU(inplace=True)]
            in_dim, out_dim = out_dim, out_dim * 2
        layers.append(nn.Conv2d(in_dim, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def _window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, window², C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B·nW, window², C) → (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def _relative_position_index(window: int) -> torch.Tensor:
    # Explicit CPU: the index is computed, not loaded, so it must be real even when the
    # module is built on the meta device to check a checkpoint's shapes.
    cpu = torch.device("cpu")
    coords = torch.stack(torch.meshgrid(torch.arange(window, device=cpu), torch.arange(window, device=cpu),
                                        indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[:, :, 0] * (2 * window - 1) + relative[:, :, 1]


def _shift_mask(grid: int, window: int, shift: int) -> torch.Tensor:
    """(nW, window², window²) additive mask: −100 between tokens from different regions after the cyclic shift."""
    regions = torch.zeros(1, grid, grid, 1, device="cpu")  # real even under a meta-device build
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            regions[:, rows, cols, :] = label
            label += 1
    windows = _window_partition(regions, window).squeeze(-1)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        windows, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            n_masks = mask.shape[0]
            attn = attn.view(windows // n_masks, n_masks, self.num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, tokens, tokens)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(windows, tokens, dim)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """(Shifted) window attention and MLP, each pre-norm with a residual."""

    def __init__(self, dim: int, grid: int, num_heads: int, window: int, shift: int) -> None:
        super().__init__()
        if grid <= window:  # the whole grid is one window: nothing to shift
            window, shift = grid, 0
        self.grid, self.window, self.shift = grid, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        mask = _shift_mask(grid, window, shift) if shift > 0 else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        shortcut = x
        x = self.norm1(x).view(batch, self.grid, self.grid, dim)
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = self.attn(_window_partition(x, self.window), self.attn_mask)
        x = _window_reverse(x, self.window, self.grid, self.grid)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x.reshape(batch, tokens, dim)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2×2 neighbourhoods concatenated (timm 0.5.4's order) → LayerNorm → linear to twice the width."""

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x.shape
        x = x.view(batch, self.grid, self.grid, dim)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(batch, -1, 4 * dim)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, grid: int, depth: int, num_heads: int, window: int, merge: bool) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[SwinBlock(dim, grid, num_heads, window, 0 if i % 2 == 0 else window // 2)
                                      for i in range(depth)])
        self.downsample = PatchMerging(dim, grid) if merge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class CTransPath(nn.Module):
    """(N, 3, 224, 224) → (N, 768): the mean of the last stage's normalised tokens."""

    def __init__(self, img_size: int = 224, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), window: int = 7) -> None:
        super().__init__()
        if img_size % (4 * 2 ** (len(depths) - 1)):
            raise ValueError(f"img_size {img_size} is not a multiple of {4 * 2 ** (len(depths) - 1)}")
        self.patch_embed = ConvStem(embed_dim)
        grid = img_size // 4
        stages = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stages.append(SwinStage(embed_dim * 2**i, grid // 2**i, depth, heads, window, merge=i < len(depths) - 1))
        self.layers = nn.Sequential(*stages)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.patch_embed(x))).mean(dim=1)
