"""`pipeline demo`: the whole flow on clips the project makes itself, in one output folder.

sample clips (some without audio) + labels -> extract (RANDOM-weight backbones) -> train MCMoE ->
evaluate on held-out clips -> score a clip the model never saw. Minutes on a 2-core CPU. The backbones
have random weights (no machine here can download the real ones), so the numbers show that the
machinery works end to end, not how well it scores.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.samples import ClipSpec, sample_set, score_of, write_clip

BANNER = "=" * 78


@dataclass(frozen=True)
class DemoSettings:
    clips: int = 14  # labelled clips; the last quarter is the test split
    epochs: int = 30
    arch_size: str = "tiny"  # "full" runs the real-size architectures (still random weights): slower
    segment_frames: int = 32
    seed: int = 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_dataset(out: Path, settings: DemoSettings) -> tuple[Path, Path, Path]:
    """Clips in out/videos, labels.csv (video_id,score,split: train/test), one unseen clip in out/new/."""
    videos, specs = out / "videos", sample_set(settings.clips, seed=settings.seed)
    test_count = max(2, settings.clips // 4)
    labels = out / "labels.csv"
    out.mkdir(parents=True, exist_ok=True)
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "score", "split"])
        for index, spec in enumerate(specs):
            path = videos / f"{spec.name}.mp4"
            if not path.is_file():
                write_clip(spec, path)
            split = "test" if index >= settings.clips - test_count else "train"
            writer.writerow([spec.name, score_of(spec.quality), split])
    unseen = out / "new" / "unseen_no_audio.mp4"
    if not unseen.is_file():
        write_clip(ClipSpec("unseen", 0.8, seconds=3.5, with_audio=False, seed=settings.seed + 999), unseen)
    return videos, labels, unseen


def run_demo(out: Path, settings: DemoSettings = DemoSettings(), device: str = "auto", progress: bool = True) -> int:
    """Make the sample data, then run the same `pipeline` commands a user would, printing each."""
    from pipeline.cli import main  # the demo drives the real command line

    out = Path(out).expanduser()
    _say(f"{BANNER}\nDEMO. The backbones use RANDOM WEIGHTS (no pretrained weights are downloaded here):\n"
         f"every number below shows the machinery working, NOT scoring accuracy.\n{BANNER}")
    _say(f"\n[1/5] making {settings.clips} labelled sample clips and 1 unseen clip (no audio) in {out}")
    videos, labels, unseen = make_dataset(out, settings)
    quiet = [] if progress else ["--quiet"]
    steps = [
        ("[2/5] extract features: rgb (Video Swin), flow (Farneback + I3D), audio (AST); "
         f"{settings.arch_size} architectures, random weights",
         ["extract", "--videos", str(videos), "--out", str(out / "cache"), "--backbones", "random",
          "--arch-size", settings.arch_size, "--flow", "farneback", "--segment-frames", str(settings.segment_frames),
          "--seed", str(settings.seed), "--device", device, *quiet]),
        (f"[3/5] train MCMoE for {settings.epochs} epochs (the checkpoint is chosen on a validation split of the training clips)",
         ["train", "--features", str(out / "cache"), "--labels", str(labels), "--out", str(out / "run"),
          "--epochs", str(settings.epochs), "--batch-size", "8", "--seed", str(settings.seed), "--device", device,
          *(["--resume"] if (out / "run" / "run.json").is_file() else []), *quiet]),
        ("[4/5] evaluate on the held-out test clips, every modality combination",
         ["evaluate", "--run", str(out / "run"), "--labels", str(labels), "--plot", str(out / "test_predictions.png"),
          "--device", device]),
        ("[5/5] score a clip the model never saw; it has no audio track, so audio is imputed",
         ["score", str(unseen), "--run", str(out / "run"), "--out", str(out / "scores.csv"), "--device", device, *quiet]),
    ]
    for title, argv in steps:
        _say(f"\n{title}\n$ pipeline {' '.join(argv)}")
        code = main(argv)
        if code != 0:
            _say(f"demo stopped: `pipeline {argv[0]}` exited with {code}")
            return code

    print(f"\n{BANNER}\nDemo finished. Everything is under {out}:\n"
          f"  clips and labels  {videos}/, {labels} (split column: train / test)\n"
          f"  features          {out / 'cache'}/<config-hash>/ (config.json, manifest.csv)\n"
          f"  trained model     {out / 'run'}/ (run.json, best.safetensors, train_log.csv, evaluation/)\n"
          f"  plot and scores   {out / 'test_predictions.png'}, {out / 'scores.csv'}\n"
          "These numbers come from RANDOM-WEIGHT backbones and a dozen synthetic clips: no accuracy claim.\n\n"
          "The same on your own videos, with pretrained weights (add --weights-dir DIR when offline):\n"
          "  pipeline extract --videos ~/videos --out ~/cache\n"
          "  pipeline train --features ~/cache --labels labels.csv --out runs/mine --preset rg --action Ball\n"
          "  pipeline evaluate --run runs/mine --labels test.csv --plot runs/mine/test.png\n"
          f"  pipeline score new_clip.mp4 --run runs/mine --out scores.csv\n{BANNER}")
    return 0
