"""Audio: Audio Spectrogram Transformer (transformers, AudioSet fine-tuned), 768-d per segment.

AST was trained on 1024 filterbank frames (10.24 s); a 32-frame RG segment has about 128. Instead of
padding every window to 1024 frames, each window runs at its own length with the time axis of the
position embedding centre-cut (or, for windows longer than 10.24 s, bilinearly interpolated), as the
original AST code does for other input lengths: an RG segment's window runs on an eighth of the frames.

A window's length alone decides how it is processed (never the other windows in its batch), so a
video gives the same features however its segments are batched, which resuming relies on.

The `audio_frontend` setting "pamfn" makes the audio rows as PAMFN's published RG / Fis-V features
were made, slips included (the published models were trained on them): the whole track cut into equal
chunks (extractors/decode.py `open_track_chunks`), each chunk's filterbank told the track's source rate
although its samples are at 16 kHz, normalised with PAMFN's rounded constants of the opposite sign to
AST's, and zero-padded after normalisation or cut to 41 frames. AST then runs on 3 time patches, with
the position table centre-cut as PAMFN's AST code cuts it (`time_positions` makes the same cut), pooled
as PAMFN's `stop='avg'`: the mean of the CLS and distillation tokens after the final norm, which is what
the ASTModel pooler gives.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from extractors.base import (Extractor, WeightsFile, WeightsSource, checkpoint_file, checkpoint_path, hf_pretrained,
                             hf_weights_files, register)
from extractors.checkpoint_layouts import describe_checkpoint, load_original_checkpoint, original_checkpoint
from extractors.config import ExtractionConfig
from extractors.decode import AUDIO_DECODER, PAMFN_AUDIO_DECODER, AudioChunk
from extractors.transforms import count_flops, one_clip_per_call

HUB_ID = "MIT/ast-finetuned-audioset-10-10-0.4593"
# The original AST is a timm ViT, whose LayerNorms use eps 1e-6; the Hugging Face port's config says 1e-12.
ORIGINAL_LAYER_NORM_EPS = 1e-6
SAMPLE_RATE = 16000
WINDOW_SAMPLES = 400  # 25 ms, kaldi's default frame length
# AudioSet filterbank statistics of the AST recipe; features are (fbank - mean) / (2 * std).
FBANK_MEAN = -4.2677393
FBANK_STD = 4.5689974
FBANK_OPTIONS = {
    "htk_compat": True,
    "sample_frequency": SAMPLE_RATE,
    "use_energy": False,
    "window_type": "hanning",
    "num_mel_bins": 128,
    "dither": 0.0,
    "frame_shift": 10,
}

# PAMFN's published features: (fbank - 4.26) / (4.57 * 2), AST's constants rounded and the mean's sign
# flipped; every chunk zero-padded (after normalisation) or cut to 41 frames.
PAMFN_FBANK_MEAN = 4.26
PAMFN_FBANK_STD = 4.57
PAMFN_FRAMES = 41

if TYPE_CHECKING:
    from transformers import ASTConfig


def filterbank(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Mono waveform at 16 kHz -> normalised log-mel filterbank (frames, 128), AST's recipe.

    Waves shorter than one 25 ms window are zero-padded to one window.
    """
    wave = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    if wave.ndim != 1:
        raise ValueError(f"audio must be a mono 1-D waveform, got shape {tuple(wave.shape)}")
    if wave.numel() == 0:
        raise ValueError("empty audio waveform")
    wave = wave - wave.mean()
    if wave.numel() < WINDOW_SAMPLES:
        wave = F.pad(wave, (0, WINDOW_SAMPLES - wave.numel()))
    fbank = torchaudio.compliance.kaldi.fbank(wave[None], **FBANK_OPTIONS)
    return (fbank - FBANK_MEAN) / (FBANK_STD * 2)


def pamfn_filterbank(chunk: AudioChunk) -> torch.Tensor:
    """One chunk of the pamfn front end -> (41, 128), as PAMFN's published features were made.

    The filterbank is told the track's source rate although the samples are at 16 kHz, and of a
    multi-channel chunk it reads channel 0 (kaldi's choice); the track's mean was removed when it was cut.
    """
    wave = torch.from_numpy(np.ascontiguousarray(chunk.samples, dtype=np.float32))
    if wave.ndim != 2 or wave.numel() == 0:
        raise ValueError(f"an audio chunk must be (channels, samples), got shape {tuple(wave.shape)}")
    fbank = torchaudio.compliance.kaldi.fbank(wave, **{**FBANK_OPTIONS, "sample_frequency": chunk.source_rate})
    fbank = (fbank - PAMFN_FBANK_MEAN) / (PAMFN_FBANK_STD * 2)
    if fbank.shape[0] < PAMFN_FRAMES:
        fbank = F.pad(fbank, (0, 0, 0, PAMFN_FRAMES - fbank.shape[0]))
    return fbank[:PAMFN_FRAMES]


