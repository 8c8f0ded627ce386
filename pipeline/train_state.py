"""The resume state of a training run (RUN/last/): model, optimizer and every random stream after the
last finished epoch, as safetensors plus state.json, so a resumed run continues bit for bit.
`RunDir` owns the folder and its swap; this module owns what is in it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from manifests.run import RunDir
from models.checkpoint import load_model_state, load_tensors, model_state, save_tensors
from pipeline.train_config import TrainError


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {}
    for param_id, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                meta.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "non_tensor_state": meta}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, slots in meta["non_tensor_state"].items():
        state.setdefault(int(param_id), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    return tensors


def _python_numpy_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _restore_rng(tensors: dict[str, torch.Tensor], states: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["data"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_resume_state(run_dir: Path, model, optimizer, generator, epoch: int, best: dict[str, Any]) -> None:
    """Write last/ as a whole: a new folder, then swapped in by renames, so a kill never leaves a mix."""
    folder = RunDir(run_dir)
    new = folder.start_resume_state()
    save_tensors(new / "model.safetensors", model_state(model))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_tensors(new / "optimizer.safetensors", opt_tensors)
    save_tensors(new / "rng.safetensors", _rng_tensors(generator))
    folder.commit_resume_state(new, {"epoch": epoch, "optimizer": opt_meta, "rng": _python_numpy_rng(), "best": best,
                                     "scheduler": {"kind": "per-epoch warm-up + cosine", "next_epoch": epoch}})


def load_resume_state(folder: Path, model, optimizer, generator) -> dict[str, Any]:
    """Restore model, optimizer and random streams from a last/ folder; TrainError naming the file."""
    state = RunDir(folder.parent).read_resume_state(folder)
    weights, _ = load_tensors(folder / "model.safetensors")
    load_model_state(model, weights, folder / "model.safetensors")
    opt_tensors, _ = load_tensors(folder / "optimizer.safetensors")
    rng_tensors, _ = load_tensors(folder / "rng.safetensors")
    try:
        optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
        _restore_rng(rng_tensors, state["rng"], generator)
        int(state["epoch"]), dict(state["best"])
    except Exception as exc:  # missing keys, wrong shapes or types: the folder is not what train wrote
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainError(f"{folder}: cannot resume from it ({type(exc).__name__}: {reason[:200]}); "
                         f"delete {folder} to restart from epoch 1") from None
    _check_optimizer_shapes(optimizer, folder)
    return state


def _check_optimizer_shapes(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """torch loads an optimizer state of any shape and fails only at the next step: refuse it here."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        for name, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise TrainError(f"{folder / 'optimizer.safetensors'}: {index}.{name} has shape {tuple(value.shape)}, "
                                 f"its parameter {tuple(param.shape)}; delete {folder} to restart from epoch 1")
