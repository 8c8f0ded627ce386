"""`score` next to other commands on the same run: a second `score` extracting into the run's score
cache (issue #26, point 2) and a `train` writing the run (point 3).

The other process is played inside this one, deterministically: a claim (or the run's lock) taken by a
second `Claims` / `RunLock` of this live pid is exactly what a live process of this host leaves."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pandas as pd
import pytest

from manifests.cache import DONE, FeatureCache
from manifests.claims import Claims, RunLock, this_process
from models.checkpoint import load_tensors
from pipeline.stages import score as score_module
from pipeline.cli import main
from pipeline.extraction.entry import cache_folder
from pipeline.inference import load_run
from pipeline.stages.score import run_extraction_config
from pipeline.videos import file_fingerprint

TINY_TRAIN = ["--epochs", "2", "--batch-size", "4", "--hidden", "32", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def trained_run(extracted_clips, tmp_path_factory):
    """A 2-epoch run on the 8 extracted clips (conftest), and the unseen clip scored once with it, so its
    features are at hand for the process played below."""
    root = tmp_path_factory.mktemp("concurrency")
    run = root / "run"
    assert main(["train", "--features", str(extracted_clips.cache), "--labels", str(extracted_clips.labels),
                 "--out", str(run), *TINY_TRAIN]) == 0
    scored = root / "scored"
    shutil.copytree(run, scored)
    assert main(["score", str(extracted_clips.unseen), "--run", str(scored), "--device", "cpu", "--quiet"]) == 0
    return run, scored, extracted_clips.unseen


def fresh_run(trained_run, tmp_path):
    run, _, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def score_cache_of(run):
    import torch

    config = run_extraction_config(load_run(run, torch.device("cpu")))
    return FeatureCache(cache_folder(run / "score_cache", config))


def video_id_of(clip) -> str:
    return f"{clip.stem}-{file_fingerprint(clip)[1].split(':')[-1][:8]}"


def another_process(cache: FeatureCache) -> Claims:
    """The claims of a second process on the same cache (its own token, this live pid)."""
    other = cache.claims()
    other.me = this_process()
    return other


def after_first_extraction(monkeypatch):
    """An event set once score's first extract_into returned, and the list of its calls."""
    calls, returned = [], threading.Event()
    real = score_module.extract_into

    def extract_into(out, config, videos, **kwargs):
        calls.append([v.video_id for v in videos])
        try:
            return real(out, config, videos, **kwargs)
        finally:
            returned.set()

    monkeypatch.setattr(score_module, "extract_into", extract_into)
    monkeypatch.setattr(score_module, "WAIT_POLL_S", 0.2)
    return calls, returned


def in_background(action) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def test_score_waits_for_a_clip_another_process_is_extracting_and_reuses_it(trained_run, tmp_path, monkeypatch, capsys):
    _, scored, unseen = trained_run
    run = fresh_run(trained_run, tmp_path)
    cache, video_id = score_cache_of(run), video_id_of(unseen)
    other = another_process(cache)
    assert other.acquire(video_id)  # the other `score` is extracting the clip into the same cache
    calls, returned = after_first_extraction(monkeypatch)
    finished = score_cache_of(scored).video_dir(video_id)

    def the_other_finishes():
        returned.wait(60)
        time.sleep(0.6)  # well after score's first look: today's code has given up by now
        target = cache.video_dir(video_id)
        target.mkdir(parents=True)
        for array in finished.glob("*.npy"):
            shutil.copy(array, target / array.name)
        shutil.copy(finished / "record.json", target / "record.json")  # the record last, as the writer does
        other.release(video_id)

    thread = in_background(the_other_finishes)
    out = tmp_path / "scores.json"
    code = main(["score", str(unseen), "--run", str(run), "--out", str(out), "--device", "cpu", "--quiet"])
    thread.join()
    err = capsys.readouterr().err
    assert code == 0, err
    assert "another process is extracting" in err and "waiting up to" in err
    (row,) = json.loads(out.read_text())["scores"]
    assert row["error"] is None
    assert calls == [[video_id]]  # its features were reused, not extracted a second time
    assert cache.read_record(video_id).to_dict() == json.loads((finished / "record.json").read_text())
    reference = tmp_path / "reference.json"  # the same weights on the features the other process made
    assert main(["score", str(unseen), "--run", str(scored), "--out", str(reference), "--device", "cpu", "--quiet"]) == 0
    assert json.loads(reference.read_text())["scores"][0]["score"] == row["score"]


