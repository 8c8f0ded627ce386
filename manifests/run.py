"""The run folder: the one owner of its layout, its readers and writers.

    RUN/
      run.json                 what the run is: its TrainConfig (under "config"; null for an imported
                               checkpoint), modalities, feature dims, clip_num, score range, splits, ...
      model_config.json        {"model": name, "config": config.to_dict()} (models.checkpoint writes it)
      extraction_config.json   the feature cache's config.json, so scoring re-extracts identically
      best.safetensors         the weights of the chosen epoch (models.checkpoint writes tensors)
      best.json                that epoch, its validation metrics, how far training got
      train_log.csv            one row per finished epoch
      last/                    resume state after the last finished epoch; state.json is written last
                               and marks the folder complete (last.new / last.old: a swap cut short)
      evaluation/              results of `pipeline evaluate` (eval-<labels>.*) and of reproduce (test.*)
      score_cache/             features of clips scored with the run
      .lock                    the single writer (manifests.claims.RunLock)

`pipeline train` writes a run, `import-checkpoint` writes one from released weights, and evaluate,
score and reproduce read it: all of them through `RunDir`, so no stage knows another's file names.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path
from typing import Any

from manifests.claims import RunLock
from manifests.files import JsonFileError, atomic_write_bytes, atomic_write_json, read_json_object

# TrainConfig keys that say where the run is or where a value came from, not how it trains.
NOT_SETTINGS = ("out", "sources", "schema_version")


class RunFolderError(ValueError):
    """A run folder that is missing a file or holds one this version cannot read; the message names it."""


def differing_settings(recorded: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings of `now` whose value differs from `recorded` (a run's recorded TrainConfig), as
    {key: (recorded value, value now)}; where the run lives and where values came from do not count."""
    return {k: (recorded.get(k), v) for k, v in sorted(now.items()) if k not in NOT_SETTINGS and recorded.get(k) != v}


def describe_differences(differ: dict[str, tuple[Any, Any]]) -> str:
    """"lr: run 0.001, now 0.5; seed: run 0, now 1": the one wording of a settings mismatch."""
    return "; ".join(f"{k}: run {old!r}, now {new!r}" for k, (old, new) in differ.items())


