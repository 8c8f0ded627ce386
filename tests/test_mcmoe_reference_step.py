"""MCMoE's reproduction mode: one training step equals the reference code's step, and its mask draw.

`reference_step` is the reference code's training forward and loss written out in float64, module by
module as that code runs them (the modalities in its v, a, f order, one mask for the batch, every
expert called on every completed sequence, then on the real ones), on the weights of a project model.
It reuses the model's STEM encoder and grade decoder (torch's own nn.TransformerEncoder/Decoder,
copied) and its nn.MultiheadAttention modules called as plain modules: those are not under test here.
Everything else (projections, masking, generation, experts and their BatchNorm statistics, router,
fusion, grade head, every loss term) is written here from the reference's equations.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models.mcmoe import MCMoE, mcmoe
from pipeline import data
from pipeline.presets import PRESETS

DIMS = {"rgb": 12, "flow": 10, "audio": 8}  # the cache's order: rgb, flow, audio
NAMES = list(DIMS)
REFERENCE = ("rgb", "audio", "flow")  # the reference's v, a, f
B, T, D = 4, 5, 16
INCOMPLETE = [m for m in data.modality_subsets(NAMES) if len(m) < len(NAMES)]


def _bn(x, norm, stats, lo=None, hi=None):
    """F.batch_norm in training mode on channels [lo, hi) of `norm`, updating the copies in `stats`."""
    sl = slice(lo, hi)
    mean, var = stats
    return F.batch_norm(x, mean[sl], var[sl], norm.weight[sl], norm.bias[sl], True, norm.momentum, norm.eps)


def _triplet_cosine(patterns, margin):
    batch, count, _ = patterns.shape
    unit = F.normalize(patterns.reshape(batch * count, -1), dim=-1)
    dist = 1.0 - unit @ unit.T
    labels = torch.arange(count).repeat(batch)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(batch * count, dtype=torch.bool)
    hardest_positive = (dist * positive).max(1).values
    hardest_negative = (dist + dist.max() * same).min(1).values
    return F.relu(hardest_positive - hardest_negative + margin).mean()


def reference_step(model: MCMoE, features, kept: tuple[str, ...], target, stats):
    """The reference's training loss for the batch mask `kept`; `stats` {buffer name: running tensor}
    are updated in place as the reference's BatchNorm layers would be."""
    cfg = model.config
    d, count = cfg.hidden, len(NAMES)

    def proj(m):
        p = model.projections[m]
        pre = f"projections.{m}."
        x = F.conv1d(features[m].transpose(1, 2), p.conv1.weight, p.conv1.bias)
        x = F.relu(_bn(x, p.norm1, (stats[pre + "norm1.running_mean"], stats[pre + "norm1.running_var"])))
        x = F.conv1d(x, p.conv2.weight, p.conv2.bias)
        return _bn(x, p.norm2, (stats[pre + "norm2.running_mean"], stats[pre + "norm2.running_var"])).transpose(1, 2)

    real = {m: model.stem(proj(m)) for m in REFERENCE}
    completed = {m: real[m] if m in kept else torch.zeros_like(real[m]) for m in REFERENCE}
    recon = 0.0
    for m in REFERENCE:
        if m in kept:
            continue
        context = torch.cat([completed[j] for j in REFERENCE if j in kept], 1)
        query = torch.zeros_like(real[m])
        generator = model.generators[NAMES.index(m)]
        for attention in generator.attention:
            query = attention(query, context, context, need_weights=False)[0]
        gate = torch.sigmoid(generator.gate(torch.cat([query.mean(1), context.mean(1)], -1)))
        completed[m] = gate.unsqueeze(1) * query
        recon = recon + F.mse_loss(completed[m], real[m])

    bank = model.experts
    inner = bank.inner
    expert_stats = [(stats["experts.norm1.running_mean"], stats["experts.norm1.running_var"]),
                    (stats["experts.norm2.running_mean"], stats["experts.norm2.running_var"])]

    def expert(k, x):  # expert k = the bank's channel block k
        h = F.conv1d(x.transpose(1, 2), bank.conv1.weight[k * inner:(k + 1) * inner],
                     bank.conv1.bias[k * inner:(k + 1) * inner], padding=1)
        h = F.gelu(_bn(h, bank.norm1, expert_stats[0], k * inner, (k + 1) * inner))
        y = F.conv1d(h, bank.conv2.weight[k * d:(k + 1) * d], bank.conv2.bias[k * d:(k + 1) * d])
        return _bn(y, bank.norm2, expert_stats[1], k * d, (k + 1) * d).transpose(1, 2)

    experts = [NAMES.index(m) for m in REFERENCE]  # the reference's experts v, a, f
    fused = {}
    for m in REFERENCE:
        outs = torch.stack([expert(k, completed[m]) for k in experts], 2)  # (B, T, E, d), E in v, a, f
        router = model.router
        logits = F.linear(F.gelu(F.linear(completed[m], router[0].weight, router[0].bias)), router[2].weight, router[2].bias)
        weights = torch.softmax(logits[..., experts], -1)  # the router's outputs in expert order v, a, f
        fused[m] = (outs * weights.unsqueeze(-1)).sum(2)
    fusion = model.fusion
    # the fusion's input columns in the reference's v, a, f order
    columns = torch.cat([torch.arange(NAMES.index(m) * d, (NAMES.index(m) + 1) * d) for m in REFERENCE])
    x = F.conv1d(torch.cat([fused[m] for m in REFERENCE], -1).transpose(1, 2), fusion[0].weight[:, columns], fusion[0].bias)
    x = F.relu(_bn(x, fusion[1], (stats["fusion.1.running_mean"], stats["fusion.1.running_var"])))
    x = F.conv1d(x, fusion[3].weight, fusion[3].bias)
    memory = _bn(x, fusion[4], (stats["fusion.4.running_mean"], stats["fusion.4.running_var"])).transpose(1, 2)

    # prototypes plus the encoding of the sample's position in the batch (the reference's indexing)
    position = torch.arange(B, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-torch.log(torch.tensor(10000.0)) / d))
    pe = torch.zeros(B, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
    queries = model.grade_prototypes[None] + pe.double()[:, None]
    patterns = model.decoder(queries, memory)
    logits = torch.diagonal(F.linear(patterns, model.head.weight, model.head.bias), dim1=-2, dim2=-1)
    weights = torch.sigmoid(logits)
    weights = weights / weights.sum(1, keepdim=True)
    score = (weights * torch.linspace(0, 1, cfg.num_grades).double()).sum(1)  # a float32 buffer there

    align = 0.0
    for m in REFERENCE:
        own = expert(NAMES.index(m), real[m])
        # element-wise mean ("mean", the reference's default reduction), written out
        log_own = torch.log_softmax(own, -1)
        align = align + (log_own.exp() * (log_own - torch.log_softmax(fused[m], -1))).mean()
    task = F.mse_loss(score, target)
    div = _triplet_cosine(patterns, cfg.margin)
    total = cfg.task_weight * task + cfg.div_weight * div + recon + align
    return total, {"task": task, "div": div, "recon": recon, "align": align}, score


def _model(order: str) -> MCMoE:
    torch.manual_seed(0)
    model = mcmoe(NAMES, DIMS, hidden=D, dropout=0.0, prototype_encoding="batch-position",
                  div_weight=0.5, expert_stats_order=order).double()
    with torch.no_grad():  # running statistics away from their initial values, so that order shows
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return model.train()


def _batch():
    generator = torch.Generator().manual_seed(1)
    features = {m: torch.randn(B, T, c, generator=generator, dtype=torch.float64) for m, c in DIMS.items()}
    return features, torch.rand(B, generator=generator, dtype=torch.float64)


def _compare(order: str, kept: tuple[str, ...]) -> dict[str, float]:
    """Largest differences between the model's step and the reference's, for the batch mask `kept`."""
    model = _model(order)
    reference = copy.deepcopy(model)
    features, target = _batch()
    present = torch.ones(B, len(NAMES), dtype=torch.bool)
    available = data.subset_mask(kept, NAMES).expand(B, -1)
    out = model(features, available, present)
    total, terms = model.loss(out, target, present, available)
    total.backward()

    stats = {name: buffer for name, buffer in reference.named_buffers() if "running" in name}
    ref_total, ref_terms, ref_score = reference_step(reference, features, kept, target, stats)
    ref_total.backward()

    diffs = {"score": (out["score"] - ref_score).abs().max().item(), "total": abs(total.item() - ref_total.item())}
    diffs.update({k: abs(float(terms[k]) - float(ref_terms[k].detach())) for k in terms})
    ref_params = dict(reference.named_parameters())
    diffs["grad"] = max(
        ((p.grad if p.grad is not None else torch.zeros_like(p)) - (ref_params[n].grad if ref_params[n].grad is not None else 0.0)).abs().max().item()
        for n, p in model.named_parameters()
    )
    ref_buffers = dict(reference.named_buffers())
    diffs["running_stats"] = max((b - ref_buffers[n]).abs().max().item() for n, b in model.named_buffers() if "running" in n)
    return diffs


@pytest.mark.parametrize("kept", INCOMPLETE, ids=data.subset_name)
def test_one_step_equals_the_reference_step(kept):
    # Broken on purpose once: batch_norm_per_group (now batch_norm_per_block) ignoring `order` -> all six fail, running_stats
    # differ by 3e-3 to 5e-3 (the rest to 1e-15).
    diffs = _compare("reference", kept)
    assert all(value < 1e-10 for value in diffs.values()), diffs


def test_the_cache_order_changes_only_the_experts_running_statistics():
    diffs = _compare("modalities", ("rgb",))
    assert diffs.pop("running_stats") > 1e-3  # the order matters, so the test above can see it
    assert all(value < 1e-10 for value in diffs.values()), diffs


# ----------------------------------------------------------------------------- the per-batch draw


def test_per_batch_masks_follow_the_reference_rule():
    # Broken on purpose once: the -per-batch policies drawing per sample -> both mask tests fail.
    generator = torch.Generator().manual_seed(0)
    complete = torch.ones(8, 3, dtype=torch.bool)
    counts = {}
    for _ in range(1200):
        masks = data.draw_training_masks(complete, "incomplete-per-batch", generator)
        assert (masks == masks[0]).all()  # one pattern for the whole batch
        assert not masks[0].all() and masks[0].any()  # never the full set, never empty
        key = tuple(masks[0].tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6 and all(150 <= c <= 250 for c in counts.values()), counts  # uniform: 200 each
    full = sum(data.draw_training_masks(complete, "any-per-batch", generator)[0].all().item() for _ in range(700))
    assert 60 <= full <= 140  # 1 in 7 of the draws is the full set


def test_per_batch_masks_respect_what_each_sample_has():
    # Broken on purpose once: the batch's pattern given without intersecting it with `present` -> fails.
    generator = torch.Generator().manual_seed(0)
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    for _ in range(300):
        masks = data.draw_training_masks(present, "incomplete-per-batch", generator)
        assert not (masks & ~present).any() and masks.any(1).all()
        shared = masks[0]  # the complete sample holds the batch's pattern
        for row in (1, 2):
            if (shared & present[row]).any():
                assert torch.equal(masks[row], shared & present[row])


def test_presets_train_in_reproduction_mode():
    from models import config_class

    preset = PRESETS["rg"]["Ball"]
    training, fields = config_class("mcmoe").from_preset(preset)
    assert training["mask_policy"] == "incomplete-per-batch" and fields["expert_stats_order"] == "reference"
    training, fields = config_class("limssr").from_preset(preset)  # LIMSSR takes no MCMoE setting
    assert "mask_policy" not in training and "expert_stats_order" not in fields and training["epochs"] != preset.epochs


def test_cli_offers_every_mask_policy():
    from pipeline.cli import build_parser

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                  if a.dest == "mask_policy")
    assert tuple(action.choices) == data.MASK_POLICIES
