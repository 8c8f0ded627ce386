"""The MCMoE forward written as a plain loop over modalities (the published code's structure), and a
check that the model's batched forward matches it: outputs, loss, gradients, running statistics.

An independent reference for tests/test_mcmoe.py; benchmarks/bench_train.py times the loop against the
batched model with it. It lives with the tests so that editing a benchmark cannot weaken a test.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from models.layers import sinusoidal_position_encoding
from models.mcmoe import MCMoE


def _expert(bank, index: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `index` of an ExpertBank alone on x (B, T, d), through its own slices of the weights."""
    inner, hidden = bank.inner, bank.hidden
    a, b = index * inner, (index + 1) * inner
    c, e = index * hidden, (index + 1) * hidden
    n1, n2 = bank.norm1, bank.norm2
    h = F.conv1d(x.transpose(1, 2), bank.conv1.weight[a:b], bank.conv1.bias[a:b], padding=1)
    h = F.batch_norm(h, n1.running_mean[a:b], n1.running_var[a:b], n1.weight[a:b], n1.bias[a:b],
                     n1.training, n1.momentum, n1.eps)
    h = F.gelu(h)
    y = F.conv1d(h, bank.conv2.weight[c:e], bank.conv2.bias[c:e])
    y = F.batch_norm(y, n2.running_mean[c:e], n2.running_var[c:e], n2.weight[c:e], n2.bias[c:e],
                     n2.training, n2.momentum, n2.eps)
    return y.transpose(1, 2)


