"""`pipeline demo`: proof that the pipeline learns a score from video, and keeps it when a modality is missing.

sample clips whose score is carried by what they show and sound like (pipeline/samples.py), some
without an audio track -> extract (RANDOM-weight backbones) -> train MCMoE and its Baseline ablation
with the same budget of optimiser steps -> both evaluated on held-out clips under every modality
setting (a Table-1 style comparison and a picture) -> a few unseen clips scored end to end.

The backbones have random weights (no machine here can download the real ones), so what it shows is
that the machinery learns a signal that is in the pixels and the sound; it says nothing about how
well it scores real sports.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from manifests.files import escape_csv_cell
from pipeline.samples import ClipSpec, sample_set, write_clip

BANNER = "=" * 78
MODELS = {"MCMoE": [], "Baseline": ["--ablation", "baseline"]}  # demo name -> extra `pipeline train` flags


@dataclass(frozen=True)
class DemoSettings:
    train_clips: int = 120
    val_clips: int = 40  # the checkpoint is chosen on these: enough that the choice is not a coin toss
    test_clips: int = 40  # held out: the numbers the demo reports
    unseen_clips: int = 4  # scored end to end at the end, one without audio
    clip_seconds: tuple[float, float] = (2.7, 3.2)  # 2 segments of 32 frames at 24-30 fps
    segment_frames: int = 32
    steps: int = 500  # optimiser steps per model (the same budget for MCMoE and the Baseline)
    batch_size: int = 16
    lr: float = 2e-3
    hidden: int = 64
    # On a couple of hundred short clips the published dropout (0.3) and L_div weight (alpha 1) keep both
    # models at the mean score for hundreds of steps: at alpha 1 the triplet term outweighs the task term
    # many times over.
    dropout: float = 0.1
    alpha: float = 0.1
    # Each model is trained this many times (training seeds seed, seed+1, ...) and the table shows the mean:
    # on 40 test clips the training seed alone moves a setting's rho as much as the difference between the
    # two models.
    training_seeds: int = 3
    arch_size: str = "tiny"  # "full" runs the real-size architectures (still random weights): much slower
    vary_format: bool = True  # frame rates 24-30 fps and two frame sizes, as real footage
    seed: int = 0

    @property
    def labelled_clips(self) -> int:
        return self.train_clips + self.val_clips + self.test_clips

    @property
    def epochs(self) -> int:
        return math.ceil(self.steps / math.ceil(self.train_clips / self.batch_size))


def run_dirs(out: Path, model: str, settings: DemoSettings) -> list[Path]:
    """The run folders of one demo model, one per training seed; the first is the one `score` uses."""
    first = Path(out) / "runs" / model.lower()
    return [first] + [first.with_name(f"{first.name}-seed{settings.seed + k}") for k in range(1, settings.training_seeds)]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _write_clips(jobs: list[tuple[ClipSpec, Path]]) -> None:
    """Render and encode in two threads (ffmpeg and numpy release the GIL); existing files are kept."""
    todo = [(spec, path) for spec, path in jobs if not path.is_file()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda job: write_clip(*job), todo))


def extract_command(settings: DemoSettings, videos: Path, cache: Path, device: str, quiet: bool) -> list[str]:
    """The `pipeline extract` arguments of the demo's features."""
    return ["extract", "--videos", str(videos), "--out", str(cache), "--backbones", "random",
            "--arch-size", settings.arch_size, "--flow", "farneback", "--segment-frames", str(settings.segment_frames),
            "--seed", str(settings.seed), "--device", device, *(["--quiet"] if quiet else [])]


def train_command(settings: DemoSettings, features: Path, labels: Path, run_dir: Path, model: str, seed: int,
                  device: str, resume: bool, quiet: bool) -> list[str]:
    """The `pipeline train` arguments of one demo model's run at training seed `seed`."""
    return ["train", "--features", str(features), "--labels", str(labels), "--out", str(run_dir), *MODELS[model],
            "--epochs", str(settings.epochs), "--batch-size", str(settings.batch_size), "--lr", str(settings.lr),
            "--hidden", str(settings.hidden), "--dropout", str(settings.dropout), "--alpha", str(settings.alpha),
            "--seed", str(seed), "--device", device, *(["--resume"] if resume else []), *(["--quiet"] if quiet else [])]


