"""The feature cache's config.json (CacheConfig): caches written before it still open under the same
names, one hash over the settings that change features, several configurations told apart, and a
cache refusing features of another extractor version."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from extractors.base import feature_versions
from extractors.config import ExtractionConfig
from manifests.cache import CacheConfig, CacheError, FeatureCache, config_differences, open_cache
from manifests.config import ConfigError
from manifests.hashing import hashed_fields
from pipeline.cli import main
from pipeline.stages.importers import import_pamfn, import_skating_mixer
from tests.fixture_numbers import assert_features_close
from tests.fixtures.cache.make_fixtures import TINY, pamfn, skating_mixer

FIXTURES = Path(__file__).parent / "fixtures" / "cache"
EXTRACTED = {"0d4205749cbb": ["--segment-frames", "8"], "b18c7df8fac8": ["--segment-frames", "12", "--seed", "3"]}
IMPORTED = {"abe976db5030": "pamfn", "1d29c9007d2c": "skating-mixer"}
OLD_KEYS = {  # config.json's keys as 5115771 wrote them
    "extract": {"config_hash", "created_at", "extraction", "extractors", "modalities", "note", "random_weights", "source"},
    "import": {"config_hash", "created_at", "dataset", "extractors", "format", "modalities", "protocol",
               "random_weights", "source", "subset"},
}


@pytest.fixture()
def old_out(tmp_path) -> Path:
    """A copy of the fixtures' OUT folder (four configurations written by 5115771)."""
    return Path(shutil.copytree(FIXTURES / "out", tmp_path / "out"))


def stored(root: Path) -> dict:
    return json.loads((root / "config.json").read_text())


# --------------------------------------------------------------------------- caches written before CacheConfig


def test_old_caches_keep_their_names_and_open(old_out):
    assert sorted(p.name for p in old_out.iterdir()) == sorted([*EXTRACTED, *IMPORTED])
    for name in EXTRACTED:
        cache = FeatureCache(old_out / name)
        assert ExtractionConfig.from_dict(stored(cache.root)["extraction"]).config_hash() == name
        assert cache.config.source == "extract" and cache.config.config_hash == name
        assert cache.modalities == ["rgb", "flow", "audio"] and cache.random_weights
        features = cache.load_features("clip")
        for modality, array in features.items():
            np.testing.assert_array_equal(array, np.load(cache.feature_path("clip", modality)))
    for name, format in IMPORTED.items():
        config = FeatureCache(old_out / name).config
        again = CacheConfig.imported(config.format, config.dataset, config.subset, config.protocol,
                                     config.modalities, config.extractors)
        assert config.format == format and again.config_hash == name
        assert FeatureCache(old_out / name).feature_dims == {"rgb": 8, "flow": 6, "audio": 4}


def test_extracting_again_gives_the_old_folder_and_the_same_features(old_out, tmp_path, capsys):
    clip = FIXTURES / "videos" / "clip.mp4"
    fresh = tmp_path / "fresh"
    for name, flags in EXTRACTED.items():
        assert main(["extract", "--videos", str(clip), "--out", str(fresh), *TINY, *flags]) == 0
        new, old = FeatureCache(fresh / name), FeatureCache(old_out / name)
        assert set(new.read_config()) == OLD_KEYS["extract"] | {"schema_version"}
        assert new.config.extractor_versions() == old.config.extractor_versions()
        assert config_differences(old.read_config(), new.read_config()) == []
        for modality, array in old.load_features("clip").items():
            assert_features_close(new.load_features("clip")[modality], array, modality, name)
        # into the old cache itself: nothing to do, the old record is trusted as it is
        before = old.read_record("clip").finished_at
        capsys.readouterr()
        assert main(["extract", "--videos", str(clip), "--out", str(old_out), *TINY, *flags]) == 0
        assert "0 extracted, 1 already done" in capsys.readouterr().out
        assert old.read_record("clip").finished_at == before


