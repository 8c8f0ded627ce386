"""What a linear model gets from the demo's features: the yardstick for MCMoE and the Baseline.

    python benchmarks/ridge_demo.py --json benchmarks/results/ridge_demo_cpu.json

Makes the demo's labelled clips and extracts their features as `pipeline demo` does (its DemoSettings,
`make_dataset` and `extract_command`), then fits ridge regression on each video's features averaged
over its segments, one block per modality standardised on the training clips, and reports Spearman's
rho on the held-out test clips for every modality setting of the demo's table, with the Average of the
six incomplete ones through Fisher's z. A modality a clip lacks (every third clip has no audio) enters
as its training mean (zero once standardised): what a linear model does without a generator. The
penalty is chosen per setting on the validation clips, as the demo's models choose their checkpoint.
Random-weight backbones: a yardstick for these clips only. About 3 minutes on an idle 2-core CPU
(most of it the demo's extraction).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import run_record  # noqa: E402
from manifests.cache import FeatureCache  # noqa: E402
from pipeline.cli import main as pipeline_main  # noqa: E402
from pipeline.data import load_samples  # noqa: E402
from pipeline.stages.demo import DemoSettings, extract_command, make_dataset  # noqa: E402
from pipeline.labels import read_labels  # noqa: E402
from pipeline.metrics import fisher_z_mean, spearman_rho  # noqa: E402

MODALITIES = (("rgb", "v"), ("flow", "f"), ("audio", "a"))
SETTINGS = ("{v}", "{f}", "{a}", "{v,f}", "{v,a}", "{f,a}", "{v,f,a}")
PENALTIES = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def pooled(features: dict[str, dict[str, np.ndarray]], ids: list[str], modality: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(videos, dim) segment means, zeros where a video lacks the modality; and which videos have it."""
    rows = [features[v][modality].mean(axis=0) if modality in features[v] else np.zeros(dim) for v in ids]
    return np.stack(rows).astype(np.float64), np.array([modality in features[v] for v in ids])


def ridge_rho(blocks: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], scores: dict[str, np.ndarray],
              modalities: list[str]) -> tuple[float, float]:
    """(test rho, chosen penalty) of ridge on the given modalities' blocks; blocks[split][modality] is
    (features, has-the-modality). Each block is standardised with the training clips that have it."""
    design = {}
    for split in ("train", "val", "test"):
        parts = []
        for modality in modalities:
            train, present = blocks["train"][modality]
            mean, std = train[present].mean(axis=0), train[present].std(axis=0) + 1e-8
            values, has = blocks[split][modality]
            parts.append(np.where(has[:, None], (values - mean) / std, 0.0))
        design[split] = np.concatenate(parts, axis=1)
    x, y = design["train"], scores["train"]
    best = None
    for penalty in PENALTIES:
        weights = np.linalg.solve(x.T @ x + penalty * len(x) * np.eye(x.shape[1]), x.T @ (y - y.mean()))
        rho = spearman_rho(design["val"] @ weights, scores["val"])
        rho = -np.inf if np.isnan(rho) else rho  # constant predictions rank nothing
        if best is None or rho > best[0]:
            best = (rho, penalty, weights)
    _, penalty, weights = best
    return spearman_rho(design["test"] @ weights, scores["test"]), penalty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for the clips and the cache (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    settings = DemoSettings()
    work = args.work or Path(tempfile.mkdtemp(prefix="ridge_demo_"))
    videos, labels_path, _, _ = make_dataset(work, settings)
    with contextlib.redirect_stdout(io.StringIO()):
        code = pipeline_main(extract_command(settings, videos, work / "cache", "cpu", quiet=True))
    if code:
        raise SystemExit(f"the demo's extraction failed (exit {code})")
    cache = FeatureCache.open(work / "cache")
    labels = read_labels(labels_path)
    features, scores, blocks = {}, {}, {}
    for split in ("train", "val", "test"):
        ids = labels.ids_in_split(split)
        samples = load_samples(cache, ids, labels.scores)
        features.update({s.video_id: s.features for s in samples})
        scores[split] = np.array([s.score for s in samples])
        dims = {m: next(s.features[m].shape[1] for s in samples if m in s.features) for m, _ in MODALITIES}
        blocks[split] = {m: pooled(features, [s.video_id for s in samples], m, dims[m]) for m, _ in MODALITIES}
    rows = {}
    for setting in SETTINGS:
        modalities = [m for m, letter in MODALITIES if letter in setting]
        rho, penalty = ridge_rho(blocks, scores, modalities)
        rows[setting] = {"rho": rho, "penalty": penalty}
    average = fisher_z_mean(rows[s]["rho"] for s in SETTINGS[:-1])
    record = {**run_record(), "command": " ".join(["python", *sys.argv]),
              "note": "random-weight tiny backbones on the demo's synthetic clips; ridge on segment-mean features",
              "features": cache.root.name, "clips": {split: len(scores[split]) for split in scores},
              "settings": rows, "average_rho": average}
    print("ridge on the demo's features, held-out rho: " + "  ".join(f"{s} {rows[s]['rho']:.3f}" for s in SETTINGS)
          + f"  Average {average:.3f}  (features {cache.root.name}, commit {record['commit']}, {record['cpu']})")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
