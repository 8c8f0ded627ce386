"""`pipeline extract`: videos -> feature cache (pipeline/extraction/entry.py, on Ray extraction/on_ray.py),
and the flags that decide the features (the ExtractionConfig), which `--recipe` may fix."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .common import EXIT_FAILURES, EXIT_OK, UsageError, batch_segments, existing_path, folder_path


def add_parser(sub: argparse._SubParsersAction) -> None:
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


def run(args: argparse.Namespace) -> int:
    check_extraction_flags(args)  # usage errors before any heavy import
    batch_segments(args, "cpu")
    if args.ray is not None:
        return run_on_ray(args)
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


def run_on_ray(args: argparse.Namespace) -> int:
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


# ============================================================================ the flags that decide the features


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
