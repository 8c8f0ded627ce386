"""The inference layer below the stages: load a run, forward a batch, predict, score every modality setting.

    run = load_run("runs/rg-ball", device="auto")          # model + everything run.json recorded
    samples = data.load_samples(cache, ids)                   # or data.Sample(id, {modality: (T, C)})
    pairs = run.predict(samples)                              # [(score, grade weights or None)], original scale
    scores = run.scores(samples, subset=("rgb",))             # (N,) array, NaN where nothing is usable
    outputs = run.forward(samples)                            # raw model outputs of one batch
    evaluation = run.evaluate(labelled_samples)               # every modality setting: rho, MSE, predictions

`pipeline train` (validation), `evaluate`, `score` and `reproduce` all predict through this module.

Evaluation follows the papers' Table 1: every non-empty modality combination (2^M - 1; for v/f/a the
full set and the six incomplete subsets), Spearman rho and MSE on the original score scale, and an
Average over the incomplete settings (Fisher-z mean of rho, arithmetic mean of MSE). A modality left
out by a setting is zeroed and masked, so nothing of it reaches the model. A video that has none of a
setting's modalities in its data cannot be scored in that setting and is left out of it (`n` says how
many were used).
"""

from __future__ import annotations

import io
import math
import sys
import warnings
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from extractors.config import ExtractionConfig
from manifests.cache import (CONFIG_NAME, FeatureCache, config_differences, feature_precision, feature_recipe,
                             weights_difference)
from manifests.config import ConfigError
from manifests.claims import describe_holder
from manifests.run import RunDir, RunRecord
from models.checkpoint import load_model_state, load_tensors, read_model_config
from pipeline import data
from pipeline.devices import resolve_device
from pipeline.metrics import fisher_z_mean, mean_mse, mse, spearman_rho
from pipeline.provenance import provenance


# --------------------------------------------------------------------------- prediction


