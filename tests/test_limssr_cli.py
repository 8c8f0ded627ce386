"""LIMSSR through the command line: train -> evaluate -> score on extracted clips, what a run saves,
exact reloading, resume, the incomplete-training comparison with MCMoE, and the offline errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models import build_model
from models.checkpoint import read_model_config
from models.tiny_llm import save_tiny_llm
from pipeline import data
from pipeline.cli import main
from pipeline.inference import load_run
from pipeline.metrics import mse, spearman_rho
from tests.synthetic import write_labels, write_synthetic_cache

# the project variant: what a run holds (marker rows, no embedding matrix) is its design
LIMSSR = ["--model", "limssr", "--limssr-variant", "project", "--model-option", "head_hidden=16", "--device", "cpu",
          "--quiet"]
SMALL_RUN = ["--epochs", "2", "--batch-size", "4", "--clip-num", "4", "--lr", "5e-3", "--warmup-epochs", "1"]
MCMOE = ["--model", "mcmoe", "--hidden", "16", "--model-option", "encoder_layers=1", "--model-option",
         "decoder_layers=1", "--model-option", "generator_heads=2", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """24 videos of shared-latent features, vid002 without audio and vid005 without flow in the data;
    the last 6 are split=test."""
    root = tmp_path_factory.mktemp("limssr_synthetic")
    made = write_synthetic_cache(root / "cache", num_videos=24, length_range=(4, 6), seed=2, noise=0.5,
                                 absent={"vid002": ["audio"], "vid005": ["flow"]})
    splits = {v: ("test" if i >= 18 else "train") for i, v in enumerate(made.video_ids)}
    return made, write_labels(root / "labels.csv", made.scores, splits)


@pytest.fixture(scope="module")
def wide_vocab_llm(tmp_path_factory):
    """A tiny LLM whose size is mostly its embedding matrix (spare rows, as in Qwen's), so that a run
    holding any base weight would show in the file size, as it would with a real LLM."""
    return save_tiny_llm(tmp_path_factory.mktemp("wide_vocab_llm"), hidden_size=32, num_heads=4, num_kv_heads=2,
                         vocab_multiple=8192)


def train_command(made, labels, out, llm, *extra) -> list[str]:
    return ["train", "--features", str(made.cache.root), "--labels", str(labels), "--out", str(out),
            "--llm", str(llm), *LIMSSR, *SMALL_RUN, *extra]


@pytest.fixture(scope="module")
def synthetic_run(synthetic, wide_vocab_llm, tmp_path_factory):
    made, labels = synthetic
    run = tmp_path_factory.mktemp("limssr_runs") / "straight"
    assert main(train_command(made, labels, run, wide_vocab_llm)) == 0
    return run


def test_train_evaluate_and_score_a_clip(extracted_clips, tiny_llm_folder, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.chdir(tiny_llm_folder.parent)  # --llm as a path relative to the working folder
    code = main(["train", "--features", str(extracted_clips.cache), "--labels", str(extracted_clips.labels),
                 "--out", str(run), "--llm", tiny_llm_folder.name, *LIMSSR, "--epochs", "2", "--batch-size", "4",
                 "--llm-dtype", "bfloat16", "--gradient-checkpointing"])
    assert code == 0
    out = capsys.readouterr()
    assert "best epoch" in out.out and "LLM sequence length" in out.err
    config = read_model_config(run)[1]
    assert config["llm"] == str(tiny_llm_folder.resolve())
    assert config["torch_dtype"] == "bfloat16" and config["gradient_checkpointing"] is True
    monkeypatch.chdir(tmp_path)  # evaluate and score from elsewhere

    assert main(["evaluate", "--run", str(run), "--labels", str(extracted_clips.labels), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "{v,f,a}" in out.out and "Average" in out.out and "limssr run" in out.err
    evaluation = json.loads((run / "evaluation" / "eval-labels.json").read_text())
    assert evaluation["model"] == "limssr" and evaluation["num_videos"] == 2
    assert [row["setting"] for row in evaluation["table"]][-2:] == ["Average", "{v,f,a}"]

    scores_csv = tmp_path / "scores.csv"
    code = main(["score", str(extracted_clips.unseen), "--run", str(run), "--out", str(scores_csv),
                 "--device", "cpu", "--quiet"])
    assert code == 0 and "unseen.mp4" in capsys.readouterr().out
    row = pd.read_csv(scores_csv).iloc[0]
    assert row["present"] == "rgb,flow" and row["imputed"] == "audio" and pd.isna(row["error"])
    score_range = json.loads((run / "run.json").read_text())["score_range"]
    assert 0 <= row["score"] <= score_range
    assert not any(column.startswith("grade_") for column in pd.read_csv(scores_csv).columns)  # MCMoE only


def test_a_run_holds_adapters_new_tokens_and_heads_but_no_base_weight(synthetic_run, wide_vocab_llm):
    with safe_open(str(wide_vocab_llm / "model.safetensors"), framework="pt") as handle:
        base_names = [name.removeprefix("model.") for name in handle.keys()]
    for path in (synthetic_run / "best.safetensors", synthetic_run / "last" / "model.safetensors"):
        names = list(load_file(path))
        assert "new_token_embeddings" in names and any("lora_A" in name for name in names)
        assert all("lora_" in name for name in names if name.startswith("llm."))
        assert not [name for name in names if any(name.endswith("." + base) for base in base_names)]
        assert path.stat().st_size < (wide_vocab_llm / "model.safetensors").stat().st_size / 10
    _, config = read_model_config(synthetic_run)
    assert config["llm"] == str(wide_vocab_llm.resolve())  # the run names its base LLM


def test_reloading_a_run_reproduces_its_scores_exactly(synthetic_run, synthetic):
    made, _ = synthetic
    info = json.loads((synthetic_run / "run.json").read_text())
    val = data.load_samples(made.cache, info["splits"]["val"], made.scores)
    truth = np.array([sample.score for sample in val])
    batch_size = info["config"]["batch_size"]
    scores = []
    for seed in (11, 12):  # different random initial states of everything the checkpoint must overwrite
        torch.manual_seed(seed)
        scores.append(load_run(synthetic_run, "cpu").scores(val, batch_size=batch_size))
    assert np.array_equal(scores[0], scores[1])
    # the numbers the trainer measured on the live model at the chosen epoch, before anything was saved
    best = load_run(synthetic_run, "cpu").best
    assert mse(scores[0], truth) == best["val_mse"] and spearman_rho(scores[0], truth) == best["val_rho"]

    torch.manual_seed(13)
    untrained = load_run(synthetic_run, "cpu")
    untrained.model = build_model(*read_model_config(synthetic_run)).eval()
    assert not np.array_equal(untrained.scores(val, batch_size=batch_size), scores[0])


def test_resume_continues_exactly(synthetic, wide_vocab_llm, synthetic_run, tmp_path):
    made, labels = synthetic
    run = tmp_path / "resumed"
    assert main(train_command(made, labels, run, wide_vocab_llm, "--stop-after-epochs", "1")) == 0
    assert json.loads((run / "last" / "state.json").read_text())["epoch"] == 1
    assert main(["train", "--out", str(run), "--resume", "--device", "cpu", "--quiet"]) == 0
    for name in ("best.safetensors", "last/model.safetensors", "last/optimizer.safetensors", "last/rng.safetensors"):
        straight, resumed = load_file(synthetic_run / name), load_file(run / name)
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight), name
    for name in ("train_log.csv", "best.json"):
        assert (synthetic_run / name).read_text() == (run / name).read_text(), name


def test_train_missing_gives_limssr_and_mcmoe_the_same_incomplete_training_set(synthetic, tiny_llm_folder,
                                                                                 tmp_path, capsys):
    made, labels = synthetic
    runs = {
        "limssr": train_command(made, labels, tmp_path / "limssr", tiny_llm_folder),
        "mcmoe": ["train", "--features", str(made.cache.root), "--labels", str(labels),
                  "--out", str(tmp_path / "mcmoe"), *MCMOE, *SMALL_RUN],
    }
    recorded = {}
    for name, command in runs.items():
        assert main([*command, "--train-missing", "audio=0.4,flow=0.2"]) == 0, name
        recorded[name] = json.loads((tmp_path / name / "run.json").read_text())
        assert main(["evaluate", "--run", str(tmp_path / name), "--labels", str(labels), "--device", "cpu"]) == 0
        evaluation = json.loads((tmp_path / name / "evaluation" / "eval-labels.json").read_text())
        assert evaluation["model"] == name and len(evaluation["table"]) == 8  # 6 incomplete, Average, full
        assert all(row["n"] == 6 for row in evaluation["table"] if row["setting"] != "Average")
    capsys.readouterr()

    limssr, mcmoe = recorded["limssr"], recorded["mcmoe"]
    assert limssr["splits"] == mcmoe["splits"] and limssr["train_missing"] == mcmoe["train_missing"]
    hidden = limssr["train_missing"]["hidden"]
    assert {m for hidden_here in hidden.values() for m in hidden_here} == {"audio", "flow"}
    # genuinely absent in the data as well, on top of the simulated missingness
    assert limssr["absent_in_data"] == mcmoe["absent_in_data"] == {"vid002": ["audio"], "vid005": ["flow"]}


def test_offline_hub_id_without_weights_is_a_usage_error(synthetic, tmp_path, monkeypatch, capsys):
    made, labels = synthetic
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache: nothing to find offline
    run = tmp_path / "run"
    assert main(train_command(made, labels, run, "nobody/not-a-model")) == 2
    err = capsys.readouterr().err
    assert "'nobody/not-a-model'" in err and "--llm" in err and "Traceback" not in err
    assert not run.exists()  # nothing half-made to clean up


def test_a_run_whose_base_llm_is_gone_is_a_usage_error(synthetic_run, synthetic, tmp_path, capsys):
    made, labels = synthetic
    moved = tmp_path / "run"
    shutil.copytree(synthetic_run, moved)
    name, config = read_model_config(moved)
    gone = tmp_path / "deleted_llm"
    (moved / "model_config.json").write_text(json.dumps({"model": name, "config": {**config, "llm": str(gone)}}))
    assert main(["evaluate", "--run", str(moved), "--labels", str(labels), "--device", "cpu"]) == 2
    assert str(gone) in capsys.readouterr().err
    assert main(["score", str(tmp_path / "clip.mp4"), "--run", str(moved), "--device", "cpu", "--quiet"]) == 2
    assert str(gone) in capsys.readouterr().err


def test_evaluate_keeps_library_noise_off_the_terminal(synthetic, synthetic_run, capfd):
    """transformers' loading bar and the peft/transformers FutureWarning stay out of the output."""
    _, labels = synthetic
    assert main(["evaluate", "--run", str(synthetic_run), "--labels", str(labels), "--device", "cpu"]) == 0
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "Warning" not in captured.err
    assert "{v,f,a}" in captured.out


@pytest.mark.parametrize("llm_dtype", ["float32", "bfloat16"])
def test_bf16_training_runs_with_either_llm_dtype(synthetic, tiny_llm_folder, tmp_path, llm_dtype):
    from pipeline.devices import native_bf16

    if not native_bf16(torch.device("cpu")):
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX: `pipeline train --precision bf16` is refused here")
    made, labels = synthetic
    run = tmp_path / llm_dtype
    assert main(train_command(made, labels, run, tiny_llm_folder, "--precision", "bf16", "--llm-dtype", llm_dtype)) == 0
    assert json.loads((run / "run.json").read_text())["config"]["precision"] == "bf16"
    log = pd.read_csv(run / "train_log.csv")
    assert np.isfinite(log[["loss", "task", "triplet", "consistency"]].to_numpy()).all()
    saved = load_file(run / "best.safetensors")  # the trained parts stay float32 whatever the LLM's dtype
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.float32}
