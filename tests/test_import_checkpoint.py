"""import-checkpoint: a state dict in the MCMoE reference code's layout, written here by a module built
from the reference's described structure (not from this project's model), becomes a run whose scores
equal that module's own forward pass; unknown or missing tensors and non-tensor pickles are refused.
`score` (Run.predict) gives such a batch-position run's clip the mean of the reference's scores over
batch positions 0..31, whatever is scored with it.

Deliberate breaks, each seen to fail: Run.predict scoring batch-position runs in batches as given (no
copies) fails the order test; taking position 0 instead of the mean over 0..31 fails the order test's
values and the score test."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from manifests.cache import FeatureCache
from models.mcmoe import MCMoE
from pipeline import data
from pipeline.cli import main
from pipeline.inference import load_run
from pipeline.stages.score import run_extraction_config
from tests.synthetic import write_labels, write_synthetic_cache

LETTERS = ("v", "a", "f")  # the reference's order
NAMES = {"v": "rgb", "a": "audio", "f": "flow"}
DIMS = {"rgb": 16, "flow": 12, "audio": 8}  # the cache's order rgb, flow, audio: v, f, a
D, HEADS, GRADES, CLIP_NUM = 16, 2, 4, 6


def sinusoid(length: int, dim: int) -> torch.Tensor:
    """sin / cos of position / 10000^(2i/dim), written out element by element."""
    table = torch.zeros(length, dim)
    for position in range(length):
        for i in range(0, dim, 2):
            angle = position / 10000 ** (i / dim)
            table[position, i], table[position, i + 1] = math.sin(angle), math.cos(angle)
    return table


class Router(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d // 2), nn.Linear(d // 2, 3)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Generator(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.cross_attn = nn.ModuleList(nn.MultiheadAttention(d, 4, batch_first=True) for _ in range(2))
        self.gate = nn.Sequential(nn.Linear(2 * d, d), nn.Sigmoid())

    def forward(self, context, length):
        query = context.new_zeros(context.shape[0], length, context.shape[2])
        for attention in self.cross_attn:
            query = attention(query, context, context)[0]
        return self.gate(torch.cat([query.mean(1), context.mean(1)], -1)).unsqueeze(1) * query


class ReferenceLayout(nn.Module):
    """Attribute names and order as the reference's MoE_AQA; forward = its test-time pass, one modality
    mask for the whole batch, prototypes encoded by the sample's position in the batch."""

    def __init__(self, dims: dict[str, int], d: int = D, layers: int = 2):
        super().__init__()

        def block(a, b, c, kernel, act):
            return nn.Sequential(nn.Conv1d(a, b, kernel, padding=kernel // 2), nn.BatchNorm1d(b), act,
                                 nn.Conv1d(b, c, 1), nn.BatchNorm1d(c))

        self.in_proj = nn.ModuleDict({k: block(dims[k], dims[k] // 2, d, 1, nn.ReLU()) for k in LETTERS})
        self.experts = nn.ModuleDict({k: block(d, d // 2, d, 3, nn.GELU()) for k in LETTERS})
        self.generators = nn.ModuleDict({k: Generator(d) for k in LETTERS})
        self.router_mix = Router(d)
        self.transformer = nn.Module()
        self.transformer.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, HEADS, 3 * d, 0.0, batch_first=True), layers, norm=nn.LayerNorm(d),
            enable_nested_tensor=False)
        self.transformer.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d, HEADS, 3 * d, 0.0, batch_first=True), layers, norm=nn.LayerNorm(d))
        self.fusion = nn.Sequential(nn.Conv1d(3 * d, 2 * d, 1), nn.BatchNorm1d(2 * d), nn.ReLU(),
                                    nn.Conv1d(2 * d, d, 1), nn.BatchNorm1d(d))
        self.prototype = nn.Embedding(GRADES, d)
        self.regressor = nn.Linear(d, GRADES)
        self.pos_encoder = nn.Module()
        self.pos_encoder.register_buffer("pe", sinusoid(136, d).unsqueeze(1))
        generator = torch.Generator().manual_seed(4)
        for module in self.modules():  # batch statistics and affine parameters away from their defaults
            if isinstance(module, nn.BatchNorm1d):
                c = module.num_features
                module.running_mean.copy_(0.3 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                module.weight.data.copy_(1 + 0.2 * torch.randn(c, generator=generator))
                module.bias.data.copy_(0.2 * torch.randn(c, generator=generator))
                module.num_batches_tracked.fill_(7)
        self.eval()

    @torch.no_grad()
    def forward(self, x: dict[str, torch.Tensor], mask: dict[str, bool]) -> torch.Tensor:
        length = next(iter(x.values())).shape[1]
        seq = {k: self.transformer.encoder(self.in_proj[k](x[k].transpose(1, 2)).transpose(1, 2)) for k in LETTERS if mask[k]}
        context = torch.cat([seq[k] for k in LETTERS if mask[k]], 1)
        for k in LETTERS:
            if not mask[k]:
                seq[k] = self.generators[k](context, length)
        fused = []
        for k in LETTERS:
            outs = torch.stack([self.experts[e](seq[k].transpose(1, 2)).transpose(1, 2) for e in LETTERS], 2)
            weights = torch.softmax(self.router_mix(seq[k]), -1)
            fused.append((outs * weights.unsqueeze(-1)).sum(2))
        memory = self.fusion(torch.cat(fused, -1).transpose(1, 2)).transpose(1, 2)
        batch = memory.shape[0]
        queries = self.prototype.weight.unsqueeze(0).repeat(batch, 1, 1) + self.pos_encoder.pe[:batch]
        patterns = self.transformer.decoder(queries, memory)
        weights = torch.sigmoid(torch.diagonal(self.regressor(patterns), dim1=-2, dim2=-1))
        return (weights / weights.sum(1, keepdim=True)) @ torch.linspace(0, 1, GRADES)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    made = write_synthetic_cache(root / "cache", num_videos=7, length_range=(5, 8), feature_dims=DIMS)
    torch.manual_seed(0)
    reference = ReferenceLayout({k: DIMS[NAMES[k]] for k in LETTERS})
    path = root / "MCMoE_RG_Ball_best.pkl"
    torch.save(reference.state_dict(), path)
    return made, reference, path


def import_run(setup, out, *extra, sizes=("--clip-num", str(CLIP_NUM), "--score-range", "10")) -> int:
    made, _, path = setup
    return main(["import-checkpoint", str(path), "--format", "mcmoe-reference", "--out", str(out),
                 "--features", str(made.cache.root), *sizes, *extra])


def reference_batch(made, run):
    samples = data.load_samples(made.cache, made.video_ids[:5], made.scores)
    batch = data.collate(samples, run.modalities, run.feature_dims, run.clip_num)
    return samples, {k: batch.features[NAMES[k]] for k in LETTERS}


def test_every_tensor_maps_and_scores_equal_the_reference_layout_forward(setup, tmp_path, capsys):
    made, reference, _ = setup
    assert import_run(setup, tmp_path / "run") == 0
    assert "tensors mapped" in capsys.readouterr().out
    run = load_run(tmp_path / "run", device="cpu")
    model = run.model
    assert isinstance(model, MCMoE) and model.config.prototype_encoding == "batch-position"
    assert (model.config.hidden, model.config.encoder_layers, model.config.decoder_layers) == (D, 2, 2)
    assert model.config.feature_dims == DIMS and not model.config.position_encoding
    ref = reference.state_dict()
    state = model.state_dict()
    # by name: the three experts side by side in the run's modality order rgb, flow, audio = v, f, a
    torch.testing.assert_close(state["experts.conv1.weight"], torch.cat([ref[f"experts.{k}.0.weight"] for k in "vfa"]))
    torch.testing.assert_close(state["experts.norm2.running_var"], torch.cat([ref[f"experts.{k}.4.running_var"] for k in "vfa"]))
    torch.testing.assert_close(state["router.2.weight"], ref["router_mix.fc2.weight"][[0, 2, 1]])
    torch.testing.assert_close(state["projections.audio.norm1.running_mean"], ref["in_proj.a.1.running_mean"])
    torch.testing.assert_close(state["generators.2.attention.1.in_proj_weight"], ref["generators.a.cross_attn.1.in_proj_weight"])
    torch.testing.assert_close(state["grade_prototypes"], ref["prototype.weight"])

    samples, features = reference_batch(made, run)
    for subset in data.modality_subsets(run.modalities):  # the seven settings of Table 1
        mask = {k: NAMES[k] in subset for k in LETTERS}
        available = data.subset_mask(subset, run.modalities).expand(len(samples), -1)
        ours = run.forward(samples, available)["score"]
        torch.testing.assert_close(ours, reference(features, mask), rtol=1e-5, atol=1e-6, msg=str(subset))


def test_compatibility_mode_depends_on_batch_order_the_default_does_not(setup, tmp_path):
    made, reference, _ = setup
    assert import_run(setup, tmp_path / "compat") == 0
    assert import_run(setup, tmp_path / "paper", "--prototype-encoding", "grade-index") == 0
    compat, paper = load_run(tmp_path / "compat", device="cpu"), load_run(tmp_path / "paper", device="cpu")
    samples, features = reference_batch(made, compat)
    order = [4, 2, 0, 3, 1]
    reordered = [samples[i] for i in order]
    scores = {name: (run.forward(samples)["score"], run.forward(reordered)["score"])
              for name, run in (("compat", compat), ("paper", paper))}
    torch.testing.assert_close(scores["paper"][1], scores["paper"][0][order], rtol=0, atol=1e-6)
    # the reference's own scores move with the batch order, and compatibility mode follows them
    assert (scores["compat"][1] - scores["compat"][0][order]).abs().max() > 1e-4
    shuffled = {k: x[order] for k, x in features.items()}
    torch.testing.assert_close(scores["compat"][1], reference(shuffled, dict.fromkeys(LETTERS, True)), rtol=1e-5, atol=1e-6)


def mean_over_positions(reference: ReferenceLayout, features: dict[str, torch.Tensor], index: int, mask) -> torch.Tensor:
    """The reference's score of sample `index` averaged over batch positions 0..31 (32 copies of it)."""
    return reference({k: x[index : index + 1].expand(32, -1, -1) for k, x in features.items()}, mask).mean()


def test_score_gives_a_batch_position_run_s_clip_one_score_whatever_is_scored_with_it(setup, tmp_path):
    made, reference, _ = setup
    assert import_run(setup, tmp_path / "compat") == 0
    assert import_run(setup, tmp_path / "paper", "--prototype-encoding", "grade-index") == 0
    compat, paper = load_run(tmp_path / "compat", device="cpu"), load_run(tmp_path / "paper", device="cpu")
    assert (compat.batch_positions, paper.batch_positions) == (32, None)
    samples, features = reference_batch(made, compat)
    order = [4, 2, 0, 3, 1]
    alone = [compat.predict([s])[0][0] for s in samples]
    together, reordered = compat.predict(samples), compat.predict([samples[i] for i in order], batch_size=2)
    assert [score for score, _ in together] == alone
    assert [score for score, _ in reordered] == [alone[i] for i in order]
    everything = dict.fromkeys(LETTERS, True)
    expected = [10 * float(mean_over_positions(reference, features, i, everything)) for i in range(len(samples))]
    assert alone == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert sum(together[0][1]) == pytest.approx(1, abs=1e-6)
    # the evaluation route keeps the reference's batch order, and so its scores move with it
    assert abs(compat.scores([samples[i] for i in order]) - compat.scores(samples)[order]).max() > 1e-4
    # a grade-index run: the scores of its batches as given, to the bit
    outputs = paper.forward(samples)
    assert paper.predict(samples) == [(10 * float(score), weights) for score, weights
                                      in zip(outputs["score"].tolist(), outputs["grade_weights"].tolist())]


def test_evaluate_an_imported_run_says_the_test_set_chose_it(setup, tmp_path, capsys):
    made, _, _ = setup
    # The released RG weights were trained on the pamfn recipe's features; the synthetic cache is of none.
    assert import_run(setup, tmp_path / "refused", "--preset", "rg", "--action", "Ball", sizes=("--clip-num", "6")) == 2
    assert "trained on features of recipe pamfn" in capsys.readouterr().err
    assert import_run(setup, tmp_path / "run", "--preset", "rg", "--action", "Ball", "--allow-other-recipe",
                      sizes=("--clip-num", "6")) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["feature_recipe"] == "pamfn"
    # Raw clips scored by these weights go through the recipe that remakes the published features.
    remade = run_extraction_config(load_run(tmp_path / "run", "cpu"))
    assert (remade.recipe, remade.frame_rate, remade.backbones) == ("pamfn", 25.0, {"rgb": "vst", "flow": "tvl1", "audio": "ast"})
    assert info["imported"]["num_tensors"] == len(torch.load(setup[2], weights_only=True))
    assert (info["clip_num"], info["clip_num_source"], info["score_range"], info["score_range_source"]) == (
        CLIP_NUM, "flag", 25.0, "preset rg/Ball")
    assert json.loads((tmp_path / "run" / "extraction_config.json").read_text()) == made.cache.read_config()
    labels = write_labels(tmp_path / "labels.csv", made.scores, dict.fromkeys(made.scores, "test"))
    evaluate = ["evaluate", "--run", str(tmp_path / "run"), "--labels", str(labels), "--out", str(tmp_path / "table"),
                "--device", "cpu"]
    capsys.readouterr()
    assert main(evaluate) == 2
    refused = capsys.readouterr().err.strip().splitlines()
    assert len(refused) == 1 and "recipe pamfn" in refused[0] and "recipe synthetic" in refused[0], refused
    assert main(evaluate + ["--allow-other-recipe"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint imported from" in err and "the test set took part in choosing it" in err
    assert "played no part" not in err
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["test_used_for_selection"] is True and table["num_videos"] == 7
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"]) == 2  # nothing to resume


def test_tensors_left_over_or_missing_and_non_tensor_pickles_are_refused(setup, tmp_path, capsys):
    made, reference, _ = setup
    state = reference.state_dict()

    def attempt(name, tensors):
        path = tmp_path / f"{name}.pkl"
        torch.save(tensors, path)
        code = main(["import-checkpoint", str(path), "--format", "mcmoe-reference", "--out", str(tmp_path / name),
                     "--features", str(made.cache.root), "--clip-num", "6", "--score-range", "10"])
        return code, capsys.readouterr().err

    code, err = attempt("extra", {**state, "audio_head.weight": torch.zeros(3)})
    assert code == 2 and "nothing maps: audio_head.weight" in err
    code, err = attempt("missing", {k: v for k, v in state.items() if k != "experts.f.3.bias"})
    assert code == 2 and "missing 1 tensor(s): experts.f.3.bias" in err
    assert not (tmp_path / "missing" / "run.json").exists()
    code, err = attempt("shape", dict(state, **{"experts.a.0.bias": torch.zeros(5)}))
    assert code == 2 and "shape mismatches: experts.conv1.bias <- experts.v.0.bias+experts.f.0.bias+experts.a.0.bias" in err
    code, err = attempt("sizes", dict(state, **{"in_proj.a.0.weight": torch.zeros(3, 6, 1)}))
    assert code == 2 and "trained on features of sizes {'rgb': 16, 'flow': 12, 'audio': 6}" in err

    marker = tmp_path / "unpickled"

    class Payload:  # full unpickling would run os.mkdir(marker)
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    code, err = attempt("payload", {**state, "extra": Payload()})
    assert code == 2 and "weights_only=True" in err and not marker.exists()


@pytest.mark.parametrize("key, tensor, says", [
    ("in_proj.v.0.weight", torch.zeros(8), "is 1-D, expected 3-D"),
    ("in_proj.v.3.weight", torch.zeros(0, 8, 1), "zero-sized"),
    ("transformer.encoder.layers.0.linear1.weight", torch.tensor(1.0), "is 0-D, expected 2-D"),
    ("regressor.weight", torch.full((1, D), float("nan")), "NaN/inf"),
    ("experts.a.4.running_var", torch.tensor([float("inf")] * (D // 2)), "NaN/inf"),
    ("fusion.0.weight", torch.zeros(5), "is 1-D, expected 3-D"),
    ("fusion.0.weight", torch.zeros(5, 5, 1), "fusion.0.weight <- fusion.0.weight: (5, 5, 1), expected"),
    ("experts.f.0.weight", torch.zeros(D // 2, D, 2), "expected"),
])
def test_degenerate_tensors_are_one_line_naming_file_and_key(setup, tmp_path, capsys, key, tensor, says):
    """Checked before any size is read off a shape: no traceback, and no run whose every score is NaN."""
    made, reference, _ = setup
    path = tmp_path / "degenerate.pkl"
    torch.save(dict(reference.state_dict(), **{key: tensor}), path)
    code = main(["import-checkpoint", str(path), "--format", "mcmoe-reference", "--out", str(tmp_path / "run"),
                 "--features", str(made.cache.root), "--clip-num", "6", "--score-range", "10"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(path) in err and key in err and says in err, err
    assert not (tmp_path / "run" / "run.json").exists()


def test_score_new_clips_with_an_imported_checkpoint(extracted_clips, tmp_path, capsys):
    """With features made by `pipeline extract`, the run scores raw clips: extracted the same way, the
    missing audio imputed, the score that of the reference layout's forward pass on those features."""
    cache = FeatureCache.open(extracted_clips.cache)
    torch.manual_seed(1)
    reference = ReferenceLayout({k: cache.feature_dims[NAMES[k]] for k in LETTERS})
    path = tmp_path / "released.pkl"
    torch.save(reference.state_dict(), path)
    run_dir = tmp_path / "run"
    assert main(["import-checkpoint", str(path), "--format", "mcmoe-reference", "--out", str(run_dir),
                 "--features", str(extracted_clips.cache), "--clip-num", "4", "--score-range", "10"]) == 0
    out_json = tmp_path / "scores.json"
    capsys.readouterr()
    assert main(["score", str(extracted_clips.unseen), "--run", str(run_dir), "--out", str(out_json),
                 "--device", "cpu", "--quiet"]) == 0
    rule = "batch-position weights: each clip's score is its mean over batch positions 0-31"
    assert rule in capsys.readouterr().out.splitlines()[0]
    written = json.loads(out_json.read_text())
    (row,) = written["scores"]
    assert row["imputed"] == "audio" and written["score_rule"] == rule
    scored = FeatureCache.open(run_dir / "score_cache")
    run = load_run(run_dir, device="cpu")
    samples = data.load_samples(scored, [r.video_id for r in scored.records()])
    batch = data.collate(samples, run.modalities, run.feature_dims, run.clip_num)
    expected = mean_over_positions(reference, {k: batch.features[NAMES[k]] for k in LETTERS}, 0,
                                   {"v": True, "f": True, "a": False})
    # the file holds 4 decimals: half a unit of the last one, plus float32 rounding across CPUs
    assert float(row["score"]) == pytest.approx(10 * float(expected), rel=0, abs=5e-5 + 1e-6)
