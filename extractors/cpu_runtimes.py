"""A frozen network run by another inference library on a CPU: ONNX Runtime or OpenVINO (`flow_runtime`
in the ExtractionConfig, `pipeline extract --flow-runtime`).

Both are optional: `pip install -e ".[onnx]"` (onnxruntime, and onnx + onnxscript for torch's exporter)
or `pip install -e ".[openvino]"`. benchmarks/bench_cpu_backends.py times both against eager torch
(channels-last, oneDNN) on one 32-frame segment: the I3D flow stream gains from either, Video Swin-B
from neither (OpenVINO traces it with torchvision's own attention, as ours does not trace), so only the
I3D is offered (extractors/flow_i3d.py; figures in benchmarks/results/README.md, "CPU inference
options, one try each").

The network is converted once per input shape when it is first called (seconds for the full I3D), in
memory; nothing is written to disk. Same weights, the same sums in another order: the extractor tests
hold the features within 1e-5 of the eager ones' largest value.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import warnings

import torch
from torch import nn

from extractors.base import BackboneUnavailableError

RUNTIMES = ("onnxruntime", "openvino")
# The packages each runtime needs, and the extra of setup.cfg that installs them.
PACKAGES = {"onnxruntime": ("onnxruntime", "onnx", "onnxscript"), "openvino": ("openvino",)}
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}


def import_runtime(runtime: str):
    """The runtime's module, or BackboneUnavailableError saying how to install it."""
    try:
        modules = [importlib.import_module(name) for name in PACKAGES[runtime]]
    except ImportError as exc:
        raise BackboneUnavailableError(
            f"--flow-runtime {runtime} needs {exc.name}, which is not installed: pip install -e \".[{EXTRAS[runtime]}]\""
        ) from None
    return modules[0]


def runtime_version(runtime: str) -> str:
    """"<runtime> <version>", as config.json's extractor description records the library that ran it."""
    return f"{runtime} {import_runtime(runtime).__version__}"


class _Method(nn.Module):
    """`module.<method>` as a module's forward, so the converters trace that method (I3D's extract_features)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.module, self.method)(x)


class RuntimeNetwork:
    """`module.<method>(x)` for float32 CPU tensors, computed by `runtime` (RUNTIMES) on torch's thread count,
    in `precision` ("fp32", or "bf16": OpenVINO only; ONNX Runtime's CPU kernels have no bf16).

    One converted network per input shape, made on first use. The converters print their progress and
    warn about tracing: not the user's concern here, so both are kept off the terminal."""

    def __init__(self, runtime: str, module: nn.Module, method: str = "forward", optimize: bool = True,
                 precision: str = "fp32") -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if precision == "bf16" and runtime != "openvino":
            raise BackboneUnavailableError(
                f"--flow-runtime {runtime} computes in fp32 only: use --flow-runtime openvino or torch for --precision bf16")
        self.precision = precision
        self.runtime, self.library = runtime, import_runtime(runtime)
        self.module = _Method(module, method).eval()
        # torch's ONNX exporter's own graph optimisation (onnxscript) folds I3D's bias-less convolutions'
        # placeholder biases, which ONNX Runtime would refuse (torch 2.11, onnxscript 0.7.2); on Video
        # Swin-B it runs too long to be of use (benchmarks/bench_cpu_backends.py exports it without).
        self.optimize = optimize
        self.compiled: dict[tuple[int, ...], object] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise ValueError(f"{self.runtime} runs float32 CPU tensors here, got {x.dtype} on {x.device}")
        shape = tuple(x.shape)
        if shape not in self.compiled:
            # The runtime computes in its own `precision`: a caller's autocast must not enter the traced graph.
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.autocast("cpu", enabled=False):
                warnings.simplefilter("ignore")
                self.compiled[shape] = getattr(self, f"_compile_{self.runtime}")(torch.zeros(shape))
        return self.compiled[shape](x.contiguous().numpy())

    def _compile_onnxruntime(self, example: torch.Tensor):
        program = torch.onnx.export(self.module, (example,), dynamo=True, optimize=self.optimize, verbose=False)
        options = self.library.SessionOptions()
        options.graph_optimization_level = self.library.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        # Spinning threads between calls would starve the decoder and the other backbones of the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = self.library.InferenceSession(
            program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda array: torch.from_numpy(session.run(None, {name: array})[0])

    def _compile_openvino(self, example: torch.Tensor):
        # The precision explicitly: on a CPU with AVX512_BF16 OpenVINO would otherwise always compute in bf16.
        hint = "bf16" if self.precision == "bf16" else "f32"
        compiled = self.library.compile_model(self.library.convert_model(self.module, example_input=example), "CPU", {
            "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        request, output = compiled.create_infer_request(), compiled.output(0)
        return lambda array: torch.from_numpy(request.infer([array])[output].copy())
