"""Dense optical flow between frames: RAFT (torchvision), Farneback and TV-L1 (OpenCV).

By default flow is computed at the I3D input resolution: frames at short side 256 are centre-cropped to
224x224 first (docs/design/features.md), never at the source resolution. Each method maps float frames
(B, N, 3, 224, 224) in [0, 255] and a list of (first, second) frame indices to flow in pixels
(B, pairs, 2, 224, 224), x then y; by default the pairs are consecutive frames (`flow_pairs`).
`flow_clip` turns that into the I3D flow input, clipped to [-20, 20] and scaled to [-1, 1].

The published RG / Fis-V features made it otherwise (extractors/settings.py, FlowI3DSettings): the
OpenCV methods also take uint8 grey frames at their source resolution (`OpenCVFlow.gray_flows`), and
`encode_flow` / `read_back` are denseflow's uint8 flow images and their reading by torchvision.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.models.optical_flow import Raft_Large_Weights, raft_large, raft_small

from extractors.base import BackboneUnavailableError, WeightsFile, WeightsSource, checkpoint_file, checkpoint_path
from extractors.config import ExtractionConfig
from extractors.transforms import crop_resize, jpeg_round_trip

FLOW_SIZE = 224  # I3D's input resolution
FLOW_CROP = (224, 224)  # centre crop at short side 256
FLOW_BOUND = 20.0  # pixels; flow is clipped to +-FLOW_BOUND and divided by it
RAFT_WEIGHTS = Raft_Large_Weights.C_T_SKHT_V2


def flow_input(frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, F, 3, 224, 224) in [0, 255]: the frames the flow is computed on."""
    return crop_resize(frames, FLOW_CROP, FLOW_SIZE, device)


def flow_clip(flow: torch.Tensor) -> torch.Tensor:
    """Flow in pixels (B, P, 2, H, W) -> I3D input (B, 2, P, H, W) in [-1, 1]."""
    return (flow.clamp(-FLOW_BOUND, FLOW_BOUND) / FLOW_BOUND).permute(0, 2, 1, 3, 4).contiguous()


PAIR_RULES = ("within", "crossing")


def flow_pairs(num_frames: int, rule: str) -> list[tuple[int, int]]:
    """The (first, second) frame indices of each flow of a clip handed over as `num_frames` frames.

    "within": the clip's F frames, F-1 flows between consecutive frames. "crossing": the clip's F frames
    then a pair of frames (F + 2 in all), F flows: the F-1 consecutive ones, then the pair's, which the
    batcher picks so that the clip's last flow runs from its last frame to the next segment's first (at the
    video's end: frames F-2 and F-1, the previous flow again), as the published features' flow did."""
    if rule not in PAIR_RULES:
        raise ValueError(f"flow pairs rule must be one of {PAIR_RULES}, got {rule!r}")
    clip = num_frames if rule == "within" else num_frames - 2
    if clip < (2 if rule == "within" else 1):
        extra = "" if rule == "within" else " plus the pair of frames of its last flow"
        raise ValueError(f"flow needs at least 2 frames per clip{extra}, got {num_frames} frames")
    pairs = [(t, t + 1) for t in range(clip - 1)]
    return pairs if rule == "within" else pairs + [(clip, clip + 1)]


def quantise_flow(flow: np.ndarray) -> np.ndarray:
    """Flow in pixels -> denseflow's uint8 flow image values, round(255 * (f + 20) / 40), saturated at 0
    and 255 outside +-20 px: its CAST macro, computed in double and rounded by cvRound, which rounds half
    to even (np.rint does the same)."""
    scaled = 255.0 * (np.asarray(flow, dtype=np.float64) + FLOW_BOUND) / (2 * FLOW_BOUND)
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def encode_flow(flow: np.ndarray, jpeg_quality: int) -> np.ndarray:
    """Flow components in pixels (N, H, W) -> uint8 flow images (N, H, W) as denseflow wrote them:
    quantised, then through a JPEG round trip at `jpeg_quality` (0: none)."""
    return jpeg_round_trip(quantise_flow(flow), jpeg_quality)


