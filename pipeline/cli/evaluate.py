"""`pipeline evaluate`: a run's Table 1 row on labelled videos (pipeline/stages/evaluate.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_OK, UsageError, existing_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="the paper's Table 1 row for a run: rho / MSE per modality combination + Average",
        description="Evaluate a run's chosen checkpoint (selected on validation, never on these labels) "
        "on every non-empty modality combination: Spearman rho and MSE on the original score scale, "
        "and the Average over the incomplete ones (Fisher-z mean of rho, mean of MSE). Prints the "
        "table and writes it as CSV and JSON, with per-video predictions.",
    )
    parser.add_argument("--run", type=existing_path, required=True, help="run folder made by `pipeline train`")
    parser.add_argument("--labels", type=existing_path, required=True, help="labels CSV of the test videos")
    parser.add_argument("--features", type=Path,
                        help="feature cache (default: the one the run was trained on; another must be made the same way)")
    parser.add_argument("--split", choices=["test", "all"], default="test",
                        help="with a split column, evaluate its test rows (default) or every row")
    parser.add_argument("--out", type=Path,
                        help="write OUT.csv, OUT.json and OUT.predictions.csv (a .csv/.json suffix is "
                        "dropped; default: RUN/evaluation/eval-<labels name>)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw predicted vs true scores per setting")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--allow-other-recipe", action="store_true",
                        help="use features of another recipe than the run's weights were trained on (refused by "
                        "default: such scores mean nothing; see extract --recipe)")


def run(args: argparse.Namespace) -> int:
    from pipeline.stages.evaluate import EvaluateError, evaluate_labels

    try:
        evaluate_labels(args.run, args.labels, features=args.features, split=args.split, out=args.out,
                        plot=args.plot, device=args.device, batch_size=args.batch_size,
                        allow_other_recipe=args.allow_other_recipe)
    except EvaluateError as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK
