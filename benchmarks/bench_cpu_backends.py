"""What the CPU inference options the ecosystem offers do for the frozen backbones, one try each (#13).

    python benchmarks/bench_cpu_backends.py --json benchmarks/results/cpu_backends.json
    python benchmarks/bench_cpu_backends.py --networks "Video Swin-B" --tries torch.compile --repeats 5

For Video Swin-B and the I3D flow stream (full size, random weights, one 32-frame segment at 224x224),
times the network as the extractors run it today (fp32, inference mode; Swin's fused window attention
and oneDNN linears, I3D channels-last: extractors/onednn.py, README "Speed on a CPU") against each try
alone:
- torch's defaults for what the extractors now choose (`--cpu-linear torch`, `--memory-format
  contiguous`): how much today's choice gains;
- torch.no_grad instead of inference_mode; bf16 autocast (this AMD EPYC has AVX-512 BF16, which oneDNN
  uses); torch.compile (inductor), also with frozen weights;
- ONNX Runtime and OpenVINO, when installed (`pip install -e ".[onnx]"`, `".[openvino]"`; otherwise
  their rows say how): the network with torch's own layers, converted and run as `--flow-runtime`
  runs the I3D (extractors/cpu_runtimes.py: torch's dynamo exporter and every graph optimisation, or
  OpenVINO's converter and its CPU plugin in fp32; torch's thread count).
After one warm-up call of each, today's call and the try's call alternate `--repeats` times, so a load
that comes and goes on a shared machine hits both alike; prints the ratio of the medians (> 1: faster),
the first call's time (compilation, export) and the largest output difference relative to the output's
largest value, or the error that stopped the try (for a C++ compile error, gcc's first error line too).
Each network runs in a process of its own: run after Swin-B (and after a failed torch.compile, whose
compiler workers linger), the I3D timings were 4x slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.models.video import swin3d_b

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_extract import device_name, run_record  # noqa: E402
from extractors.i3d import inception_i3d  # noqa: E402
from extractors.onednn import use_onednn_linears  # noqa: E402
from extractors.base import BackboneUnavailableError  # noqa: E402
from extractors.cpu_runtimes import RUNTIMES, RuntimeNetwork, import_runtime  # noqa: E402
from extractors.rgb_vst import use_window_attention  # noqa: E402

def network(name: str, today: bool = True, fused: bool = True) -> tuple[torch.nn.Module, torch.Tensor]:
    """The network and its input as the extractors run them today, or with torch's defaults instead of
    the oneDNN linears (Swin-B) and the channels-last layout (I3D); `fused=False`: Swin-B with
    torchvision's own window attention. The same weights either way."""
    torch.manual_seed(0)
    if name == "Video Swin-B":
        swin = use_window_attention(swin3d_b()) if fused else swin3d_b()
        swin.head = torch.nn.Identity()
        swin = (use_onednn_linears(swin) if today else swin).eval().requires_grad_(False)
        return swin, torch.randn(1, 3, 32, 224, 224)
    i3d, x = inception_i3d(in_channels=2).eval().requires_grad_(False), torch.randn(1, 2, 32, 224, 224)
    layout = torch.channels_last_3d if today else torch.contiguous_format
    return i3d.to(memory_format=layout), x.contiguous(memory_format=layout)


NETWORKS = ("Video Swin-B", "I3D flow")
TRIES = ("torch's defaults (MKL linears, contiguous)", "no_grad instead of inference_mode", "bf16 autocast",
         "torch.compile", "torch.compile, frozen weights", "ONNX Runtime", "OpenVINO")

# See RuntimeNetwork: torch's ONNX exporter's optimisation is needed for I3D and never ends on Swin-B.
EXPORT_OPTIMIZE = {"Video Swin-B": False, "I3D flow": True}


def runtime_versions() -> dict[str, str | None]:
    versions = {}
    for runtime in RUNTIMES:
        try:
            versions[runtime] = import_runtime(runtime).__version__
        except BackboneUnavailableError:  # optional: its row then says how to install it
            versions[runtime] = None
    return versions


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def in_inference_mode(fn):
    def call():
        with torch.inference_mode():
            return fn()
    return call


