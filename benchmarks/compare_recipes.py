"""The `pamfn` recipe against the `project` one: time per segment on this CPU with full-size backbones,
and how far apart their features are (cosine per modality) on the demo's kind of clips.

    python benchmarks/compare_recipes.py --json benchmarks/results/recipes_cpu.json

Clips: generated like the demo's (pipeline/samples.py), 25 fps, at --size (default 1280x720, so TV-L1
runs at a real source size). Variants: `project` (the CPU defaults: Swin3D-B, Farneback + I3D, AST),
`pamfn`, and `pamfn-no-jpeg` (pamfn without its JPEG round trips, --jpeg-quality 0). Each variant
extracts each modality alone, one segment per call, so a modality's time is its own, decoding
included. TV-L1 is also timed by itself at the clips' size, its pairs run as the extractor runs them,
for its share of pamfn's flow time. Cosine: between the same clip's rows in two variants, segment by segment (both cut 32-frame
segments of 25 fps video, so segment i covers the same frames), averaged over segments and clips.

Random full-size weights by default (--backbones pretrained --weights-dir DIR for real ones): the
cosines then say how much the front ends move features through one network, not what a trained
network makes of the difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import run_record  # noqa: E402
from extractors.base import WeightsSource  # noqa: E402
from extractors.config import ExtractionConfig  # noqa: E402
from extractors.decode import VideoFrames  # noqa: E402
from extractors.optical_flow import TVL1Flow, source_gray  # noqa: E402
from pipeline.extraction.entry import extract_into  # noqa: E402
from pipeline.samples import ClipSpec, sample_set, write_clip  # noqa: E402
from pipeline.videos import VideoSource  # noqa: E402

MODALITIES = ("rgb", "flow", "audio")
PROJECT_CPU_BACKBONES = {"rgb": "vst", "flow": "farneback", "audio": "ast"}


def variant_config(variant: str, modality: str, weights: str) -> ExtractionConfig:
    if variant == "project":
        return ExtractionConfig(modalities=(modality,), backbones={modality: PROJECT_CPU_BACKBONES[modality]},
                                weights=weights)
    no_jpeg = {modality: {"jpeg_quality": 0}} if variant == "pamfn-no-jpeg" and modality != "audio" else None
    return ExtractionConfig.from_recipe("pamfn", modalities=(modality,), settings=no_jpeg, weights=weights)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over matched segments of the rows' cosine similarity."""
    length = min(len(a), len(b))
    a, b = a[:length].astype(np.float64), b[:length].astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def time_tvl1(path: Path, pairs: int) -> float:
    """Seconds per TV-L1 pair on grey frames at the clip's own size, the pairs run as the extractor runs
    them (OpenCVFlow.gray_flows: as many at a time as the CPU has cores)."""
    video = VideoFrames(path, decode_short_side=0)
    frames = torch.from_numpy(video.read(np.arange(pairs + 1)))[None]
    gray = source_gray(frames)
    start = time.perf_counter()
    TVL1Flow().gray_flows(gray, [(t, t + 1) for t in range(pairs)])
    return (time.perf_counter() - start) / pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=2, help="generated clips (default: %(default)s)")
    parser.add_argument("--size", default="1280x720", help="generated clip WxH (default: %(default)s)")
    parser.add_argument("--backbones", default="random", choices=["random", "pretrained"])
    parser.add_argument("--weights-dir", type=Path, default=None)
    parser.add_argument("--variants", default="project,pamfn,pamfn-no-jpeg")
    parser.add_argument("--tvl1-pairs", type=int, default=4, help="pairs TV-L1 is timed on (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    variants = args.variants.split(",")
    weights = WeightsSource(weights_dir=args.weights_dir, offline=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = []
        for spec in sample_set(args.clips, seed=5, without_audio_every=10**6, seconds=(2.6, 3.0)):
            clip = ClipSpec(spec.name, spec.quality, seconds=spec.seconds, width=width, height=height, seed=spec.seed)
            sources.append(VideoSource(spec.name, write_clip(clip, root / f"{spec.name}.mp4")))
        results: dict = {"variants": {}, "cosine": {}}
        features: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for variant in variants:
            row, features[variant] = {}, {}
            for modality in MODALITIES:
                config = variant_config(variant, modality, args.backbones)
                start = time.perf_counter()
                summary, cache = extract_into(root / variant, config, sources, weights=weights,
                                              batch_segments=1, progress=False)
                seconds = time.perf_counter() - start
                segments = sum(r.num_segments for r in cache.records())
                features[variant][modality] = {s.video_id: cache.load_features(s.video_id)[modality] for s in sources}
                row[modality] = {"seconds": round(seconds, 2), "segments": segments,
                                 "seconds_per_segment": round(seconds / max(segments, 1), 3),
                                 "failed": summary.failed}
                print(f"{variant:14s} {modality:5s} {seconds:7.1f} s for {segments} segments", flush=True)
            row["seconds_per_segment"] = round(sum(row[m]["seconds_per_segment"] for m in MODALITIES), 3)
            results["variants"][variant] = row
        if "pamfn" in variants:
            per_pair = time_tvl1(sources[0].path, args.tvl1_pairs)
            flow = results["variants"]["pamfn"]["flow"]["seconds_per_segment"]
            results["tvl1"] = {"seconds_per_pair": round(per_pair, 3), "seconds_per_segment": round(32 * per_pair, 2),
                               "share_of_pamfn_flow": round(32 * per_pair / flow, 3),
                               "share_of_pamfn_total": round(32 * per_pair / results["variants"]["pamfn"]["seconds_per_segment"], 3)}
        for first, second in (("project", "pamfn"), ("pamfn-no-jpeg", "pamfn"), ("project", "pamfn-no-jpeg")):
            if first in variants and second in variants:
                results["cosine"][f"{first} vs {second}"] = {
                    m: round(float(np.mean([cosine(features[first][m][v], features[second][m][v]) for v in features[first][m]])), 4)
                    for m in MODALITIES}

    out = {**run_record(), "backbones": args.backbones, "clips": args.clips, "size": args.size,
           "threads": torch.get_num_threads(), **results,
           "note": ("RANDOM full-size weights: the cosines measure the front ends through one untrained network"
                    if args.backbones == "random" else "pretrained weights")}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
