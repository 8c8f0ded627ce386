"""The model contract (models/__init__.py): every registered model declares its settings in its config
class, and a third model added by one REGISTRY line trains, records and evaluates without the pipeline
naming it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from manifests.cache import FeatureCache
from models import REGISTRY, ModelConfig, config_class
from pipeline import data
from pipeline.inference import call_model, load_run
from pipeline.presets import PRESETS, Preset, get_preset
from pipeline.stages.train import train
from pipeline.train_config import MODEL_FLAGS, TRAINING_KEYS, TrainConfig, model_options_from_flags, resolve_config
from tests.synthetic import write_labels, write_synthetic_cache

PRESET_VALUES = {f.name for f in dataclasses.fields(Preset)}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_config_declares_settings_it_has(name):
    cls = config_class(name)
    assert issubclass(cls, ModelConfig) and cls.SCHEMA_VERSION >= 2
    settings = set(cls.settings())
    assert set(cls.training_defaults()) == set(TRAINING_KEYS)
    assert set(cls.FLAG_FIELDS) <= set(MODEL_FLAGS) and set(cls.FLAG_FIELDS.values()) <= settings
    assert all(set(fields) <= settings for fields in cls.ABLATIONS.values())
    assert set(cls.PRESET_FIELDS) <= PRESET_VALUES and set(cls.PRESET_FIELDS.values()) <= settings
    assert set(cls.PRESET_TRAINING) <= PRESET_VALUES & {f.name for f in dataclasses.fields(TrainConfig)}
    for targets in PRESETS.values():  # every preset gives the model training settings and fields it has
        for preset in targets.values():
            training, fields = cls.from_preset(preset)
            assert set(training) <= set(TRAINING_KEYS) | {"seed"} and set(fields) <= settings, (preset, training, fields)
    assert set(cls.PATH_FIELDS) <= settings and 0 < cls.GPUS_PER_RUN <= 1
    assert set(cls.device_defaults("cuda")) <= settings and set(cls.device_defaults("cpu")) <= settings


def test_declared_mappings_of_the_two_models():
    mcmoe, limssr = config_class("mcmoe"), config_class("limssr")
    assert model_options_from_flags("mcmoe", {"alpha": 0.5, "llm": None}, ["no-moe", "baseline"], []) == {
        "div_weight": 0.5, "use_moe": False, "baseline": True}
    assert model_options_from_flags("limssr", {"alpha": 0.5, "llm_dtype": "bfloat16"}, [], []) == {
        "alpha": 0.5, "torch_dtype": "bfloat16"}
    with pytest.raises(ValueError, match="--hidden does not apply to model 'limssr'"):
        model_options_from_flags("limssr", {"hidden": 8}, [], [])
    with pytest.raises(ValueError, match="model 'limssr' has no ablations"):
        model_options_from_flags("limssr", {}, ["no-stem"], [])
    with pytest.raises(ValueError, match=r"--ablation 'no-llm': choose from \['baseline'"):
        model_options_from_flags("mcmoe", {}, ["no-llm"], [])
    preset = get_preset("fisv", "TES")
    assert mcmoe.from_preset(preset)[1] == {"div_weight": 0.5, "position_encoding": False, "dropout": 0.3, "hidden": 256,
                                           "expert_stats_order": "reference"}
    # LIMSSR: the reference's Fis-V TES command, not MCMoE's published values
    assert limssr.from_preset(preset) == ({"epochs": 270, "lr": 2e-4, "min_lr_ratio": 0.1, "seed": 42}, {"dropout": 0.15})
    assert (mcmoe.GPUS_PER_RUN, limssr.GPUS_PER_RUN) == (0.25, 1.0)
    assert limssr.device_defaults("cuda") == {"torch_dtype": "bfloat16"} and limssr.device_defaults("cpu") == {}
    assert mcmoe.device_defaults("cuda") == {}


# ----------------------------------------------------------------------------- a third model


@dataclass
class ToyConfig(ModelConfig):
    """Per-modality linear read-outs of the time-mean, averaged over the available modalities."""

    SCHEMA_VERSION = 2
    ABLATIONS = {"no-bias": {"bias": False}}
    FLAG_FIELDS = {"dropout": "dropout"}
    PRESET_TRAINING = ("seed",)
    PRESET_FIELDS = {"dropout": "dropout"}
    GPUS_PER_RUN = 0.5

    modalities: list[str]
    feature_dims: dict[str, int]
    dropout: float = 0.0
    bias: bool = True

    @classmethod
    def training_defaults(cls) -> dict:
        return {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0, "batch_size": 4, "epochs": 2,
                "warmup_epochs": 0, "min_lr_ratio": 1.0, "grad_clip": None, "mask_policy": "any"}


class Toy(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config, self.modalities = config, list(config.modalities)
        self.heads = nn.ModuleDict({m: nn.Linear(config.feature_dims[m], 1, bias=config.bias) for m in self.modalities})
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, features, available, present=None):
        per = torch.stack([self.heads[m](self.dropout(features[m].mean(1))).squeeze(1) for m in self.modalities], 1)
        per = torch.where(available, per, 0.0)
        return {"score": torch.sigmoid(per.sum(1) / available.sum(1))}

    def loss(self, out, target, present, available):
        task = F.mse_loss(out["score"], target)
        return task, {"task": task.detach()}


def test_a_third_model_needs_only_its_module_and_a_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", (__name__, "ToyConfig", "Toy"))
    made = write_synthetic_cache(tmp_path / "cache", num_videos=10, length_range=(4, 6), absent={"vid001": ["audio"]})
    labels = write_labels(tmp_path / "labels.csv", made.scores)
    options = model_options_from_flags("toy", {"dropout": None}, ["no-bias"], [])
    config, preset = resolve_config(made.cache.root, labels, tmp_path / "run", model="toy", preset="fisv",
                                    action="TES", overrides={"clip_num": 4}, model_options=options)
    assert (config.lr, config.sources["lr"]) == (1e-2, "toy defaults")
    assert (config.seed, config.sources["seed"]) == (3, "preset fisv/TES")  # the toy takes the preset's seed
    assert (config.epochs, config.sources["epochs"]) == (2, "toy defaults")  # ... and not its epochs
    assert config.model_options == {"dropout": 0.3, "bias": False}
    assert config.sources["model.dropout"] == "preset fisv/TES" and config.sources["model.bias"] == "flag"

    result = train(config, preset, device="cpu", progress=False, log=lambda message: None)
    assert result.finished
    recorded = json.loads((result.run_dir / "model_config.json").read_text())
    assert recorded["model"] == "toy" and recorded["config"]["schema_version"] == 2
    assert recorded["config"]["bias"] is False and recorded["config"]["dropout"] == 0.3
    run = load_run(result.run_dir, device="cpu")
    assert isinstance(run.model, Toy) and run.model.heads["rgb"].bias is None
    samples = data.load_samples(FeatureCache.open(made.cache.root), ["vid001", "vid002"], made.scores)
    scores = run.scores(samples)
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= preset.score_range)).all()  # the preset's range


def test_call_model_passes_present_to_every_model():
    """One call for every model: no model is asked what its forward accepts."""
    seen = {}

    class Recorder(Toy):
        def forward(self, features, available, present=None):
            seen["present"] = present
            return super().forward(features, available, present)

    model = Recorder(ToyConfig(modalities=["rgb"], feature_dims={"rgb": 3}))
    present = torch.ones(2, 1, dtype=torch.bool)
    call_model(model, {"rgb": torch.randn(2, 4, 3)}, present, present)
    assert seen["present"] is present
