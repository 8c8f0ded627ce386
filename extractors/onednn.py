"""Linear layers through oneDNN on a CPU (`cpu_linear="onednn"` in the transformers' settings, the default).

torch sends an fp32 matmul on a CPU to MKL, which picks its kernels by the CPU's vendor: on the AMD
EPYC machines this project is measured on (AVX-512 with bf16) it runs its AVX2 code, while oneDNN,
also inside torch, picks by the CPU's features and runs AVX-512, at a higher rate per core at the
backbones' shapes (benchmarks/bench_extract.py measures both and takes the faster as the ceiling).
Same weights and the same sums in another order: outputs agree to float rounding
(tests/test_backbones.py). The frozen backbones only: oneDNN's op here has no backward, so a call that
needs a gradient, a GPU tensor or another dtype takes torch's own path. Under bf16 autocast
(`precision="bf16"`) the same kernel runs in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import flop_registry, register_flop_formula


def onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


if onednn_linear_available() and torch.ops.mkldnn._linear_pointwise not in flop_registry:
    # torch's FLOP counter knows aten's matmuls only: without this, flops_per_clip and the benchmarks'
    # fractions of the ceiling would miss every linear layer.
    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear_pointwise_flops(x_shape, w_shape, *args, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * w_shape[1] * w_shape[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """F.linear (then an exact GELU when `gelu`), through one oneDNN kernel when the call is an fp32 or
    bf16 CPU inference one."""
    if frozen_cpu_call(x, weight) and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def frozen_cpu_call(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


class OneDNNLinear(nn.Linear):
    """nn.Linear whose inference calls on a CPU run through oneDNN; parameters and state_dict unchanged.
    With `gelu` set, it also applies the GELU that followed it (that module became an nn.Identity).

    Under bf16 autocast (precision bf16) the call runs in bf16 on bf16 copies of the weights made once:
    autocast itself keeps no copy of a weight that needs no gradient, so it would convert every weight on
    every call, and its own linear would leave the GELU a pass of its own."""

    gelu = False
    _bf16: tuple[tuple[int, int], torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16 \
                and frozen_cpu_call(x, self.weight):
            return linear(x.to(torch.bfloat16), *self.bf16_parameters(), self.gelu)
        return linear(x, self.weight, self.bias, self.gelu)

    def bf16_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """bf16 copies of weight and bias, made again only when the weight changed (load_state_dict)."""
        try:
            version = self.weight._version
        except RuntimeError:  # made under inference_mode, which keeps no version: it cannot change in place
            version = 0
        key = (self.weight.data_ptr(), version)
        if self._bf16 is None or self._bf16[0] != key:
            bias = None if self.bias is None else self.bias.detach().to(torch.bfloat16)
            self._bf16 = (key, self.weight.detach().to(torch.bfloat16), bias)
        return self._bf16[1], self._bf16[2]


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Every nn.Linear of `model` becomes a OneDNNLinear (in place; weights untouched), and a GELU that
    directly follows one in an nn.Sequential (Video Swin's MLPs) moves into it: one pass over the MLP's
    widest activation instead of two, with the same numbers.
    Needs a torch built with oneDNN (every x86 and arm64 wheel of torch on PyPI): ValueError otherwise."""
    if not onednn_linear_available():
        raise ValueError("cpu_linear='onednn' needs a torch built with oneDNN (mkldnn); use cpu_linear='torch'")
    for sequence in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(sequence.named_children())
        for (_, layer), (next_name, following) in zip(children, children[1:]):
            if type(layer) is nn.Linear and type(following) is nn.GELU and following.approximate == "none":
                layer.__class__ = OneDNNLinear
                layer.gelu = True
                setattr(sequence, next_name, nn.Identity())
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
    return model
