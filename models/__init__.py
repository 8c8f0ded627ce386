"""Scorers trained on cached features, and a small registry of them by name.

Every model follows one contract, so `pipeline train/evaluate/score` never branch on the model:

    config = CONFIGS[name](modalities=[...], feature_dims={...}, **hyper_parameters)   # a dataclass
    model = build_model(name, config)            # nn.Module with .config and .modalities
    out = model(features, available)             # features: {modality: (B, T, C_m) float32},
                                                 #   zeros where a modality is absent or masked;
                                                 # available: (B, M) bool in model.modalities order,
                                                 #   what the model may look at (>= 1 True per row)
    out["score"]                                 # (B,) in [0, 1] (labels divided by the score range)
    total, terms = model.loss(out, target, present, available)
                                                 # target (B,) in [0, 1]; present (B, M) bool: the
                                                 # modality exists in the data (a real target for
                                                 # reconstruction-type terms); terms: {name: scalar}

Per-sample masks: one batch may mix samples missing different modalities.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, config class, model class). Imported lazily: LIMSSR pulls in transformers/peft.
REGISTRY: dict[str, tuple[str, str, str]] = {
    "mcmoe": ("models.mcmoe", "MCMoEConfig", "MCMoE"),
    "limssr": ("models.limssr", "LIMSSRConfig", "LIMSSR"),
}


def _lookup(name: str) -> tuple[type, type]:
    try:
        module_name, config_name, model_name = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(REGISTRY)}") from None
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, model_name)


def config_class(name: str) -> type:
    return _lookup(name)[0]


def build_model(name: str, config: Any):
    """Build model `name` from its config dataclass (or a dict of its fields)."""
    config_cls, model_cls = _lookup(name)
    if isinstance(config, dict):
        config = config_cls.from_dict(config)
    return model_cls(config)
