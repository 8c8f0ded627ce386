"""`pipeline train`: fit a scorer on cached features, select on validation, resume exactly.

Writes a run folder (its layout, readers and writers: manifests/run.py's `RunDir`; everything JSON,
CSV or safetensors, nothing is unpickled when loading it): run.json records the TrainConfig, preset,
score range / clip_num and where they came from, modalities, feature dims, the cache and labels used,
the splits, simulated missingness, parameter count and how the checkpoint was chosen; best.safetensors
holds the epoch chosen on validation, last/ the resume state after the last finished epoch (model,
optimizer and random streams).

The learning rate follows a per-epoch schedule: linear warm-up over `warmup_epochs`, then cosine decay
to `min_lr_ratio * lr`; it is a pure function of the epoch, so the "scheduler state" is the epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from manifests.cache import FeatureCache
from manifests.files import remove_temporary_files
from manifests.claims import RunLock, describe_holder
from manifests.config import RecordedConfig
from manifests.run import RunDir, RunFolderError, describe_differences, differing_settings
from models import build_model, config_class
from models.checkpoint import (
    load_model_state,
    load_tensors,
    model_state,
    read_model_config,
    save_model_config,
    save_tensors,
)
from models.layers import use_uniform_dropout
from pipeline import data
from pipeline.devices import resolve_device
from pipeline.inference import call_model, evaluate_samples, predict
from pipeline.labels import LabelError, Labels, check_against_cache, read_labels
from pipeline.metrics import mse, spearman_rho
from pipeline.presets import Preset, get_preset
from pipeline.progress import progress_bar

OPTIMIZERS = ("adam", "adamw")
# How the optimiser updates the parameters: "fused" (one kernel over each tensor), "foreach" (each
# operator over all tensors at once) or "torch-default" (torch's choice: one set of operators per tensor
# on a CPU, foreach on a GPU). The last is what runs recorded before the setting existed used.
OPTIMIZER_IMPLEMENTATIONS = ("fused", "foreach", "torch-default")
# How the dropout layers draw their masks when training on a CPU: "uniform" (uniform draws compared with
# p: models.layers.UniformDropout, about 2x faster to draw on this project's AMD CPUs) or "bernoulli"
# (torch's own, what runs recorded before the setting used). Same distribution, other random numbers.
DROPOUT_MASKS = ("uniform", "bernoulli")
TRAINING_KEYS = (
    "optimizer", "lr", "weight_decay", "batch_size", "epochs",
    "warmup_epochs", "min_lr_ratio", "grad_clip", "mask_policy",
)
# TrainConfig settings whose source run.json records (besides the model-config fields).
RECORDED_KEYS = TRAINING_KEYS + ("optimizer_implementation", "dropout_masks", "clip_num", "score_range",
                                 "val_fraction", "seed", "train_missing", "ignore_unlabelled")
SELECTION = "best epoch on the validation split (Spearman rho, ties by lower MSE); the test set is never used"


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


class NonFiniteLossError(TrainError):
    """The loss became NaN/inf; the last good state and the best checkpoint were kept."""


@dataclass
class TrainConfig(RecordedConfig):
    """Every setting of a run, resolved: model defaults < preset < flags; recorded in run.json.

    Schema version 2 added optimizer_implementation, version 3 dropout_masks; an older record (run.json
    without a schema_version is version 1) gets what its run was trained with: "torch-default" and
    "bernoulli" (see `upgrade`)."""

    SCHEMA_VERSION = 3

    features: str
    labels: str
    out: str
    model: str = "mcmoe"
    preset: str | None = None
    action: str | None = None
    optimizer: str = "adam"
    # How Adam's update runs (OPTIMIZER_IMPLEMENTATIONS). "fused" makes the update ~4x faster on a CPU
    # but it is ~2% of an MCMoE step there (benchmarks/results/README.md), and its weights differ from
    # torch's default update by float rounding, so the default stays bit-identical with earlier runs.
    optimizer_implementation: str = "torch-default"
    # Dropout masks on a CPU (DROPOUT_MASKS): "uniform" since schema 3 (the masks were 18% of an MCMoE
    # step with torch's bernoulli_, benchmarks/results/README.md); no effect on a GPU or in evaluation.
    dropout_masks: str = "uniform"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 32
    epochs: int = 100
    warmup_epochs: int = 0
    min_lr_ratio: float = 0.01
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    mask_policy: str = "incomplete"
    clip_num: int | None = None  # None: the longest training video
    score_range: float | None = None  # None: the largest training label
    val_fraction: float = 0.2
    seed: int = 0
    train_missing: dict[str, float] = field(default_factory=dict)
    ignore_unlabelled: bool = False
    model_options: dict[str, Any] = field(default_factory=dict)
    # setting -> where its value came from: "flag", "preset <dataset>/<target>", "<model> defaults" or
    # "default"; model-config fields as "model.<field>"
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        return {"optimizer_implementation": "torch-default", "dropout_masks": "bernoulli", **data}

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.optimizer_implementation not in OPTIMIZER_IMPLEMENTATIONS:
            raise ValueError(f"--optimizer-implementation must be one of {OPTIMIZER_IMPLEMENTATIONS}, "
                             f"got {self.optimizer_implementation!r}")
        if self.dropout_masks not in DROPOUT_MASKS:
            raise ValueError(f"--dropout-masks must be one of {DROPOUT_MASKS}, got {self.dropout_masks!r}")
        if self.mask_policy not in data.MASK_POLICIES:
            raise ValueError(f"--mask-policy must be one of {data.MASK_POLICIES}, got {self.mask_policy!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_epochs < 0:
            raise ValueError("--lr must be > 0; --weight-decay, --grad-clip, --warmup-epochs >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_num is not None and self.clip_num < 1:
            raise ValueError(f"--clip-num must be >= 1, got {self.clip_num}")
        if self.score_range is not None and not self.score_range > 0:
            raise ValueError(f"--score-range must be > 0, got {self.score_range}")


def resolve_config(
    features: str,
    labels: str,
    out: str,
    model: str = "mcmoe",
    preset: str | None = None,
    action: str | None = None,
    overrides: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
) -> tuple[TrainConfig, Preset | None]:
    """Merge the model's training defaults, the preset and explicit values (`overrides`, flag names
    with underscores; `model_options`, model-config field names), recording each value's source."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    chosen = get_preset(preset, action) if preset else None
    config_cls = config_class(model)
    defaults = config_cls.training_defaults_for(model_options or {})
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def put(layer: dict[str, Any], source: str) -> None:
        for key, value in layer.items():
            values[key] = value
            sources[key] = source

    put({k: defaults[k] for k in TRAINING_KEYS if k in defaults}, f"{model} defaults")
    if values.get("grad_clip") is None:
        values["grad_clip"] = 0.0  # None in a model's defaults means no clipping
    options: dict[str, Any] = {}
    if chosen is not None:
        where = f"preset {chosen.dataset}/{chosen.target}"
        put(chosen.data_overrides(), where)
        training, fields = config_cls.from_preset(chosen)
        put(training, where)
        for key, value in fields.items():
            options[key] = value
            sources[f"model.{key}"] = where
    put(overrides, "flag")
    for key, value in (model_options or {}).items():
        options[key] = value
        sources[f"model.{key}"] = "flag"
    # Everything else keeps its default; run.json says so too (a preset's seed, say, versus seed 0).
    for key in RECORDED_KEYS:
        sources.setdefault(key, "default")
    for key in sorted(config_cls.settings()):
        sources.setdefault(f"model.{key}", f"{model} defaults")
    absolute = lambda path: str(Path(path).expanduser().resolve())  # noqa: E731 (a resumed run may start elsewhere)
    config = TrainConfig(
        features=absolute(features), labels=absolute(labels), out=str(out), model=model,
        preset=preset, action=chosen.target if chosen else action,
        model_options=options, sources=sources,
        **{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}},
    )
    config.validate()
    return config, chosen


