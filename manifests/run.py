"""The run folder: the one owner of its layout, its readers and writers.

    RUN/
      run.json                 what the run is: a `RunRecord` (its TrainConfig under "config", null for
                               an imported checkpoint; modalities, feature dims, clip_num, score range,
                               splits, ...)
      model_config.json        {"model": name, "config": config.to_dict()} (models.checkpoint writes it)
      extraction_config.json   the feature cache's config.json, so scoring re-extracts identically
      best.safetensors         the weights of the chosen epoch; its header's "best" names that epoch and
                               its validation metrics (the one record of them: it cannot disagree with
                               the weights it sits in)
      best.json                how far training got and, once it finished, every modality setting's
                               validation metrics of the chosen weights
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
import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

from manifests.claims import RunLock, live_holder
from manifests.config import ConfigError, RecordedConfig
from manifests.files import atomic_write_bytes, atomic_write_json, read_json_object, rows_to_csv, unescape_csv_cell

# TrainConfig keys that say where the run is or where a value came from, not how it trains.
NOT_SETTINGS = ("out", "sources", "schema_version")


class RunFolderError(ValueError):
    """A run folder that is missing a file or holds one this version cannot read; the message names it."""


@dataclasses.dataclass
class RunRecord(RecordedConfig):
    """run.json: what a run is and how its checkpoint was chosen. `pipeline train` and
    `import-checkpoint` write it through `RunDir.write_record`, every reader gets it from
    `RunDir.read_record`; both check the values (`check`), so a bad one is one line naming the key.

    Schema version 3 records every field; a version-1 file (no schema_version) lacks the fields its
    writer had no value for, and `upgrade` fills them with what they were for that run. Files before
    version 3 also hold `seed`, a copy of the TrainConfig's (null for an imported checkpoint), which
    `upgrade` drops: the run's seed is `config["seed"]`, its one record."""

    SCHEMA_VERSION = 3

    model: str
    modalities: list[str]
    feature_dims: dict[str, int]
    clip_num: int
    clip_num_source: str
    score_range: float
    score_range_source: str
    features: str  # the feature cache the run was trained on (or imported for)
    feature_config_hash: str
    labels: str | None  # None: imported, no labels were read
    config: dict[str, Any] | None  # TrainConfig.to_dict(); None: an imported checkpoint, nothing to resume
    preset: dict[str, Any] | None
    imported: dict[str, Any] | None  # the imported file: format, path, sha256, ...
    selection: str  # how the checkpoint was chosen, in words
    selected_on: str
    test_used_for_selection: bool
    validation_videos: int
    selection_note: str | None
    splits: dict[str, Any]  # {"train": [ids], "val": [ids], "test_rows_ignored": n}
    absent_in_data: dict[str, list[str]]  # video -> modalities its features lack
    train_missing: dict[str, Any] | None  # simulated missingness: rates, the hidden modalities
    num_parameters: int
    num_trainable_parameters: int
    sequence_length: int | None
    random_weight_features: bool
    torch_version: str
    created_at: str
    # The recipe (extractors/recipes.py) of the features the weights expect; None (runs written before it
    # was recorded): the recipe of the features in extraction_config.json (manifests.cache.feature_recipe).
    feature_recipe: str | None = None

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        imported = data.get("config", {}) is None
        return {
            "imported": None, "test_used_for_selection": False, "validation_videos": 0, "selection_note": None,
            "absent_in_data": {}, "train_missing": None, "sequence_length": None,
            # an imported checkpoint recorded only the total: every parameter of it is trainable
            **({"num_trainable_parameters": data["num_parameters"]} if imported and "num_parameters" in data else {}),
            **{k: v for k, v in data.items() if k != "seed"},  # versions 1 and 2: a copy of config["seed"]
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "RunRecord":
        record = super().from_dict(data, source)
        record.check(source)
        return record

    def check(self, source: str | Path | None = None) -> None:
        """ConfigError naming `source` and the key of the first value no reader could use."""
        def bad(key: str, wanted: str) -> ConfigError:
            value = _lookup(self, key)
            return ConfigError(f"{source or 'run record'}: {key} must be {wanted}, got {value!r}")

        def string(key: str, optional: bool = False) -> None:
            value = _lookup(self, key)
            if not (isinstance(value, str) or (optional and value is None)):
                raise bad(key, "a string" + (" or null" if optional else ""))

        def count(key: str, least: int) -> None:
            value = _lookup(self, key)
            if not (_is_int(value) and value >= least):
                raise bad(key, f"an integer >= {least}")

        def mapping(key: str, optional: bool = False) -> None:
            value = _lookup(self, key)
            if not (isinstance(value, dict) or (optional and value is None)):
                raise bad(key, "an object" + (" or null" if optional else ""))

        for key in ("model", "clip_num_source", "score_range_source", "features", "feature_config_hash",
                    "selection", "selected_on", "torch_version", "created_at"):
            string(key)
        for key in ("labels", "selection_note", "feature_recipe"):
            string(key, optional=True)
        if not self.model or not self.features:
            raise bad("model" if not self.model else "features", "a non-empty string")
        modalities = self.modalities
        if (not isinstance(modalities, list) or not modalities or len(set(map(str, modalities))) != len(modalities)
                or not all(isinstance(m, str) and m for m in modalities)):
            raise bad("modalities", "a list of distinct modality names")
        mapping("feature_dims")
        if set(self.feature_dims) != set(modalities):
            raise bad("feature_dims", f"one size for each of the modalities {modalities}")
        for modality in modalities:
            count(f"feature_dims.{modality}", 1)
        count("clip_num", 1)
        score_range = self.score_range
        if not (isinstance(score_range, (int, float)) and not isinstance(score_range, bool)
                and math.isfinite(score_range) and score_range > 0):
            raise bad("score_range", "a number > 0")
        for key in ("config", "preset", "imported", "train_missing"):
            mapping(key, optional=True)
        if self.imported is not None:
            string("imported.file")
        mapping("splits")
        for key in ("train", "val"):
            ids = self.splits.get(key)
            if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
                raise bad(f"splits.{key}", "a list of video ids")
        mapping("absent_in_data")
        for key, least in (("validation_videos", 0), ("num_parameters", 0), ("num_trainable_parameters", 0)):
            count(key, least)
        if self.sequence_length is not None:
            count("sequence_length", 1)
        for key in ("test_used_for_selection", "random_weight_features"):
            if not isinstance(_lookup(self, key), bool):
                raise bad(key, "true or false")

    @property
    def trained_ids(self) -> set[str]:
        """The videos used in training or validation (not a held-out test for this run)."""
        return set(self.splits["train"]) | set(self.splits["val"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _lookup(record: RunRecord, key: str) -> Any:
    """The value of "a.b" (field a, key b of its object); None when absent."""
    name, _, inner = key.partition(".")
    value = getattr(record, name)
    return value.get(inner) if inner and isinstance(value, dict) else value


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

    def writer(self) -> dict[str, Any] | None:
        """The live process holding the run's lock (a `train` writing it; its "command" says which), or
        None: nobody, or a holder that is provably gone (manifests.claims' staleness rule)."""
        return live_holder(self.lock)

    def holds_other_files(self) -> bool:
        """Anything but a lock (which a train killed before writing anything leaves behind)."""
        return self.path.is_dir() and any(p.name != self.LOCK for p in self.path.iterdir())

    # ------------------------------------------------------------------ run.json

    def read_record(self) -> RunRecord:
        """run.json, upgraded and checked; FileNotFoundError when absent, JsonFileError or ConfigError
        (ValueErrors) naming the file, and the key, when it cannot be used."""
        return RunRecord.from_dict(read_json_object(self.run_json, "run record"), str(self.run_json))

    def write_record(self, record: RunRecord) -> None:
        record.check(self.run_json)  # a value no reader could use is the writer's bug: refuse it here
        atomic_write_json(self.run_json, record.to_dict())

    def read_train_config(self, record: RunRecord | None = None) -> dict[str, Any]:
        """The TrainConfig recorded in run.json (as a dict); RunFolderError for an imported checkpoint
        (nothing to resume)."""
        record = self.read_record() if record is None else record
        if record.config is None:
            raise RunFolderError(f"{self.path} holds an imported checkpoint, not a run trained here; it cannot be resumed")
        return record.config

    # ------------------------------------------------------------------ the other JSON files

    def read_extraction_config(self) -> dict[str, Any]:
        return read_json_object(self.extraction_json, "extraction config")

    def write_extraction_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.extraction_json, config)

    def read_progress(self) -> dict[str, Any]:
        """best.json, or {} before the first epoch finished (and for an imported checkpoint)."""
        return read_json_object(self.best_json, "training progress record") if self.best_json.is_file() else {}

    def write_progress(self, epochs_done: int, epochs_planned: int, val_settings: dict[str, Any] | None = None) -> None:
        """best.json: written every epoch, so a run stopped early says how far it got ("epoch 3 of 410,
        stopped after 5"); `val_settings`, the closing validation pass of the chosen weights, last."""
        progress: dict[str, Any] = {"epochs_done": epochs_done, "epochs_planned": epochs_planned}
        if val_settings is not None:
            progress["val_settings"] = val_settings
        atomic_write_json(self.best_json, progress)

    # ------------------------------------------------------------------ train_log.csv

    def read_log(self) -> list[dict[str, str]]:
        """The rows of train_log.csv as strings ([] when there is none)."""
        if not self.log_csv.is_file():
            return []
        with self.log_csv.open(newline="") as handle:
            return [{k: unescape_csv_cell(v) if isinstance(v, str) else v for k, v in row.items()}
                    for row in csv.DictReader(handle)]

    def write_log(self, rows: list[dict[str, Any]]) -> None:
        """One row per epoch; the columns in order of first appearance, None as an empty cell."""
        if not rows:
            return
        columns = list(rows[0])
        for row in rows[1:]:
            columns += [c for c in row if c not in columns]
        text = rows_to_csv([columns, *([row.get(c) for c in columns] for row in rows)])
        atomic_write_bytes(self.log_csv, text.encode())

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

    def is_finished(self, record: RunRecord | None = None) -> bool:
        """Every planned epoch done, the chosen weights written and, with a validation split, the
        closing per-setting validation pass recorded in best.json."""
        record = self.read_record() if record is None else record
        epoch = self.resume_epoch()
        if epoch is None or not self.weights().is_file():
            return False
        if epoch < int(self.read_train_config(record)["epochs"]):
            return False
        return not (record.splits["val"] and "val_settings" not in self.read_progress())
