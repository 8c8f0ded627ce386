"""The run folder (manifests/run.py): a run written by the code of 5115771 (tests/fixtures/rundir/) still
opens, predicts the same scores (tests/fixture_numbers.py) and goes through `pipeline evaluate` and `pipeline score`;
RunDir's readers and writers keep the files' formats."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from manifests.cache import FeatureCache
from manifests.config import ConfigError
from manifests.run import RunDir, RunFolderError, describe_differences, differing_settings
from pipeline import data
from pipeline.cli import main
from pipeline.inference import load_run
from pipeline.labels import read_labels
from pipeline.samples import ClipSpec, sample_set, write_clip
from pipeline.train import TrainConfig
from tests.fixture_numbers import ATOL, RTOL, assert_close_to_fixture

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "rundir"
RUN, CACHE, LABELS, EXPECTED = FIXTURE / "run", FIXTURE / "cache", FIXTURE / "labels.csv", FIXTURE / "expected"


def test_a_run_written_by_older_code_predicts_the_same_scores():
    expected = json.loads((EXPECTED / "inference.json").read_text())
    run = load_run(RUN, "cpu")
    labels = read_labels(LABELS)
    samples = data.load_samples(FeatureCache.open(CACHE), expected["video_ids"], labels.scores)
    predicted = run.predict(samples)
    assert [grades is None for _, grades in predicted] == [grades is None for _, grades in expected["predict"]]
    assert_close_to_fixture([[score, *(grades or [])] for score, grades in predicted],
                            [[score, *(grades or [])] for score, grades in expected["predict"]], "predict")
    for subset, scores in expected["scores"].items():
        assert_close_to_fixture(run.scores(samples, subset.split(",")), scores, subset)


def test_pipeline_evaluate_reads_an_older_run_and_writes_the_same_tables(tmp_path):
    assert main(["evaluate", "--run", str(RUN), "--labels", str(LABELS), "--split", "all", "--features", str(CACHE),
                 "--out", str(tmp_path / "evaluation"), "--device", "cpu"]) == 0
    for name in ("evaluation.csv", "evaluation.predictions.csv"):
        written, recorded = (pd.read_csv(folder / name) for folder in (tmp_path, EXPECTED))
        pd.testing.assert_frame_equal(written, recorded, rtol=RTOL, atol=ATOL, obj=name)
    written, recorded = (json.loads((folder / "evaluation.json").read_text()) for folder in (tmp_path, EXPECTED))
    for key in ("table", "settings", "average", "checkpoint", "random_weights", "config_hash", "videos_also_in_training"):
        assert written[key] == recorded[key], key


def test_pipeline_score_reads_an_older_run_and_gives_the_same_score(tmp_path):
    cache = tmp_path / "features" / CACHE.name
    shutil.copytree(CACHE, cache)  # score may add to the cache it is given
    spec = sample_set(6, seed=3)[4]  # make_fixture.SCORED: found in the cache by content, or re-extracted
    clip = write_clip(ClipSpec(spec.name, spec.quality, seconds=1.0, with_audio=spec.with_audio, seed=spec.seed),
                      tmp_path / f"{spec.name}.mp4")
    assert main(["score", str(clip), "--run", str(RUN), "--features", str(cache), "--out", str(tmp_path / "scores.csv"),
                 "--device", "cpu", "--quiet"]) == 0
    written, recorded = (pd.read_csv(path).drop(columns=["clip"]) for path in (tmp_path / "scores.csv", EXPECTED / "scores.csv"))
    pd.testing.assert_frame_equal(written, recorded)


def test_an_older_run_records_a_train_config_that_opens_and_unknown_keys_are_named():
    folder = RunDir(RUN)
    recorded = folder.read_train_config()
    assert "schema_version" not in recorded  # written before RecordedConfig: version 1
    config = TrainConfig.from_dict(recorded, source=str(folder.run_json))
    assert config.epochs == 3 and config.model == "mcmoe" and config.model_options["hidden"] == 8
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"run\.json: unknown key 'epochz'"):
        TrainConfig.from_dict({**recorded, "epochz": 4}, source=str(folder.run_json))


def test_resuming_a_run_whose_record_has_an_unknown_setting_names_it(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    info = json.loads((run / RunDir.RUN).read_text())
    info["config"]["epochz"] = 5  # a hand edit gone wrong
    (run / RunDir.RUN).write_text(json.dumps(info))
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{run / RunDir.RUN}: unknown key 'epochz'" in err and len(err.splitlines()) == 1


def test_the_training_log_is_rewritten_byte_for_byte(tmp_path):
    shutil.copyfile(RUN / RunDir.LOG, tmp_path / RunDir.LOG)
    folder = RunDir(tmp_path)
    rows = folder.read_log()
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and rows[0]["val_rho"] == "nan"  # one val video: undefined rho
    folder.write_log(rows)  # what a resume does with the rows it keeps
    assert (tmp_path / RunDir.LOG).read_bytes() == (RUN / RunDir.LOG).read_bytes()
    folder.write_log([{"epoch": 1, "lr": 0.001, "loss": 0.5, "val_rho": None}, {"epoch": 2, "lr": 1e-05, "loss": 0.25,
                                                                                "val_rho": 0.5, "extra": 3}])
    assert (tmp_path / RunDir.LOG).read_text() == "epoch,lr,loss,val_rho,extra\n1,0.001,0.5,,\n2,1e-05,0.25,0.5,3\n"


def test_the_resume_state_is_swapped_in_whole(tmp_path):
    folder = RunDir(tmp_path)
    assert folder.resume_folder() is None and folder.resume_epoch() is None
    for epoch in (1, 2):
        new = folder.start_resume_state()
        (new / "model.safetensors").write_bytes(b"weights")
        folder.commit_resume_state(new, {"epoch": epoch, "best": {}})
        assert folder.resume_folder() == tmp_path / "last" and folder.resume_epoch() == epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    folder.start_resume_state()  # killed while writing the next one: no state.json, so last/ still counts
    assert folder.resume_folder() == tmp_path / "last" and folder.resume_epoch() == 2


def test_one_settings_check_ignores_where_the_run_lives():
    recorded = {"lr": 0.001, "seed": 0, "out": "a", "sources": {"lr": "flag"}}
    now = {"lr": 0.5, "seed": 0, "out": "b", "sources": {}, "schema_version": 1}
    differ = differing_settings(recorded, now)
    assert differ == {"lr": (0.001, 0.5)}
    assert describe_differences(differ) == "lr: run 0.001, now 0.5"


def test_an_imported_checkpoint_has_no_train_config(tmp_path):
    folder = RunDir(tmp_path)
    record = RunDir(RUN).read_record()
    folder.write_record(dataclasses.replace(record, config=None, imported={"file": "reference.pkl"},
                                            splits={"train": [], "val": [], "test_rows_ignored": 0}))
    with pytest.raises(RunFolderError, match="imported checkpoint"):
        folder.read_train_config()
    assert folder.has_run() and not folder.is_finished()
