"""Recipes: named extraction configurations, so that features can be made the way a published feature
set was made and say so.

A recipe fixes the fields of the ExtractionConfig and the backbones' settings that decide what a
feature row means; `pipeline extract --recipe NAME` starts from them. Flags not given take the
recipe's values; a flag given another value than the recipe's is refused, because the features
would no longer be the recipe's (a recipe may name settings users may still change: `optional`).
Settings that only change float rounding or speed (cpu_linear, attention, memory_format, flow_runtime)
are never part of a recipe. `precision` is: bf16 moves features far more than rounding does, and the
published features were computed in fp32.

`project` is this project's own choice of every step and fixes nothing. The others reproduce published
features step by step, including their authors' slips where the published models were trained on them
(docs/design/features.md lists each step). `unverified` names the steps nobody could check against the
authors' own files: they are recorded in config.json as such.

Light on purpose (no torch): the command line lists the recipes in its help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    config: dict[str, Any] = field(default_factory=dict)  # ExtractionConfig fields, e.g. {"frame_rate": 25.0}
    backbones: dict[str, str] = field(default_factory=dict)  # modality -> backbone
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # modality -> {setting: value}
    optional: tuple[str, ...] = ()  # settings a user may change and still call the features this recipe's
    unverified: tuple[str, ...] = ()  # steps not checked against the authors' files

    def describe(self) -> dict[str, Any]:
        """What config.json records about the recipe besides the values themselves."""
        return {"name": self.name, "summary": self.summary, "unverified": list(self.unverified)}


PROJECT = "project"

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(PROJECT, "this project's own features (the default): every flag free"),
        Recipe(
            "pamfn",
            "the RG and Fis-V feature sets (PAMFN's extraction) that MCMoE's and LIMSSR's released checkpoints "
            "were trained on: Video Swin-B K600-22k, TV-L1 flow at source resolution + I3D, AST on 41 "
            "filterbank frames, 32-frame segments at 25 fps",
            config={"protocol": "rg", "segment_frames": 32, "frame_stride": 1, "frame_rate": 25.0,
                    "decode_short_side": 0, "audio_sample_rate": 16000, "precision": "fp32"},
            backbones={"rgb": "vst", "flow": "tvl1", "audio": "ast"},
            settings={
                "rgb": {"vst_checkpoint": "mmaction2-k600-22k", "frame_transform": "pil", "jpeg_quality": 95},
                "flow": {"i3d_checkpoint": "hassony2-kinetics", "flow_resolution": "source", "flow_encoding": "u8",
                         "jpeg_quality": 95, "flow_pairs": "crossing"},
                "audio": {"ast_checkpoint": "original-audioset", "audio_frontend": "pamfn"},
            },
            # The JPEG round trip of frames and flow images is how the published files were stored; it
            # costs time and moves features little (benchmarks/compare_recipes.py measures both ways).
            optional=("jpeg_quality",),
            unverified=(
                "audio track: the authors' .wav files were extracted from the videos by a step not published "
                "(sample format and resampler unknown); here ffmpeg decodes the video's own track",
                "TV-L1 parameters: denseflow's CUDA defaults mapped onto OpenCV's CPU solver "
                "(see the flow description in config.json)",
            ),
        ),
        Recipe(
            "skating-mixer",
            "the FS1000 features (Skating-Mixer's extraction) that MCMoE's FS1000 checkpoints were trained on: "
            "5 s windows every 2 s, TimeSformer on 8-frame clips averaged, AST per window",
            config={"protocol": "fs1000", "window_seconds": 5.0, "hop_seconds": 2.0, "clip_frames": 8,
                    "precision": "fp32"},
            backbones={"rgb": "timesformer", "audio": "ast"},
            unverified=(
                "TimeSformer checkpoint: Kinetics-400 or Kinetics-600 (K400 used here)",
                "AST input length per window (each window at its own length here)",
                "the flow stream MCMoE's authors used for FS1000 (not published: the project's flow backbone "
                "is used when flow is extracted)",
                "window edges: a window that would run past the video's end is dropped here",
            ),
        ),
    )
}


def recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose from {list(RECIPES)}") from None