def test_importing_again_gives_the_old_folders(old_out, tmp_path):
    (tmp_path / "pamfn").mkdir()
    pamfn(tmp_path / "pamfn")
    skating_mixer(tmp_path / "sm")
    (ball,) = import_pamfn(tmp_path / "pamfn", old_out)
    (fs1000,) = import_skating_mixer(tmp_path / "sm", old_out)
    assert ball.cache.root == old_out / "abe976db5030" and fs1000.cache.root == old_out / "1d29c9007d2c"
    fresh = import_pamfn(tmp_path / "pamfn", tmp_path / "fresh")[0].cache
    assert fresh.root.name == "abe976db5030"
    assert set(fresh.read_config()) == OLD_KEYS["import"] | {"schema_version"}
    assert config_differences(FeatureCache(old_out / "abe976db5030").read_config(), fresh.read_config()) == []


def test_importing_into_a_folder_whose_description_was_changed_is_refused(tmp_path):
    (tmp_path / "pamfn").mkdir()
    pamfn(tmp_path / "pamfn")
    cache = import_pamfn(tmp_path / "pamfn", tmp_path / "out")[0].cache
    edited = {**cache.read_config(), "dataset": "another"}  # the folder name no longer matches its content
    (cache.root / "config.json").write_text(json.dumps(edited))
    with pytest.raises(CacheError, match=r"holds a different feature set .*'dataset'.*import into a new --out"):
        import_pamfn(tmp_path / "pamfn", tmp_path / "out")


# --------------------------------------------------------------------------- one folder, several configurations


def test_a_folder_of_several_configurations_lists_what_differs(old_out):
    with pytest.raises(CacheError) as caught:
        FeatureCache.open(old_out)
    message = str(caught.value)
    assert "holds features from 4 extraction configurations" in message and "protocol=None" not in message
    lines = {line.split()[0]: line for line in message.splitlines()[1:]}
    assert sorted(Path(p).name for p in lines) == sorted([*EXTRACTED, *IMPORTED])
    first, second = lines[str(old_out / "0d4205749cbb")], lines[str(old_out / "b18c7df8fac8")]
    assert "hash 0d4205749cbb" in first and "segment_frames=8" in first and "seed=0" in first
    assert "segment_frames=12" in second and "seed=3" in second and "RANDOM WEIGHTS" in second
    assert "format=pamfn" in lines[str(old_out / "abe976db5030")]
    assert "protocol=fs1000" in lines[str(old_out / "1d29c9007d2c")]
    for name in [*EXTRACTED, *IMPORTED]:  # each one opens when named
        assert FeatureCache.open(old_out / name).config_hash == name


def test_configurations_differing_in_architecture_size_say_so(tmp_path):
    for size in ("tiny", "full"):
        extraction = ExtractionConfig(modalities=("rgb",), backbones={"rgb": "vst"}, weights="random", arch_size=size)
        open_cache(tmp_path, CacheConfig(
            source="extract", config_hash=extraction.config_hash(), modalities=["rgb"], random_weights=True,
            extractors={"rgb": {"name": "vst", "version": "1", "feature_dim": 128 if size == "tiny" else 1024}},
            extraction=extraction.to_dict(),
        ))
    with pytest.raises(CacheError) as caught:
        FeatureCache.open(tmp_path)
    lines = str(caught.value).splitlines()[1:]
    assert len(lines) == 2 and sorted(line.split("arch_size=")[1].split()[0] for line in lines) == ["full", "tiny"]
    assert all("hash " in line and "seed" not in line for line in lines)  # only what differs


