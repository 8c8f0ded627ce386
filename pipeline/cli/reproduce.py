"""`pipeline reproduce`: a benchmark's Table 1 block, every action x seed (pipeline/stages/reproduce.py)."""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_FAILURES, EXIT_OK, UsageError, existing_path, folder_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from models import REGISTRY

    parser = sub.add_parser(
        "reproduce",
        help="a benchmark's Table 1 block: every action / score type x every seed, trained on Ray",
        description="Train every action / score type of --preset once per seed (seeds 0..N-1), each as a "
        "Ray task and a normal run folder OUT/<action>/seed<k>/, evaluate each chosen checkpoint (selected "
        "on validation) on the test rows, and aggregate rho / MSE per modality setting as mean +/- std over "
        "seeds into OUT/table.csv, table.json, table.md and rho.png. Labels: <action>.csv (video_id,score,"
        "split) in --labels-dir, or by default each cache's labels/ folder as `pipeline import-features` "
        "writes it. Finished runs are not retrained; interrupted ones resume. Exit 0: every run done; "
        "1: some runs failed (the table covers the rest); 2: usage error.",
    )
    parser.add_argument("--preset", choices=["rg", "fisv", "fs1000"], required=True)
    parser.add_argument("--features", type=existing_path, required=True,
                        help="a feature cache, or a folder of caches (e.g. import-features --out: one per RG apparatus)")
    parser.add_argument("--labels-dir", type=existing_path,
                        help="folder of <action>.csv files (default: labels/ inside each action's cache)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per action (default: %(default)s)")
    parser.add_argument("--out", type=folder_path, required=True, help="results folder")
    parser.add_argument("--actions", help="comma-separated subset of the preset's actions / score types (default: all)")
    parser.add_argument("--model", choices=sorted(REGISTRY), default="mcmoe", help="(default: %(default)s)")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs (smoke runs)")
    parser.add_argument("--batch-size", type=int, help="override the preset's batch size")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="model-config field, VALUE as JSON (repeatable; e.g. hidden=64, llm=DIR)")
    parser.add_argument("--ray", default="auto", metavar="auto|local|none|ADDRESS",
                        help="auto (a running cluster, else a local instance), local, a cluster address, or "
                        "none to train one run after another in this process (default: %(default)s)")
    parser.add_argument("--gpus-per-run", type=float,
                        help="GPU share of each run (default with GPUs: the model's, 0.25 for mcmoe, 1 for limssr; else 0)")
    parser.add_argument("--cpus-per-run", type=float, default=1.0, help="CPU cores per run (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from manifests.cache import CacheError
    from pipeline.labels import LabelError
    from pipeline.ray_session import RaySetupError
    from pipeline.stages.reproduce import ReproduceError, reproduce
    from pipeline.train_config import model_options_from_flags

    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    actions = [a.strip() for a in args.actions.split(",") if a.strip()] if args.actions else None
    try:
        options = model_options_from_flags(args.model, {}, [], args.model_option)
        result = reproduce(
            args.preset, args.features, args.out, list(range(args.seeds)), labels_dir=args.labels_dir,
            actions=actions, model=args.model, overrides={"epochs": args.epochs, "batch_size": args.batch_size},
            model_options=options, ray_address=None if args.ray == "none" else args.ray,
            gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run, device=args.device,
            progress=not args.quiet,
        )
    except (ReproduceError, RaySetupError, LabelError, CacheError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    for outcome in result.failed:
        print(f"FAILED {outcome['action']} seed {outcome['seed']} ({outcome['run_dir']}): {outcome['error']}", file=sys.stderr)
    print(result.markdown())
    print("wrote " + ", ".join(str(p) for p in result.paths), file=sys.stderr)
    return EXIT_FAILURES if result.failed else EXIT_OK
