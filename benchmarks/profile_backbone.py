"""Where one backbone spends its time on this machine: torch's profiler over one batch of segments.

    python benchmarks/profile_backbone.py --modality rgb            # Video Swin-B, full size, one segment
    python benchmarks/profile_backbone.py --modality flow --segments 2 --rows 25

Builds the backbone as `pipeline extract` does (random weights unless --backbones pretrained), runs
`embed` once to warm up, then once under torch.profiler, and prints the operators by their own time
with the share that is arithmetic (matmul / convolution) and the share that only moves memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import git_commit  # noqa: E402
from extractors.base import WeightsSource, build_extractors  # noqa: E402
from extractors.config import ExtractionConfig  # noqa: E402
from extractors.transforms import dummy_frames  # noqa: E402

ARITHMETIC = ("addmm", "mm", "bmm", "matmul", "convolution", "linear", "baddbmm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", default="rgb", choices=["rgb", "flow", "audio"])
    parser.add_argument("--backbone", help="default: the extract default for the modality on a CPU")
    parser.add_argument("--arch-size", default="full", choices=["full", "tiny"])
    parser.add_argument("--backbones", default="random", choices=["random", "pretrained"])
    parser.add_argument("--segments", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    defaults = {"rgb": "vst", "flow": "farneback", "audio": "ast"}
    name = args.backbone or defaults[args.modality]
    config = ExtractionConfig(modalities=(args.modality,), backbones={args.modality: name},
                              weights=args.backbones, arch_size=args.arch_size)
    extractor = build_extractors(config, torch.device("cpu"), WeightsSource())[args.modality]
    if extractor.input_kind == "frames":
        shape = dummy_frames(config.frames_per_clip, config.decode_short_side).shape[1:]  # the decode size
        batch = torch.randint(0, 256, (args.segments, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    else:
        samples = round(config.segment_frames / 25.0 * config.audio_sample_rate)
        batch = [np.random.default_rng(i).standard_normal(samples).astype(np.float32) * 0.1 for i in range(args.segments)]
    extractor.embed(batch)  # warm-up
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        extractor.embed(batch)
    seconds = time.perf_counter() - started
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    arithmetic = sum(e.self_cpu_time_total for e in events if e.key.split("::")[-1].lstrip("_").startswith(ARITHMETIC)
                     or "convolution" in e.key)
    print(f"{args.modality}: {name} ({config.arch_size}, {config.weights} weights), {args.segments} segment(s), "
          f"{torch.get_num_threads()} threads, commit {git_commit()}: {seconds:.2f} s under the profiler")
    print(f"arithmetic operators (matmul, convolution): {arithmetic / total:.0%} of the operators' own time")
    print(f"{'operator':32s} {'own time':>10s} {'share':>7s} {'calls':>7s}")
    for event in events[: args.rows]:
        print(f"{event.key:32s} {event.self_cpu_time_total / 1e6:9.2f}s {event.self_cpu_time_total / total:7.1%} {event.count:7d}")


if __name__ == "__main__":
    main()
