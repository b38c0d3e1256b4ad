"""Swin Transformer stages, written in plain PyTorch.

After "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (Liu et al.,
2021), the first two stages of Swin-T: a 4x4 patch embedding with LayerNorm, two blocks of
width 96 (3 heads), patch merging, two blocks of width 192 (6 heads), then LayerNorm, average
pooling over the tokens and a linear head. The code here is ours.

What makes Swin hard to convert, all kept as in the paper's code:

* window attention over 7x7 windows, split off by ``view``/``permute`` chains of rank 6
  (:func:`window_partition`, :func:`window_reverse`);
* a learned relative position bias, gathered from its table by a constant index buffer;
* every second block shifts the windows by ``torch.roll`` and masks attention across the
  shifted borders with a constant mask added to the scores (the batch of windows is viewed
  as ``(B, nW, heads, N, N)`` for that);
* patch merging by strided slices ``x[:, 0::2, 0::2, :]`` and a concatenation.

Run:  python examples/swin_block.py
"""
from __future__ import annotations

import torch
import torch.nn as nn

try:  # imported as examples.<name> (tests)
    from examples.common import convert_and_print, sample_input
except ImportError:  # run as a script from examples/
    from common import convert_and_print, sample_input


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws, ws, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B * H/ws * W/ws, ws, ws, C) -> (B, H, W, C)."""
    b = int(windows.shape[0] / (h * w / ws / ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) indices into a ((2ws-1)^2, heads) bias table, one per pair of positions."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, N, N): 0 within a region of the shifted image, -100 across regions."""
    regions = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for k, (hs, wsl) in enumerate((a, b) for a in cuts for b in cuts):
        regions[:, hs, wsl, :] = k
    ids = window_partition(regions, ws).view(-1, ws * ws)
    mask = ids.unsqueeze(1) - ids.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, ws: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads) * 0.02)
        self.register_buffer("relative_position_index", relative_position_index(ws))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b_ // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, heads: int, ws: int = 7, shift: int = 0, mlp_ratio: float = 4.0):
        super().__init__()
        if resolution <= ws:  # one window covers the map: no shift
            ws, shift = resolution, 0
        self.resolution, self.ws, self.shift = resolution, ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        mask = shifted_window_mask(resolution, resolution, ws, shift) if shift else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = w = self.resolution
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(x, self.ws).view(-1, self.ws * self.ws, c)
        windows = self.attn(windows, mask=self.attn_mask).view(-1, self.ws, self.ws, c)
        x = window_reverse(windows, self.ws, h, w)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x.view(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """(B, H*W, C) -> (B, H/2*W/2, 2C): the four pixels of each 2x2 cell side by side, then a linear."""

    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        x = torch.cat([x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStages(nn.Module):
    def __init__(self, img_size: int = 224, patch: int = 4, dim: int = 96, depths: tuple = (2, 2),
                 heads: tuple = (3, 6), ws: int = 7, num_classes: int = 1000):
        super().__init__()
        if img_size % (patch * 2 ** (len(depths) - 1)):
            raise ValueError(f"img_size must divide into patches and merges; received: img_size={img_size}")
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.embed_norm = nn.LayerNorm(dim)
        res, stages = img_size // patch, []
        for i, (depth, nh) in enumerate(zip(depths, heads)):
            if i:
                stages.append(PatchMerging(dim, res))
                dim, res = 2 * dim, res // 2
            stages += [SwinBlock(dim, res, nh, ws, shift=0 if j % 2 == 0 else ws // 2) for j in range(depth)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.patch_embed(x).flatten(2).transpose(1, 2))
        x = self.norm(self.stages(x))
        return self.head(torch.flatten(self.pool(x.transpose(1, 2)), 1))


def build(img_size: int = 224, num_classes: int = 1000, dim: int = 96, seed: int = 0) -> SwinStages:
    """Swin-T's first two stages (window 7, shift 3) with random weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SwinStages(img_size=img_size, dim=dim, num_classes=num_classes).eval()


if __name__ == "__main__":
    convert_and_print("Swin stages", build(), sample_input())