# The generic model flags of `pipeline train`; each model maps the ones it takes (ModelConfig.FLAG_FIELDS).
MODEL_FLAGS = ("hidden", "dropout", "alpha", "position_encoding", "llm", "llm_dtype", "gradient_checkpointing",
               "limssr_variant")


def model_options_from_flags(model: str, flags: dict[str, Any], ablations: list[str], extra: list[str]) -> dict[str, Any]:
    """Model-config settings from the generic flags, --ablation names and --model-option KEY=VALUE
    (VALUE read as JSON when it parses, else as a string), as the model's config declares them."""
    cls = config_class(model)
    known = cls.settings()
    options: dict[str, Any] = {}
    for flag, value in flags.items():
        if value is None:
            continue
        if flag not in cls.FLAG_FIELDS:
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to model {model!r}")
        options[cls.FLAG_FIELDS[flag]] = value
    for name in ablations:
        if name not in cls.ABLATIONS:
            raise ValueError(f"--ablation {name!r}: choose from {sorted(cls.ABLATIONS)}"
                             if cls.ABLATIONS else f"--ablation {name!r}: model {model!r} has no ablations")
        options.update(cls.ABLATIONS[name])
    for item in extra:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-option {item!r} is not KEY=VALUE")
        try:
            options[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            options[key.strip()] = text
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"model {model!r} has no setting(s) {unknown}; its settings are {sorted(known)}")
    for key in cls.PATH_FIELDS:
        value = options.get(key)
        if isinstance(value, str) and Path(value).expanduser().is_dir():
            # the run records the folder; evaluate / score / resume must find it from any working folder
            options[key] = str(Path(value).expanduser().resolve())
    return options


