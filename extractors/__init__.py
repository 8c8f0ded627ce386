"""Frozen backbones turning decoded segments into feature vectors, one registered class per backbone.

Importing the package registers every backbone below; a new modality or backbone is a new module
with an `@register(modality, name)` class and one import line here.
"""

# isort: off  (registration order is the order backbones are listed in, defaults first)
from extractors import rgb_vst, rgb_timesformer, flow_i3d, audio_ast  # noqa: F401
# isort: on
from extractors.base import (
    REGISTRY,
    Extractor,
    WeightsSource,
    WeightsUnavailableError,
    available_backbones,
    build_extractors,
    checkpoint_path,
    extractor_class,
    find_local_file,
    register,
)
from extractors.config import ExtractionConfig

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
