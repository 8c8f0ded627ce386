"""`pipeline`: the command line. Thin on purpose: it parses options and wires the stages.

Exit codes: 0 success, 1 some input failed (the rest was still processed), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command line or its inputs, reported without a traceback (exit 2)."""


# ============================================================================ extract


def add_extraction_options(parser: argparse.ArgumentParser) -> None:
    """Options that decide the features (the ExtractionConfig) and how they are computed."""
    from extractors import available_backbones
    from extractors.config import DEFAULT_BACKBONES, ExtractionConfig

    defaults = ExtractionConfig()
    group = parser.add_argument_group("what is extracted (recorded in config.json; its hash names the cache folder)")
    group.add_argument("--protocol", choices=["rg", "fs1000"], default=defaults.protocol,
                       help="rg (also Fis-V): non-overlapping --segment-frames windows; fs1000: "
                       "--window-seconds windows every --hop-seconds, --clip-frames clips averaged (default: %(default)s)")
    group.add_argument("--segment-frames", type=int, default=defaults.segment_frames,
                       help="frames per segment, rg protocol (default: %(default)s)")
    group.add_argument("--frame-stride", type=int, default=defaults.frame_stride,
                       help="use every N-th frame inside a segment, rg protocol (default: %(default)s)")
    group.add_argument("--window-seconds", type=float, default=defaults.window_seconds,
                       help="fs1000 window length in seconds (default: %(default)s)")
    group.add_argument("--hop-seconds", type=float, default=defaults.hop_seconds,
                       help="fs1000 window hop in seconds (default: %(default)s)")
    group.add_argument("--clip-frames", type=int, default=defaults.clip_frames,
                       help="fs1000 frames per backbone clip inside a window (default: %(default)s)")
    group.add_argument("--modalities", default=",".join(defaults.modalities),
                       help="comma-separated modalities to extract (default: %(default)s)")
    for modality, names in available_backbones().items():
        default = DEFAULT_BACKBONES.get(modality, names[0])
        note = " (default: raft on a GPU, farneback on a CPU)" if modality == "flow" else f" (default: {default})"
        group.add_argument(f"--{modality}", choices=names, default=None, help=f"{modality} backbone{note}")
    group.add_argument("--backbones", choices=["pretrained", "random"], default="pretrained",
                       help="pretrained public weights, or the same architectures with seeded random "
                       "weights for smoke runs (marked random_weights everywhere) (default: %(default)s)")
    group.add_argument("--arch-size", choices=["full", "tiny"], default="full",
                       help="tiny shrinks every backbone (random weights only; tests and quick demos)")
    group.add_argument("--seed", type=int, default=0, help="seed of random-weight backbones (default: 0)")
    group.add_argument("--feature-dtype", choices=["float32", "float16"], default="float32",
                       help="dtype of the cached arrays (default: %(default)s)")
    run = parser.add_argument_group("how it is computed (not part of the cache key)")
    run.add_argument("--weights-dir", type=Path, default=None,
                     help="folder with pretrained weight files under their public names, searched first")
    run.add_argument("--offline", action="store_true",
                     help="never download (also implied by HF_HUB_OFFLINE=1); missing weights stop the command")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="auto uses a CUDA GPU when one is visible (default: %(default)s)")
    run.add_argument("--batch-segments", type=int, default=8,
                     help="segments per backbone call, filled across videos (default: %(default)s)")