def make_dataset(out: Path, settings: DemoSettings) -> tuple[Path, Path, list[ClipSpec], list[ClipSpec]]:
    """Labelled clips in out/videos with out/labels.csv (video_id,score,split), and unseen clips in
    out/new/ whose known scores go to out/new/known_scores.csv (never seen by training).
    Returns (videos folder, labels file, labelled clips in train/val/test order, unseen clips)."""
    out.mkdir(parents=True, exist_ok=True)
    videos, labels = out / "videos", out / "labels.csv"
    specs = sample_set(settings.labelled_clips, seed=settings.seed, seconds=settings.clip_seconds,
                       vary_format=settings.vary_format)
    splits = ["train"] * settings.train_clips + ["val"] * settings.val_clips + ["test"] * settings.test_clips
    unseen = sample_set(settings.unseen_clips, seed=settings.seed + 7919, seconds=settings.clip_seconds,
                        prefix="unseen", vary_format=settings.vary_format)
    unseen = [replace(spec, with_audio=index != 0) for index, spec in enumerate(unseen)]  # the first has no audio
    _write_clips([(s, videos / f"{s.name}.mp4") for s in specs] + [(s, out / "new" / f"{s.name}.mp4") for s in unseen])
    for path, rows in ((labels, zip(specs, splits)), (out / "new" / "known_scores.csv", ((s, "unseen") for s in unseen))):
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["video_id", "score", "split"])
            writer.writerows([escape_csv_cell(spec.name), spec.label, split] for spec, split in rows)
    return videos, labels, specs, unseen


@dataclass
class Comparison:
    table: str
    csv: Path
    json: Path
    plot: Path
    evaluations: dict  # demo model name -> [pipeline.inference.Evaluation], one per training seed


@dataclass
class DemoResult:
    code: int  # the exit code of `pipeline demo`
    comparison: Comparison | None = None
    labelled: list[ClipSpec] = field(default_factory=list)  # in train, val, test order
    unseen: list = field(default_factory=list)  # (ClipSpec, pipeline.stages.score.ClipScore) of the unseen clips
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage


def run_demo(
    out: Path,
    settings: DemoSettings = DemoSettings(),
    device: str = "auto",
    progress: bool = True,
    *,
    pipeline: Callable[[list[str]], int],
) -> DemoResult:
    """Make the sample data, run the `pipeline` commands a user would (printing each), then compare.

    `pipeline` runs one command line and returns its exit code: the CLI's own `main`, which hands
    itself over (the demo drives the real command line without importing it)."""
    out = Path(out).expanduser()
    clock = _StageClock()
    _say(INTRODUCTION)
    videos, labels, labelled, unseen = make_clips(out, settings)
    clock.lap("clips")
    code = extract_features(out, videos, settings, device, progress, pipeline)
    clock.lap("extract")
    code = code or train_models(out, labels, settings, device, progress, pipeline, clock)
    if code != 0:
        return DemoResult(code, labelled=labelled, seconds=clock.seconds)
    comparison = evaluate_models(out, labels, device, settings)
    clock.lap("evaluate")
    scored = score_new_clips(out, unseen, device, progress)
    clock.lap("score")
    print(closing_words(out, videos, labels, comparison))
    return DemoResult(1 if any(result.error for _, result in scored) else 0, comparison, labelled, scored, clock.seconds)


INTRODUCTION = (f"{BANNER}\nDEMO. The backbones use RANDOM WEIGHTS (no pretrained weights are downloaded here).\n"
                "It shows that the pipeline learns a score that is carried by what sample clips show and sound\n"
                f"like, end to end from video files; it makes NO claim about scoring real sports.\n{BANNER}")


