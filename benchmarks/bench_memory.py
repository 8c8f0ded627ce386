"""Peak memory of `pipeline extract` against video length: it should not grow with the video.

    python benchmarks/bench_memory.py                          # 1-, 10- and 30-minute generated clips
    python benchmarks/bench_memory.py --minutes 1 5 --json out.json

Each clip (320x240, 25 fps, H.264 + AAC, made by ffmpeg's test sources) is extracted by its own
`pipeline extract` process with the tiny random-weight backbones (rgb, flow, audio) on the CPU, and
that process's peak resident memory is read from the kernel (wait4's ru_maxrss), so a busy machine
slows the runs but does not change the figure. The ffmpeg process that decodes a video's audio is a
child of it (~37 MiB, whatever the length): ru_maxrss is the larger of the two peaks, not their sum. Decoding still reads every frame of the video;
`--frame-stride` (default 4) only thins the frames the backbones see, to keep a 30-minute run short.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_extract import run_record  # noqa: E402
from extractors.decode import ffmpeg_binary  # noqa: E402


def long_clip(path: Path, minutes: float) -> Path:
    """A generated clip of `minutes` minutes: moving test pattern and a tone (never held in memory here)."""
    if path.is_file():
        return path
    seconds = f"{minutes * 60:g}"
    command = [ffmpeg_binary(), "-y", "-loglevel", "error",
               "-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=25:duration={seconds}",
               "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
               "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "64k",
               "-shortest", str(path)]
    subprocess.run(command, check=True, capture_output=True)
    return path


def peak_rss_of(command: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """(exit code, peak RSS in MiB, wall seconds, stderr tail) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start, stderr[-500:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 30])
    parser.add_argument("--frame-stride", type=int, default=4)
    parser.add_argument("--modalities", default="rgb,flow,audio")
    parser.add_argument("--batch-segments", type=int, default=None,
                        help="segments per backbone call (default: extract's, 1 on a CPU; 8 is the GPU default)")
    parser.add_argument("--work", type=Path, help="folder for the clips and caches (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--commit", default=None, help="commit of the code measured (default: this tree's HEAD)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_memory_"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    for minutes in args.minutes:
        videos = work / f"videos_{minutes:g}min"
        videos.mkdir(parents=True, exist_ok=True)
        long_clip(videos / "clip.mp4", minutes)
        out = work / f"cache_{minutes:g}min"
        command = [sys.executable, "-m", "pipeline.cli", "extract", "--videos", str(videos), "--out", str(out),
                   "--backbones", "random", "--arch-size", "tiny", "--flow", "farneback", "--device", "cpu",
                   "--frame-stride", str(args.frame_stride), "--modalities", args.modalities, "--quiet"]
        if args.batch_segments:
            command += ["--batch-segments", str(args.batch_segments)]
        code, peak, seconds, stderr = peak_rss_of(command, env)
        if code != 0:
            raise SystemExit(f"extract failed on the {minutes:g}-minute clip (exit {code}): {stderr}")
        manifest = next(out.glob("*/manifest.csv")).read_text().splitlines()
        segments = int(manifest[1].split(",")[manifest[0].split(",").index("T")])
        rows.append({"minutes": minutes, "segments": segments, "peak_rss_mib": round(peak), "wall_s": round(seconds, 1)})
        print(f"{minutes:>5g} min  {segments:>5} segments  peak RSS {peak:7.0f} MiB  ({seconds:.0f} s wall)", flush=True)

    peaks = [r["peak_rss_mib"] for r in rows]
    spread = max(peaks) / min(peaks) - 1
    print(f"largest / smallest peak: +{spread:.1%} (goal: within 20%)")
    result = {
        "what": "peak RSS of one `pipeline extract` process per clip, against clip length",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
                   f"Python {platform.python_version()}",
        "command": " ".join(["python benchmarks/bench_memory.py", *sys.argv[1:]]),
        "extract_command": "pipeline extract --backbones random --arch-size tiny --flow farneback --device cpu "
                           f"--frame-stride {args.frame_stride} --modalities {args.modalities}"
                           + (f" --batch-segments {args.batch_segments}" if args.batch_segments else "")
                           + " (32-frame segments)",
        "clips": "320x240, 25 fps, H.264 + AAC 44.1 kHz, ffmpeg testsrc2 + sine",
        **run_record(),
        **({"commit": args.commit} if args.commit else {}),
        "rows": rows,
        "spread": round(spread, 4),
        "note": "wall times depend on the machine's load; peak RSS does not",
        "flat_within_20_percent": spread <= 0.2,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
