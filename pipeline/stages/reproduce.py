"""`pipeline reproduce`: a benchmark's Table 1 block, every action / score type x every seed, in one command.

Inputs
    --features CACHE   one feature cache for every action, or a folder of caches: what
                       `pipeline import-features` writes (one cache per RG apparatus, one for Fis-V,
                       one for FS1000)
    --labels-dir DIR   one `<action>.csv` per action (Ball.csv, TES.csv, ...; the name matched without
                       regard to case), `video_id,score,split` with train (and optionally val) rows to
                       train on and test rows to evaluate. Without it, each cache's own
                       `labels/<action>.csv` is used: exactly what import-features writes, so
                       import-features -> reproduce needs no renaming.
    An action's cache is the only cache; else the one holding labels/<action>.csv; else the one whose
    config.json names the action as its `subset` (the RG importer records the apparatus there).

Runs: each (action, seed) is a normal `pipeline train` run folder, OUT/<action>/seed<k>/, trained as a
Ray task holding `gpus_per_run` of a GPU (several small MCMoE runs share one) and `cpus_per_run`
cores; its log goes to OUT/logs/<action>/seed<k>.log. The checkpoint is chosen on validation as in
every run; the test rows only evaluate it (OUT/<action>/seed<k>/evaluation/test.*). A finished run
(every epoch done, best.safetensors written) is not retrained and an evaluated one not re-evaluated;
a run cut short resumes from its last finished epoch (train --resume), also when Ray retries a task
whose worker died; a folder holding a run with other settings is an error, never silently reused.

Aggregation (OUT/table.csv, table.json, table.md, rho.png):
- per action and setting: mean and sample standard deviation (ddof 1) over seeds, of rho and of MSE,
  both arithmetic: seeds are repeated measurements of one number, and "mean +/- std" should describe
  the numbers a reader finds in the per-run files. Seeds whose value is undefined (NaN rho: constant
  predictions) are left out of a cell, which then records fewer seeds.
- the dataset row combines the actions within each seed as the papers do (Fisher-z mean of rho,
  arithmetic mean of MSE: pipeline.metrics), then takes mean +/- std over the seeds that have every
  action. The Average column is each run's own (Fisher-z over its incomplete settings).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from manifests.cache import CONFIG_NAME, CacheError, FeatureCache
from manifests.run import RunDir, describe_differences, differing_settings
from models import config_class
from pipeline.labels import LabelError, read_labels
from pipeline.metrics import fisher_z_mean, mean_mse
from pipeline.provenance import headline, provenance, save_figure
from pipeline.presets import PRESETS, get_preset
from pipeline.progress import progress_bar
from pipeline.tables import Block, Table, markdown_text, write_table

AVERAGE = "Average"


class ReproduceError(ValueError):
    """The inputs or the output folder do not fit a reproduction; the message names the file."""


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ActionInputs:
    action: str  # the preset's spelling (Ball, TES, ...)
    features: Path  # one cache configuration folder
    labels: Path


def _caches(features: Path) -> list[Path]:
    if (features / CONFIG_NAME).is_file():
        return [features]
    found = sorted(p.parent for p in features.glob(f"*/{CONFIG_NAME}"))
    if not found:
        raise ReproduceError(f"{features} holds no feature cache (no {CONFIG_NAME} in it or in a sub-folder)")
    return found


def _labels_file(folder: Path, action: str) -> Path | None:
    if not folder.is_dir():
        return None
    matches = sorted(p for p in folder.glob("*.csv") if p.stem.lower() == action.lower())
    if len(matches) > 1:
        raise ReproduceError(f"{folder}: several labels files for {action}: {[p.name for p in matches]}")
    return matches[0] if matches else None


def _subset(cache: Path) -> str:
    return str(FeatureCache(cache).read_config().get("subset") or "").lower()


def find_inputs(preset: str, features: Path, labels_dir: Path | None = None, actions: list[str] | None = None) -> list[ActionInputs]:
    """The cache and labels file of every action of `preset` (or of `actions`); all problems at once."""
    if preset not in PRESETS:
        raise ReproduceError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    targets = list(PRESETS[preset])
    if actions:
        try:
            targets = [get_preset(preset, a).target for a in actions]
        except ValueError as exc:
            raise ReproduceError(str(exc)) from None
    features = Path(features).expanduser()
    caches = _caches(features)
    found, problems = [], []
    for action in targets:
        if len(caches) == 1:
            chosen = caches
        else:
            chosen = [c for c in caches if _labels_file(c / "labels", action)] or [c for c in caches if _subset(c) == action.lower()]
        if len(chosen) != 1:
            problems.append(f"{action}: {'several' if chosen else 'none'} of the {len(caches)} caches in {features} "
                            f"hold labels/{action}.csv or are its subset; pass that action's cache folder")
            continue
        folder = Path(labels_dir).expanduser() if labels_dir else chosen[0] / "labels"
        labels = _labels_file(folder, action)
        if labels is None:
            problems.append(f"{action}: no {action}.csv in {folder}")
            continue
        try:
            table = read_labels(labels)
        except LabelError as exc:
            problems.append(str(exc))
            continue
        if table.splits is None or not table.ids_in_split("test") or not table.ids_in_split("train"):
            problems.append(f"{labels}: needs a split column with train and test rows (val rows optional); "
                            "the test rows are what the table reports")
            continue
        found.append(ActionInputs(action, chosen[0], labels))
    if problems:
        raise ReproduceError("cannot set up the reproduction:\n" + "\n".join(f"  {p}" for p in problems))
    return found


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class RunSpec:
    action: str
    seed: int
    run_dir: Path
    labels: Path
    preset: str
    config: dict[str, Any]  # TrainConfig.to_dict()
    log: Path


def plan_runs(
    inputs: list[ActionInputs],
    preset: str,
    seeds: list[int],
    out: Path,
    model: str = "mcmoe",
    overrides: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
) -> list[RunSpec]:
    """Resolve every run's settings exactly as `pipeline train --preset P --action A --seed K` would."""
    from pipeline.train_config import resolve_config

    out = Path(out).expanduser()
    specs = []
    for item in inputs:
        for seed in seeds:
            run_dir = out / item.action / f"seed{seed}"
            config, _ = resolve_config(item.features, item.labels, str(run_dir), model, preset, item.action,
                                       {**(overrides or {}), "seed": seed}, model_options)
            specs.append(RunSpec(item.action, seed, run_dir, item.labels, preset, config.to_dict(),
                                 out / "logs" / item.action / f"seed{seed}.log"))
    return specs


