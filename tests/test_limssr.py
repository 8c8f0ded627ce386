"""LIMSSR's project variant on the tiny random-weight Qwen2 LM: sequence layout, heads, losses, gradients,
saving, training (the reference variant, the default: tests/test_limssr_reference.py)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re

import pytest
import torch

from models import build_model, config_class
from models.checkpoint import load_model, save_model
from models.limssr import LIMSSRConfig, build_limssr, build_prompt
from models.tiny_llm import save_tiny_llm
from pipeline.inference import load_run
from pipeline.stages.train import train
from pipeline.train_config import resolve_config
from tests.synthetic import write_labels, write_synthetic_cache

DIMS = {"rgb": 12, "flow": 10, "audio": 6}
STEPS = 4
# One batch mixing four availability patterns (config order rgb, flow, audio).
MIXED = torch.tensor([[1, 1, 1], [0, 1, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)


def make_config(tiny_llm_folder, **overrides) -> LIMSSRConfig:
    return LIMSSRConfig(
        modalities=list(DIMS), feature_dims=dict(DIMS), llm=str(tiny_llm_folder), variant="project", head_hidden=16,
        **overrides,
    )


@pytest.fixture(scope="module")
def model(tiny_llm_folder):
    torch.manual_seed(0)
    return build_limssr(make_config(tiny_llm_folder)).eval()


def random_features(batch: int, available: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(batch, STEPS, dim, generator=generator) * available[:, index, None, None]
        for index, (name, dim) in enumerate(DIMS.items())
    }


def test_config_round_trip_and_training_defaults(tiny_llm_folder):
    config = make_config(tiny_llm_folder, lora_r=4)
    assert config_class("limssr") is LIMSSRConfig
    assert LIMSSRConfig.from_dict(config.to_dict()) == config
    defaults = LIMSSRConfig.training_defaults()
    assert defaults["optimizer"] == "adamw" and defaults["lr"] == 2e-4 and defaults["batch_size"] == 8
    assert defaults["mask_policy"] == "any" and defaults["min_lr_ratio"] == 0.1
    with pytest.raises(ValueError, match="LIMSSRConfig: unknown key 'hidden'"):
        LIMSSRConfig.from_dict({**config.to_dict(), "hidden": 3})
    with pytest.raises(ValueError, match="feature_dims"):
        LIMSSRConfig(modalities=["rgb", "depth"], feature_dims={"rgb": 4})


def test_sequence_layout_per_sample(model):
    layout = model.build_sequence(MIXED, STEPS)
    batch, length = layout.token_ids.shape
    tail = 3 * (STEPS + 2) + 4
    ids = model.tokenizer.convert_tokens_to_ids
    for row in range(batch):
        available = [name for name, here in zip(model.modalities, MIXED[row].tolist()) if here]
        missing = [name for name in model.modalities if name not in available]
        prompt_length = int(layout.prompt_lengths[row])
        # left padding: padding, then the prompt, then the fixed-length tail
        padding = length - tail - prompt_length
        assert layout.attention_mask[row].tolist() == [0] * padding + [1] * (prompt_length + tail)
        prompt = model.tokenizer.decode(layout.token_ids[row, length - tail - prompt_length : length - tail])
        assert prompt == build_prompt(available, missing)
        assert f"Available modalities: {', '.join(available)}." in prompt
        real = layout.attention_mask[row].bool()
        assert layout.position_ids[row, real].tolist() == list(range(prompt_length + tail))
        # spans: available modalities first, each in config order, T slots between start and end
        order = sorted(range(3), key=lambda m: layout.start_positions[row, m].item())
        assert [model.modalities[m] for m in order] == available + missing
        for m, name in enumerate(model.modalities):
            start = int(layout.start_positions[row, m])
            assert layout.token_ids[row, start] == ids(f"<{name}_start>")
            assert layout.content_positions[row, m].tolist() == list(range(start + 1, start + 1 + STEPS))
            assert layout.end_positions[row, m] == start + STEPS + 1
            assert layout.token_ids[row, start + STEPS + 1] == ids(f"<{name}_end>")
            assert (layout.token_ids[row, layout.content_positions[row, m]] == ids(f"<{name}_missing>")).all()
        assert layout.fusion_positions[row].tolist() == list(range(length - 4, length))
        assert layout.token_ids[row, -4:].tolist() == ids([f"<fusion_{k}>" for k in range(4)])
    patterns = [pattern for pattern in itertools.product((True, False), repeat=3) if any(pattern)]
    assert model.sequence_length(STEPS) == max(len(model.prompt_ids(p)) for p in patterns) + tail >= length


def test_outputs_and_per_sample_masking(model):
    features = random_features(4, MIXED)
    with torch.no_grad():
        out = model(features, MIXED)
        assert out["score"].shape == out["main"].shape == out["aux"].shape == (4,)
        assert out["fusion_states"].shape == (4, 4, model.hidden_size)
        assert out["modality_weights"].shape == (4, 3)
        assert ((out["score"] >= 0) & (out["score"] <= 1)).all()
        assert out["mix"].item() == pytest.approx(0.7)
        expected = out["mix"] * out["main"] + (1 - out["mix"]) * out["aux"]
        torch.testing.assert_close(out["score"], expected)
        # a sample scored alone (shorter padding, no neighbours) gets the same score as in the batch
        for row in range(4):
            alone = model({k: v[row : row + 1] for k, v in features.items()}, MIXED[row : row + 1])["score"]
            torch.testing.assert_close(alone, out["score"][row : row + 1], atol=1e-5, rtol=1e-5)
        # values of a masked modality never reach the score; those of an available one do
        noisy = {k: v + 5.0 * (~MIXED[:, i, None, None]) for i, (k, v) in enumerate(features.items())}
        torch.testing.assert_close(model(noisy, MIXED)["score"], out["score"])
        # the contract's call (models/__init__.py): `present` is accepted and changes nothing
        assert torch.equal(model(features, MIXED, torch.ones_like(MIXED))["score"], out["score"])
        changed = dict(features, audio=features["audio"] + 1.0)
        assert not torch.allclose(model(changed, MIXED)["score"][3], out["score"][3])


def hand_hardest_triplet(states: torch.Tensor, margin: float) -> float:
    """With the reference's distance, 1 - cosine similarity."""
    batch, count, _ = states.shape
    anchors = [(b, k) for b in range(batch) for k in range(count)]

    def cosine_distance(u: list[float], v: list[float]) -> float:
        return 1.0 - sum(a * b for a, b in zip(u, v)) / (math.hypot(*u) * math.hypot(*v))

    total = 0.0
    for b, k in anchors:
        distance = lambda other: cosine_distance(states[b, k].tolist(), states[other[0], other[1]].tolist())  # noqa: E731
        positive = max([distance((c, k)) for c in range(batch) if c != b], default=0.0)
        negative = min(distance((c, j)) for c in range(batch) for j in range(count) if j != k)
        total += max(positive - negative + margin, 0.0)
    return total / len(anchors)