def runtime_call(runtime: str, name: str):
    """The network with torch's own layers, converted and run by `runtime` as the extractors do. OpenVINO
    traces the network, which our fused window attention does not survive: Swin-B goes with torchvision's."""
    model, x = network(name, today=False, fused=runtime != "openvino")
    other = RuntimeNetwork(runtime, model, optimize=EXPORT_OPTIMIZE[name])
    return lambda: other(x)


def tries(name: str, model: torch.nn.Module, x: torch.Tensor) -> dict[str, object]:
    """Each try as a builder of a zero-argument call (a failing build is that try's result)."""
    def torch_defaults():
        plain, plain_x = network(name, today=False)
        return in_inference_mode(lambda: plain(plain_x))

    def bf16():
        def call():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x)
        return call

    def compiled(**options):
        # Builds for Swin-B since its shifted-window mask is arithmetic (rgb_vst.shifted_window_mask):
        # torchvision's slice-assigned mask hits pytorch/pytorch#179135 in torch 2.10/2.11's C++ code.
        compiled_model = torch.compile(model, options=options)
        return in_inference_mode(lambda: compiled_model(x))

    def frozen():
        # Inductor's freezing: weights become constants, folded and prepacked for oneDNN's linear/conv.
        return compiled(freezing=True)

    def no_grad():
        def call():
            with torch.no_grad():
                return model(x)
        return call

    return dict(zip(TRIES, (torch_defaults, no_grad, bf16, compiled, frozen, lambda: runtime_call("onnxruntime", name),
                             lambda: runtime_call("openvino", name))))


def compiler_error(exc: Exception) -> str:
    """The exception's first line and, for a C++ compile error, gcc's first error line."""
    lines = str(exc).strip().splitlines() or [""]
    gcc = next((line.strip() for line in lines if "error:" in line), "")
    return f"{type(exc).__name__}: {lines[0][:300]}" + (f" ({gcc[:400]})" if gcc else "")


def measure(name: str, repeats: int, only: list[str] | None = None) -> dict[str, dict]:
    model, x = network(name)
    today = in_inference_mode(lambda: model(x))
    expected = today().float()
    rows: dict[str, dict] = {}
    for label, build in tries(name, model, x).items():
        if only and label not in only:
            continue
        started = time.perf_counter()
        try:
            call = build()
            out = call().float()
            first = time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - a try that cannot run is a result
            rows[label] = {"error": compiler_error(exc), "seconds_until_error": time.perf_counter() - started}
            print(f"{name}: {label:44s} failed: {rows[label]['error']}", flush=True)
            continue
        base_times, try_times = [], []
        for _ in range(repeats):
            base_times.append(seconds(today))
            try_times.append(seconds(call))
        base_s, try_s = statistics.median(base_times), statistics.median(try_times)
        difference = ((out - expected).abs().max() / expected.abs().max()).item()
        rows[label] = {"seconds": try_s, "today_seconds": base_s, "first_call_seconds": first,
                       "speedup": base_s / try_s, "relative_difference": difference,
                       "times": try_times, "today_times": base_times}
        print(f"{name}: {label:44s} {try_s:6.2f} s (today {base_s:.2f} s)  {base_s / try_s:5.2f}x  "
              f"difference {difference:.1e}  (first call {first:.1f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed calls of each")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--tries", nargs="+", choices=TRIES, help="only these tries (default: all)")
    parser.add_argument("--threads", type=int, help="torch's and ONNX Runtime's threads (default: torch's default)")
    parser.add_argument("--network", choices=NETWORKS, help=argparse.SUPPRESS)  # one network, in a child
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.network:
        rows = measure(args.network, args.repeats, args.tries)
        if args.json:
            args.json.write_text(json.dumps(rows))
        return
    results = {"device": device_name(torch.device("cpu")), **run_record(), "threads": torch.get_num_threads(),
               **runtime_versions(),
               "command": "python benchmarks/bench_cpu_backends.py " + " ".join(sys.argv[1:]), "networks": {}}
    print(f"{results['device']}, commit {results['commit']}, {results['date']}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        for name in args.networks:
            out = Path(work) / "rows.json"
            subprocess.run([sys.executable, __file__, "--network", name, "--repeats", str(args.repeats),
                            "--json", str(out)] + (["--tries", *args.tries] if args.tries else [])
                           + (["--threads", str(args.threads)] if args.threads else []), check=True)
            results["networks"][name] = json.loads(out.read_text())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
