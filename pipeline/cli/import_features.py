"""`pipeline import-features`: the published feature sets -> feature caches + labels (pipeline/stages/importers.py)."""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_OK, UsageError, existing_path, folder_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "import-features",
        help="convert the published RG / Fis-V / FS1000 feature sets into a feature cache + labels",
        description="Convert released features into this project's cache, manifest and labels, so "
        "`train` and `evaluate` run on them unchanged. --format pamfn (RG, Fis-V): "
        "{Name}_rgb_VST.npy, {Name}_flow_I3D.npy, {Name}_audio_AST.npy dictionaries and train.txt / "
        "test.txt; one cache configuration per RG apparatus. --format skating-mixer (FS1000): one .npy "
        "per video in three folders and label files `name TES PCS SS TR PE CO IN pcs_factor`. Labels "
        "are written as <cache>/labels/<target>.csv with split train/test. SECURITY: the pamfn "
        "dictionaries are pickled Python objects, and reading them unpickles them (numpy "
        "allow_pickle=True), which can run code hidden in a file: import only files from a source you "
        "trust. This command is the only place the project unpickles anything.",
    )
    parser.add_argument("--format", choices=["pamfn", "skating-mixer"], required=True)
    parser.add_argument("--root", type=existing_path, required=True, help="folder of the released features")
    parser.add_argument("--out", type=folder_path, required=True, help="cache folder to write")
    parser.add_argument("--action", help="pamfn: import only this set (Ball, Clubs, Hoop, Ribbon or FISV)")
    parser.add_argument("--labels-dir", type=existing_path,
                        help="pamfn: folder of train.txt / test.txt (default: --root, then its parent)")
    for modality, folder in (("rgb", "output_feature_fs1000_new"), ("flow", "i3d_avg_clip8_5s_fs1000"),
                             ("audio", "ast_feature_fs1000_new")):
        parser.add_argument(f"--{modality}-dir", help=f"skating-mixer: {modality} folder under --root (default: {folder})")
    parser.add_argument("--train-labels", help="skating-mixer: training label file (default: train_fs1000_new.txt)")
    parser.add_argument("--test-labels", help="skating-mixer: test label file (default: val_fs1000_new.txt)")


def run(args: argparse.Namespace) -> int:
    from manifests.cache import CacheError
    from pipeline.stages import importers

    try:
        if args.format == "pamfn":
            imported = importers.import_pamfn(args.root, args.out, args.action, args.labels_dir)
        else:
            dirs = {m: getattr(args, f"{m}_dir") for m in ("rgb", "flow", "audio") if getattr(args, f"{m}_dir")}
            files = {s: getattr(args, f"{s}_labels") for s in ("train", "test") if getattr(args, f"{s}_labels")}
            imported = importers.import_skating_mixer(args.root, args.out, dirs, files)
    except (importers.FeatureImportError, CacheError) as exc:
        raise UsageError(str(exc)) from None
    sources = {item.source for item in imported if item.source is not None}
    for source in sorted(sources):
        print(f"features read from {source}" + ("" if source == args.root else f" (found in --root {args.root})"))
    for item in imported:
        print(f"{item.name}: {item.num_videos} videos -> {item.cache.root}")
        for warning in item.warnings:
            print(f"  warning: {warning}", file=sys.stderr)
        dataset = item.name.split("/")[0]
        for target, path in item.labels.items():
            print(f"  labels {target}: {path}")
            print(f"    pipeline train --features {item.cache.root} --labels {path} "
                  f"--out runs/{dataset}-{target.lower()} --preset {dataset} --action {target}")
    return EXIT_OK
