"""InceptionI3d: Inception-v1 inflated to 3D (Carreira & Zisserman, 2017).

Neither torchvision nor transformers ships I3D, and the public Kinetics flow weights exist only as
pytorch-i3d checkpoints (`flow_imagenet.pt`), so this module reproduces that layout exactly: the same
layer names (`Conv3d_1a_7x7`, `Mixed_3b`, ...), branch names (b0, b1a, b1b, b2a, b2b, b3b), unit
structure (`conv3d` + `bn`), TensorFlow-style 'same' padding and BatchNorm eps 0.001 / momentum 0.01,
so `load_state_dict` takes such a checkpoint as it is. hassony2's kinetics_i3d_pytorch port of the same
TensorFlow weights (the PAMFN features' flow stream) differs in two ways, so both are parameters that
follow the checkpoint (extractors/checkpoint_layouts.py reads that layout): BatchNorm at PyTorch's
default eps 1e-5, and 'static' padding, kernel - stride whatever the input size (TensorFlow's 'SAME'
pads less along a size the stride does not divide), with ceil-mode max pools. The two paddings agree
wherever the stride divides the size, as at PAMFN's 32 frames of 224 x 224.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

Triple = tuple[int, int, int]

PYTORCH_I3D_BN_EPS = 1e-3  # TensorFlow's, kept by pytorch-i3d
HASSONY2_BN_EPS = 1e-5  # PyTorch's default, which hassony2's port kept

# (out channels of b0, b1a, b1b, b2a, b2b, b3b) per Inception block, as in Inception-v1.
INCEPTION_BLOCKS: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}

# The layers before pooling, in order; their names are the checkpoint's key prefixes.
TRUNK = (
    "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
    "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
    "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c",
)


def same_padding(size: tuple[int, ...], kernel: Triple, stride: Triple, static: bool = False) -> tuple[int, ...]:
    """TensorFlow 'SAME' padding for (T, H, W), in F.pad order (W front/back, H ..., T ...).

    The output has ceil(size / stride) positions; the odd pixel of padding goes at the back.
    `static`: hassony2's padding instead, kernel - stride along every axis whatever its size.
    """
    pads: list[int] = []
    for s, k, st in zip(size, kernel, stride):
        total = max(k - st, 0) if static or s % st == 0 else max(k - s % st, 0)
        pads.append(total // 2)
        pads.append(total - total // 2)
    t_front, t_back, h_front, h_back, w_front, w_back = pads
    return (w_front, w_back, h_front, h_back, t_front, t_back)


class Unit3D(nn.Module):
    """Conv3d (no bias unless there is no BatchNorm) + BatchNorm3d + ReLU, with 'same' padding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Triple = (1, 1, 1),
        stride: Triple = (1, 1, 1),
        use_batch_norm: bool = True,
        use_bias: bool = False,
        activation: bool = True,
        bn_eps: float = PYTORCH_I3D_BN_EPS,
        static_padding: bool = False,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.activation, self.static_padding = kernel, stride, activation, static_padding
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=0, bias=use_bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=bn_eps, momentum=0.01) if use_batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = same_padding(x.shape[2:], self.kernel, self.stride, self.static_padding)
        if pads[0::2] == pads[1::2]:  # symmetric: the convolution pads by itself, without a padded copy
            x = F.conv3d(x, self.conv3d.weight, self.conv3d.bias, self.stride, pads[4::-2])
        else:
            x = self.conv3d(F.pad(x, pads))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    """Max pooling with 'same' padding. The padding is zeros, not -inf, as in the checkpoints' code;
    every pool follows a ReLU, so the two agree."""

    def __init__(self, kernel: Triple, stride: Triple, static_padding: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride, self.static_padding = kernel, stride, static_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = same_padding(x.shape[2:], self.kernel, self.stride, self.static_padding)
        # hassony2's pools round up (ceil mode) after their static padding, giving ceil(size / stride) positions.
        ceil = self.static_padding
        if pads[0::2] == pads[1::2] and all(2 * p <= k for p, k in zip(pads[4::-2], self.kernel)):
            # The pool pads by itself (with -inf; the same maximum, as above), without a padded copy.
            return F.max_pool3d(x, self.kernel, self.stride, pads[4::-2], ceil_mode=ceil)
        return F.max_pool3d(F.pad(x, pads), self.kernel, self.stride, ceil_mode=ceil)


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool -> 1x1) concatenated."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int],
                 bn_eps: float = PYTORCH_I3D_BN_EPS, static_padding: bool = False) -> None:
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        unit = partial(Unit3D, bn_eps=bn_eps, static_padding=static_padding)
        self.b0 = unit(in_channels, w0)
        self.b1a = unit(in_channels, w1a)
        self.b1b = unit(w1a, w1b, kernel=(3, 3, 3))
        self.b2a = unit(in_channels, w2a)
        self.b2b = unit(w2a, w2b, kernel=(3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1), static_padding)
        self.b3b = unit(in_channels, w3b)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x)))
        # Concatenated in the layout the network was put in (its 3x3x3 weights show it): the branches'
        # layouts can differ (oneDNN's convolutions keep channels-last, torch's own small-input 3D
        # convolution does not), and torch.cat then falls back to contiguous, which leaves every later
        # pool of a channels-last network working on a mismatched layout, far slower.
        weight = self.b1b.conv3d.weight
        channels_last = weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
        layout = torch.channels_last_3d if channels_last else torch.contiguous_format
        return torch.cat(branches, dim=1).contiguous(memory_format=layout)