def test_loss_terms_by_hand(model):
    generator = torch.Generator().manual_seed(3)
    out = {
        "score": torch.tensor([0.2, 0.9, 0.5]),
        "main": torch.tensor([0.1, 0.8, 0.6]),
        "aux": torch.tensor([0.4, 0.7, 0.3]),
        "fusion_states": 0.4 * torch.randn(3, 4, 5, generator=generator),
    }
    target = torch.tensor([0.3, 0.6, 0.5])
    total, terms = model.loss(out, target, MIXED[:3], MIXED[:3])
    task = ((0.2 - 0.3) ** 2 + (0.9 - 0.6) ** 2 + 0.0) / 3
    consistency = ((0.1 - 0.4) ** 2 + (0.8 - 0.7) ** 2 + (0.6 - 0.3) ** 2) / 3
    triplet = hand_hardest_triplet(out["fusion_states"], margin=1.0)
    assert triplet > 0  # the states are close enough for the margin to bite
    assert terms["task"].item() == pytest.approx(task, rel=1e-5)
    assert terms["consistency"].item() == pytest.approx(consistency, rel=1e-5)
    assert terms["triplet"].item() == pytest.approx(triplet, rel=1e-5)
    assert total.item() == pytest.approx(10 * task + 1.0 * triplet + 1.0 * consistency, rel=1e-5)


def test_gradients_reach_adapters_and_new_tokens_only(tiny_llm_folder):
    torch.manual_seed(0)
    model = build_limssr(make_config(tiny_llm_folder)).train()
    available = MIXED.clone()
    available[:, 0] = True  # rgb available everywhere: its MISSING token is never read
    out = model(random_features(4, available), available)
    total, _ = model.loss(out, torch.rand(4), available, available)
    total.backward()

    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert lora and all(p.requires_grad for p in lora.values())
    # LoRA B starts at zero, so at the first step only B has a gradient (A's flows through B)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in lora.items() if "lora_B" in name)
    base = {name: p for name, p in model.llm.named_parameters() if "lora_" not in name}
    assert base and all(not p.requires_grad and p.grad is None for p in base.values())

    rows = dict(zip(model.new_tokens, model.new_token_embeddings.grad.abs().sum(1).tolist()))
    assert rows["<rgb_missing>"] == 0.0
    used = [t for t in model.new_tokens if t != "<rgb_missing>"]
    assert all(rows[token] > 0 for token in used), rows
    assert all(p.grad is not None for p in model.projections.parameters())
    assert model.mix_logit.grad is not None and model.fusion_logits.grad is not None