class _StageClock:
    """Wall time of each stage, said as it ends (DemoResult.seconds)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def lap(self, stage: str) -> None:
        self.seconds[stage] = time.perf_counter() - self.started  # since the previous lap: every command of the stage
        self.started = time.perf_counter()
        _say(f"({stage}: {self.seconds[stage]:.0f} s)")


def _run(pipeline: Callable[[list[str]], int], title: str, argv: list[str]) -> int:
    """One `pipeline` command as a user would type it, printed before it runs; its exit code."""
    _say(f"\n{title}\n$ pipeline {' '.join(argv)}")
    code = pipeline(argv)
    if code != 0:
        _stopped(argv, code)
    return code


def _stopped(argv: list[str], code: int, hint: str = "") -> None:
    _say(f"demo stopped: `pipeline {argv[0]}` exited with {code} (the error above).{hint}")


def make_clips(out: Path, settings: DemoSettings) -> tuple[Path, Path, list[ClipSpec], list[ClipSpec]]:
    """Step 1: the labelled and the unseen sample clips (make_dataset)."""
    _say(f"\n[1/6] making {settings.labelled_clips} labelled sample clips ({settings.train_clips} train, "
         f"{settings.val_clips} validation, {settings.test_clips} test; every third without audio) and "
         f"{settings.unseen_clips} unseen clips in {out}")
    return make_dataset(out, settings)


def extract_features(out: Path, videos: Path, settings: DemoSettings, device: str, progress: bool,
                     pipeline: Callable[[list[str]], int]) -> int:
    """Step 2: `pipeline extract` into out/cache. Its per-clip status table goes to EXTRACT_SUMMARY
    instead of the screen (one row per clip would bury the results); its counts, and any clip that
    did not finish, are shown."""
    from manifests.files import atomic_write_bytes

    argv = extract_command(settings, videos, out / "cache", device, quiet=not progress)
    _say(f"\n[2/6] extract features: rgb (Video Swin), flow (Farneback + I3D), audio (AST); {settings.arch_size} "
         f"architectures, random weights\n$ pipeline {' '.join(argv)}")
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = pipeline(argv)
    atomic_write_bytes(out / EXTRACT_SUMMARY, captured.getvalue().encode())
    report = extract_report(captured.getvalue())
    if report:  # nothing when extract stopped before any clip (its error is on stderr)
        print("\n".join(report) + f"\n(per-clip status: {out / EXTRACT_SUMMARY})")
    if code != 0:
        _stopped(argv, code, f" If {out} was made by an older version of this tool, remove it or pass another --out.")
    return code


EXTRACT_SUMMARY = "extract_summary.txt"  # under the demo's --out


def extract_report(summary: str) -> list[str]:
    """What `pipeline extract` printed, without the rows of clips that were extracted: the table's
    header and any other row (a failed clip and its error), then the counts."""
    from manifests.cache import DONE

    lines = [line for line in summary.splitlines() if line.strip()]
    table, counts = lines[:-1], lines[-1:]
    trouble = [line for line in table[1:] if line.split()[1:2] != [DONE]]  # the demo's clip names have no spaces
    return ([table[0], *trouble] if trouble else []) + counts


def train_models(out: Path, labels: Path, settings: DemoSettings, device: str, progress: bool,
                 pipeline: Callable[[list[str]], int], clock: _StageClock) -> int:
    """Steps 3 and 4: each demo model trained, a stage each; the first failing exit code, else 0."""
    for step, model in enumerate(MODELS, start=3):
        code = train_model(out, labels, model, step, settings, device, progress, pipeline)
        clock.lap(f"train {model}")
        if code != 0:
            return code
    return 0


def train_model(out: Path, labels: Path, model: str, step: int, settings: DemoSettings, device: str, progress: bool,
                pipeline: Callable[[list[str]], int]) -> int:
    """`pipeline train` of one demo model, once per training seed (a finished run is resumed, which
    returns at once); the first failing exit code, else 0."""
    from manifests.run import RunDir

    steps_per_epoch = math.ceil(settings.train_clips / settings.batch_size)
    for k, run_dir in enumerate(run_dirs(out, model, settings)):
        title = (f"[{step}/6] train {model}: {settings.epochs} epochs x {steps_per_epoch} batches = "
                 f"{settings.epochs * steps_per_epoch} optimiser steps; the checkpoint is chosen on the "
                 f"{settings.val_clips} validation clips, never on the test clips"
                 + (f"; {settings.training_seeds} training seeds" if settings.training_seeds > 1 else ""))
        argv = train_command(settings, out / "cache", labels, run_dir, model, settings.seed + k, device,
                             resume=RunDir(run_dir).has_run(), quiet=not progress)
        code = _run(pipeline, title if k == 0 else f"  {model}, training seed {settings.seed + k}", argv)
        if code != 0:
            return code
    return 0


def evaluate_models(out: Path, labels: Path, device: str, settings: DemoSettings) -> Comparison:
    """Step 5: both models on the held-out test clips, the comparison printed and written."""
    _say(f"\n[5/6] evaluate both on the {settings.test_clips} held-out test clips under every modality setting\n"
         f"  (one model's table: pipeline evaluate --run {out / 'runs' / 'mcmoe'} --labels {labels})")
    comparison = compare_models(out, labels, device, settings)
    print(comparison.table)
    _say(f"wrote {comparison.csv}, {comparison.json}, {comparison.plot}")
    return comparison


def score_new_clips(out: Path, unseen: list[ClipSpec], device: str, progress: bool) -> list:
    """Step 6: the unseen clips scored end to end, as `pipeline score` does."""
    new = out / "new"
    _say(f"\n[6/6] score {len(unseen)} clips no model has seen, end to end from the video files\n"
         f"$ pipeline score {new} --run {out / 'runs' / 'mcmoe'} --out {out / 'scores.csv'}")
    scored = score_unseen(out, unseen, device, progress)
    print(format_unseen(scored))
    return scored


def closing_words(out: Path, videos: Path, labels: Path, comparison: Comparison) -> str:
    """Where everything is, what it is not, and the same commands on one's own videos."""
    cache = out / "cache"
    return (f"\n{BANNER}\nDemo finished. Everything is under {out}:\n"
            f"  clips and labels    {videos}/, {labels} (split column: train / val / test)\n"
            f"  features            {cache}/<config-hash>/ (config.json, manifest.csv); per-clip status {out / EXTRACT_SUMMARY}\n"
            f"  trained models      {out / 'runs'}/mcmoe/, {out / 'runs'}/baseline/ (run.json, best.safetensors, train_log.csv)\n"
            f"  comparison          {comparison.csv}, {comparison.plot}\n"
            f"  unseen clip scores  {out / 'scores.csv'}\n"
            "All of it comes from RANDOM-WEIGHT backbones on synthetic clips: proof that the machinery learns\n"
            "from video, not a claim about scoring accuracy.\n\n"
            "The same on your own videos, with pretrained weights (add --weights-dir DIR when offline):\n"
            "  pipeline extract --videos ~/videos --out ~/cache\n"
            "  pipeline train --features ~/cache --labels labels.csv --out runs/mine --preset rg --action Ball\n"
            "  pipeline evaluate --run runs/mine --labels test.csv --plot runs/mine/test.png\n"
            f"  pipeline score new_clip.mp4 --run runs/mine --out scores.csv\n{BANNER}")


