"""What the CPU inference options the ecosystem offers do for the frozen backbones, one try each (#13).

    python benchmarks/bench_cpu_backends.py --json benchmarks/results/cpu_backends.json

For Video Swin-B and the I3D flow stream (full size, random weights, one 32-frame segment at 224x224),
times the network as the extractors run it today (fp32, Swin's fused window attention, inference
mode) against each try alone: torch.no_grad instead of inference_mode, channels-last 3D memory, bf16
autocast and torch.compile. Prints the
time ratio of each try (> 1: faster) and its largest output difference relative to the output's scale,
or the error that stopped it. Needs an idle machine; one warm-up and `--repeats` timed calls each.
Each network runs in a process of its own: run after Swin-B (and after a failed torch.compile, whose
compiler workers linger), the I3D timings were 4x slower.

ONNX Runtime (optional, not a dependency of the project; without it its row says "not installed"):
the network is exported with torch.onnx.export (this torch's default exporter, then dynamo=False if
that fails) and run on the CPUExecutionProvider with all graph optimisations and torch's thread count.
Its ratio is measured apart from the others: eager and ONNX Runtime calls alternate in one process and
the medians are compared, so that load from other work on the machine falls on both alike.

    python benchmarks/bench_cpu_backends.py --onnx-only --repeats 5 --json benchmarks/results/cpu_backends_onnx.json
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

from benchmarks.bench_extract import device_name, git_commit  # noqa: E402
from extractors.i3d import inception_i3d  # noqa: E402
from extractors.rgb_vst import fuse_window_attention  # noqa: E402

try:
    import onnxruntime
except ImportError:  # optional: the ONNX Runtime row then says so
    onnxruntime = None

ONNX_RUNTIME = "ONNX Runtime (CPU, ORT_ENABLE_ALL)"


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


def short_error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


# The default (dynamo) exporter's own graph optimisation (onnxscript) had not finished on Video Swin-B
# after 15 minutes, and ONNX Runtime optimises the graph itself; but without it I3D's bias-less Conv3d
# gets a zero bias of shape (out, in) that ONNX Runtime refuses (torch 2.11, onnxscript 0.7.2).
EXPORT_OPTIMIZE = {"Video Swin-B": False, "I3D flow": True}


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path, optimize: bool) -> dict[str, object]:
    """Exports `model` to `path` with torch.onnx.export's default exporter, else dynamo=False.

    Returns which exporter worked (None if neither), its seconds and the errors of those that failed."""
    errors = {}
    for exporter, options in ((f"default (dynamo), optimize={optimize}", {"optimize": optimize}),
                              ("dynamo=False", {"dynamo": False})):
        started = time.perf_counter()
        try:
            torch.onnx.export(model, (x,), str(path), **options)
        except Exception as exc:  # noqa: BLE001 - an exporter that fails is a result
            errors[exporter] = short_error(exc)
            continue
        return {"exporter": exporter, "export_seconds": time.perf_counter() - started, "export_errors": errors}
    return {"exporter": None, "export_errors": errors}


def onnx_runtime(model: torch.nn.Module, x: torch.Tensor, repeats: int, optimize: bool) -> dict[str, object]:
    """ONNX Runtime against today's eager call, alternating the two in this process (medians)."""
    if onnxruntime is None:
        return {"error": "not installed"}
    row: dict[str, object] = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "model.onnx"
        row.update(export_onnx(model, x, path, optimize))
        if row["exporter"] is None:
            row["error"] = "export failed"
            return row
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        started = time.perf_counter()
        try:  # the weights sit next to the graph (external data): load them before the folder goes
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            row["error"] = short_error(exc)
            return row
        row["session_seconds"] = time.perf_counter() - started
    inputs = {session.get_inputs()[0].name: x.numpy()}

    def ort_call() -> torch.Tensor:
        return torch.from_numpy(session.run(None, inputs)[0])

    eager_call = in_inference_mode(lambda: model(x))
    expected = eager_call()  # warm-up of both
    try:
        out = ort_call()
    except Exception as exc:  # noqa: BLE001
        row["error"] = short_error(exc)
        return row
    eager_s, ort_s = [], []
    for _ in range(repeats):
        for call, times in ((eager_call, eager_s), (ort_call, ort_s)):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    eager, ort = statistics.median(eager_s), statistics.median(ort_s)
    # speedup: ratio of the medians; paired_speedup: median of each eager call over the ORT call after
    # it, steadier when the load on the machine changes during the run
    paired = statistics.median(e / o for e, o in zip(eager_s, ort_s))
    row.update(seconds=ort, eager_seconds=eager, speedup=eager / ort, paired_speedup=paired,
               eager_times=eager_s, ort_times=ort_s,
               relative_difference=((out - expected).abs().max() / expected.abs().max()).item())
    return row


def measure_onnx(name: str, repeats: int) -> dict[str, dict]:
    model, x = network(name)
    row = onnx_runtime(model, x, repeats, EXPORT_OPTIMIZE[name])
    if "error" in row:
        print(f"{name}: {ONNX_RUNTIME} failed: {row['error']} {row.get('export_errors', '')}", flush=True)
    else:
        print(f"{name}: {ONNX_RUNTIME} {row['seconds']:.2f} s against eager {row['eager_seconds']:.2f} s"
              f" (interleaved)  {row['speedup']:.2f}x (paired {row['paired_speedup']:.2f}x)  difference {row['relative_difference']:.1e}"
              f"  (export {row['exporter']} {row['export_seconds']:.1f} s)", flush=True)
    return {ONNX_RUNTIME: row}


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
            error = short_error(exc)
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
    rows.update(measure_onnx(name, repeats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--network", choices=NETWORKS, help="measure this one here (the default runs each in a child)")
    parser.add_argument("--onnx-only", action="store_true", help="only the ONNX Runtime try (its own eager timing)")
    parser.add_argument("--threads", type=int, help="torch's and ONNX Runtime's threads (default: torch's default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.network:
        rows = (measure_onnx if args.onnx_only else measure)(args.network, args.repeats)
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
                            "--json", str(out)] + ["--onnx-only"] * args.onnx_only
                           + ["--threads", str(args.threads)] * bool(args.threads), check=True)
            results["networks"][name] = json.loads(out.read_text())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
