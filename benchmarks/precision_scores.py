"""How much bf16 features move scores, against how much the training seed does (#28: the default precision).

    python benchmarks/precision_scores.py --json benchmarks/results/precision_scores.json

On the demo's data (`pipeline demo`: its sample clips, its random-weight backbones, its MCMoE settings
and budget), the clips are extracted twice, `--precision fp32` and `--precision bf16`, and MCMoE is
trained `--seeds` times on each. Every run is evaluated on the held-out test clips with the features of
both precisions, so each row pairs a run with the features it was trained on and with the other ones:
- swapped precision: rho and MSE of a run on the other precision's features minus on its own, and the
  largest and mean change of a clip's score (original scale);
- trained on bf16: rho and MSE of the bf16-trained runs minus the fp32-trained ones, seed by seed;
- seed spread: the standard deviation over training seeds of the fp32 runs' rho and MSE.
A precision that costs nothing measurable moves rho and MSE by well under the seed spread.

The backbones are the demo's (tiny, random weights), whose bf16 features differ from fp32 ones by
0.5-1.5% of their largest value (tests/test_precision.py prints the figures); full-size Swin-B's and the
I3D's by 0.4% and 0.9% (bench_cpu_backends.py's bf16 autocast try, results/cpu_backends.json). The
results file names the commit, the CPU and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import run_record  # noqa: E402
from manifests.cache import CONFIG_NAME, feature_precision  # noqa: E402
from pipeline import data  # noqa: E402
from pipeline.cli import main as pipeline  # noqa: E402
from pipeline.stages.demo import DemoSettings, extract_command, make_dataset, train_command  # noqa: E402
from pipeline.inference import load_run  # noqa: E402
from pipeline.labels import read_labels  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def quietly(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = pipeline(argv)
    if code != 0:
        raise SystemExit(f"pipeline {' '.join(argv)} exited {code}:\n{err.getvalue()}")


def extract_both(settings: DemoSettings, videos: Path, work: Path) -> dict[str, Path]:
    """{precision: its cache folder}, both under work/cache."""
    for precision in PRECISIONS:
        quietly(extract_command(settings, videos, work / "cache", "cpu", quiet=True) + ["--precision", precision])
    folders = {feature_precision(json.loads((f / CONFIG_NAME).read_text())): f for f in (work / "cache").iterdir()}
    return {p: folders[p] for p in PRECISIONS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per precision (default: %(default)s)")
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    settings = DemoSettings(training_seeds=args.seeds)
    work = args.work or Path(tempfile.mkdtemp(prefix="precision_scores_"))
    started = time.perf_counter()
    videos, labels, _, _ = make_dataset(work, settings)
    caches = extract_both(settings, videos, work)
    rows = read_labels(labels)
    test_ids = rows.ids_in_split("test")

    results = []
    for trained_on, features in caches.items():
        for k in range(args.seeds):
            run_dir = work / "runs" / f"mcmoe-{trained_on}-seed{settings.seed + k}"
            quietly(train_command(settings, features, labels, run_dir, "MCMoE", settings.seed + k, "cpu",
                                  resume=False, quiet=True))
            run = load_run(run_dir, "cpu")
            scores = {}
            for evaluated_on, folder in caches.items():
                cache = run.open_features(folder, allow_other_recipe=True)  # the other precision, on purpose
                samples = data.load_samples(cache, test_ids, rows.scores)
                evaluation = run.evaluate(samples)
                full = next(s for s in evaluation.settings if s.complete)
                scores[evaluated_on] = evaluation.predictions[full.name]
                results.append({"trained_on": trained_on, "evaluated_on": evaluated_on, "training_seed": settings.seed + k,
                                "rho": full.rho, "mse": full.mse, "average_rho": evaluation.average_rho,
                                "average_mse": evaluation.average_mse})
            moved = np.abs(scores["bf16"] - scores["fp32"])
            results[-1]["score_change_max"] = results[-2]["score_change_max"] = float(moved.max())
            results[-1]["score_change_mean"] = results[-2]["score_change_mean"] = float(moved.mean())

    def pick(trained_on: str, evaluated_on: str, key: str) -> np.ndarray:
        return np.array([r[key] for r in results if r["trained_on"] == trained_on and r["evaluated_on"] == evaluated_on])

    summary = {}
    for key in ("rho", "mse", "average_rho", "average_mse"):
        own = {p: pick(p, p, key) for p in PRECISIONS}
        swapped = {p: pick(p, q, key) - own[p] for p, q in zip(PRECISIONS, reversed(PRECISIONS))}
        summary[key] = {
            "seed_spread_fp32": float(own["fp32"].std(ddof=1)),
            "seed_spread_bf16": float(own["bf16"].std(ddof=1)),
            "fp32_run_on_bf16_features_minus_own": swapped["fp32"].tolist(),
            "bf16_run_on_fp32_features_minus_own": swapped["bf16"].tolist(),
            "bf16_trained_minus_fp32_trained": (own["bf16"] - own["fp32"]).tolist(),
            "mean_fp32": float(own["fp32"].mean()), "mean_bf16": float(own["bf16"].mean()),
        }
    changes = [r["score_change_max"] for r in results]
    summary["score_change"] = {"max": max(changes), "mean": float(np.mean([r["score_change_mean"] for r in results])),
                               "score_range": float(max(rows.scores.values()) - min(rows.scores.values()))}

    record = run_record()
    print(f"RANDOM-WEIGHT BACKBONES (the demo's): MCMoE on the demo's {len(test_ids)} held-out test clips, "
          f"{args.seeds} training seeds per precision; commit {record['commit']}, {record['cpu']}, {record['date']}")
    for key, values in summary.items():
        if key == "score_change":
            continue
        print(f"{key:12s} fp32 runs {values['mean_fp32']:.3f} (seed spread {values['seed_spread_fp32']:.3f}), "
              f"bf16 runs {values['mean_bf16']:.3f} (seed spread {values['seed_spread_bf16']:.3f}); "
              "fp32 run on bf16 features: " + " ".join(f"{d:+.4f}" for d in values["fp32_run_on_bf16_features_minus_own"])
              + "; bf16 run on fp32 features: " + " ".join(f"{d:+.4f}" for d in values["bf16_run_on_fp32_features_minus_own"]))
    change = summary["score_change"]
    print(f"a clip's score moves by at most {change['max']:.3f} (mean {change['mean']:.4f}) when the other precision's "
          f"features are scored; the labels span {change['score_range']:.1f}")
    if args.json:
        args.json.write_text(json.dumps({
            **record, "command": " ".join(["python", *sys.argv]), "random_weights": True,
            "note": "the demo's random-weight backbones; scores are smoke-test numbers, the differences are the point",
            "test_clips": len(test_ids), "seconds": time.perf_counter() - started,
            "summary": summary, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
