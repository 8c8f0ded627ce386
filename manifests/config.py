"""The one base of every configuration class recorded as JSON beside what it produced.

Extraction, training and model configurations are dataclasses that inherit `RecordedConfig`, so all
of them follow the same three rules:

- `to_dict()` is the JSON form: every field plus `schema_version`, the version of the class's
  layout that wrote it. `from_dict(to_dict())` gives back an equal config.
- `from_dict(data, source)` refuses a key the class does not know, naming the key and `source`
  (the file it came from), so a typo in a hand-edited file or a file from a newer tool is an error,
  never silently dropped. A key an earlier version wrote that no upgrade reads (`RETIRED_KEYS`) is
  refused with what to do about it.
- A file of an earlier version than the class's current `SCHEMA_VERSION` (a file without
  `schema_version` is version 1) goes through the class's `upgrade` first, which returns the
  fields of the current layout; a file from a newer version is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

ConfigT = TypeVar("ConfigT", bound="RecordedConfig")

SCHEMA_KEY = "schema_version"


class ConfigError(ValueError):
    """A recorded configuration that this version cannot read; the message names the key and the file."""


@dataclasses.dataclass
class RecordedConfig:
    SCHEMA_VERSION: ClassVar[int] = 1
    # Keys an earlier version wrote whose files are not read (CHANGELOG.md): key -> why, and what to do
    RETIRED_KEYS: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data[SCHEMA_KEY] = self.SCHEMA_VERSION
        return data

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any], source: str | None = None) -> ConfigT:
        where = f" in {source}" if source else ""
        data = dict(data)
        version = data.pop(SCHEMA_KEY, 1)
        if not isinstance(version, int) or version < 1:
            raise ConfigError(f"{cls.__name__}{where}: {SCHEMA_KEY} must be a positive integer, got {version!r}")
        if version > cls.SCHEMA_VERSION:
            raise ConfigError(
                f"{cls.__name__}{where} has {SCHEMA_KEY} {version}, newer than this version of the tool reads "
                f"({cls.SCHEMA_VERSION}): upgrade the tool"
            )
        if version < cls.SCHEMA_VERSION:
            data = cls.upgrade(data, version)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        retired = [key for key in unknown if key in cls.RETIRED_KEYS]
        if retired:
            raise ConfigError(f"{cls.__name__}{where}: key {retired[0]!r} {cls.RETIRED_KEYS[retired[0]]}")
        if unknown:
            raise ConfigError(f"{cls.__name__}{where}: unknown key {unknown[0]!r}"
                              + (f" (and {unknown[1:]})" if len(unknown) > 1 else "") + f"; known keys: {known}")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is absent
            raise ConfigError(f"{cls.__name__}{where}: {exc}") from None

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """The fields of the current layout for `data` recorded at `version` (< SCHEMA_VERSION).
        Classes that change their layout bump SCHEMA_VERSION and override this."""
        return data


def _plain(value: Any) -> Any:
    """Tuples as lists and nested dataclasses as dicts: the value json.dumps writes and reads back."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if isinstance(value, RecordedConfig) else dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
