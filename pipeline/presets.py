"""The published benchmark settings (docs/design/mcmoe.md), as data.

A preset carries two kinds of values:
- dataset facts, used by every model: clip_num (segments per sample) and the score range labels are
  divided by;
- the published optimisation and model settings (epochs, lr, alpha, ...; MCMoE's). Which of them a
  model takes, and onto which of its config fields, the model's config declares (PRESET_TRAINING,
  PRESET_FIELDS, `from_preset` in models/): MCMoE takes them all; LIMSSR none of them, but its own
  reference command for the preset's dataset and target (models/limssr.py REFERENCE_COMMANDS).
Every value is overridable by the matching `pipeline train` flag.

Every preset trains as the reference code does, step for step: one incomplete training mask per batch
(`mask_policy incomplete-per-batch`) and MCMoE's experts' BatchNorm updated in the reference's modality
order (`expert_stats_order reference`); docs/design/mcmoe.md says what per-sample masks change.

No preset turns on the sinusoidal position encoding of the STEM input: the reference README's
`--use_pe True` was parsed and never applied by the reference code (later removed), so the published
numbers were made without it. `--position-encoding` remains an explicit option.

Each preset carries the seed of the reference command (RG 0, Fis-V 3, FS1000 1), used by MCMoE when no
--seed is given (LIMSSR's command has its own: RG Ball 6, Clubs 113, else 42); run.json records, for every setting, whether it came from the preset, a flag or a
default.

FS1000's PCS labels are divided by the factor in the label file's last column; that happens when the
labels are imported (`pipeline import-features --format skating-mixer`), so the PCS preset's range
(60) applies to the already-divided values (`pcs_factor_divided` records it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    dataset: str  # rg | fisv | fs1000
    target: str  # action (RG) or score type (Fis-V, FS1000)
    clip_num: int
    score_range: float
    epochs: int
    lr: float
    alpha: float  # weight of L_div
    seed: int  # the reference command's --seed
    position_encoding: bool = False  # STEM input encoding: off, as in every published run
    batch_size: int = 32
    optimizer: str = "adam"
    weight_decay: float = 1e-4
    min_lr_ratio: float = 0.01  # cosine decay to 1% of lr
    warmup_epochs: int = 0
    dropout: float = 0.3
    hidden: int = 256
    pcs_factor_divided: bool = False
    # Reproduction mode: one training mask per batch and the experts' BatchNorm updated in the
    # reference's modality order, so a training step is the reference code's step.
    mask_policy: str = "incomplete-per-batch"
    expert_stats_order: str = "reference"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def feature_recipe(self) -> str:
        """The recipe (extractors/recipes.py) of the published features this dataset's models are trained
        on: the one raw clips must go through to be scored by such a model."""
        return FEATURE_RECIPES[self.dataset]

    def data_overrides(self) -> dict[str, Any]:
        """The dataset facts, which every model uses."""
        return {"clip_num": self.clip_num, "score_range": self.score_range}


FEATURE_RECIPES = {"rg": "pamfn", "fisv": "pamfn", "fs1000": "skating-mixer"}


def _rg(action: str, epochs: int) -> Preset:
    return Preset("rg", action, clip_num=68, score_range=25.0, epochs=epochs, lr=2e-4, alpha=1.0, seed=0)


def _fisv(score: str, score_range: float, epochs: int) -> Preset:
    return Preset("fisv", score, clip_num=124, score_range=score_range, epochs=epochs, lr=2e-4, alpha=0.5, seed=3)


def _fs1000(score: str, score_range: float, epochs: int) -> Preset:
    return Preset(
        "fs1000", score, clip_num=95, score_range=score_range, epochs=epochs, lr=1e-4, alpha=1.0, seed=1,
        pcs_factor_divided=(score == "PCS"),
    )


PRESETS: dict[str, dict[str, Preset]] = {
    "rg": {a: _rg(a, e) for a, e in [("Ball", 410), ("Clubs", 560), ("Hoop", 270), ("Ribbon", 300)]},
    "fisv": {s: _fisv(s, r, e) for s, r, e in [("TES", 45.0, 460), ("PCS", 40.0, 510)]},
    "fs1000": {
        s: _fs1000(s, r, e)
        for s, r, e in [
            ("TES", 130.0, 360), ("PCS", 60.0, 460), ("SS", 10.0, 360), ("TR", 10.0, 210),
            ("PE", 10.0, 520), ("CO", 10.0, 520), ("IN", 10.0, 390),
        ]
    },
}


def get_preset(name: str, target: str | None) -> Preset:
    """The preset for a dataset and an action / score type (`--preset rg --action Ball`)."""
    try:
        targets = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
    if target is None:
        raise ValueError(f"--preset {name} needs --action, one of {list(targets)}")
    matches = [t for t in targets if t.lower() == target.lower()]
    if not matches:
        raise ValueError(f"preset {name!r} has no action/score type {target!r}; choose from {list(targets)}")
    return targets[matches[0]]