def test_score_extracts_a_clip_itself_when_the_other_process_lets_go(trained_run, tmp_path, monkeypatch, capsys):
    _, _, unseen = trained_run
    run = fresh_run(trained_run, tmp_path)
    cache, video_id = score_cache_of(run), video_id_of(unseen)
    other = another_process(cache)
    assert other.acquire(video_id)
    calls, returned = after_first_extraction(monkeypatch)

    def the_other_stops():  # killed, or stopped by Ctrl-C, before finishing the clip
        returned.wait(60)
        time.sleep(0.6)
        other.release(video_id)

    thread = in_background(the_other_stops)
    code = main(["score", str(unseen), "--run", str(run), "--device", "cpu", "--quiet"])
    thread.join()
    assert code == 0, capsys.readouterr().err
    assert calls == [[video_id], [video_id]]
    assert cache.read_record(video_id).status == DONE


def test_score_waits_a_bounded_time_and_names_the_holder(trained_run, tmp_path, monkeypatch, capsys):
    _, _, unseen = trained_run
    run = fresh_run(trained_run, tmp_path)
    cache, video_id = score_cache_of(run), video_id_of(unseen)
    other = another_process(cache)
    assert other.acquire(video_id)  # and never lets go
    monkeypatch.setattr(score_module, "WAIT_POLL_S", 0.2)
    out = tmp_path / "scores.json"
    code = main(["score", str(unseen), "--run", str(run), "--out", str(out), "--device", "cpu", "--quiet",
                 "--wait", "1"])
    assert code == 1
    (row,) = json.loads(out.read_text())["scores"]
    assert f"pid {other.me['pid']}" in row["error"] and "after waiting 1 s" in row["error"]
    assert "score it again" in row["error"]


# --------------------------------------------------------------------------- score while train writes the run


def test_score_names_the_checkpoint_epoch_and_training_in_progress(trained_run, tmp_path, capsys):
    _, _, unseen = trained_run
    run = fresh_run(trained_run, tmp_path)
    _, header = load_tensors(run / "best.safetensors")
    epoch = header["best"]["epoch"]

    out = tmp_path / "idle.json"
    assert main(["score", str(unseen), "--run", str(run), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    written = json.loads(out.read_text())
    assert f"weights of epoch {epoch}" in printed and "TRAINING IN PROGRESS" not in printed
    assert written["checkpoint"]["epoch"] == epoch and written["checkpoint"]["training_in_progress"] is False
    assert written["checkpoint"]["epochs_done"] == 2 and written["checkpoint"]["epochs_planned"] == 2
    assert written["scores"][0]["checkpoint_epoch"] == epoch

    lock = RunLock(run, "pipeline train --resume")  # a live `train` writing the run (this very pid)
    assert lock.acquire() is None
    try:
        busy = tmp_path / "busy.csv"
        assert main(["score", str(unseen), "--run", str(run), "--out", str(busy), "--device", "cpu", "--quiet"]) == 0
        printed = capsys.readouterr().out.splitlines()[0]
        as_json = tmp_path / "busy.json"
        assert main(["score", str(unseen), "--run", str(run), "--out", str(as_json), "--device", "cpu", "--quiet"]) == 0
    finally:
        lock.release()
    assert f"weights of epoch {epoch}" in printed and "TRAINING IN PROGRESS" in printed
    assert "2 of 2 epochs done" in printed
    written = json.loads(as_json.read_text())
    assert written["checkpoint"]["training_in_progress"] is True
    assert "pipeline train --resume" in written["checkpoint"]["writer"] and f"pid {lock.me['pid']}" in written["checkpoint"]["writer"]
    assert written["note"].count("TRAINING IN PROGRESS") == 1
    rows = pd.read_csv(busy)
    assert rows.loc[0, "checkpoint_epoch"] == epoch and bool(rows.loc[0, "training_in_progress"]) is True


def test_a_lock_left_by_a_dead_train_is_not_training_in_progress_but_a_stopped_run_says_so(trained_run, tmp_path):
    import subprocess
    import sys

    import torch

    run = fresh_run(trained_run, tmp_path)
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    (run / ".lock").write_text(json.dumps({**this_process(), "pid": process.pid, "command": "pipeline train"}))
    progress = json.loads((run / "best.json").read_text())
    (run / "best.json").write_text(json.dumps({**progress, "epochs_planned": 5}))  # as a train killed at epoch 2 of 5
    loaded = load_run(run, torch.device("cpu"))
    assert loaded.checkpoint["training_in_progress"] is False and loaded.checkpoint["writer"] is None
    assert loaded.describe_checkpoint().endswith("; training stopped after 2 of 5 epochs")