def run_state(spec: RunSpec) -> str:
    """"new", "partial" (resume it) or "finished"; a folder with another run in it is an error."""
    from pipeline.train_config import recorded_settings

    folder = RunDir(spec.run_dir)
    if not folder.has_run():
        if folder.holds_other_files():  # a lock alone: a train killed early
            raise ReproduceError(f"{folder.path} holds files but no {folder.RUN}: not a run folder; move it away")
        return "new"
    record = folder.read_record()
    differ = differing_settings(recorded_settings(folder, record), spec.config)
    if differ:
        raise ReproduceError(f"{folder.path} holds a run with other settings ({describe_differences(differ)}); "
                             "use another --out or remove that folder")
    # not finished: resume it (also when killed after the last epoch, before its closing validation pass)
    return "finished" if folder.is_finished(record) else "partial"


def evaluation_file(run_dir: Path) -> Path:
    return RunDir(run_dir).evaluation("test").with_suffix(".json")


def is_evaluated(run_dir: Path) -> bool:
    path, weights = evaluation_file(run_dir), RunDir(run_dir).weights()
    return path.is_file() and weights.is_file() and path.stat().st_mtime >= weights.stat().st_mtime


def evaluate_run(run_dir: Path, labels_path: Path, device: str = "auto", log: Callable[[str], None] = lambda m: None) -> Path:
    """The run's chosen checkpoint on the test rows of its labels: evaluation/test.{csv,json,predictions.csv}."""
    from pipeline.stages.evaluate import evaluate_labels

    result = evaluate_labels(run_dir, labels_path, split="test", out=RunDir(run_dir).evaluation("test"), device=device,
                             say=log, show=log)
    return result.json_path