def extraction_config_from_args(args: argparse.Namespace, device) -> "ExtractionConfig":
    from extractors import available_backbones
    from extractors.config import CPU_FLOW_BACKBONE, DEFAULT_BACKBONES, ExtractionConfig

    modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    known = available_backbones()
    unknown = [m for m in modalities if m not in known]
    if not modalities or unknown:
        raise UsageError(f"--modalities: unknown {unknown or 'empty list'}; known: {sorted(known)}")
    backbones = {}
    for modality in modalities:
        chosen = getattr(args, modality, None)
        if chosen is None:
            chosen = DEFAULT_BACKBONES.get(modality, known[modality][0])
            if modality == "flow" and device.type != "cuda":
                chosen = CPU_FLOW_BACKBONE
        backbones[modality] = chosen
    try:
        return ExtractionConfig(
            protocol=args.protocol, segment_frames=args.segment_frames, frame_stride=args.frame_stride,
            window_seconds=args.window_seconds, hop_seconds=args.hop_seconds, clip_frames=args.clip_frames,
            modalities=modalities, backbones=backbones, weights=args.backbones, arch_size=args.arch_size,
            seed=args.seed, feature_dtype=args.feature_dtype,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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
    parser.add_argument("--videos", type=existing_path, required=True, help="folder of videos")
    parser.add_argument("--out", type=Path, required=True, help="cache folder (one sub-folder per configuration)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="retry videos that failed before even if their file is unchanged")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_extraction_options(parser)


def _run_extract(args: argparse.Namespace) -> int:
    from extractors.base import WeightsSource, WeightsUnavailableError, build_extractors
    from manifests.cache import CacheError
    from pipeline.devices import resolve_device
    from pipeline.extract import discover_videos, extract_videos, prepare_cache

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    config = extraction_config_from_args(args, device)
    sources = discover_videos(args.videos)
    if not sources:
        raise UsageError(f"no videos (mp4, mkv, avi, mov, webm) under {args.videos}")
    weights = WeightsSource(weights_dir=args.weights_dir, offline=args.offline)
    try:
        extractors = build_extractors(config, device, weights)
        cache = prepare_cache(args.out, config, extractors)
    except (WeightsUnavailableError, CacheError) as exc:
        raise UsageError(str(exc)) from None
    if config.random_weights:
        print("NOTE: random-weight backbones: these features are for smoke tests, not for scoring.", file=sys.stderr)
    print(f"extracting {len(sources)} videos into {cache.root} on {device}", file=sys.stderr)
    summary = extract_videos(
        sources, cache, extractors, config,
        batch_segments=args.batch_segments, retry_failed=args.retry_failed, progress=not args.quiet,
    )
    print_extract_summary(summary, cache)
    return EXIT_FAILURES if summary.failed else EXIT_OK


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
    raise NotImplementedError  # written by the training helper


def _run_train(args: argparse.Namespace) -> int:
    raise NotImplementedError  # written by the training helper


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    raise NotImplementedError  # written by the training helper


def _run_evaluate(args: argparse.Namespace) -> int:
    raise NotImplementedError  # written by the training helper


def _add_import_features(sub: argparse._SubParsersAction) -> None:
    raise NotImplementedError  # written by the training helper


def _run_import_features(args: argparse.Namespace) -> int:
    raise NotImplementedError  # written by the training helper


# ============================================================================ score / demo


def _add_score(sub: argparse._SubParsersAction) -> None:
    raise NotImplementedError  # written by the lead


def _run_score(args: argparse.Namespace) -> int:
    raise NotImplementedError  # written by the lead


def _add_demo(sub: argparse._SubParsersAction) -> None:
    raise NotImplementedError  # written by the lead


def _run_demo(args: argparse.Namespace) -> int:
    raise NotImplementedError  # written by the lead


# ============================================================================ wiring

COMMANDS = {
    "extract": (_add_extract, _run_extract),
    "train": (_add_train, _run_train),
    "evaluate": (_add_evaluate, _run_evaluate),
    "import-features": (_add_import_features, _run_import_features),
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
    except KeyboardInterrupt:
        print(f"pipeline {args.command}: interrupted; finished work is kept, rerun to continue", file=sys.stderr)
        return 130


def existing_path(text: str) -> Path:
    """argparse type for a path that must exist."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist")
    return path


if __name__ == "__main__":
    sys.exit(main())
