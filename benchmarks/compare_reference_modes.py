"""Each scorer as the project trains it against as its authors do, side by side on the same features.

    python benchmarks/compare_reference_modes.py --model mcmoe --seeds 0 1 2 --json benchmarks/results/mcmoe_modes.json
    python benchmarks/compare_reference_modes.py --model limssr --seeds 0 1 2 --json benchmarks/results/limssr_modes.json
    python benchmarks/compare_reference_modes.py --model mcmoe-precision --seeds 0 1 2 --json benchmarks/results/mcmoe_precision.json

One synthetic RG-shaped feature cache (seeded; rgb 1024, flow 1024, audio 768 per segment) with a
train/test split; for every seed, the two modes train one after the other (interleaved, so machine
load hits both alike) through the ordinary `pipeline train` code, select on validation, and are
evaluated on the test rows:
- mcmoe: `per-sample` (mask_policy incomplete, experts' statistics in the cache's modality order: the
  default without a preset) against `per-batch` (incomplete-per-batch and the reference's order: the
  presets' reproduction mode);
- limssr: `--limssr-variant project` against `reference` (each with its own training defaults), on the
  LLM given by --llm (default: a tiny random Qwen2 written to a temporary folder);
- mcmoe-precision: MCMoE with its defaults trained with `--precision fp32` against `bf16` (needs a
  device that computes bfloat16 natively): whether bf16 keeps the held-out rho within seed noise.
Reported per run: rho Average (Fisher z over the six incomplete settings) and full set, seconds per
epoch, trainable parameters; then the mean over seeds per mode. Synthetic features say whether the
modes differ, not what either scores on a real benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import run_record  # noqa: E402
from pipeline.stages.evaluate import evaluate_labels  # noqa: E402
from pipeline.stages.train import train  # noqa: E402
from pipeline.train_config import resolve_config  # noqa: E402
from tests.synthetic import write_labels, write_synthetic_cache  # noqa: E402

MODES = {
    "mcmoe": {
        "per-sample": ({"mask_policy": "incomplete"}, {"expert_stats_order": "modalities"}),
        "per-batch": ({"mask_policy": "incomplete-per-batch"}, {"expert_stats_order": "reference"}),
    },
    "limssr": {"project": ({}, {"variant": "project"}), "reference": ({}, {"variant": "reference"})},
    "mcmoe-precision": {"fp32": ({"precision": "fp32"}, {}), "bf16": ({"precision": "bf16"}, {})},
}
MODEL = {"mcmoe-precision": "mcmoe"}  # the scorer a comparison trains, where its name is not one
RG_DIMS = {"rgb": 1024, "flow": 1024, "audio": 768}


def run_one(model: str, mode: str, seed: int, cache, labels: Path, work: Path, args) -> dict:
    overrides, options = MODES[model][mode]
    overrides = {**overrides, "seed": seed, "clip_num": args.clip_num, "score_range": 25.0, "val_fraction": 0.2}
    if args.epochs:
        overrides["epochs"] = args.epochs
    if model == "limssr":
        options = {**options, "llm": str(args.llm)}
    out = work / f"{mode}-seed{seed}"
    config, _ = resolve_config(cache.root, labels, out, model=MODEL.get(model, model), overrides=overrides,
                               model_options=options)
    started = time.perf_counter()
    train(config, device=args.device, progress=False, log=lambda message: None)
    seconds = time.perf_counter() - started
    result = evaluate_labels(out, labels, device=args.device, say=lambda m: None, show=lambda m: None)
    info = json.loads((out / "run.json").read_text())
    full = next(s.rho for s in result.evaluation.settings if s.complete)
    return {"mode": mode, "seed": seed, "average_rho": result.evaluation.average_rho, "full_rho": full,
            "seconds_per_epoch": seconds / config.epochs, "epochs": config.epochs,
            "trainable_parameters": info["num_trainable_parameters"], "mask_policy": config.mask_policy,
            "precision": config.precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODES), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="(default: the model's own: mcmoe 300, limssr 100)")
    parser.add_argument("--videos", type=int, default=300, help="synthetic videos (70%% train+val, 30%% test)")
    parser.add_argument("--clip-num", type=int, default=68)
    parser.add_argument("--llm", type=Path, help="limssr: local LLM folder (default: a tiny random Qwen2)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.model == "limssr" and args.llm is None:
            from models.tiny_llm import save_tiny_llm

            args.llm = save_tiny_llm(work / "tiny-llm")
        made = write_synthetic_cache(work / "cache", num_videos=args.videos, length_range=(args.clip_num, args.clip_num + 20),
                                     feature_dims=RG_DIMS, seed=123, noise=1.0, score_range=25.0)
        ids = sorted(made.scores)
        splits = {v: "test" if i % 10 >= 7 else "train" for i, v in enumerate(ids)}
        labels = write_labels(work / "labels.csv", made.scores, splits)
        for seed in args.seeds:
            for mode in MODES[args.model]:
                rows.append(run_one(args.model, mode, seed, made.cache, labels, work, args))
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    summary = {}
    for mode in MODES[args.model]:
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {k: float(np.mean([r[k] for r in mine])) for k in ("average_rho", "full_rho", "seconds_per_epoch")}
        summary[mode]["trainable_parameters"] = mine[0]["trainable_parameters"]
        print(f"{mode:11} rho Average {summary[mode]['average_rho']:.3f}  full {summary[mode]['full_rho']:.3f}  "
              f"{summary[mode]['seconds_per_epoch']:.2f} s/epoch  {summary[mode]['trainable_parameters']:,} trainable")
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]), **run_record(),
            "runs": rows, "mean_over_seeds": summary,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
