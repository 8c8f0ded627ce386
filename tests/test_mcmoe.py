"""MCMoE: shapes, per-sample masks, leakage, loss terms, gradient flow, ablations, parameter count."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_model, config_class
from models.layers import (
    MaskedBatchNorm1d, batch_norm_per_block, single_query_attention, sinusoidal_position_encoding,
)
from models.losses import hardest_triplet_loss, masked_modality_mean
from models.mcmoe import LOSS_TERMS, MCMoE, MCMoEConfig, mcmoe
from tests.reference_mcmoe import check_mcmoe_loop_matches

DIMS = {"rgb": 16, "flow": 12, "audio": 8}
NAMES = list(DIMS)
B, T, D = 5, 6, 32
# Every modality is missing somewhere, every sample keeps at least one.
MIXED = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)


def small(**overrides) -> MCMoE:
    torch.manual_seed(0)
    return mcmoe(NAMES, DIMS, hidden=D, position_encoding=True, **overrides)


def make_features(seed: int = 1, batch: int = B) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, T, c, generator=generator) for m, c in DIMS.items()}


def seeded(model, *args, seed: int = 3, **kwargs):
    torch.manual_seed(seed)  # same dropout masks for calls that must be compared
    return model(*args, **kwargs)


# ----------------------------------------------------------------------------- config and count


def test_parameter_count_matches_published_code():
    rg = mcmoe(["rgb", "flow", "audio"], {"rgb": 1024, "flow": 1024, "audio": 768}, position_encoding=True)
    assert sum(p.numel() for p in rg.parameters()) == 9_384_711
    rgb768 = mcmoe(["rgb", "flow", "audio"], {"rgb": 768, "flow": 1024, "audio": 768})
    assert sum(p.numel() for p in rgb768.parameters()) == 9_122_183


def test_config_round_trip_registry_and_defaults():
    config = MCMoEConfig(modalities=NAMES, feature_dims=DIMS, hidden=D, use_cfm=False, div_weight=0.5)
    data = json.loads(json.dumps(config.to_dict()))
    assert MCMoEConfig.from_dict(data) == config
    assert config.div_distance == "cosine"  # the published code's distance
    assert (config.prototype_encoding, config.projection_stats, config.recon_mean_over) == ("grade-index", "present", "present")
    assert data.pop("schema_version") == 2
    for key in ("div_distance", "prototype_encoding", "projection_stats", "recon_mean_over"):
        del data[key]  # recorded before these fields existed: read back with the behaviour then
    old = MCMoEConfig.from_dict(data)
    assert (old.div_distance, old.prototype_encoding, old.projection_stats, old.recon_mean_over) == (
        "euclidean", "grade-index", "available", "imputed")
    assert config_class("mcmoe") is MCMoEConfig
    model = build_model("mcmoe", data)
    assert isinstance(model, MCMoE) and model.modalities == NAMES and model.fusion is None
    defaults = MCMoEConfig.training_defaults()
    assert defaults["optimizer"] == "adam" and defaults["lr"] == 2e-4 and defaults["mask_policy"] == "incomplete"
    assert defaults["min_lr_ratio"] == 0.01 and defaults["batch_size"] == 32 and defaults["grad_clip"] is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"feature_dims": {"rgb": 16}}, "lacks modalities"),
        ({"hidden": 30}, "divisible"),
        ({"num_grades": 1}, "num_grades"),
        ({"modalities": ["rgb", "rgb"]}, "repeat"),
        ({"modalities": []}, "at least one"),
        ({"div_distance": "manhattan"}, "div_distance"),
        ({"prototype_encoding": "grade"}, "prototype_encoding"),
        ({"projection_stats": "all"}, "projection_stats"),
        ({"recon_mean_over": "batch"}, "recon_mean_over"),
    ],
)
def test_config_errors(kwargs, message):
    base = {"modalities": NAMES, "feature_dims": DIMS, "hidden": D}
    with pytest.raises(ValueError, match=message):
        MCMoEConfig(**{**base, **kwargs})
    with pytest.raises(ValueError, match="MCMoEConfig: unknown key 'hiden'"):
        MCMoEConfig.from_dict({**base, "hiden": 3})


def test_bad_inputs_name_the_problem():
    model = small().eval()
    features = make_features()
    with pytest.raises(ValueError, match=r"missing \['audio'\]"):
        model({k: v for k, v in features.items() if k != "audio"}, MIXED)
    with pytest.raises(ValueError, match=r"features\['flow'\] has shape"):
        model({**features, "flow": features["flow"][..., :5]}, MIXED)
    empty = MIXED.clone()
    empty[2] = False
    with pytest.raises(ValueError, match=r"samples \[2\] have no available modality"):
        model(features, empty)


# ----------------------------------------------------------------------------- shapes and masks


def test_output_shapes_and_score_range():
    model = small()
    out = model(make_features(), MIXED)
    assert out["score"].shape == (B,)
    assert out["grade_weights"].shape == (B, 4) and out["grade_patterns"].shape == (B, 4, D)
    for key in ("real", "generated", "fused", "own_expert"):
        assert out[key].shape == (B, 3, T, D)
    assert torch.allclose(out["grade_weights"].sum(1), torch.ones(B))
    assert ((out["score"] >= 0) & (out["score"] <= 1)).all()
    # Nothing is generated for a modality the sample has.
    assert (out["generated"][MIXED] == 0).all()


def test_mixed_masks_in_one_batch_equal_each_sample_alone():
    model = small()
    model(make_features(seed=7), MIXED)  # move the running statistics away from their initial values
    model.eval()
    features = make_features()
    with torch.no_grad():
        together = model(features, MIXED)["score"]
        alone = torch.cat([model({m: x[i : i + 1] for m, x in features.items()}, MIXED[i : i + 1])["score"]
                           for i in range(B)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_one_mask_for_the_batch_equals_generating_from_the_sliced_available_modalities():
    """The published per-batch formulation: keys are only the available modalities, joined in time, and
    the zero query has the full length T."""
    model = small(dropout=0.0)
    available = torch.tensor([True, False, True]).expand(B, 3)
    real = torch.randn(3, B, T, D)
    completed, generated = model._complete(real, available)
    context = torch.cat([real[0], real[2]], 1)
    query = torch.zeros(B, T, D)
    generator = model.generators[1]
    for attention in generator.attention:
        query = attention(query, context, context)[0]
    gate = torch.sigmoid(generator.gate(torch.cat([query.mean(1), context.mean(1)], -1)))
    torch.testing.assert_close(completed[1], gate.unsqueeze(1) * query, rtol=1e-5, atol=1e-6)
    assert torch.equal(completed[0], real[0]) and torch.equal(completed[2], real[2])
    assert (generated[0] == 0).all() and (generated[2] == 0).all()


def test_single_query_attention_equals_multihead_attention():
    """Folding the key projection into the query and moving the value projection after the weighted sum
    changes nothing but rounding, for every head, with per-sample key padding and through gradients."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(D, 4, batch_first=True)
    nn.init.normal_(attention.in_proj_bias)  # the key bias must cancel, the value bias must not
    query, context = torch.randn(B, D, requires_grad=True), torch.randn(B, 7, D, requires_grad=True)
    hide = torch.rand(B, 7, generator=torch.Generator().manual_seed(1)) < 0.4
    hide[:, 3] = False  # every sample keeps a step
    fast = single_query_attention(attention, query, context, hide)
    slow = attention(query[:, None], context, context, key_padding_mask=hide)[0][:, 0]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), (query, context, attention.in_proj_weight)) for out in (fast, slow)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no dropout"):
        single_query_attention(nn.MultiheadAttention(D, 4, dropout=0.1, batch_first=True), query, context, hide)


