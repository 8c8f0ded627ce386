"""Pretrained weights identified by content (extractors/base.py identify_weights): config.json records the
SHA-256 of every weights file loaded; other files under a public name get another cache folder (a public
SHA-256 is known: torchvision's names carry a prefix of it) or are refused (none is known), never mixed
into a cache; score and evaluate refuse features of other weights. Small networks stand in for the full
ones: the files are found, hashed and loaded by the full models' code."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from extractors import rgb_vst
from extractors.audio_ast import HUB_ID, ast_config
from extractors.base import WeightsSource, identify_weights, url_filename, weights_sha256
from extractors.config import ExtractionConfig
from manifests.cache import CacheError, file_sha256, weights_difference
from pipeline.cli import main
from pipeline.extraction.entry import extract_into
from pipeline.inference import RunError, check_same_features
from pipeline.stages.score import ScoreError, check_run_weights
from pipeline.videos import VideoSource
from tests.conftest import tiny_config

SWIN_FILE = url_filename(rgb_vst.PRETRAINED.url)  # swin3d_b_1k-24f7c7c6.pth


@pytest.fixture(autouse=True)
def no_hub_cache(tmp_path, monkeypatch):
    """Keep this machine's torch hub cache (and its SHA-256 memo) out of the tests."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def vst_pretrained() -> ExtractionConfig:
    return ExtractionConfig(modalities=("rgb",), backbones={"rgb": "vst"}, segment_frames=8)


def ast_pretrained() -> ExtractionConfig:
    return ExtractionConfig(modalities=("audio",), backbones={"audio": "ast"}, segment_frames=8)


def save_swin(folder: Path, seed: int) -> Path:
    """Small Swin weights under torchvision's public file name: not the public file's content."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(rgb_vst.swin3d_tiny().state_dict(), folder / SWIN_FILE)
    return folder / SWIN_FILE


def save_ast(folder: Path, seed: int) -> WeightsSource:
    """A small AST saved as the public model's folder (no public SHA-256 is known for its files)."""
    from transformers import ASTModel

    torch.manual_seed(seed)
    ASTModel(ast_config("tiny")).save_pretrained(folder / HUB_ID.split("/")[-1])
    return WeightsSource(weights_dir=folder, offline=True)


def test_a_torchvision_file_not_matching_its_names_hash_is_reported_and_named_in_the_hash(tmp_path):
    path = save_swin(tmp_path / "w", seed=0)
    config, described = identify_weights(vst_pretrained(), WeightsSource(weights_dir=tmp_path / "w", offline=True))
    [entry] = described["rgb"]
    sha256 = file_sha256(path)
    assert (entry["file"], entry["sha256"], entry["public"]) == (SWIN_FILE, sha256, "Swin3D_B_Weights.KINETICS400_V1")
    assert entry["is_public"] is False and entry["public_sha256"] == "24f7c7c6"
    assert "24f7c7c6" in entry["warning"] and str(path) in entry["warning"]
    assert config.weights_sha256 == {"rgb": {SWIN_FILE: sha256}}
    assert config.config_hash() != vst_pretrained().config_hash()
    # Recorded with the configuration, so a run's score remakes the same folder name from config.json.
    assert ExtractionConfig.from_dict(config.to_dict()).config_hash() == config.config_hash()


def test_the_public_file_and_random_weights_keep_the_folder_names_of_earlier_caches(tmp_path, monkeypatch):
    path = save_swin(tmp_path / "w", seed=0)
    public_name = f"swin3d_b_1k-{file_sha256(path).removeprefix('sha256:')[:8]}.pth"  # a name whose prefix it matches
    path.rename(path.with_name(public_name))
    monkeypatch.setattr(rgb_vst, "PRETRAINED", SimpleNamespace(
        url=f"https://download.pytorch.org/models/{public_name}", name="KINETICS400_V1"))
    config, described = identify_weights(vst_pretrained(), WeightsSource(weights_dir=tmp_path / "w", offline=True))
    assert described["rgb"][0]["is_public"] is True and "warning" not in described["rgb"][0]
    assert config.weights_sha256 == {} and config.config_hash() == vst_pretrained().config_hash()
    random = tiny_config()
    assert identify_weights(random, WeightsSource()) == (random, {})
    assert ExtractionConfig().config_hash() == "024baf0d183f"  # the default configuration's folder, as before