def compare_models(out: Path, labels: Path, device: str, settings: DemoSettings = DemoSettings()) -> Comparison:
    """Evaluate every run of every demo model on the test rows of `labels`; write the side-by-side table
    (the mean over training seeds, each seed's Average below it) and the picture (the first seed)."""
    import numpy as np

    from pipeline import data
    from pipeline.inference import load_run
    from pipeline.labels import read_labels
    from pipeline.provenance import headline, provenance
    from pipeline.tables import Table, write_table

    rows = read_labels(labels)
    test_ids = rows.ids_in_split("test")
    evaluations, runs = {}, {}
    for name in MODELS:
        runs[name] = [load_run(directory, device) for directory in run_dirs(out, name, settings)]
        evaluations[name] = [run.evaluate(data.load_samples(run.open_features(), test_ids, rows.scores))
                             for run in runs[name]]
    made = provenance(run.extraction_config for model_runs in runs.values() for run in model_runs)
    seeds = [settings.seed + k for k in range(settings.training_seeds)]
    columns = [c[0] for c in evaluations["MCMoE"][0].columns()]
    width = max(9, *(len(c) + 2 for c in columns))
    over = f", mean of {len(seeds)} training seeds" if len(seeds) > 1 else ""
    what = f"held-out test clips ({len(test_ids)}){over}"
    lines = [headline(what, made),
             f"{'':14}" + "".join(c.rjust(width) for c in columns)]
    records = []
    for metric, index, spec in (("rho", 1, ".3f"), ("MSE", 2, ".2f")):
        for name, model_evaluations in evaluations.items():
            per_seed = np.array([[c[index] for c in e.columns()] for e in model_evaluations], dtype=float)
            mean = per_seed.mean(axis=0)  # n/a when any seed's value is (a constant prediction has no rho)
            lines.append(f"{name + ' ' + metric:14}" + "".join(
                ("n/a" if math.isnan(v) else format(v, spec)).rjust(width) for v in mean))
            for seed, values in zip(["mean", *seeds], [mean, *per_seed]):
                records += [{"model": name, "metric": metric, "training_seed": seed, "setting": c,
                             "value": None if math.isnan(v) else float(v)} for c, v in zip(columns, values)]
    if len(seeds) > 1:
        lines += [f"Average rho per training seed {seeds}: " + "; ".join(
            f"{name} " + " ".join(f"{e.average_rho:.3f}" for e in model_evaluations)
            for name, model_evaluations in evaluations.items())]
    table = "\n".join(lines)
    folder = out / "comparison"
    folder.mkdir(parents=True, exist_ok=True)
    results = Table(what, made, records, rows_key="results", context={
        "test_clips": test_ids, "labels": str(labels.resolve()), "training_seeds": seeds,
        "table": "mean over the training seeds of each column (rho and MSE per setting, and the Average)",
        "models": {name: [{"run": str(run.directory), "training_seed": seed, "checkpoint_epoch": run.best.get("epoch"),
                           "selected_on": run.info.get("selected_on")} for seed, run in zip(seeds, model_runs)]
                   for name, model_runs in runs.items()},
    })
    write_table(results, folder / "test.csv")
    write_table(results, folder / "test.json")
    first_seed = {name: model_evaluations[0] for name, model_evaluations in evaluations.items()}
    plot_title = lines[0] if len(seeds) == 1 else f"{lines[0]} (picture: training seed {seeds[0]})"
    plot_comparison(folder / "test.png", first_seed, plot_title)
    return Comparison(table, folder / "test.csv", folder / "test.json", folder / "test.png", evaluations)


