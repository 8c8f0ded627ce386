"""The score stage: new clips -> the run's exact extraction -> the run's model -> scores.

Backbones and the scorer are loaded once per invocation and every clip's segments go through the
backbones together. A clip already extracted with the run's configuration (found by its content
fingerprint, in the run's own training cache or in the score cache) is not extracted again.

Next to other commands on the same run:
- two `score` share the score cache: a clip another live process is extracting into it (it holds the
  clip's claim, manifests/claims.py) is waited for, up to `wait` seconds (WAIT_FOR_OTHERS_S by
  default), and its features are used; if that process lets the clip go unfinished (stopped, killed),
  this one extracts it;
- the model's weights are read once, with the epoch that names them (one file, replaced whole by
  `train`), and every output names that epoch and says when a live `train` held the run's lock then.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from extractors.base import WeightsSource, identify_weights
from extractors.config import PRECISIONS, ExtractionConfig
from extractors.recipes import PROJECT, RECIPES, recipe
from manifests.cache import (CONFIG_NAME, DONE, FAILED, WEIGHTS_FILES_KEY, CacheError, FeatureCache, VideoRecord,
                             weights_difference)
from manifests.claims import describe_holder
from pipeline.data import Sample
from pipeline.devices import describe_device, native_bf16, resolve_precision
from pipeline.extraction.entry import cache_folder, extract_into
from pipeline.inference import OTHER_PRECISION, Run, RunError, load_run
from pipeline.provenance import provenance
from pipeline.tables import Table, write_table
from pipeline.videos import VIDEO_EXTENSIONS, VideoSource, file_fingerprint, legacy_fingerprint

# How long score waits for clips another live process is extracting into the same cache: long enough
# for a long clip on a CPU; a holder that dies is noticed sooner (manifests/claims.py).
WAIT_FOR_OTHERS_S = 1800.0
WAIT_POLL_S = 2.0  # how often the cache is looked at meanwhile (a few file reads per clip)


class ScoreError(RuntimeError):
    """The run and the clips or caches cannot be used together; the message says why."""


@dataclass
class ClipScore:
    clip: str
    score: float | None = None  # on the original scale
    present: list[str] = field(default_factory=list)  # modalities the clip has
    imputed: list[str] = field(default_factory=list)  # modalities the model generated for it
    grade_weights: list[float] | None = None
    error: str | None = None
    video_id: str | None = None
    random_weights: bool | None = None  # of the backbones behind the run's features (pipeline.provenance)
    config_hash: str | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict)  # the weights used (inference.Run.checkpoint)
    checkpoint_words: str = ""  # the same in words (Run.describe_checkpoint), for headlines
    score_rule: str | None = None  # a batch-position run's rule for one clip (Run.score_rule); not a column

    def row(self) -> dict:
        return {
            "clip": self.clip,
            "score": None if self.score is None else round(self.score, 4),
            "random_weights": self.random_weights,
            "config_hash": self.config_hash,
            "checkpoint_epoch": self.checkpoint.get("epoch"),
            "training_in_progress": self.checkpoint.get("training_in_progress"),
            "present": ",".join(self.present),
            "imputed": ",".join(self.imputed),
            "error": self.error,
            "grade_weights": None if self.grade_weights is None else [round(w, 4) for w in self.grade_weights],
        }


def collect_clips(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to the videos under them, in order, without repeats."""
    clips: list[Path] = []
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_dir():
            clips += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
        else:
            clips.append(item)
    seen, unique = set(), []
    for clip in clips:
        if clip.resolve() not in seen:
            seen.add(clip.resolve())
            unique.append(clip)
    return unique


def run_extraction_config(run: Run) -> ExtractionConfig:
    """The extraction new clips must go through: the one the run was trained on, or, for weights trained
    on a published feature set (an imported checkpoint), the recipe that remakes that set from raw video."""
    recorded, expected = run.extraction_config, run.feature_recipe
    if recorded.get("source") == "extract" and "extraction" in recorded:
        config = ExtractionConfig.from_dict(recorded["extraction"], source=str(run.folder.extraction_json))
        if config.recipe == expected:
            return config
    if expected in RECIPES and expected != PROJECT:
        return ExtractionConfig.from_recipe(expected, modalities=tuple(run.modalities))
    raise ScoreError(
        f"run {run.directory} was trained on features imported from {recorded.get('source')!r}, whose "
        "extraction this project cannot repeat on raw clips; train on features made by "
        "`pipeline extract` to score raw videos"
    )


PRECISION_CHOICES = ("run", "auto", *PRECISIONS)  # `score --precision`


