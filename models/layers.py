"""Small building blocks shared by the scorers in this package."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def sinusoidal_position_encoding(
    length: int, dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The fixed (length, dim) encoding of "Attention is all you need": sin on even, cos on odd features."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim, device=device, dtype=torch.float32)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return encoding.to(dtype)


# Under autocast a convolution hands the batch norms bfloat16 (or float16); their training statistics are
# taken in float32, as torch's own batch norm kernels accumulate them, so the running statistics that
# float32 evaluation reads are not rounded to 8 bits. The output goes back in the input's dtype.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _momentum_factor(norm: nn.BatchNorm1d) -> float:
    if norm.momentum is None:  # cumulative moving average, as nn.BatchNorm1d does
        return 1.0 / float(norm.num_batches_tracked)
    return norm.momentum


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics come only from the rows selected by `rows`.

    Every row is normalised, but only the selected rows decide the mean and variance (and the running
    statistics). This keeps a row's values out of every other row's output: the features of a modality a
    sample is not allowed to use must not reach another sample's score through the batch statistics.
    `rows` is (B,) or, to select per channel, (B, C); None (or eval mode) is plain BatchNorm1d.
    """

    def forward(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        if rows is None or not self.training or not self.track_running_stats:
            return super().forward(x)
        if x.device.type == "cpu" and bool(rows.all()):
            # every row selected: torch's batch norm kernel, the same function in one pass (asking
            # would cost a GPU a synchronisation, so there the masked form below runs)
            return super().forward(x)
        if x.dtype in LOW_PRECISION:
            return self.forward(x.float(), rows).to(x.dtype)
        if rows.dim() == 1:
            rows = rows.unsqueeze(1)
        weight = rows.to(x.dtype).expand(x.shape[0], x.shape[1])
        if x.dim() == 3:
            weight = weight.unsqueeze(2)
        reduce_dims = [0] + list(range(2, x.dim()))
        positions = x.shape[2] if x.dim() == 3 else 1
        count = weight.sum(0).reshape(-1) * positions  # (C,)
        safe_count = count.clamp_min(1.0)
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = (x * weight).sum(reduce_dims) / safe_count
        centred = x - mean.view(shape)
        var = (centred.square() * weight).sum(reduce_dims) / safe_count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = _momentum_factor(self)
            # A channel with no selected row keeps its running statistics.
            # in the statistics' dtype (a float32 momentum would be off by 1e-9 in a float64 model)
            factor = (count > 0).to(mean.dtype) * momentum
            unbiased = var * count / (count - 1).clamp_min(1.0)
            self.running_mean.mul_(1 - factor).add_(factor * mean)
            self.running_var.mul_(1 - factor).add_(factor * unbiased)
        return out


def batch_norm_per_block(x: Tensor, norm: nn.BatchNorm1d, blocks: int, order: list[int] | None = None) -> Tensor:
    """Apply `norm` (C channels) to x (B, blocks * C, T) as if it were called on each channel block in turn.

    Each block gets its own batch statistics, and the running statistics end where `blocks` successive
    calls would leave them, so one call over stacked blocks gives the numbers of separate calls; `order`
    (a permutation of range(blocks), default in turn) is the order of those calls. One torch batch norm
    kernel does the work (the statistics and the normalisation in one pass, its backward in one more)
    with `norm`'s parameters tiled over the blocks: the blocks share them.
    """
    tile = lambda t: None if t is None else t.repeat(blocks)  # noqa: E731
    weight, bias = tile(norm.weight), tile(norm.bias)
    if not norm.training or not norm.track_running_stats:
        return F.batch_norm(x, tile(norm.running_mean), tile(norm.running_var), weight, bias, False, 0.0, norm.eps)
    # With momentum 1 a batch norm leaves exactly this batch's mean and unbiased variance in the buffers
    # it is given; the blocks' updates of `norm`'s own buffers are made from them below.
    mean = torch.zeros(x.shape[1], device=x.device, dtype=norm.running_mean.dtype)
    var = torch.ones_like(mean)
    out = F.batch_norm(x, mean, var, weight, bias, True, 1.0, norm.eps)
    with torch.no_grad():
        mean, var = mean.view(blocks, -1), var.view(blocks, -1)
        if order is not None:
            if sorted(order) != list(range(blocks)):
                raise ValueError(f"order must be a permutation of range({blocks}), got {order}")
            mean, var = mean[order], var[order]
        if norm.momentum is None:  # cumulative average: replay the updates one by one
            for g in range(blocks):
                norm.num_batches_tracked.add_(1)
                factor = _momentum_factor(norm)
                norm.running_mean.mul_(1 - factor).add_(factor * mean[g])
                norm.running_var.mul_(1 - factor).add_(factor * var[g])
        else:
            # `blocks` exponential updates in a row: old * (1-m)^G + sum_g m (1-m)^(G-1-g) * stat_g
            momentum = norm.momentum
            norm.num_batches_tracked.add_(blocks)
            decay = (1 - momentum) ** torch.arange(blocks - 1, -1, -1, device=x.device, dtype=mean.dtype)
            share = (momentum * decay).unsqueeze(1)
            norm.running_mean.mul_((1 - momentum) ** blocks).add_((share * mean).sum(0))
            norm.running_var.mul_((1 - momentum) ** blocks).add_((share * var).sum(0))
    return out


def single_query_attention(attention: nn.MultiheadAttention, query: Tensor, context: Tensor, hide: Tensor) -> Tensor:
    """`attention` (batch_first, no dropout) from one query step per sample, without projecting the context.

    query (B, d), context (B, S, d), hide (B, S) True = ignore -> (B, d); the same function as
    attention(query[:, None], context, context, key_padding_mask=hide)[0][:, 0] up to rounding.
    With a single query the key projection folds into it (score_s = context_s . W_k^T q, the key bias
    shifts every score alike and cancels in the softmax) and the value projection moves after the
    weighted sum (the weights sum to one). Each sample's S context steps are then read twice per head,
    O(S d), instead of being projected twice, O(S d^2).
    """
    if attention.dropout or not attention._qkv_same_embed_dim or attention.in_proj_bias is None \
            or attention.bias_k is not None or attention.add_zero_attn:
        raise ValueError("single_query_attention needs a plain MultiheadAttention: biases, no dropout, no extras")
    heads, width = attention.num_heads, attention.embed_dim
    head_dim = width // heads
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, _, b_v = attention.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).view(-1, heads, head_dim) * head_dim**-0.5
    folded_query = torch.einsum("bhe,hed->bhd", q, w_k.view(heads, head_dim, width))
    scores = torch.einsum("bhd,bsd->bhs", folded_query, context).masked_fill(hide.unsqueeze(1), float("-inf"))
    pooled = torch.einsum("bhs,bsd->bhd", scores.softmax(-1), context)
    values = torch.einsum("bhd,hed->bhe", pooled, w_v.view(heads, head_dim, width)) + b_v.view(heads, head_dim)
    return attention.out_proj(values.reshape(-1, width))


