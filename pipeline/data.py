"""From cached features to model batches: crops, padding, availability masks, splits.

A sample is one video's features {modality: (T, C)} holding only the modalities it really has
(absent in the data, or hidden by `--train-missing`). Batches follow the model contract
(models/__init__.py): features {modality: (B, clip_num, C)} with zeros where a modality is absent,
and `present` (B, M) in the cache's modality order.

Training masks (`available`, what the model may look at) are drawn per sample:
- "incomplete" (the reference protocol's subsets): a uniformly drawn non-empty subset of the
  modalities the sample has, never the full set of all M modalities. A sample that already lacks a
  modality is incomplete as it stands, so its whole present set is one of the choices; a sample with a
  single present modality keeps it. Only when M == 1 is the full set used (nothing else exists).
- "any": a uniformly drawn non-empty subset of the present modalities, the full set included.
or once per batch, as the reference code draws them:
- "incomplete-per-batch" / "any-per-batch": one subset S drawn uniformly from the same choices made
  over all M modalities (never the full set / the full set included), given to every sample as S
  intersected with what the sample has; a sample left with nothing draws its own per-sample subset.
  On complete data every row is S: the reference's draw.
Either way a modality absent in the data is never unmasked and at least one modality stays.

All randomness comes from an explicit torch.Generator, so a resumed run draws the same numbers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from manifests.cache import FeatureCache

MASK_POLICIES = ("incomplete", "any", "incomplete-per-batch", "any-per-batch")

# The papers' short names (Table 1: {v,f,a}); other modalities are written out.
MODALITY_LETTERS = {"rgb": "v", "flow": "f", "audio": "a"}


@dataclass
class Sample:
    video_id: str
    features: dict[str, np.ndarray]  # only the modalities this sample has, (T, C) float32
    score: float = float("nan")  # on the original scale; NaN for unlabelled videos (scoring)

    @property
    def length(self) -> int:
        return max(array.shape[0] for array in self.features.values())


@dataclass
class Batch:
    features: dict[str, torch.Tensor]  # {modality: (B, clip_num, C)}, zeros where absent
    present: torch.Tensor  # (B, M) bool
    score: torch.Tensor  # (B,) original scale
    video_ids: list[str]

    def to(self, device: torch.device) -> "Batch":
        return Batch(
            {m: x.to(device, non_blocking=True) for m, x in self.features.items()},
            self.present.to(device),
            self.score.to(device),
            self.video_ids,
        )


# --------------------------------------------------------------------------- loading


def load_samples(
    cache: FeatureCache,
    video_ids: Sequence[str],
    scores: dict[str, float] | None = None,
    hidden: dict[str, Sequence[str]] | None = None,
) -> list[Sample]:
    """Read the videos' features once (all present modalities), dropping `hidden` ones."""
    samples = []
    for video_id in video_ids:
        features = cache.load_features(video_id)
        for modality in (hidden or {}).get(video_id, ()):
            features.pop(modality, None)
        for modality, array in features.items():
            if array.ndim != 2:
                raise ValueError(f"{cache.feature_path(video_id, modality)}: expected (T, C), got {array.shape}")
        score = float("nan") if scores is None else float(scores[video_id])
        samples.append(Sample(video_id, features, score))
    return samples


# --------------------------------------------------------------------------- crops and batches


