"""What a user sees: every output says how it was made, the parser starts without torch, write
errors are one line naming the path and what was kept."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.stages.reproduce import reproduce
from tests.synthetic import write_labels, write_synthetic_cache

TINY_MODEL = ["--hidden", "16", "--model-option", "encoder_layers=1", "--model-option", "decoder_layers=1",
              "--model-option", "generator_heads=2"]
TRAIN = ["--epochs", "2", "--batch-size", "4", "--clip-num", "6", "--quiet", "--device", "cpu", *TINY_MODEL]


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A run trained on features marked as made by random-weight backbones, with TES/PCS labels."""
    root = tmp_path_factory.mktemp("random")
    made = write_synthetic_cache(root / "cache", num_videos=12, length_range=(5, 8), random_weights=True)
    splits = {v: "test" if i % 4 == 0 else "train" for i, v in enumerate(made.video_ids)}
    labels = write_labels(root / "labels" / "TES.csv", made.scores, splits)
    write_labels(root / "labels" / "PCS.csv", {v: round(s * 0.8, 4) for v, s in made.scores.items()}, splits)
    assert main(["train", "--features", str(made.cache.root), "--labels", str(labels), "--out", str(root / "run"),
                 *TRAIN]) == 0
    return root, made


def test_evaluation_files_and_plot_say_random_weights(random_run, tmp_path, capsys):
    root, made = random_run
    capsys.readouterr()
    base, plot = tmp_path / "eval", tmp_path / "eval.png"
    assert main(["evaluate", "--run", str(root / "run"), "--labels", str(root / "labels" / "TES.csv"),
                 "--out", str(base), "--plot", str(plot), "--device", "cpu"]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("RANDOM-WEIGHT BACKBONES") and made.cache.config_hash in first_line
    table = pd.read_csv(tmp_path / "eval.csv")
    assert table["random_weights"].all() and set(table["config_hash"]) == {made.cache.config_hash}
    predictions = pd.read_csv(tmp_path / "eval.predictions.csv")
    assert predictions["random_weights"].all() and set(predictions["config_hash"]) == {made.cache.config_hash}
    text = (tmp_path / "eval.json").read_text()
    assert text.lstrip("{\n ").startswith('"note": "RANDOM-WEIGHT BACKBONES')  # the first thing in the file
    result = json.loads(text)
    assert result["random_weights"] is True and result["config_hash"] == made.cache.config_hash
    assert Image.open(plot).text["Description"].startswith("RANDOM-WEIGHT BACKBONES")


def test_reproduce_tables_say_random_weights(random_run, tmp_path):
    root, made = random_run
    out = tmp_path / "results"
    result = reproduce("fisv", made.cache.root, out, [0], labels_dir=root / "labels", ray_address=None,
                       overrides=dict(epochs=1, batch_size=4, clip_num=6), progress=False, say=lambda m: None,
                       model_options=dict(hidden=16, encoder_layers=1, decoder_layers=1, generator_heads=2))
    assert not result.failed
    assert result.markdown().splitlines()[0].startswith("## RANDOM-WEIGHT BACKBONES")  # what the CLI prints
    assert (out / "table.md").read_text().splitlines()[0].startswith("## RANDOM-WEIGHT BACKBONES")
    table = pd.read_csv(out / "table.csv")
    assert table["random_weights"].all() and set(table["config_hash"]) == {made.cache.config_hash}
    text = (out / "table.json").read_text()
    assert text.lstrip("{\n ").startswith('"note": "RANDOM-WEIGHT BACKBONES')
    assert json.loads(text)["random_weights"] is True
    assert Image.open(out / "rho.png").text["Description"].startswith("RANDOM-WEIGHT BACKBONES")


def test_pretrained_outputs_name_their_features_without_alarm(tmp_path, capsys):
    made = write_synthetic_cache(tmp_path / "cache", num_videos=10, length_range=(5, 8))
    labels = write_labels(tmp_path / "labels.csv", made.scores, {v: "test" if i < 3 else "train"
                                                                  for i, v in enumerate(made.video_ids)})
    assert main(["train", "--features", str(made.cache.root), "--labels", str(labels), "--out", str(tmp_path / "run"),
                 *TRAIN, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--labels", str(labels), "--device", "cpu"]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert "RANDOM" not in first_line and "(pretrained backbones)" in first_line
    assert json.loads((tmp_path / "run" / "evaluation" / "eval-labels.json").read_text())["random_weights"] is False


# --------------------------------------------------------------------------- start-up


def test_building_the_parser_imports_no_heavy_library():
    """--help, COMMAND --help and usage errors must not wait for torch (a behaviour test, not a timing)."""
    script = """
import sys
from pipeline.cli import COMMANDS, build_parser, main
parser = build_parser()
for argv in (["--help"], *([c, "--help"] for c in COMMANDS), ["extrct"], ["extract", "--videos"],
             ["extract", "--videos", ".", "--out", "x", "--modalities", "smell"],
             ["extract", "--videos", ".", "--out", "x", "--arch-size", "tiny"]):
    try:
        assert main(argv) == 2
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "torchvision", "transformers", "pandas", "decord", "matplotlib", "ray")
               if m in sys.modules)
print("HEAVY", heavy)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


def test_the_settings_table_names_the_registrys_backbones_and_no_setting_shadows_the_config():
    import dataclasses

    from extractors.base import REGISTRY, available_backbones
    from extractors.config import ExtractionConfig
    from extractors.settings import SETTINGS, backbone_names, setting_fields

    assert available_backbones() == {m: list(names) for m, names in backbone_names().items()}
    # The same backbones (the registry's order is the modules' import order, which tests vary).
    assert set(SETTINGS) == set(REGISTRY)
    top_level = {f.name for f in dataclasses.fields(ExtractionConfig)}
    assert not top_level & set(setting_fields()), "a backbone setting would share a flag and a hash key with the config"


# --------------------------------------------------------------------------- write errors


def test_full_disk_during_a_checkpoint_write_is_one_line_and_resumable(tmp_path, capsys, monkeypatch):
    import models.checkpoint

    made = write_synthetic_cache(tmp_path / "cache", num_videos=10, length_range=(5, 8))
    labels = write_labels(tmp_path / "labels.csv", made.scores)
    run = tmp_path / "run"
    real_save, calls = models.checkpoint.save_file, []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 4:  # epoch 1 (best + last/ model, optimizer, rng) fits; epoch 2 does not
            raise type("SafetensorError", (Exception,), {})(
                "Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(models.checkpoint, "save_file", full_disk)
    code = main(["train", "--features", str(made.cache.root), "--labels", str(labels), "--out", str(run), *TRAIN])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("pipeline train: I/O error: ") and "No space left on device" in line
    assert f"{run}/" in line and ".safetensors: No space left on device" in line  # the file being written
    assert "after epoch 1 is kept" in line and "--resume" in line
    assert not list(run.rglob("*.tmp"))  # nothing half-written left behind
    monkeypatch.setattr(models.checkpoint, "save_file", real_save)
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert len((run / "train_log.csv").read_text().splitlines()) == 3  # header + 2 epochs


def test_an_atomic_write_is_synced_before_the_rename(tmp_path, monkeypatch):
    """The suite skips fsync (tests/conftest.py no_fsync); here the real one runs, once, on the whole
    temporary file, before it takes the target's name."""
    import os

    from manifests.files import atomic_write_json
    from tests.conftest import REAL_FSYNC

    target, synced = tmp_path / "out.json", []

    def fsync(fd: int) -> None:
        synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")), os.fstat(fd).st_size, target.exists()))
        REAL_FSYNC(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_json(target, {"written": list(range(100))})
    [(path, size, renamed)] = synced
    assert path.parent == tmp_path and path.name.startswith(".out.json.") and path.name.endswith(".tmp")
    assert size == target.stat().st_size and not renamed


def test_full_disk_while_writing_an_evaluation(random_run, tmp_path, capsys, monkeypatch):
    import manifests.files

    root, _ = random_run
    real_fdopen = manifests.files.os.fdopen

    class FullFile:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifests.files.os, "fdopen", lambda fd, mode: FullFile(real_fdopen(fd, mode)))
    capsys.readouterr()
    code = main(["evaluate", "--run", str(root / "run"), "--labels", str(root / "labels" / "TES.csv"),
                 "--out", str(tmp_path / "eval"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert err.startswith("pipeline evaluate: I/O error: ") and str(tmp_path / "eval.csv") in err
    assert "No space left on device" in err and "run is unchanged" in err
    assert not list(tmp_path.iterdir())  # no half-written result


# --------------------------------------------------------------------------- extract: inputs, progress, noise

TINY_EXTRACT = ["--backbones", "random", "--arch-size", "tiny", "--flow", "farneback", "--segment-frames", "8",
                "--device", "cpu"]


def test_videos_may_be_one_file_and_the_manifest_path_is_absolute(clip_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(clip_folder)
    assert main(["extract", "--videos", "good.mp4", "--out", str(tmp_path / "out"), *TINY_EXTRACT, "--quiet"]) == 0
    manifest = pd.read_csv(next((tmp_path / "out").glob("*/manifest.csv")))
    assert list(manifest["video_id"]) == ["good"] and manifest.loc[0, "path"] == str(clip_folder / "good.mp4")
    capsys.readouterr()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video\n")
    assert main(["extract", "--videos", str(notes), "--out", str(tmp_path / "out"), *TINY_EXTRACT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a folder nor a video file" in err[0] and str(notes) in err[0]
    with pytest.raises(SystemExit) as exc:  # --out naming a file: a usage error, not a traceback
        main(["extract", "--videos", str(clip_folder / "good.mp4"), "--out", str(notes), *TINY_EXTRACT])
    assert exc.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err


def test_progress_total_is_known_before_decoding_and_never_changes(clip_folder, tmp_path, capsys, monkeypatch):
    import pipeline.progress
    from extractors.base import WeightsSource, build_extractors
    from extractors.decode import VideoFrames, count_segments
    from manifests.cache import CacheConfig, open_cache
    from pipeline.extraction.loop import extract_videos
    from pipeline.videos import discover_videos
    from tests.conftest import tiny_config

    config = tiny_config()
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("good.mp4", "wide.mov", "rotated.mp4"):
        (videos / name).write_bytes((clip_folder / name).read_bytes())
    expected = {p.name: VideoFrames(p, 256).plan(config).num_segments for p in videos.iterdir()}
    assert {p.name: count_segments(p, config) for p in videos.iterdir()} == expected  # metadata only
    assert count_segments(clip_folder / "notvideo.avi", config) == 0
    extractors = build_extractors(config, __import__("torch").device("cpu"), WeightsSource())
    cache = open_cache(tmp_path / "out", CacheConfig.extracted(config, extractors))
    embed, calls = extractors["rgb"].embed, []

    def slow_first_call(batch):  # a full-size backbone on a CPU: seconds for one segment
        calls.append(1)
        if len(calls) == 1:
            time.sleep(3.5)
        return embed(batch)

    extractors["rgb"].embed = slow_first_call
    monkeypatch.setattr(pipeline.progress, "is_terminal", lambda stream: True)  # the bar as a terminal shows it
    extract_videos(discover_videos(videos), cache, extractors, config, batch_segments=1, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n")
    # the bar is redrawn every second while that call runs: its clock moves
    assert len([line for line in bar.splitlines() if re.search(r"\| +0/\d+ \[", line) and "now=rgb" in line]) >= 3
    counts = [re.search(r"\| *(\d+)/(\d+) \[", line) for line in bar.splitlines() if line.startswith("extract:")]
    counts = [(int(m[1]), int(m[2])) for m in counts if m]
    assert counts and {total for _, total in counts} == {sum(expected.values())}  # known before the first segment
    assert [done for done, _ in counts] == sorted(done for done, _ in counts)
    assert f"{sum(expected.values())}/{sum(expected.values())}" in bar and "now=rgb" in bar


def test_decoder_messages_go_to_the_manifest_not_the_terminal(clip_folder, tmp_path, capfd):
    videos = tmp_path / "videos"
    videos.mkdir()
    data = (clip_folder / "good.mp4").read_bytes()
    (videos / "cut.mp4").write_bytes(data[: len(data) // 2])  # its index (moov atom) was at the end
    (videos / "notvideo.avi").write_text("this is not a video\n")
    (videos / "good.mp4").write_bytes(data)
    assert main(["extract", "--videos", str(videos), "--out", str(tmp_path / "out"), *TINY_EXTRACT]) == 1
    err = capfd.readouterr().err
    assert "moov atom" not in err and "video_reader.cc" not in err and "ERROR opening" not in err
    manifest = pd.read_csv(next((tmp_path / "out").glob("*/manifest.csv"))).set_index("video_id")
    assert "moov atom not found" in manifest.loc["cut", "error"]
    assert "Invalid data found when processing input" in manifest.loc["notvideo", "error"]
    assert manifest.loc["good", "status"] == "done"


def test_every_missing_weight_file_at_once(clip_folder, tmp_path):
    """A fresh process with empty weight caches: all four public files named, each with --weights-dir."""
    env = {**__import__("os").environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "extract", "--videos", str(clip_folder / "good.mp4"),
                             "--out", str(tmp_path / "out"), "--offline", "--weights-dir", str(tmp_path / "empty"),
                             "--flow", "raft", "--device", "cpu", "--quiet"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "4 pretrained weight files are missing" in result.stderr
    for name in ("swin3d_b_1k", "raft_large_C_T_SKHT_V2", "flow_imagenet.pt", "MIT/ast-finetuned-audioset"):
        line = next(line for line in result.stderr.splitlines() if name in line)
        assert "--weights-dir" in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("record.json"))


def test_full_disk_during_extraction_keeps_finished_videos(clip_folder, tmp_path, capsys, monkeypatch):
    import manifests.files

    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("good.mp4", "wide.mov"):
        (videos / name).write_bytes((clip_folder / name).read_bytes())
    real_save, saved = manifests.files.np.save, []

    def fills_the_disk(handle, array, allow_pickle):
        if len(saved) == 3:  # good.mp4's three modalities fit, the first of wide.mov does not
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(array)
        return real_save(handle, array, allow_pickle=allow_pickle)

    monkeypatch.setattr(manifests.files.np, "save", fills_the_disk)
    out = tmp_path / "out"
    assert main(["extract", "--videos", str(videos), "--out", str(out), *TINY_EXTRACT, "--quiet"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("pipeline extract: I/O error: ") and "wide/rgb.npy: No space left on device" in line
    assert "videos finished before it are kept" in line
    cache = next(out.glob("*/config.json")).parent
    assert (cache / "videos" / "good" / "record.json").is_file()
    assert not (cache / "videos" / "wide" / "record.json").exists()  # nothing half-written counts as done
    monkeypatch.setattr(manifests.files.np, "save", real_save)
    assert main(["extract", "--videos", str(videos), "--out", str(out), *TINY_EXTRACT, "--quiet"]) == 0
    assert "1 extracted, 1 already done" in capsys.readouterr().out
