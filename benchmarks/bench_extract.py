"""Extraction speed: decode, audio, each backbone alone, and end to end.

    python benchmarks/bench_extract.py                       # synthetic 25 fps clips, full-size random backbones
    python benchmarks/bench_extract.py --videos DIR --backbones pretrained --device cuda --json out.json

    python benchmarks/bench_extract.py --precision fp32,bf16 --clips 1   # both precisions side by side

Reports segments/s and x-real-time (seconds of video covered by the kept segments per second of wall
time: the remainder after a video's last segment is never embedded, so it does not count) for every
stage, and each backbone's arithmetic rate (its FLOPs per segment over its time) as a fraction of this
machine's own ceilings, measured first in the same run: the best matmul rate with torch at the shapes
the backbones multiply, in fp32 and in bf16 (on all CPU cores, or the GPU; bf16 only where the hardware
computes it natively, pipeline/devices.py native_bf16).

`--precision` lists the precisions to run (`pipeline extract --precision`): each backbone is timed in one
after the other on the same batch, and the end-to-end extraction runs once per precision, so their ratio
comes from one run on one machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extractors.base import WeightsSource, build_extractors  # noqa: E402
from extractors.config import ExtractionConfig  # noqa: E402
from extractors.settings import setting_fields, settings_from_values  # noqa: E402
from extractors.decode import SegmentPlan, VideoFrames, audio_windows, load_audio  # noqa: E402
from extractors.onednn import linear as onednn_linear, onednn_linear_available  # noqa: E402
from extractors.optical_flow import flow_input  # noqa: E402
from extractors.transforms import as_frames  # noqa: E402
from pipeline.devices import native_bf16, resolve_device  # noqa: E402
from pipeline.cli import add_backbone_setting_options  # noqa: E402
from pipeline.extraction.entry import extract_into  # noqa: E402
from pipeline.videos import discover_videos  # noqa: E402
from pipeline.samples import ClipSpec, write_clip  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 1):
    result = fn()  # warm-up (kernel selection, lazy init)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats, result


# (rows, inner, columns) of matmuls the backbones do per 32-frame segment: Video Swin-B's MLPs at its
# first and third stages (16x56x56 and 16x14x14 tokens), AST's MLP (1214 tokens), and a square one.
MATMUL_SHAPES = {"vst stage 1 mlp": (50176, 128, 512), "vst stage 3 mlp": (3136, 512, 2048),
                 "ast mlp": (1214, 768, 3072), "square 2048": (2048, 2048, 2048)}


# The operators that do a backbone's or a model's arithmetic (matmuls, convolutions; forward or backward).
ARITHMETIC = ("addmm", "mm", "bmm", "matmul", "convolution", "linear", "baddbmm", "einsum")


def is_arithmetic(operator: str) -> bool:
    """A matmul or convolution, named as torch's profiler ("aten::mm", "mkldnn::_linear_pointwise") or a
    dispatch-mode timer ("aten.mm") names it."""
    name = operator.replace("::", ".").split(".")[-1].lstrip("_")
    return name.startswith(ARITHMETIC) or "convolution" in name


@torch.inference_mode()
def matmul_rates(device: torch.device, dtype: torch.dtype | None = None) -> dict[str, float]:
    """GFLOP/s of torch matmuls at MATMUL_SHAPES in `dtype` (default: fp32 on a CPU, bf16 on a GPU), on
    every core / the GPU.

    On a CPU each fp32 shape is timed twice: torch's matmul (MKL, which on an AMD CPU runs its AVX2 code
    even where the CPU has AVX-512) and oneDNN's, inside the same torch, which the extractors use for
    their linear layers (extractors/onednn.py). The ceiling is the best of all. A bf16 CPU matmul is
    timed once: torch itself sends it to oneDNN on a CPU with AVX-512."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rates = {}
    for name, (rows, inner, columns) in MATMUL_SHAPES.items():
        a = torch.randn(rows, inner, device=device, dtype=dtype)
        b = torch.randn(inner, columns, device=device, dtype=dtype)
        calls = {"": lambda: a @ b}
        if device.type == "cpu" and dtype == torch.float32 and onednn_linear_available():
            weight = b.t().contiguous()
            calls = {" (MKL)": calls[""], " (oneDNN)": lambda: onednn_linear(a, weight, None)}
        for label, call in calls.items():
            seconds, _ = timed(call, device, repeats=5 if device.type == "cpu" else 50)
            rates[name + label] = 2 * rows * inner * columns / seconds / 1e9
    return rates