def precision_here(config: ExtractionConfig, device: torch.device, choice: str = "run") -> tuple[ExtractionConfig, str | None]:
    """The run's extraction in the precision `choice` names, and a note when that is not the one the run's
    features were computed in. "run" keeps the run's, except bf16 where `device` has no native bf16: fp32
    then, instead of refusing the clips (the two differ far less than the training seed moves scores);
    auto/fp32/bf16 as `extract --precision` (a recipe's fixed precision stays)."""
    trained = config.precision
    if choice == "run":
        wanted = "fp32" if trained == "bf16" and not native_bf16(device) else trained
    else:
        fixed = recipe(config.recipe).config.get("precision")
        try:
            wanted = resolve_precision(choice, device, fixed=fixed)
        except ValueError as exc:
            raise ScoreError(str(exc)) from None
        if fixed is not None and wanted != fixed:
            raise ScoreError(f"--precision {choice}: the run's recipe {config.recipe} fixes precision {fixed}")
    if wanted == trained:
        return config, None
    why = f"this {describe_device(device)} has no native bf16" if choice == "run" else f"--precision {choice}"
    return config.in_precision(wanted, device.type), (
        f"the run was trained on features computed in {trained}; the clips' are computed in {wanted} ({why}); "
        f"{OTHER_PRECISION}")


def check_run_weights(run: Run, config: ExtractionConfig, weights: WeightsSource) -> None:
    """ScoreError in one line naming both when the pretrained weights files here are not, by content, those
    the run's features were made with (nothing to check for random weights)."""
    if config.random_weights:
        return
    _, described = identify_weights(config, weights)
    here = {"extractors": {m: {WEIGHTS_FILES_KEY: files} for m, files in described.items()}}
    differ = weights_difference(run.extraction_config, here)
    if differ:
        raise ScoreError(f"run {run.directory} was trained on features of other pretrained weights than the files "
                         f"here ({differ}: run vs here); put the run's weights files in --weights-dir")


def _fingerprint_index(caches: list[FeatureCache]) -> dict[str, tuple[FeatureCache, VideoRecord]]:
    index = {}
    for cache in caches:
        for record in cache.records():
            if record.status == DONE and record.fingerprint:
                index.setdefault(record.fingerprint, (cache, record))
    return index


def score_clips(
    clips: list[Path],
    run_dir: Path,
    *,
    device: torch.device,
    features: Path | None = None,
    weights: WeightsSource = WeightsSource(),
    batch_segments: int = 8,
    progress: bool = True,
    allow_other_recipe: bool = False,
    wait: float = WAIT_FOR_OTHERS_S,
    precision: str = "run",
) -> list[ClipScore]:
    """Score every clip with the run's model; a clip that fails gets a row with its error.

    wait: seconds to wait for clips another live process is extracting into the same cache.
    precision: what new clips' features are computed in (PRECISION_CHOICES, see precision_here)."""
    run = load_run(run_dir, device)
    config, note = precision_here(run_extraction_config(run), device, precision)
    if note:
        print(f"NOTE: {note}", file=sys.stderr)

    # Where features come from: --features if given (checked), else the run's own cache is consulted
    # read-only and new clips go to <run>/score_cache, so scoring never mixes into training data.
    lookup: list[FeatureCache] = []
    if features is not None:
        target = run.open_features(features, allow_other_recipe)  # refuses features made differently
    else:
        target = FeatureCache(cache_folder(run.folder.score_cache(), config))
        try:
            lookup.append(run.open_features())
        except (CacheError, RunError, OSError):
            pass  # the training cache moved or is gone: only reuse is lost
    # The features the clips are scored from: new clips go through `config` (for an imported checkpoint,
    # its recipe's extraction rather than the published set the run names).
    made = (provenance(target.read_config()) if features is not None
            else {"random_weights": config.random_weights, "config_hash": config.config_hash()})
    results = [ClipScore(clip=str(clip), **made, checkpoint=run.checkpoint, checkpoint_words=run.describe_checkpoint())
               for clip in clips]
    known = _fingerprint_index(lookup + ([target] if (target.root / CONFIG_NAME).is_file() else []))
    legacy_known = any(not fingerprint.startswith("sha256:") for fingerprint in known)  # sampled fingerprints

    to_extract: list[VideoSource] = []
    queued: dict[str, str] = {}  # fingerprint -> video id, for clips queued in this call
    located: dict[int, tuple[FeatureCache, str]] = {}
    for index, clip in enumerate(clips):
        if not clip.is_file():
            results[index].error = f"no such file: {clip}"
            continue
        _, fingerprint = file_fingerprint(clip)  # hashed once: extraction below reuses it
        found = known.get(fingerprint) or (known.get(legacy_fingerprint(clip)) if legacy_known else None)
        if found is not None:
            cache, record = found
            located[index] = (cache, record.video_id)
        elif fingerprint in queued:  # the same file given twice: extract it once
            located[index] = (target, queued[fingerprint])
        else:
            video_id = queued[fingerprint] = f"{clip.stem}-{fingerprint.split(':')[-1][:8]}"
            to_extract.append(VideoSource(video_id, clip.absolute()))  # the manifest records absolute paths
            located[index] = (target, video_id)

    left_elsewhere: dict[str, str] = {}  # video id -> why it is still not extracted
    if to_extract:
        check_run_weights(run, config, weights)  # before any clip is extracted with other weights
        # located rows name `target`: extract_into makes its folder (inside the score cache) when needed
        def extract(sources: list[VideoSource]) -> list[str]:
            summary, _ = extract_into(target if features is not None else run.folder.score_cache(), config,
                                      sources, device=device, weights=weights, batch_segments=batch_segments,
                                      progress=progress)
            return summary.claimed_elsewhere

        elsewhere = set(extract(to_extract))
        left_elsewhere = wait_for_others(target, [s for s in to_extract if s.video_id in elsewhere], extract, wait)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    samples, where = [], []
    for index, (cache, video_id) in located.items():
        record = cache.read_record(video_id)
        if record is None or record.status != DONE:
            results[index].error = ((record.error if record else None) or left_elsewhere.get(video_id)
                                    or "extraction did not finish")
            continue
        features_of_clip = {m: a for m, a in cache.load_features(video_id).items() if m in run.modalities}
        if not features_of_clip:
            results[index].error = f"none of the run's modalities {run.modalities} could be extracted"
            continue
        results[index].video_id = video_id
        results[index].present = [m for m in run.modalities if m in features_of_clip]
        results[index].imputed = [m for m in run.modalities if m not in features_of_clip]
        samples.append(Sample(video_id, features_of_clip))
        where.append(index)

    if samples:
        predictions = run.predict(samples)
        for index, (score, grades) in zip(where, predictions):
            results[index].score, results[index].grade_weights = score, grades
            results[index].score_rule = run.score_rule
    return results


