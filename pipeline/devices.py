"""`--device auto|cpu|cuda`, resolved once per command, and whether a device computes bfloat16 natively."""

from __future__ import annotations

import torch

from extractors.config import PRECISIONS

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str = "auto") -> torch.device:
    """auto picks CUDA when a GPU is visible; asking for cuda without one is an error, not a fallback."""
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"--device must be one of {DEVICE_CHOICES}, got {choice!r}")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU on this machine")
    return torch.device(choice)


PRECISION_CHOICES = ("auto", *PRECISIONS)  # `--precision`; the config records one of PRECISIONS


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with AVX512_BF16
    or AMX. Elsewhere bf16 would be emulated, slower than fp32 and no more accurate, so it is refused."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(choice: str, device: torch.device, fixed: str | None = None) -> str:
    """`--precision auto|fp32|bf16` as the config records it: auto is bf16 where `device` computes it
    natively, fp32 elsewhere, or the `fixed` value a recipe sets; asking for bf16 where it would be
    emulated is an error naming the device."""
    if choice not in PRECISION_CHOICES:
        raise ValueError(f"--precision must be one of {PRECISION_CHOICES}, got {choice!r}")
    if choice == "auto":
        return fixed or ("bf16" if native_bf16(device) else "fp32")
    if choice == "bf16" and not native_bf16(device):
        raise ValueError(f"--precision bf16: this {describe_device(device)} has no native bf16 (AVX512_BF16 or AMX "
                         "on a CPU), so bf16 would be emulated and slower than fp32; use --precision fp32")
    return choice


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(device)})"
    return "CPU"
