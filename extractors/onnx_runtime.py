"""A frozen network run by ONNX Runtime on a CPU (`onnxruntime_modalities` in the ExtractionConfig).

Optional: needs `pip install -e ".[onnx]"` (onnxruntime, and onnx + onnxscript for torch's exporter).
Measured by benchmarks/bench_cpu_backends.py on 2-core AMD EPYCs, one 32-frame segment: the full I3D
flow stream ran 1.72x (Zen 5) and 1.34x (Zen 4) faster than eager torch (channels-last, oneDNN),
features within 5.4e-7 of their scale; Video Swin-B ran 0.80x, so only the I3D is offered
(extractors/flow_i3d.py).

The network is exported once per input shape when it is first called (about 5 s for the full I3D),
in memory; nothing is written to disk. Same weights, the same sums in another order: the extractor
tests hold the features within 1e-5 of the eager ones' largest value.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
from torch import nn

from extractors.base import BackboneUnavailableError

INSTALL_HINT = 'pip install -e ".[onnx]" (onnxruntime, onnx, onnxscript)'


def import_onnxruntime():
    """The onnxruntime module, or BackboneUnavailableError saying how to install it."""
    try:
        import onnx  # noqa: F401 - torch's exporter needs both
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise BackboneUnavailableError(
            f"onnxruntime_modalities needs ONNX Runtime and torch's exporter ({exc.name} is missing): {INSTALL_HINT}"
        ) from None
    return onnxruntime


def onnxruntime_version() -> str:
    """"onnxruntime <version>", as config.json's extractor description records the library that ran it."""
    return f"onnxruntime {import_onnxruntime().__version__}"


class _Method(nn.Module):
    """`module.<method>` as a module's forward, so the exporter traces that method (I3D's extract_features)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.module, self.method)(x)


class OnnxRuntimeNetwork:
    """`module.<method>(x)` for float32 CPU tensors, computed by ONNX Runtime's CPU provider.

    One inference session per input shape, exported on first use. ONNX Runtime gets torch's thread count
    and does not spin its threads between calls (spinning would starve the decoder and the other
    backbones of this 2-core machine's cores)."""

    def __init__(self, module: nn.Module, method: str = "forward", optimize: bool = True) -> None:
        self.onnxruntime = import_onnxruntime()
        self.module = _Method(module, method).eval()
        # The exporter's own graph optimisation (onnxscript) folds I3D's bias-less convolutions' placeholder
        # biases, which ONNX Runtime would refuse (torch 2.11, onnxscript 0.7.2); on Video Swin-B it had not
        # finished after 15 minutes (benchmarks/bench_cpu_backends.py exports Swin-B without it).
        self.optimize = optimize
        self.sessions: dict[tuple[int, ...], object] = {}

    def session(self, shape: tuple[int, ...]):
        if shape not in self.sessions:
            example = torch.zeros(shape)
            # The exporter prints its progress and warns about opset choices: not the user's concern here.
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(self.module, (example,), dynamo=True, optimize=self.optimize, verbose=False)
            options = self.onnxruntime.SessionOptions()
            options.graph_optimization_level = self.onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = torch.get_num_threads()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.sessions[shape] = self.onnxruntime.InferenceSession(
                program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return self.sessions[shape]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise ValueError(f"ONNX Runtime runs float32 CPU tensors here, got {x.dtype} on {x.device}")
        session = self.session(tuple(x.shape))
        inputs = {session.get_inputs()[0].name: x.contiguous().numpy()}
        return torch.from_numpy(session.run(None, inputs)[0])
