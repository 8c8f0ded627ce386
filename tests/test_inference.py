"""pipeline/inference.py, the layer below the stages: a run's predictions agree across its entry points,
and the stages depend only downward (no stage imports another's internals, the demo not the CLI).

Breaks that made the layering tests fail: `from pipeline.stages.train import _run_info` in import_checkpoint.py
(imports a stage, imports a private name); `from pipeline.extract import _return_free_heap` in score.py
(private name); `training._run_info` read in cli.py after `from pipeline import train as training`
(private name); a new pipeline/new_stage.py (no place); score.py importing extract_writer (a loop
part); data.py importing train, demo.py importing cli (stages); a pipeline/extraction/ package whose
module does `from ..train import _run_info` (a stage and a private name), while the same package with
only `from ..videos import VideoSource` passes. Since the CLI is a package: pipeline/cli/score.py left out
of CLI (no place); cli/score.py importing cli/extract.py (another command's module); cli/train.py importing
the evaluate stage, or reading `training._run_info` (private name); demo.py importing pipeline.cli (the CLI).
Since the stages moved into pipeline/stages/: a new pipeline/stages/new_stage.py (no place);
`from pipeline.stages.score import _stale_seconds` in stages/demo.py (private name); data.py importing
pipeline.stages.train (a stage); "videos" listed as a stage, and pipeline/videos.py moved to stages/ as a
shared module (the folders must show the layers)."""

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
# Every module of pipeline/ (subpackages too; named by its dotted path below pipeline/, "" for
# pipeline/__init__.py) has one place, and a new module fails until it is given one here.
# A stage may import the public names of the stages listed for it (their entry points), never the CLI.
STAGES: dict[str, set[str]] = {
    "stages.train": set(),
    "stages.evaluate": set(),
    "extraction.entry": set(),  # extract's public entry point (extract_into); the package's other modules are its loop
    "stages.importers": set(),
    "stages.import_checkpoint": set(),
    "stages.score": {"extraction.entry"},
    "extraction.on_ray": {"extraction.entry"},
    "stages.reproduce": {"stages.train", "stages.evaluate"},
    "stages.demo": {"stages.score"},
}
# The CLI (pipeline/cli/): the package lists the commands, each command's module wires the stages listed for
# it, common.py holds what several commands share. No other module imports the CLI, and no command's
# module imports another's.
CLI: dict[str, set[str]] = {
    "cli": set(),
    "cli.__main__": set(),
    "cli.common": set(),
    "cli.extract": {"extraction.entry", "extraction.on_ray"},
    "cli.train": {"stages.train"},
    "cli.evaluate": {"stages.evaluate"},
    "cli.import_features": {"stages.importers"},
    "cli.import_checkpoint": {"stages.import_checkpoint"},
    "cli.reproduce": {"stages.reproduce"},
    "cli.score": {"stages.score"},
    "cli.demo": {"stages.demo"},
}
# Below the stages: importable by any module, importing no stage. "" and "stages" are the packages'
# __init__.py files (pipeline/, pipeline/stages/), which import nothing so that loading one stage loads only it.
SHARED = {"", "stages", "data", "devices", "inference", "labels", "metrics", "presets", "progress", "provenance",
          "ray_session", "samples", "tables", "train_config", "train_state", "videos"}
# Folders in layer order: each may import only from the folders before it (README's folder table).
LAYERS = ("manifests", ("extractors", "models"), "pipeline")


def extraction_part(module: str) -> bool:
    """A module of the pipeline/extraction/ package: its entry points are stages (STAGES), the rest is
    extract's loop in parts, imported only inside the package and importing no stage."""
    return module.split(".")[0] == "extraction"


def place(module: str) -> str | None:
    """The place of `module`: "cli", "stage", "shared", "extraction" (a loop part) or None (none given)."""
    if module in CLI:
        return "cli"
    if module in STAGES:
        return "stage"
    if module in SHARED:
        return "shared"
    return "extraction" if extraction_part(module) else None


