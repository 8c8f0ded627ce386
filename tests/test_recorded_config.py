"""The shared base of every recorded configuration: JSON round trip, schema version, unknown keys."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from manifests.config import ConfigError, RecordedConfig


@dataclass
class Example(RecordedConfig):
    SCHEMA_VERSION = 2

    name: str
    sizes: tuple[int, ...] = (1, 2)
    options: dict[str, Any] = field(default_factory=dict)
    distance: str = "cosine"

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        # version 1 had no `distance` and meant Euclidean.
        return {"distance": "euclidean", **data}


def test_json_round_trip_gives_an_equal_config():
    config = Example("a", sizes=(3, 4), options={"k": [1, 2]})
    written = json.loads(json.dumps(config.to_dict()))
    assert written["schema_version"] == 2
    assert written["sizes"] == [3, 4]
    again = Example.from_dict(written)
    assert again.to_dict() == config.to_dict()


def test_unknown_key_is_an_error_naming_the_key_and_the_file():
    with pytest.raises(ConfigError, match=r"Example in runs/a/run.json: unknown key 'colour'"):
        Example.from_dict({"name": "a", "colour": "red", "schema_version": 2}, source="runs/a/run.json")


def test_files_without_a_version_are_upgraded_and_newer_files_refused():
    old = Example.from_dict({"name": "a"})  # written before schema_version existed: version 1
    assert old.distance == "euclidean"
    current = Example.from_dict({"name": "a", "schema_version": 2})
    assert current.distance == "cosine"
    with pytest.raises(ConfigError, match="newer than this version"):
        Example.from_dict({"name": "a", "schema_version": 3}, source="x.json")


def test_missing_required_field_names_the_class_and_file():
    with pytest.raises(ConfigError, match=r"Example in f.json: .*name"):
        Example.from_dict({"schema_version": 2}, source="f.json")