class UniformDropout(nn.Dropout):
    """nn.Dropout whose masks, when training on a CPU, come from uniform draws compared with p.

    The same distribution as torch's masks (each element kept with probability 1 - p, kept ones scaled
    by 1 / (1 - p)), other random numbers. torch draws its CPU masks with bernoulli_, which on this
    project's AMD CPUs is slower than uniform_ plus a comparison, and MCMoE's encoder and decoder draw
    masks on every step (benchmarks/profile_train.py; benchmarks/results/README.md, "Training step").
    Outside CPU training (evaluation, p = 0 or 1, a GPU, whose dropout is one fused kernel) it is
    nn.Dropout."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not 0.0 < self.p < 1.0 or x.device.type != "cpu":
            return super().forward(x)
        # In place on the draws: one fresh buffer instead of three (a first touch of fresh memory is slow on
        # these machines). Drawn in float32 whatever x's dtype: bfloat16 draws would round p.
        scale = torch.rand_like(x, dtype=torch.float32).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * scale.to(x.dtype)


def use_uniform_dropout(model: nn.Module) -> nn.Module:
    """Every nn.Dropout module of `model` becomes a UniformDropout (in place; no parameters involved).
    Dropout applied inside an operator (nn.MultiheadAttention's on its attention weights) is unchanged."""
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = UniformDropout
    return model
