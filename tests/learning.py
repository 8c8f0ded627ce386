"""The reduced demo flow shared by tests/test_learning.py and benchmarks/learning_spread.py.

`pipeline demo` with fewer, shorter clips (8-frame segments), a small MCMoE and a short training
budget, and copies of its test clips with every signal flattened.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from pipeline.cli import main
from pipeline.stages.demo import DemoResult, DemoSettings, extract_command, run_demo
from pipeline.samples import ClipSpec

REDUCED_SEED = 0


def reduced_settings(seed: int) -> DemoSettings:
    return DemoSettings(train_clips=40, val_clips=16, test_clips=24, unseen_clips=1, clip_seconds=(1.3, 1.6),
                        segment_frames=8, steps=300, batch_size=8, hidden=32, vary_format=False, training_seeds=1,
                        seed=seed)


@dataclass
class LearningRun:
    out: Path
    settings: DemoSettings
    result: DemoResult
    specs: list[ClipSpec]  # every labelled clip, in the demo's order (train, val, test)

    @property
    def test_specs(self) -> list[ClipSpec]:
        return self.specs[-self.settings.test_clips :]

    @property
    def table(self) -> str:
        return self.result.comparison.table

    def setting(self, model: str, name: str):
        return next(s for s in self.result.comparison.evaluations[model][0].settings if s.name == name)

    def predictions(self, model: str, setting: str, video_ids: list[str]) -> np.ndarray:
        evaluation = self.result.comparison.evaluations[model][0]
        index = {v: i for i, v in enumerate(evaluation.video_ids)}
        return np.array([evaluation.predictions[setting][index[v]] for v in video_ids])

    def score_test_clips(self, specs: list[ClipSpec]) -> list:
        """`pipeline score`'s stage on labelled clips (found in the training cache by fingerprint)."""
        import torch

        from pipeline.stages.score import score_clips

        clips = [self.out / "videos" / f"{spec.name}.mp4" for spec in specs]
        return score_clips(clips, self.out / "runs" / "mcmoe", device=torch.device("cpu"), progress=False)


def run_reduced_demo(out: Path, seed: int = REDUCED_SEED) -> LearningRun:
    settings = reduced_settings(seed)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = run_demo(out, settings, device="cpu", progress=False, pipeline=main)
    assert result.code == 0, f"the reduced demo exited with {result.code}"
    return LearningRun(out, settings, result, result.labelled)


def flat_clip_rho(run: LearningRun, model: str, setting: str = "{v,f,a}") -> float:
    """Held-out rho of `model` in `setting` on copies of the test clips whose picture, movement and
    sound no longer follow the score (every modality rendered at a fixed level; labels unchanged)."""
    from pipeline import data
    from pipeline.inference import load_run
    from pipeline.samples import write_clip

    flat = [replace(spec, name=f"flat_{spec.name}", flat=("rgb", "flow", "audio")) for spec in run.test_specs]
    folder, cache = run.out / "flat_videos", run.out / "flat_cache"
    if not (cache).is_dir():
        for spec in flat:
            write_clip(spec, folder / f"{spec.name}.mp4")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main(extract_command(run.settings, folder, cache, "cpu", quiet=True))
        assert code == 0
    trained = load_run(run.out / "runs" / model.lower(), "cpu")
    samples = data.load_samples(trained.open_features(cache), [s.name for s in flat], {s.name: s.label for s in flat})
    modalities = [m for m, letter in (("rgb", "v"), ("flow", "f"), ("audio", "a")) if letter in setting]
    scores = trained.scores(samples, subset=modalities)
    return float(spearmanr(scores, [s.label for s in flat])[0])
