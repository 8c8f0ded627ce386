"""`pipeline demo`: sample clips through every stage (pipeline/stages/demo.py), which runs each command through `main`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pipeline.stages.demo import DemoSettings

    defaults = DemoSettings()
    parser = sub.add_parser(
        "demo",
        help="show the pipeline learning a score from video, on built-in sample clips (random-weight backbones)",
        description="Make sample clips whose score is carried by what they show and sound like (some "
        "without an audio track), extract them (random-weight backbones), train MCMoE and its Baseline "
        "ablation with the same number of optimiser steps, compare both on held-out clips under every "
        "modality setting, and score unseen clips. Everything goes under --out. The numbers show that "
        "the machinery learns from video; they are NOT accuracy claims about real sports.",
    )
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: %(default)s)")
    parser.add_argument("--train-clips", type=int, default=defaults.train_clips, help="(default: %(default)s)")
    parser.add_argument("--val-clips", type=int, default=defaults.val_clips, help="(default: %(default)s)")
    parser.add_argument("--test-clips", type=int, default=defaults.test_clips, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="optimiser steps per model, the same for both (default: %(default)s)")
    parser.add_argument("--training-seeds", type=int, default=defaults.training_seeds,
                        help="runs per model (seeds --seed, --seed+1, ...); the table shows their mean (default: %(default)s)")
    parser.add_argument("--arch-size", choices=["tiny", "full"], default=defaults.arch_size,
                        help="backbone sizes; full is the real architectures, slow on a CPU (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="clips, backbones and training (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from pipeline.stages.demo import DemoSettings, run_demo

    from . import main  # here, not at the top: the package imports this module

    if args.train_clips < 4 or args.val_clips < 2 or args.test_clips < 3 or args.steps < 1 or args.training_seeds < 1:
        raise UsageError("the demo needs --train-clips >= 4, --val-clips >= 2, --test-clips >= 3, --steps >= 1 "
                         "and --training-seeds >= 1")
    settings = DemoSettings(train_clips=args.train_clips, val_clips=args.val_clips, test_clips=args.test_clips,
                            steps=args.steps, training_seeds=args.training_seeds, arch_size=args.arch_size, seed=args.seed)
    return run_demo(args.out, settings, device=args.device, progress=not args.quiet, pipeline=main).code
