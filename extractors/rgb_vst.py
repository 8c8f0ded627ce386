"""RGB: Video Swin Transformer (torchvision `swin3d_b`, Kinetics-400), 1024-d per clip.

Window attention runs fused by default (`attention="fused"` in the ExtractionConfig): torchvision
computes softmax(q k^T * scale + bias + mask) v as a matmul, two additions, a softmax and a matmul,
each a pass over the (windows, heads, 392, 392) scores, which made half of Swin-B's CPU time
(benchmarks/profile_backbone.py); torch's scaled_dot_product_attention does it in one kernel. Same
weights, same arithmetic up to float rounding (tests/test_backbones.py bounds the difference);
`attention="reference"` keeps torchvision's own code.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.video import Swin3D_B_Weights, swin3d_b
from torchvision.models.video import swin_transformer as tv_swin
from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d, SwinTransformer3d

from extractors.base import Extractor, WeightsSource, checkpoint_path, register
from extractors.config import ExtractionConfig
from extractors.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    count_flops,
    crop_resize,
    dummy_frames,
    normalise,
)

PRETRAINED = Swin3D_B_Weights.KINETICS400_V1
CROP = (224, 300)  # centre crop (height, width) at short side 256, then resized to INPUT_SIZE
INPUT_SIZE = 224


def swin3d_tiny() -> SwinTransformer3d:
    """The swin3d_b layout at a fraction of its width and depth, for tests and smoke runs."""
    return SwinTransformer3d(
        patch_size=[2, 4, 4],
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=[8, 7, 7],
        stochastic_depth_prob=0.0,
    )


def shifted_window_mask(padded: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int],
                        device: torch.device | None = None) -> torch.Tensor:
    """torchvision's `_compute_attention_mask_3d` (windows, tokens, tokens): -100 between tokens that the
    cyclic shift brought from different regions, 0 within one, the same values exactly.

    torchvision labels the regions by 27 slice assignments into a zeros tensor; torch.compile's C++ code
    for those nested masked stores does not build in torch 2.10/2.11 (pytorch/pytorch#179135). Here the
    label is arithmetic: along each axis a position is in region 0, 1 or 2 (before size - window, before
    size - shift, the rest), the last slice covering it in torchvision's order. A zero shift along an
    axis makes torchvision's last slice, and so one label, cover that whole axis.
    """
    labels = torch.zeros((), dtype=torch.long, device=device)
    for axis, (size, win, step) in enumerate(zip(padded, window, shift)):
        index = torch.arange(size, device=device)
        region = (index >= size - win).long() + (index >= size - step).long() if step else torch.zeros_like(index)
        labels = labels[..., None] * 3 + region.view(*[1] * axis, size)
    grid = [size // win for size, win in zip(padded, window)]
    labels = labels.view(grid[0], window[0], grid[1], window[1], grid[2], window[2])
    labels = labels.permute(0, 2, 4, 1, 3, 5).reshape(grid[0] * grid[1] * grid[2], -1)
    return torch.where(labels[:, None, :] != labels[:, :, None], -100.0, 0.0)


class FusedWindowAttention3d(ShiftedWindowAttention3d):
    """torchvision's shifted-window attention with the attention itself in one fused kernel.

    The parameters and the state_dict are the parent's; only forward differs. Windows are attended one
    clip at a time: with a 4-D (windows, heads, tokens, dim) query and a (windows, heads, tokens, tokens)
    additive mask, torch's CPU kernel runs ~2.9x faster than the written-out attention, while a 5-D
    call over the whole batch falls back to a slow path (1.06x; benchmarks/bench_attention.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, t, h, w, channels = x.shape
        window, shift = tv_swin._get_window_and_shift_size(self.shift_size.copy(), [t, h, w], self.window_size.copy())
        pad = tv_swin._compute_pad_size_3d((t, h, w), tuple(window))
        x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        padded = x.shape[1:4]
        shifted = sum(shift) > 0
        if shifted:
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        grid = [size // win for size, win in zip(padded, window)]
        windows, tokens, heads = grid[0] * grid[1] * grid[2], window[0] * window[1] * window[2], self.num_heads
        x = x.view(batch, grid[0], window[0], grid[1], window[1], grid[2], window[2], channels)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(batch, windows, tokens, channels)

        qkv = F.linear(x, self.qkv.weight, self.qkv.bias).view(batch, windows, tokens, 3, heads, channels // heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)  # each (batch, windows, heads, tokens, head_dim)
        mask = self.get_relative_position_bias(window)  # (1, heads, tokens, tokens)
        if shifted:
            mask = mask + shifted_window_mask(tuple(padded), tuple(window), tuple(shift), x.device)[:, None]
        mask = mask.to(q.dtype).expand(windows, heads, tokens, tokens)
        dropout = self.attention_dropout if self.training else 0.0
        out = torch.stack([F.scaled_dot_product_attention(q[i], k[i], v[i], attn_mask=mask, dropout_p=dropout)
                           for i in range(batch)])
        x = out.transpose(2, 3).reshape(batch, windows, tokens, channels)
        x = F.dropout(F.linear(x, self.proj.weight, self.proj.bias), p=self.dropout, training=self.training)

        x = x.view(batch, grid[0], grid[1], grid[2], window[0], window[1], window[2], channels)
        x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, *padded, channels)
        if shifted:
            x = torch.roll(x, shifts=tuple(shift), dims=(1, 2, 3))
        return x[:, :t, :h, :w].contiguous()


def fuse_window_attention(model: SwinTransformer3d) -> SwinTransformer3d:
    """Every window attention of `model` runs fused (FusedWindowAttention3d); weights untouched."""
    for module in model.modules():
        if type(module) is ShiftedWindowAttention3d:
            module.__class__ = FusedWindowAttention3d
    return model


@register("rgb", "vst")
class VideoSwinExtractor(Extractor):
    """Frames -> ImageNet-normalised 224x224 crops -> Swin3D trunk -> pooled features (head removed).

    Every frame of the clip goes in (32 per segment for the rg protocol, 8 for fs1000).
    """

    input_kind = "frames"
    version = "1"

    def __init__(self, config: ExtractionConfig, device: torch.device, weights: WeightsSource) -> None:
        super().__init__(config, device, weights)
        if config.arch_size == "tiny":
            model = swin3d_tiny()
        else:
            model = swin3d_b()
            if not config.random_weights:
                path = checkpoint_path(weights, PRETRAINED.url)
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if config.attention == "fused":
            fuse_window_attention(model)
        self.feature_dim = model.num_features
        model.head = nn.Identity()
        self.model = model.to(device).eval().requires_grad_(False)

    @classmethod
    def check_weights(cls, config: ExtractionConfig, weights: WeightsSource) -> None:
        checkpoint_path(weights, PRETRAINED.url)

    @torch.no_grad()
    def embed(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = normalise(crop_resize(batch, CROP, INPUT_SIZE, self.device), IMAGENET_MEAN, IMAGENET_STD)
        x = x.permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            features = self.model(x)
        return features.float().cpu()

    def flops_per_clip(self, frames: int) -> float:
        # torch's FLOP counter sees no arithmetic in the fused attention kernel: count the same work
        # written out, with torchvision's attention swapped in for the count.
        fused = [m for m in self.model.modules() if type(m) is FusedWindowAttention3d]
        for module in fused:
            module.__class__ = ShiftedWindowAttention3d
        try:
            return count_flops(self.embed, dummy_frames(frames, self.config.decode_short_side))
        finally:
            for module in fused:
                module.__class__ = FusedWindowAttention3d

    def describe(self) -> dict:
        return {
            **super().describe(),
            "architecture": "torchvision swin3d_b" if self.config.arch_size == "full" else "swin3d tiny",
            "pretrained": None if self.config.random_weights else f"Swin3D_B_Weights.{PRETRAINED.name}",
            "crop": f"centre {CROP[0]}x{CROP[1]} at short side 256, resized to {INPUT_SIZE}x{INPUT_SIZE}",
            "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "pooling": "mean over all tokens after the last norm (head removed)",
        }
