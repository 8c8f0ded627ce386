"""Scoring speed: latency for one new clip and throughput for many, end to end (decode -> score).

    python benchmarks/bench_score.py                         # tiny random backbones, CPU or the GPU
    python benchmarks/bench_score.py --arch-size full --clips 16 --device cuda --json out.json
    python benchmarks/bench_score.py --arch-size full --clips 0 --seconds 180 --device cpu   # one 3-minute routine
    python benchmarks/bench_score.py --arch-size full --clips 0 --seconds 180 --device cpu --precision fp32,bf16

It first builds a run to score with (generated labelled clips -> extract -> a 1-epoch MCMoE run),
then times `score_clips` on clips the run has never seen, so every timing includes extraction:
one clip alone (start-up included: backbones and scorer loaded once per invocation), then many
clips in one invocation (their segments batched together through the backbones). x real time is
over the seconds of video the clips' segments cover (what is embedded), not the clips' whole length.
With several `--precision` values, one run is built per precision (its features extracted in it, as
`pipeline extract --precision`), and each batch of clips is scored by every run in turn.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import covered_seconds, device_name, run_record  # noqa: E402
from extractors.config import ExtractionConfig  # noqa: E402
from extractors.decode import VideoFrames  # noqa: E402
from manifests.run import RunDir  # noqa: E402
from pipeline.cli import main as pipeline_main  # noqa: E402
from pipeline.devices import resolve_device  # noqa: E402
from pipeline.samples import ClipSpec, sample_set, write_clip  # noqa: E402
from pipeline.stages.score import score_clips  # noqa: E402


def build_run(work: Path, arch_size: str, device: str, precision: str) -> Path:
    videos = work / "train_videos"
    rows = ["video_id,score"]
    for spec in sample_set(8, seed=5):
        if not (videos / f"{spec.name}.mp4").is_file():
            write_clip(spec, videos / f"{spec.name}.mp4")
        rows.append(f"{spec.name},{spec.label}")
    (work / "labels.csv").write_text("\n".join(rows) + "\n")
    common = ["--device", device, "--quiet"]
    cache = work / f"cache-{precision}"
    assert pipeline_main(["extract", "--videos", str(videos), "--out", str(cache), "--backbones", "random",
                          "--arch-size", arch_size, "--precision", precision, *common]) == 0
    assert pipeline_main(["train", "--features", str(cache), "--labels", str(work / "labels.csv"),
                          "--out", str(work / f"run-{precision}"), "--epochs", "1", *common]) == 0
    return work / f"run-{precision}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=6, help="clips scored together after the single clip; 0: the single clip only (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each clip (default: %(default)s)")
    parser.add_argument("--arch-size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="fp32",
                        help="comma-separated precisions to score in, side by side: fp32, bf16 (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    precisions = args.precision.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench_score_"))
    runs = {p: build_run(work, args.arch_size, device.type, p) for p in precisions}

    def new_clips(prefix: str, count: int) -> list[Path]:
        return [write_clip(ClipSpec(f"{prefix}{i}", 0.5, seconds=args.seconds, seed=100 + i), work / prefix / f"{prefix}{i}.mp4")
                for i in range(count)]

    extraction = ExtractionConfig.from_dict(RunDir(runs[precisions[0]]).read_extraction_config()["extraction"])
    timings = {}
    batches = [("one clip", new_clips("single", 1))] + ([(f"{args.clips} clips", new_clips("many", args.clips))] if args.clips else [])
    for batch_name, clips in batches:
        covered = sum(covered_seconds(VideoFrames(clip, extraction.decode_short_side).plan(extraction)) for clip in clips)
        for precision, run in runs.items():
            start = time.perf_counter()
            results = score_clips(clips, run, device=device, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            assert not any(r.error for r in results), [r.error for r in results]
            name = batch_name if len(runs) == 1 else f"{batch_name} [{precision}]"
            timings[name] = {"clips": len(clips), "seconds": seconds, "clips_per_s": len(clips) / seconds,
                             "video_seconds": len(clips) * args.seconds, "covered_seconds": covered,
                             "x_real_time": covered / seconds, "precision": precision}

    record = run_record()
    print(f"device: {device_name(device)}; {args.arch_size} random backbones (rgb vst, flow "
          f"{'raft' if device.type == 'cuda' else 'farneback'}, audio ast); {args.seconds:g} s clips; "
          f"commit {record['commit']}, {record['date']}")
    print(f"{'scoring':19s} {'seconds':>9s} {'clips/s':>9s} {'video s':>8s} {'covered s':>10s} {'x real time':>12s}")
    for name, row in timings.items():
        print(f"{name:19s} {row['seconds']:9.2f} {row['clips_per_s']:9.2f} {row['video_seconds']:8.2f} "
              f"{row['covered_seconds']:10.2f} {row['x_real_time']:12.2f}")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name(device), **record,
                                         "arch_size": args.arch_size, "clip_seconds": args.seconds,
                                         "command": " ".join(["python", *sys.argv]), "precisions": precisions,
                                         "timings": timings}, indent=2))


if __name__ == "__main__":
    main()