def test_temporary_files_of_killed_writes_in_the_cache_root_go_on_the_next_run(tmp_path):
    """config.json and manifest.csv are written through temporary files beside them; a kill mid-write
    leaves one. The next open_cache removes those whose writer is gone (its pid, on this host, or an age
    past the claims' staleness limit) and keeps a live writer's."""
    import os
    import time

    from manifests.files import temporary_path
    from tests.test_claims import written_by_a_dead_process

    extraction = ExtractionConfig(modalities=("rgb",), backbones={"rgb": "vst"}, weights="random")
    config = CacheConfig(source="extract", config_hash=extraction.config_hash(), modalities=["rgb"],
                         extractors={"rgb": {"name": "vst", "version": "1", "feature_dim": 8}},
                         extraction=extraction.to_dict(), random_weights=True)
    root = open_cache(tmp_path, config).root
    killed = [written_by_a_dead_process(root / name) for name in ("config.json", "manifest.csv")]
    live = temporary_path(root / "manifest.csv")  # this process, writing it now
    live.write_text("mid-write")
    legacy_fresh, legacy_old = root / ".manifest.csv.0a1b2c3d4e5f.tmp", root / ".config.json.a1b2c3d4e5f6.tmp"
    for path in (legacy_fresh, legacy_old):  # named before temporary files carried their writer
        path.write_text("half")
    past = time.time() - 601
    os.utime(legacy_old, (past, past))
    open_cache(tmp_path, config)
    assert not any(p.exists() for p in (*killed, legacy_old))
    assert live.exists() and legacy_fresh.exists()


