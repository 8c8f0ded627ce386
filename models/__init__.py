"""Scorers trained on cached features, and a small registry of them by name.

Every model follows one contract, so `pipeline train/evaluate/score` never branch on the model:

    config = config_class(name)(modalities=[...], feature_dims={...}, **settings)   # a ModelConfig
    model = build_model(name, config)            # nn.Module with .config and .modalities
    out = model(features, available, present)   # features: {modality: (B, T, C_m) float32},
                                                 #   zeros where a modality is absent or masked;
                                                 # available: (B, M) bool in model.modalities order,
                                                 #   what the model may look at (>= 1 True per row);
                                                 # present: (B, M) bool or None, the modality exists in
                                                 #   the data (None: the ones not all zero); a model may
                                                 #   ignore it, never look at a present modality through it
    out["score"]                                 # (B,) in [0, 1] (labels divided by the score range)
    total, terms = model.loss(out, target, present, available)
                                                 # target (B,) in [0, 1]; present as above, a real
                                                 # target for reconstruction-type terms; terms: {name: scalar}

Per-sample masks: one batch may mix samples missing different modalities.

Optional, used when a model has them: out["grade_weights"] (B, N) (reported by evaluate / score),
`sequence_length(T)` (recorded in run.json), `state_to_save()` / `load_saved_state(state)` (a smaller
checkpoint: models/checkpoint.py).

Each model's config class inherits `ModelConfig` and declares, as class-level data, everything the
pipeline needs to know about the model's settings (the pipeline reads them through `config_class(name)`
and never names a model):

    training_defaults()   optimiser and schedule: the TrainConfig keys optimizer, lr, weight_decay,
                          batch_size, epochs, warmup_epochs, min_lr_ratio, grad_clip, mask_policy
    training_defaults_for(options)  the same given the model settings chosen (a variant of the model
                          may train differently); by default training_defaults()
    ABLATIONS             `--ablation NAME` -> config fields it sets
    FLAG_FIELDS           generic `pipeline train` flag (hidden, dropout, alpha, ...) -> the config field
                          it sets; a flag not listed does not apply to the model
    PATH_FIELDS           fields naming a hub id or a local folder; a folder is recorded as an absolute path
    PRESET_TRAINING       published settings of a preset (pipeline/presets.py) the model trains with
    PRESET_FIELDS         preset value -> the config field it sets (a preset's model settings)
    from_preset(preset)   (training settings, config fields) a preset gives the model; by default the two
                          mappings above, over the preset's (MCMoE's) published values. A model whose
                          authors trained each dataset otherwise overrides it with its own table keyed by
                          the preset's dataset and target (LIMSSR: REFERENCE_COMMANDS)
    GPUS_PER_RUN          GPU share of one run when `pipeline reproduce` runs several on a GPU
    device_defaults(kind) config fields that default differently on a device kind ("cuda", "cpu")

Adding a model: a module in models/ with its config (a ModelConfig dataclass, fields `modalities` and
`feature_dims` first) and its nn.Module, and one REGISTRY line below.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar

from manifests.config import RecordedConfig

# name -> (module, config class, model class). Imported lazily: LIMSSR pulls in transformers/peft.
REGISTRY: dict[str, tuple[str, str, str]] = {
    "mcmoe": ("models.mcmoe", "MCMoEConfig", "MCMoE"),
    "limssr": ("models.limssr", "LIMSSRConfig", "LIMSSR"),
}


@dataclasses.dataclass
class ModelConfig(RecordedConfig):
    """The settings a model declares besides its fields (see the module docstring)."""

    ABLATIONS: ClassVar[dict[str, dict[str, Any]]] = {}
    FLAG_FIELDS: ClassVar[dict[str, str]] = {}
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()
    PRESET_TRAINING: ClassVar[tuple[str, ...]] = ()
    PRESET_FIELDS: ClassVar[dict[str, str]] = {}
    GPUS_PER_RUN: ClassVar[float] = 1.0

    @classmethod
    def training_defaults(cls) -> dict[str, Any]:
        raise NotImplementedError(f"{cls.__name__} must declare its training defaults")

    @classmethod
    def training_defaults_for(cls, options: dict[str, Any]) -> dict[str, Any]:
        return cls.training_defaults()

    @classmethod
    def device_defaults(cls, device_type: str) -> dict[str, Any]:
        return {}

    @classmethod
    def settings(cls) -> list[str]:
        """The fields a user may set: every field but the data's modalities and feature dims."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("modalities", "feature_dims")]

    @classmethod
    def from_preset(cls, preset: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(training settings, config fields) this model takes from a preset's published settings."""
        return ({key: getattr(preset, key) for key in cls.PRESET_TRAINING},
                {field: getattr(preset, key) for key, field in cls.PRESET_FIELDS.items()})


def _lookup(name: str) -> tuple[type, type]:
    try:
        module_name, config_name, model_name = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(REGISTRY)}") from None
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, model_name)


def config_class(name: str) -> type[ModelConfig]:
    return _lookup(name)[0]


def build_model(name: str, config: Any, source: str | None = None):
    """Build model `name` from its config (or a dict of its fields, read from the file `source`)."""
    config_cls, model_cls = _lookup(name)
    if isinstance(config, dict):
        config = config_cls.from_dict(config, source)
    return model_cls(config)