def recorded_settings(folder: RunDir, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's TrainConfig as a dict in today's layout (an older record upgraded), for comparisons."""
    return TrainConfig.from_dict(folder.read_train_config(info), source=str(folder.run_json)).to_dict()


def recorded_config(
    run_dir: Path, given: dict[str, Any], model_flags: dict[str, Any], ablations: list[str], extra: list[str]
) -> tuple[TrainConfig, Preset | None]:
    """The settings a run was started with, for --resume; `given` flags may only repeat them."""
    folder = RunDir(run_dir)
    config = TrainConfig.from_dict(folder.read_train_config(), source=str(folder.run_json))
    config.out = str(run_dir)  # the folder may have moved since
    preset = None if config.preset is None else get_preset(config.preset, config.action)
    options = model_options_from_flags(config.model, model_flags, ablations, extra)
    given = {k: v for k, v in given.items() if v is not None}
    for key in ("features", "labels"):
        if key in given:
            given[key] = str(Path(given[key]).expanduser().resolve())
    recorded = {**config.to_dict(), **{f"model.{k}": v for k, v in config.model_options.items()}}
    changed = {k: new for k, (_, new) in differing_settings(
        recorded, {**given, **{f"model.{k}": v for k, v in options.items()}}).items()}
    if changed:
        raise TrainError(f"--resume continues {run_dir} with its recorded settings; these flags differ: {changed}")
    return config, preset


def command_config(
    out: Path, given: dict[str, Any], overrides: dict[str, Any], model_flags: dict[str, Any], ablations: list[str],
    extra: list[str], resume: bool,
) -> tuple[TrainConfig, Preset | None]:
    """The settings of one `pipeline train` command. `given`: features, labels, model, preset, action as
    passed (None when absent). With --resume of a run that exists, the run's recorded settings (flags may
    only repeat them); otherwise model defaults < preset < flags."""
    if resume and RunDir(out).has_run():
        return recorded_config(out, {**overrides, **given}, model_flags, ablations, extra)
    if given["features"] is None or given["labels"] is None:
        raise TrainError("--features and --labels are required (except with --resume of an existing run)")
    model = given["model"] or "mcmoe"
    options = model_options_from_flags(model, model_flags, ablations, extra)
    return resolve_config(given["features"], given["labels"], out, model, given["preset"], given["action"],
                          overrides, options)


def lr_at(config: TrainConfig, epoch: int) -> float:
    """Learning rate of epoch `epoch` (0-based): linear warm-up, then cosine to min_lr_ratio * lr."""
    if epoch < config.warmup_epochs:
        return config.lr * (epoch + 1) / config.warmup_epochs
    span = max(1, config.epochs - config.warmup_epochs)
    progress = (epoch - config.warmup_epochs) / span
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model_config(model: str, modalities: list[str], feature_dims: dict[str, int], options: dict[str, Any]):
    cls = config_class(model)
    known = set(cls.settings())
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"model {model!r} has no setting(s) {unknown}; its settings are {sorted(known)}")
    return cls(modalities=list(modalities), feature_dims=dict(feature_dims), **options)


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                    implementation: str = "torch-default") -> torch.optim.Optimizer:
    """Adam or AdamW over `params`, updating them with `implementation` (OPTIMIZER_IMPLEMENTATIONS)."""
    if implementation not in OPTIMIZER_IMPLEMENTATIONS:
        raise ValueError(f"optimizer implementation must be one of {OPTIMIZER_IMPLEMENTATIONS}, got {implementation!r}")
    optimizer_cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    how = {"fused": {"fused": True}, "foreach": {"foreach": True}, "torch-default": {}}[implementation]
    return optimizer_cls(params, lr=lr, weight_decay=weight_decay, **how)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    cache: FeatureCache
    labels: Labels
    modalities: list[str]
    feature_dims: dict[str, int]
    train: list[data.Sample]
    val: list[data.Sample]
    clip_num: int
    clip_num_source: str
    score_range: float
    score_range_source: str
    hidden: dict[str, list[str]]  # simulated missingness: video -> hidden modalities
    absent: dict[str, list[str]]  # genuinely absent in the data: video -> modalities
    ignored_test: int


def prepare_data(config: TrainConfig, log: Callable[[str], None]) -> TrainData:
    """Read and check labels against the cache, split, hide simulated-missing modalities, load features."""
    cache = FeatureCache.open(config.features)
    modalities, feature_dims = cache.modalities, cache.feature_dims
    labels = read_labels(config.labels)
    splits = labels.splits or {}
    usable = labels.ids_in_split("train", "val")
    ignored_test = len(labels.video_ids) - len(usable)
    if not usable:
        raise LabelError(f"{labels.path}: no rows with split train or val")
    present = check_against_cache(labels, cache, usable, require_all_labelled=not config.ignore_unlabelled)
    negative = [v for v in usable if labels.scores[v] < 0]
    if negative:
        raise LabelError(
            f"{labels.where(negative[0])}: score {labels.scores[negative[0]]} of {negative[0]!r} is negative; "
            "the models predict score / score_range in [0, 1]"
        )
    if labels.splits is not None and any(splits[v] == "val" for v in usable):
        train_ids = sorted(v for v in usable if splits[v] == "train")
        val_ids = sorted(v for v in usable if splits[v] == "val")
    else:
        train_ids, val_ids = data.split_train_val(usable, config.val_fraction, config.seed)
    if len(train_ids) < 2:
        raise LabelError(f"{labels.path}: {len(train_ids)} training video(s); at least 2 are needed")
    if not val_ids:
        log("warning: no validation split (--val-fraction 0): the last epoch is kept, nothing is selected")
    elif len(val_ids) < data.FEW_VALIDATION_VIDEOS:
        log(f"warning: only {len(val_ids)} validation videos: the epoch chosen on so few is close to a coin toss; "
            "give more (--val-fraction, or more split=val rows)")

    unknown = sorted(set(config.train_missing) - set(modalities))
    if unknown:
        raise ValueError(f"--train-missing names {unknown}, which are not modalities of the cache {modalities}")
    hidden = data.draw_train_missing(present, config.train_missing, config.seed) if config.train_missing else {}
    absent = {v: [m for m in modalities if m not in present[v]] for v in usable if len(present[v]) < len(modalities)}
    train = data.load_samples(cache, train_ids, labels.scores, hidden)
    val = data.load_samples(cache, val_ids, labels.scores, hidden)

    if config.score_range is not None:
        score_range = float(config.score_range)
        source = config.sources.get("score_range", "flag")
    else:
        score_range = max(labels.scores[v] for v in train_ids)
        source = f"largest training label ({len(train_ids)} videos)"
        if score_range <= 0:
            raise LabelError(f"{labels.path}: every training score is 0; pass --score-range")
    too_high = [v for v in train_ids if labels.scores[v] > score_range]
    if too_high:
        log(f"warning: {len(too_high)} training score(s) exceed the score range {score_range} "
            f"(e.g. {too_high[0]!r}: {labels.scores[too_high[0]]}); predictions cannot reach them")
    if config.clip_num is not None:
        clip_num, clip_source = int(config.clip_num), config.sources.get("clip_num", "flag")
    else:
        clip_num, clip_source = max(s.length for s in train), "longest training video"
    return TrainData(
        cache, labels, modalities, feature_dims, train, val, clip_num, clip_source,
        score_range, source, hidden, absent, ignored_test,
    )


# --------------------------------------------------------------------------- resume state


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {}
    for param_id, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                meta.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "non_tensor_state": meta}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, slots in meta["non_tensor_state"].items():
        state.setdefault(int(param_id), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    return tensors


def _python_numpy_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _restore_rng(tensors: dict[str, torch.Tensor], states: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["data"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_resume_state(run_dir: Path, model, optimizer, generator, epoch: int, best: dict[str, Any]) -> None:
    """Write last/ as a whole: a new folder, then swapped in by renames, so a kill never leaves a mix."""
    folder = RunDir(run_dir)
    new = folder.start_resume_state()
    save_tensors(new / "model.safetensors", model_state(model))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_tensors(new / "optimizer.safetensors", opt_tensors)
    save_tensors(new / "rng.safetensors", _rng_tensors(generator))
    folder.commit_resume_state(new, {"epoch": epoch, "optimizer": opt_meta, "rng": _python_numpy_rng(), "best": best,
                                     "scheduler": {"kind": "per-epoch warm-up + cosine", "next_epoch": epoch}})


def load_resume_state(folder: Path, model, optimizer, generator) -> dict[str, Any]:
    """Restore model, optimizer and random streams from a last/ folder; TrainError naming the file."""
    state = RunDir(folder.parent).read_resume_state(folder)
    weights, _ = load_tensors(folder / "model.safetensors")
    load_model_state(model, weights, folder / "model.safetensors")
    opt_tensors, _ = load_tensors(folder / "optimizer.safetensors")
    rng_tensors, _ = load_tensors(folder / "rng.safetensors")
    try:
        optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
        _restore_rng(rng_tensors, state["rng"], generator)
        int(state["epoch"]), dict(state["best"])
    except Exception as exc:  # missing keys, wrong shapes or types: the folder is not what train wrote
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainError(f"{folder}: cannot resume from it ({type(exc).__name__}: {reason[:200]}); "
                         f"delete {folder} to restart from epoch 1") from None
    return state


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    finished: bool  # False when stopped by stop_after_epochs
    best: dict[str, Any]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _is_better(rho: float, error: float, best: dict[str, Any]) -> bool:
    """Higher validation rho wins (undefined rho counts as lowest); equal rho: lower MSE."""
    if not best:
        return True
    rho = -2.0 if math.isnan(rho) else rho
    best_rho = -2.0 if best["val_rho"] is None else best["val_rho"]
    if rho != best_rho:
        return rho > best_rho
    best_mse = math.inf if best["val_mse"] is None else best["val_mse"]
    return error < best_mse


def _run_info(config: TrainConfig, preset: Preset | None, bundle: TrainData, counts: tuple[int, int], seq_len) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "preset": preset.to_dict() if preset else None,
        "model": config.model,
        "modalities": bundle.modalities,
        "feature_dims": bundle.feature_dims,
        "clip_num": bundle.clip_num,
        "clip_num_source": bundle.clip_num_source,
        "score_range": bundle.score_range,
        "score_range_source": bundle.score_range_source,
        "seed": config.seed,
        "features": str(bundle.cache.root.resolve()),
        "feature_config_hash": bundle.cache.config_hash,
        "labels": str(Path(config.labels).expanduser().resolve()),
        "selection": SELECTION if bundle.val else "no validation split: the last epoch",
        "selected_on": "validation" if bundle.val else "none (last epoch)",
        "validation_videos": len(bundle.val),
        "selection_note": (f"only {len(bundle.val)} validation videos: the chosen epoch is close to a coin toss"
                           if 0 < len(bundle.val) < data.FEW_VALIDATION_VIDEOS else None),
        "splits": {
            "train": [s.video_id for s in bundle.train],
            "val": [s.video_id for s in bundle.val],
            "test_rows_ignored": bundle.ignored_test,
        },
        "absent_in_data": bundle.absent,
        "train_missing": {"rates": config.train_missing, "hidden": bundle.hidden,
                          "applies_to": "training and validation videos (both are training data)"},
        "num_parameters": counts[0],
        "num_trainable_parameters": counts[1],
        "sequence_length": seq_len,
        "random_weight_features": bundle.cache.random_weights,
        "torch_version": torch.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def train(
    config: TrainConfig,
    preset: Preset | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] = _stderr,
) -> TrainResult:
    """Train (or continue) the run in `config.out`; see the module docstring for what it writes."""
    config.validate()
    run_dir = Path(config.out).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"--out {run_dir} is a file, not a run folder; choose another --out")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir, "pipeline train" + (" --resume" if resume else ""))
    holder = lock.acquire()
    if holder is not None:
        raise TrainError(f"{run_dir} is in use by another `{holder.get('command', 'pipeline train')}`: "
                         f"{describe_holder(holder)}; wait for it, or use another --out (if that process "
                         f"is surely gone, delete {lock.path})")
    try:
        return _train_locked(config, preset, resume, device, progress, stop_after_epochs, log, run_dir)
    finally:
        lock.release()
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()  # stopped before writing anything (bad labels, say): leave no empty folder


def _train_locked(
    config: TrainConfig, preset: Preset | None, resume: bool, device: str, progress: bool,
    stop_after_epochs: int | None, log: Callable[[str], None], run_dir: Path,
) -> TrainResult:
    remove_temporary_files(run_dir)  # what a killed write left; we are the folder's only writer now
    folder = RunDir(run_dir)
    if resume:
        if not folder.has_run():
            raise TrainError(f"--resume: {run_dir} holds no run ({folder.RUN} is missing)")
        try:
            differ = differing_settings(recorded_settings(folder), config.to_dict())
        except RunFolderError as exc:
            raise TrainError(str(exc)) from None
        if differ:
            raise TrainError(f"--resume: settings differ from the run in {run_dir}: {describe_differences(differ)}")
    elif folder.holds_other_files():
        raise TrainError(f"{run_dir} already holds files; pass --resume to continue that run or choose another --out")

    torch_device = resolve_device(device)
    bundle = prepare_data(config, log)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    options = {**config_class(config.model).device_defaults(torch_device.type), **config.model_options}
    model_config = build_model_config(config.model, bundle.modalities, bundle.feature_dims, options)
    if resume and folder.model_config_json.is_file():
        # The run's own record wins: a setting added to the model since the run began keeps the value
        # the run was trained with, not today's default.
        model_config = config_class(config.model).from_dict(read_model_config(run_dir)[1], str(folder.model_config_json))
    model = build_model(config.model, model_config).to(torch_device)
    if config.dropout_masks == "uniform":
        use_uniform_dropout(model)
    counts = count_parameters(model)
    seq_len = model.sequence_length(bundle.clip_num) if hasattr(model, "sequence_length") else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optimizer, params, config.lr, config.weight_decay, config.optimizer_implementation)

    log(f"{config.model}: {counts[0]:,} parameters ({counts[1]:,} trainable)"
        + (f"; LLM sequence length {seq_len} at clip_num {bundle.clip_num}" if seq_len else ""))
    log(f"data: {len(bundle.train)} train / {len(bundle.val)} val videos, modalities {bundle.modalities}, "
        f"clip_num {bundle.clip_num} ({bundle.clip_num_source}), score range {bundle.score_range:g} "
        f"({bundle.score_range_source}); batch {config.batch_size}, {config.epochs} epochs, mask policy "
        f"{config.mask_policy}" + (f", {bundle.ignored_test} test rows left out" if bundle.ignored_test else ""))
    if config.warmup_epochs >= config.epochs:
        log(f"warning: --warmup-epochs {config.warmup_epochs} >= --epochs {config.epochs}: the peak lr is never reached")
    if bundle.cache.random_weights:
        log("note: these features come from RANDOM-WEIGHT backbones; scores trained on them mean nothing")

    info = _run_info(config, preset, bundle, counts, seq_len)
    start_epoch, best, rows = 0, {}, []
    if resume:
        recorded = folder.read_info()
        if not isinstance(recorded.get("splits"), dict):
            raise TrainError(f"{folder.run_json} is not a valid run record: no \"splits\" object")
        if recorded["splits"].get("train") != info["splits"]["train"] or recorded["splits"].get("val") != info["splits"]["val"]:
            raise TrainError(f"--resume: the labels or features changed since the run started ({folder.run_json})")
        state_folder = folder.resume_folder()
        if state_folder is None:
            log(f"--resume: {run_dir} has no finished epoch yet; starting from epoch 1")
        else:
            state = load_resume_state(state_folder, model, optimizer, generator)
            start_epoch, best = int(state["epoch"]), state["best"]
            log(f"resuming {run_dir} after epoch {start_epoch} of {config.epochs}")
        try:
            rows = [r for r in folder.read_log() if int(r["epoch"]) <= start_epoch]
        except (KeyError, ValueError, TypeError) as exc:
            raise TrainError(f"{folder.log_csv} is not a training log written by train ({exc}); "
                             "move it away to continue without the earlier rows") from None
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        folder.write_info(info)
        save_model_config(run_dir, config.model, model)
        folder.write_extraction_config(bundle.cache.read_config())

    sizes = (bundle.modalities, bundle.feature_dims, bundle.clip_num)
    epochs_run = 0
    for epoch in range(start_epoch, config.epochs):
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
            log(f"stopped after epoch {epoch} as asked; continue with --resume")
            return TrainResult(run_dir, epoch, False, best)
        lr = lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        sums: dict[str, float] = {}
        seen = 0
        train_pred, train_true = [], []
        batches = data.training_batches(bundle.train, *sizes, config.batch_size, generator)
        # Updated by hand: a wrapped iterator would close the bar before the validation numbers arrive.
        bar = progress_bar(total=math.ceil(len(bundle.train) / config.batch_size), desc=f"epoch {epoch + 1}/{config.epochs}",
                   file=sys.stderr, disable=not progress, dynamic_ncols=True, leave=True)
        try:
            for index, batch in enumerate(batches):
                available = data.draw_training_masks(batch.present, config.mask_policy, generator)
                batch = batch.to(torch_device)
                available = available.to(torch_device)
                # Present-but-masked modalities keep their real features: they are the targets of
                # reconstruction-type losses; the model itself looks only at `available`.
                out = call_model(model, batch.features, available, batch.present)
                target = batch.score / bundle.score_range
                total, terms = model.loss(out, target, batch.present, available)
                if not torch.isfinite(total):
                    kept = (f"the state after epoch {start_epoch + epochs_run} is kept in {run_dir / folder.LAST}"
                            if folder.resume_folder() else "no epoch had finished, so no state was saved")
                    if best:
                        kept += f"; the best checkpoint (epoch {best['epoch']}) is {folder.weights()}"
                    described = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
                    raise NonFiniteLossError(
                        f"non-finite loss {total.item()} at epoch {epoch + 1}, batch {index + 1} ({described}); "
                        f"training stopped: {kept}. Try a lower --lr or --grad-clip."
                    )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                size = len(batch.video_ids)
                seen += size
                for key, value in {"loss": total.detach(), **terms}.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * size
                train_pred.append(out["score"].detach().float().cpu() * bundle.score_range)
                train_true.append(batch.score.cpu())
                bar.set_postfix({k: f"{v / seen:.3g}" for k, v in sums.items()}, refresh=False)
                bar.update(1)

            row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
            row.update({k: v / seen for k, v in sums.items()})
            row["train_rho"] = spearman_rho(torch.cat(train_pred).numpy(), torch.cat(train_true).numpy())
            if bundle.val:
                predicted = predict(model, bundle.val, *sizes, device=torch_device, batch_size=config.batch_size)
                truth = np.array([s.score for s in bundle.val])
                row["val_rho"] = spearman_rho(predicted * bundle.score_range, truth)
                row["val_mse"] = mse(predicted * bundle.score_range, truth)
                # validation first: a narrow terminal cuts the end of the line
                bar.set_postfix({"val_rho": f"{row['val_rho']:.3f}", "val_mse": f"{row['val_mse']:.3g}",
                                 **{k: f"{v / seen:.3g}" for k, v in sums.items()}})
            else:
                row["val_rho"], row["val_mse"] = None, None
        finally:
            bar.close()

        rows.append(row)
        if not bundle.val or _is_better(row["val_rho"], row["val_mse"], best):
            best = {"epoch": epoch + 1, "val_rho": _finite_or_none(row["val_rho"]), "val_mse": _finite_or_none(row["val_mse"])}
            save_tensors(folder.weights(), model_state(model), {"best": best, "model": config.model})
        # every epoch, so a run stopped early says how far it got ("epoch 3 of 410, stopped after 5")
        progress_note = {"epochs_done": epoch + 1, "epochs_planned": config.epochs}
        folder.write_best({**best, "selection": info["selection"], **progress_note})
        folder.write_log(rows)  # before the swap: a resume drops rows beyond its state
        save_resume_state(run_dir, model, optimizer, generator, epoch + 1, best)
        epochs_run += 1

    if not best:
        raise TrainError(f"{run_dir}: no epoch finished")
    if bundle.val:
        # Per-setting validation metrics of the chosen weights (2^M - 1 forward passes over val, once).
        weights, _ = load_tensors(folder.weights())
        load_model_state(model, weights)
        evaluation = evaluate_samples(model, bundle.val, *sizes, bundle.score_range, torch_device, config.batch_size)
        folder.write_best({**best, "selection": info["selection"], "epochs_done": config.epochs,
                           "epochs_planned": config.epochs, "val_settings": evaluation.to_dict()})
    shown = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    log(f"done: best epoch {best['epoch']}"
        + (f" (val rho {shown(best['val_rho'])}, val MSE {shown(best['val_mse'])})" if bundle.val else "")
        + f"; run folder {run_dir}")
    return TrainResult(run_dir, config.epochs, True, best)
