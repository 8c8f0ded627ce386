"""`pipeline`: the command line. Thin on purpose: it parses options and wires the stages.

Exit codes: 0 success, 1 some input failed (the rest was still processed) or an I/O error, 2 usage error.

Building the parser imports nothing heavy (no torch, pandas, transformers): `--help` and usage errors
answer at once, and each stage imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command line or its inputs, reported without a traceback (exit 2)."""


# ============================================================================ extract


class GivenValue(argparse.Action):
    """Stores the value and notes the flag as given (`args.given`): a recipe refuses a given value other
    than its own, even one equal to the project's default."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


def add_extraction_options(parser: argparse.ArgumentParser) -> None:
    """Options that decide the features (the ExtractionConfig) and how they are computed. Each backbone
    setting's flag comes from its field in extractors/settings.py."""
    from extractors.config import (ARCH_SIZES, BACKBONE_MODES, DEFAULT_BACKBONES, FEATURE_DTYPES, PRECISIONS, PROTOCOLS,
                                   ExtractionConfig)
    from extractors.settings import backbone_names

    from extractors.recipes import PROJECT, RECIPES

    defaults = ExtractionConfig()
    group = parser.add_argument_group("what is extracted (recorded in config.json; its hash names the cache folder)")
    group.add_argument("--recipe", choices=list(RECIPES), default=PROJECT,
                       help="a named configuration the other flags start from; a flag set to another value than "
                       "the recipe's is refused (default: %(default)s). "
                       + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()))
    group.add_argument("--protocol", action=GivenValue, choices=PROTOCOLS, default=defaults.protocol,
                       help="rg (also Fis-V): non-overlapping --segment-frames windows; fs1000: "
                       "--window-seconds windows every --hop-seconds, --clip-frames clips averaged (default: %(default)s)")
    group.add_argument("--segment-frames", action=GivenValue, type=int, default=defaults.segment_frames,
                       help="frames per segment, rg protocol (default: %(default)s)")
    group.add_argument("--frame-stride", action=GivenValue, type=int, default=defaults.frame_stride,
                       help="use every N-th frame inside a segment, rg protocol (default: %(default)s)")
    group.add_argument("--window-seconds", action=GivenValue, type=float, default=defaults.window_seconds,
                       help="fs1000 window length in seconds (default: %(default)s)")
    group.add_argument("--hop-seconds", action=GivenValue, type=float, default=defaults.hop_seconds,
                       help="fs1000 window hop in seconds (default: %(default)s)")
    group.add_argument("--clip-frames", action=GivenValue, type=int, default=defaults.clip_frames,
                       help="fs1000 frames per backbone clip inside a window (default: %(default)s)")
    group.add_argument("--modalities", default=None,
                       help=f"comma-separated modalities to extract (default: the recipe's; {','.join(defaults.modalities)} "
                       "for the project's)")
    for modality, names in backbone_names().items():
        default = DEFAULT_BACKBONES.get(modality, names[0])
        note = " (default: raft on a GPU, farneback on a CPU)" if modality == "flow" else f" (default: {default})"
        group.add_argument(f"--{modality}", choices=list(names), default=None, help=f"{modality} backbone{note}")
    group.add_argument("--backbones", action=GivenValue, choices=BACKBONE_MODES, default=defaults.weights,
                       help="pretrained public weights, or the same architectures with seeded random "
                       "weights for smoke runs (marked random_weights everywhere) (default: %(default)s)")
    group.add_argument("--arch-size", action=GivenValue, choices=ARCH_SIZES, default=defaults.arch_size,
                       help="tiny shrinks every backbone (random weights only; tests and quick demos)")
    group.add_argument("--seed", action=GivenValue, type=int, default=defaults.seed,
                       help="seed of random-weight backbones (default: %(default)s)")
    group.add_argument("--feature-dtype", action=GivenValue, choices=FEATURE_DTYPES, default=defaults.feature_dtype,
                       help="dtype of the cached arrays (default: %(default)s)")
    group.add_argument("--precision", choices=["auto", *PRECISIONS], default=None,
                       help="what the backbones compute in: bf16 runs their matmuls and convolutions in bfloat16 "
                       "(features still written as float32), only where the hardware computes it natively (a CPU "
                       "with AVX512_BF16 or AMX, a recent GPU); auto: bf16 where native, else fp32; the "
                       "published-feature recipes fix fp32 (default: auto on a GPU, fp32 on a CPU)")
    add_backbone_setting_options(parser.add_argument_group(
        "each backbone's own settings (recorded and hashed only for the backbones extracted)"))
    run = parser.add_argument_group("how it is computed (not part of the cache key)")
    run.add_argument("--weights-dir", type=Path, default=None,
                     help="folder with pretrained weight files under their public names, searched first")
    run.add_argument("--offline", action="store_true",
                     help="never download (also implied by HF_HUB_OFFLINE=1); missing weights stop the command")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="auto uses a CUDA GPU when one is visible (default: %(default)s)")
    run.add_argument("--batch-segments", type=int, default=None,
                     help="segments per backbone call, filled across videos (default: 8 on a GPU; 1 on a CPU, "
                     "where a full-size segment takes seconds and larger calls only slow the progress bar)")


