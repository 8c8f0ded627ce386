"""RGB: TimeSformer base (transformers, Kinetics-400 fine-tuned), 768-d per clip (the FS1000 protocol)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from extractors.base import (Extractor, WeightsFile, WeightsSource, checkpoint_file, checkpoint_path, hf_pretrained,
                             hf_weights_files, register)
from extractors.checkpoint_layouts import describe_checkpoint, load_original_checkpoint, original_checkpoint
from extractors.config import ExtractionConfig
from extractors.transforms import count_flops, crop_resize, dummy_frames, normalise, one_clip_per_call, uniform_frame_indices

HUB_ID = "facebook/timesformer-base-finetuned-k400"
INPUT_SIZE = 224
CROP = (256, 256)  # the processor resizes the short side to 224 and centre-crops 224: a centre square
# From the checkpoint's preprocessor_config.json (VideoMAEImageProcessor): image_mean 0.45, image_std 0.225.
MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)

if TYPE_CHECKING:
    from transformers import TimesformerConfig


def timesformer_config(arch_size: str) -> TimesformerConfig:
    """The published architecture (8 frames, 224 px, 12 layers of 768), or a small one for tests."""
    from transformers import TimesformerConfig

    if arch_size == "full":
        return TimesformerConfig()
    return TimesformerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=32
    )


@register("rgb", "timesformer")
class TimesformerExtractor(Extractor):
    """Frames -> 8 uniformly sampled frames -> 224x224 centre crops -> TimeSformer -> final CLS token.

    The model takes as many frames as its time embedding has positions (8 for the checkpoint).
    """

    input_kind = "frames"
    version = "1"

    def __init__(self, config: ExtractionConfig, device: torch.device, weights: WeightsSource) -> None:
        super().__init__(config, device, weights)
        from transformers import TimesformerModel

        original = original_checkpoint(self.settings.timesformer_checkpoint)
        if config.random_weights or original is not None:
            # The original's LayerNorm eps (1e-6, timm's) is the transformers config's default already.
            model = TimesformerModel(timesformer_config(config.arch_size))
            if not config.random_weights:
                load_original_checkpoint(model, checkpoint_path(weights, original.url), original)
        else:
            model = hf_pretrained(TimesformerModel, HUB_ID, weights, dtype=torch.float32)
        self.num_frames = model.config.num_frames
        self.feature_dim = model.config.hidden_size
        self.model = self.freeze(model)

    @classmethod
    def weights_files(cls, config: ExtractionConfig, weights: WeightsSource) -> list[WeightsFile]:
        original = original_checkpoint(config.settings[cls.modality].timesformer_checkpoint)
        if original is None:
            return hf_weights_files(weights, HUB_ID)
        return [checkpoint_file(weights, original.url, original.what)]

    @torch.no_grad()
    def embed(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        frames = torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch
        if frames.ndim == 5 and frames.shape[1] != self.num_frames:
            frames = frames[:, uniform_frame_indices(frames.shape[1], self.num_frames)]
        x = normalise(crop_resize(frames, CROP, INPUT_SIZE, self.device), MEAN, STD)  # (B, F, 3, H, W)
        with self.autocast():
            cls = one_clip_per_call(lambda clips: self.model(pixel_values=clips).last_hidden_state[:, 0], x)
        return cls.float().cpu()

    def flops_per_clip(self, frames: int) -> float:
        return count_flops(self.embed, dummy_frames(frames, self.config.decode_short_side))

    def describe(self) -> dict:
        return {
            **super().describe(),
            "architecture": HUB_ID if self.config.arch_size == "full" else "timesformer tiny",
            "pretrained": None if self.config.random_weights else HUB_ID,
            **describe_checkpoint(self.settings.timesformer_checkpoint, self.config.random_weights),
            "frames_per_clip": self.num_frames,
            "frame_sampling": f"{self.num_frames} frames uniformly spread over the clip",
            "crop": f"centre square at short side 256, resized to {INPUT_SIZE}x{INPUT_SIZE}",
            "normalisation": {"mean": list(MEAN), "std": list(STD)},
            "pooling": "CLS token after the final layer norm",
        }