def mcmoe_loop_forward(model: MCMoE, features: dict[str, torch.Tensor], available: torch.Tensor,
                       present: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The same model written as a plain loop over modalities, as the published code is structured.

    Same parameters and the same outputs as `model(...)`; used as the speed baseline and as an
    independent check of the batched code.
    """
    available, present = model._check_inputs(features, available, present)
    cfg, names = model.config, model.modalities
    count = len(names)
    if cfg.projection_stats == "present":
        stat_rows = present  # training masks do not remove a sample from the projections' statistics
    else:
        stat_rows = torch.where(available.any(0, keepdim=True), available, present)
    real = []
    for i, m in enumerate(names):
        x = model.projections[m](features[m], stat_rows[:, i])
        if model.stem is not None:
            if cfg.position_encoding:
                x = x + sinusoidal_position_encoding(x.shape[1], x.shape[2], x.device, x.dtype)
            x = model.stem(x)
        real.append(x)
    batch, length, d = real[0].shape

    completed, generated = [], []
    for i in range(count):
        keep = available[:, i, None, None]
        if model.generators is None:
            completed.append(torch.where(keep, real[i], 0.0))
            continue
        others = [j for j in range(count) if j != i]
        context = torch.cat([torch.where(available[:, j, None, None], real[j], 0.0) for j in others], 1)
        hide = torch.cat([(~available[:, j, None]).expand(batch, length) for j in others], 1)
        hide = hide & ~available[:, i, None]  # rows that keep modality i discard the result: keep it finite
        query = real[i].new_zeros(batch, length, d)
        generator = model.generators[i]
        for attention in generator.attention:
            query = attention(query, context, context, key_padding_mask=hide, need_weights=False)[0]
        seen = (~hide).unsqueeze(-1).to(context.dtype)
        context_mean = (context * seen).sum(1) / seen.sum(1)
        gate = torch.sigmoid(generator.gate(torch.cat([query.mean(1), context_mean], -1)))
        made = torch.where(keep, 0.0, gate.unsqueeze(1) * query)
        generated.append(made)
        completed.append(torch.where(keep, real[i], made))

    out: dict[str, torch.Tensor] = {"real": torch.stack(real, 1)}
    if generated:
        out["generated"] = torch.stack(generated, 1)
    if model.experts is not None:
        fused = []
        for x in completed:
            expert_out = [_expert(model.experts, k, x) for k in range(count)]
            weights = torch.softmax(model.router(x), dim=-1)
            fused.append(sum(weights[..., k, None] * expert_out[k] for k in range(count)))
        own = []
        for i in range(count):
            rows = present[:, i].nonzero().flatten()
            values = real[i].new_zeros(batch, length, d)
            if rows.numel():
                values = values.index_copy(0, rows, _expert(model.experts, i, real[i][rows]))
            own.append(values)
        out["fused"], out["own_expert"] = torch.stack(fused, 1), torch.stack(own, 1)
    else:
        fused = completed
    if model.fusion is not None:
        memory = model.fusion(torch.cat(fused, -1).transpose(1, 2)).transpose(1, 2)
    else:
        memory = sum(fused)
    if cfg.prototype_encoding == "batch-position":  # the published code: sample b's queries get encoding b
        queries = model.grade_prototypes[None] + sinusoidal_position_encoding(batch, d, memory.device, memory.dtype)[:, None]
    else:
        queries = (model.grade_prototypes + sinusoidal_position_encoding(cfg.num_grades, d, memory.device, memory.dtype)).expand(batch, -1, -1)
    patterns = model.decoder(queries, memory)
    grade_weights = torch.sigmoid(torch.diagonal(model.head(patterns), dim1=-2, dim2=-1))
    grade_weights = grade_weights / grade_weights.sum(1, keepdim=True)
    out.update(score=grade_weights @ model.grade_values, grade_weights=grade_weights, grade_patterns=patterns)
    return out


def check_mcmoe_loop_matches(model: MCMoE, features: dict[str, torch.Tensor], available: torch.Tensor,
                             target: torch.Tensor, tolerance: float = 1e-4) -> dict[str, float]:
    """Run one training step's forward + backward both ways (dropout off) and compare everything.

    Returns the largest absolute differences (gradients: relative to the model's largest gradient
    entry); raises AssertionError past `tolerance`.
    """
    config = copy.deepcopy(model.config)
    config.dropout = 0.0
    batched = MCMoE(config).to(target.device)
    batched.load_state_dict(model.state_dict())
    looped = copy.deepcopy(batched)
    batched.train(), looped.train()
    present = torch.ones_like(available)
    outs, totals = [], []
    # Compare in full float32: cuDNN convolutions default to TF32, which rounds the two differently.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for net, forward in ((batched, MCMoE.__call__), (looped, mcmoe_loop_forward)):
            out = forward(net, features, available)
            total, _ = net.loss(out, target, present, available)
            total.backward()
            outs.append(out)
            totals.append(total)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    diffs = {
        "score": (outs[0]["score"] - outs[1]["score"]).abs().max().item(),
        "loss": (totals[0] - totals[1]).abs().item(),
    }
    grads_a = dict(batched.named_parameters())
    worst, scale = 0.0, 0.0
    for name, p in looped.named_parameters():
        # A parameter left without gradient by one implementation counts as a zero gradient.
        g_a = grads_a[name].grad if grads_a[name].grad is not None else torch.zeros_like(p)
        g_b = p.grad if p.grad is not None else torch.zeros_like(p)
        worst = max(worst, (g_a - g_b).abs().max().item())
        scale = max(scale, g_b.abs().max().item())
    worst /= max(scale, 1e-12)  # relative to the largest gradient entry of the model
    diffs["grad_relative"] = worst
    buffers_a = dict(batched.named_buffers())
    # num_batches_tracked is left out: the loop's functional batch norm does not count calls, and with a
    # fixed momentum the count changes nothing.
    diffs["running_stats"] = max(
        (buffers_a[name] - b).abs().max().item()
        for name, b in looped.named_buffers() if not name.endswith("num_batches_tracked")
    )
    for key, value in diffs.items():
        assert value <= tolerance, f"batched and loop MCMoE differ in {key}: {value:.3g} > {tolerance:g}"
    return diffs