def read_back(images: np.ndarray) -> torch.Tensor:
    """uint8 flow images -> float in [-1, 1] as torchvision's ToTensor (/ 255) then Normalize(0.5, 0.5)
    computed them (= u8 / 127.5 - 1 up to float rounding); the flow stays in source pixels / 20."""
    return (torch.from_numpy(np.ascontiguousarray(images)).float().div(255) - 0.5) / 0.5


def source_gray(frames: torch.Tensor) -> np.ndarray:
    """uint8 RGB (B, N, H, W, 3) -> uint8 grey (B, N, H, W) by OpenCV's own conversion: denseflow's
    cvtColor(BGR2GRAY) of the same decoded pixels."""
    batch, num_frames, height, width, _ = frames.shape
    rows = np.ascontiguousarray(frames.cpu().numpy()).reshape(-1, width, 3)  # one tall image: per pixel anyway
    return cv2.cvtColor(rows, cv2.COLOR_RGB2GRAY).reshape(batch, num_frames, height, width)


def to_gray_uint8(frames: torch.Tensor) -> np.ndarray:
    """float (B, F, 3, H, W) in [0, 255] -> uint8 grayscale (B, F, H, W) with OpenCV's RGB weights."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=frames.dtype, device=frames.device)
    gray = torch.einsum("bfchw,c->bfhw", frames, weights)
    return gray.round().clamp(0, 255).to(torch.uint8).cpu().numpy()


class RaftFlow(nn.Module):
    """torchvision RAFT; the last of its iterative refinements is the flow."""

    max_pairs = 64  # frame pairs per forward: bounds GPU memory for long batches

    def __init__(self, arch: str, state_dict: dict | None = None, weights_name: str | None = None,
                 bf16: bool = False) -> None:
        super().__init__()
        if arch not in ("large", "small"):
            raise ValueError(f"RAFT arch must be 'large' or 'small', got {arch!r}")
        self.arch, self.weights_name, self.bf16 = arch, weights_name, bf16
        self.model = raft_large() if arch == "large" else raft_small()
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        self.model.eval().requires_grad_(False)

    def forward(self, frames: torch.Tensor, pairs: list[tuple[int, int]] | None = None) -> torch.Tensor:
        batch, num_frames = frames.shape[:2]
        pairs = pairs or flow_pairs(num_frames, "within")
        x = frames / 127.5 - 1.0  # RAFT's input range [-1, 1]
        first = x[:, [a for a, _ in pairs]].reshape(-1, *x.shape[2:])
        second = x[:, [b for _, b in pairs]].reshape(-1, *x.shape[2:])
        # bf16 (precision bf16): its convolutions and correlation volume run in bf16, while the pixel
        # coordinate grid it refines stays float32 (grid_sample promotes).
        with torch.autocast(frames.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            flows = [
                self.model(first[i : i + self.max_pairs], second[i : i + self.max_pairs])[-1].float()
                for i in range(0, first.shape[0], self.max_pairs)
            ]
        return torch.cat(flows).reshape(batch, len(pairs), 2, *frames.shape[-2:])

    def describe(self) -> dict:
        return {
            "method": f"raft_{self.arch}",
            "weights": self.weights_name,
            "num_flow_updates": 12,
        }


class OpenCVFlow:
    """A CPU flow method run pair by pair on uint8 grayscale frames."""

    def pair_flow(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """(H, W) uint8 twice -> (H, W, 2) float32 flow in pixels."""
        raise NotImplementedError

    def __call__(self, frames: torch.Tensor, pairs: list[tuple[int, int]] | None = None) -> torch.Tensor:
        pairs = pairs or flow_pairs(frames.shape[1], "within")
        flows = torch.from_numpy(self.gray_flows(to_gray_uint8(frames), pairs))  # (B, P, H, W, 2)
        return flows.permute(0, 1, 4, 2, 3).to(frames.device)

    def gray_flows(self, gray: np.ndarray, pairs: list[tuple[int, int]],
                   finish: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """uint8 grey frames (B, N, H, W) -> the flow (H, W, 2) of each pair, or finish(flow) when given,
        stacked (B, P, ...). `finish` runs in the pair's thread, so a large flow field is reduced (to
        small uint8 images) before the next one is computed."""
        jobs = [(gray[b, first], gray[b, second]) for b in range(gray.shape[0]) for first, second in pairs]

        def run(job: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            flow = self.pair_flow(*job)
            return finish(flow) if finish else flow

        # OpenCV releases the GIL, so pairs run in parallel on the CPU's cores.
        with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
            out = np.stack(list(pool.map(run, jobs)))
        return out.reshape(gray.shape[0], len(pairs), *out.shape[1:])


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
    """OpenCV's dual TV-L1 with the parameters the published RG / Fis-V features used: denseflow's
    `cuda::OpticalFlowDual_TVL1::create()` defaults, mapped onto the CPU class of OpenCV's contrib module."""

    # The CUDA class's defaults, in the CPU class's create() order. The CUDA class runs at most `iterations`
    # = 300 iterations per warp with no median filter; the CPU class runs `outer` rounds of `inner`
    # iterations, median-filtering the flow before each round: 1 round of 300, filter off (1), is the CUDA loop.
    params = dict(tau=0.25, lambda_=0.15, theta=0.3, nscales=5, warps=5, epsilon=0.01, inner_iterations=300,
                  outer_iterations=1, scale_step=0.8, gamma=0.0, median_filtering=1, use_initial_flow=False)
    unmatched = ("the CUDA class builds its pyramid and warps the second frame with its own GPU kernels and "
                 "checks the stopping error on its own schedule, so its flow differs from this one by more "
                 "than float rounding; input: 8-bit grey frames, as denseflow's")

    def __init__(self) -> None:
        require_tvl1()

    def pair_flow(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        # A solver per pair: solvers keep state between calls, so threads must not share one.
        return self.solver().calc(first, second, None)

    def solver(self):
        # Positional: the Python binding's keyword names differ between OpenCV versions ("innnerIterations").
        return cv2.optflow.DualTVL1OpticalFlow_create(*self.params.values())

    def describe(self) -> dict:
        return {
            "method": "tvl1", "opencv": cv2.__version__, "implementation": "cv2.optflow.DualTVL1OpticalFlow (CPU)",
            "parameters": dict(self.params),
            "parameters_from": "denseflow's cuda::OpticalFlowDual_TVL1 defaults: iterations 300 -> inner 300 x outer 1; "
            "no median filter there -> median_filtering 1 (off)",
            "not_matched": self.unmatched,
        }


FLOW_METHODS = ("raft", "farneback", "tvl1")


def flow_weights_files(method: str, weights: WeightsSource) -> list[WeightsFile]:
    """The method's pretrained weights files (RAFT's); raises before any work if the method cannot run
    (missing RAFT file, no cv2.optflow)."""
    if method == "raft":
        return [checkpoint_file(weights, RAFT_WEIGHTS.url, f"Raft_Large_Weights.{RAFT_WEIGHTS.name}")]
    if method == "tvl1":
        require_tvl1()
    return []


def build_flow_method(
    method: str, config: ExtractionConfig, device: torch.device, weights: WeightsSource
) -> RaftFlow | FarnebackFlow | TVL1Flow:
    """RAFT: large with the C_T_SKHT_V2 weights, large random, or small random for arch_size tiny; in bf16
    when the config's precision is."""
    if method == "farneback":
        return FarnebackFlow()
    if method == "tvl1":
        return TVL1Flow()
    if method != "raft":
        raise ValueError(f"unknown flow method {method!r}; choose from {FLOW_METHODS}")
    bf16 = config.precision == "bf16"
    if config.arch_size == "tiny":
        return RaftFlow("small", bf16=bf16).to(device)
    if config.random_weights:
        return RaftFlow("large", bf16=bf16).to(device)
    path = checkpoint_path(weights, RAFT_WEIGHTS.url)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return RaftFlow("large", state_dict, f"Raft_Large_Weights.{RAFT_WEIGHTS.name}", bf16).to(device)
