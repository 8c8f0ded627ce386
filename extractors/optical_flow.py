"""Dense optical flow between consecutive frames: RAFT (torchvision), Farneback and TV-L1 (OpenCV).

Flow is computed at the I3D input resolution: frames at short side 256 are centre-cropped to
224x224 first (docs/design/features.md), never at the source resolution. Each method maps float frames
(B, F, 3, 224, 224) in [0, 255] to flow in pixels (B, F-1, 2, 224, 224), x then y, from frame t to
t+1; `flow_clip` turns that into the I3D flow input, clipped to [-20, 20] and scaled to [-1, 1].
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.models.optical_flow import Raft_Large_Weights, raft_large, raft_small

from extractors.base import BackboneUnavailableError, WeightsSource, checkpoint_path
from extractors.config import ExtractionConfig
from extractors.transforms import crop_resize

FLOW_SIZE = 224  # I3D's input resolution
FLOW_CROP = (224, 224)  # centre crop at short side 256
FLOW_BOUND = 20.0  # pixels; flow is clipped to +-FLOW_BOUND and divided by it
RAFT_WEIGHTS = Raft_Large_Weights.C_T_SKHT_V2


def flow_input(frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, F, 3, 224, 224) in [0, 255]: the frames the flow is computed on."""
    return crop_resize(frames, FLOW_CROP, FLOW_SIZE, device)


def flow_clip(flow: torch.Tensor) -> torch.Tensor:
    """Flow in pixels (B, F-1, 2, H, W) -> I3D input (B, 2, F-1, H, W) in [-1, 1]."""
    return (flow.clamp(-FLOW_BOUND, FLOW_BOUND) / FLOW_BOUND).permute(0, 2, 1, 3, 4).contiguous()


def to_gray_uint8(frames: torch.Tensor) -> np.ndarray:
    """float (B, F, 3, H, W) in [0, 255] -> uint8 grayscale (B, F, H, W) with OpenCV's RGB weights."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=frames.dtype, device=frames.device)
    gray = torch.einsum("bfchw,c->bfhw", frames, weights)
    return gray.round().clamp(0, 255).to(torch.uint8).cpu().numpy()


class RaftFlow(nn.Module):
    """torchvision RAFT; the last of its iterative refinements is the flow."""

    max_pairs = 64  # frame pairs per forward: bounds GPU memory for long batches

    def __init__(self, arch: str, state_dict: dict | None = None, weights_name: str | None = None) -> None:
        super().__init__()
        if arch not in ("large", "small"):
            raise ValueError(f"RAFT arch must be 'large' or 'small', got {arch!r}")
        self.arch, self.weights_name = arch, weights_name
        self.model = raft_large() if arch == "large" else raft_small()
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        self.model.eval().requires_grad_(False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        batch, num_frames = frames.shape[:2]
        x = frames / 127.5 - 1.0  # RAFT's input range [-1, 1]
        first = x[:, :-1].reshape(-1, *x.shape[2:])
        second = x[:, 1:].reshape(-1, *x.shape[2:])
        # bf16 on CUDA as RAFT's own mixed-precision mode: its convolutions and correlation volume
        # run in bf16, while the pixel coordinate grid it refines stays float32 (grid_sample promotes).
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=frames.device.type == "cuda"):
            flows = [
                self.model(first[i : i + self.max_pairs], second[i : i + self.max_pairs])[-1].float()
                for i in range(0, first.shape[0], self.max_pairs)
            ]
        return torch.cat(flows).reshape(batch, num_frames - 1, 2, *frames.shape[-2:])

    def describe(self) -> dict:
        return {
            "method": f"raft_{self.arch}",
            "weights": self.weights_name,
            "num_flow_updates": 12,
            "precision": "bf16 autocast on CUDA, float32 on CPU",
        }


class OpenCVFlow:
    """A CPU flow method run pair by pair on uint8 grayscale frames."""

    def pair_flow(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """(H, W) uint8 twice -> (H, W, 2) float32 flow in pixels."""
        raise NotImplementedError

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        gray = to_gray_uint8(frames)
        batch, num_frames, height, width = gray.shape
        pairs = [(gray[b, t], gray[b, t + 1]) for b in range(batch) for t in range(num_frames - 1)]
        # OpenCV releases the GIL, so pairs run in parallel on the CPU's cores.
        with ThreadPoolExecutor(max_workers=min(len(pairs), os.cpu_count() or 1)) as pool:
            flows = np.stack(list(pool.map(lambda pair: self.pair_flow(*pair), pairs)))
        flows = torch.from_numpy(flows).reshape(batch, num_frames - 1, height, width, 2)
        return flows.permute(0, 1, 4, 2, 3).to(frames.device)


class FarnebackFlow(OpenCVFlow):
    """OpenCV Farneback (no weights)."""

    # OpenCV's reference parameters: pyramid scale 0.5, 3 levels, 15 px window, 3 iterations,
    # 5-pixel polynomial expansion with sigma 1.2.
    params = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)

    def pair_flow(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        return cv2.calcOpticalFlowFarneback(first, second, None, **self.params)

    def describe(self) -> dict:
        return {"method": "farneback", "opencv": cv2.__version__, **self.params}


def require_tvl1() -> None:
    if not hasattr(cv2, "optflow"):
        raise BackboneUnavailableError(
            f"--flow tvl1 needs OpenCV's contrib module cv2.optflow, which this OpenCV ({cv2.__version__}) "
            "lacks: replace opencv-python with opencv-contrib-python (or opencv-python-headless with "
            "opencv-contrib-python-headless) of the same version, or use --flow farneback or --flow raft"
        )


class TVL1Flow(OpenCVFlow):
    """OpenCV's dual TV-L1 (the method the published RG / Fis-V features used), default parameters."""

    def __init__(self) -> None:
        require_tvl1()

    def pair_flow(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        # A solver per pair: solvers keep state between calls, so threads must not share one.
        return cv2.optflow.DualTVL1OpticalFlow_create().calc(first, second, None)

    def describe(self) -> dict:
        return {"method": "tvl1", "opencv": cv2.__version__, "parameters": "DualTVL1OpticalFlow defaults"}


FLOW_METHODS = ("raft", "farneback", "tvl1")


def check_flow_weights(method: str, weights: WeightsSource) -> None:
    """Raise before any work if the method cannot run (missing RAFT file, no cv2.optflow)."""
    if method == "raft":
        checkpoint_path(weights, RAFT_WEIGHTS.url)
    elif method == "tvl1":
        require_tvl1()


def build_flow_method(
    method: str, config: ExtractionConfig, device: torch.device, weights: WeightsSource
) -> RaftFlow | FarnebackFlow | TVL1Flow:
    """RAFT: large with the C_T_SKHT_V2 weights, large random, or small random for arch_size tiny."""
    if method == "farneback":
        return FarnebackFlow()
    if method == "tvl1":
        return TVL1Flow()
    if method != "raft":
        raise ValueError(f"unknown flow method {method!r}; choose from {FLOW_METHODS}")
    if config.arch_size == "tiny":
        return RaftFlow("small").to(device)
    if config.random_weights:
        return RaftFlow("large").to(device)
    path = checkpoint_path(weights, RAFT_WEIGHTS.url)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return RaftFlow("large", state_dict, f"Raft_Large_Weights.{RAFT_WEIGHTS.name}").to(device)
