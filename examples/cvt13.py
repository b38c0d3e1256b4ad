"""CvT-13, written in plain PyTorch.

After "CvT: Introducing Convolutions to Vision Transformers" (Wu et al., 2021) and the
CvT-13 configuration of its public repository (github.com/microsoft/CvT,
``experiments/imagenet/cvt/cvt-13-224x224.yaml``); the code here is ours.

* Three stages, each opened by a **convolutional token embedding**: an overlapping strided conv
  (7x7 stride 4 pad 2, then 3x3 stride 2 pad 1 twice) whose map is flattened to tokens,
  LayerNorm-ed and folded back. Widths 64 / 192 / 384, heads 1 / 3 / 6, depths 1 / 2 / 10,
  MLP ratio 4, qkv with bias. No position embedding.
* **Convolutional projection** in every block: the tokens are folded into a map and q, k, v
  each come from a depthwise 3x3 conv (no bias) and BatchNorm, k and v with stride 2, then
  flattened and passed through a linear layer. Attention scores use ``torch.einsum`` and,
  as in the authors' code, the scale ``dim ** -0.5`` of the whole width, not of one head.
* A class token only in the last stage: it is split off before the convolutional projection
  and concatenated back to q, k and v; the classifier reads it after a LayerNorm.

About 20M parameters at 224x224 with 1000 classes.

Run:  python examples/cvt13.py
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # imported as examples.<name> (tests)
    from examples.common import convert_and_print, sample_input
except ImportError:  # run as a script from examples/
    from common import convert_and_print, sample_input

CVT13 = dict(dims=(64, 192, 384), heads=(1, 3, 6), depths=(1, 2, 10), patch=(7, 3, 3), stride=(4, 2, 2),
             padding=(2, 1, 1), cls_token=(False, False, True))


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


class ConvEmbed(nn.Module):
    """Overlapping strided conv, then LayerNorm over the channels of each position."""

    def __init__(self, cin: int, dim: int, patch: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        _, _, h, w = x.shape
        return to_map(self.norm(to_tokens(x)), h, w)


class ConvProjection(nn.Sequential):
    """Depthwise 3x3 conv and BatchNorm on the token map, flattened back to tokens."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=stride, padding=1, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_tokens(self.bn(self.conv(x)))


class ConvAttention(nn.Module):
    def __init__(self, dim: int, heads: int, with_cls_token: bool, stride_kv: int = 2):
        super().__init__()
        self.heads = heads
        self.with_cls_token = with_cls_token
        self.scale = dim ** -0.5  # the authors' code scales by the full width
        self.conv_proj_q = ConvProjection(dim, 1)
        self.conv_proj_k = ConvProjection(dim, stride_kv)
        self.conv_proj_v = ConvProjection(dim, stride_kv)
        self.proj_q = nn.Linear(dim, dim)
        self.proj_k = nn.Linear(dim, dim)
        self.proj_v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        return x.view(b, t, self.heads, c // self.heads).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if self.with_cls_token:
            cls_token, x = torch.split(x, [1, h * w], 1)
        fmap = to_map(x, h, w)
        q, k, v = self.conv_proj_q(fmap), self.conv_proj_k(fmap), self.conv_proj_v(fmap)
        if self.with_cls_token:
            q, k, v = (torch.cat((cls_token, t), dim=1) for t in (q, k, v))
        q = self._split_heads(self.proj_q(q))
        k = self._split_heads(self.proj_k(k))
        v = self._split_heads(self.proj_v(v))
        attn = F.softmax(torch.einsum("bhlk,bhtk->bhlt", q, k) * self.scale, dim=-1)
        x = torch.einsum("bhlt,bhtv->bhlv", attn, v)
        b, _, t, _ = x.shape
        return self.proj(x.permute(0, 2, 1, 3).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, with_cls_token: bool, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, heads, with_cls_token)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    """Convolutional token embedding, optional class token, transformer blocks.
    Returns the token map (B, C, H, W) and the class token (B, 1, C) or None."""

    def __init__(self, cin: int, dim: int, heads: int, depth: int, patch: int, stride: int, padding: int,
                 cls_token: bool):
        super().__init__()
        self.patch_embed = ConvEmbed(cin, dim, patch, stride, padding)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if cls_token else None
        self.blocks = nn.ModuleList(Block(dim, heads, cls_token) for _ in range(depth))

    def forward(self, x: torch.Tensor):
        x = self.patch_embed(x)
        b, _, h, w = x.shape
        x = to_tokens(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x, h, w)
        cls_tokens = None
        if self.cls_token is not None:
            cls_tokens, x = torch.split(x, [1, h * w], 1)
        return to_map(x, h, w), cls_tokens


class CvT(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, dims=CVT13["dims"], heads=CVT13["heads"],
                 depths=CVT13["depths"], patch=CVT13["patch"], stride=CVT13["stride"],
                 padding=CVT13["padding"], cls_token=CVT13["cls_token"]):
        super().__init__()
        stages, cin = [], in_chans
        for i in range(len(dims)):
            stages.append(Stage(cin, dims[i], heads[i], depths[i], patch[i], stride[i], padding[i], cls_token[i]))
            cin = dims[i]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_tokens = None
        for stage in self.stages:
            x, cls_tokens = stage(x)
        if cls_tokens is not None:
            x = self.norm(cls_tokens).squeeze(1)
        else:
            x = self.norm(to_tokens(x)).mean(dim=1)
        return self.head(x)


def build(num_classes: int = 1000, depths: tuple = CVT13["depths"], seed: int = 0) -> CvT:
    """CvT-13 with random weights (``depths`` smaller for quick tests)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CvT(num_classes=num_classes, depths=depths).eval()


if __name__ == "__main__":
    convert_and_print("CvT-13", build(), sample_input())
