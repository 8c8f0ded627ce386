"""Model checkpoints as safetensors + JSON: loading never unpickles anything.

    DIR/model_config.json     {"model": registry name, "config": config.to_dict()}
    DIR/<weights>.safetensors the tensors; string metadata (epoch, metrics) in the header

A model may define `state_to_save() -> dict[str, Tensor]` and `load_saved_state(state)` to keep a
checkpoint small (LIMSSR saves its adapters and heads, not the frozen LLM); otherwise the full
state_dict is saved and loaded strictly.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from manifests.files import atomic_write_file, atomic_write_json
from manifests.run import RunDir
from models import REGISTRY, build_model

MODEL_CONFIG_NAME = RunDir.MODEL_CONFIG  # the run folder format (manifests/run.py) names it


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_to_save() if hasattr(model, "state_to_save") else model.state_dict()
    # Clones break storage sharing (tied weights), which safetensors refuses to save.
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not fit its model; the message names the file."""


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path | str | None = None) -> None:
    """Load `state` into `model`; a mismatch (keys, shapes) is a one-line CheckpointError naming `path`."""
    try:
        if hasattr(model, "load_saved_state"):
            model.load_saved_state(state)
        else:
            model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = "; ".join(lines[:3])[:300] or type(exc).__name__
        where = f"{path}" if path is not None else "the checkpoint"
        raise CheckpointError(f"{where} does not match the model described by {MODEL_CONFIG_NAME} "
                              f"({type(model).__name__}): {detail}") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Atomic safetensors write; metadata values are stored as JSON strings. The file gets the user's
    umask like every other output (through the same atomic writer as the rest)."""
    header = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write_file(Path(path), lambda tmp: _save_file(tensors, tmp, header))


def _save_file(tensors: dict[str, torch.Tensor], tmp: Path, header: dict[str, str]) -> None:
    """save_file, its errors from the system as OSError (atomic_write_file then names the final path)."""
    try:
        save_file(tensors, str(tmp), metadata=header)
    except Exception as exc:  # safetensors reports a full disk as SafetensorError "... (os error 28)"
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from exc


def load_tensors(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) from a safetensors file written by save_tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
    except PermissionError:
        raise
    except Exception as exc:  # safetensors' own error, or garbage metadata: the file is not what train wrote
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        size = path.stat().st_size
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({size} bytes; {reason})") from None
    return tensors, metadata


def model_name_of(model: torch.nn.Module) -> str:
    """The registry name of a model instance (for model_config.json)."""
    for name, (module, _, class_name) in REGISTRY.items():
        if type(model).__module__ == module and type(model).__name__ == class_name:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered model ({sorted(REGISTRY)})")


def save_model_config(directory: Path, name: str, model: torch.nn.Module) -> None:
    atomic_write_json(Path(directory) / MODEL_CONFIG_NAME, {"model": name, "config": model.config.to_dict()})


def read_model_config(directory: Path) -> tuple[str, dict[str, Any]]:
    path = Path(directory) / MODEL_CONFIG_NAME
    try:
        payload = json.loads(path.read_text())
        if not isinstance(payload.get("config"), dict):
            raise TypeError('"config" is not an object')
        return payload["model"], payload["config"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {directory} is not a run / checkpoint folder") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a valid model config: {exc}") from None


def save_model(
    directory: str | Path,
    name: str,
    model: torch.nn.Module,
    weights: str = "best",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write DIR/model_config.json and DIR/<weights>.safetensors; returns the weights path."""
    directory = Path(directory)
    save_model_config(directory, name, model)
    path = directory / f"{weights}.safetensors"
    save_tensors(path, model_state(model), metadata)
    return path


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", weights: str = "best"
) -> torch.nn.Module:
    """Rebuild the model from model_config.json and load <weights>.safetensors; eval mode, on device."""
    directory = Path(directory)
    name, config = read_model_config(directory)
    model = build_model(name, config, str(directory / MODEL_CONFIG_NAME))
    state, _ = load_tensors(directory / f"{weights}.safetensors")
    load_model_state(model, state, directory / f"{weights}.safetensors")
    return model.to(device).eval()
