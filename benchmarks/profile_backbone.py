"""Where one backbone spends its time on this machine: torch's profiler over one batch of segments.

    python benchmarks/profile_backbone.py --modality rgb            # Video Swin-B, full size, one segment
    python benchmarks/profile_backbone.py --modality flow --segments 2 --rows 25
    python benchmarks/profile_backbone.py --modality rgb --ceiling --json benchmarks/results/profile_rgb_cpu.json
    python benchmarks/profile_backbone.py --modality rgb --ceiling --precision bf16   # as `extract --precision bf16`

Builds the backbone as `pipeline extract` does (random weights unless --backbones pretrained), runs
`embed` once to warm up, then once under torch.profiler, and prints the operators by their own time
with the share that is arithmetic (matmul / convolution) and the share that only moves memory.

With --ceiling it first measures this machine's matmul rate in the backbone's precision (bench_extract's
`matmul_rates`, fp32 or bf16) and
gives each operator its FLOPs (torch's FLOP counter; a fused attention kernel, which the counter cannot
see into, gets the extractor's written-out count minus what the counter saw) and its rate as a fraction
of that ceiling: how fast the arithmetic itself runs, and what the other operators cost the whole.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.bench_extract import is_arithmetic, matmul_rates, run_record  # noqa: E402
from extractors.base import WeightsSource, build_extractors  # noqa: E402
from extractors.config import ExtractionConfig  # noqa: E402
from extractors.transforms import dummy_frames  # noqa: E402

# The kernels torch may run for an operator the FLOP counter names.
KERNELS = {"aten::convolution": ("convolution", "slow_conv")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", default="rgb", choices=["rgb", "flow", "audio"])
    parser.add_argument("--backbone", help="default: the extract default for the modality on a CPU")
    parser.add_argument("--arch-size", default="full", choices=["full", "tiny"])
    parser.add_argument("--backbones", default="random", choices=["random", "pretrained"])
    parser.add_argument("--segments", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--ceiling", action="store_true", help="measure the matmul ceiling and each operator's rate")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="as `pipeline extract --precision`")
    parser.add_argument("--json", type=Path, help="also write the shares and the top operators here")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    ceiling = max(matmul_rates(torch.device("cpu"), dtype).values()) if args.ceiling else None

    defaults = {"rgb": "vst", "flow": "farneback", "audio": "ast"}
    name = args.backbone or defaults[args.modality]
    config = ExtractionConfig(modalities=(args.modality,), backbones={args.modality: name},
                              weights=args.backbones, arch_size=args.arch_size).in_precision(args.precision, "cpu")
    extractor = build_extractors(config, torch.device("cpu"), WeightsSource())[args.modality]
    if extractor.input_kind == "frames":
        shape = dummy_frames(config.frames_per_clip, config.decode_short_side).shape[1:]  # the decode size
        batch = torch.randint(0, 256, (args.segments, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    else:
        samples = round(config.segment_frames / 25.0 * config.audio_sample_rate)
        batch = [np.random.default_rng(i).standard_normal(samples).astype(np.float32) * 0.1 for i in range(args.segments)]
    with FlopCounterMode(display=False) as counter:
        extractor.embed(batch)  # also the warm-up
    flops = {str(op).replace(".", "::"): count for op, count in counter.get_flop_counts()["Global"].items()}
    unseen = extractor.flops_per_clip(config.frames_per_clip) * args.segments - sum(flops.values())
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        extractor.embed(batch)
    seconds = time.perf_counter() - started
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    arithmetic = sum(e.self_cpu_time_total for e in events if is_arithmetic(e.key))
    record = {**run_record(), "threads": torch.get_num_threads(), "command": " ".join(["python", *sys.argv]),
              "modality": args.modality, "backbone": name, "arch_size": config.arch_size, "weights": config.weights,
              "segments": args.segments, "precision": args.precision, "profiled_s": seconds, "arithmetic_share_of_operators": arithmetic / total,
              "matmul_ceiling_gflop_per_s": ceiling}
    print(f"{args.modality}: {name} ({config.arch_size}, {config.weights} weights, {args.precision}), {args.segments} segment(s), "
          f"{record['cpu']}, {record['threads']} threads, commit {record['commit']}, {record['date']}: "
          f"{seconds:.2f} s under the profiler")
    print(f"arithmetic operators (matmul, convolution): {arithmetic / total:.0%} of the operators' own time")
    # Rows: (operator, own microseconds, calls, FLOPs or None).
    rows = {e.key: [e.key, e.self_cpu_time_total, e.count, None] for e in events}
    if ceiling:
        # The counter names the operator called (aten::convolution), the profiler the kernels that ran
        # under it (mkldnn_convolution, slow_conv3d_forward): one row for all of them.
        for op, count in flops.items():
            kernels = [key for key in rows if key == op or any(k in key for k in KERNELS.get(op, ()))]
            if len(kernels) == 1:
                rows[kernels[0]][3] = count
            elif kernels:
                merged = [f"{op}, all kernels", sum(rows[k][1] for k in kernels), max(rows[k][2] for k in kernels), count]
                for key in kernels:
                    del rows[key]
                rows[merged[0]] = merged
        fused = [key for key in rows if "scaled_dot_product" in key and rows[key][3] is None]
        if fused and unseen > 0:  # the kernel that did the attention the counter could not see
            rows[max(fused, key=lambda key: rows[key][1])][3] = unseen
        arithmetic_rows = [row for row in rows.values() if row[3]]
        gflop = sum(row[3] for row in arithmetic_rows) / 1e9
        record["fraction_of_ceiling_over_all_operators"] = gflop / (total / 1e6) / ceiling
        record["fraction_of_ceiling_over_arithmetic_operators"] = gflop / (sum(r[1] for r in arithmetic_rows) / 1e6) / ceiling
        print(f"matmul ceiling {ceiling:.0f} GFLOP/s; {gflop:.0f} GFLOP: {gflop / (total / 1e6) / ceiling:.0%} of the "
              f"ceiling over all operators' own time, {gflop / (sum(r[1] for r in arithmetic_rows) / 1e6) / ceiling:.0%} "
              "over the arithmetic operators' own time alone")
    print(f"{'operator':48s} {'own time':>10s} {'share':>7s} {'calls':>7s}" + (f" {'GFLOP':>7s} {'of ceiling':>10s}" if ceiling else ""))
    record["top_operators"] = []
    for key, micros, calls, count in sorted(rows.values(), key=lambda row: row[1], reverse=True)[: args.rows]:
        line = f"{key:48s} {micros / 1e6:9.2f}s {micros / total:7.1%} {calls:7d}"
        operator = {"operator": key, "own_s": micros / 1e6, "share": micros / total, "calls": calls}
        if count:
            line += f" {count / 1e9:7.1f} {count / 1e9 / (micros / 1e6) / ceiling:10.0%}"
            operator |= {"gflop": count / 1e9, "fraction_of_ceiling": count / 1e9 / (micros / 1e6) / ceiling}
        print(line)
        record["top_operators"].append(operator)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")

if __name__ == "__main__":
    main()
