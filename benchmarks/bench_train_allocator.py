"""The MCMoE training step with glibc's default allocation and with glibc keeping freed memory, in turns.

    python benchmarks/bench_train_allocator.py                 # RG setting, 8 steps each after a warm-up
    python benchmarks/bench_train_allocator.py --steps 12 --json out.json

The allocator's settings belong to a process, so the two variants cannot share one: two child
processes build the same model, optimiser and batches (bench_train's setup_mcmoe), one of them calls
`keep_freed_memory()` (a candidate for `pipeline train`, not adopted: see benchmarks/results/README.md),
and the parent lets them run one step each in turn (who goes first alternates), so that whatever else
loads the machine hits both alike. Reported: the median per-step time ratio and each process's peak
resident set (glibc keeping freed memory may raise it).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import run_record  # noqa: E402
from benchmarks.bench_train import RG_CLIPS, peak_memory_mib, setup_mcmoe  # noqa: E402
from pipeline.train_config import OPTIMIZER_IMPLEMENTATIONS, TrainConfig  # noqa: E402

VARIANTS = ("glibc default", "keep freed memory")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Make glibc keep the memory a step frees for the next step rather than giving it back.

    By default glibc serves large blocks with fresh mappings and trims its heap as blocks are freed, so
    a step may fault its activations in again, and a first touch of memory is slow on this machine.
    With a 32 MiB mmap threshold (above a step's largest tensor, ~20 MB) they come from the heap, and
    with a 1 GiB trim threshold the heap keeps them. False where there is no glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))


def child(variant: str, steps: int, batch_size: int, clips: int, implementation: str) -> None:
    """Run one step per "step" line on stdin, answering with its seconds; at EOF print the peak RSS."""
    if variant == VARIANTS[1] and not keep_freed_memory():
        raise SystemExit("mallopt is not available here (not glibc)")
    step, data, _ = setup_mcmoe("batched", torch.device("cpu"), steps + 1, batch_size, clips,
                                implementation=implementation)
    print("ready", flush=True)
    for index, _ in enumerate(sys.stdin):
        began = time.perf_counter()
        step(data[index])
        print(time.perf_counter() - began, flush=True)
    print(json.dumps({"peak_mib": peak_memory_mib(torch.device("cpu"))}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--clips", type=int, default=RG_CLIPS)
    parser.add_argument("--optimizer-implementation", choices=OPTIMIZER_IMPLEMENTATIONS,
                        default=TrainConfig.optimizer_implementation)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps, args.batch_size, args.clips, args.optimizer_implementation)

    children = {v: subprocess.Popen(
        [sys.executable, __file__, "--child", v, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
         "--clips", str(args.clips), "--optimizer-implementation", args.optimizer_implementation],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for v in VARIANTS}
    for process in children.values():
        assert process.stdout.readline().strip() == "ready"
    times = {v: [] for v in VARIANTS}
    for index in range(args.steps + 1):
        for variant in (VARIANTS if index % 2 else VARIANTS[::-1]):  # who goes first alternates
            process = children[variant]
            process.stdin.write("step\n")
            process.stdin.flush()
            seconds = float(process.stdout.readline())
            if index:  # the first round warms up
                times[variant].append(seconds)
    peaks = {}
    for variant, process in children.items():
        process.stdin.close()
        peaks[variant] = json.loads(process.stdout.readline())["peak_mib"]
        process.wait()
    base = times[VARIANTS[0]]
    report = {
        "setting": {"steps": args.steps, "batch_size": args.batch_size, "clips": args.clips,
                    "optimizer_implementation": args.optimizer_implementation, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), **run_record()},
        "results": [{"variant": v, "median_step_ms": 1000 * statistics.median(times[v]), "step_s": times[v],
                     "speedup": statistics.median(b / t for b, t in zip(base, times[v])), "peak_mib": peaks[v]}
                    for v in VARIANTS],
    }
    print(f"{'allocation':18s} {'step ms':>8s} {'speed-up':>9s} {'peak MiB':>9s}")
    for row in report["results"]:
        print(f"{row['variant']:18s} {row['median_step_ms']:8.0f} {row['speedup']:8.2f}x {row['peak_mib']:9.0f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
