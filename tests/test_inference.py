"""pipeline/inference.py, the layer below the stages: a run's predictions agree across its entry points,
and the stages depend only downward (no stage imports another's internals, the demo not the CLI)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch

from manifests.cache import FeatureCache
from pipeline import data
from pipeline.inference import load_run
from pipeline.labels import read_labels

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "rundir"
STAGES = ("train", "evaluate", "score", "reproduce", "extraction", "importers", "import_checkpoint",
          "demo", "cli")
# Folders in layer order: each may import only from the folders before it (README's folder table).
LAYERS = ("manifests", ("extractors", "models"), "pipeline")


def imports_of(module: str) -> set[tuple[str, str]]:
    """(module, name) for every `from pipeline.X import name` and `import pipeline.X` in pipeline/<module>.py."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / "pipeline" / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":  # from pipeline import data
            found |= {(alias.name, "*") for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline."):
            found |= {(node.module.split(".")[1], alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {(a.name.split(".")[1], "*") for a in node.names if a.name.startswith("pipeline.")}
    return found


def test_stages_depend_only_downward():
    allowed = {  # the orchestrators may run the stages through their public functions
        "inference": set(),
        "train": set(),
        "evaluate": set(),
        "score": {"extraction"},
        "reproduce": {"train", "evaluate"},
        "demo": {"score"},
    }
    for module, may_use in allowed.items():
        used = imports_of(module)
        stages = {m for m, _ in used if m in STAGES and m != module}
        assert stages <= may_use, f"pipeline/{module}.py imports the stages {sorted(stages - may_use)}"
        private = sorted(f"{m}.{name}" for m, name in used if m in STAGES and name.startswith("_"))
        assert not private, f"pipeline/{module}.py imports private names {private}"


def test_shared_modules_import_no_stage_and_folders_import_only_lower_layers():
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        if path.stem not in STAGES and path.stem != "__init__":
            stages = sorted({m for m, _ in imports_of(path.stem) if m in STAGES})
            assert not stages, f"pipeline/{path.name} sits below the stages but imports {stages}"
    allowed: set[str] = set()
    for layer in LAYERS:
        folders = (layer,) if isinstance(layer, str) else layer
        for folder in folders:
            for path in sorted((ROOT / folder).glob("*.py")):
                for node in ast.walk(ast.parse(path.read_text())):
                    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                        [a.name for a in node.names] if isinstance(node, ast.Import) else []
                    for name in names:
                        top = name.split(".")[0]
                        if top in {"manifests", "extractors", "models", "pipeline"} and top != folder:
                            assert top in allowed, f"{folder}/{path.name} imports {name}, a layer above it"
        allowed |= set(folders)


def test_a_runs_entry_points_agree():
    run = load_run(FIXTURE / "run", "cpu")
    labels = read_labels(FIXTURE / "labels.csv")
    samples = data.load_samples(FeatureCache.open(FIXTURE / "cache"), labels.video_ids, labels.scores)
    predicted = np.array([score for score, _ in run.predict(samples)])
    np.testing.assert_array_equal(predicted, run.scores(samples))
    outputs = run.forward(samples)
    np.testing.assert_array_equal(outputs["score"].double().numpy() * run.score_range, predicted)
    # a modality masked out by `available` is also zeroed: the model cannot see it
    rgb_only = torch.tensor([[m == "rgb" for m in run.modalities]] * len(samples))
    np.testing.assert_array_equal(run.forward(samples, rgb_only)["score"].double().numpy() * run.score_range,
                                  run.scores(samples, subset=["rgb"]))
    evaluation = run.evaluate(samples)
    np.testing.assert_array_equal(evaluation.predictions["{v,f,a}"], predicted)
