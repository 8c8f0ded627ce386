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


def _add_extract(sub: argparse._SubParsersAction) -> None:
    raise NotImplementedError  # written by the lead


def _run_extract(args: argparse.Namespace) -> int:
    raise NotImplementedError  # written by the lead


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