def test_save_load_round_trip_is_exact(tiny_llm_folder, tmp_path):
    torch.manual_seed(1)
    model = build_limssr(make_config(tiny_llm_folder)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):  # move adapters, new rows and heads (BN running stats too) off their init
        out = model(random_features(4, MIXED, seed=step), MIXED)
        optimizer.zero_grad()
        model.loss(out, torch.rand(4), MIXED, MIXED)[0].backward()
        optimizer.step()
    model.eval()
    features = random_features(4, MIXED, seed=9)
    with torch.no_grad():
        expected = model(features, MIXED)["score"]

    state = model.state_to_save()
    assert all("lora_" in key for key in state if key.startswith("llm."))
    assert "new_token_embeddings" in state and any("lora_B" in key for key in state)
    base_count = sum(p.numel() for name, p in model.llm.named_parameters() if "lora_" not in name)
    assert sum(t.numel() for t in state.values()) < base_count

    rebuilt = build_model("limssr", model.config.to_dict())  # the JSON config alone rebuilds the skeleton
    rebuilt.load_saved_state(state)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(features, MIXED)["score"], expected)

    save_model(tmp_path / "run", "limssr", model)  # safetensors + JSON, as runs store it
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "run")(features, MIXED)["score"], expected)

    with pytest.raises(ValueError, match="missing"):
        rebuilt.load_saved_state({k: v for k, v in state.items() if k != "new_token_embeddings"})


def test_missing_llm_gives_clear_error(tmp_path, monkeypatch):
    absent = tmp_path / "no_such_llm"
    with pytest.raises(FileNotFoundError, match=re.escape(str(absent)) + ".*--llm"):
        build_limssr(LIMSSRConfig(modalities=["rgb"], feature_dims={"rgb": 4}, llm=str(absent)))
    empty = tmp_path / "empty_llm"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_llm.*--llm"):
        build_limssr(LIMSSRConfig(modalities=["rgb"], feature_dims={"rgb": 4}, llm=str(empty)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache: nothing to find offline
    with pytest.raises(FileNotFoundError, match="nobody/not-a-model.*--llm"):
        build_limssr(LIMSSRConfig(modalities=["rgb"], feature_dims={"rgb": 4}, llm="nobody/not-a-model"))


def test_new_tokens_grow_a_full_embedding_matrix(tmp_path):
    folder = save_tiny_llm(tmp_path / "full_vocab", hidden_size=32, vocab_multiple=1)
    dims = {"rgb": 4, "audio": 3}
    config = LIMSSRConfig(modalities=list(dims), feature_dims=dims, llm=str(folder), variant="project", head_hidden=8)
    model = build_limssr(config)
    assert model.llm.get_input_embeddings().num_embeddings == len(model.tokenizer)
    available = torch.tensor([[True, False], [True, True]])
    features = {"rgb": torch.randn(2, 3, 4), "audio": torch.randn(2, 3, 3) * available[:, 1, None, None]}
    assert torch.isfinite(model.eval()(features, available)["score"]).all()


def test_bfloat16_and_gradient_checkpointing_options(tiny_llm_folder):
    model = build_limssr(make_config(tiny_llm_folder, torch_dtype="bfloat16", gradient_checkpointing=True)).train()
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.llm.get_base_model().is_activation_checkpointing
    out = model(random_features(4, MIXED), MIXED)
    assert out["score"].dtype == torch.float32
    model.loss(out, torch.rand(4), MIXED, MIXED)[0].backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_B" in name)


def test_short_cpu_training_through_the_trainer_reaches_positive_validation_rho(tiny_llm_folder, tmp_path):
    """The shared trainer (per-sample masks from every subset, warm-up + cosine, clipping, validation
    selection) on features whose score is a latent shared by all modalities: a few epochs take the tiny
    LLM's LIMSSR from rho 0.09 untrained (this seed) to above 0.8 on validation."""
    made = write_synthetic_cache(tmp_path / "cache", num_videos=60, length_range=(4, 6), seed=2, noise=0.5)
    labels = write_labels(tmp_path / "labels.csv", made.scores)
    settings = dict(epochs=8, lr=5e-3, warmup_epochs=1, batch_size=8, clip_num=4, val_fraction=0.3, seed=0)
    config, _ = resolve_config(made.cache.root, labels, tmp_path / "run", model="limssr", overrides=settings,
                               model_options={"llm": str(tiny_llm_folder), "variant": "project", "head_hidden": 16})
    result = train(config, device="cpu", progress=False, log=lambda message: None)

    assert result.finished and result.best["val_rho"] > 0.7
    best = load_run(result.run_dir, "cpu").best
    setting_rho = {row["setting"]: row["rho"] for row in best["val_settings"]["settings"]}
    assert setting_rho["{v,f,a}"] > 0.7 and best["val_settings"]["average"]["rho"] > 0.5
    assert all(rho > 0.2 for rho in setting_rho.values()), setting_rho  # each modality alone carries the score
    with open(result.run_dir / "train_log.csv", newline="") as handle:
        last_epoch = list(csv.DictReader(handle))[-1]
    assert float(last_epoch["val_rho"]) > 0.6  # the final weights too, not one lucky epoch
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["model"] == "limssr" and info["sequence_length"] > 3 * (4 + 2) + 4  # prompt + M (T + 2) + K
