"""What the CPU inference options the ecosystem offers do for the frozen backbones, one try each (#13).

    python benchmarks/bench_cpu_backends.py --json benchmarks/results/cpu_backends.json

For Video Swin-B and the I3D flow stream (full size, random weights, one 32-frame segment at 224x224),
times the network as the extractors run it today (fp32, Swin's fused window attention, inference
mode) against each try alone: torch.no_grad instead of inference_mode, channels-last 3D memory, bf16
autocast (this CPU has AVX2/FMA and no AVX-512 BF16, so bf16 is emulated) and torch.compile. Prints the
time ratio of each try (> 1: faster) and its largest output difference relative to the output's scale,
or the error that stopped it. Needs an idle machine; one warm-up and `--repeats` timed calls each.
Each network runs in a process of its own: run after Swin-B (and after a failed torch.compile, whose
compiler workers linger), the I3D timings were 4x slower.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models.video import swin3d_b

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import device_name, git_commit  # noqa: E402
from extractors.i3d import inception_i3d  # noqa: E402
from extractors.rgb_vst import fuse_window_attention  # noqa: E402


def network(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "Video Swin-B":
        swin = fuse_window_attention(swin3d_b())
        swin.head = torch.nn.Identity()
        return swin.eval(), torch.randn(1, 3, 32, 224, 224)
    return inception_i3d(in_channels=2).eval(), torch.randn(1, 2, 32, 224, 224)


NETWORKS = ("Video Swin-B", "I3D flow")


def run_time(call, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(seconds of the first call: kernel choice, compilation; seconds per later call; the output)."""
    start = time.perf_counter()
    out = call()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        out = call()
    return first, (time.perf_counter() - start) / repeats, out.float()


def in_inference_mode(fn):
    def call():
        with torch.inference_mode():
            return fn()
    return call


def tries(model: torch.nn.Module, x: torch.Tensor) -> dict[str, object]:
    """Each try as a builder of a zero-argument call (a failing build is that try's result)."""
    def channels_last():
        converted = model.to(memory_format=torch.channels_last_3d)
        fast_x = x.contiguous(memory_format=torch.channels_last_3d)
        return in_inference_mode(lambda: converted(fast_x))

    def bf16():
        def call():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x)
        return call

    def compiled():
        compiled_model = torch.compile(model)
        return in_inference_mode(lambda: compiled_model(x))

    def no_grad():
        def call():
            with torch.no_grad():
                return model(x)
        return call

    return {"no_grad instead of inference_mode": no_grad, "channels-last 3D": channels_last,
            "bf16 autocast": bf16, "torch.compile": compiled}


def measure(name: str, repeats: int) -> dict[str, dict]:
    model, x = network(name)
    _, base_s, expected = run_time(in_inference_mode(lambda: model(x)), repeats)
    rows: dict[str, dict] = {"today (fp32, inference_mode)": {"seconds": base_s}}
    print(f"{name}: today {base_s:.2f} s per segment", flush=True)
    for label, build in tries(model, x).items():
        started = time.perf_counter()
        try:
            first, seconds, out = run_time(build(), repeats)
        except Exception as exc:  # noqa: BLE001 - a try that cannot run is a result
            error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
            rows[label] = {"error": error, "seconds_until_error": time.perf_counter() - started}
            print(f"  {label:36s} failed: {error}", flush=True)
            continue
        finally:
            model.to(memory_format=torch.contiguous_format)
        difference = ((out - expected).abs().max() / expected.abs().max()).item()
        rows[label] = {"seconds": seconds, "first_call_seconds": first, "speedup": base_s / seconds,
                       "relative_difference": difference}
        print(f"  {label:36s} {seconds:6.2f} s  {base_s / seconds:5.2f}x  difference {difference:.1e}"
              f"  (first call {first:.1f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--network", choices=NETWORKS, help="measure this one here (the default runs each in a child)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.network:
        rows = measure(args.network, args.repeats)
        if args.json:
            args.json.write_text(json.dumps(rows))
        return
    results = {"device": device_name(torch.device("cpu")), "commit": git_commit(), "threads": torch.get_num_threads(),
               "command": "python benchmarks/bench_cpu_backends.py " + " ".join(sys.argv[1:]), "networks": {}}
    print(f"{results['device']}, commit {results['commit']}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        for name in NETWORKS:
            out = Path(work) / "rows.json"
            subprocess.run([sys.executable, __file__, "--network", name, "--repeats", str(args.repeats),
                            "--json", str(out)], check=True)
            results["networks"][name] = json.loads(out.read_text())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