def add_backbone_setting_options(group: argparse._ArgumentGroup) -> None:
    """One flag per backbone setting (extractors/settings.py): --<name with dashes>, its choices, default
    and help from the field. Unset flags stay None: each backbone then keeps its own default."""
    from extractors.settings import setting_fields

    for name, (field, owners) in setting_fields().items():
        default, choices = field.default, field.metadata.get("choices")
        kind: dict = {"action": argparse.BooleanOptionalAction} if isinstance(default, bool) else \
            {"choices": list(choices)} if choices else {"type": type(default)}
        backbones = ", ".join(sorted({n for _, n in owners}, key=[n for _, n in owners].index))
        group.add_argument(f"--{name.replace('_', '-')}", default=None, **kind,
                           help=f"{backbones}: {field.metadata.get('help', '')} (default: {default}"
                           + (f"; {field.metadata['cpu_bf16']} for bf16 on a CPU)" if field.metadata.get("cpu_bf16") else ")"))


def check_extraction_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The --modalities, once every flag that decides the features but not the backbones is checked:
    usage errors before the device is resolved (torch) or Ray is started."""
    from extractors.config import ExtractionConfig
    from extractors.settings import backbone_names

    from extractors.recipes import recipe

    given = args.modalities or ",".join(recipe(args.recipe).backbones or ExtractionConfig.modalities)
    modalities = tuple(m.strip() for m in given.split(",") if m.strip())
    known = backbone_names()
    unknown = [m for m in modalities if m not in known]
    if not modalities or unknown:
        raise UsageError(f"--modalities: unknown {unknown or 'empty list'}; known: {sorted(known)}")
    try:
        ExtractionConfig.check_segmentation(args.protocol, args.backbones, args.arch_size, args.segment_frames,
                                            args.frame_stride, args.clip_frames, args.feature_dtype)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return modalities


def extraction_config_from_args(args: argparse.Namespace, device_type: str) -> "ExtractionConfig":
    """The ExtractionConfig the flags describe; `device_type` ("cpu"/"cuda") picks the default flow backbone."""
    from extractors.config import CPU_FLOW_BACKBONE, DEFAULT_BACKBONES, ExtractionConfig
    from extractors.recipes import PROJECT
    from extractors.settings import backbone_names, setting_fields, settings_from_values

    modalities = check_extraction_flags(args)
    backbones = {}
    for modality in modalities:
        chosen = getattr(args, modality, None)
        if chosen is None:
            chosen = DEFAULT_BACKBONES.get(modality, backbone_names()[modality][0])
            if modality == "flow" and device_type != "cuda":
                chosen = CPU_FLOW_BACKBONE
        backbones[modality] = chosen
    precision = precision_from_args(args, device_type)
    if args.recipe != PROJECT:
        return recipe_config_from_args(args, backbones, precision)
    values = {name: getattr(args, name) for name in setting_fields() if getattr(args, name, None) is not None}
    try:
        return ExtractionConfig(
            protocol=args.protocol, segment_frames=args.segment_frames, frame_stride=args.frame_stride,
            window_seconds=args.window_seconds, hop_seconds=args.hop_seconds, clip_frames=args.clip_frames,
            modalities=modalities, backbones=backbones, weights=args.backbones, arch_size=args.arch_size,
            seed=args.seed, feature_dtype=args.feature_dtype, precision=precision,
            settings={m: settings_from_values(m, backbones[m], values, precision, device_type) for m in modalities},
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def precision_from_args(args: argparse.Namespace, device_type: str) -> str:
    """--precision as the config records it (pipeline/devices.py resolve_precision); by default auto on a
    GPU and fp32 on a CPU; auto under a recipe is the recipe's."""
    import torch

    from extractors.recipes import recipe
    from pipeline.devices import resolve_precision

    choice = args.precision or ("auto" if device_type == "cuda" else "fp32")
    try:
        return resolve_precision(choice, torch.device(device_type), fixed=recipe(args.recipe).config.get("precision"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# The flags that set ExtractionConfig fields of the same name (--backbones sets `weights`).
CONFIG_FLAGS = {"protocol": "protocol", "segment_frames": "segment_frames", "frame_stride": "frame_stride",
                "window_seconds": "window_seconds", "hop_seconds": "hop_seconds", "clip_frames": "clip_frames",
                "backbones": "weights", "arch_size": "arch_size", "seed": "seed", "feature_dtype": "feature_dtype"}


def recipe_config_from_args(args: argparse.Namespace, backbones: dict[str, str], precision: str) -> "ExtractionConfig":
    """`--recipe NAME`: the recipe's configuration, with the flags the user gave (check_recipe refuses
    one that differs from the recipe); `backbones` are the project's choices, used for the modalities
    the recipe does not name; `precision` the resolved --precision (taken only when the flag was given)."""
    from extractors.config import ExtractionConfig
    from extractors.recipes import recipe
    from extractors.settings import setting_fields, settings_class

    given = getattr(args, "given", set())
    fields = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items() if flag in given}
    if args.precision is not None:
        fields["precision"] = precision
    named = recipe(args.recipe).backbones
    backbones = {m: getattr(args, m) or named.get(m, chosen) for m, chosen in backbones.items()}
    values = {name: getattr(args, name) for name in setting_fields() if getattr(args, name, None) is not None}
    try:
        settings = {m: {f.name: values[f.name] for f in dataclasses.fields(settings_class(m, name)) if f.name in values}
                    for m, name in backbones.items()}
        return ExtractionConfig.from_recipe(args.recipe, modalities=tuple(backbones), backbones=backbones,
                                            settings=settings, **fields)
    except ValueError as exc:
        raise UsageError(f"{exc} (--recipe {args.recipe} sets it; leave the flag out, or use --recipe project)") from None


def _add_extract(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "extract",
        help="decode videos and cache one feature row per segment per modality",
        description="Decode every video under --videos (recursively; mp4 mkv avi mov webm) into "
        "time-aligned segments, run frozen backbones, and cache the features under "
        "OUT/<config-hash>/ with a manifest. Rerunning skips finished videos; an interrupted run "
        "is finished by running it again. Exit 0: all videos done; 1: some failed (see the "
        "summary and manifest.csv); 2: usage error.",
    )
    parser.add_argument("--videos", type=existing_path, required=True, help="folder of videos, or one video file")
    parser.add_argument("--out", type=folder_path, required=True, help="cache folder (one sub-folder per configuration)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="retry videos that failed before even if their file is unchanged")
    parser.add_argument("--verify", action="store_true",
                        help="check finished videos fully: rehash each video file and each array against its "
                        "record and look for NaN/inf (default: sizes, shapes, file size + mtime); redo what fails")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--ray", metavar="auto|local|ADDRESS",
                        help="spread the videos over Ray workers that each hold the backbones once: auto (a "
                        "running cluster, else a local instance), local, or a cluster address such as "
                        "ray://head:10001; same cache, resume and exit codes. Paths must be the same on every node")
    parser.add_argument("--ray-workers", type=int, metavar="N",
                        help="with --ray: number of workers (default: one per GPU, else one per 4 CPU cores)")
    add_extraction_options(parser)


def _run_extract(args: argparse.Namespace) -> int:
    check_extraction_flags(args)  # usage errors before any heavy import
    batch_segments(args, "cpu")
    if args.ray is not None:
        return _run_extract_ray(args)
    if args.ray_workers is not None:
        raise UsageError("--ray-workers needs --ray")
    from extractors.base import BackboneUnavailableError, WeightsSource
    from manifests.cache import CacheError
    from pipeline.devices import resolve_device
    from pipeline.extraction.entry import cache_folder, extract_into

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    config = extraction_config_from_args(args, device.type)
    sources = video_sources(args.videos)
    weights = WeightsSource(weights_dir=args.weights_dir, offline=args.offline)
    config = identified_config(config, weights)
    if config.random_weights:
        print("NOTE: random-weight backbones: these features are for smoke tests, not for scoring.", file=sys.stderr)
    print(f"extracting {len(sources)} videos into {cache_folder(args.out, config)} on {device}", file=sys.stderr)
    try:
        summary, cache = extract_into(
            args.out, config, sources, device=device, weights=weights,
            batch_segments=batch_segments(args, device.type), retry_failed=args.retry_failed,
            verify=args.verify, progress=not args.quiet,
        )
    except (BackboneUnavailableError, CacheError) as exc:
        raise UsageError(str(exc)) from None
    print_extract_summary(summary, cache)
    return EXIT_FAILURES if summary.failed else EXIT_OK


def _run_extract_ray(args: argparse.Namespace) -> int:
    """`extract --ray`: the same stage on Ray actors (pipeline/extraction/on_ray.py)."""
    from extractors.base import WeightsSource
    from pipeline.extraction.entry import cache_folder
    from pipeline.extraction.on_ray import WorkerSetupError, extract_on_ray, plan_workers
    from pipeline.ray_session import RaySetupError, ray_session

    sources = video_sources(args.videos)
    try:
        with ray_session(args.ray) as resources:
            plan = plan_workers(resources, args.device, args.ray_workers)
            config = extraction_config_from_args(args, plan.device)  # flow default follows the workers
            config = identified_config(config, WeightsSource(weights_dir=args.weights_dir, offline=args.offline))
            if config.random_weights:
                print("NOTE: random-weight backbones: these features are for smoke tests, not for scoring.", file=sys.stderr)
            print(f"extracting {len(sources)} videos into {cache_folder(args.out, config)} with Ray: "
                  f"{plan.describe()}", file=sys.stderr)
            result = extract_on_ray(
                sources, args.out, config, device=args.device, workers=args.ray_workers,
                weights=WeightsSource(weights_dir=args.weights_dir, offline=args.offline),
                batch_segments=batch_segments(args, plan.device), retry_failed=args.retry_failed,
                progress=not args.quiet, verify=args.verify,
            )
    except (RaySetupError, WorkerSetupError) as exc:
        raise UsageError(str(exc)) from None
    print_extract_summary(result.summary, result.cache)
    if result.workers_lost or result.retried:
        print(f"{result.workers_lost} worker(s) lost ({result.last_error}); {len(result.retried)} video(s) retried "
              f"after a lost worker: {', '.join(result.retried) or 'none'}", file=sys.stderr)
    if result.unfinished:
        print(f"{len(result.unfinished)} video(s) were not processed because every worker was lost; "
              "rerun the command to finish them", file=sys.stderr)
    return EXIT_FAILURES if result.summary.failed or result.unfinished else EXIT_OK


def identified_config(config: "ExtractionConfig", weights) -> "ExtractionConfig":
    """`config` with its pretrained weights files identified by content (the cache folder follows them);
    a file that is not the public one its name says it is gets a WARNING line (config.json records it too)."""
    from extractors.base import BackboneUnavailableError, identify_weights, weights_warnings

    try:
        config, described = identify_weights(config, weights)
    except BackboneUnavailableError as exc:
        raise UsageError(str(exc)) from None
    for line in weights_warnings(described):
        print(f"WARNING: {line}", file=sys.stderr)
    return config


def batch_segments(args: argparse.Namespace, device_type: str) -> int:
    """--batch-segments, by default 8 on a GPU and 1 on a CPU (the bar moves once per segment)."""
    if args.batch_segments is not None and args.batch_segments < 1:
        raise UsageError(f"--batch-segments must be >= 1, got {args.batch_segments}")
    return args.batch_segments or (8 if device_type == "cuda" else 1)


def video_sources(path: Path) -> list:
    """--videos: every video under a folder, or one video file (its id is the file name without extension).

    Paths are made absolute, so the manifest's `path` column does not depend on where extract ran."""
    from pipeline.videos import VIDEO_EXTENSIONS, VideoSource, discover_videos

    path = path.expanduser().absolute()
    if path.is_file():
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            raise UsageError(f"--videos {path}: neither a folder nor a video file ({', '.join(VIDEO_EXTENSIONS)})")
        return [VideoSource(path.stem, path)]
    sources = discover_videos(path)
    if not sources:
        raise UsageError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {path}")
    return sources


def print_extract_summary(summary, cache) -> None:
    table = summary.table()
    if len(table):
        print(table.to_string(index=False))
    failed = len(summary.failed)
    print(
        f"\n{len(summary.records) - failed} extracted, {len(summary.skipped)} already done, "
        f"{failed} failed, {len(summary.claimed_elsewhere)} left to another running process. "
        f"Manifest: {cache.root / 'manifest.csv'}"
    )


# ============================================================================ train / evaluate / import-features


def _add_train(sub: argparse._SubParsersAction) -> None:
    from models import REGISTRY

    parser = sub.add_parser(
        "train",
        help="train a scorer on cached features (MCMoE or LIMSSR)",
        description="Train on a feature cache and a labels CSV (video_id,score[,split]). The best epoch "
        "is chosen on a validation split carved from the training data (--val-fraction, or split=val "
        "rows); rows with split=test are never used. Values come from the model's defaults, then "
        "--preset, then the flags. Writes a run folder: run.json, model_config.json, "
        "extraction_config.json, best.safetensors + best.json, train_log.csv, last/ (resume state). "
        "Exit 0: trained; 1: stopped by a non-finite loss (the last good state is kept); 2: usage error.",
    )
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--features", type=Path, help="feature cache (its --out folder or one configuration folder)")
    io.add_argument("--labels", type=Path, help="labels CSV: video_id,score and optionally split (train/val/test)")
    io.add_argument("--out", type=Path, required=True, help="run folder to create (or continue with --resume)")
    io.add_argument("--model", choices=sorted(REGISTRY), help="scorer (default: mcmoe)")
    io.add_argument("--preset", choices=["rg", "fisv", "fs1000"],
                    help="published settings of a benchmark (clip_num, score range, epochs, lr, ...)")
    io.add_argument("--action", help="RG apparatus (Ball, Clubs, Hoop, Ribbon) or score type (TES, PCS, ...) of --preset")
    opt = parser.add_argument_group("optimisation (default: the model's, then the preset's)")
    opt.add_argument("--epochs", type=int)
    opt.add_argument("--lr", type=float, help="peak learning rate")
    opt.add_argument("--batch-size", type=int)
    opt.add_argument("--optimizer", choices=["adam", "adamw"])
    opt.add_argument("--optimizer-implementation", choices=["fused", "foreach", "torch-default"],
                     help="how Adam's update runs (default: torch-default, torch's own choice; fused is "
                     "faster, its weights differ by float rounding)")
    opt.add_argument("--dropout-masks", choices=["uniform", "bernoulli"],
                     help="how dropout draws its masks on a CPU (default: uniform, one uniform draw per "
                     "element compared with the dropout rate, cheaper to draw; bernoulli: torch's own masks, "
                     "which a run recorded without this setting resumes with; same distribution)")
    opt.add_argument("--precision", choices=["fp32", "bf16"],
                     help="arithmetic of the forward pass and loss (default: fp32); bf16 = bfloat16 autocast "
                     "with float32 weights, optimiser state and loss terms, refused on a CPU without native "
                     "bfloat16 (AVX512-BF16 or AMX). Recorded; a resumed run keeps it. Evaluation and scoring "
                     "run in float32")
    opt.add_argument("--weight-decay", type=float)
    opt.add_argument("--warmup-epochs", type=int, help="linear warm-up epochs before the cosine decay")
    opt.add_argument("--min-lr-ratio", type=float, help="the cosine decays to this fraction of --lr")
    opt.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)")
    opt.add_argument("--mask-policy", choices=["incomplete", "any", "incomplete-per-batch", "any-per-batch"],
                     help="training availability masks: incomplete = a non-empty subset that is never the "
                     "full set, any = every non-empty subset, drawn per sample; the -per-batch forms draw one "
                     "subset for the whole batch, as the reference code does (MCMoE's presets: "
                     "incomplete-per-batch)")
    dat = parser.add_argument_group("data")
    dat.add_argument("--clip-num", type=int, help="segments per sample: random crop in training, centre crop "
                     "otherwise, zero padding when shorter (default: preset, else the longest training video)")
    dat.add_argument("--score-range", type=float, help="labels are divided by this (default: preset, else the "
                     "largest training label; recorded in run.json)")
    dat.add_argument("--val-fraction", type=float, help="validation share of the training rows when the labels "
                     "have no split=val rows (default: 0.2; 0 keeps the last epoch)")
    dat.add_argument("--seed", type=int, help="seeds initialisation, splits, crops and masks (default: 0)")
    dat.add_argument("--train-missing", metavar="MOD=RATE,...",
                     help="simulate incomplete training data: hide each modality from that share of the "
                     "training/validation videos, drawn once with --seed (e.g. audio=0.5,flow=0.3)")
    dat.add_argument("--ignore-unlabelled", action="store_true", default=None,
                     help="allow cache videos that the labels file does not mention")
    mod = parser.add_argument_group("model settings (default: the model's, then the preset's)")
    mod.add_argument("--hidden", type=int, help="MCMoE hidden size d")
    mod.add_argument("--dropout", type=float)
    mod.add_argument("--alpha", type=float, help="weight of the triplet / diversity loss")
    mod.add_argument("--position-encoding", action=argparse.BooleanOptionalAction, default=None,
                     help="MCMoE sinusoidal position encoding in the STEM")
    mod.add_argument("--llm", help="LIMSSR: hub id or local folder of the causal LLM")
    mod.add_argument("--llm-dtype", choices=["float32", "bfloat16"],
                     help="LIMSSR: dtype of the LLM (bfloat16 on a GPU halves its memory; projections and heads "
                     "stay float32; default: bfloat16 when training on a GPU, float32 on a CPU)")
    mod.add_argument("--limssr-variant", choices=["project", "reference"],
                     help="LIMSSR: reference = the authors' model (default: whole embedding matrix and LM head "
                     "trainable, LoRA rank 16, their prompt and heads, one mask per batch), project = this "
                     "project's design (only the new marker rows trained, rank 8, per-sample masks); "
                     "docs/design/limssr.md")
    mod.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                     help="LIMSSR: recompute the LLM's activations during the backward pass (less memory, slower steps)")
    mod.add_argument("--ablation", action="append", default=[], metavar="NAME",
                     help="MCMoE ablation: baseline, no-stem, no-agmg, no-moe, no-cfm, no-recon, no-align, "
                     "no-div (repeatable)")
    mod.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                     help="any other model-config field, VALUE as JSON (repeatable)")
    run = parser.add_argument_group("running")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out exactly where its last finished epoch left it")
    run.add_argument("--stop-after-epochs", type=int, metavar="N",
                     help="stop after N epochs of this invocation (continue later with --resume)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_train(args: argparse.Namespace) -> int:
    from manifests.cache import CacheError
    from pipeline import data
    from pipeline.stages import train as training
    from pipeline import train_config
    from pipeline.labels import LabelError

    overrides = {k: getattr(args, k) for k in (
        "epochs", "lr", "batch_size", "optimizer", "optimizer_implementation", "dropout_masks", "precision", "weight_decay",
        "warmup_epochs",
        "min_lr_ratio", "grad_clip", "mask_policy", "clip_num", "score_range", "val_fraction", "seed", "ignore_unlabelled",
    )}
    try:
        if args.train_missing is not None:
            overrides["train_missing"] = data.parse_missing_rates(args.train_missing)
        model_flags = {k: getattr(args, k) for k in train_config.MODEL_FLAGS}
        given = {k: getattr(args, k) for k in ("features", "labels", "model", "preset", "action")}
        config, preset = train_config.command_config(
            args.out, given, overrides, model_flags, args.ablation, args.model_option, args.resume
        )
        result = training.train(
            config, preset, resume=args.resume, device=args.device, progress=not args.quiet,
            stop_after_epochs=args.stop_after_epochs,
        )
    except training.NonFiniteLossError as exc:
        print(f"pipeline train: {exc}", file=sys.stderr)
        return EXIT_FAILURES
    except (LabelError, CacheError, train_config.TrainError, ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    if result.finished:
        print(f"run: {result.run_dir}  best epoch: {result.best.get('epoch')}  "
              f"val rho: {result.best.get('val_rho')}  val MSE: {result.best.get('val_mse')}")
        print(f"next: pipeline evaluate --run {result.run_dir} --labels TEST.csv")
    else:
        print(f"run: {result.run_dir}  stopped after epoch {result.epochs_done}; continue with "
              f"pipeline train --out {result.run_dir} --resume")
    return EXIT_OK


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
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


def _run_evaluate(args: argparse.Namespace) -> int:
    from pipeline.stages.evaluate import EvaluateError, evaluate_labels

    try:
        evaluate_labels(args.run, args.labels, features=args.features, split=args.split, out=args.out,
                        plot=args.plot, device=args.device, batch_size=args.batch_size,
                        allow_other_recipe=args.allow_other_recipe)
    except EvaluateError as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


def _add_import_features(sub: argparse._SubParsersAction) -> None:
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


def _run_import_features(args: argparse.Namespace) -> int:
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


def _add_import_checkpoint(sub: argparse._SubParsersAction) -> None:
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

def _run_import_checkpoint(args: argparse.Namespace) -> int:
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


# ============================================================================ reproduce


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
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


def _run_reproduce(args: argparse.Namespace) -> int:
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


# ============================================================================ score / demo


def _add_score(sub: argparse._SubParsersAction) -> None:
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


def _run_score(args: argparse.Namespace) -> int:
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


def _add_demo(sub: argparse._SubParsersAction) -> None:
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


def _run_demo(args: argparse.Namespace) -> int:
    from pipeline.stages.demo import DemoSettings, run_demo

    if args.train_clips < 4 or args.val_clips < 2 or args.test_clips < 3 or args.steps < 1 or args.training_seeds < 1:
        raise UsageError("the demo needs --train-clips >= 4, --val-clips >= 2, --test-clips >= 3, --steps >= 1 "
                         "and --training-seeds >= 1")
    settings = DemoSettings(train_clips=args.train_clips, val_clips=args.val_clips, test_clips=args.test_clips,
                            steps=args.steps, training_seeds=args.training_seeds, arch_size=args.arch_size, seed=args.seed)
    return run_demo(args.out, settings, device=args.device, progress=not args.quiet, pipeline=main).code


# ============================================================================ wiring

COMMANDS = {
    "extract": (_add_extract, _run_extract),
    "train": (_add_train, _run_train),
    "evaluate": (_add_evaluate, _run_evaluate),
    "import-features": (_add_import_features, _run_import_features),
    "import-checkpoint": (_add_import_checkpoint, _run_import_checkpoint),
    "reproduce": (_add_reproduce, _run_reproduce),
    "score": (_add_score, _run_score),
    "demo": (_add_demo, _run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Turn sports and exercise videos into judge-quality scores, "
        "robust to missing modalities (RGB, optical flow, audio).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, run = COMMANDS[args.command]
    try:
        return run(args)
    except UsageError as exc:
        print(f"pipeline {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full disk, a read-only or vanished folder: every write is atomic, so say what is kept
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pipeline {args.command}: I/O error: {where}{exc.strerror or exc}; {kept_after_io_error(args)}",
              file=sys.stderr)
        return EXIT_FAILURES
    except KeyboardInterrupt:
        print(f"pipeline {args.command}: interrupted; finished work is kept, rerun to continue", file=sys.stderr)
        return 130


def kept_after_io_error(args: argparse.Namespace) -> str:
    """What an interrupted command leaves behind (files are written whole or not at all)."""
    if args.command == "train":
        from manifests.run import RunDir

        folder = RunDir(args.out)
        state = folder.resume_folder()
        if state is None:
            return f"no epoch had finished, nothing in {args.out} counts as done; rerun to start again"
        epoch = folder.read_resume_state(state).get("epoch")
        return (f"the state after epoch {epoch} is kept in {state}; continue with "
                f"`pipeline train --out {args.out} --resume` once there is room")
    return {
        "extract": "videos finished before it are kept (a video counts as done only once its record is "
                   "written); rerun the same command to continue",
        "score": "clips extracted before it are kept and reused when the command is rerun",
        "evaluate": "the run is unchanged and no result file was half-written; rerun to write the results",
        "reproduce": "finished runs and evaluations are kept; rerun the same command to continue",
        "import-features": "sets imported before it are complete; rerun to finish",
    }.get(args.command, "files written before it are complete; rerun to continue")


def folder_path(text: str) -> Path:
    """argparse type for an output folder: it may not exist yet, but must not be a file."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    return path


def existing_path(text: str) -> Path:
    """argparse type for a path that must exist."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist")
    return path


if __name__ == "__main__":
    sys.exit(main())