def benchmark_videos(videos: Path | None, work: Path, count: int, seconds: float, size: str,
                     varied: bool = False) -> Path:
    """The given folder, or `count` generated clips of `size` (WxH) in work/videos.

    varied: lengths differ by up to 2x and every fourth clip has no audio, as in real collections."""
    if videos is not None:
        return videos
    width, height = map(int, size.split("x"))
    folder = work / "videos"
    for index in range(count):
        length = seconds * (1 + (index % 3) / 2) if varied else seconds
        spec = ClipSpec(f"bench{index}", 0.5, seconds=length, width=width, height=height,
                        with_audio=not (varied and index % 4 == 3), seed=index)
        write_clip(spec, folder / f"bench{index:03d}.mp4")
    return folder


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def cpu_model() -> str:
    """The CPU's name with its family and model numbers, as /proc/cpuinfo gives them: this project's
    machines are all "AMD EPYC", but family 25 (Zen 4) runs AVX-512 at AVX2's width and family 26
    (Zen 5) at twice it, which doubles the matmul ceiling."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)
    except OSError:
        return f"{platform.machine()} CPU"
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family')}, model {fields.get('model')})"


def git_commit() -> str:
    """HEAD's short hash, with "+uncommitted changes" when tracked files other than the results differ
    from it (a figure from a working tree is not the commit's)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)benchmarks/results"], capture_output=True, text=True, cwd=root).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}+uncommitted changes" if head and changed else head or "unknown"


def run_record() -> dict[str, str]:
    """What every results file records about its run: the commit measured, the CPU with its family
    (hosts of one name differ 2x in speed), the UTC date, and torch's huge-pages switch when the
    environment sets it (it moved full-size extraction by 11-34% on one host)."""
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE")
    return {"commit": git_commit(), "cpu": cpu_model(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            **({"THP_MEM_ALLOC_ENABLE": thp} if thp is not None else {})}


def covered_seconds(plan: SegmentPlan) -> float:
    """Seconds of video the kept segments cover (overlapping windows counted once): what a real-time
    ratio must divide, since the remainder after the last segment is never decoded or embedded."""
    covered, reached = 0.0, float("-inf")
    for start, end in sorted(zip(plan.start_s.tolist(), plan.end_s.tolist())):
        covered += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return covered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, help="folder of videos (default: generated clips)")
    parser.add_argument("--clips", type=int, default=2, help="generated clips (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=6.0, help="generated clip length (default: %(default)s)")
    parser.add_argument("--size", default="640x360", help="generated clip WxH (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backbones", default="random", choices=["random", "pretrained"])
    parser.add_argument("--arch-size", default="full", choices=["full", "tiny"])
    parser.add_argument("--modalities", default="rgb,flow,audio")
    parser.add_argument("--rgb", default="vst")
    parser.add_argument("--flow", default=None, help="default: raft on GPU, farneback on CPU")
    parser.add_argument("--audio", default="ast")
    add_backbone_setting_options(parser.add_argument_group("backbone settings, as `pipeline extract`'s"))
    parser.add_argument("--precision", default="fp32",
                        help="comma-separated precisions to run side by side: fp32, bf16 (default: %(default)s)")
    parser.add_argument("--batch-segments", type=int, default=8)
    parser.add_argument("--weights-dir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    precisions = args.precision.split(",")
    if any(p not in ("fp32", "bf16") for p in precisions) or ("bf16" in precisions and not native_bf16(device)):
        parser.error(f"--precision: fp32 and/or bf16 (bf16 only where native), got {args.precision!r}")
    modalities = tuple(args.modalities.split(","))
    flow = args.flow or ("raft" if device.type == "cuda" else "farneback")
    names = {"rgb": args.rgb, "flow": flow, "audio": args.audio}
    values = {name: getattr(args, name) for name in setting_fields() if getattr(args, name) is not None}
    config = ExtractionConfig(modalities=modalities, backbones={m: names[m] for m in modalities},
                              weights=args.backbones, arch_size=args.arch_size,
                              settings={m: settings_from_values(m, names[m], values) for m in modalities})
    # each precision with the settings `pipeline extract --precision` gives it (a CPU's bf16 has its own defaults)
    configs = {p: dataclasses.replace(config, precision=p, settings={
        m: settings_from_values(m, names[m], values, p, device.type) for m in modalities}) for p in precisions}
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    sources = discover_videos(benchmark_videos(args.videos, work, args.clips, args.seconds, args.size))
    built = {p: build_extractors(c, device, WeightsSource(weights_dir=args.weights_dir)) for p, c in configs.items()}

    # decode + audio, per video
    decode_s = audio_s = 0.0
    video_seconds = covered = 0.0
    segments = 0
    sample_batch = sample_audio = None
    for source in sources:
        video = VideoFrames(source.path, config.decode_short_side)
        plan = video.plan(config)
        video_seconds += video.info.duration_s
        covered += covered_seconds(plan)
        segments += plan.num_segments
        start = time.perf_counter()
        for first in range(0, plan.num_segments, args.batch_segments):
            frames = video.read(plan.frame_indices[first : first + args.batch_segments])
            if sample_batch is None or len(frames) > len(sample_batch):
                sample_batch = frames
        decode_s += time.perf_counter() - start
        start = time.perf_counter()
        waveform = load_audio(source.path, config.audio_sample_rate)
        if waveform is not None:
            windows = audio_windows(waveform, plan, config.audio_sample_rate)
            sample_audio = sample_audio or windows[: args.batch_segments]
        audio_s += time.perf_counter() - start

    rows = [("decode frames", decode_s, segments), ("decode audio", audio_s, segments)]
    rates = {"fp32": matmul_rates(device, torch.float32)}
    if native_bf16(device):
        rates["bf16"] = matmul_rates(device, torch.bfloat16)
    ceilings = {dtype: max(r.values()) for dtype, r in rates.items()}  # GFLOP/s
    label = (lambda stage, p: f"{stage} [{p}]") if len(precisions) > 1 else (lambda stage, p: stage)
    flops_rows: dict[str, dict] = {}
    for modality in modalities:
        for precision in precisions:  # one after the other on the same batch: a load that comes and goes hits both
            extractor = built[precision][modality]
            if extractor.input_kind == "frames":
                clips = sample_batch.reshape(-1, config.frames_per_clip, *sample_batch.shape[2:])
                batch = torch.from_numpy(np.ascontiguousarray(clips))
            elif sample_audio:
                batch = sample_audio
            else:
                continue
            seconds, _ = timed(lambda: extractor.embed(batch), device, repeats=2)
            per_segment = seconds / len(batch)
            if modality == "flow" and extractor.flow_method != "raft":
                # OpenCV's flow apart from the network (its work is not in the FLOP count; RAFT's is)
                frames = flow_input(as_frames(batch), device)
                flow_seconds, _ = timed(lambda: extractor.flow(frames), device, repeats=2)
                rows.append((label(f"flow: {extractor.flow_method} (OpenCV)", precision),
                             flow_seconds / len(batch) * segments, segments))
                per_segment -= flow_seconds / len(batch)
                rows.append((label("flow: I3D", precision), per_segment * segments, segments))
            else:
                rows.append((label(f"{modality}: {extractor.name}", precision), per_segment * segments, segments))
            if extractor.input_kind == "frames":
                # the extractor's own count: it writes out what torch's counter cannot see in a fused kernel
                flops = extractor.flops_per_clip(config.frames_per_clip)  # per clip, as per_segment is per batch row
            else:
                with FlopCounterMode(display=False) as counter:
                    extractor.embed(batch)
                flops = counter.get_total_flops() / len(batch)
            rate = flops / 1e9 / per_segment
            flops_rows[label(modality, precision)] = {
                "precision": precision, "gflops_per_segment": flops / 1e9, "seconds_per_segment": per_segment,
                "gflop_per_s": rate, "fraction_of_matmul_ceiling": rate / ceilings[precision],
                **{f"fraction_of_{dtype}_ceiling": rate / ceiling for dtype, ceiling in ceilings.items()}}

    for precision in precisions:
        start = time.perf_counter()
        extract_into(work / "cache", configs[precision], sources, extractors=built[precision],
                     batch_segments=args.batch_segments, progress=False)
        synchronize(device)
        rows.append((label("end to end", precision), time.perf_counter() - start, segments))

    name, record = device_name(device), run_record()
    print(f"device: {name}; {len(sources)} videos, {video_seconds:.2f} s of video, of which {segments} segments "
          f"cover {covered:.2f} s (x real time is over these); backbones: {config.backbones} ({config.weights}, "
          f"{config.arch_size}); precision {', '.join(precisions)}; commit {record['commit']}, {record['date']}")
    for dtype, dtype_rates in rates.items():
        print(f"{dtype} matmul ceiling (GFLOP/s): " + ", ".join(f"{n} {r:.0f}" for n, r in dtype_rates.items())
              + f"; best {ceilings[dtype]:.0f}")
    print(f"{'stage':34s} {'seconds':>9s} {'segments/s':>11s} {'x real time':>12s}")
    results = []
    for stage, seconds, count in rows:
        rate = count / seconds if seconds else float("inf")
        realtime = covered / seconds if seconds else float("inf")
        print(f"{stage:34s} {seconds:9.2f} {rate:11.2f} {realtime:12.2f}")
        results.append({"stage": stage, "seconds": seconds, "segments_per_s": rate, "x_real_time": realtime})
    for row_name, info in flops_rows.items():
        fractions = ", ".join(f"{info[f'fraction_of_{dtype}_ceiling']:.0%} of the {dtype} ceiling" for dtype in ceilings)
        print(f"{row_name}: {info['gflops_per_segment']:.1f} GFLOP/segment, {info['gflop_per_s']:.0f} GFLOP/s, {fractions}")
    # On a CPU every stage shares the same cores, so nothing can hide behind the slowest backbone: the
    # bound there is all stages one after another (on a GPU, decode and flow run beside the backbones).
    summary = {}
    for precision in precisions:
        own = [(stage, seconds, count) for stage, seconds, count in rows[2:] if stage.endswith(label("", precision))]
        stages, (end_stage, end_seconds, _) = [r for r in own if "end to end" not in r[0]], own[-1]
        slowest = min((count / seconds, stage) for stage, seconds, count in stages)
        end_to_end = segments / end_seconds
        serial = segments / (decode_s + audio_s + sum(seconds for _, seconds, _ in stages))
        summary[precision] = {"end_to_end_fraction_of_slowest_backbone": end_to_end / slowest[0],
                              "end_to_end_fraction_of_stages_in_series": end_to_end / serial,
                              "end_to_end_x_real_time": covered / end_seconds}
        print(f"{end_stage}: {end_to_end / slowest[0]:.0%} of the slowest backbone's rate ({slowest[1]}); "
              f"{end_to_end / serial:.0%} of the rate of all stages one after another ({serial:.3f} segments/s)")
    if len(precisions) > 1:
        speedup = summary[precisions[1]]["end_to_end_x_real_time"] / summary[precisions[0]]["end_to_end_x_real_time"]
        print(f"end to end: {precisions[1]} runs {speedup:.2f}x the rate of {precisions[0]}")
    if args.json:
        single = summary[precisions[0]] if len(precisions) == 1 else {"by_precision": summary}
        # each precision's own config: a CPU's bf16 takes other settings by default (settings_from_values)
        args.json.write_text(json.dumps({"device": name, **record, "config": configs[precisions[0]].to_dict(),
                                         "configs": {p: configs[p].to_dict() for p in precisions}, "precisions": precisions,
                                         "video_seconds": video_seconds, "covered_seconds": covered,
                                         "segments": segments,
                                         "command": " ".join(["python", *sys.argv]),
                                         "matmul_gflop_per_s": rates["fp32"],
                                         "matmul_ceiling_gflop_per_s": ceilings["fp32"],
                                         "matmul_gflop_per_s_by_dtype": rates, "matmul_ceilings": ceilings,
                                         "stages": results, "flops": flops_rows, **single,
                                         # the whole run's: backbones, decoded batches, extract's own state
                                         "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
                                        indent=2) + "\n")

if __name__ == "__main__":
    main()
