"""`pipeline score` and `pipeline demo` end to end through the CLI, on generated clips."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from manifests.cache import FeatureCache
from pipeline import data
from pipeline.cli import main
from pipeline.inference import load_run
from pipeline.samples import ClipSpec, write_clip

TINY_EXTRACT = ["--backbones", "random", "--arch-size", "tiny", "--flow", "farneback",
                "--segment-frames", "8", "--device", "cpu", "--quiet"]
TINY_TRAIN = ["--epochs", "2", "--batch-size", "4", "--hidden", "32", "--device", "cpu", "--quiet"]
# Written scores are rounded to 4 decimals; the inference routes compared agree to the last bit (measured).
WRITTEN = 6e-5


@pytest.fixture(scope="module")
def trained(extracted_clips):
    """train (2 epochs) on the 8 extracted labelled clips (conftest); returns their folder and an unseen
    clip without audio."""
    root = extracted_clips.root
    assert main(["train", "--features", str(extracted_clips.cache), "--labels", str(extracted_clips.labels),
                 "--out", str(root / "run"), *TINY_TRAIN]) == 0
    return root, extracted_clips.unseen


def test_evaluate_prints_the_table_row(trained, capsys):
    root, _ = trained
    assert main(["evaluate", "--run", str(root / "run"), "--labels", str(root / "labels.csv"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "{v,f,a}" in out and "Average" in out


def test_score_imputes_missing_audio_and_writes_csv(trained, capsys):
    root, unseen = trained
    out_csv = root / "scores.csv"
    code = main(["score", str(unseen), "--run", str(root / "run"), "--out", str(out_csv), "--device", "cpu", "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    assert "unseen.mp4" in table
    assert table.startswith("RANDOM-WEIGHT BACKBONES: scores of run")  # the tiny backbones are random
    rows = pd.read_csv(out_csv)
    config_hash = FeatureCache.open(root / "cache").config_hash
    assert bool(rows.loc[0, "random_weights"]) is True and rows.loc[0, "config_hash"] == config_hash
    assert rows.loc[0, "present"] == "rgb,flow" and rows.loc[0, "imputed"] == "audio"
    grade_columns = [c for c in rows.columns if c.startswith("grade_")]
    assert len(grade_columns) == 4 and rows[grade_columns].sum(axis=1).iloc[0] == pytest.approx(1, abs=1e-3)
    # the new clip went to the run's score cache, not into the training cache
    score_cache = FeatureCache.open(root / "run" / "score_cache")
    (video_id,) = [r.video_id for r in score_cache.records() if r.video_id.startswith("unseen-")]
    assert not any(r.video_id.startswith("unseen") for r in FeatureCache.open(root / "cache").records())
    # the value: the run's inference on the clip's cached features with {v,f} (audio imputed), the
    # evaluation's route (Run.scores), not score's own (Run.predict); the terminal shows the same number
    run = load_run(root / "run", "cpu")
    expected = run.scores(data.load_samples(score_cache, [video_id]), subset=["rgb", "flow"])[0]
    assert 0 <= expected <= run.score_range
    assert rows.loc[0, "score"] == pytest.approx(expected, abs=WRITTEN)
    weights = run.forward(data.load_samples(score_cache, [video_id]))["grade_weights"][0].numpy()
    assert rows.loc[0, grade_columns].to_numpy(float) == pytest.approx(weights, abs=WRITTEN)
    (printed,) = [line.split() for line in table.splitlines() if "unseen.mp4" in line]
    assert float(printed[1]) == pytest.approx(rows.loc[0, "score"], abs=1e-12)


def test_score_reuses_training_features_and_reports_bad_clips(trained, capsys, tmp_path):
    root, _ = trained
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    out_json = tmp_path / "scores.json"
    code = main(["score", str(root / "videos" / "clip07.mp4"), str(broken), "--run", str(root / "run"),
                 "--out", str(out_json), "--device", "cpu", "--quiet"])
    assert code == 1  # one clip failed, the other was still scored
    written = json.loads(out_json.read_text())
    assert written["note"].startswith("RANDOM-WEIGHT BACKBONES") and written["random_weights"] is True
    assert written["config_hash"] == FeatureCache.open(root / "cache").config_hash
    rows = written["scores"]
    assert rows[0]["error"] is None and rows[1]["score"] is None and "cannot decode video" in rows[1]["error"]
    # clip07's value is its prediction in the evaluation of the same training-cache features
    run = load_run(root / "run", "cpu")
    labels = pd.read_csv(root / "labels.csv").set_index("video_id")["score"].to_dict()
    evaluation = run.evaluate(data.load_samples(run.open_features(), ["clip07"], labels))
    assert rows[0]["score"] == pytest.approx(evaluation.predictions["{v,f,a}"][0], abs=WRITTEN)
    assert 0 <= rows[0]["score"] <= run.score_range
    weights = run.forward(data.load_samples(run.open_features(), ["clip07"]))["grade_weights"][0].numpy()
    assert rows[0]["grade_weights"] == pytest.approx(weights, abs=WRITTEN)
    # clip07 was found in the training cache by its fingerprint: only the broken clip was extracted
    score_cache = FeatureCache.open(root / "run" / "score_cache")
    assert not any(r.video_id.startswith("clip07") for r in score_cache.records())


def test_score_refuses_features_made_differently(trained, capsys, tmp_path):
    root, unseen = trained
    other = tmp_path / "other"
    assert main(["extract", "--videos", str(unseen.parent), "--out", str(other), *TINY_EXTRACT,
                 "--segment-frames", "16"]) == 0  # the later flag wins: a different segment length
    capsys.readouterr()
    code = main(["score", str(unseen), "--run", str(root / "run"), "--features", str(other), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "different extraction configuration" in err and "run:" in err and "features:" in err

    # the same configuration, but claiming pretrained backbones: refused as well, saying so
    pretend = tmp_path / "pretend"
    shutil.copytree(FeatureCache.open(root / "cache").root, pretend / "cache")
    config = json.loads((pretend / "cache" / "config.json").read_text())
    config["random_weights"] = False
    (pretend / "cache" / "config.json").write_text(json.dumps(config))
    code = main(["score", str(unseen), "--run", str(root / "run"), "--features", str(pretend / "cache"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "pretrained backbone weights" in err and "RANDOM weights" in err


def test_score_usage_errors(trained, tmp_path, capsys):
    root, unseen = trained
    assert main(["score", str(unseen), "--run", str(root / "run"), "--out", str(tmp_path / "x.txt")]) == 2
    assert main(["score", str(tmp_path), "--run", str(root / "run")]) == 2  # a folder without videos
    with pytest.raises(SystemExit) as exc:
        main(["score", str(unseen), "--run", str(tmp_path / "no-run")])
    assert exc.value.code == 2


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--train-clips", "4", "--val-clips", "2", "--test-clips", "3",
                 "--steps", "2", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr()
    assert "RANDOM WEIGHTS" in out.err and "Demo finished" in out.out
    assert "MCMoE rho" in out.out and "Baseline rho" in out.out  # the side-by-side table
    assert "RANDOM-WEIGHT BACKBONES: held-out test clips (3)" in out.out
    # the extraction's counts on screen, its per-clip table in a file (one row per clip buries the results)
    clips = [f"clip{i:02d}" for i in range(9)]
    assert "9 extracted, 0 already done, 0 failed" in out.out and "video_id" not in out.out
    assert not any(line.split()[:1] == [clip] for line in out.out.splitlines() for clip in clips)
    status = (tmp_path / "demo" / "extract_summary.txt").read_text()
    assert f"per-clip status: {tmp_path / 'demo' / 'extract_summary.txt'}" in out.out
    assert [line.split()[0] for line in status.splitlines()[1:10]] == clips
    comparison = pd.read_csv(tmp_path / "demo" / "comparison" / "test.csv")
    assert comparison["random_weights"].all() and comparison["config_hash"].nunique() == 1
    # three training seeds per model by default; the table is their mean, each seed's Average is printed
    assert "mean of 3 training seeds" in out.out and "Average rho per training seed [0, 1, 2]" in out.out
    for model in ("mcmoe", "baseline"):
        assert all((tmp_path / "demo" / "runs" / name / "best.json").is_file() for name in (model, f"{model}-seed1", f"{model}-seed2"))
    mse = comparison[(comparison.metric == "MSE") & (comparison.setting == "{v,f,a}")].set_index(["model", "training_seed"])["value"]
    for model in ("MCMoE", "Baseline"):
        assert mse[(model, "mean")] == pytest.approx(mse[[(model, str(seed)) for seed in range(3)]].mean())
    assert (tmp_path / "demo" / "scores.csv").is_file() and (tmp_path / "demo" / "comparison" / "test.png").is_file()
    scores = pd.read_csv(tmp_path / "demo" / "scores.csv")
    assert scores.loc[0, "imputed"] == "audio"


def test_demo_refuses_settings_it_cannot_run(tmp_path, capsys):
    for flags in (["--training-seeds", "0"], ["--test-clips", "2"]):
        assert main(["demo", "--out", str(tmp_path / "demo"), *flags]) == 2
        assert "--training-seeds >= 1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # refused before any clip is made


def test_score_refuses_features_of_another_recipe(trained, capsys, tmp_path):
    root, unseen = trained
    clip = write_clip(ClipSpec("p", 0.4, seconds=1.4, width=96, height=64, seed=31), tmp_path / "videos" / "p.mp4")
    assert main(["extract", "--videos", str(clip.parent), "--out", str(tmp_path / "pamfn"), "--recipe", "pamfn",
                 "--backbones", "random", "--arch-size", "tiny", "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    score = ["score", str(clip), "--run", str(root / "run"), "--features", str(tmp_path / "pamfn"), "--device", "cpu"]
    assert main(score) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on features of recipe project" in err[0] and "of recipe pamfn" in err[0], err
    # The override uses them anyway (the tiny backbones of both recipes give rows of the same sizes).
    assert main(score + ["--allow-other-recipe"]) == 0