def ast_config(arch_size: str) -> ASTConfig:
    """The published architecture (12 layers of 768, trained on 1024 frames), or a small one for tests."""
    from transformers import ASTConfig

    if arch_size == "full":
        return ASTConfig()
    return ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def time_positions(trained: torch.Tensor, frequency_patches: int, time_patches: int) -> torch.Tensor:
    """Adapt AST's position table (1, 2 + F*T0, D) to `time_patches` time positions.

    Shorter: the centre `time_patches` columns (AST's own choice); longer: bilinear interpolation
    along time. The two leading rows (CLS and distillation tokens) are kept as they are.
    """
    tokens, grid = trained[:, :2], trained[:, 2:]
    dim = grid.shape[-1]
    trained_time = grid.shape[1] // frequency_patches
    grid = grid.reshape(1, frequency_patches, trained_time, dim)
    if time_patches <= trained_time:
        start = (trained_time - time_patches) // 2
        grid = grid[:, :, start : start + time_patches]
    else:
        size = (frequency_patches, time_patches)
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
        grid = grid.permute(0, 2, 3, 1)
    return torch.cat([tokens, grid.reshape(1, frequency_patches * time_patches, dim)], dim=1)


@register("audio", "ast")
class ASTExtractor(Extractor):
    """Waveforms -> filterbanks -> AST at each window's own length -> mean of CLS and distillation tokens."""

    input_kind = "audio"
    version = "2"  # 2: audio decoded by a streaming ffmpeg process (1: decord's AudioReader; see README)

    def __init__(self, config: ExtractionConfig, device: torch.device, weights: WeightsSource) -> None:
        super().__init__(config, device, weights)
        from transformers import ASTModel

        if config.audio_sample_rate != SAMPLE_RATE:
            raise ValueError(f"AST needs {SAMPLE_RATE} Hz audio; the config has {config.audio_sample_rate}")
        original = original_checkpoint(self.settings.ast_checkpoint)
        if config.random_weights or original is not None:
            architecture = ast_config(config.arch_size)
            if original is not None:
                architecture.layer_norm_eps = ORIGINAL_LAYER_NORM_EPS
            model = ASTModel(architecture)
            if not config.random_weights:
                load_original_checkpoint(model, checkpoint_path(weights, original.url), original)
        else:
            model = hf_pretrained(ASTModel, HUB_ID, weights, dtype=torch.float32)
        ast = model.config
        if ast.num_mel_bins != FBANK_OPTIONS["num_mel_bins"]:
            raise ValueError(f"AST expects {ast.num_mel_bins} mel bins; the filterbank has 128")
        self.patch_size, self.time_stride = ast.patch_size, ast.time_stride
        self.frequency_patches = (ast.num_mel_bins - ast.patch_size) // ast.frequency_stride + 1
        self.trained_frames = ast.max_length
        self.feature_dim = ast.hidden_size
        self.model = self.freeze(model)
        # One set of weights serves every length: only the position table is swapped per length.
        self.trained_positions = self.model.embeddings.position_embeddings.detach().clone()
        self.position_tables: dict[int, nn.Parameter] = {}

    @classmethod
    def weights_files(cls, config: ExtractionConfig, weights: WeightsSource) -> list[WeightsFile]:
        original = original_checkpoint(config.settings[cls.modality].ast_checkpoint)
        if original is None:
            return hf_weights_files(weights, HUB_ID)
        return [checkpoint_file(weights, original.url, original.what)]

    def time_patches(self, frames: int) -> int:
        """Time patches AST's patch convolution makes from `frames` filterbank frames (>= 1)."""
        return (max(frames, self.patch_size) - self.patch_size) // self.time_stride + 1

    def model_input(self, wave: np.ndarray | torch.Tensor | AudioChunk) -> torch.Tensor:
        """Filterbank padded to at least one patch, cut to the frames its patches cover (the project
        front end); PAMFN's 41 frames (the pamfn front end, which takes AudioChunks)."""
        pamfn = self.settings.audio_frontend == "pamfn"
        if pamfn != isinstance(wave, AudioChunk):
            wanted = "AudioChunks (extractors/decode.py open_track_chunks)" if pamfn else "mono waveforms"
            raise ValueError(f"the {self.settings.audio_frontend} audio front end takes {wanted}, "
                             f"got {type(wave).__name__}")
        if pamfn:
            return pamfn_filterbank(wave)
        fbank = filterbank(wave)
        if fbank.shape[0] < self.patch_size:
            # Zeros before normalisation, as AST's own padding.
            missing = self.patch_size - fbank.shape[0]
            silence = torch.full((missing, fbank.shape[1]), -FBANK_MEAN / (FBANK_STD * 2))
            fbank = torch.cat([fbank, silence])
        covered = self.patch_size + (self.time_patches(fbank.shape[0]) - 1) * self.time_stride
        return fbank[:covered]

    def use_time_patches(self, time_patches: int) -> None:
        if time_patches not in self.position_tables:
            table = time_positions(self.trained_positions, self.frequency_patches, time_patches)
            self.position_tables[time_patches] = nn.Parameter(table, requires_grad=False)
        self.model.embeddings.position_embeddings = self.position_tables[time_patches]

    @torch.no_grad()
    def embed(self, batch: list[np.ndarray] | list[torch.Tensor] | list[AudioChunk]) -> torch.Tensor:
        if len(batch) == 0:
            raise ValueError("empty audio batch")
        inputs = [self.model_input(wave) for wave in batch]
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, fbank in enumerate(inputs):
            by_length[fbank.shape[0]].append(index)
        features = torch.empty(len(inputs), self.feature_dim)
        for frames, indices in sorted(by_length.items()):
            self.use_time_patches(self.time_patches(frames))
            x = torch.stack([inputs[i] for i in indices]).to(self.device)
            with self.autocast():
                pooled = one_clip_per_call(lambda windows: self.model(input_values=windows).pooler_output, x)
            features[indices] = pooled.float().cpu()
        return features

    def flops_per_clip(self, samples: int) -> float:
        """FLOPs for one window of `samples` audio samples (audio has no frames; its length is in samples)."""
        if self.settings.audio_frontend == "pamfn":
            return count_flops(self.embed, [AudioChunk(np.zeros((1, samples), np.float32), SAMPLE_RATE)])
        return count_flops(self.embed, [np.zeros(samples, dtype=np.float32)])

    def describe(self) -> dict:
        description = {
            **super().describe(),
            "audio_decoder": AUDIO_DECODER,
            "architecture": HUB_ID if self.config.arch_size == "full" else "ast tiny",
            "pretrained": None if self.config.random_weights else HUB_ID,
            **describe_checkpoint(self.settings.ast_checkpoint, self.config.random_weights),
            # Only for the original's: the default keeps the description existing caches record.
            **({"layer_norm_eps": self.model.config.layer_norm_eps}
               if original_checkpoint(self.settings.ast_checkpoint) else {}),
            "fbank": {**FBANK_OPTIONS, "frame_length_ms": 25, "mean_removed": True},
            "normalisation": {"mean": FBANK_MEAN, "std": FBANK_STD, "formula": "(fbank - mean) / (2 * std)"},
            "time_positions": f"centre-cut from {self.trained_frames} frames (interpolated when longer)",
            "window_length": "each window at its own filterbank length, at least one 16-frame patch",
            "pooling": "mean of CLS and distillation tokens (ASTModel pooler)",
        }
        if self.settings.audio_frontend == "pamfn":
            description.update(self.pamfn_steps())
        return description

    def pamfn_steps(self) -> dict:
        """The pamfn front end, step by step, with its constants and slips (config.json)."""
        return {
            "audio_frontend": "pamfn: the audio rows of PAMFN's published features, slips included",
            "audio_decoder": PAMFN_AUDIO_DECODER,
            "resampling": f"torchaudio.transforms.Resample(source rate -> {SAMPLE_RATE}), default settings, "
            "all channels",
            "mean_removed": "once, the mean over the whole resampled track and all its channels",
            "windows": "the track cut into T equal chunks of len // T samples, remainder dropped "
            "(T = the video's segments), not the segments' time spans",
            "fbank": {**FBANK_OPTIONS, "sample_frequency": "the track's source rate (the samples are at "
                      f"{SAMPLE_RATE} Hz)", "channel": 0, "frame_length_ms": 25},
            "normalisation": {"mean": PAMFN_FBANK_MEAN, "std": PAMFN_FBANK_STD,
                              "formula": "(fbank - mean) / (2 * std)"},
            "window_length": f"{PAMFN_FRAMES} filterbank frames: zero-padded after normalisation, or cut",
            "time_positions": f"centre-cut from {self.trained_frames} frames to "
            f"{self.time_patches(PAMFN_FRAMES)} time patches",
            "pooling": "mean of CLS and distillation tokens after the final norm (ASTModel pooler; PAMFN's "
            "stop='avg')",
        }