def pipeline_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name below pipeline/ -> file, for every .py file under pipeline/ at any depth."""
    modules = {}
    for path in sorted((root / "pipeline").rglob("*.py")):
        parts = path.relative_to(root / "pipeline").with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(module: str, modules: dict[str, Path]) -> set[tuple[str, str]]:
    """(imported module, name) for every use of pipeline code in `module`, name "*" for a whole module.

    Absolute and relative imports, at any depth in the file; `x._name` read from an imported module
    counts as importing `_name` from it."""
    path = modules[module]
    package = [p for p in module.split(".") if p]
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[tuple[str, str]] = set()
    bound: dict[str, str] = {}  # local name -> the pipeline module it holds ("" for `pipeline` itself)

    def below_pipeline(dotted: str) -> str | None:
        parts = dotted.split(".")
        return ".".join(parts[1:]) if parts[0] == "pipeline" else None

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = below_pipeline(alias.name)
                if target is not None:
                    found.add((target, "*"))
                    if alias.asname:
                        bound[alias.asname] = target
                    else:
                        bound["pipeline"] = ""
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                target = below_pipeline(node.module or "")
                if target is None:
                    continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}" if target else alias.name
                if submodule in modules:
                    found.add((submodule, "*"))
                    bound[alias.asname or alias.name] = submodule
                else:
                    found.add((target, alias.name))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, inner = [node.attr], node.value
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if not isinstance(inner, ast.Name) or inner.id not in bound:
            continue
        dotted = [p for p in bound[inner.id].split(".") if p] + chain[::-1]
        if ".".join(dotted) in modules:  # a module reached through its package: counted at its import
            continue
        for cut in range(len(dotted) - 1, -1, -1):  # the longest prefix naming a module, then its name
            if ".".join(dotted[:cut]) in modules:
                found.add((".".join(dotted[:cut]), dotted[cut]))
                break
    return {(target, name) for target, name in found if target != module}


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_every_pipeline_module_has_a_place():
    modules = pipeline_modules()
    unplaced = sorted(f"pipeline/{modules[m].relative_to(ROOT / 'pipeline')}" for m in modules if place(m) is None)
    assert not unplaced, \
        f"give {unplaced} a place in tests/test_inference.py: the CLI (CLI), a stage (STAGES) or shared (SHARED)"
    stale = sorted((set(CLI) | set(STAGES) | SHARED) - set(modules))
    assert not stale, f"CLI / STAGES / SHARED name modules that pipeline/ no longer has: {stale}"
    assert set().union(*STAGES.values(), *CLI.values()) <= set(STAGES)
    # The folders show the layers: the CLI in pipeline/cli/, stages in pipeline/stages/ (extract's in
    # pipeline/extraction/ with its loop), shared modules directly in pipeline/.
    assert all(m == "cli" or m.startswith("cli.") for m in CLI), f"the CLI belongs in pipeline/cli/: {sorted(CLI)}"
    elsewhere = sorted(m for m in STAGES if m.split(".")[0] not in {"stages", "extraction"})
    assert not elsewhere, f"stages belong in pipeline/stages/: {elsewhere}"
    nested = sorted(m for m in SHARED if "." in m)
    assert not nested, f"shared modules belong directly in pipeline/: {nested}"


def test_stages_depend_only_downward():
    """A stage or a CLI module imports only the stages listed for it; the extraction loop's parts are
    extract's alone; shared modules and the loop's parts import no stage; only the CLI imports the CLI,
    where a command's module imports from it only the package and common.py."""
    modules = pipeline_modules()
    for module, path in modules.items():
        where = path.relative_to(ROOT)
        used = {target for target, _ in imports_of(module, modules)}
        unknown = sorted(t for t in used if t not in modules)
        assert not unknown, f"{where} imports pipeline modules that do not exist: {unknown}"
        stages = {t for t in used if place(t) == "stage"}
        may_use = CLI[module] if module in CLI else STAGES.get(module, set())
        assert stages <= may_use, f"{where} imports the stages {sorted(stages - may_use)}"
        cli = sorted(t for t in used if place(t) == "cli")
        assert not cli or module in CLI, f"{where} imports the CLI {cli}"
        commands = [t for t in cli if t not in {"cli", "cli.common"}]
        assert module == "cli" or not commands, \
            f"{where} imports the command modules {commands}: what commands share goes in pipeline/cli/common.py"
        parts = sorted(t for t in used if place(t) == "extraction")
        if parts:
            assert extraction_part(module), \
                f"{where} imports extract's loop parts {parts}: use extract's public functions"


def test_no_module_imports_another_modules_private_names():
    modules = pipeline_modules()
    for module, path in modules.items():
        names = sorted(f"{t}.{name}" for t, name in imports_of(module, modules) if private(name))
        assert not names, f"{path.relative_to(ROOT)} imports private names {names}"


def test_module_discovery_reads_subpackages_and_relative_imports(tmp_path):
    files = {
        "pipeline/__init__.py": "",
        "pipeline/stages/__init__.py": "",
        "pipeline/stages/train.py": "def _run_info(): pass\n",
        "pipeline/extraction/__init__.py": "from .batcher import Batcher\n",
        "pipeline/extraction/batcher.py": "from ..stages.train import _run_info\nfrom . import events\n",
        "pipeline/extraction/events.py": "import pipeline.stages.train\npipeline.stages.train._run_info()\n",
        "pipeline/stages/score.py": "from .train import _run_info\nfrom pipeline import extraction as loop\n"
                                    "def f():\n    loop.batcher._x()\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = pipeline_modules(tmp_path)
    assert set(modules) == {"", "stages", "stages.train", "extraction", "extraction.batcher", "extraction.events",
                            "stages.score"}
    assert imports_of("extraction", modules) == {("extraction.batcher", "Batcher")}
    assert imports_of("extraction.batcher", modules) == {("stages.train", "_run_info"), ("extraction.events", "*")}
    assert imports_of("extraction.events", modules) == {("stages.train", "*"), ("stages.train", "_run_info")}
    assert imports_of("stages.score", modules) == {("stages.train", "_run_info"), ("extraction", "*"),
                                                   ("extraction.batcher", "_x")}
    assert place("extraction.batcher") == "extraction" and place("extraction") == "extraction"


def test_folders_import_only_lower_layers():
    allowed: set[str] = set()
    for layer in LAYERS:
        folders = (layer,) if isinstance(layer, str) else layer
        for folder in folders:
            for path in sorted((ROOT / folder).rglob("*.py")):
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
