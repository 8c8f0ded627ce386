"""RGB: Video Swin Transformer (torchvision `swin3d_b`, Kinetics-400), 1024-d per clip.

Window attention runs fused by default (`attention="fused"` in VideoSwinSettings): torchvision
computes softmax(q k^T * scale + bias + mask) v as a matmul, two additions, a softmax and a matmul,
each a pass over the (windows, heads, 392, 392) scores, which made half of Swin-B's CPU time
(benchmarks/profile_backbone.py); torch's scaled_dot_product_attention does it in one kernel. Same
weights, same arithmetic up to float rounding (tests/test_backbones.py bounds the difference);
`attention="reference"` keeps torchvision's own code.

`attention="matmul"` computes each window's attention as two batched matmuls with the softmax between,
one window at a time so its scores stay in cache. Under bf16 on a CPU this is faster than the fused
kernel, which there runs at about its float32 speed (benchmarks/bench_attention.py measures both); the
scores are rounded to bf16 before the softmax, which the fused kernel keeps in float32.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.video import Swin3D_B_Weights, swin3d_b
from torchvision.models.video import swin_transformer as tv_swin
from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d, SwinTransformer3d

from extractors.base import Extractor, WeightsFile, WeightsSource, checkpoint_file, checkpoint_path, register
from extractors.checkpoint_layouts import describe_checkpoint, load_original_checkpoint, original_checkpoint
from extractors.config import ExtractionConfig
from extractors.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    as_frames,
    count_flops,
    crop_resize,
    dummy_frames,
    jpeg_round_trip,
    normalise,
    one_clip_per_call,
    pil_resize_crop,
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


@functools.lru_cache(maxsize=16)
def window_order(padded: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse): token k of the windowed sequence is token order[k] of the padded (t, h, w) grid
    rolled back by `shift`, and inverse undoes it. One gather replaces torchvision's roll (a copy of the
    whole activation per rolled dimension on a CPU) and window partition (another copy)."""
    grid = torch.arange(padded[0] * padded[1] * padded[2], device=device).view(padded)
    if any(shift):
        grid = grid.roll(shifts=tuple(-s for s in shift), dims=(0, 1, 2))
    blocks = [size // win for size, win in zip(padded, window)]
    grid = grid.view(blocks[0], window[0], blocks[1], window[1], blocks[2], window[2])
    order = grid.permute(0, 2, 4, 1, 3, 5).flatten()
    return order, torch.argsort(order)


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
    additive mask, torch's CPU kernel runs its fast path (benchmarks/bench_attention.py times it against
    the written-out attention), while a 5-D call over the whole batch falls back to a slow one.
    Rolling and window partition are one gather (`window_order`) and a frozen block makes its mask once
    (`attention_mask`): the same numbers move as in torchvision's code, so the output is bitwise that of
    rolling, partitioning and making the mask on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, t, h, w, channels = x.shape
        window, shift = tv_swin._get_window_and_shift_size(self.shift_size.copy(), [t, h, w], self.window_size.copy())
        window, shift = tuple(window), tuple(shift)
        pad = tv_swin._compute_pad_size_3d((t, h, w), window)
        if any(pad):
            x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        padded = tuple(x.shape[1:4])
        order, inverse = window_order(padded, window, shift, x.device)
        windows, tokens, heads = order.numel() // math.prod(window), math.prod(window), self.num_heads
        x = x.reshape(batch, -1, channels).index_select(1, order).view(batch, windows, tokens, channels)

        qkv = self.qkv(x).view(batch, windows, tokens, 3, heads, channels // heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)  # each (batch, windows, heads, tokens, head_dim)
        mask = self.attention_mask(padded, window, shift, q.dtype)
        attend = lambda i: self.attend(q[i], k[i], v[i], mask)  # noqa: E731
        out = attend(0)[None] if batch == 1 else torch.stack([attend(i) for i in range(batch)])
        x = out.transpose(2, 3).reshape(batch, windows * tokens, channels)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)
        x = x.index_select(1, inverse).view(batch, *padded, channels)
        return x[:, :t, :h, :w].contiguous() if any(pad) else x

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One clip's windows: q, k, v (windows, heads, tokens, head_dim), mask (1 or windows, heads,
        tokens, tokens) -> (windows, heads, tokens, head_dim)."""
        dropout = self.attention_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(*q.shape[:2], -1, -1), dropout_p=dropout)

    def attention_mask(self, padded: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int],
                       dtype: torch.dtype) -> torch.Tensor:
        """Relative position bias (1, heads, tokens, tokens), plus the shifted windows' mask when shifted.

        A frozen block keeps its mask: making it (a gather, the shifted windows' mask, a sum over every
        window and head, in freshly touched memory) on every call is a large share of Swin-B's CPU time.
        The price is memory: windows x heads x tokens x tokens floats per block, kept by each of Swin-B's
        24 blocks (benchmarks/bench_attention.py records the total)."""
        table = self.relative_position_bias_table
        reusable = not (torch.is_grad_enabled() and table.requires_grad)  # training needs the bias's gradient
        # The version counter moves when weights are loaded or changed in place: a stale mask is never used.
        key = (padded, window, shift, dtype, table.device, table._version)
        cached = self.__dict__.get("_cached_mask")
        if reusable and cached is not None and cached[0] == key:
            return cached[1]
        mask = self.get_relative_position_bias(list(window))
        if any(shift):
            mask = mask + shifted_window_mask(padded, window, shift, table.device)[:, None]
        mask = mask.to(dtype)
        if reusable:
            self.__dict__["_cached_mask"] = (key, mask)
        return mask


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, one window at a time: q, k, v (windows, heads, tokens, head_dim),
    mask (1 or windows, heads, tokens, tokens). Each window's (heads, tokens, tokens) scores stay in cache
    between its two batched matmuls and its softmax; the matmuls run in q's dtype, scores included."""
    scale = q.shape[-1] ** -0.5
    out = q.new_empty(q.shape)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    for window in range(len(q)):
        # alpha scales the product inside the matmul call: no rounded, scaled copy of q
        scores = torch.baddbmm(mask[window if len(mask) > 1 else 0], q[window], k[window].transpose(-2, -1),
                               alpha=scale)
        weights = F.dropout(scores.softmax(-1), p=dropout, training=dropout > 0)
        torch.bmm(weights, v[window], out=out[window])
    return out


