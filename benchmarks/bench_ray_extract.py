"""Distributed extraction throughput: `extract --ray` with 1, 2, ... workers on the machine at hand.

    python benchmarks/bench_ray_extract.py                                  # generated clips, tiny backbones
    python benchmarks/bench_ray_extract.py --workers 1,2,4 --arch-size full --device cuda --json out.json
    python benchmarks/bench_ray_extract.py --videos DIR --ray ray://head:10001 --workers 4,8

For each worker count, a fresh cache is filled by `extract_on_ray` (the code behind `extract --ray`).
The same command is then run again on the finished cache: every video is skipped, so that second
run's time is the fixed cost (worker start-up, building the backbones, fingerprinting) and the
difference is the extraction work. Reported: wall time, that work time, videos/s and segments/s of
the work, and the scaling efficiency throughput(n) / (n * throughput(1)). On a CPU each of n workers
gets cores/n torch threads, so n workers are compared with one worker using every core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extractors.base import WeightsSource  # noqa: E402
from extractors.config import CPU_FLOW_BACKBONE, ExtractionConfig  # noqa: E402
from pipeline.videos import discover_videos  # noqa: E402
from pipeline.extraction.on_ray import extract_on_ray  # noqa: E402
from pipeline.ray_session import ray_session  # noqa: E402
from benchmarks.bench_extract import benchmark_videos, run_record  # noqa: E402


def timed_run(sources, out: Path, config: ExtractionConfig, workers: int, args) -> tuple[float, object]:
    start = time.perf_counter()
    result = extract_on_ray(sources, out, config, device=args.device, workers=workers,
                            weights=WeightsSource(weights_dir=args.weights_dir), batch_segments=args.batch_segments,
                            progress=False)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, help="folder of videos (default: generated clips)")
    parser.add_argument("--clips", type=int, default=12, help="generated clips (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=4.0, help="shortest generated clip, seconds (default: %(default)s)")
    parser.add_argument("--size", default="320x240", help="generated clip WxH (default: %(default)s)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: %(default)s)")
    parser.add_argument("--ray", default="local", help="auto, local or a cluster address (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backbones", default="random", choices=["random", "pretrained"])
    parser.add_argument("--arch-size", default="tiny", choices=["full", "tiny"])
    parser.add_argument("--modalities", default="rgb,flow,audio")
    parser.add_argument("--segment-frames", type=int, default=32)
    parser.add_argument("--batch-segments", type=int, default=8)
    parser.add_argument("--weights-dir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    counts = [int(n) for n in args.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_ray_extract_"))
    # lengths vary by up to 2x, as real videos do: dynamic hand-out has something to balance
    sources = discover_videos(benchmark_videos(args.videos, work, args.clips, args.seconds, args.size, varied=True))
    modalities = tuple(args.modalities.split(","))
    rows = []
    with ray_session(args.ray, num_cpus=os.cpu_count()) as resources:
        gpus = resources.get("GPU", 0) >= 1 and args.device != "cpu"
        names = {"rgb": "vst", "flow": "raft" if gpus else CPU_FLOW_BACKBONE, "audio": "ast"}
        config = ExtractionConfig(modalities=modalities, backbones={m: names[m] for m in modalities},
                                  weights=args.backbones, arch_size=args.arch_size, segment_frames=args.segment_frames)
        for workers in counts:
            out = work / f"cache{workers}"
            wall, result = timed_run(sources, out, config, workers, args)
            fixed, _ = timed_run(sources, out, config, workers, args)  # everything skipped: start-up only
            done = [r for r in result.summary.records if r.status == "done"]
            segments = sum(r.num_segments for r in done)
            seconds = max(wall - fixed, 1e-9)
            rows.append({"workers": workers, "plan": result.plan.describe(), "videos": len(done), "segments": segments,
                         "wall_s": wall, "fixed_s": fixed, "work_s": seconds,
                         "videos_per_s": len(done) / seconds, "segments_per_s": segments / seconds})
            shutil.rmtree(out, ignore_errors=True)
    base = rows[0]["segments_per_s"] / rows[0]["workers"]
    for row in rows:
        row["efficiency"] = row["segments_per_s"] / (row["workers"] * base)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Ray resources {dict(sorted(resources.items()))}"
    print(f"machine: {machine}\n{len(sources)} videos; backbones {config.backbones} ({config.weights}, {config.arch_size}); "
          f"segment_frames {config.segment_frames}")
    print(f"{'workers':>7s}  {'plan':34s} {'wall s':>7s} {'fixed s':>8s} {'work s':>7s} {'videos/s':>9s} "
          f"{'segments/s':>11s} {'efficiency':>10s}")
    for row in rows:
        print(f"{row['workers']:7d}  {row['plan']:34s} {row['wall_s']:7.1f} {row['fixed_s']:8.1f} {row['work_s']:7.1f} "
              f"{row['videos_per_s']:9.2f} {row['segments_per_s']:11.1f} {row['efficiency']:10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, **run_record(), "config": config.to_dict(), "rows": rows},
                                        indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
