"""`pipeline evaluate`: a run's chosen checkpoint under every modality setting (the papers' Table 1),
printed and written as CSV / JSON (pipeline.tables) with per-video predictions, optionally drawn.

The predictions come from pipeline.inference (shared with train, score and reproduce); this stage
reads the labels, checks them against the features, and writes and draws the results.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from manifests.cache import CacheError
from pipeline import data
from pipeline.inference import Evaluation, Run, RunError, load_run
from pipeline.labels import LabelError, check_against_cache, read_labels
from pipeline.provenance import headline, save_figure
from pipeline.tables import Table, write_table

# --------------------------------------------------------------------------- the table, files and plot


def format_table(evaluation: Evaluation) -> str:
    columns = evaluation.columns()
    width = max(8, *(len(c[0]) + 1 for c in columns))
    fmt = lambda value, spec: "n/a" if value is None or math.isnan(value) else format(value, spec)  # noqa: E731
    lines = [
        "setting".ljust(8) + "".join(c[0].rjust(width) for c in columns),
        "rho".ljust(8) + "".join(fmt(c[1], ".3f").rjust(width) for c in columns),
        "MSE".ljust(8) + "".join(fmt(c[2], ".3f").rjust(width) for c in columns),
        "n".ljust(8) + "".join(("" if c[3] is None else str(c[3])).rjust(width) for c in columns),
    ]
    return "\n".join(lines)


def unfinished_training(run: Run) -> dict[str, Any]:
    """{epochs_done, epochs_planned, training_in_progress} of a run whose training has not finished (a live
    `train` writes it, or it stopped before its last epoch), whose weights are the best chosen so far;
    {} for a finished run or an imported checkpoint."""
    done, planned = run.best.get("epochs_done"), run.best.get("epochs_planned")
    if run.writer is None and not (done is not None and planned and done < planned):
        return {}
    return {"epochs_done": done, "epochs_planned": planned, "training_in_progress": run.writer is not None}


def describe_unfinished(state: dict[str, Any]) -> str:
    """The words every output of an evaluation of an unfinished run carries ("" for a finished one)."""
    if not state:
        return ""
    words = "TRAINING IN PROGRESS" if state["training_in_progress"] else "TRAINING UNFINISHED"
    return f" ({words}: {state['epochs_done']} of {state['epochs_planned']} epochs done)"


def evaluation_tables(run: Run, evaluation: Evaluation, labels_path: Path, split: str,
                      overlap: list[str]) -> tuple[Table, Table]:
    """The table (setting, rho, mse, n; with provenance and context for JSON) and the per-video predictions;
    for an unfinished run every row also says how far training got (`unfinished_training`)."""
    state = unfinished_training(run)
    what = f"evaluation of run {run.directory}{describe_unfinished(state)}"
    rows = [{"setting": name, "rho": rho, "mse": error, "n": n, **state} for name, rho, error, n in evaluation.columns()]
    context = {
        "run": str(run.directory.resolve()),
        "model": run.model_name,
        "labels": str(labels_path.resolve()),
        "rows": split,
        "num_videos": len(evaluation.video_ids),
        "checkpoint": run.checkpoint,
        "selected_on": run.info.get("selected_on", "validation"),
        "test_used_for_selection": bool(run.info.get("test_used_for_selection", False)),  # True: imported checkpoints
        "videos_also_in_training": overlap,
        **evaluation.to_dict(),
    }
    names = [s.name for s in evaluation.settings]
    predictions = [{"video_id": video_id, "true": evaluation.true[i], **{n: evaluation.predictions[n][i] for n in names},
                    **state} for i, video_id in enumerate(evaluation.video_ids)]
    return (Table(what, run.provenance, rows, context, rows_key="table"),
            Table(f"per-video predictions of run {run.directory}", run.provenance, predictions))


def plot_predictions(path: Path, evaluation: Evaluation, title: str, made: dict[str, Any] | None = None) -> None:
    """Predicted vs true score, one panel per setting (matplotlib, Agg: no display needed); random
    backbones (`made`, pipeline.provenance) are announced in red above the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = evaluation.settings
    cols = min(4, len(settings))
    rows = math.ceil(len(settings) / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    low = float(min(evaluation.true.min(), *(np.nanmin(p) for p in evaluation.predictions.values() if np.isfinite(p).any())))
    high = float(max(evaluation.true.max(), *(np.nanmax(p) for p in evaluation.predictions.values() if np.isfinite(p).any())))
    for ax, setting in zip(axes.flat, settings):
        predicted = evaluation.predictions[setting.name]
        ax.scatter(evaluation.true, predicted, s=10, alpha=0.7)
        ax.plot([low, high], [low, high], color="grey", linewidth=1, linestyle="--")
        ax.set_title(f"{setting.name}  rho {setting.rho:.3f}  MSE {setting.mse:.2f}", fontsize=8)
        ax.set_xlabel("true score", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    if made is not None and made["random_weights"]:
        figure.suptitle(f"RANDOM-WEIGHT BACKBONES (features {made['config_hash']}): not a result\n{title}",
                        fontsize=9, color="red")
    else:
        figure.suptitle(title + (f" (features {made['config_hash']})" if made else ""), fontsize=9)
    figure.tight_layout()
    save_figure(path, figure, headline(title, made) if made else title)
    plt.close(figure)


def describe_checkpoint(run: Run) -> str:
    """Which epoch a run's weights come from and how that epoch was chosen, e.g. "epoch 3 of 410
    (stopped early, after epoch 5), chosen on 28 validation videos (val rho 0.812)"."""
    best, splits = run.best, run.info.get("splits", {})
    planned, done = best.get("epochs_planned"), best.get("epochs_done")
    text = f"epoch {best.get('epoch')}" + (f" of {planned}" if planned else "")
    if run.writer is not None:
        text += f" (TRAINING IN PROGRESS: {done} epochs done when read)"
    elif planned and done is not None and done < planned:
        text += f" (stopped early, after epoch {done})"
    validation = len(splits.get("val", []))
    if not validation:
        return f"{text}, the last epoch (no validation split)"
    rho = best.get("val_rho")
    text += f", chosen on {validation} validation videos (val rho {'undefined' if rho is None else f'{rho:.3f}'})"
    if validation < data.FEW_VALIDATION_VIDEOS:
        text += f"; with only {validation}, that choice is close to a coin toss"
    return text


def write_evaluation(
    base: Path, run: Run, evaluation: Evaluation, labels_path: Path, split: str, overlap: list[str]
) -> tuple[Path, Path]:
    """BASE.csv (the table), BASE.json (table + provenance), BASE.predictions.csv (per video)."""
    if base.suffix.lower() in (".csv", ".json"):
        base = base.with_suffix("")
    table, predictions = evaluation_tables(run, evaluation, labels_path, split, overlap)
    csv_path = write_table(table, base.parent / f"{base.name}.csv")
    json_path = write_table(table, base.parent / f"{base.name}.json")
    write_table(predictions, base.parent / f"{base.name}.predictions.csv")
    return csv_path, json_path


# --------------------------------------------------------------------------- the stage


class EvaluateError(ValueError):
    """The run, the labels or the features cannot be evaluated together; the message says why."""


@dataclass
class EvaluateResult:
    run: Run
    evaluation: Evaluation
    csv_path: Path
    json_path: Path
    overlap: list[str]  # evaluated videos that were also training or validation videos


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def evaluate_labels(
    run_dir: Path,
    labels_path: Path,
    *,
    features: Path | None = None,
    split: str = "test",
    out: Path | None = None,
    plot: Path | None = None,
    device: str = "auto",
    batch_size: int = 32,
    allow_other_recipe: bool = False,
    say: Callable[[str], None] = _stderr,
    show: Callable[[str], None] = print,
) -> EvaluateResult:
    """`pipeline evaluate`: the run's checkpoint on the labelled videos (their test rows when the labels
    have a split column and `split` is "test"); shows the table, writes OUT.{csv,json,predictions.csv}
    (default RUN/evaluation/eval-<labels name>) and the plot; `say` gets the notes (stderr by default).
    EvaluateError: the run, labels and features cannot be evaluated together."""
    labels_path = Path(labels_path)
    try:
        run = load_run(run_dir, device)
        cache = run.open_features(features, allow_other_recipe)
        labels = read_labels(labels_path)
        if labels.splits is not None and split == "test":
            ids = labels.ids_in_split("test")
            if not ids:
                raise EvaluateError(f"{labels_path} has a split column but no split=test rows; pass --split all")
        else:
            ids = labels.video_ids
        check_against_cache(labels, cache, ids, require_all_labelled=False)
        samples = data.load_samples(cache, ids, labels.scores)
    except (LabelError, CacheError, RunError, ValueError, FileNotFoundError) as exc:
        raise EvaluateError(str(exc)) from None
    overlap = sorted(set(ids) & run.trained_ids)
    if overlap:
        say(f"WARNING: {len(overlap)} of these videos were used in training or validation "
            f"(e.g. {overlap[0]}); the numbers below are not a held-out test")
    checkpoint = f"checkpoint of {describe_checkpoint(run)}"
    if run.info.get("imported"):  # pipeline import-checkpoint
        checkpoint = f"checkpoint imported from {run.info['imported']['file']}, {run.info['selection']}"
    held_out = not overlap and not run.info.get("test_used_for_selection")
    say(f"{run.model_name} run {run.directory}: {checkpoint}; "
        f"evaluated on {len(samples)} videos of {labels_path}"
        + (", which played no part in training or choosing it" if held_out else ""))
    evaluation = run.evaluate(samples, batch_size=batch_size)
    show(headline(f"{run.model_name} run {run.directory} on {labels_path.name}"
                  f"{describe_unfinished(unfinished_training(run))}", run.provenance))
    show(format_table(evaluation))
    base = out or run.folder.evaluation(f"eval-{labels_path.stem}")
    csv_path, json_path = write_evaluation(base, run, evaluation, labels_path, split, overlap)
    say(f"wrote {csv_path}, {json_path}")
    if plot:
        plot_predictions(plot, evaluation, f"{run.model_name}: {run.directory.name} on {labels_path.name}", run.provenance)
        say(f"wrote {plot}")
    return EvaluateResult(run, evaluation, csv_path, json_path, overlap)