class MatmulWindowAttention3d(FusedWindowAttention3d):
    """FusedWindowAttention3d with each window's attention as two batched matmuls (`attention="matmul"`,
    `windowed_attention`); bf16 under the extractor's autocast."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return windowed_attention(q, k, v, mask, self.attention_dropout if self.training else 0.0)


WINDOW_ATTENTION = {"fused": FusedWindowAttention3d, "matmul": MatmulWindowAttention3d}


def use_window_attention(model: SwinTransformer3d, attention: str = "fused") -> SwinTransformer3d:
    """Every window attention of `model` runs the way `attention` names (WINDOW_ATTENTION; "reference"
    leaves torchvision's); weights untouched."""
    for module in model.modules():
        if isinstance(module, ShiftedWindowAttention3d) and attention != "reference":
            module.__class__ = WINDOW_ATTENTION[attention]
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
            original = original_checkpoint(self.settings.vst_checkpoint)
            if not config.random_weights and original is not None:
                model.head = nn.Identity()  # the file's classifier (600 classes for Kinetics-600) is dropped too
                load_original_checkpoint(model, checkpoint_path(weights, original.url), original)
            elif not config.random_weights:
                path = checkpoint_path(weights, PRETRAINED.url)
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        use_window_attention(model, self.settings.attention)
        self.feature_dim = model.num_features
        model.head = nn.Identity()
        self.model = self.freeze(model)

    @classmethod
    def weights_files(cls, config: ExtractionConfig, weights: WeightsSource) -> list[WeightsFile]:
        original = original_checkpoint(config.settings[cls.modality].vst_checkpoint)
        if original is None:
            return [checkpoint_file(weights, PRETRAINED.url, f"Swin3D_B_Weights.{PRETRAINED.name}")]
        return [checkpoint_file(weights, original.url, original.what)]

    def input_frames(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 frames (B, F, H, W, 3) -> float (B, F, 3, 224, 224) in [0, 255] on the device, the way the
        settings say (frame_transform, jpeg_quality)."""
        if self.settings.frame_transform == "torch":
            return crop_resize(batch, CROP, INPUT_SIZE, self.device)
        frames = as_frames(batch).numpy()
        flat = frames.reshape(-1, *frames.shape[2:])
        if self.settings.jpeg_quality:
            flat = jpeg_round_trip(flat, self.settings.jpeg_quality)
        x = torch.from_numpy(pil_resize_crop(flat)).to(self.device)
        return x.reshape(*frames.shape[:2], *x.shape[1:]).permute(0, 1, 4, 2, 3).float()

    @torch.no_grad()
    def embed(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = normalise(self.input_frames(batch), IMAGENET_MEAN, IMAGENET_STD)
        x = x.permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)
        with self.autocast():
            features = one_clip_per_call(self.model, x)
        return features.float().cpu()

    def flops_per_clip(self, frames: int) -> float:
        # torch's FLOP counter sees no arithmetic in the fused attention kernel: count the same work
        # written out, with torchvision's attention swapped in for the count.
        replaced = [(m, type(m)) for m in self.model.modules() if isinstance(m, FusedWindowAttention3d)]
        for module, _ in replaced:
            module.__class__ = ShiftedWindowAttention3d
        try:
            return count_flops(self.embed, dummy_frames(frames, self.config.decode_short_side))
        finally:
            for module, kind in replaced:
                module.__class__ = kind

    def describe(self) -> dict:
        return {
            **super().describe(),
            "architecture": "torchvision swin3d_b" if self.config.arch_size == "full" else "swin3d tiny",
            "pretrained": None if self.config.random_weights else f"Swin3D_B_Weights.{PRETRAINED.name}",
            **describe_checkpoint(self.settings.vst_checkpoint, self.config.random_weights),
            "crop": f"centre {CROP[0]}x{CROP[1]} at short side 256, resized to {INPUT_SIZE}x{INPUT_SIZE}",
            # Only when not the default: torch's transform keeps the description existing caches record.
            **({"frame_transform": "PIL bilinear Resize(256) (long side truncated), CenterCrop((224, 300)), "
                "Resize((224, 224)), uint8 after each step"} if self.settings.frame_transform == "pil" else {}),
            **({"jpeg_round_trip": f"quality {self.settings.jpeg_quality}"} if self.settings.jpeg_quality else {}),
            "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "pooling": "mean over all tokens after the last norm (head removed)",
        }
