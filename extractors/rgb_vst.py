"""RGB: Video Swin Transformer (torchvision `swin3d_b`, Kinetics-400), 1024-d per clip."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.models.video import Swin3D_B_Weights, swin3d_b
from torchvision.models.video.swin_transformer import SwinTransformer3d

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
        return count_flops(self.embed, dummy_frames(frames, self.config.decode_short_side))

    def describe(self) -> dict:
        return {
            **super().describe(),
            "architecture": "torchvision swin3d_b" if self.config.arch_size == "full" else "swin3d tiny",
            "pretrained": None if self.config.random_weights else f"Swin3D_B_Weights.{PRETRAINED.name}",
            "crop": f"centre {CROP[0]}x{CROP[1]} at short side 256, resized to {INPUT_SIZE}x{INPUT_SIZE}",
            "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "pooling": "mean over all tokens after the last norm (head removed)",
        }
