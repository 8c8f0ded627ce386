"""`pipeline import-checkpoint`: the MCMoE authors' weights -> a run folder (pipeline/stages/import_checkpoint.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_OK, UsageError, existing_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "import-checkpoint",
        help="turn the MCMoE authors' released weights into a run folder for evaluate / score",
        description="Read a checkpoint released with the reference MCMoE code (a plain PyTorch state "
        "dict, loaded with torch.load(weights_only=True): nothing but tensors is unpickled), map every "
        "tensor by name and shape into this project's MCMoE, and write a run folder like `train` does. "
        "--features names the feature cache the run will evaluate or score (its modalities and sizes must "
        "match the checkpoint; its config becomes the run's extraction_config.json). The scores use the "
        "reference's batch-position prototype encoding by default (a compatibility mode: a video's score "
        "depends on its place in the batch). Exit 0: written; 2: the file or the options do not fit.",
    )
    parser.add_argument("checkpoint", type=existing_path, metavar="FILE", help="the released .pkl / .pt file")
    parser.add_argument("--format", choices=["mcmoe-reference"], required=True)
    parser.add_argument("--out", type=Path, required=True, help="run folder to create")
    parser.add_argument("--features", type=existing_path, required=True,
                        help="feature cache the run is for (e.g. one written by import-features)")
    parser.add_argument("--preset", choices=["rg", "fisv", "fs1000"], help="gives clip_num and the score range")
    parser.add_argument("--action", help="RG apparatus or score type of --preset")
    parser.add_argument("--clip-num", type=int, help="segments per video (default: the preset's)")
    parser.add_argument("--score-range", type=float, help="labels are divided by this (default: the preset's)")
    parser.add_argument("--heads", type=int, default=2,
                        help="attention heads of the encoder and decoder, which the tensors do not show "
                        "(the reference commands' --n_head; default: %(default)s)")
    parser.add_argument("--prototype-encoding", choices=["batch-position", "grade-index"], default="batch-position",
                        help="batch-position reproduces the reference's scores (they depend on batch order: "
                        "evaluate with --batch-size 32 on labels in the reference's test order); grade-index "
                        "is the paper's encoding, which these weights were not trained with (default: %(default)s)")
    parser.add_argument("--allow-other-recipe", action="store_true",
                        help="accept --features of another recipe than the released weights were trained on "
                        "(rg / fisv: pamfn; fs1000: skating-mixer); the run still records the weights' recipe")


def run(args: argparse.Namespace) -> int:
    from manifests.cache import CacheError
    from pipeline.stages.import_checkpoint import CheckpointImportError, import_reference_checkpoint
    from pipeline.presets import get_preset

    try:
        preset = get_preset(args.preset, args.action) if args.preset else None
        imported = import_reference_checkpoint(
            args.checkpoint, args.out, args.features, preset, args.clip_num, args.score_range,
            args.heads, args.prototype_encoding, args.allow_other_recipe,
        )
    except (CheckpointImportError, CacheError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    config = imported.config
    print(f"{args.checkpoint}: {imported.num_tensors} tensors mapped (sha256 {imported.sha256[:12]}); hidden "
          f"{config.hidden}, {config.encoder_layers} encoder / {config.decoder_layers} decoder layers, "
          f"{config.num_grades} grades, features {config.feature_dims}; prototype encoding {config.prototype_encoding}")
    print(f"run: {imported.run_dir}")
    print(f"next: pipeline evaluate --run {imported.run_dir} --labels TEST.csv --batch-size 32")
    return EXIT_OK
