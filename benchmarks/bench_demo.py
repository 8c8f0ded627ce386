"""How long `pipeline demo` takes from a warm environment, stage by stage, and what it reports.

    python benchmarks/bench_demo.py --device cpu --json benchmarks/results/demo_cpu.json

Runs the demo with its default settings in a fresh folder (clips, extraction, both trainings,
evaluation and scoring all included; Python start-up and imports counted too) and records each
stage's wall time next to the held-out table it printed. Issue #10's target: at most 5 minutes on a
2-core CPU.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: they are part of what a user waits for

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import cpu_model, run_record  # noqa: E402
from pipeline.cli import main as pipeline_main  # noqa: E402
from pipeline.stages.demo import DemoSettings, run_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings = DemoSettings()
    with tempfile.TemporaryDirectory() as work:
        result = run_demo(Path(work) / "demo", settings, device=args.device, progress=False, pipeline=pipeline_main)
    total = time.perf_counter() - STARTED
    evaluations = result.comparison.evaluations if result.comparison else {}
    record = {
        "command": " ".join(["python", *sys.argv]),
        **run_record(),
        "machine": f"{cpu_model()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}",
        "note": "random-weight tiny backbones on synthetic clips",
        "exit_code": result.code,
        "total_seconds": total,
        "stage_seconds": result.seconds,
        "settings": {k: v for k, v in vars(settings).items()},
        "held_out_rho_per_training_seed": {m: [{s.name: s.rho for s in e.settings} | {"Average": e.average_rho} for e in per_seed]
                                           for m, per_seed in evaluations.items()},
        "table": result.comparison.table if result.comparison else None,
    }
    print(json.dumps(record, indent=2), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
