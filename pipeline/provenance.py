"""How an output was made, in the words every output file uses: random or pretrained backbones, and
the extraction configuration hash of its features; and the one writer of figures, which carry them too.

Scores, evaluation tables and reproduction tables all carry these two fields, and anything built on
random-weight backbones says so in its title or first line, because such numbers look exactly like
real ones and mean nothing.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable

from manifests.files import atomic_write_bytes


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


def save_figure(path: Path, figure, description: str) -> None:
    """A matplotlib figure as a PNG, written atomically (a full disk leaves no half image), with
    `description` (how it was made) in the file's Description text chunk."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=120, format="png", metadata={"Description": description})
    atomic_write_bytes(Path(path), buffer.getvalue())
