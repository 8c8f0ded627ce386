"""The one way into the extract stage: `extract_into(out, config, videos)` makes or extends the cache
of `config` in OUT/<config-hash>/ (named by `cache_folder`, and nowhere else), building the backbones
only when some video needs them. `pipeline extract`, `score`, the Ray workers and the benchmarks all
go through it. Pretrained weights files are identified by content first (extractors.base.identify_weights):
files other than the public ones name another folder."""

from __future__ import annotations

from pathlib import Path

import torch

from extractors.base import (BackboneUnavailableError, Extractor, WeightsSource, build_extractors, feature_versions,
                             identify_weights, with_weights)
from extractors.config import ExtractionConfig
from manifests.cache import CONFIG_NAME, CacheConfig, FeatureCache, open_cache
from pipeline.devices import describe_device, native_bf16
from pipeline.extraction.loop import ExtractSummary, extract_videos, needs_work
from pipeline.videos import VideoSource


def cache_folder(out: Path, config: ExtractionConfig) -> Path:
    """OUT/<config-hash>/: the folder of `config`'s features inside the cache folder `out`."""
    return Path(out).expanduser() / config.config_hash()


def cache_if_complete(
    out: Path, config: ExtractionConfig, sources: list[VideoSource], retry_failed: bool = False, verify: bool = False
) -> FeatureCache | None:
    """The existing cache of `config` when every source in it is final, else None.

    Lets `extract` with nothing to do skip building the backbones. The stored extractors must be the
    ones this code would build (names and versions, known without building them)."""
    cache = FeatureCache(cache_folder(out, config))
    if not (cache.root / CONFIG_NAME).is_file():
        return None
    if cache.config.version_mismatch(feature_versions(config)):
        return None  # open_cache explains the difference once the extractors are built
    if any(needs_work(cache, s, retry_failed, verify) for s in sources):
        return None
    return cache


def open_extraction(
    out: Path, config: ExtractionConfig, device: torch.device, weights: WeightsSource
) -> tuple[FeatureCache, dict[str, Extractor]]:
    """The backbones of `config` (every pretrained weight checked first) and its cache in `out`, made
    or checked against them (open_cache). `config` is identified (identify_weights): weights files here
    other than those it names are refused, as they would belong in another folder."""
    here = identify_weights(config, weights)[0].weights_sha256
    if here != config.weights_sha256:
        raise BackboneUnavailableError(
            f"the pretrained weights files here ({here or 'the public files'}) are not those the extraction "
            f"configuration names ({config.weights_sha256 or 'the public files'}): their features belong in "
            "another cache folder")
    extractors = build_extractors(config, device, weights)
    return open_cache(out, CacheConfig.extracted(config, extractors)), extractors


def extract_into(
    out: Path | FeatureCache,
    config: ExtractionConfig,
    videos: list[VideoSource],
    *,
    device: torch.device = torch.device("cpu"),
    weights: WeightsSource = WeightsSource(),
    extractors: dict[str, Extractor] | None = None,
    batch_segments: int = 8,
    retry_failed: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> tuple[ExtractSummary, FeatureCache]:
    """Extract `videos` into the cache of `config` in the folder `out` (skipping finished ones).

    out: a cache folder (the configuration's own folder is made or reused inside it), or a cache
    already opened and checked by the caller, used as it is.
    extractors: backbones already built for `config` (a Ray worker's, a benchmark's); by default they
    are built here, and only when some video needs them.
    Raises BackboneUnavailableError (weights or a library missing) and CacheError (the folder holds
    other features) before any video is touched."""
    if config.precision == "bf16" and not native_bf16(device):
        raise BackboneUnavailableError(f"precision bf16 asked for on a {describe_device(device)} without native bf16 "
                                       "(AVX512_BF16 or AMX on a CPU): it would be emulated; extract with --precision fp32")
    if isinstance(out, FeatureCache):
        cache = out  # its caller chose it for these weights
        extractors = build_extractors(config, device, weights) if extractors is None else extractors
    elif extractors is not None:  # the folder follows the contents of the weights files they loaded
        if not config.random_weights:
            config = with_weights(config, {m: e.weights_identity for m, e in extractors.items()})
        cache = open_cache(out, CacheConfig.extracted(config, extractors))
    else:
        config = identify_weights(config, weights)[0]  # the folder follows the weights files' contents
        cache, extractors = cache_if_complete(out, config, videos, retry_failed, verify), {}
        if cache is None:  # something to do: only now are the backbones worth building
            cache, extractors = open_extraction(out, config, device, weights)
    summary = extract_videos(videos, cache, extractors, config, batch_segments=batch_segments,
                             retry_failed=retry_failed, progress=progress, verify=verify)
    return summary, cache
