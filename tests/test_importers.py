"""`import-features`: small files written in the published layouts, converted and read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from manifests.cache import DONE, MISSING, FeatureCache
from pipeline import data
from pipeline.cli import main
from pipeline.inference import load_run
from pipeline.stages.importers import FeatureImportError, import_pamfn, import_skating_mixer
from pipeline.labels import check_against_cache, read_labels
from pipeline.stages.train import train
from pipeline.train_config import resolve_config

DIMS = {"rgb": 8, "flow": 6, "audio": 4}


def save_pickled_dict(path, table):
    np.save(path, table, allow_pickle=True)  # the published layout: a dict saved as a 0-d object array


@pytest.fixture()
def rg_root(tmp_path):
    """RG-feature/{Ball,Clubs}_*.npy dictionaries, train.txt / test.txt one level up (MCMoE's layout).
    Ball_4 has no audio entry."""
    rng = np.random.default_rng(0)
    features = tmp_path / "RG" / "RG-feature"
    features.mkdir(parents=True)
    arrays = {}
    for action, count in (("Ball", 5), ("Clubs", 2)):
        for modality, suffix in (("rgb", "rgb_VST"), ("flow", "flow_I3D"), ("audio", "audio_AST")):
            table = {f"{action}_{i}": rng.standard_normal((6 + i, DIMS[modality])).astype(np.float32) for i in range(count)}
            if action == "Ball" and modality == "audio":
                del table["Ball_4"]
            arrays[(action, modality)] = table
            save_pickled_dict(features / f"{action}_{suffix}.npy", table)
    header = "number Difficulty_Score Execution_Score Total_Score\n"
    (tmp_path / "RG" / "train.txt").write_text(
        header + "Ball_0 8.1 9.2 17.3\nBall_1 7.0 8.0 15.0\nClubs_0 6 7 13\nBall_2 9 9.5 18.5\n"
    )
    (tmp_path / "RG" / "test.txt").write_text(header + "Ball_3 5 6 11\nBall_4 6 6 12\nClubs_1 7 7 14\n")
    return features, arrays


def test_pamfn_rg_round_trip(tmp_path, rg_root):
    features, arrays = rg_root
    (ball,) = import_pamfn(features, tmp_path / "cache", action="ball")
    assert ball.name == "rg/Ball" and ball.num_videos == 5
    cache = FeatureCache.open(ball.cache.root)
    config = cache.read_config()
    assert config["source"] == "import:pamfn" and config["random_weights"] is False
    assert cache.modalities == ["rgb", "flow", "audio"] and cache.feature_dims == DIMS
    assert config["extractors"]["rgb"]["name"] == "VST"
    for video in ("Ball_0", "Ball_3"):
        loaded = cache.load_features(video)
        for modality in DIMS:
            np.testing.assert_array_equal(loaded[modality], arrays[("Ball", modality)][video])
    record = cache.read_record("Ball_4")
    assert record.status == DONE and record.modalities["audio"].status == MISSING
    assert sorted(cache.load_features("Ball_4")) == ["flow", "rgb"]
    labels = read_labels(ball.labels["Ball"])
    assert labels.scores == {"Ball_0": 17.3, "Ball_1": 15.0, "Ball_2": 18.5, "Ball_3": 11.0, "Ball_4": 12.0}
    assert labels.ids_in_split("test") == ["Ball_3", "Ball_4"]
    check_against_cache(labels, cache)  # every imported video labelled, every label has features


def test_pamfn_imports_each_apparatus_into_its_own_cache(tmp_path, rg_root):
    features, _ = rg_root
    imported = import_pamfn(features, tmp_path / "cache")
    assert [i.name for i in imported] == ["rg/Ball", "rg/Clubs"]
    assert imported[0].cache.root != imported[1].cache.root
    assert read_labels(imported[1].labels["Clubs"]).scores == {"Clubs_0": 13.0, "Clubs_1": 14.0}
    again = import_pamfn(features, tmp_path / "cache", action="Clubs")  # idempotent
    assert again[0].cache.root == imported[1].cache.root


def test_pamfn_fisv_with_and_without_a_header(tmp_path):
    rng = np.random.default_rng(1)
    names = ["1", "2", "3"]
    for modality, suffix in (("rgb", "rgb_VST"), ("flow", "flow_I3D"), ("audio", "audio_AST")):
        save_pickled_dict(tmp_path / f"FISV_{suffix}.npy", {n: rng.standard_normal((5, DIMS[modality])) for n in names})
    (tmp_path / "train.txt").write_text("name TES PCS\n1 30.5 25.0\n2 40 33.1\n")
    (tmp_path / "test.txt").write_text("3 20 22\n")  # no header line
    (fisv,) = import_pamfn(tmp_path, tmp_path / "cache")
    assert fisv.name == "fisv" and sorted(fisv.labels) == ["PCS", "TES"]
    assert read_labels(fisv.labels["TES"]).scores == {"1": 30.5, "2": 40.0, "3": 20.0}
    pcs = read_labels(fisv.labels["PCS"])
    assert pcs.scores == {"1": 25.0, "2": 33.1, "3": 22.0} and pcs.splits["3"] == "test"
    assert FeatureCache.open(fisv.cache.root).load_features("1")["rgb"].dtype == np.float32


def test_pamfn_errors_name_the_file(tmp_path, rg_root):
    features, _ = rg_root
    (features / "Ball_flow_I3D.npy").unlink()
    with pytest.raises(FeatureImportError, match="Ball_flow_I3D.npy is missing"):
        import_pamfn(features, tmp_path / "cache", action="Ball")
    with pytest.raises(FeatureImportError, match="has no Hoop_rgb_VST.npy"):
        import_pamfn(features, tmp_path / "cache", action="Hoop")
    (features.parent / "test.txt").write_text("number D E T\nClubs_1 7 x 14\n")
    with pytest.raises(FeatureImportError, match=r"test.txt line 2: scores .* are not all numbers"):
        import_pamfn(features, tmp_path / "cache", action="Clubs")


@pytest.fixture()
def fs1000_root(tmp_path):
    """Three folders of per-video arrays (RGB (T, clips, 768)-style) and header-less label files."""
    rng = np.random.default_rng(2)
    root = tmp_path / "FS1000"
    folders = {"rgb": "output_feature_fs1000_new", "flow": "i3d_avg_clip8_5s_fs1000", "audio": "ast_feature_fs1000_new"}
    arrays = {}
    for modality, folder in folders.items():
        (root / folder).mkdir(parents=True)
        for video in ("2018_Final_MF_A", "2019_R_PF_B", "2021_R_PF_C"):
            if modality == "flow" and video == "2021_R_PF_C":
                continue  # a video without flow features
            shape = (7, 3, DIMS[modality]) if modality == "rgb" else (7, DIMS[modality])
            arrays[(video, modality)] = rng.standard_normal(shape).astype(np.float32)
            np.save(root / folder / f"{video}.npy", arrays[(video, modality)])
    (root / "train_fs1000_new.txt").write_text(
        "2018_Final_MF_A 80.5 75.0 9.0 8.5 9.2 9.1 9.0 2.0\n2019_R_PF_B 40 33.3 8 7 8 8 7 1.0\n"
    )
    (root / "val_fs1000_new.txt").write_text("2021_R_PF_C 60 50.0 8 8 8 8 8 1.25\n")
    return root, arrays


def test_skating_mixer_round_trip(tmp_path, fs1000_root):
    root, arrays = fs1000_root
    (fs,) = import_skating_mixer(root, tmp_path / "cache")
    cache = FeatureCache.open(fs.cache.root)
    assert cache.read_config()["source"] == "import:skating-mixer" and cache.feature_dims == DIMS
    loaded = cache.load_features("2018_Final_MF_A")
    np.testing.assert_allclose(loaded["rgb"], arrays[("2018_Final_MF_A", "rgb")].mean(1), rtol=1e-6)  # averaged over clips
    np.testing.assert_array_equal(loaded["flow"], arrays[("2018_Final_MF_A", "flow")])
    assert cache.read_record("2021_R_PF_C").modalities["flow"].status == MISSING
    assert sorted(fs.labels) == ["CO", "IN", "PCS", "PE", "SS", "TES", "TR"]
    pcs = read_labels(fs.labels["PCS"])
    assert pcs.scores == {"2018_Final_MF_A": 37.5, "2019_R_PF_B": 33.3, "2021_R_PF_C": 40.0}  # divided by the factor
    assert read_labels(fs.labels["TES"]).scores["2018_Final_MF_A"] == 80.5
    assert read_labels(fs.labels["IN"]).splits == {"2018_Final_MF_A": "train", "2019_R_PF_B": "train", "2021_R_PF_C": "test"}


def test_imported_features_train_and_evaluate_unchanged(tmp_path, rg_root):
    features, _ = rg_root
    (ball,) = import_pamfn(features, tmp_path / "cache", action="Ball")
    torch.manual_seed(0)
    config, preset = resolve_config(
        ball.cache.root, ball.labels["Ball"], tmp_path / "run", preset="rg", action="Ball",
        overrides=dict(epochs=1, batch_size=2, val_fraction=0.34),
        model_options=dict(hidden=16, encoder_layers=1, decoder_layers=1, generator_heads=2),
    )
    train(config, preset, progress=False, log=lambda message: None)
    run = load_run(tmp_path / "run", "cpu")
    assert run.clip_num == 68 and run.score_range == 25.0
    labels = read_labels(ball.labels["Ball"])
    evaluation = run.evaluate(data.load_samples(run.open_features(), labels.ids_in_split("test"), labels.scores))
    assert [s.n for s in evaluation.settings] == [2, 2, 1, 2, 2, 2, 2]  # Ball_4 has no audio


def test_cli_import_features(tmp_path, fs1000_root, capsys):
    root, _ = fs1000_root
    assert main(["import-features", "--format", "skating-mixer", "--root", str(root), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "fs1000: 3 videos" in out and "--preset fs1000 --action PCS" in out
    config = json.loads(next((tmp_path / "c").glob("*/config.json")).read_text())
    assert config["dataset"] == "fs1000"
    assert main(["import-features", "--format", "pamfn", "--root", str(root), "--out", str(tmp_path / "d")]) == 2


def test_pamfn_finds_the_feature_folder_inside_the_download(tmp_path, rg_root, capsys):
    features, _ = rg_root
    dataset = features.parent  # RG/ holding RG-feature/ and train.txt, as the MCMoE README has users download it
    assert main(["import-features", "--format", "pamfn", "--root", str(dataset), "--out", str(tmp_path / "cache"),
                 "--action", "Ball"]) == 0
    out = capsys.readouterr().out
    assert f"features read from {features} (found in --root {dataset})" in out
    assert FeatureCache.open(tmp_path / "cache").read_record("Ball_0").status == DONE
    (dataset / "Fis-feature").mkdir()
    (dataset / "Fis-feature" / "FISV_rgb_VST.npy").write_bytes(b"")
    with pytest.raises(FeatureImportError, match="several folders .*Fis-feature, RG-feature.*pass one of them as --root"):
        import_pamfn(dataset, tmp_path / "other")
    with pytest.raises(FeatureImportError, match="nor does a folder inside it .*RG-feature/"):
        import_pamfn(tmp_path / "cache", tmp_path / "other")


def test_imported_labels_escape_formula_ids_and_read_back_exactly(tmp_path, fs1000_root):
    """A published video named like a spreadsheet formula: labels/<target>.csv escapes it (a leading single
    quote), the labels reader gives the id back exactly, and it matches the cache's record."""
    root, _ = fs1000_root
    for folder in ("output_feature_fs1000_new", "i3d_avg_clip8_5s_fs1000", "ast_feature_fs1000_new"):
        (root / folder / "2019_R_PF_B.npy").rename(root / folder / "=2019+1.npy")
    train = root / "train_fs1000_new.txt"
    train.write_text(train.read_text().replace("2019_R_PF_B", "=2019+1"))
    (fs,) = import_skating_mixer(root, tmp_path / "cache")
    assert "\n'=2019+1,33.3,train\n" in fs.labels["PCS"].read_text()
    labels = read_labels(fs.labels["PCS"])
    assert "=2019+1" in labels.scores and "=2019+1" in check_against_cache(labels, fs.cache)