class RunDir:
    """Paths, readers and writers of one run folder (see the module docstring)."""

    RUN = "run.json"
    MODEL_CONFIG = "model_config.json"
    EXTRACTION = "extraction_config.json"
    BEST = "best.json"
    LOG = "train_log.csv"
    LAST = "last"
    STATE = "state.json"
    EVALUATION = "evaluation"
    SCORE_CACHE = "score_cache"
    LOCK = RunLock.NAME

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ paths

    @property
    def run_json(self) -> Path:
        return self.path / self.RUN

    @property
    def model_config_json(self) -> Path:
        return self.path / self.MODEL_CONFIG

    @property
    def extraction_json(self) -> Path:
        return self.path / self.EXTRACTION

    @property
    def best_json(self) -> Path:
        return self.path / self.BEST

    @property
    def log_csv(self) -> Path:
        return self.path / self.LOG

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    def weights(self, name: str = "best") -> Path:
        """RUN/<name>.safetensors (best: the chosen epoch)."""
        return self.path / f"{name}.safetensors"

    def evaluation(self, name: str) -> Path:
        """RUN/evaluation/<name>: the base name of an evaluation's files (name.csv, name.json, ...)."""
        return self.path / self.EVALUATION / name

    def score_cache(self) -> Path:
        return self.path / self.SCORE_CACHE

    # ------------------------------------------------------------------ state of the folder

    def has_run(self) -> bool:
        """run.json exists: a run was started (train) or written whole (import-checkpoint) here."""
        return self.run_json.is_file()

    def holds_other_files(self) -> bool:
        """Anything but a lock (which a train killed before writing anything leaves behind)."""
        return self.path.is_dir() and any(p.name != self.LOCK for p in self.path.iterdir())

    # ------------------------------------------------------------------ run.json

    def read_info(self) -> dict[str, Any]:
        """run.json; FileNotFoundError when absent, JsonFileError naming the file when unreadable."""
        return read_json_object(self.run_json, "run record")

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.run_json, info)

    def read_train_config(self, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """The TrainConfig recorded in run.json (as a dict); RunFolderError for an imported checkpoint
        (nothing to resume), JsonFileError when the record has no "config" object."""
        stored = self.read_info() if info is None else info
        if "config" in stored and stored["config"] is None:  # written by import-checkpoint
            raise RunFolderError(f"{self.path} holds an imported checkpoint, not a run trained here; it cannot be resumed")
        if not isinstance(stored.get("config"), dict):
            raise JsonFileError(f"{self.run_json} is not a valid run record: no \"config\" object")
        return stored["config"]

    # ------------------------------------------------------------------ the other JSON files

    def read_extraction_config(self) -> dict[str, Any]:
        return read_json_object(self.extraction_json, "extraction config")

    def write_extraction_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.extraction_json, config)

    def read_best(self) -> dict[str, Any]:
        """best.json, or {} before the first epoch finished."""
        return read_json_object(self.best_json, "best-epoch record") if self.best_json.is_file() else {}

    def write_best(self, best: dict[str, Any]) -> None:
        atomic_write_json(self.best_json, best)

    # ------------------------------------------------------------------ train_log.csv

    def read_log(self) -> list[dict[str, str]]:
        """The rows of train_log.csv as strings ([] when there is none)."""
        if not self.log_csv.is_file():
            return []
        with self.log_csv.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def write_log(self, rows: list[dict[str, Any]]) -> None:
        """One row per epoch; the columns in order of first appearance, None as an empty cell."""
        if not rows:
            return
        columns = list(rows[0])
        for row in rows[1:]:
            columns += [c for c in row if c not in columns]
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.log_csv, text.getvalue().encode())

    # ------------------------------------------------------------------ last/: the resume state

    def resume_folder(self) -> Path | None:
        """last/, or the complete half of an interrupted swap; None when no epoch finished."""
        for name in (self.LAST, f"{self.LAST}.new", f"{self.LAST}.old"):
            if (self.path / name / self.STATE).is_file():
                return self.path / name
        return None

    def read_resume_state(self, folder: Path | None = None) -> dict[str, Any] | None:
        """state.json of the resume folder (or of `folder`); None when there is none."""
        folder = self.resume_folder() if folder is None else folder
        return None if folder is None else read_json_object(folder / self.STATE, "resume state")

    def resume_epoch(self) -> int | None:
        """The last finished epoch that a resume would continue after (None: none finished)."""
        state = self.read_resume_state()
        return None if state is None else int(state["epoch"])

    def start_resume_state(self) -> Path:
        """An empty last.new/ to fill with tensors; `commit_resume_state` completes and swaps it in."""
        new = self.path / f"{self.LAST}.new"
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir()
        return new

    def commit_resume_state(self, new: Path, state: dict[str, Any]) -> None:
        """Write new/state.json (its presence marks the folder complete), then swap new/ in for last/
        by renames, so a kill never leaves a mix of two epochs."""
        atomic_write_json(new / self.STATE, state)
        final, old = self.path / self.LAST, self.path / f"{self.LAST}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ status

    def is_finished(self, info: dict[str, Any] | None = None) -> bool:
        """Every planned epoch done, the chosen weights written and, with a validation split, the
        closing per-setting validation pass recorded in best.json."""
        info = self.read_info() if info is None else info
        epoch = self.resume_epoch()
        if epoch is None or not self.weights().is_file():
            return False
        if epoch < int(self.read_train_config(info)["epochs"]):
            return False
        return not (info["splits"]["val"] and "val_settings" not in self.read_best())
