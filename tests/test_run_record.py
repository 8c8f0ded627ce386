"""run.json as a typed `RunRecord` (manifests/run.py): one writer (`RunDir.write_record`, used by train and
import-checkpoint), one reader (`RunDir.read_record`, used by load_run and so by evaluate, score and
reproduce); the fixture run's schema-1 record upgrades; a value no reader could use is one line naming
the file and the key, from the command that met it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from manifests.config import ConfigError
from manifests.run import RunDir, RunRecord
from pipeline.cli import main
from pipeline.inference import load_run

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "rundir"
RUN, CACHE, LABELS = FIXTURE / "run", FIXTURE / "cache", FIXTURE / "labels.csv"


def fixture_record() -> dict:
    return json.loads((RUN / RunDir.RUN).read_text())


def test_the_fixture_runs_schema_1_record_upgrades_keeping_every_value():
    recorded = fixture_record()
    assert "schema_version" not in recorded
    record = RunDir(RUN).read_record()
    written = record.to_dict()
    assert written["schema_version"] == RunRecord.SCHEMA_VERSION == 3
    assert {k: written[k] for k in recorded if k != "seed"} == {k: v for k, v in recorded.items() if k != "seed"}
    assert "seed" not in written and written["config"]["seed"] == recorded["seed"] == 0  # its one record
    # the fields a trained schema-1 record lacks, with what they were for that run
    assert {k: written[k] for k in set(written) - set(recorded) - {"schema_version"}} == {
        "imported": None, "test_used_for_selection": False, "feature_recipe": None}


def test_an_imported_schema_1_record_counts_every_parameter_trainable():
    recorded = fixture_record()
    for key in ("validation_videos", "selection_note", "absent_in_data", "train_missing", "num_trainable_parameters",
                "sequence_length"):
        del recorded[key]  # what import-checkpoint's schema-1 records lacked
    recorded.update(config=None, imported={"file": "reference.pkl"}, test_used_for_selection=True)
    record = RunRecord.from_dict(recorded, "run.json")
    assert record.num_trainable_parameters == record.num_parameters == 22283
    assert (record.validation_videos, record.train_missing, record.sequence_length) == (0, None, None)


def test_the_record_round_trips_through_its_writer_and_reader(tmp_path):
    record = RunDir(RUN).read_record()
    folder = RunDir(tmp_path)
    folder.write_record(record)
    assert folder.read_record() == record
    assert RunRecord.from_dict(json.loads(folder.run_json.read_text())) == record
    assert json.loads(folder.run_json.read_text())["schema_version"] == 3


def test_a_schema_3_record_refuses_unknown_and_missing_keys(tmp_path):
    written = RunDir(RUN).read_record().to_dict()
    with pytest.raises(ConfigError, match=r"RunRecord in x/run\.json: unknown key 'clip_nums'"):
        RunRecord.from_dict({**written, "clip_nums": 3}, "x/run.json")
    with pytest.raises(ConfigError, match=r"RunRecord in x/run\.json: unknown key 'seed'"):
        RunRecord.from_dict({**written, "seed": 0}, "x/run.json")  # config["seed"] is its one record
    del written["clip_num"]  # schema 3 records every field: a lost one is an error, not a default
    with pytest.raises(ConfigError, match=r"RunRecord in x/run\.json: .*'clip_num'"):
        RunRecord.from_dict(written, "x/run.json")


def test_the_writer_refuses_a_value_no_reader_could_use(tmp_path):
    record = RunDir(RUN).read_record()
    with pytest.raises(ConfigError, match="clip_num must be an integer >= 1, got 0"):
        RunDir(tmp_path).write_record(dataclasses.replace(record, clip_num=0))
    assert not (tmp_path / RunDir.RUN).exists()


BAD_VALUES = [  # (what is set in run.json, the key the one line must name)
    ({"splits": "x"}, "splits"),
    ({"splits": {"train": ["clip00"], "val": "clip02"}}, "splits.val"),
    ({"clip_num": "abc"}, "clip_num"),
    ({"clip_num": -3}, "clip_num"),
    ({"clip_num": True}, "clip_num"),
    ({"feature_dims": {"rgb": 128, "flow": -1, "audio": 32}}, "feature_dims.flow"),
    ({"modalities": ["rgb", "flow", "depth"]}, "feature_dims"),  # a modality the sizes do not name
    ({"modalities": ["rgb", "flow", "depth"], "feature_dims": {"rgb": 128, "flow": 128, "depth": 32}},
     "modalities"),  # consistent in run.json, but not the model's modalities
    ({"score_range": "ten"}, "score_range"),
    ({"score_range": 0}, "score_range"),
    ({"score_range": float("nan")}, "score_range"),
    ({"features": 5}, "features"),
    ({"imported": {"format": "mcmoe-reference"}}, "imported.file"),
]


def broken_run(tmp_path: Path, change: dict) -> Path:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    (run / RunDir.RUN).write_text(json.dumps({**fixture_record(), **change}))
    return run


@pytest.mark.parametrize("change,key", BAD_VALUES, ids=[json.dumps(c)[:40] for c, _ in BAD_VALUES])
def test_evaluate_names_the_file_and_key_of_a_bad_value_in_one_line(tmp_path, capsys, change, key):
    run = broken_run(tmp_path, change)
    code = main(["evaluate", "--run", str(run), "--labels", str(LABELS), "--split", "all", "--features", str(CACHE),
                 "--out", str(tmp_path / "evaluation"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{run / RunDir.RUN}: {key} " in err, err
    assert not (tmp_path / "evaluation.csv").exists()


def test_resume_names_the_file_and_key_of_a_bad_value_in_one_line(tmp_path, capsys):
    run = broken_run(tmp_path, {"clip_num": "abc"})
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{run / RunDir.RUN}: clip_num must be an integer >= 1, got 'abc'" in err, err


def test_the_chosen_epoch_is_the_weights_header_not_best_json(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    progress = json.loads((run / RunDir.BEST).read_text())
    assert progress["epoch"] == 3  # this run's best.json also names the epoch, as the header does
    (run / RunDir.BEST).write_text(json.dumps({**progress, "epoch": 1, "val_mse": 0.5}))  # a kill between two writes
    best = load_run(run, "cpu").best
    assert (best["epoch"], best["val_mse"]) == (3, 48.21166188696296)
    assert best["epochs_planned"] == 3 and len(best["val_settings"]["settings"]) == 7  # best.json's own part


def test_a_schema_2_record_with_two_seeds_resumes_and_evaluates_and_a_new_one_holds_one(tmp_path, capsys):
    """Schema 2 wrote the seed twice (`seed` beside config["seed"]); a run folder of it still resumes and
    evaluates, its record read with the one seed, and a new run.json holds only config["seed"]. Break
    tried: upgrade keeping `seed` (the resume fails on the unknown key)."""
    run = tmp_path / "run"
    train = ["train", "--features", str(CACHE), "--labels", str(LABELS), "--out", str(run), "--epochs", "2",
             "--hidden", "8", "--seed", "4", "--quiet", "--device", "cpu"]
    assert main([*train, "--stop-after-epochs", "1"]) == 0
    written = json.loads((run / RunDir.RUN).read_text())
    assert "seed" not in written and written["config"]["seed"] == 4
    (run / RunDir.RUN).write_text(json.dumps({**written, "schema_version": 2, "seed": 4}))  # as schema 2 wrote it
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert main(["evaluate", "--run", str(run), "--labels", str(LABELS), "--split", "all",
                 "--out", str(tmp_path / "evaluation"), "--device", "cpu"]) == 0
    assert RunDir(run).read_record().config["seed"] == 4 and RunDir(run).is_finished()
