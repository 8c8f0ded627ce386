"""Frozen backbones turning decoded segments into feature vectors, one registered class per backbone.

A new modality or backbone is a new module with an `@register(modality, name)` class, its module
name in `extractors.base.BACKBONE_MODULES` and its settings class, registered under the same names,
in `extractors.settings`.
The package imports nothing heavy itself: `extractors.config` (and so the command line) loads without
torch, and the backbone modules are imported the first time the registry is consulted.
"""

from __future__ import annotations

import importlib

__all__ = [
    "REGISTRY",
    "ExtractionConfig",
    "Extractor",
    "WeightsSource",
    "WeightsUnavailableError",
    "available_backbones",
    "build_extractors",
    "checkpoint_path",
    "extractor_class",
    "find_local_file",
    "register",
]


def __getattr__(name: str):
    """`from extractors import build_extractors` etc.: loads extractors.base (torch) on first use."""
    if name == "ExtractionConfig":
        from extractors.config import ExtractionConfig

        return ExtractionConfig
    if name in __all__:
        base = importlib.import_module("extractors.base")
        base.load_backbones()
        return getattr(base, name)
    raise AttributeError(f"module 'extractors' has no attribute {name!r}")