def _final(cache: FeatureCache, video_id: str) -> bool:
    record = cache.read_record(video_id)
    return record is not None and record.status in (DONE, FAILED)


def wait_for_others(
    cache: FeatureCache, sources: list[VideoSource], extract: Callable[[list[VideoSource]], list[str]], wait: float
) -> dict[str, str]:
    """Wait until every source, left by `extract` to another live process, has its record in `cache`.

    A source whose claim is let go unfinished (its holder stopped or died) is given to `extract` again
    (which returns the ids it left to another process once more). After `wait` seconds, the ones still
    held elsewhere are given up: {video id: why}, the reason naming the holder."""
    claims, deadline = cache.claims(), time.monotonic() + wait
    pending = list(sources)
    if pending:
        holder = claims.live_holder(pending[0].video_id)
        print(f"score: another process is extracting {len(pending)} of the clips into {cache.root} "
              f"({describe_holder(holder) if holder else 'it just finished'}); waiting up to {wait:g} s for it",
              file=sys.stderr)
    while True:
        pending = [s for s in pending if not _final(cache, s.video_id)]
        let_go = [s for s in pending if claims.live_holder(s.video_id) is None]
        if let_go:
            extract(let_go)
            pending = [s for s in pending if not _final(cache, s.video_id)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
    return {s.video_id: f"still being extracted into {cache.root} by {describe_holder(claims.live_holder(s.video_id))} "
                        f"after waiting {wait:g} s (score --wait); score it again later" for s in pending}


def scores_table(results: list[ClipScore], run_dir: Path) -> Table:
    """The scores with their provenance and the checkpoint used; grade weights become one column per
    grade in flat formats. The note and the JSON file name the rule a batch-position run scored each
    clip by (Run.score_rule)."""
    made = {"random_weights": results[0].random_weights, "config_hash": results[0].config_hash}
    first = results[0]
    rule = next((r.score_rule for r in results if r.score_rule), None)
    return Table(f"scores of run {run_dir} ({first.checkpoint_words})" + (f" ({rule})" if rule else ""), made,
                 [r.row() for r in results],
                 context={"run": str(Path(run_dir).absolute()), "checkpoint": first.checkpoint,
                          **({"score_rule": rule} if rule else {})},
                 rows_key="scores", expand={"grade_weights": "grade_{}_weight"})


def format_scores(results: list[ClipScore]) -> str:
    """The score table as the terminal shows it (the provenance and checkpoint are in the headline above it)."""
    table = pd.DataFrame([r.row() for r in results]).drop(
        columns=["grade_weights", "random_weights", "config_hash", "checkpoint_epoch", "training_in_progress"])
    return table.astype(object).fillna("").to_string(index=False)


def write_scores(path: Path, results: list[ClipScore], run_dir: Path) -> None:
    """The scores in the format of path's suffix (pipeline.tables.FORMATS), atomically: every CSV row
    carries random_weights, config_hash, checkpoint_epoch and training_in_progress; the JSON file is
    {"note", "random_weights", "config_hash", "run", "checkpoint": {epoch, val_rho, val_mse, epochs_done,
    epochs_planned, training_in_progress, writer}, "scores": [rows]}."""
    write_table(scores_table(results, run_dir), path)