def test_two_files_under_the_public_name_make_two_cache_folders(clip_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(rgb_vst, "swin3d_b", rgb_vst.swin3d_tiny)  # the full model's loading code, a small network
    videos = [VideoSource("good", clip_folder / "good.mp4")]
    caches = []
    for seed in (0, 1):
        weights = WeightsSource(weights_dir=save_swin(tmp_path / f"w{seed}", seed).parent, offline=True)
        summary, cache = extract_into(tmp_path / "out", vst_pretrained(), videos, weights=weights, progress=False)
        assert not summary.failed
        caches.append(cache)
    assert caches[0].root != caches[1].root
    recorded = [c.read_config()["extractors"]["rgb"]["weights_files"][0] for c in caches]
    assert recorded[0]["sha256"] != recorded[1]["sha256"] and all("warning" in r for r in recorded)
    assert not np.array_equal(caches[0].load_features("good")["rgb"], caches[1].load_features("good")["rgb"])


def test_extract_says_which_file_is_not_the_public_one(clip_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rgb_vst, "swin3d_b", rgb_vst.swin3d_tiny)
    path = save_swin(tmp_path / "w", seed=0)
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "good.mp4").write_bytes((clip_folder / "good.mp4").read_bytes())
    assert main(["extract", "--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "out"), "--modalities", "rgb",
                 "--segment-frames", "8", "--device", "cpu", "--weights-dir", str(tmp_path / "w"), "--offline",
                 "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and str(path) in warnings[0] and "24f7c7c6" in warnings[0]


def test_other_files_of_no_known_public_hash_never_extend_a_cache(clip_folder, tmp_path):
    first, second = save_ast(tmp_path / "w0", seed=0), save_ast(tmp_path / "w1", seed=1)
    good, wide = VideoSource("good", clip_folder / "good.mp4"), VideoSource("wide", clip_folder / "wide.mov")
    _, cache = extract_into(tmp_path / "out", ast_pretrained(), [good], weights=first, progress=False)
    [entry] = cache.read_config()["extractors"]["audio"]["weights_files"]
    assert entry["file"] == f"{HUB_ID}/model.safetensors" and "is_public" not in entry  # no public hash known
    before = cache.load_features("good")["audio"]
    with pytest.raises(CacheError, match="other pretrained weights") as error:
        extract_into(tmp_path / "out", ast_pretrained(), [good, wide], weights=second, progress=False)
    assert str(error.value).count("sha256:") == 2 and "\n" not in str(error.value)
    assert cache.read_record("wide") is None
    np.testing.assert_array_equal(cache.load_features("good")["audio"], before)
    _, again = extract_into(tmp_path / "out", ast_pretrained(), [good, wide], weights=first, progress=False)
    assert again.root == cache.root and cache.read_record("wide").status == "done"  # the same files extend it


def test_score_and_evaluate_refuse_features_of_other_weights(clip_folder, tmp_path):
    first, second = save_ast(tmp_path / "w0", seed=0), save_ast(tmp_path / "w1", seed=1)
    good = [VideoSource("good", clip_folder / "good.mp4")]
    made = {name: extract_into(tmp_path / name, ast_pretrained(), good, weights=weights, progress=False)[1]
            for name, weights in (("a", first), ("b", second))}
    trained_on, other = made["a"].read_config(), made["b"].read_config()
    run = SimpleNamespace(directory=tmp_path / "run", extraction_config=trained_on)
    with pytest.raises(ScoreError, match="other pretrained weights") as error:  # score extracting new clips
        check_run_weights(run, ast_pretrained(), second)
    assert str(error.value).count("sha256:") == 2 and "\n" not in str(error.value)
    check_run_weights(run, ast_pretrained(), first)
    with pytest.raises(RunError, match="other pretrained weights") as error:  # score --features, evaluate
        check_same_features(trained_on, other, run.directory, made["b"].root)
    assert str(error.value).count("sha256:") == 2 and "\n" not in str(error.value)
    check_same_features(trained_on, made["a"].read_config(), run.directory, made["a"].root)


def test_a_cache_made_before_weights_were_identified_had_the_public_files():
    def config(**files) -> dict:
        return {"extractors": {"rgb": {"name": "vst", **({"weights_files": [files]} if files else {})}}}

    before = config()
    assert weights_difference(before, config(file=SWIN_FILE, sha256="sha256:24f7c7c6ab", is_public=True)) is None
    differ = weights_difference(before, config(file=SWIN_FILE, sha256="sha256:0123", is_public=False))
    assert SWIN_FILE in differ and "sha256:0123" in differ
    # No public SHA-256 known: such a file cannot be told from the public one.
    assert weights_difference(before, config(file="flow_imagenet.pt", sha256="sha256:0123")) is None


def test_a_weights_file_is_hashed_once_while_its_size_and_mtime_stay(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"a" * 64)
    first = weights_sha256(path)
    stat = path.stat()
    path.write_bytes(b"b" * 64)  # same size, mtime set back: taken as the same file
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_sha256(path) == first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert weights_sha256(path) == file_sha256(path) != first
