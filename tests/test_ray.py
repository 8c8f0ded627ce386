"""Scaling out on Ray: distributed extraction (identical features, a killed worker's videos redone) and
`reproduce` (every action x seed, the aggregated table, reruns). One local Ray instance for the module."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from extractors.base import WeightsSource, build_extractors
from manifests.cache import CacheConfig, FeatureCache, open_cache
from pipeline.cli import main
from pipeline.extraction.loop import extract_videos
from pipeline.presets import get_preset
from pipeline.extraction.on_ray import ExtractionWorker, WorkerSetupError, extract_on_ray, plan_workers
from pipeline.stages.reproduce import ReproduceError, find_inputs, plan_runs, reproduce
from pipeline.stages.train import train
from pipeline.train_config import TrainConfig
from pipeline.videos import discover_videos
from tests.conftest import tiny_config
from tests.synthetic import write_labels, write_synthetic_cache

ray = pytest.importorskip("ray")

TINY_MODEL = dict(hidden=16, encoder_layers=1, decoder_layers=1, encoder_heads=2, decoder_heads=2, generator_heads=2)
FAST = dict(epochs=2, batch_size=8, clip_num=8, lr=1e-3)


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 2**20, logging_level="ERROR")
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------- extraction


@pytest.fixture(scope="module")
def reference(clip_folder, tmp_path_factory):
    """The single-process extraction of the generated clips (good and bad ones)."""
    config = tiny_config()
    extractors = build_extractors(config, torch.device("cpu"), WeightsSource())
    cache = open_cache(tmp_path_factory.mktemp("single"), CacheConfig.extracted(config, extractors))
    extract_videos(discover_videos(clip_folder), cache, extractors, config, progress=False)
    return cache


def untimed(error: str | None) -> str | None:
    return None if error is None else re.sub(r"\[\d\d:\d\d:\d\d\] ", "", error)  # decord stamps its messages


def assert_same_features(cache: FeatureCache, reference: FeatureCache) -> None:
    records, expected = {r.video_id: r for r in cache.records()}, {r.video_id: r for r in reference.records()}
    assert {v: r.status for v, r in records.items()} == {v: r.status for v, r in expected.items()}
    for video_id, record in expected.items():
        assert untimed(records[video_id].error) == untimed(record.error)
        if record.status != "done":
            continue
        got, want = cache.load_features(video_id), reference.load_features(video_id)
        assert set(got) == set(want)
        for modality in want:
            np.testing.assert_array_equal(got[modality], want[modality])  # bitwise
    assert not list((cache.root / "claims").iterdir())


def test_worker_plan_follows_the_cluster():
    assert plan_workers({"CPU": 16.0, "GPU": 4.0}) == plan_workers({"CPU": 16.0, "GPU": 4.0}, "cuda")
    gpu = plan_workers({"CPU": 16.0, "GPU": 4.0})
    assert (gpu.workers, gpu.device, gpu.num_gpus) == (4, "cuda", 1.0)
    shared = plan_workers({"CPU": 16.0, "GPU": 2.0}, workers=4)
    assert shared.num_gpus == 0.5
    cpu = plan_workers({"CPU": 16.0, "GPU": 4.0}, "cpu")
    assert (cpu.workers, cpu.device, cpu.num_gpus, cpu.threads) == (4, "cpu", 0.0, 4)
    assert plan_workers({"CPU": 2.0}, workers=3).num_cpus == pytest.approx(2 / 3)  # all placeable
    with pytest.raises(WorkerSetupError, match="no GPU"):
        plan_workers({"CPU": 2.0}, "cuda")


def test_distributed_extraction_equals_the_single_process_run(ray_instance, clip_folder, reference, tmp_path):
    config = tiny_config()
    result = extract_on_ray(discover_videos(clip_folder), tmp_path, config, workers=2, progress=False)
    assert result.plan.workers == 2 and result.workers_lost == 0 and not result.unfinished
    assert len(result.summary.records) == 10 and len(result.summary.failed) == 5
    assert result.cache.root == tmp_path / config.config_hash()
    assert_same_features(result.cache, reference)
    assert len(result.cache.manifest()) == 10 and (result.cache.root / "manifest.csv").is_file()


class CrashOnceWorker(ExtractionWorker):
    """Dies (the whole process, as with a kill -9 or a lost node) in the middle of its second backbone
    batch; only the first worker to get there, only once (a marker file beside the cache)."""

    def __init__(self, config, out, *args):
        super().__init__(config, out, *args)
        marker, embed, calls = Path(out) / "crashed-once", self.extractors["rgb"].embed, [0]

        def crashing_embed(batch):
            calls[0] += 1
            if calls[0] == 2:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return embed(batch)
                os._exit(1)
            return embed(batch)

        self.extractors["rgb"].embed = crashing_embed


def test_a_killed_workers_videos_are_redone(ray_instance, clip_folder, reference, tmp_path):
    config = tiny_config()
    result = extract_on_ray(discover_videos(clip_folder), tmp_path, config, workers=2, videos_per_task=1,
                            worker_class=CrashOnceWorker, progress=False)
    assert (tmp_path / "crashed-once").is_file()
    assert result.workers_lost == 1 and result.videos_requeued == 1 and not result.unfinished
    assert_same_features(result.cache, reference)  # complete, identical, no claim left behind
    assert {r.status for r in result.cache.records()} == {"done", "failed"}


class CrashOnWideWorker(ExtractionWorker):
    """Dies whenever it is handed the video `wide` (as a video that takes its worker's node down would)."""

    def extract(self, sources):
        if any(s.video_id == "wide" for s in sources):
            os._exit(1)
        return super().extract(sources)


def test_a_video_that_keeps_losing_its_worker_is_reported_failed_with_the_reason(ray_instance, clip_folder, tmp_path,
                                                                               monkeypatch):
    from pipeline.extraction import on_ray

    # every loss costs a restart of the actor (4 s here): the rule is the same at 1 retry as at the default 3
    monkeypatch.setattr(on_ray, "MAX_RETRIES", 1)
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("wide.mov", "good.mp4"):
        shutil.copy(clip_folder / name, folder / name)
    config = tiny_config(modalities=("rgb",), backbones={"rgb": "vst"})
    result = extract_on_ray(discover_videos(folder), tmp_path / "out", config, workers=1, videos_per_task=1,
                            worker_class=CrashOnWideWorker, max_restarts=on_ray.MAX_RETRIES + 1, progress=False)
    assert result.workers_lost == on_ray.MAX_RETRIES + 1 and result.retried == ["wide"] and not result.unfinished
    (failed,) = result.summary.failed
    assert failed.video_id == "wide" and f"lost {on_ray.MAX_RETRIES + 1} times" in failed.error
    assert [r.video_id for r in result.summary.records if r.status == "done"] == ["good"]
    assert result.cache.read_record("wide") is None  # not recorded: a rerun tries it again


def test_cli_extract_on_ray_and_rerun(ray_instance, clip_folder, tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(clip_folder / "wide.mov", folder / "wide.mov")
    shutil.copy(clip_folder / "empty.mp4", folder / "empty.mp4")
    argv = ["extract", "--videos", str(folder), "--out", str(tmp_path / "out"), "--ray", "auto", "--ray-workers", "1",
            "--backbones", "random", "--arch-size", "tiny", "--segment-frames", "8", "--modalities", "rgb", "--quiet"]
    assert main(argv) == 1  # like the local path: a failed video means exit 1
    out = capsys.readouterr().out
    assert "1 extracted, 0 already done, 1 failed" in out and "empty file" in out
    assert main(argv) == 1
    assert "0 extracted, 1 already done, 1 failed" in capsys.readouterr().out
    assert main(argv[:-1] + ["--ray-workers", "0", "--quiet"]) == 2


# --------------------------------------------------------------------------- reproduce


@pytest.fixture(scope="module")
def benchmark_data(tmp_path_factory):
    """One synthetic cache, Fis-V-like labels: TES.csv and PCS.csv with train/test splits."""
    root = tmp_path_factory.mktemp("bench")
    made = write_synthetic_cache(root / "cache", num_videos=20, length_range=(6, 9))
    splits = {v: "test" if i % 4 == 0 else "train" for i, v in enumerate(made.video_ids)}
    write_labels(root / "labels" / "TES.csv", made.scores, splits)
    write_labels(root / "labels" / "pcs.csv", {v: round(s * 0.8, 4) for v, s in made.scores.items()}, splits)
    return made.cache.root, root / "labels"


def fisher_by_hand(values):
    return float(np.tanh(np.mean(np.arctanh(values))))


def test_reproduce_trains_every_action_and_seed_and_aggregates(ray_instance, benchmark_data, tmp_path, capsys):
    features, labels = benchmark_data
    out = tmp_path / "results"
    # one run was interrupted after its first epoch: reproduce must resume it, not restart or skip it
    inputs = find_inputs("fisv", features, labels)
    spec = plan_runs(inputs, "fisv", [0], out, overrides=FAST, model_options=TINY_MODEL)[0]
    train(TrainConfig.from_dict(spec.config), get_preset("fisv", "TES"), stop_after_epochs=1, progress=False, log=lambda m: None)

    result = reproduce("fisv", features, out, [0, 1], labels_dir=labels, overrides=FAST, model_options=TINY_MODEL,
                       progress=False, say=lambda m: None)
    assert not result.failed
    assert {(o["action"], o["seed"]): o["status"] for o in result.outcomes} == {
        ("TES", 0): "resumed", ("TES", 1): "trained", ("PCS", 0): "trained", ("PCS", 1): "trained"}
    assert len((out / "TES" / "seed0" / "train_log.csv").read_text().splitlines()) == 3  # header + 2 epochs

    # the table, against numbers computed by hand from the per-run evaluation files
    table = json.loads((out / "table.json").read_text())
    settings = ["{v}", "{f}", "{a}", "{v,f}", "{v,a}", "{f,a}", "Average", "{v,f,a}"]
    assert table["settings"] == settings
    assert [r["name"] for r in table["rows"]] == ["TES", "PCS", "fisv: all actions"]
    runs = {(a, k): {c["setting"]: c for c in json.loads((out / a / f"seed{k}" / "evaluation" / "test.json").read_text())["table"]}
            for a in ("TES", "PCS") for k in (0, 1)}
    for row in table["rows"]:
        for setting in settings:
            if row["scope"] == "action":
                rhos = [runs[row["name"], k][setting]["rho"] for k in (0, 1)]
                errors = [runs[row["name"], k][setting]["mse"] for k in (0, 1)]
            else:
                rhos = [fisher_by_hand([runs[a, k][setting]["rho"] for a in ("TES", "PCS")]) for k in (0, 1)]
                errors = [np.mean([runs[a, k][setting]["mse"] for a in ("TES", "PCS")]) for k in (0, 1)]
            cell = row["settings"][setting]
            assert cell["rho"]["mean"] == pytest.approx((rhos[0] + rhos[1]) / 2)
            assert cell["rho"]["std"] == pytest.approx(abs(rhos[0] - rhos[1]) / np.sqrt(2))  # ddof 1, two seeds
            assert cell["mse"]["mean"] == pytest.approx((errors[0] + errors[1]) / 2)
            assert cell["mse"]["std"] == pytest.approx(abs(errors[0] - errors[1]) / np.sqrt(2))
            assert cell["rho"]["seeds"] == 2
    assert len((out / "table.csv").read_text().splitlines()) == 1 + 3 * 8
    markdown = (out / "table.md").read_text()
    assert "| **fisv: all actions** |" in markdown and " ± " in markdown
    assert (out / "rho.png").stat().st_size > 0

    # a rerun retrains nothing: no Ray needed, files untouched, same table
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/best.safetensors")}
    assert main(["reproduce", "--preset", "fisv", "--features", str(features), "--labels-dir", str(labels), "--seeds", "2",
                 "--out", str(out), "--epochs", "2", "--batch-size", "8", "--quiet", "--ray", "none",
                 *[f"--model-option={k}={v}" for k, v in TINY_MODEL.items()]]) == 2  # clip_num/lr differ: refused
    assert "holds a run with other settings" in capsys.readouterr().err
    again = reproduce("fisv", features, out, [0, 1], labels_dir=labels, overrides=FAST, model_options=TINY_MODEL,
                      ray_address=None, progress=False, say=lambda m: None)
    assert {o["status"] for o in again.outcomes} == {"skipped (finished)"}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "table.json").read_text())["rows"] == table["rows"]


def test_inputs_follow_the_import_features_layout(tmp_path):
    """A folder of caches, each with labels/<action>.csv inside (what import-features writes for RG)."""
    features = tmp_path / "imported"
    for action in ("Ball", "Hoop"):
        made = write_synthetic_cache(tmp_path / action, num_videos=4)
        write_labels(made.cache.root / "labels" / f"{action}.csv", made.scores,
                     {v: "test" if i == 0 else "train" for i, v in enumerate(made.video_ids)})
        features.mkdir(exist_ok=True)
        shutil.move(made.cache.root, features / f"hash{action}")
    found = find_inputs("rg", features, actions=["ball", "HOOP"])
    assert [(i.action, i.features.name, i.labels.name) for i in found] == [("Ball", "hashBall", "Ball.csv"), ("Hoop", "hashHoop", "Hoop.csv")]
    with pytest.raises(ReproduceError, match="Clubs: none of the 2 caches"):
        find_inputs("rg", features)
    with pytest.raises(ReproduceError, match="no Ball.csv"):
        find_inputs("rg", features, labels_dir=tmp_path, actions=["Ball"])
