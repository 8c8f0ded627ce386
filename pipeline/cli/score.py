"""`pipeline score`: new clips -> scores with a trained run (pipeline/stages/score.py)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .common import EXIT_FAILURES, EXIT_OK, UsageError, batch_segments, existing_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from extractors.config import PRECISIONS

    parser = sub.add_parser(
        "score",
        help="score new clips end to end with a trained run",
        description="Extract the clips exactly as the run's training features were extracted (reusing "
        "features of clips already extracted), then score them with the run's model. A modality a clip "
        "lacks (e.g. no audio track) is imputed and reported. The table goes to stdout (and to --out); "
        "logs and progress to stderr. Exit 0: all clips scored; 1: some clips failed (they get a row "
        "with the error); 2: usage error.",
    )
    parser.add_argument("clips", nargs="+", type=Path, help="video files and/or folders of videos")
    parser.add_argument("--run", type=existing_path, required=True, help="run folder made by `pipeline train`")
    parser.add_argument("--out", type=Path, help="also write the scores to FILE.csv, FILE.json or FILE.md (with per-grade weights)")
    parser.add_argument("--features", type=Path,
                        help="feature cache to reuse and extend (refused unless made exactly like the run's); "
                        "default: the run's training cache is reused read-only and new clips go to RUN/score_cache")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    parser.add_argument("--weights-dir", type=Path, help="folder with pretrained backbone weights (see extract --help)")
    parser.add_argument("--offline", action="store_true", help="never download backbone weights")
    parser.add_argument("--batch-segments", type=int, default=None,
                        help="segments per backbone call (default: 8 on a GPU, 1 on a CPU)")
    parser.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                        help="how long to wait for clips another running process (another score) is extracting "
                        "into the same cache, then use its features (default: 1800); a clip it lets go "
                        "unfinished is extracted here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--allow-other-recipe", action="store_true",
                        help="use features of another recipe than the run's weights were trained on (refused by "
                        "default: such scores mean nothing; see extract --recipe)")
    parser.add_argument("--precision", choices=["run", "auto", *PRECISIONS], default="run",
                        help="what new clips' features are computed in: run: the precision of the run's features "
                        "(fp32 where bf16 is not native); auto, fp32, bf16 as in extract; another precision than "
                        "the run's gets a NOTE (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from extractors.base import BackboneUnavailableError, WeightsSource
    from manifests.cache import CacheError
    from pipeline.devices import resolve_device
    from pipeline.inference import RunError
    from pipeline.stages.score import (WAIT_FOR_OTHERS_S, ScoreError, collect_clips, format_scores, score_clips,
                                       scores_table, write_scores)
    from pipeline.tables import FORMATS

    if args.out is not None and args.out.suffix.lower() not in FORMATS:
        raise UsageError(f"--out must end in {', '.join(FORMATS)}, got {args.out}")
    wait = WAIT_FOR_OTHERS_S if args.wait is None else args.wait
    if not (wait >= 0 and math.isfinite(wait)):
        raise UsageError(f"--wait must be a number of seconds >= 0, got {args.wait}")
    clips = collect_clips(args.clips)
    if not clips:
        raise UsageError(f"no video files among {[str(c) for c in args.clips]}")
    try:
        device = resolve_device(args.device)
        results = score_clips(
            clips, args.run, device=device, features=args.features,
            weights=WeightsSource(weights_dir=args.weights_dir, offline=args.offline),
            batch_segments=batch_segments(args, device.type), progress=not args.quiet, wait=wait,
            allow_other_recipe=args.allow_other_recipe, precision=args.precision,
        )
    except (ScoreError, RunError, CacheError, BackboneUnavailableError, ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    print(scores_table(results, args.run).note)
    print(format_scores(results))
    if args.out is not None:
        write_scores(args.out, results, args.run)
        print(f"wrote {args.out}", file=sys.stderr)
    return EXIT_FAILURES if any(r.error for r in results) else EXIT_OK