# The model against tests/reference_mcmoe.py (written from the equations on the model's parameter tensors
# only) in float64, training and evaluation, at the float64 noise level. Each of these breaks made it
# fail (largest difference in brackets): the gate fed the generated mean twice (score 1.8e-3); prototypes
# without their position encoding (score 0.032); the router's softmax over time, not experts (score
# 3.8e-3); L_task weighted 5 (loss 0.13); L_align's KL reversed (loss 2.7e-3); the triplet loss's mean
# instead of hardest positive (loss 0.49); masked_modality_mean over every sample (loss 0.071); a
# projection's ReLU as GELU (score 4.5e-3); a pre-norm STEM (score 0.039); the masked BatchNorm's
# running variance biased (running stats 1.7e-3); R^m on the completed instead of the real sequence
# (own_expert 4.7). The sixth sample has no audio in its data (present False, features zero).
PRESENT = torch.ones(B + 1, 3, dtype=torch.bool)
PRESENT[B, 2] = False


@pytest.mark.parametrize("overrides", [
    {}, {"projection_stats": "available"}, {"recon_mean_over": "imputed"}, {"div_distance": "euclidean"},
    {"prototype_encoding": "batch-position"}, {"position_encoding": False, "div_weight": 0.5},
    {"use_stem": False}, {"use_agmg": False}, {"use_moe": False}, {"use_cfm": False}, {"baseline": True},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "published")
def test_model_matches_its_reference_written_from_the_equations(overrides):
    torch.manual_seed(0)
    model = mcmoe(NAMES, DIMS, hidden=D, **{"position_encoding": True, **overrides})
    features = make_features(batch=B + 1)
    features["audio"][B] = 0.0
    available = torch.cat([MIXED, torch.tensor([[1, 0, 0]], dtype=torch.bool)])
    target = torch.rand(B + 1, generator=torch.Generator().manual_seed(2))
    check_mcmoe_loop_matches(model, features, available, target, present=PRESENT)


def test_only_one_modality_left():
    model = small()
    available = torch.zeros(B, 3, dtype=torch.bool)
    available[torch.arange(B), torch.tensor([0, 1, 2, 0, 1])] = True
    out = model(make_features(), available)
    total, terms = model.loss(out, torch.rand(B), torch.ones(B, 3, dtype=torch.bool), available)
    assert torch.isfinite(total) and terms["recon"] > 0

    torch.manual_seed(0)
    single = mcmoe(["rgb"], {"rgb": 16}, hidden=D)
    assert single.generators is None
    everything = torch.ones(B, 1, dtype=torch.bool)
    out = single({"rgb": make_features()["rgb"]}, everything)
    total, terms = single.loss(out, torch.rand(B), everything, everything)
    total.backward()
    assert torch.isfinite(total) and terms["recon"] == 0


@pytest.mark.parametrize("training, stats", [(False, "present"), (True, "present"), (True, "available")])
def test_unavailable_features_never_reach_any_score(training, stats):
    """At inference a masked modality never reaches a score. In training, a modality the data lacks
    (present False) never does either; one hidden only by the training mask still counts in the
    projections' batch statistics (the published code), unless projection_stats="available"."""
    model = small(projection_stats=stats).train(training)
    present = MIXED if stats == "present" else None  # None: inferred, i.e. every modality is in the data
    features = {m: x.clone().requires_grad_(True) for m, x in make_features().items()}
    score = seeded(model, features, MIXED, present=present)["score"]
    score.sum().backward()
    for i, m in enumerate(NAMES):
        hidden = ~MIXED[:, i]
        assert (features[m].grad[hidden] == 0).all(), f"{m}: unavailable features receive gradient"
        assert (features[m].grad[~hidden] != 0).any()
    garbage = {m: torch.where(MIXED[:, i, None, None], x.detach(), 100 * torch.randn_like(x))
               for i, (m, x) in enumerate(features.items())}
    torch.testing.assert_close(seeded(model, garbage, MIXED, present=present)["score"], score.detach(), rtol=0, atol=1e-6)


def test_absent_modality_contributes_nothing_to_the_loss():
    model = small()
    available = MIXED.clone()
    present = torch.ones(B, 3, dtype=torch.bool)
    present[1, 0] = present[3, 0] = present[4, 1] = False  # not in these videos' data
    available &= present
    target = torch.rand(B)
    features = make_features()
    zeros = {m: torch.where(present[:, i, None, None], x, 0.0) for i, (m, x) in enumerate(features.items())}
    garbage = {m: torch.where(present[:, i, None, None], x, 50 * torch.randn_like(x)).requires_grad_(True)
               for i, (m, x) in enumerate(features.items())}

    total_zeros, terms_zeros = model.loss(seeded(model, zeros, available), target, present, available)
    total_inferred, _ = model.loss(seeded(model, zeros, available, present=present), target, present, available)
    total_garbage, terms = model.loss(seeded(model, garbage, available, present=present), target, present, available)
    torch.testing.assert_close(total_garbage, total_zeros, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total_inferred, total_zeros, rtol=0, atol=0)
    assert terms["recon"] > 0 and terms["align"] > 0
    total_garbage.backward()
    for i, m in enumerate(NAMES):
        assert (garbage[m].grad[~present[:, i]] == 0).all(), f"{m}: absent features receive gradient"


def test_projection_statistics_come_from_every_sample_whose_data_has_the_modality():
    """Training masks do not remove a sample from the projections' batch statistics (the published
    code); a modality absent from a sample's data does."""
    features = make_features()
    conv_out = lambda model, rows: model.projections["rgb"].conv1(features["rgb"][rows].transpose(1, 2))  # noqa: E731

    def running_mean_after(model, available, present=None):
        norm = model.projections["rgb"].norm1
        norm.reset_running_stats()
        model(features, available, present=present)
        return norm.running_mean / norm.momentum  # from zero: momentum * batch mean

    model = small(dropout=0.0).train()
    with torch.no_grad():
        everyone = conv_out(model, slice(None)).mean((0, 2))
        torch.testing.assert_close(running_mean_after(model, MIXED), everyone)
        # the real (STEM) sequences, the targets of L_recon, do not depend on the training masks at all
        full = torch.ones(B, 3, dtype=torch.bool)
        torch.testing.assert_close(model(features, MIXED)["real"], model(features, full)["real"], rtol=0, atol=0)
        present = torch.ones(B, 3, dtype=torch.bool)
        present[1, 0] = False  # sample 1's data has no rgb
        rows = torch.tensor([0, 2, 3, 4])
        torch.testing.assert_close(running_mean_after(model, MIXED & present, present), conv_out(model, rows).mean((0, 2)))

        legacy = small(dropout=0.0, projection_stats="available").train()  # runs recorded before the setting
        allowed = MIXED[:, 0].nonzero().flatten()
        torch.testing.assert_close(running_mean_after(legacy, MIXED), conv_out(legacy, allowed).mean((0, 2)))


INCOMPLETE = [torch.tensor(s, dtype=torch.bool) for s in itertools.product([False, True], repeat=3) if 0 < sum(s) < 3]


def reference_terms(out: dict[str, torch.Tensor], target: torch.Tensor, subset: torch.Tensor) -> dict[str, float]:
    """The published code's terms for one mask shared by the batch: one MSE per generated modality (mean
    over the batch), one element-wise-mean KL per modality, summed; the task MSE."""
    recon = sum(F.mse_loss(out["generated"][:, m], out["real"][:, m]) for m in range(3) if not subset[m])
    p_log, q_log = (torch.log_softmax(out[k], -1) for k in ("own_expert", "fused"))
    align = sum((p_log[:, m].exp() * (p_log[:, m] - q_log[:, m])).mean() for m in range(3))
    return {"recon": float(recon), "align": float(align), "task": float(F.mse_loss(out["score"], target))}


@pytest.mark.parametrize("training", [True, False])
def test_per_sample_masks_keep_the_published_per_batch_losses_in_expectation(training):
    """E over independent per-sample masks (every one of the 6^3 joint masks of a 3-sample batch,
    enumerated) of the project's terms == E over the reference's one mask per batch (the 6 masks).

    In training, L_recon is exactly equal (a sample's generated and real sequences depend only on its
    own mask); L_align and L_task go through the experts' and fusion's batch statistics, which mix the
    batch's samples, so their exact equality is checked without batch statistics (eval mode)."""
    torch.manual_seed(0)
    model = mcmoe(NAMES, DIMS, hidden=16, dropout=0.0).double()
    model({m: x.double() for m, x in make_features(seed=7).items()}, MIXED)  # running statistics moved
    model.train(training)
    batch = 3
    features = {m: x[:batch].double() for m, x in make_features().items()}
    target = torch.tensor([0.2, 0.5, 0.9], dtype=torch.double)
    present = torch.ones(batch, 3, dtype=torch.bool)

    def expectation(masks, terms_of):
        total: dict[str, float] = {}
        for mask in masks:
            out = model(features, mask)
            for key, value in terms_of(out, mask).items():
                total[key] = total.get(key, 0.0) + float(value) / len(masks)
        return total

    with torch.no_grad():
        per_batch = expectation([s.expand(batch, 3) for s in INCOMPLETE], lambda out, mask: reference_terms(out, target, mask[0]))
        joint = [torch.stack(rows) for rows in itertools.product(INCOMPLETE, repeat=batch)]
        assert len(joint) == 6**batch
        per_sample = expectation(joint, lambda out, mask: model.loss(out, target, present, mask)[1])
        model.config.recon_mean_over = "imputed"  # the normalisation before this setting existed
        before = expectation(joint, lambda out, mask: model.loss(out, target, present, mask)[1])
    assert per_batch["recon"] > 0 and per_batch["align"] > 0
    assert per_sample["recon"] == pytest.approx(per_batch["recon"], rel=1e-9)
    assert before["recon"] > 1.5 * per_batch["recon"]  # about 2x: the test tells the two apart
    if not training:
        assert per_sample["align"] == pytest.approx(per_batch["align"], rel=1e-9)
        assert per_sample["task"] == pytest.approx(per_batch["task"], rel=1e-9)


@pytest.mark.parametrize("encoding", ["grade-index", "batch-position"])
def test_prototype_encoding_and_batch_order(encoding):
    """grade-index (default): a sample's score does not depend on its place in the batch. batch-position
    (the published code, for its released checkpoints): every prototype of the b-th sample gets the
    sinusoidal encoding of b, computed here independently of models.layers."""
    model = small(prototype_encoding=encoding)
    model(make_features(seed=7), MIXED)
    model.eval()
    features = make_features()
    order = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        scores = model(features, MIXED)["score"]
        reordered = model({m: x[order] for m, x in features.items()}, MIXED[order])["score"]
        queries = model.grade_queries(B)
    if encoding == "grade-index":
        torch.testing.assert_close(reordered, scores[order], rtol=0, atol=1e-6)
        expected = model.grade_prototypes + torch.tensor(
            [[math.sin(n / 10000 ** (2 * (j // 2) / D)) if j % 2 == 0 else math.cos(n / 10000 ** (2 * (j // 2) / D))
              for j in range(D)] for n in range(4)])
        torch.testing.assert_close(queries, expected.expand(B, -1, -1).detach())
    else:
        assert (reordered - scores[order]).abs().max() > 1e-4  # the published code's batch-order dependence
        expected = torch.stack([model.grade_prototypes + torch.tensor(
            [math.sin(b / 10000 ** (2 * (j // 2) / D)) if j % 2 == 0 else math.cos(b / 10000 ** (2 * (j // 2) / D))
             for j in range(D)]) for b in range(B)])
        torch.testing.assert_close(queries, expected.detach())


# ----------------------------------------------------------------------------- loss terms by hand


def test_hardest_triplet_loss_by_hand():
    # Two samples, two grades, 2-d patterns.
    x = torch.tensor([[[0.0, 0.0], [3.0, 0.0]], [[0.0, 1.0], [0.5, 0.0]]])
    points = x.reshape(4, 2)  # labels 0, 1, 0, 1
    labels = [0, 1, 0, 1]
    expected = 0.0
    for a in range(4):
        pos = max(float(torch.dist(points[a], points[p])) for p in range(4) if p != a and labels[p] == labels[a])
        neg = min(float(torch.dist(points[a], points[n])) for n in range(4) if labels[n] != labels[a])
        expected += max(pos - neg + 1.0, 0.0) / 4
    # anchor 0: pos 1, neg 0.5 -> 1.5; anchor 1: pos 2.5, neg 3 -> 0.5; anchor 2: pos 1,
    # neg sqrt(1.25) -> ~0.882; anchor 3: pos 2.5, neg 0.5 -> 3.0
    assert expected == pytest.approx((1.5 + 0.5 + (2 - math.sqrt(1.25)) + 3.0) / 4)
    assert float(hardest_triplet_loss(x, margin=1.0)) == pytest.approx(expected, rel=1e-6)
    assert float(hardest_triplet_loss(x, margin=0.0)) == pytest.approx(
        (0.5 + 0 + max(1 - math.sqrt(1.25), 0) + 2.0) / 4, rel=1e-6)

    # One sample: no positives, the loss only pushes grades apart; far-apart grades cost nothing.
    assert float(hardest_triplet_loss(torch.tensor([[[0.0, 0.0], [0.3, 0.4]]]), margin=1.0)) == pytest.approx(0.5)
    assert float(hardest_triplet_loss(torch.tensor([[[0.0, 0.0], [3.0, 4.0]]]), margin=1.0)) == 0.0
    # Cosine distance variant: orthogonal grades at distance 1 from each other.
    cos = hardest_triplet_loss(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), margin=1.5, distance="cosine")
    assert float(cos) == pytest.approx(0.5)


def test_triplet_loss_gradient_is_finite_when_points_coincide():
    x = torch.zeros(3, 4, 8, requires_grad=True)  # every sample identical: zero positive distances
    hardest_triplet_loss(x).backward()
    assert torch.isfinite(x.grad).all()


def test_masked_modality_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, float("inf")], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, False, False], [True, True, False]])
    # modality 0: (1 + 3) / 2, modality 1: 4 / 1, modality 2: nothing
    assert float(masked_modality_mean(values, mask)) == pytest.approx(2.0 + 4.0)


def test_model_loss_terms_by_hand():
    model = small(div_weight=0.5)
    b, m, t, d = 2, 3, 2, 4
    g = torch.Generator().manual_seed(5)
    out = {k: torch.randn(b, m, t, d, generator=g) for k in ("real", "generated", "fused", "own_expert")}
    out["score"] = torch.tensor([0.2, 0.7])
    out["grade_patterns"] = torch.randn(b, 4, d, generator=g)
    target = torch.tensor([0.5, 0.1])
    available = torch.tensor([[True, False, False], [False, True, True]])
    present = torch.tensor([[True, True, False], [True, True, True]])
    total, terms = model.loss(out, target, present, available)

    task = ((0.2 - 0.5) ** 2 + (0.7 - 0.1) ** 2) / 2
    # imputed and present: (0, 1) and (1, 0); modality 2 is imputed in sample 0 but absent from its data.
    # Modalities 0 and 1 are in both samples' data: each mean is over 2 samples, the other one counting 0.
    error = {(s, k): float(((out["generated"][s, k] - out["real"][s, k]) ** 2).mean()) for s, k in [(0, 1), (1, 0)]}
    recon = error[0, 1] / 2 + error[1, 0] / 2

    def kl(s, k):  # KL(softmax(R) || softmax(F)) per position, averaged over positions and features
        p = torch.softmax(out["own_expert"][s, k], -1)
        q = torch.softmax(out["fused"][s, k], -1)
        return float((p * (p.log() - q.log())).sum(-1).mean() / d)

    align = (kl(0, 0) + kl(1, 0)) / 2 + (kl(0, 1) + kl(1, 1)) / 2 + kl(1, 2)
    div = float(hardest_triplet_loss(out["grade_patterns"], 1.0, "cosine"))
    assert float(terms["task"]) == pytest.approx(task, rel=1e-6)
    assert float(terms["recon"]) == pytest.approx(recon, rel=1e-5)
    assert float(terms["align"]) == pytest.approx(align, rel=1e-5)
    assert float(terms["div"]) == pytest.approx(div, rel=1e-6)
    assert float(total) == pytest.approx(10 * task + recon + align + 0.5 * div, rel=1e-5)
    # Runs recorded before recon_mean_over existed divide by the number of imputing samples (1 and 1).
    _, legacy = small(recon_mean_over="imputed").loss(out, target, present, available)
    assert float(legacy["recon"]) == pytest.approx(error[0, 1] + error[1, 0], rel=1e-5)


# ----------------------------------------------------------------------------- training behaviour


def test_every_learning_module_gets_gradient():
    model = small()
    out = model(make_features(), MIXED)
    total, _ = model.loss(out, torch.rand(B), torch.ones(B, 3, dtype=torch.bool), MIXED)
    total.backward()
    # A convolution bias right before a batch norm is cancelled by it: its gradient is zero in theory.
    before_norm = {"conv1.bias", "conv2.bias", "fusion.0.bias", "fusion.3.bias"}
    silent = [name for name, p in model.named_parameters()
              if not any(name.endswith(b) for b in before_norm) and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert silent == []
    groups = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert groups == {"projections", "stem", "generators", "experts", "router", "fusion", "decoder",
                      "grade_prototypes", "head"}
    assert all(model.generators[i].gate.weight.grad.abs().sum() > 0 for i in range(3))


@pytest.mark.parametrize(
    "switch",
    ["use_stem", "use_agmg", "use_moe", "use_cfm", "use_recon", "use_align", "use_div", "baseline"],
)
def test_ablations_build_and_train(switch):
    model = small(**{switch: switch == "baseline"})
    out = model(make_features(), MIXED)
    total, terms = model.loss(out, torch.rand(B), torch.ones(B, 3, dtype=torch.bool), MIXED)
    total.backward()
    assert torch.isfinite(total)
    assert tuple(terms) == LOSS_TERMS == ("task", "div", "recon", "align")
    if switch in ("use_agmg", "use_recon", "baseline"):
        assert terms["recon"] == 0
    if switch in ("use_moe", "use_align", "baseline"):
        assert terms["align"] == 0
    if switch == "use_div":
        assert terms["div"] == 0
    if switch == "baseline":
        assert model.stem is None and model.generators is None and model.experts is None and model.fusion is None
        assert model.config.use_stem is False and MCMoEConfig.from_dict(model.config.to_dict()) == model.config
        # the projected available features, summed, are what the decoder reads
        assert sum(p.numel() for p in model.parameters()) == sum(
            p.numel() for name, p in model.named_parameters() if name.split(".")[0] in
            {"projections", "decoder", "grade_prototypes", "head"})


def test_deterministic_on_cpu_with_a_seed():
    outs = []
    for _ in range(2):
        model = small()
        out = seeded(model, make_features(), MIXED)
        total, _ = model.loss(out, torch.rand(B, generator=torch.Generator().manual_seed(0)),
                              torch.ones(B, 3, dtype=torch.bool), MIXED)
        total.backward()
        outs.append((out["score"].detach(), model.head.weight.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ----------------------------------------------------------------------------- layers


def test_masked_batch_norm_matches_batch_norm_and_ignores_unselected_rows():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5)
    plain, masked = nn.BatchNorm1d(4), MaskedBatchNorm1d(4)
    torch.testing.assert_close(masked(x, torch.ones(6, dtype=torch.bool)), plain(x))
    torch.testing.assert_close(masked.running_var, plain.running_var)
    torch.testing.assert_close(masked.running_mean, plain.running_mean)

    rows = torch.tensor([True, False, True, True, False, True])
    fresh, reference = MaskedBatchNorm1d(4), nn.BatchNorm1d(4)
    out = fresh(x, rows)
    torch.testing.assert_close(out[rows], reference(x[rows]))
    torch.testing.assert_close(fresh.running_mean, reference.running_mean)
    changed = x.clone()
    changed[~rows] = 1e3
    torch.testing.assert_close(MaskedBatchNorm1d(4)(changed, rows)[rows], out[rows])


def test_batch_norm_per_block_equals_successive_calls():
    torch.manual_seed(0)
    x = torch.randn(4, 3 * 5, 7)  # (B, blocks * C, T)
    blocks = list(x.view(4, 3, 5, 7).unbind(1))
    for order in (None, [2, 0, 1]):
        grouped, successive = nn.BatchNorm1d(5), nn.BatchNorm1d(5)
        nn.init.normal_(grouped.weight)
        nn.init.normal_(grouped.running_mean)
        successive.load_state_dict(grouped.state_dict())
        out = batch_norm_per_block(x, grouped, 3, order)
        expected = {g: successive(blocks[g]) for g in (order or range(3))}  # called in `order`
        torch.testing.assert_close(out, torch.cat([expected[g] for g in range(3)], 1))
        torch.testing.assert_close(grouped.running_mean, successive.running_mean)
        torch.testing.assert_close(grouped.running_var, successive.running_var)
        assert grouped.num_batches_tracked == successive.num_batches_tracked == 3
        grouped.eval(), successive.eval()
        torch.testing.assert_close(batch_norm_per_block(x, grouped, 3), torch.cat([successive(b) for b in blocks], 1))


def test_sinusoidal_position_encoding_values():
    pe = sinusoidal_position_encoding(3, 6)
    assert torch.equal(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert float(pe[2, 0]) == pytest.approx(math.sin(2.0))
    assert float(pe[1, 3]) == pytest.approx(math.cos(1.0 / 10000 ** (2 / 6)))
    assert sinusoidal_position_encoding(4, 5).shape == (4, 5)


def test_uniform_dropout_keeps_torchs_distribution_and_gradient():
    from models.layers import UniformDropout, use_uniform_dropout

    model = use_uniform_dropout(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3)))
    layer = model[1]
    assert type(layer) is UniformDropout and layer.p == 0.3
    torch.manual_seed(0)
    x = torch.rand(400, 1000) + 0.5
    x.requires_grad_(True)
    y = layer.train()(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # 400,000 draws: 0.7 +- 5 standard errors
    assert torch.allclose(y[kept], x[kept] / 0.7)
    y.sum().backward()
    assert torch.allclose(x.grad, kept / 0.7)  # dropped elements get no gradient, kept ones the scale
    assert torch.equal(layer.eval()(x), x)
    torch.manual_seed(1)
    first = layer.train()(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), first)  # drawn from torch's generator: seeded runs repeat
