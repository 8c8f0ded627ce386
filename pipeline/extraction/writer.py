"""The writer: a finished video's arrays, then its record (last: only then is the video trusted),
or the record of a failed one; each releases the video's claim."""

from __future__ import annotations

import numpy as np

from extractors.base import Extractor
from extractors.config import ExtractionConfig
from manifests.cache import DONE, FAILED, MISSING, FeatureCache, ModalityRecord, VideoRecord, file_sha256
from manifests.claims import Claims
from pipeline.extraction.events import VideoJob, now


class Writer:
    def __init__(self, cache: FeatureCache, extractors: dict[str, Extractor], config: ExtractionConfig,
                 claims: Claims) -> None:
        self.cache, self.extractors, self.config, self.claims = cache, extractors, config, claims

    def _version(self, extractor: Extractor) -> str:
        return extractor.feature_version(self.config)

    def finish(self, job: VideoJob) -> VideoRecord | None:
        """Save the video's arrays (in the configured dtype) and then its record; the video fails instead
        when an array holds NaN/inf. None when another process took the video over meanwhile (its claim
        is gone): nothing is written."""
        record, dtype = job.record, np.dtype(self.config.feature_dtype)
        with np.errstate(over="ignore"):  # an overflow is reported below, as inf
            arrays = {m: job.features[m].astype(dtype) for m in job.features}
        for modality, array in arrays.items():  # checked after the cast: float16 overflows to inf
            bad = ~np.isfinite(array).all(axis=1)
            if bad.any():
                where = np.flatnonzero(bad)
                return self.fail(job, f"NaN/inf values in {len(where)} of {len(array)} segments (first: segment "
                                      f"{where[0]}); not saved", failed_modality=modality)
        if not self.claims.still_held(record.video_id):
            # silent longer than the stale limit (a suspended process): another process took the video over
            self.claims.release(record.video_id)
            return None
        for modality, extractor in self.extractors.items():
            if extractor.input_kind == "audio" and job.audio_missing:
                self.cache.feature_path(record.video_id, modality).unlink(missing_ok=True)
                record.modalities[modality] = ModalityRecord(
                    MISSING, extractor=extractor.name, version=self._version(extractor), reason="no audio track"
                )
                continue
            array = arrays[modality]
            path = self.cache.feature_path(record.video_id, modality)
            self.cache.save_features(record.video_id, modality, array)
            record.modalities[modality] = ModalityRecord(
                DONE, shape=list(array.shape), extractor=extractor.name, version=self._version(extractor),
                bytes=path.stat().st_size, sha256=file_sha256(path),
            )
        if not self.claims.still_held(record.video_id):
            # taken while the arrays were saved (a Ray driver gives a lost worker's video to another
            # worker at once): the new holder writes the record, over arrays equal to these
            self.claims.release(record.video_id)
            return None
        record.status, record.error, record.finished_at = DONE, None, now()
        self.cache.write_record(record)  # last: only now is the video trusted
        self.claims.release(record.video_id)
        return record

    def fail(self, job: VideoJob, reason: str, failed_modality: str | None = None) -> VideoRecord | None:
        """Record the video as failed (every modality, or `failed_modality` and the others not saved).
        None when it was recorded already (a video can fail in the decoder and in a backbone batch)."""
        if job.record.finished_at:
            return None
        job.failed = True
        record = job.record
        record.status, record.finished_at = FAILED, now()
        record.error = reason if failed_modality is None else f"{failed_modality} features: {reason}"
        for modality, extractor in self.extractors.items():
            if failed_modality is not None and modality != failed_modality:
                why = f"not saved: {failed_modality} failed"
            else:
                why = reason
            record.modalities[modality] = ModalityRecord(
                FAILED, extractor=extractor.name, version=self._version(extractor), reason=why
            )
        job.features.clear()
        self.cache.write_record(record)
        self.claims.release(record.video_id)
        return record