def plot_comparison(path: Path, evaluations: dict, title: str) -> None:
    """Predicted vs true: one row per model, the full set and the hardest missing setting side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pipeline.provenance import save_figure

    first = next(iter(evaluations.values()))
    full = next(s.name for s in first.settings if s.complete)
    # the hardest missing setting: lowest rho averaged over the models
    incomplete = [s.name for s in first.settings if not s.complete]
    worst = min(incomplete, key=lambda n: np.mean([next(s.rho for s in e.settings if s.name == n) for e in evaluations.values()]))
    figure, axes = plt.subplots(len(evaluations), 2, figsize=(7, 3.3 * len(evaluations)), squeeze=False)
    low, high = first.true.min(), first.true.max()
    for row, (name, evaluation) in zip(axes, evaluations.items()):
        for ax, setting in zip(row, (full, worst)):
            result = next(s for s in evaluation.settings if s.name == setting)
            ax.scatter(evaluation.true, evaluation.predictions[setting], s=14, alpha=0.75)
            ax.plot([low, high], [low, high], color="grey", linewidth=1, linestyle="--")
            ax.set_title(f"{name}, {setting}: rho {result.rho:.2f}, MSE {result.mse:.2f}", fontsize=9)
            ax.set_xlabel("true score", fontsize=8)
            ax.set_ylabel("predicted score", fontsize=8)
            ax.tick_params(labelsize=7)
    figure.suptitle(textwrap.fill(title, 90), fontsize=9, color="red" if title.startswith("RANDOM") else "black")
    figure.tight_layout()
    save_figure(path, figure, title)
    plt.close(figure)


def score_unseen(out: Path, unseen: list[ClipSpec], device: str, progress: bool) -> list:
    """Score the unseen clips with the MCMoE run, as `pipeline score` does: [(spec, ClipScore)]."""
    from pipeline.devices import resolve_device
    from pipeline.stages.score import score_clips, write_scores

    clips = [out / "new" / f"{spec.name}.mp4" for spec in unseen]
    run_dir = out / "runs" / "mcmoe"
    results = score_clips(clips, run_dir, device=resolve_device(device), progress=progress)
    write_scores(out / "scores.csv", results, run_dir)
    return list(zip(unseen, results))


def format_unseen(scored: list) -> str:
    lines = [f"{'clip':12}{'known':>8}{'predicted':>11}  {'present':16}imputed"]
    for spec, result in scored:
        predicted = "error" if result.score is None else f"{result.score:.2f}"
        lines.append(f"{spec.name:12}{spec.label:>8.2f}{predicted:>11}  {','.join(result.present):16}"
                     f"{','.join(result.imputed) or '-'}" + (f"  ({result.error})" if result.error else ""))
    lines.append("(RANDOM-weight backbones: the scores show learning on synthetic clips, not accuracy on real sports)")
    return "\n".join(lines)
