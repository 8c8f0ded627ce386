"""How much a clip's score moves with its place in the batch, for MCMoE with batch-position prototypes.

    python benchmarks/batch_position_spread.py --seeds 0 1 2 --epochs 30 --json benchmarks/results/batch_position_spread.json

The authors' released MCMoE checkpoints add to every grade prototype of the b-th sample of a batch the
position encoding b (`prototype_encoding="batch-position"`), so a clip's score depends on where it sits
in its batch. This script trains MCMoE that way here (the rg preset's model and training settings,
only the epochs shortened; one synthetic RG-shaped cache, rgb 1024 / flow 1024 / audio 768, 70% train
+ val, 30% test; the test rows in file order) and, for every seed and every test clip, measures:
- the score at every batch position 0..31 (one batch of 32 copies of the clip: copy p at position p);
- whether the other clips matter: the clip's scores among other real clips (training clips in front
  of the test clips, shifted so that the test clips land on other positions; the test clips also in
  reverse order) and alone (a batch of one) against those of the copies, largest difference reported;
- the spread of one clip's score over positions 0..31 (max - min and std), absolute, as a fraction of
  the score range and of the test labels' std;
- rho and MSE against the labels (full set, and the Average over the incomplete settings) of three
  rules: (a) position 0 (the clip scored alone), (b) the mean over positions 0..31, (c) the
  reference evaluation's order (test-file order, batches of 32: what `evaluate` does);
- positions 32..63, never seen in training (batches of 32), against 0..31 (the first 12 test clips);
  and the positions the last, smaller training batch of an epoch does not reach.
Synthetic features say how far positions move a score, not what a real benchmark scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import run_record  # noqa: E402
from pipeline import data  # noqa: E402
from pipeline.inference import load_run, predict  # noqa: E402
from pipeline.metrics import fisher_z_mean, mean_mse, mse, spearman_rho  # noqa: E402
from pipeline.stages.train import train  # noqa: E402
from pipeline.train_config import resolve_config  # noqa: E402
from tests.synthetic import write_labels, write_synthetic_cache  # noqa: E402

RG_DIMS = {"rgb": 1024, "flow": 1024, "audio": 768}
POSITIONS = 32  # the training batch size: positions 0..31 are the ones the model was trained at
WIDE_CLIPS = 12  # test clips also scored at positions 32..63


def copies_scores(run, sample, positions: int, subset=None) -> np.ndarray:
    """(positions,) the clip's scores (original scale) at positions 0..positions-1: one batch made of
    copies of the clip, copy p at position p (what fills the other positions does not matter; measured)."""
    scores = predict(run.model, [sample] * positions, run.modalities, run.feature_dims, run.clip_num,
                     run.device, positions, subset)
    return scores * run.score_range


def companion_scores(run, test: list, fillers: list, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-set scores of the test clips behind `shift` fillers, in batches of 32 real clips, and the
    position each test clip got: (shift + i) mod 32."""
    scores = predict(run.model, fillers[:shift] + test, run.modalities, run.feature_dims, run.clip_num,
                     run.device, POSITIONS)[shift:] * run.score_range
    return scores, (shift + np.arange(len(test))) % POSITIONS


def rule_metrics(predicted: dict[str, np.ndarray], true: np.ndarray, full: str) -> dict:
    """rho / MSE of the full set, and the Average (Fisher z / arithmetic) over the incomplete settings."""
    incomplete = [name for name in predicted if name != full]
    rhos = {name: spearman_rho(p, true) for name, p in predicted.items()}
    errors = {name: mse(p, true) for name, p in predicted.items()}
    return {"full_rho": rhos[full], "full_mse": errors[full],
            "average_rho": fisher_z_mean(rhos[n] for n in incomplete), "average_mse": mean_mse(errors[n] for n in incomplete)}


def spread(scores: np.ndarray, score_range: float, label_std: float) -> dict:
    """Per clip max - min and std over positions (axis 1): mean and largest over clips."""
    width, std = scores.max(1) - scores.min(1), scores.std(1)
    out = {}
    for name, values in (("max_minus_min", width), ("std", std)):
        out[name] = {"mean": float(values.mean()), "max": float(values.max()),
                     "mean_over_score_range": float(values.mean() / score_range),
                     "mean_over_label_std": float(values.mean() / label_std)}
    return out


