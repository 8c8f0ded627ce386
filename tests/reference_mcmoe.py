"""MCMoE written out from its equations, and a check that models/mcmoe.py computes the same function.

The reference forward and loss call no module of the model and nothing of models/ (no projection, STEM,
attention, generator, expert bank, router, fusion, decoder, head, batch norm, position encoding or loss):
they read the model's parameter tensors by name and compute with torch.nn.functional and tensor
operations only. (The check builds the model under test from models/mcmoe.py, nothing more.)
Its structure is the published code's (a plain loop over modalities: one STEM call per modality, every
expert called on every modality, full-length generator queries, one mask per group of samples that
share their available modalities), so benchmarks/bench_train.py times it as the "loop" baseline.

Choices of the model that the equations leave open, reproduced here:
- Transformer layers are post-norm (x = LN(x + sublayer(x))), ReLU feed-forward, LayerNorm eps 1e-5,
  dropout after each sublayer, inside the feed-forward and on the attention weights; a final LayerNorm
  after the last layer of the STEM and of the decoder. The generators' attention has no dropout.
  GELU (router, experts) is the exact erf form.
- BatchNorm (eps 1e-5, momentum 0.1) in training takes its statistics from the selected samples only:
  a projection from `present` (or the available samples, projection_stats="available"), an expert on
  a modality's completed sequence from the whole batch, an expert on a real sequence (R^m) from the
  samples that have the modality. Running variance uses the unbiased estimate.
- The fixed sinusoidal encodings are computed in float32 whatever the model's dtype: their float32
  rounding (up to 3e-6 at 68 steps) is part of the function, so the reference rounds the same way.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from models.mcmoe import MCMoE

BN_EPS, BN_MOMENTUM, LN_EPS = 1e-5, 0.1, 1e-5
LOSS_WEIGHTS = {"recon": 1.0, "align": 1.0, "task": 10.0}  # L_div's weight is alpha (config.div_weight)
# Largest differences allowed between the model and the reference in float64: on outputs and loss terms
# (of order one), on gradients relative to the largest gradient entry, on running statistics. Measured
# (Zen 4, torch 2.11) over the configurations of tests/test_mcmoe.py and three seeds: outputs and loss
# terms <= 8e-15, gradients <= 3.7e-15; at the published size (batch 8, 68 steps, hidden 256) <= 1.5e-14
# and 3.1e-15. float32 rounding would give ~1e-7, the deliberate breaks listed in the tests 1e-3 or more.
TOLERANCE = 1e-13


class _Weights:
    """The model's tensors by name, the dropout rate and the mode: everything the equations read."""

    def __init__(self, model: MCMoE, dropout: float):
        self.params = dict(model.named_parameters())
        self.buffers = dict(model.named_buffers())
        self.training = model.training
        self.dropout = dropout if model.training else 0.0

    def __getitem__(self, name: str) -> Tensor:
        return self.params[name]

    def drop(self, x: Tensor) -> Tensor:
        # Masks from uniform draws, as `pipeline train` draws them on a CPU; same distribution as torch's.
        if not self.dropout:
            return x
        return x * (torch.rand_like(x) >= self.dropout).to(x.dtype) / (1.0 - self.dropout)

    def batch_norm(self, name: str, x: Tensor, rows: Tensor | None = None, channels: slice = slice(None)) -> Tensor:
        """x (B, C, T). Training: statistics over the `rows` samples and all steps, running stats updated."""
        weight, bias = self[f"{name}.weight"][channels], self[f"{name}.bias"][channels]
        running_mean = self.buffers[f"{name}.running_mean"][channels]  # views: updates reach the buffers
        running_var = self.buffers[f"{name}.running_var"][channels]
        if self.training:
            sample = x if rows is None else x[rows]
            count = sample.shape[0] * sample.shape[2]
            if count == 0:  # no sample to learn from: its outputs reach nothing, its running stats stay
                mean = var = x.new_zeros(x.shape[1])
            else:
                mean = sample.mean((0, 2))
                var = (sample - mean[:, None]).square().mean((0, 2))
                with torch.no_grad():
                    running_mean.mul_(1 - BN_MOMENTUM).add_(BN_MOMENTUM * mean)
                    running_var.mul_(1 - BN_MOMENTUM).add_(BN_MOMENTUM * var * count / (count - 1))
        else:
            mean, var = running_mean, running_var
        return (x - mean[:, None]) / torch.sqrt(var[:, None] + BN_EPS) * weight[:, None] + bias[:, None]

    def linear(self, name: str, x: Tensor) -> Tensor:
        return F.linear(x, self[f"{name}.weight"], self[f"{name}.bias"])

    def layer_norm(self, name: str, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self[f"{name}.weight"], self[f"{name}.bias"], LN_EPS)

    def attention(self, name: str, query: Tensor, memory: Tensor, heads: int, dropout: bool = True) -> Tensor:
        """Multi-head attention, query (B, S, d) reading memory (B, L, d); nothing masked."""
        d = query.shape[-1]
        w_q, w_k, w_v = self[f"{name}.in_proj_weight"].split(d)
        b_q, b_k, b_v = self[f"{name}.in_proj_bias"].split(d)

        def split(x: Tensor) -> Tensor:  # (B, S, d) -> (B, heads, S, d / heads)
            return x.unflatten(-1, (heads, d // heads)).transpose(1, 2)

        q, k, v = split(F.linear(query, w_q, b_q)), split(F.linear(memory, w_k, b_k)), split(F.linear(memory, w_v, b_v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        if dropout and self.dropout:
            weights = F.dropout(weights, self.dropout)
        return self.linear(f"{name}.out_proj", (weights @ v).transpose(1, 2).flatten(2))

    def feed_forward(self, name: str, x: Tensor) -> Tensor:
        return self.linear(f"{name}.linear2", self.drop(F.relu(self.linear(f"{name}.linear1", x))))

    def encoder(self, name: str, x: Tensor, layers: int, heads: int) -> Tensor:
        for i in range(layers):
            layer = f"{name}.layers.{i}"
            x = self.layer_norm(f"{layer}.norm1", x + self.drop(self.attention(f"{layer}.self_attn", x, x, heads)))
            x = self.layer_norm(f"{layer}.norm2", x + self.drop(self.feed_forward(layer, x)))
        return self.layer_norm(f"{name}.norm", x)

    def decoder(self, name: str, x: Tensor, memory: Tensor, layers: int, heads: int) -> Tensor:
        for i in range(layers):
            layer = f"{name}.layers.{i}"
            x = self.layer_norm(f"{layer}.norm1", x + self.drop(self.attention(f"{layer}.self_attn", x, x, heads)))
            x = self.layer_norm(f"{layer}.norm2",
                                x + self.drop(self.attention(f"{layer}.multihead_attn", x, memory, heads)))
            x = self.layer_norm(f"{layer}.norm3", x + self.drop(self.feed_forward(layer, x)))
        return self.layer_norm(f"{name}.norm", x)

    def expert(self, k: int, x: Tensor) -> Tensor:
        """Expert k (conv d -> d/2 kernel 3, BN, GELU, conv d/2 -> d kernel 1, BN) on x (B, T, d).

        The experts are stored side by side: expert k owns block k of each layer's output channels."""
        d = x.shape[-1]
        inner, outer = slice(k * (d // 2), (k + 1) * (d // 2)), slice(k * d, (k + 1) * d)
        h = F.conv1d(x.transpose(1, 2), self["experts.conv1.weight"][inner], self["experts.conv1.bias"][inner],
                     padding=1)
        h = F.gelu(self.batch_norm("experts.norm1", h, channels=inner))
        y = F.conv1d(h, self["experts.conv2.weight"][outer], self["experts.conv2.bias"][outer])
        return self.batch_norm("experts.norm2", y, channels=outer).transpose(1, 2)


def sinusoid(length: int, d: int, dtype: torch.dtype) -> Tensor:
    """(length, d): sin(p w_i) at feature 2i, cos(p w_i) at 2i + 1, w_i = 10000^(-2i/d); float32 arithmetic."""
    frequency = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    angle = torch.arange(length, dtype=torch.float32)[:, None] * frequency
    return torch.stack([angle.sin(), angle.cos()], -1).flatten(1)[:, :d].to(dtype)


def mcmoe_loop_forward(model: MCMoE, features: dict[str, Tensor], available: Tensor,
                       present: Tensor | None = None) -> dict[str, Tensor]:
    """The model's outputs (the keys and shapes of MCMoE.forward) computed from its equations.

    Dropout at the model's rate in training (its masks differ from the model's, so compare with
    dropout 0); BatchNorm running statistics of `model` are updated as a training step updates them.
    """
    cfg = model.config
    w = _Weights(model, cfg.dropout)
    names, count, d = cfg.modalities, len(cfg.modalities), cfg.hidden
    first = features[names[0]]
    available = available.to(device=first.device, dtype=torch.bool)
    if present is None:  # a modality absent from a sample's data arrives as zeros
        present = torch.stack([features[m].flatten(1).ne(0).any(1) for m in names], 1)
    present = present.to(device=first.device, dtype=torch.bool)
    batch, length = first.shape[:2]
    dtype = first.dtype
    if cfg.projection_stats == "present":
        stat_rows = present
    else:  # the samples allowed to use the modality; where none is, the ones that have it
        stat_rows = torch.where(available.any(0, keepdim=True), available, present)

    # Projection and STEM, each modality on its own
    real = []
    for i, m in enumerate(names):
        p = f"projections.{m}"
        h = F.conv1d(features[m].transpose(1, 2), w[f"{p}.conv1.weight"], w[f"{p}.conv1.bias"])
        h = F.relu(w.batch_norm(f"{p}.norm1", h, stat_rows[:, i]))
        h = F.conv1d(h, w[f"{p}.conv2.weight"], w[f"{p}.conv2.bias"])
        x = w.batch_norm(f"{p}.norm2", h, stat_rows[:, i]).transpose(1, 2)
        if cfg.use_stem:
            if cfg.position_encoding:
                x = x + sinusoid(length, d, dtype).to(x.device)
            x = w.encoder("stem", x, cfg.encoder_layers, cfg.encoder_heads)
        real.append(x)

    # AGMG: each group of samples with the same available modalities generates what it lacks from them
    generated: list[dict[int, Tensor]] = [{} for _ in names]
    if cfg.use_agmg and count > 1:
        for subset in available.unique(dim=0):
            rows = (available == subset).all(1).nonzero().flatten()
            sources = subset.nonzero().flatten().tolist()
            context = torch.cat([real[j][rows] for j in sources], 1)  # available modalities joined in time
            for m in (~subset).nonzero().flatten().tolist():
                query = context.new_zeros(len(rows), length, d)
                for layer in range(cfg.generator_layers):
                    query = w.attention(f"generators.{m}.attention.{layer}", query, context,
                                        cfg.generator_heads, dropout=False)
                gate = torch.sigmoid(w.linear(f"generators.{m}.gate", torch.cat([query.mean(1), context.mean(1)], -1)))
                made = gate[:, None] * query
                generated[m].update({int(b): made[k] for k, b in enumerate(rows)})
    completed, made_all = [], []
    zeros = first.new_zeros(length, d)
    for i in range(count):
        made_all.append(torch.stack([generated[i].get(b, zeros) for b in range(batch)]))
        keep = available[:, i, None, None]
        completed.append(torch.where(keep, real[i], made_all[i]))

    out: dict[str, Tensor] = {"real": torch.stack(real, 1)}
    if cfg.use_agmg and count > 1:
        out["generated"] = torch.stack(made_all, 1)

    # MoE: every expert on every completed modality, a shared soft router per time step
    fused = completed
    if cfg.use_moe:
        fused = []
        for x in completed:
            experts = [w.expert(k, x) for k in range(count)]
            route = torch.softmax(w.linear("router.2", F.gelu(w.linear("router.0", x))), dim=-1)  # over experts
            fused.append(sum(route[..., k, None] * experts[k] for k in range(count)))
        own = []
        for i in range(count):  # R^m: modality m's own expert on its real sequence
            rows = present[:, i].nonzero().flatten()
            values = first.new_zeros(batch, length, d)
            if len(rows):
                values = values.index_copy(0, rows, w.expert(i, real[i][rows]))
            own.append(values)
        out["fused"], out["own_expert"] = torch.stack(fused, 1), torch.stack(own, 1)

    # CFM
    if cfg.use_cfm:
        h = F.conv1d(torch.cat(fused, -1).transpose(1, 2), w["fusion.0.weight"], w["fusion.0.bias"])
        h = F.relu(w.batch_norm("fusion.1", h))
        h = F.conv1d(h, w["fusion.3.weight"], w["fusion.3.bias"])
        memory = w.batch_norm("fusion.4", h).transpose(1, 2)
    else:
        memory = sum(fused)

    # Grade-based regression
    prototypes = w["grade_prototypes"]
    grades = cfg.num_grades
    if cfg.prototype_encoding == "batch-position":  # sample b's prototypes all get encoding b
        queries = prototypes[None] + sinusoid(batch, d, dtype).to(prototypes.device)[:, None]
    else:  # prototype n gets encoding n
        queries = (prototypes + sinusoid(grades, d, dtype).to(prototypes.device)).expand(batch, -1, -1)
    patterns = w.decoder("decoder", queries, memory, cfg.decoder_layers, cfg.decoder_heads)
    logits = (patterns * w["head.weight"]).sum(-1) + w["head.bias"]  # grade n through output n only
    weights = torch.sigmoid(logits)
    weights = weights / weights.sum(1, keepdim=True)
    values = torch.arange(grades, dtype=dtype, device=weights.device) / (grades - 1)
    out.update(score=(weights * values).sum(1), grade_weights=weights, grade_patterns=patterns)
    return out


def _hardest_triplet(patterns: Tensor, margin: float, distance: str) -> Tensor:
    """Each of the B*N patterns is an anchor: relu(farthest same grade - nearest other grade + margin)."""
    batch, grades, _ = patterns.shape
    flat = patterns.reshape(batch * grades, -1)
    labels = [n for _ in range(batch) for n in range(grades)]
    unit = flat / flat.norm(dim=-1, keepdim=True)

    def to(i: int, others: list[int]) -> Tensor:
        if distance == "cosine":
            return 1 - unit[others] @ unit[i]
        return (flat[others] - flat[i]).norm(dim=-1)

    losses = []
    for i, label in enumerate(labels):
        positives = [j for j, other in enumerate(labels) if other == label and j != i]
        negatives = [j for j, other in enumerate(labels) if other != label]
        hardest_positive = to(i, positives).max() if positives else flat.new_zeros(())
        losses.append(F.relu(hardest_positive - to(i, negatives).min() + margin))
    return torch.stack(losses).mean()


def reference_loss(model: MCMoE, out: dict[str, Tensor], target: Tensor, present: Tensor,
                   available: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """L = 1 L_recon + 1 L_align + alpha L_div + 10 L_task; the terms as MCMoE.loss returns them.

    Per modality, L_recon and L_align are means over the samples whose data has the modality (an
    available sample adds no reconstruction error), summed over modalities."""
    cfg = model.config
    score = out["score"]
    present, available = present.bool(), available.bool()
    zero = score.new_zeros(())
    task = (score - target.to(score)).square().mean()
    div = zero
    if cfg.use_div and cfg.num_grades > 1:
        div = _hardest_triplet(out["grade_patterns"], cfg.margin, cfg.div_distance)
    recon = align = zero
    for i in range(len(cfg.modalities)):
        have = present[:, i].nonzero().flatten()
        if not len(have):
            continue
        if cfg.use_recon and "generated" in out:
            imputed = (present[:, i] & ~available[:, i]).nonzero().flatten()
            error = (out["generated"][imputed, i] - out["real"][imputed, i]).square().mean((1, 2)).sum()
            recon = recon + error / (len(have) if cfg.recon_mean_over == "present" else max(len(imputed), 1))
        if cfg.use_align and "fused" in out:
            own, fused = out["own_expert"][have, i], out["fused"][have, i]
            kl = torch.softmax(own, -1) * (torch.log_softmax(own, -1) - torch.log_softmax(fused, -1))
            align = align + kl.mean((1, 2)).sum() / len(have)
    total = (LOSS_WEIGHTS["task"] * task + cfg.div_weight * div + LOSS_WEIGHTS["recon"] * recon
             + LOSS_WEIGHTS["align"] * align)
    return total, {"task": task.detach(), "div": div.detach(), "recon": recon.detach(), "align": align.detach()}


def _largest(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def compare_with_reference(model: MCMoE, features: dict[str, Tensor], available: Tensor, target: Tensor,
                           present: Tensor | None = None, training: bool = True,
                           forward: Callable[..., dict[str, Tensor]] = MCMoE.__call__) -> dict[str, float]:
    """One forward, loss and backward of `forward` (the model's) and of the reference, in float64 with
    dropout 0, on copies of `model`: the largest difference per output, loss term, parameter gradient
    (relative to the largest gradient entry) and running statistic."""
    config = copy.deepcopy(model.config)
    config.dropout = 0.0
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the model's own constants (grade values) made in float64 too
    try:
        tested = MCMoE(config)
    finally:
        torch.set_default_dtype(default_dtype)
    tested.load_state_dict(model.state_dict())
    tested = tested.to(target.device).train(training)
    reference = copy.deepcopy(tested)
    features = {m: x.double() for m, x in features.items()}
    target = target.double()
    available = available.bool()
    present_rows = present.bool() if present is not None else torch.stack(
        [features[m].flatten(1).ne(0).any(1) for m in config.modalities], 1)
    results = []
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for net, run, loss in ((tested, forward, MCMoE.loss), (reference, mcmoe_loop_forward, reference_loss)):
            out = run(net, features, available, present)
            total, terms = loss(net, out, target, present_rows, available)
            total.backward()
            results.append((out, total, terms))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    (out_a, total_a, terms_a), (out_b, total_b, terms_b) = results
    diffs = {key: _largest(out_a[key], out_b[key]) for key in ("score", "grade_weights", "grade_patterns")}
    if not training:  # inference (no autograd) takes torch's fused Transformer kernels: the same function
        with torch.no_grad():
            diffs["score inference"] = _largest(forward(tested, features, available, present)["score"], out_b["score"])
    assert set(out_a) == set(out_b), f"outputs differ: {sorted(out_a)} vs {sorted(out_b)}"
    # Only the entries that reach a score or a loss are defined alike.
    if "real" in out_a:
        diffs["real"] = _largest(out_a["real"][present_rows], out_b["real"][present_rows])
    if "generated" in out_a:
        imputed = ~available
        diffs["generated"] = _largest(out_a["generated"][imputed], out_b["generated"][imputed])
    if "fused" in out_a:
        diffs["fused"] = _largest(out_a["fused"], out_b["fused"])
        diffs["own_expert"] = _largest(out_a["own_expert"][present_rows], out_b["own_expert"][present_rows])
    diffs["loss"] = _largest(total_a, total_b)
    for key in terms_b:
        diffs[f"loss {key}"] = _largest(terms_a[key], terms_b[key])
    grads_a = dict(tested.named_parameters())
    worst, scale = 0.0, 0.0
    for name, p in reference.named_parameters():
        # A parameter without a gradient (one implementation never used it) has a zero gradient.
        g_a = grads_a[name].grad if grads_a[name].grad is not None else torch.zeros_like(p)
        g_b = p.grad if p.grad is not None else torch.zeros_like(p)
        worst = max(worst, _largest(g_a, g_b))
        scale = max(scale, g_b.abs().max().item())
    diffs["grad_relative"] = worst / max(scale, 1e-300)
    buffers_a = dict(tested.named_buffers())
    # num_batches_tracked is left out: with a fixed momentum the model never reads it.
    diffs["running_stats"] = max(
        _largest(buffers_a[name], b) for name, b in reference.named_buffers() if "running_" in name
    )
    return diffs


def check_mcmoe_loop_matches(model: MCMoE, features: dict[str, Tensor], available: Tensor, target: Tensor,
                             tolerance: float = TOLERANCE, present: Tensor | None = None) -> dict[str, float]:
    """`compare_with_reference` in training and in evaluation mode; AssertionError past `tolerance`.

    Returns the largest difference per quantity over both modes."""
    diffs: dict[str, float] = {}
    for training in (True, False):
        for key, value in compare_with_reference(model, features, available, target, present, training).items():
            diffs[key] = max(diffs.get(key, 0.0), value)
    for key, value in diffs.items():
        assert value <= tolerance, f"MCMoE and its reference differ in {key}: {value:.3g} > {tolerance:g}"
    return diffs
