"""The settings of a `pipeline train` run: `TrainConfig` (recorded in run.json under "config") and how
one command's flags, a preset and the model's defaults resolve into it, or into a recorded run's own
settings for --resume."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extractors.config import PRECISIONS
from manifests.config import RecordedConfig
from manifests.run import RunDir, RunRecord, differing_settings
from models import config_class
from pipeline import data
from pipeline.presets import Preset, get_preset

OPTIMIZERS = ("adam", "adamw")
# How the optimiser updates the parameters: "fused" (one kernel over each tensor), "foreach" (each
# operator over all tensors at once) or "torch-default" (torch's choice: one set of operators per tensor
# on a CPU, foreach on a GPU).
OPTIMIZER_IMPLEMENTATIONS = ("fused", "foreach", "torch-default")
# How the dropout layers draw their masks when training on a CPU: "uniform" (uniform draws compared with
# p: models.layers.UniformDropout, faster to draw; benchmarks/results/README.md) or "bernoulli" (torch's
# own). Same distribution, other random numbers.
DROPOUT_MASKS = ("uniform", "bernoulli")
# The arithmetic of a training step's forward pass and loss: one of PRECISIONS (extraction's), "fp32" or
# "bf16" (torch.autocast to bfloat16; weights, gradients, optimiser state and the loss's final terms stay float32).
TRAINING_KEYS = (
    "optimizer", "lr", "weight_decay", "batch_size", "epochs",
    "warmup_epochs", "min_lr_ratio", "grad_clip", "mask_policy",
)
# TrainConfig settings whose source run.json records (besides the model-config fields).
RECORDED_KEYS = TRAINING_KEYS + ("optimizer_implementation", "dropout_masks", "precision", "clip_num", "score_range",
                                 "val_fraction", "seed", "train_missing", "ignore_unlabelled")


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


@dataclass
class TrainConfig(RecordedConfig):
    """Every setting of a run, resolved: model defaults < preset < flags; recorded in run.json.

    A record of schema 1 or 2 lacks dropout_masks (and schema 1 optimizer_implementation): its run was
    trained with "bernoulli" masks and "torch-default" updates, which `upgrade` fills in so a resume
    continues it bit for bit. A record before schema 4 lacks precision: its run trained in "fp32"."""

    SCHEMA_VERSION = 4

    features: str
    labels: str
    out: str
    model: str = "mcmoe"
    preset: str | None = None
    action: str | None = None
    optimizer: str = "adam"
    # How Adam's update runs (OPTIMIZER_IMPLEMENTATIONS). "fused" is faster, but the update is a small
    # part of an MCMoE step on a CPU (benchmarks/results/README.md) and its weights differ from torch's
    # default update by float rounding: the default keeps torch's own rounding.
    optimizer_implementation: str = "torch-default"
    # Dropout masks on a CPU (DROPOUT_MASKS): "uniform", since torch's bernoulli_ masks are a large part
    # of an MCMoE step (benchmarks/results/README.md); no effect on a GPU or in evaluation.
    dropout_masks: str = "uniform"
    # PRECISIONS; "bf16" needs a device that computes bfloat16 natively (pipeline.devices.native_bf16).
    precision: str = "fp32"
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
        return {"optimizer_implementation": "torch-default", "dropout_masks": "bernoulli", "precision": "fp32", **data}

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.optimizer_implementation not in OPTIMIZER_IMPLEMENTATIONS:
            raise ValueError(f"--optimizer-implementation must be one of {OPTIMIZER_IMPLEMENTATIONS}, "
                             f"got {self.optimizer_implementation!r}")
        if self.dropout_masks not in DROPOUT_MASKS:
            raise ValueError(f"--dropout-masks must be one of {DROPOUT_MASKS}, got {self.dropout_masks!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
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


def recorded_settings(folder: RunDir, record: RunRecord | None = None) -> dict[str, Any]:
    """The run's TrainConfig as a dict in the current layout (an older record upgraded), for comparisons."""
    return TrainConfig.from_dict(folder.read_train_config(record), source=str(folder.run_json)).to_dict()


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
