"""Run folders under stress: two writers, damaged or hostile files, bad features, kills at the edges."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pipeline.stages.train as train_module
from manifests.cache import CacheError
from pipeline.cli import main
from pipeline.stages.train import train
from pipeline.train_config import TrainError
from tests.synthetic import write_labels, write_synthetic_cache
from tests.test_train import tiny_config

QUIET = dict(progress=False, log=lambda message: None)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    made = write_synthetic_cache(root / "cache", num_videos=12, length_range=(5, 9))
    return made, write_labels(root / "labels.csv", made.scores)



def cli_train(made, labels, out, *extra):
    return ["train", "--features", str(made.cache.root), "--labels", str(labels), "--out", str(out), "--quiet",
            "--device", "cpu", "--batch-size", "4", "--clip-num", "6", "--hidden", "16",
            "--model-option", "encoder_layers=1", "--model-option", "decoder_layers=1",
            "--model-option", "generator_heads=2", *extra]


def one_line_error(capsys, *needles) -> str:
    """The error: the last line of stderr, after any progress log lines; no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    line = err.splitlines()[-1]
    assert line.startswith("pipeline ") and "error" in line, err
    for needle in needles:
        assert str(needle) in line, err
    return line


def test_two_train_processes_on_one_run_folder(tmp_path, small):
    made, labels = small
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The test process may run with SIGINT ignored (seen in a pytest-xdist worker that had run the Ray tests:
    # SigIgn in /proc), which a child inherits and Python then keeps: the child takes back the handler a
    # `pipeline train` started from a terminal has, so the SIGINT below reaches it.
    with_ctrl_c = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
                  "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    first = subprocess.Popen([sys.executable, "-c", with_ctrl_c, *cli_train(made, labels, run_dir, "--epochs", "100000", "--seed", "0")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "train_log.csv").is_file():  # the first one is training
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.2)
        for extra in (("--seed", "1"), ("--resume",)):
            args = cli_train(made, labels, run_dir, "--epochs", "100000", *extra)
            second = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True)
            assert second.returncode == 2, second.stderr
            assert f"in use by another `pipeline train`: pid {first.pid} on host" in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
        assert json.loads((run_dir / "run.json").read_text())["config"]["seed"] == 0
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
    assert first.returncode == 130 and not (run_dir / ".lock").exists()  # released on the way out


def test_a_lock_left_by_a_killed_train_is_taken_over(tmp_path, small):
    made, labels = small
    config = tiny_config(made, labels, tmp_path / "run")
    train(config, stop_after_epochs=1, **QUIET)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "token": "x"}))
    assert train(config, resume=True, **QUIET).finished
    (tmp_path / "run" / ".lock").write_text(json.dumps({"host": "another-host", "pid": 1, "token": "y"}))
    with pytest.raises(TrainError, match=r"in use .*pid 1 on host another-host.*delete .*\.lock"):
        train(config, resume=True, **QUIET)


def test_train_out_naming_a_file_is_a_usage_error(tmp_path, small, capsys):
    made, labels = small
    (tmp_path / "afile").write_text("x")
    assert main(cli_train(made, labels, tmp_path / "afile", "--epochs", "1")) == 2
    one_line_error(capsys, tmp_path / "afile", "is a file")


@pytest.mark.parametrize("damage", ["garbage", "pickled", "truncated", "empty", "model config", "best not an object"])
def test_damaged_checkpoints_are_one_line_errors(tmp_path, small, capsys, damage):
    made, labels = small
    run_dir = tmp_path / "run"
    assert main(cli_train(made, labels, run_dir, "--epochs", "1")) == 0
    capsys.readouterr()
    best = run_dir / "best.safetensors"
    named = best
    if damage == "garbage":
        best.write_bytes(os.urandom(300))
    elif damage == "pickled":
        best.write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'echo owned'\ntR." * 4)
    elif damage == "truncated":
        best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    elif damage == "empty":
        best.write_bytes(b"")
    elif damage == "model config":
        path = run_dir / "model_config.json"
        record = json.loads(path.read_text())
        record["config"]["hidden"] = 32
        path.write_text(json.dumps(record))
    else:
        save_file({"w": torch.zeros(1)}, str(best), metadata={"best": json.dumps([1, 2])})
    assert main(["evaluate", "--run", str(run_dir), "--labels", str(labels), "--device", "cpu"]) == 2
    one_line_error(capsys, named)


