"""Spread over seeds of what tests/test_learning.py asserts, to choose and justify its thresholds.

    python benchmarks/learning_spread.py --seeds 0 1 2 3 4 --json benchmarks/results/learning_spread.json

Each seed runs the reduced demo (its own clips, backbone weights and training draws) in a fresh
folder and reports: MCMoE's and the Baseline's held-out rho in every setting (the full set, each
modality alone, each pair), the Average of the incomplete settings, and the full-set rho on copies
of the test clips whose every signal is flattened (what a model that learned nothing from the pixels
and sound would get). The results file names the commit, the CPU (family and model) and the date:
rho moves with the last bits of the floats, so a threshold set from it holds for that code.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import run_record  # noqa: E402
from tests.learning import flat_clip_rho, run_reduced_demo  # noqa: E402


def measure(seed: int, work: Path) -> dict:
    started = time.perf_counter()
    run = run_reduced_demo(work / f"seed{seed}", seed)
    row = {"seed": seed}
    for model, (evaluation,) in run.result.comparison.evaluations.items():
        for setting in evaluation.settings:
            row[f"{model}_{setting.name}"] = setting.rho
        row[f"{model}_average"] = evaluation.average_rho
        row[f"{model}_full_flattened"] = flat_clip_rho(run, model)
    row["seconds"] = time.perf_counter() - started
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            rows.append(measure(seed, Path(work)))
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    keys = [k for k in rows[0] if k not in ("seed", "seconds")]
    summary = {k: {"min": float(np.min([r[k] for r in rows])), "mean": float(np.mean([r[k] for r in rows])),
                   "max": float(np.max([r[k] for r in rows]))} for k in keys}
    for key, stats in summary.items():
        print(f"{key:24} min {stats['min']:.3f}  mean {stats['mean']:.3f}  max {stats['max']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]), **run_record(),
            "machine": f"{platform.machine()} CPU, {platform.python_version()}",
            "note": "random-weight tiny backbones on synthetic clips", "rows": rows, "summary": summary,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