def call_model(
    model: torch.nn.Module, features: dict[str, torch.Tensor], available: torch.Tensor, present: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The one forward call of every model (the contract in models/__init__.py)."""
    return model(features, available, present)


def run_model(
    model: torch.nn.Module, batch: data.Batch, available: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    """One inference pass in which masked-out modalities are zeroed: the model cannot see them."""
    batch = batch.to(device)
    available = available.to(device)
    features = {m: x * available[:, i, None, None].to(x.dtype) for i, (m, x) in enumerate(batch.features.items())}
    return call_model(model, features, available, available)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    samples: Sequence[data.Sample],
    modalities: Sequence[str],
    feature_dims: dict[str, int],
    clip_num: int,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    subset: Sequence[str] | None = None,
) -> np.ndarray:
    """Normalised scores in [0, 1] (centre crops), using the modalities each sample has, restricted to
    `subset` when given; NaN for a sample left with no modality."""
    model.eval()
    device = torch.device(device)
    keep = torch.ones(len(modalities), dtype=torch.bool) if subset is None else data.subset_mask(subset, modalities)
    out = np.full(len(samples), np.nan, dtype=np.float64)
    usable = [i for i, s in enumerate(samples) if any(m in s.features for m, k in zip(modalities, keep.tolist()) if k)]
    for first in range(0, len(usable), batch_size):
        indices = usable[first : first + batch_size]
        batch = data.collate([samples[i] for i in indices], modalities, feature_dims, clip_num)
        available = batch.present & keep[None]
        scores = run_model(model, batch, available, device)["score"]
        out[indices] = scores.float().cpu().numpy()
    return out


# --------------------------------------------------------------------------- Table 1


@dataclass
class SettingResult:
    name: str  # "{v,f}"
    modalities: tuple[str, ...]
    complete: bool  # every modality of the run
    n: int
    rho: float
    mse: float


@dataclass
class Evaluation:
    settings: list[SettingResult]
    average_rho: float  # Fisher-z mean over the incomplete settings
    average_mse: float  # arithmetic mean over the incomplete settings
    video_ids: list[str]
    true: np.ndarray
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # setting name -> (N,) original scale

    def columns(self) -> list[tuple[str, float, float, int | None]]:
        """Table order: the incomplete settings, their Average, then the complete set."""
        incomplete = [s for s in self.settings if not s.complete]
        complete = [s for s in self.settings if s.complete]
        cols = [(s.name, s.rho, s.mse, s.n) for s in incomplete]
        if incomplete:
            cols.append(("Average", self.average_rho, self.average_mse, None))
        cols += [(s.name, s.rho, s.mse, s.n) for s in complete]
        return cols

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": [
                {"setting": s.name, "modalities": list(s.modalities), "complete": s.complete, "n": s.n,
                 "rho": json_number(s.rho), "mse": json_number(s.mse)}
                for s in self.settings
            ],
            "average": {"rho": json_number(self.average_rho), "mse": json_number(self.average_mse),
                        "over": [s.name for s in self.settings if not s.complete],
                        "rho_method": "Fisher z (mean of atanh, then tanh)", "mse_method": "arithmetic mean"},
        }


def json_number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def evaluate_samples(
    model: torch.nn.Module,
    samples: Sequence[data.Sample],
    modalities: Sequence[str],
    feature_dims: dict[str, int],
    clip_num: int,
    score_range: float,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> Evaluation:
    """Every modality combination on labelled samples: rho and MSE on the original scale."""
    true = np.array([s.score for s in samples], dtype=np.float64)
    results, predictions = [], {}
    for subset in data.modality_subsets(modalities):
        name = data.subset_name(subset)
        predicted = predict(model, samples, modalities, feature_dims, clip_num, device, batch_size, subset) * score_range
        used = ~np.isnan(predicted)
        results.append(SettingResult(
            name, tuple(subset), len(subset) == len(modalities), int(used.sum()),
            spearman_rho(predicted[used], true[used]), mse(predicted[used], true[used]),
        ))
        predictions[name] = predicted
    incomplete = [r for r in results if not r.complete]
    return Evaluation(
        results,
        fisher_z_mean(r.rho for r in incomplete) if incomplete else float("nan"),
        mean_mse(r.mse for r in incomplete) if incomplete else float("nan"),
        [s.video_id for s in samples],
        true,
        predictions,
    )



# --------------------------------------------------------------------------- runs


class RunError(RuntimeError):
    """A run folder is missing, incomplete or does not match the features it is used with."""


@dataclass
class Run:
    directory: Path
    model: torch.nn.Module
    model_name: str
    record: RunRecord  # run.json
    extraction_config: dict[str, Any]
    # the chosen epoch and its validation metrics (the weights' header), with best.json's progress
    best: dict[str, Any]
    device: torch.device
    # the live process that held the run's lock while the weights were read (a `train` writing the run),
    # None when none did: then the weights are the run's final (or stopped) ones
    writer: dict[str, Any] | None = None

    @property
    def folder(self) -> RunDir:
        return RunDir(self.directory)

    @property
    def checkpoint(self) -> dict[str, Any]:
        """The weights this Run holds: their epoch and validation metrics (from their own file's header,
        so they cannot disagree with them), how far training had got, and whether training was in progress."""
        return {
            **{k: self.best.get(k) for k in ("epoch", "val_rho", "val_mse", "epochs_done", "epochs_planned")},
            "training_in_progress": self.writer is not None,
            "writer": None if self.writer is None else f"{self.writer.get('command', 'pipeline train')}: "
                                                        f"{describe_holder(self.writer)}",
        }

    def describe_checkpoint(self) -> str:
        """"weights of epoch 3", and, while a `train` writes the run or when it stopped early, that they
        are not its final ones."""
        epoch = self.best.get("epoch")
        words = f"weights of epoch {epoch}" if epoch is not None else "imported weights"
        done, planned = self.best.get("epochs_done"), self.best.get("epochs_planned")
        if self.writer is not None:
            words += f"; TRAINING IN PROGRESS: {done} of {planned} epochs done when read, a later score may differ"
        elif done is not None and planned is not None and done < planned:
            words += f"; training stopped after {done} of {planned} epochs"
        return words

    @property
    def info(self) -> dict[str, Any]:
        """run.json as JSON (the record's `to_dict`), for what writes it into results."""
        return self.record.to_dict()

    @property
    def modalities(self) -> list[str]:
        return list(self.record.modalities)

    @property
    def feature_dims(self) -> dict[str, int]:
        return dict(self.record.feature_dims)

    @property
    def clip_num(self) -> int:
        return self.record.clip_num

    @property
    def score_range(self) -> float:
        return float(self.record.score_range)

    @property
    def provenance(self) -> dict[str, Any]:
        """{"random_weights", "config_hash"} of the features the run was trained on."""
        return provenance(self.extraction_config)

    @property
    def trained_ids(self) -> set[str]:
        return self.record.trained_ids

    @property
    def feature_recipe(self) -> str:
        """The recipe of the features the weights expect (run.json's, else that of the features trained on)."""
        return self.record.feature_recipe or feature_recipe(self.extraction_config)

    def open_features(self, path: str | Path | None = None, allow_other_recipe: bool = False) -> FeatureCache:
        """The run's own feature cache, or another one after checking it was made the same way: of the
        run's recipe, and, unless one is a published set and the other its recipe's remake from raw
        video, with the same configuration. `allow_other_recipe` skips both checks."""
        cache = FeatureCache.open(path if path is not None else self.record.features)
        if allow_other_recipe:
            return cache
        actual = cache.read_config()
        check_feature_recipe(self.feature_recipe, actual, f"run {self.directory}", cache.root)
        if published(self.extraction_config) == published(actual):
            check_same_features(self.extraction_config, actual, self.directory, cache.root)
        return cache

    def scores(self, samples: Sequence[data.Sample], subset: Sequence[str] | None = None, batch_size: int = 32) -> np.ndarray:
        """(N,) scores on the original scale (centre crops); NaN for a sample with no usable modality."""
        normalised = predict(self.model, samples, self.modalities, self.feature_dims, self.clip_num, self.device, batch_size, subset)
        return normalised * self.score_range

    @property
    def batch_positions(self) -> int | None:
        """The batch positions 0..B-1 a model whose score depends on its place in the batch was trained
        at (MCMoE with prototype_encoding "batch-position": the authors' released checkpoints); B is
        the training batch size (the run's, else its preset's, else the model's default: the
        reference's 32). None for every other model."""
        config = getattr(self.model, "config", None)
        if getattr(config, "prototype_encoding", None) != "batch-position":
            return None
        return int((self.record.config or self.record.preset or config.training_defaults())["batch_size"])

    @property
    def score_rule(self) -> str | None:
        """How `predict` scores a run whose scores depend on batch positions, in words; None otherwise."""
        positions = self.batch_positions
        if positions is None:
            return None
        return f"batch-position weights: each clip's score is its mean over batch positions 0-{positions - 1}"

    @torch.no_grad()
    def predict(self, samples: Sequence[data.Sample], batch_size: int = 32) -> list[tuple[float, list[float] | None]]:
        """(score on the original scale, grade weights or None) per sample, using the modalities it has.

        Every sample needs at least one of the run's modalities (the others are imputed by the model).
        For a batch-position run (`batch_positions`) each sample is scored on its own, whatever is scored
        with it: its score and grade weights are their means over the positions the weights were trained
        at (one batch of copies of it, copy p at position p; benchmarks/batch_position_spread.py measured
        this rule). `evaluate` and `scores` keep the batch order, as the reference evaluates."""
        self.model.eval()
        positions = self.batch_positions
        chunks = ([[sample] * positions for sample in samples] if positions is not None
                  else [samples[first : first + batch_size] for first in range(0, len(samples), batch_size)])
        results: list[tuple[float, list[float] | None]] = []
        for chunk in chunks:
            empty = list(dict.fromkeys(s.video_id for s in chunk if not any(m in s.features for m in self.modalities)))
            if empty:
                raise ValueError(f"videos {empty} have none of the run's modalities {self.modalities}")
            batch = data.collate(chunk, self.modalities, self.feature_dims, self.clip_num)
            out = run_model(self.model, batch, batch.present, self.device)
            scores, grades = out["score"], out.get("grade_weights")
            if positions is not None:
                scores, grades = scores.mean(0, keepdim=True), grades.mean(0, keepdim=True)
            for i, score in enumerate(scores.float().cpu().tolist()):
                results.append((score * self.score_range, None if grades is None else grades[i].float().cpu().tolist()))
        return results

    @torch.no_grad()
    def forward(self, samples: Sequence[data.Sample], available: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Raw model outputs for one batch; `available` (B, M) defaults to what each sample has."""
        self.model.eval()
        batch = data.collate(samples, self.modalities, self.feature_dims, self.clip_num)
        mask = batch.present if available is None else batch.present & available.cpu()
        return run_model(self.model, batch, mask, self.device)

    def evaluate(self, samples: Sequence[data.Sample], batch_size: int = 32) -> Evaluation:
        return evaluate_samples(self.model, samples, self.modalities, self.feature_dims, self.clip_num,
                                self.score_range, self.device, batch_size)


def describe_features(config: dict[str, Any]) -> str:
    """One line naming a feature configuration: hash, protocol, backbones, weights."""
    extraction = config.get("extraction") or {}
    backbones = ",".join(f"{m}={e.get('name')}" for m, e in (config.get("extractors") or {}).items())
    weights = "RANDOM weights" if config.get("random_weights") else "pretrained weights"
    origin = extraction.get("protocol") or config.get("source")
    return f"{config.get('config_hash')} ({origin}; {backbones}; {weights})"


def published(config: dict[str, Any]) -> bool:
    """Whether a config.json describes an imported published feature set (not features extracted here)."""
    return str(config.get("source", "")).startswith("import:")


def check_feature_recipe(expected: str, actual: dict[str, Any], who: str, cache_root: Path) -> None:
    """RunError in one line when the features of config.json `actual` are not of recipe `expected`,
    which `who` (a run, or released weights) was trained on: their scores would mean nothing."""
    found = feature_recipe(actual)
    if found != expected:
        raise RunError(
            f"{who}: trained on features of recipe {expected}; those in {cache_root} are of recipe {found} "
            f"(extract with --recipe {expected}, or pass --allow-other-recipe to use them anyway)")


# Why features of another precision are used rather than refused (benchmarks/precision_scores.py).
OTHER_PRECISION = ("the two differ by about 1% of their scale, which moved scores far less than the training "
                   "seed does (README, \"Precision\")")


def other_precision_only(expected: dict[str, Any], actual: dict[str, Any]) -> bool:
    """Whether two extractions' config.json describe the same features but for their precision (fp32 vs
    bf16): features that move scores far less than the training seed does (README, "Precision")."""
    if feature_precision(expected) == feature_precision(actual) or "extraction" not in actual:
        return False
    try:
        other = ExtractionConfig.from_dict(actual["extraction"])
    except (ConfigError, ValueError, TypeError):
        return False
    # The features were made on a CPU or a GPU, whose bf16 settings may differ (settings_in_precision).
    for device_type in ("cpu", "cuda"):
        same = other.in_precision(feature_precision(expected), device_type).config_hash()
        if same == expected.get("config_hash") and not config_differences(expected, {**actual, "config_hash": same}):
            return True
    return False


def check_same_features(expected: dict[str, Any], actual: dict[str, Any], run_dir: Path, cache_root: Path) -> None:
    """Refuse features made differently from the run's, random vs pretrained weights included; other
    pretrained weights files (by content) in one line naming both. Features that differ in precision alone
    are used, with a NOTE on stderr."""
    weights = weights_difference(expected, actual)
    if weights:
        raise RunError(f"the features in {cache_root} were made with other pretrained weights than run {run_dir} "
                       f"was trained on ({weights}: run vs features)")
    if other_precision_only(expected, actual):
        print(f"NOTE: the features in {cache_root} were computed in {feature_precision(actual)}, run {run_dir} was "
              f"trained on {feature_precision(expected)} ones; {OTHER_PRECISION}", file=sys.stderr)
        return
    differ = config_differences(expected, actual)
    if differ:
        a, b = expected, actual
        weights = ""
        if bool(a.get("random_weights")) != bool(b.get("random_weights")):
            weights = (f"; the features use {'random' if b.get('random_weights') else 'pretrained'} backbone "
                       f"weights, the run was trained on {'random' if a.get('random_weights') else 'pretrained'} ones")
        raise RunError(
            f"the features in {cache_root} were made with a different extraction configuration than run "
            f"{run_dir} was trained on (config.json differs in {differ}{weights}).\n"
            f"  run:      {describe_features(expected)}  [{RunDir(run_dir).extraction_json}]\n"
            f"  features: {describe_features(actual)}  [{cache_root / CONFIG_NAME}]"
        )


@contextmanager
def quiet_libraries() -> Iterator[list[str]]:
    """Keep library chatter off the terminal while a model is built: transformers' "Loading weights"
    bar and the deprecation notices peft and transformers give each other (LIMSSR's LLM). Errors still
    raise; what was printed is handed back (a list of lines) for whoever keeps a log."""
    caught, buffer = [], io.StringIO()
    with warnings.catch_warnings(), redirect_stderr(buffer):
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            yield caught
        finally:
            caught += [line for line in buffer.getvalue().replace("\r", "\n").splitlines() if line.strip()]


def load_run(directory: str | Path, device: str | torch.device = "auto", weights: str = "best") -> Run:
    """Rebuild a run's model from its JSON config and load the chosen (or given) weights."""
    from models import build_model

    folder = RunDir(directory)
    directory = folder.path
    writer = folder.writer()  # asked before and after the weights are read: a train that ends meanwhile counts
    try:  # each a one-line error naming the file (JsonFileError, ConfigError, CheckpointError are ValueErrors)
        record = folder.read_record()
        extraction = folder.read_extraction_config()
    except FileNotFoundError as exc:
        raise RunError(f"{directory} is not a finished run folder: {Path(exc.filename).name} is missing") from None
    weights_path = folder.weights(weights)
    if not weights_path.is_file():
        raise RunError(f"{weights_path} is missing: the run has no finished epoch yet")
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    name, config = read_model_config(directory)
    try:
        with quiet_libraries():
            model = build_model(name, config)
    except (TypeError, ValueError, KeyError) as exc:
        raise RunError(f"{folder.model_config_json} does not describe a buildable {name} model: {exc}") from None
    for key in ("modalities", "feature_dims"):
        if getattr(model.config, key) != getattr(record, key):
            raise RunError(f"{folder.run_json}: {key} {getattr(record, key)!r} differ from the model's "
                           f"{getattr(model.config, key)!r} in {folder.model_config_json}")
    # One read of one file gives the weights and the epoch that names them together: train replaces
    # best.safetensors by a rename, so a reader gets one epoch's file whole, never a mix.
    state, metadata = load_tensors(weights_path)
    load_model_state(model, state, weights_path)
    progress = folder.read_progress()  # read after the weights: it counts at least their epoch
    writer = writer or folder.writer()
    chosen = metadata.get("best", {})
    if not isinstance(chosen, dict):
        raise RunError(f"{weights_path}: its \"best\" metadata is not an object; the file was not written by train")
    # The header is written in one file with the weights it describes, so it wins over a best.json that
    # also names an epoch: that one may lag behind the weights by a kill between two writes.
    best = {**progress, **chosen}
    model.to(torch_device).eval()
    return Run(directory, model, name, record, extraction, best, torch_device, writer)