def run_one(seed: int, cache, labels: Path, test_ids: list[str], scores: dict, work: Path, args) -> dict:
    out = work / f"seed{seed}"
    config, _ = resolve_config(cache.root, labels, out, model="mcmoe", preset="rg", action="Ball",
                               overrides={"seed": seed, "epochs": args.epochs, "val_fraction": 0.2},
                               model_options={"prototype_encoding": "batch-position"})
    train(config, device="cpu", progress=False, log=lambda message: None)
    run = load_run(out, device="cpu")
    test = data.load_samples(cache, test_ids, scores)
    train_ids = sorted(run.record.splits["train"])
    fillers = data.load_samples(cache, train_ids[:POSITIONS], scores)
    others = data.load_samples(cache, train_ids[-POSITIONS:], scores)
    true = np.array([s.score for s in test])
    label_std = float(true.std())
    full = data.subset_name(run.modalities)

    rules: dict[str, dict[str, np.ndarray]] = {"position_0": {}, "mean_positions_0_31": {}, "reference_order": {}}
    by_position = {}
    for subset in data.modality_subsets(run.modalities):
        name = data.subset_name(subset)
        at = by_position[name] = np.stack([copies_scores(run, s, POSITIONS, subset) for s in test])
        rules["position_0"][name] = at[:, 0]
        rules["mean_positions_0_31"][name] = at.mean(1)
        rules["reference_order"][name] = predict(run.model, test, run.modalities, run.feature_dims, run.clip_num,
                                                 run.device, POSITIONS, subset) * run.score_range
    at = by_position[full]

    # Do the other clips matter? The same positions among other real clips (training clips in front of
    # the test clips, in file order and reversed), and a batch of one against position 0.
    differences = []
    for shift in (0, 7, 19):
        for companions, order in ((fillers, slice(None)), (others, slice(None, None, -1))):
            scores, where = companion_scores(run, test[order], companions, shift)
            differences.append(np.abs(scores - at[order][np.arange(len(test)), where]).max())
    alone = predict(run.model, test, run.modalities, run.feature_dims, run.clip_num, run.device, 1) * run.score_range
    companions = {"other_clips_vs_copies_max_abs_diff": float(max(differences)),
                  "batch_of_one_vs_position_0_max_abs_diff": float(np.abs(alone - at[:, 0]).max())}

    # Positions never trained at (32..63) against 0..31: how far the clip's mean moves, and the spread.
    wide = np.stack([copies_scores(run, s, 2 * POSITIONS) for s in test[:WIDE_CLIPS]])
    inside, outside = wide[:, :POSITIONS].mean(1), wide[:, POSITIONS:].mean(1)
    # The last training batch of an epoch holds n_train mod 32 clips: positions from there on are
    # trained on fewer batches. Mean |score - the clip's mean over 0..31| on either side.
    last = len(run.record.splits["train"]) % POSITIONS
    deviation = np.abs(at - at.mean(1, keepdims=True))
    profile = deviation.mean(0)
    return {
        "seed": seed, "epochs": config.epochs, "test_clips": len(test), "train_clips": len(train_ids),
        "label_std": label_std, "best_epoch": run.best.get("epoch"),
        "spread_full_set": spread(at, run.score_range, label_std),
        "spread_every_setting": {name: spread(s, run.score_range, label_std)["max_minus_min"]["mean"]
                                 for name, s in by_position.items()},
        "companions": companions,
        "rules": {rule: rule_metrics(predicted, true, full) for rule, predicted in rules.items()},
        "mean_abs_deviation_by_position": [float(v) for v in profile],
        "last_training_batch_size": last,
        "mean_abs_deviation_positions_in_last_batch": float(profile[:last].mean()) if last else None,
        "mean_abs_deviation_positions_beyond_last_batch": float(profile[last:].mean()) if last else None,
        "positions_32_63": {"clips": len(wide),
            "mean_abs_shift_of_clip_mean_vs_0_31": float(np.abs(outside - inside).mean()),
            "spread_32_63": spread(wide[:, POSITIONS:], run.score_range, label_std),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--videos", type=int, default=120, help="synthetic videos (70%% train+val, 30%% test)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        made = write_synthetic_cache(work / "cache", num_videos=args.videos, length_range=(68, 88),
                                     feature_dims=RG_DIMS, seed=123, noise=1.0, score_range=25.0)
        ids = sorted(made.scores)
        splits = {v: "test" if i % 10 >= 7 else "train" for i, v in enumerate(ids)}
        labels = write_labels(work / "labels.csv", made.scores, splits)
        test_ids = [v for v in ids if splits[v] == "test"]  # the labels file's order
        for seed in args.seeds:
            rows.append(run_one(seed, made.cache, labels, test_ids, made.scores, work, args))
            r = rows[-1]
            print(f"seed {seed}: spread max-min {r['spread_full_set']['max_minus_min']['mean']:.3f} "
                  f"(max {r['spread_full_set']['max_minus_min']['max']:.3f}), std {r['spread_full_set']['std']['mean']:.3f}; "
                  + "; ".join(f"{k} rho {v['full_rho']:.3f} mse {v['full_mse']:.3f}" for k, v in r["rules"].items())
                  + f"; companions {r['companions']}", flush=True)
    summary = {
        "spread_full_set": {key: {stat: float(np.mean([r["spread_full_set"][key][stat] for r in rows]))
                                  for stat in rows[0]["spread_full_set"][key]} for key in ("max_minus_min", "std")},
        "rules": {rule: {k: float(np.mean([r["rules"][rule][k] for r in rows])) for k in rows[0]["rules"][rule]}
                  for rule in rows[0]["rules"]},
        "companions_max_abs_diff": {k: max(r["companions"][k] for r in rows) for k in rows[0]["companions"]},
        "positions_32_63_mean_abs_shift": float(np.mean([r["positions_32_63"]["mean_abs_shift_of_clip_mean_vs_0_31"] for r in rows])),
        "positions_32_63_max_minus_min": float(np.mean([r["positions_32_63"]["spread_32_63"]["max_minus_min"]["mean"] for r in rows])),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]), **run_record(),
            "setup": {"model": "mcmoe", "preset": "rg/Ball (epochs shortened)", "prototype_encoding": "batch-position",
                      "videos": args.videos, "feature_dims": RG_DIMS, "score_range": 25.0, "positions": POSITIONS},
            "runs": rows, "mean_over_seeds": summary,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
