"""ViT-Tiny, written in plain PyTorch.

After "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021) in the Tiny size of DeiT
(Touvron et al., 2021): 16x16 patches embedded by a strided conv, a learned class token and a
learned position embedding, 12 pre-norm blocks of width 192 with 3 heads and an MLP of 4x,
GELU, a final LayerNorm and a linear head read from the class token. About 5.7M parameters at
224x224 with 1000 classes. The code here is ours.

The attention is written out (``q @ k.transpose(-2, -1)``, softmax, ``@ v``) as most ViT code
does, with the heads split by a reshape and a permute of the fused qkv projection.

Run:  python examples/vit_tiny.py
"""
from __future__ import annotations

import torch
import torch.nn as nn

try:  # imported as examples.<name> (tests)
    from examples.common import convert_and_print, sample_input
except ImportError:  # run as a script from examples/
    from common import convert_and_print, sample_input


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/p * W/p, dim): a conv with kernel = stride = patch, flattened."""

    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, patch: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 dim: int = 192, depth: int = 12, heads: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        if img_size % patch:
            raise ValueError(f"img_size must be a multiple of patch; received: img_size={img_size}, patch={patch}")
        self.patch_embed = PatchEmbed(patch, in_chans, dim)
        num_patches = (img_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def build(img_size: int = 224, num_classes: int = 1000, depth: int = 12, seed: int = 0) -> VisionTransformer:
    """ViT-Tiny/16 with random weights (``depth`` and ``img_size`` smaller for quick tests)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return VisionTransformer(img_size=img_size, num_classes=num_classes, depth=depth).eval()


if __name__ == "__main__":
    convert_and_print("ViT-Tiny", build(), sample_input())
