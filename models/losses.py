"""Loss terms shared by the scorers: grade/token diversity and masked per-modality reductions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCES = ("euclidean", "cosine")


def pairwise_distance(x: Tensor, distance: str = "euclidean") -> Tensor:
    """(K, d) -> (K, K) distances; Euclidean with a zero (not NaN) gradient where two points coincide."""
    if distance == "cosine":
        unit = F.normalize(x, dim=-1)
        return 1.0 - unit @ unit.T
    if distance != "euclidean":
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    squared = (x.unsqueeze(1) - x.unsqueeze(0)).square().sum(-1)
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, 1.0).sqrt(), 0.0)


def hardest_triplet_loss(embeddings: Tensor, margin: float = 1.0, distance: str = "euclidean") -> Tensor:
    """Batch-hard triplet loss over (B, N, d) embeddings, the index along N being the label.

    Every one of the B*N vectors is an anchor: its hardest positive is the farthest vector with the same
    index in another sample, its hardest negative the nearest vector with another index (any sample).
    Loss = mean over anchors of relu(d_pos - d_neg + margin). With B = 1 there is no positive (d_pos = 0)
    and the loss only pushes the N vectors apart; with N = 1 there is no negative and the loss is 0.
    """
    if embeddings.dim() != 3:
        raise ValueError(f"embeddings must be (B, N, d), got shape {tuple(embeddings.shape)}")
    batch, count, _ = embeddings.shape
    if count < 2:
        return embeddings.sum() * 0.0
    labels = torch.arange(count, device=embeddings.device).repeat(batch)
    dist = pairwise_distance(embeddings.reshape(batch * count, -1), distance)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    other = torch.eye(batch * count, dtype=torch.bool, device=embeddings.device).logical_not()
    hardest_positive = torch.where(same & other, dist, 0.0).amax(1)
    hardest_negative = torch.where(same, torch.inf, dist).amin(1)
    return F.relu(hardest_positive - hardest_negative + margin).mean()


def masked_modality_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Sum over modalities of the mean over the samples where `mask` holds.

    values, mask: (B, M). A modality with no selected sample adds exactly nothing; unselected entries
    never reach the result and get a zero gradient, even when they are not finite.
    """
    selected = torch.where(mask, values, 0.0)
    count = mask.sum(0).clamp_min(1).to(values.dtype)
    return (selected.sum(0) / count).sum()
