"""What several commands share: exit codes, UsageError, path argument types, --batch-segments, and
what a command leaves behind after an I/O error."""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command line or its inputs, reported without a traceback (exit 2)."""


def batch_segments(args: argparse.Namespace, device_type: str) -> int:
    """--batch-segments, by default 8 on a GPU and 1 on a CPU (the bar moves once per segment)."""
    if args.batch_segments is not None and args.batch_segments < 1:
        raise UsageError(f"--batch-segments must be >= 1, got {args.batch_segments}")
    return args.batch_segments or (8 if device_type == "cuda" else 1)


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