def test_manifest_cells_a_spreadsheet_would_run_are_escaped_and_read_back_exactly(tmp_path):
    """Videos named like formulas: manifest.csv escapes their text cells with a leading single quote
    (numbers, negative ones included, stay numbers); the reader's undo gives the ids back exactly, and
    record.json keeps them as they are."""
    import csv

    from manifests.cache import DONE, FAILED, ModalityRecord, VideoRecord
    from manifests.files import unescape_csv_cell

    extraction = ExtractionConfig(modalities=("rgb",), backbones={"rgb": "vst"}, weights="random")
    cache = open_cache(tmp_path, CacheConfig(
        source="extract", config_hash=extraction.config_hash(), modalities=["rgb"], random_weights=True,
        extractors={"rgb": {"name": "vst", "version": "1", "feature_dim": 8}}, extraction=extraction.to_dict()))
    ids = ['=HYPERLINK("http:x","y")', "=1+2", "+SUM(1,2)", "@cmd", "-1", "plain"]
    for video_id in ids:
        cache.write_record(VideoRecord(video_id=video_id, path=f"/v/{video_id}.mp4", status=FAILED, fps=-2.5,
                                       error="-bad", modalities={"rgb": ModalityRecord(DONE, [3, 8])}))
    with open(cache.write_manifest(), newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_id = {row["video_id"]: row for row in rows}
    assert sorted(by_id) == sorted(["'" + i for i in ids if i not in ("-1", "plain")] + ["-1", "plain"])
    assert all(row["fps"] == "-2.5" and row["error"] == "'-bad" and row["path"].startswith("/v/") for row in rows)
    assert sorted(unescape_csv_cell(row["video_id"]) for row in rows) == sorted(ids)
    assert sorted(r.video_id for r in cache.records()) == sorted(ids)


def test_manifest_cells_holding_line_breaks_stay_one_cell(tmp_path):
    r"""A video named with a carriage return and an error message over lines keep their rows in manifest.csv
    (pandas and the csv module); unknown numbers are empty cells. Break tried: rows_to_csv writing with
    csv's "\n" terminator splits the rows."""
    import csv

    import pandas as pd

    from manifests.cache import DONE, FAILED, ModalityRecord, VideoRecord

    extraction = ExtractionConfig(modalities=("rgb",), backbones={"rgb": "vst"}, weights="random")
    cache = open_cache(tmp_path, CacheConfig(
        source="extract", config_hash=extraction.config_hash(), modalities=["rgb"], random_weights=True,
        extractors={"rgb": {"name": "vst", "version": "1", "feature_dim": 8}}, extraction=extraction.to_dict()))
    ids = ["a\rb", "c\r\nd", "plain"]
    for video_id in ids:
        cache.write_record(VideoRecord(video_id=video_id, path=f"/v/{video_id}.mp4", status=FAILED,
                                       error="decoder said:\r\nbad frame\rstop", modalities={"rgb": ModalityRecord(DONE, [3, 8])}))
    with open(cache.write_manifest(), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["video_id"] for row in rows) == sorted(ids)
    assert {row["error"] for row in rows} == {"decoder said:\r\nbad frame\rstop"} and {row["fps"] for row in rows} == {""}
    table = pd.read_csv(cache.root / "manifest.csv")
    assert sorted(table["video_id"]) == sorted(ids) and table["fps"].isna().all()


# --------------------------------------------------------------------------- the hash and the schema


def test_a_setting_added_later_renames_no_cache_until_it_is_used():
    @dataclasses.dataclass
    class Later(ExtractionConfig):
        denoise: bool = False  # a setting added after the hash existed, its default today's features
        threads: int = dataclasses.field(default=4, metadata={"hash": False})  # speed only

    base = ExtractionConfig()
    assert Later().config_hash() == base.config_hash()
    assert Later(threads=16).config_hash() == base.config_hash()
    assert Later(denoise=True).config_hash() != base.config_hash()
    # today's settings are hashed even at their defaults, as they were when today's caches were named
    assert set(hashed_fields(base, base.HASHED_SINCE_V1)) == set(ExtractionConfig.HASHED_SINCE_V1)
    assert set(hashed_fields(Later(), Later.HASHED_SINCE_V1)) == set(ExtractionConfig.HASHED_SINCE_V1)


def test_unknown_keys_are_errors_naming_the_key(old_out):
    with pytest.raises(ConfigError, match="unknown key 'segment_frame'"):
        ExtractionConfig.from_dict({"segment_frame": 8}, source="config.json")
    root = old_out / "0d4205749cbb"
    payload = stored(root)
    payload["colour"] = "red"
    (root / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CacheError, match=rf"{root}/config.json: unknown key 'colour'"):
        FeatureCache(root).config


def test_config_round_trip_and_differences():
    extraction = ExtractionConfig(weights="random", arch_size="tiny")
    config = CacheConfig(source="extract", config_hash=extraction.config_hash(), modalities=["rgb"],
                         extractors={"rgb": {"name": "vst", "version": "1", "feature_dim": 8}},
                         random_weights=True, extraction=extraction.to_dict(), note="n", created_at="t")
    written = json.loads(json.dumps(config.to_dict()))
    assert written["schema_version"] == 1 and "format" not in written  # no import fields on an extracted cache
    assert CacheConfig.from_dict(written) == config
    assert ExtractionConfig.from_dict(written["extraction"]) == extraction
    old = {k: v for k, v in written.items() if k != "schema_version"}  # as a run recorded it before
    old["extraction"] = {k: v for k, v in old["extraction"].items() if k != "schema_version"}
    assert config_differences(old, {**written, "created_at": "later"}) == []
    assert config_differences(old, {**written, "random_weights": False}) == ["random_weights"]


# --------------------------------------------------------------------------- extractor versions


def test_a_cache_of_another_extractor_version_is_refused_naming_the_folder(old_out, capsys):
    root = old_out / "0d4205749cbb"
    config = FeatureCache(root).config
    wanted = feature_versions(ExtractionConfig.from_dict(config.extraction))
    assert config.version_mismatch(wanted) is None
    config.extractors["rgb"]["version"] = "0"  # features of an older rgb extractor
    FeatureCache(root).write_config(config)
    assert "rgb" in FeatureCache(root).config.version_mismatch(wanted)
    clip = FIXTURES / "videos" / "clip.mp4"
    assert main(["extract", "--videos", str(clip), "--out", str(old_out), *TINY, *EXTRACTED[root.name]]) == 2
    error = capsys.readouterr().err
    assert str(root) in error and "extract into a new --out folder" in error and "'0'" in error
    with pytest.raises(CacheError, match="extract into a new --out folder"):
        open_cache(old_out, dataclasses.replace(config, extractors={**config.extractors, "rgb": {
            **config.extractors["rgb"], "version": "1"}}))