def train_and_evaluate(spec: RunSpec, device: str = "auto", threads: int | None = None) -> dict[str, Any]:
    """Train (or resume) one run unless finished, evaluate it unless evaluated; the body of a Ray task.

    A problem of this run (bad labels, a non-finite loss, ...) comes back as the outcome's error
    rather than an exception, so the other runs and the table go on."""
    from pipeline.inference import RunError
    from pipeline.stages.train import train
    from pipeline.train_config import TrainConfig, TrainError

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    outcome: dict[str, Any] = {"action": spec.action, "seed": spec.seed, "run_dir": str(spec.run_dir),
                               "status": None, "error": None, "table": None}
    spec.log.parent.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        with spec.log.open("a") as handle:
            handle.write(message + "\n")

    try:
        state = run_state(spec)
        if state != "finished":
            config = TrainConfig.from_dict(spec.config, source=f"the plan of run {spec.run_dir}")
            result = train(config, get_preset(spec.preset, spec.action), resume=state == "partial", device=device,
                           progress=False, log=log)
            outcome["best"] = result.best
        outcome["status"] = {"new": "trained", "partial": "resumed", "finished": "already trained"}[state]
        if not is_evaluated(spec.run_dir):
            evaluate_run(spec.run_dir, spec.labels, device, log)
        outcome["table"] = json.loads(evaluation_file(spec.run_dir).read_text())["table"]
    except (TrainError, LabelError, CacheError, RunError, ReproduceError, ValueError, FileNotFoundError) as exc:
        outcome["error"] = f"{type(exc).__name__}: {exc}"
        log(f"error: {outcome['error']}")
    return outcome


def finished_outcome(spec: RunSpec) -> dict[str, Any]:
    table = json.loads(evaluation_file(spec.run_dir).read_text())["table"]
    return {"action": spec.action, "seed": spec.seed, "run_dir": str(spec.run_dir), "status": "skipped (finished)",
            "error": None, "table": table}


# --------------------------------------------------------------------------- running them all


def run_in_process(specs: list[RunSpec], device: str = "auto", progress: bool = True) -> list[dict[str, Any]]:
    """One run after another in this process (`--ray none`)."""
    outcomes = []
    for spec in progress_bar(iterable=specs, desc="runs", unit="run", disable=not progress, dynamic_ncols=True):
        outcomes.append(train_and_evaluate(spec, device))
    return outcomes