@pytest.mark.parametrize("file,content", [("run.json", "[1, 2]"), ("run.json", "{garbage"),
                                          ("last/state.json", "{garbage"), ("last/state.json", '{"epoch": 1}')])
def test_damaged_run_records_are_one_line_errors_naming_the_file(tmp_path, small, capsys, file, content):
    made, labels = small
    run_dir = tmp_path / "run"
    assert main(cli_train(made, labels, run_dir, "--epochs", "2", "--stop-after-epochs", "1")) == 0
    capsys.readouterr()
    (run_dir / file).write_text(content)
    assert main(["train", "--out", str(run_dir), "--resume", "--quiet", "--device", "cpu"]) == 2
    one_line_error(capsys, run_dir / Path(file).parent if file.startswith("last/") and "epoch" in content else run_dir / file)
    if file == "run.json":
        assert main(["evaluate", "--run", str(run_dir), "--labels", str(labels), "--device", "cpu"]) == 2
        one_line_error(capsys, run_dir / file)


def test_an_optimizer_state_of_the_wrong_shape_is_a_one_line_error(tmp_path, small, capsys):
    made, labels = small
    run_dir = tmp_path / "run"
    assert main(cli_train(made, labels, run_dir, "--epochs", "2", "--stop-after-epochs", "1")) == 0
    capsys.readouterr()
    path = run_dir / "last" / "optimizer.safetensors"
    tensors = load_file(str(path))
    key = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[key] = tensors[key][:, :-1].contiguous()  # loads into Adam, which would fail only at its step
    save_file(tensors, str(path))
    assert main(["train", "--out", str(run_dir), "--resume", "--quiet", "--device", "cpu"]) == 2
    one_line_error(capsys, path, key)


@pytest.mark.parametrize("problem", ["nan", "inf", "empty file", "truncated"])
def test_train_names_the_video_with_bad_features(tmp_path, capsys, problem):
    made = write_synthetic_cache(tmp_path / "cache", num_videos=10, length_range=(5, 7))
    labels = write_labels(tmp_path / "labels.csv", made.scores)
    path = made.cache.feature_path("vid004", "flow")
    array = np.load(path)
    if problem in ("nan", "inf"):
        array[2, 1] = np.nan if problem == "nan" else np.inf
        np.save(path, array)
    elif problem == "empty file":
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match="vid004"):
        train(tiny_config(made, labels, tmp_path / "api"), **QUIET)
    assert not (tmp_path / "api").exists()  # stopped before training: nothing left behind
    assert main(cli_train(made, labels, tmp_path / "run", "--epochs", "1")) == 2
    err = one_line_error(capsys, "vid004", path)
    assert ("NaN/inf" in err) == (problem in ("nan", "inf"))


@pytest.mark.parametrize("when", ["after the swap", "before the swap"])
def test_a_kill_at_the_state_swap_loses_no_log_row(tmp_path, small, monkeypatch, when):
    made, labels = small
    straight = train(tiny_config(made, labels, tmp_path / "straight", epochs=3), **QUIET)
    real_save = train_module.save_resume_state

    def killed_at_epoch_two(run_dir, model, optimizer, generator, epoch, best):
        if epoch == 2 and when == "after the swap":
            real_save(run_dir, model, optimizer, generator, epoch, best)
        if epoch == 2:
            raise KeyboardInterrupt  # kill -9 stands here
        real_save(run_dir, model, optimizer, generator, epoch, best)

    config = tiny_config(made, labels, tmp_path / "killed", epochs=3)
    monkeypatch.setattr(train_module, "save_resume_state", killed_at_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(config, **QUIET)
    monkeypatch.setattr(train_module, "save_resume_state", real_save)
    (tmp_path / "killed" / ".best.safetensors.0a1b2c3d.tmp").write_bytes(b"half")  # a killed write's leftover
    train(config, resume=True, **QUIET)
    assert (tmp_path / "killed/train_log.csv").read_text() == (straight.run_dir / "train_log.csv").read_text()
    assert not list((tmp_path / "killed").glob(".*.tmp"))
