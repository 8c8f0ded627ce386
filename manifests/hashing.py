"""The one hash that names a feature cache folder (`OUT/<config-hash>/`): a short sha1 of the canonical
JSON of the settings that change the features, and nothing else.

Settings that only change how fast features are made (device, batch size, workers) never enter it, so
they never split a cache. A setting outside a class's always-hashed fields enters only when its value
differs from its default, and that default must reproduce the features of the caches that do not
record the setting: adding a setting then leaves every existing cache its name. Light on purpose
(no numpy): the command line imports it through extractors/config.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Collection

from manifests.config import RecordedConfig


def feature_hash(fields: dict[str, Any], spaced: bool = False) -> str:
    """12 hex digits of sha1 over `fields` as JSON with sorted keys.

    spaced: json's default separators (", ", ": "), in which imported feature sets' hashes are spelled:
    their folder names depend on it (CHANGELOG.md, "Feature caches"). Everything else is compact."""
    separators = (", ", ": ") if spaced else (",", ":")
    canonical = json.dumps(fields, sort_keys=True, separators=separators)
    return hashlib.sha1(canonical.encode()).hexdigest()[:12]


def hashed_fields(config: RecordedConfig, always: Collection[str]) -> dict[str, Any]:
    """The fields of `config` that enter its feature hash, as JSON values.

    always: the fields hashed whatever their value (every existing cache's folder name covers all of
    them). Any other field enters only when it differs from its default. A field declared with
    metadata={"hash": False} (informational, or only about speed) never enters."""
    data = RecordedConfig.to_dict(config)  # every field (a subclass's to_dict may leave some out)
    out = {}
    for f in dataclasses.fields(config):
        if f.metadata.get("hash", True) is False:
            continue
        if f.name in always or data[f.name] != _default_json(f):
            out[f.name] = data[f.name]
    return out


def _default_json(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return _NO_DEFAULT  # a required field: always hashed
    return json.loads(json.dumps(default))  # tuples as lists, as to_dict writes them


_NO_DEFAULT = object()