def run_on_ray(
    specs: list[RunSpec],
    resources: dict[str, float],
    model: str = "mcmoe",
    device: str = "auto",
    gpus_per_run: float | None = None,
    cpus_per_run: float = 1.0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every run as a Ray task (Ray must be initialised: ray_session). A task whose worker dies is
    retried by Ray and resumes the run from its last finished epoch."""
    import ray
    from ray.exceptions import RayError

    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if gpus_per_run is None:  # the model's share (LIMSSR carries an LLM: a GPU each; four MCMoE runs share one)
        gpus_per_run = config_class(model).GPUS_PER_RUN if gpus >= 1 and device != "cpu" else 0.0
    if gpus_per_run < 0 or gpus_per_run > max(gpus, 0) or (gpus_per_run > 1 and gpus_per_run != int(gpus_per_run)):
        raise ReproduceError(f"--gpus-per-run {gpus_per_run:g}: the Ray cluster has {gpus:g} GPU(s); "
                             "use a fraction up to 1, or a whole number of GPUs it has")
    if device == "cuda" and gpus_per_run == 0:
        raise ReproduceError("--device cuda needs --gpus-per-run > 0 (and GPUs in the Ray cluster)")
    if not 0 < cpus_per_run <= cpus:
        raise ReproduceError(f"--cpus-per-run {cpus_per_run:g}: the Ray cluster has {cpus:g} CPU(s)")
    run_device = device if device != "auto" else ("cuda" if gpus_per_run > 0 else "cpu")
    task = ray.remote(train_and_evaluate).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=2)
    threads = max(1, int(cpus_per_run))
    pending = {task.remote(spec, run_device, threads): spec for spec in specs}
    outcomes = []
    with progress_bar(total=len(specs), desc="runs", unit="run", disable=not progress, dynamic_ncols=True) as bar:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ref)
            try:
                outcome = ray.get(ref)
            except RayError as exc:  # an unexpected crash inside the run, or its worker lost for good
                outcome = {"action": spec.action, "seed": spec.seed, "run_dir": str(spec.run_dir), "status": None,
                           "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}",
                           "table": None}
            outcomes.append(outcome)
            bar.update(1)
            bar.set_postfix(failed=sum(1 for o in outcomes if o["error"]), refresh=False)
    return outcomes


# --------------------------------------------------------------------------- the table


def _cell(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else float("nan")
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")
    return {"mean": mean, "std": std, "seeds": len(finite)}


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def aggregate(outcomes: list[dict[str, Any]], actions: list[str], dataset: str) -> dict[str, Any]:
    """Rows (one per action, then the dataset) x settings, each {rho, mse: {mean, std, seeds}}."""
    done = [o for o in outcomes if o.get("table")]
    if not done:
        raise ReproduceError("no run finished and was evaluated: nothing to aggregate")
    settings = [c["setting"] for c in done[0]["table"]]
    # values[action][seed][setting] = (rho, mse)
    values: dict[str, dict[int, dict[str, tuple[float, float]]]] = {a: {} for a in actions}
    for outcome in done:
        values[outcome["action"]][outcome["seed"]] = {
            c["setting"]: (_number(c["rho"]), _number(c["mse"])) for c in outcome["table"]
        }
    rows = []
    for action in actions:
        seeds = sorted(values[action])
        rows.append({
            "scope": "action", "name": action, "seeds": seeds,
            "settings": {s: {"rho": _cell([values[action][k][s][0] for k in seeds]),
                             "mse": _cell([values[action][k][s][1] for k in seeds])} for s in settings},
        })
    complete = sorted(set.intersection(*(set(values[a]) for a in actions))) if actions else []
    per_seed = {
        k: {s: (fisher_z_mean(values[a][k][s][0] for a in actions), mean_mse(values[a][k][s][1] for a in actions))
            for s in settings}
        for k in complete
    }
    rows.append({
        "scope": "dataset", "name": f"{dataset}: all actions", "seeds": complete,
        "settings": {s: {"rho": _cell([per_seed[k][s][0] for k in complete]),
                         "mse": _cell([per_seed[k][s][1] for k in complete])} for s in settings},
    })
    return {
        "settings": settings,
        "rows": rows,
        "aggregation": {
            "over_seeds": "arithmetic mean and sample standard deviation (ddof=1) of rho and of MSE; "
                          "a seed with an undefined value is left out of that cell",
            "dataset_row": "within each seed, Fisher-z mean of rho and arithmetic mean of MSE over the actions; "
                           "then mean and std over the seeds that have every action",
            "average_column": "each run's own: Fisher-z mean of rho and mean of MSE over the incomplete settings",
            "selection": "each run's checkpoint chosen on its validation split; test rows only evaluate it",
        },
    }


def _show(cell: dict[str, Any], digits: int, total: int) -> str:
    if math.isnan(cell["mean"]):
        return "n/a"
    text = f"{cell['mean']:.{digits}f}" + ("" if math.isnan(cell["std"]) else f" ± {cell['std']:.{digits}f}")
    return text + (f" (n={cell['seeds']})" if cell["seeds"] < total else "")


def result_table(table: dict[str, Any], meta: dict[str, Any], title: str, made: dict[str, dict[str, Any]]) -> Table:
    """The aggregate as a pipeline.tables Table: long-form rows (scope, name, setting, rho and MSE
    mean / std / seeds; each row with its own features' provenance), the nested table and `meta` for
    JSON, and for Markdown one wide table per metric. `made`: pipeline.provenance by row name."""
    plain = lambda v: None if math.isnan(v) else v  # noqa: E731 (an empty cell)
    rows = []
    for row in table["rows"]:
        for setting in table["settings"]:
            rho, error = row["settings"][setting]["rho"], row["settings"][setting]["mse"]
            rows.append({"scope": row["scope"], "name": row["name"], "setting": setting,
                         "rho_mean": plain(rho["mean"]), "rho_std": plain(rho["std"]),
                         "mse_mean": plain(error["mean"]), "mse_std": plain(error["std"]),
                         "seeds_rho": rho["seeds"], "seeds_mse": error["seeds"], **made[row["name"]]})
    blocks = []
    for metric, label, digits in (("rho", "Spearman rho", 3), ("mse", "MSE", 2)):
        body = [[f"**{row['name']}**" if row["scope"] == "dataset" else row["name"],
                 *(_show(row["settings"][s][metric], digits, len(row["seeds"])) for s in table["settings"])]
                for row in table["rows"]]
        blocks.append(Block(["", *table["settings"]], body, caption=f"{label}, mean ± std over seeds"))
    overall = made[table["rows"][-1]["name"]]  # the dataset row: every action's features
    return Table(title, overall, rows, context={**meta, **table}, rows_key=None, blocks=blocks)


def write_results(out: Path, table: Table, aggregate: dict[str, Any]) -> list[Path]:
    """OUT/table.csv (long form), table.json (everything), table.md, rho.png; all carry random_weights
    and the config hash."""
    out = Path(out)
    paths = [write_table(table, out / name) for name in ("table.csv", "table.json", "table.md")]
    plot_rho(out / "rho.png", aggregate, table.what, table.made)
    return [*paths, out / "rho.png"]


def plot_rho(path: Path, table: dict[str, Any], title: str, made: dict[str, Any]) -> None:
    """Bars of rho per setting, one colour per action and one for the dataset, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    settings, rows = table["settings"], table["rows"]
    width = 0.8 / len(rows)
    figure, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(settings) + 2), 3.8))
    for i, row in enumerate(rows):
        means = [row["settings"][s]["rho"]["mean"] for s in settings]
        stds = [0.0 if math.isnan(row["settings"][s]["rho"]["std"]) else row["settings"][s]["rho"]["std"] for s in settings]
        positions = np.arange(len(settings)) + (i - (len(rows) - 1) / 2) * width
        ax.bar(positions, np.nan_to_num(means), width, yerr=stds, capsize=2, label=row["name"],
               hatch="//" if row["scope"] == "dataset" else None, edgecolor="black", linewidth=0.4)
    ax.set_xticks(np.arange(len(settings)), settings, fontsize=8)
    ax.set_ylabel("Spearman rho (mean ± std over seeds)", fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.6)
    if made["random_weights"]:
        ax.set_title(f"RANDOM-WEIGHT BACKBONES (features {made['config_hash']}): not a result\n{title}",
                     fontsize=9, color="red")
    else:
        ax.set_title(f"{title} (features {made['config_hash']})", fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, len(rows)), loc="lower right")
    figure.tight_layout()
    save_figure(path, figure, headline(title, made))
    plt.close(figure)


