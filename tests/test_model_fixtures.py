"""Model configs and a checkpoint written by an earlier version (tests/fixtures/models) still load to the
same configuration and give the same outputs, up to float32 rounding on another CPU (tests/fixture_numbers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models import build_model
from models.checkpoint import load_model, load_tensors, read_model_config
from models.limssr import LIMSSRConfig
from models.mcmoe import MCMoEConfig
from tests.fixture_numbers import assert_close_to_fixture

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"
DIMS = {"rgb": 8, "flow": 6, "audio": 4}
TINY = dict(hidden=16, encoder_layers=1, decoder_layers=1, generator_layers=1, encoder_heads=2,
            decoder_heads=2, generator_heads=2, dropout=0.1, div_weight=0.5)


def test_mcmoe_checkpoint_loads_to_the_same_config_and_outputs():
    name, recorded = read_model_config(FIXTURES / "mcmoe")
    assert name == "mcmoe"
    assert build_model(name, recorded).config == MCMoEConfig(modalities=list(DIMS), feature_dims=DIMS, **TINY)
    model = load_model(FIXTURES / "mcmoe")
    tensors, _ = load_tensors(FIXTURES / "mcmoe" / "inputs.safetensors")
    features = {m: tensors[f"features.{m}"] for m in DIMS}
    available, present, target = tensors["available"], tensors["present"], tensors["target"]
    with torch.no_grad():
        assert_close_to_fixture(model(features, available)["score"], tensors["eval_score"], "eval score")
    torch.manual_seed(5)
    model.train()
    out = model(features, available, present)
    total, terms = model.loss(out, target, present, available)
    assert_close_to_fixture(out["score"], tensors["train_score"], "train score")
    assert_close_to_fixture(total, tensors["train_loss"], "train loss")
    for key, value in terms.items():
        assert_close_to_fixture(value, tensors[f"train_{key}"], key)


def test_mcmoe_config_from_before_the_newer_settings_keeps_their_old_values():
    old = build_model(*read_model_config(FIXTURES / "mcmoe_old")).config
    assert (old.div_distance, old.projection_stats, old.recon_mean_over) == ("euclidean", "available", "imputed")
    assert old.prototype_encoding == "grade-index" and old.hidden == 16 and old.div_weight == 0.5


def test_limssr_configs_load_with_the_values_they_were_written_with():
    # Both files predate `variant`: their runs trained the project variant, the default then (reference now).
    expected = LIMSSRConfig(modalities=list(DIMS), feature_dims=DIMS, llm="tiny-llm", variant="project", lora_r=4,
                            head_hidden=16, num_fusion_tokens=2, mda_heads=2)
    recorded = json.loads((FIXTURES / "limssr" / "model_config.json").read_text())["config"]
    assert "variant" not in recorded and LIMSSRConfig.from_dict(recorded) == expected
    old = json.loads((FIXTURES / "limssr_old" / "model_config.json").read_text())["config"]
    assert LIMSSRConfig.from_dict(old).triplet_distance == "euclidean"
    assert LIMSSRConfig.from_dict(old) == LIMSSRConfig(**{**expected.__dict__, "triplet_distance": "euclidean"})


def test_limssr_variant_by_version():
    """A version-2 file (written between schema_version and the default change) without `variant` is a
    project run; a version-3 file without it gets today's default."""
    written = LIMSSRConfig(modalities=list(DIMS), feature_dims=DIMS, variant="project", lora_r=4).to_dict()
    assert written["schema_version"] == 3 and LIMSSRConfig.from_dict(written).variant == "project"
    del written["variant"]
    assert LIMSSRConfig.from_dict({**written, "schema_version": 2}).variant == "project"
    assert LIMSSRConfig.from_dict({**written, "schema_version": 2}).triplet_distance == "cosine"
    assert LIMSSRConfig.from_dict(written).variant == "reference"
    reference = LIMSSRConfig(modalities=list(DIMS), feature_dims=DIMS, variant="reference").to_dict()
    assert LIMSSRConfig.from_dict({**reference, "schema_version": 2}).variant == "reference"  # recorded wins


def test_configs_written_now_record_their_version_and_read_back_equal():
    config = MCMoEConfig(modalities=list(DIMS), feature_dims=DIMS, **TINY)
    written = json.loads(json.dumps(config.to_dict()))
    assert written["schema_version"] == 2 and MCMoEConfig.from_dict(written) == config
    del written["div_distance"]  # a version-2 file without a setting: today's default, not the legacy value
    assert MCMoEConfig.from_dict(written).div_distance == "cosine"
