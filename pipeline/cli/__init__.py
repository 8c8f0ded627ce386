"""`pipeline`: the command line. Thin on purpose: it parses options and wires the stages.

One module per command, each with `add_parser(sub)` and `run(args)`: extract.py (also the flags that
decide the features), train.py, evaluate.py, import_features.py, import_checkpoint.py, reproduce.py,
score.py, demo.py; common.py holds what several share. This file lists them (COMMANDS) and runs one.

Exit codes: 0 success, 1 some input failed (the rest was still processed) or an I/O error, 2 usage error.

Building the parser imports nothing heavy (no torch, pandas, transformers): `--help` and usage errors
answer at once, and each stage imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys

from . import demo, evaluate, extract, import_checkpoint, import_features, reproduce, score, train
from .common import EXIT_FAILURES, EXIT_USAGE, UsageError, kept_after_io_error
from .extract import add_backbone_setting_options, extraction_config_from_args

__all__ = ["COMMANDS", "add_backbone_setting_options", "build_parser", "extraction_config_from_args", "main"]

COMMANDS = {
    "extract": (extract.add_parser, extract.run),
    "train": (train.add_parser, train.run),
    "evaluate": (evaluate.add_parser, evaluate.run),
    "import-features": (import_features.add_parser, import_features.run),
    "import-checkpoint": (import_checkpoint.add_parser, import_checkpoint.run),
    "reproduce": (reproduce.add_parser, reproduce.run),
    "score": (score.add_parser, score.run),
    "demo": (demo.add_parser, demo.run),
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