# --------------------------------------------------------------------------- the command


@dataclass
class ReproduceResult:
    outcomes: list[dict[str, Any]]
    table: dict[str, Any]
    paths: list[Path] = field(default_factory=list)
    title: str = ""
    made: dict[str, Any] = field(default_factory=dict)  # pipeline.provenance of all the features
    written: Table | None = None  # what the files hold (pipeline.tables)

    def markdown(self) -> str:
        return markdown_text(self.written)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [o for o in self.outcomes if o["error"]]


def reproduce(
    preset: str,
    features: Path,
    out: Path,
    seeds: list[int],
    *,
    labels_dir: Path | None = None,
    actions: list[str] | None = None,
    model: str = "mcmoe",
    overrides: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    ray_address: str | None = "auto",
    gpus_per_run: float | None = None,
    cpus_per_run: float = 1.0,
    device: str = "auto",
    progress: bool = True,
    say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> ReproduceResult:
    """Plan, train what is not finished (on Ray unless ray_address is None), evaluate, aggregate, write."""
    inputs = find_inputs(preset, features, labels_dir, actions)
    specs = plan_runs(inputs, preset, seeds, out, model, overrides, model_options)
    states = {spec.run_dir: run_state(spec) for spec in specs}  # settings mismatches stop us before any work
    todo = [s for s in specs if not (states[s.run_dir] == "finished" and is_evaluated(s.run_dir))]
    outcomes = [finished_outcome(s) for s in specs if s not in todo]
    say(f"{preset}: {len(inputs)} action(s) x {len(seeds)} seed(s) = {len(specs)} runs of {model}; "
        f"{len(outcomes)} already finished, {len(todo)} to run")
    if todo and ray_address is None:
        outcomes += run_in_process(todo, device, progress)
    elif todo:
        from pipeline.ray_session import ray_session

        with ray_session(ray_address) as resources:
            outcomes += run_on_ray(todo, resources, model, device, gpus_per_run, cpus_per_run, progress)
    order = {(s.action, s.seed): i for i, s in enumerate(specs)}
    outcomes.sort(key=lambda o: order[(o["action"], o["seed"])])
    table = aggregate(outcomes, [i.action for i in inputs], preset)
    made = {i.action: provenance(FeatureCache(i.features).read_config()) for i in inputs}
    made[table["rows"][-1]["name"]] = provenance([FeatureCache(i.features).read_config() for i in inputs])
    meta = {
        "preset": preset, "model": model, "seeds": list(seeds), "actions": [i.action for i in inputs],
        "inputs": [{"action": i.action, "features": str(i.features), "labels": str(i.labels), **made[i.action]}
                   for i in inputs],
        "runs": [{k: o.get(k) for k in ("action", "seed", "run_dir", "status", "error", "table")} for o in outcomes],
    }
    title = f"{preset} with {model}: {len(seeds)} seed(s), test split"
    written = result_table(table, meta, title, made)
    paths = write_results(Path(out).expanduser(), written, table)
    return ReproduceResult(outcomes, table, paths, title, written.made, written)