def center_start(length: int, clip_num: int) -> int:
    return max(0, (length - clip_num) // 2)


def crop_or_pad(array: np.ndarray, clip_num: int, start: int) -> np.ndarray:
    """clip_num rows starting at `start`, zero padded at the end when the sequence is shorter."""
    window = array[start : start + clip_num]
    if len(window) == clip_num:
        return window
    out = np.zeros((clip_num, array.shape[1]), dtype=np.float32)
    out[: len(window)] = window
    return out


def collate(
    samples: Sequence[Sample],
    modalities: Sequence[str],
    feature_dims: dict[str, int],
    clip_num: int,
    starts: Sequence[int] | None = None,
) -> Batch:
    """Stack samples into a batch; `starts` are crop offsets (default: centre crops)."""
    if starts is None:
        starts = [center_start(s.length, clip_num) for s in samples]
    features = {}
    for modality in modalities:
        stacked = np.zeros((len(samples), clip_num, feature_dims[modality]), dtype=np.float32)
        for i, (sample, start) in enumerate(zip(samples, starts)):
            array = sample.features.get(modality)
            if array is None:
                continue
            if array.shape[1] != feature_dims[modality]:
                raise ValueError(
                    f"video {sample.video_id!r}: {modality} features are {array.shape[1]}-d, "
                    f"the model expects {feature_dims[modality]}"
                )
            stacked[i] = crop_or_pad(array, clip_num, start)
        features[modality] = torch.from_numpy(stacked)
    present = torch.tensor([[m in s.features for m in modalities] for s in samples], dtype=torch.bool)
    score = torch.tensor([s.score for s in samples], dtype=torch.float32)
    return Batch(features, present, score, [s.video_id for s in samples])


def random_starts(samples: Sequence[Sample], clip_num: int, generator: torch.Generator) -> list[int]:
    """Uniform crop offsets in [0, T - clip_num] (0 when the sequence is not longer than clip_num)."""
    highs = [max(0, s.length - clip_num) + 1 for s in samples]
    draws = torch.rand(len(samples), generator=generator, dtype=torch.float64)
    return [min(int(d * h), h - 1) for d, h in zip(draws.tolist(), highs)]


def training_batches(
    samples: Sequence[Sample],
    modalities: Sequence[str],
    feature_dims: dict[str, int],
    clip_num: int,
    batch_size: int,
    generator: torch.Generator,
) -> Iterator[Batch]:
    """One epoch: shuffled order, random crops; every draw from `generator`."""
    order = torch.randperm(len(samples), generator=generator).tolist()
    for first in range(0, len(order), batch_size):
        chosen = [samples[i] for i in order[first : first + batch_size]]
        yield collate(chosen, modalities, feature_dims, clip_num, random_starts(chosen, clip_num, generator))


# --------------------------------------------------------------------------- modality subsets


def modality_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset: single modalities first, then pairs, ..., the full set last."""
    return [c for size in range(1, len(modalities) + 1) for c in itertools.combinations(modalities, size)]


def subset_name(subset: Sequence[str]) -> str:
    return "{" + ",".join(MODALITY_LETTERS.get(m, m) for m in subset) + "}"


def subset_mask(subset: Sequence[str], modalities: Sequence[str]) -> torch.Tensor:
    return torch.tensor([m in subset for m in modalities], dtype=torch.bool)


def draw_training_masks(present: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """(B, M) availability masks: one uniformly drawn allowed subset per sample, or per batch for the
    "-per-batch" policies (see module doc)."""
    if policy not in MASK_POLICIES:
        raise ValueError(f"mask policy must be one of {MASK_POLICIES}, got {policy!r}")
    num_modalities = present.shape[1]
    table = torch.tensor(
        [[(code >> j) & 1 == 1 for j in range(num_modalities)] for code in range(1, 2**num_modalities)],
        dtype=torch.bool,
    )  # (K, M): every non-empty subset
    present = present.cpu()
    inside = ~(table[None] & ~present[:, None]).any(-1)  # (B, K): subset within what the sample has
    # A sample with nothing allowed (only possible if it has no modality) would break the contract.
    if not inside.any(-1).all():
        raise ValueError("a sample has no modality at all; it cannot be trained on")
    incomplete = policy.startswith("incomplete") and num_modalities > 1
    allowed = inside & ~table.all(-1)[None] if incomplete else inside
    if not policy.endswith("-per-batch"):
        choice = torch.multinomial(allowed.double(), 1, generator=generator).squeeze(1)
        return table[choice]
    choices = table[~table.all(-1)] if incomplete else table
    shared = choices[torch.randint(len(choices), (1,), generator=generator)]  # (1, M)
    masks = shared & present
    empty = ~masks.any(1)
    if empty.any():  # the batch's subset holds nothing this sample has: it draws its own
        own = torch.multinomial(allowed[empty].double(), 1, generator=generator).squeeze(1)
        masks[empty] = table[own]
    return masks


# --------------------------------------------------------------------------- splits and simulated missingness


# Fewer validation videos than this make the choice of checkpoint close to a coin toss; train says so.
FEW_VALIDATION_VIDEOS = 5


def split_train_val(video_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded random validation split: round(n * fraction) videos (at least 1 when fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {fraction}")
    ids = sorted(video_ids)
    if fraction == 0.0:
        return ids, []
    num_val = max(1, int(round(len(ids) * fraction)))
    if num_val >= len(ids):
        raise ValueError(f"--val-fraction {fraction} leaves no training videos out of {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:num_val])
    val_set = set(val)
    return [v for v in ids if v not in val_set], val


def parse_missing_rates(text: str) -> dict[str, float]:
    """`audio=0.5,flow=0.3` -> {"audio": 0.5, "flow": 0.3} (names are checked against the cache later)."""
    rates = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--train-missing: {part!r} is not MODALITY=RATE")
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"--train-missing: rate {value!r} for {name} is not a number") from None
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"--train-missing: rate for {name} must be in [0, 1), got {rate}")
        rates[name] = rate
    return rates


def draw_train_missing(
    present: dict[str, Sequence[str]], rates: dict[str, float], seed: int
) -> dict[str, list[str]]:
    """Hide modalities per video with the given rates, once, reproducibly; {video_id: hidden modalities}.

    A video whose every present modality was drawn keeps one of them (chosen at random), so no
    training sample is left without input.
    """
    rng = np.random.default_rng([seed, 0x7A1C])  # its own stream: independent of every other draw
    hidden: dict[str, list[str]] = {}
    for video_id in sorted(present):
        have = list(present[video_id])
        drawn = [m for m in have if m in rates and rng.random() < rates[m]]
        if len(drawn) == len(have):
            drawn.pop(int(rng.integers(len(drawn))))
        if drawn:
            hidden[video_id] = drawn
    return hidden