class InceptionI3d(nn.Module):
    """I3D up to Mixed_5c, then average pooling and a 1x1x1 classifier (`logits`).

    `width_multiplier` scales every channel count (1.0 is the published network; the tiny test
    variant uses 1/8) while keeping the layer structure and names. `bn_eps` is every BatchNorm's eps:
    pytorch-i3d's 1e-3, or 1e-5 for hassony2's port; `static_padding` gives hassony2's padding.
    """

    def __init__(
        self,
        in_channels: int = 2,
        num_classes: int = 400,
        width_multiplier: float = 1.0,
        dropout: float = 0.5,
        bn_eps: float = PYTORCH_I3D_BN_EPS,
        static_padding: bool = False,
    ) -> None:
        super().__init__()

        def width(channels: int) -> int:
            return max(1, round(channels * width_multiplier))

        self.in_channels, self.num_classes = in_channels, num_classes
        unit = partial(Unit3D, bn_eps=bn_eps, static_padding=static_padding)
        pool = partial(MaxPool3dSame, static_padding=static_padding)
        self.Conv3d_1a_7x7 = unit(in_channels, width(64), kernel=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = pool((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = unit(width(64), width(64))
        self.Conv3d_2c_3x3 = unit(width(64), width(192), kernel=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = pool((1, 3, 3), (1, 2, 2))
        channels = width(192)
        for name, widths in INCEPTION_BLOCKS.items():
            if name == "Mixed_4b":
                self.MaxPool3d_4a_3x3 = pool((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                self.MaxPool3d_5a_2x2 = pool((2, 2, 2), (2, 2, 2))
            block = InceptionBlock(channels, tuple(width(w) for w in widths), bn_eps, static_padding)
            setattr(self, name, block)
            channels = block.out_channels
        self.feature_dim = channels
        self.dropout = nn.Dropout(dropout)
        self.logits = Unit3D(
            channels, num_classes, use_batch_norm=False, use_bias=True, activation=False
        )
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                # He initialisation (fan-in, ReLU gain) keeps activations at their input's scale through
                # the 60-odd convolutions when the weights stay random. PyTorch's default (a third of
                # the variance per layer) shrinks them layer after layer to below the scorer's BatchNorm
                # eps, so random-weight flow features would carry almost no signal. Pretrained weights
                # replace it.
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    def temporal_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T, H, W) -> (B, feature_dim, T') pooled features per temporal position.

        pytorch-i3d pools with AvgPool3d([2, 7, 7], stride 1), which at a 224x224 input is a sliding
        2-step temporal mean of the spatial mean. The spatial mean here is global and the temporal
        window shrinks to 1 when fewer than 2 positions remain (short clips), so the same code also
        runs on clips and crops that pytorch-i3d rejects, and equals it at 224x224.
        """
        for name in TRUNK:
            x = getattr(self, name)(x)
        x = x.mean(dim=(3, 4))
        window = min(2, x.shape[2])
        return F.avg_pool1d(x, kernel_size=window, stride=1)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T, H, W) -> (B, feature_dim): the features before the classifier, averaged over time."""
        return self.temporal_features(x).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T, H, W) -> (B, num_classes, T') class logits per temporal position."""
        features = self.dropout(self.temporal_features(x))
        return self.logits(features[..., None, None]).flatten(2)


def inception_i3d(
    in_channels: int = 2, num_classes: int = 400, width_multiplier: float = 1.0,
    bn_eps: float = PYTORCH_I3D_BN_EPS, static_padding: bool = False,
) -> InceptionI3d:
    """I3D for `in_channels` inputs (2 for optical flow, 3 for RGB); width 1/8 is the tiny variant."""
    return InceptionI3d(in_channels=in_channels, num_classes=num_classes, width_multiplier=width_multiplier,
                        bn_eps=bn_eps, static_padding=static_padding)


def load_pytorch_i3d_state_dict(
    model: InceptionI3d, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Load a pytorch-i3d checkpoint; BatchNorm's num_batches_tracked, which inference never reads, may be
    absent."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{source} does not fit this InceptionI3d: {exc}") from None
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{source} is not a pytorch-i3d InceptionI3d checkpoint: "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
