"""How an output was made, in the words every output file uses: random or pretrained backbones, and
the extraction configuration hash of its features.

Scores, evaluation tables and reproduction tables all carry these two fields, and anything built on
random-weight backbones says so in its title or first line, because such numbers look exactly like
real ones and mean nothing.
"""

from __future__ import annotations

from typing import Any, Iterable


def provenance(configs: dict[str, Any] | Iterable[dict[str, Any]]) -> dict[str, Any]:
    """{"random_weights", "config_hash"} of one feature configuration (a cache's config.json or a run's
    extraction_config.json), or of several (random if any is; hashes joined with '+')."""
    configs = [configs] if isinstance(configs, dict) else list(configs)
    hashes = list(dict.fromkeys(str(c.get("config_hash")) for c in configs))
    return {"random_weights": any(bool(c.get("random_weights")) for c in configs), "config_hash": "+".join(hashes)}


def headline(what: str, made: dict[str, Any]) -> str:
    """The first line of an output: `what` with its features, shouting when the backbones were random."""
    if made["random_weights"]:
        return (f"RANDOM-WEIGHT BACKBONES: {what} from features {made['config_hash']} made by untrained "
                "backbones; smoke-test numbers, not results")
    return f"{what} from features {made['config_hash']} (pretrained backbones)"
