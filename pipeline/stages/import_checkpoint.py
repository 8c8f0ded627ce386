"""`pipeline import-checkpoint --format mcmoe-reference`: the authors' released MCMoE weights as a run.

The reference code (github XuHuangbiao/MCMoE) saves `model.state_dict()` of its MoE_AQA module with
torch.save. Such a file is read here with `torch.load(..., weights_only=True)`: tensors and plain
containers only, never arbitrary unpickling. Every tensor is mapped by name and checked by shape into
this project's MCMoE, and the result is written as a normal run folder, so `pipeline evaluate` and
`pipeline score` use it like a trained run:

    RUN/run.json               modalities, feature dims, clip_num / score range and their sources, the
                               imported file (path, sha256) and how its checkpoint was chosen
    RUN/model_config.json      the MCMoEConfig read off the tensor shapes (+ --heads)
    RUN/extraction_config.json the config.json of the feature cache given with --features
    RUN/best.safetensors       the mapped weights, their header naming where they came from

The reference layout (modalities in its order v, a, f; reference key -> project key):
    in_proj.{v,a,f}.{0,1,3,4}.*          projections.<modality>.{conv1,norm1,conv2,norm2}.*
    transformer.encoder.*                 stem.*  (same nn.TransformerEncoder layout)
    generators.{v,a,f}.cross_attn.{j}.*   generators.<k>.attention.{j}.*
    generators.{v,a,f}.gate.0.*           generators.<k>.gate.*
    experts.{v,a,f}.{0,1,3,4}.*           experts.{conv1,norm1,conv2,norm2}.*: the three separate
                                          experts concatenated along the output channels, in the
                                          project's modality order (conv2 becomes a grouped conv)
    router_mix.fc1.* / fc2.*              router.0.* / router.2.* (fc2's rows reordered to that order)
    fusion.{0,1,3,4}.*                    fusion.{0,1,3,4}.* (fusion.0's input blocks reordered)
    transformer.decoder.*                 decoder.*
    prototype.weight                      grade_prototypes
    regressor.*                           head.*
    pos_encoder.pe                        checked to be the sinusoidal encoding, not stored
A tensor of the file that nothing maps, or a tensor the model needs that the file lacks, is an error.
So is, before any size is read off a shape, a tensor with a zero-sized dimension, NaN/inf values or
another number of dimensions than the one it maps to: each a one-line error naming the file and the key.

The reference's models/transformer.py is the GDLT transformer it builds on, with the key names of the
torch.nn layout (its layers.{i}.self_attn.in_proj_weight, linear1, norm1, ..., norm), which its model
code calls.

The released checkpoints were trained with the reference's prototype encoding, indexed by the sample's
position in the batch, so the run is written with prototype_encoding "batch-position" (a compatibility
mode: a video's score depends on where it sits in its batch; evaluate with --batch-size 32 and the
labels in the reference's test-file order to get the reference's numbers; `score` gives a clip the mean
of its scores over positions 0..31, see Run.predict). "grade-index" gives the
paper's encoding instead, which these weights were not trained with.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from manifests.cache import FeatureCache, feature_recipe
from manifests.run import RunDir, RunRecord
from models.checkpoint import model_state, save_model_config, save_tensors
from models.layers import sinusoidal_position_encoding
from models.mcmoe import MCMoE, MCMoEConfig
from pipeline.inference import RunError, check_feature_recipe
from pipeline.presets import Preset

FORMATS = ("mcmoe-reference",)
REFERENCE_ORDER = ("v", "a", "f")  # the reference's modality order (router outputs, fusion input blocks)
REFERENCE_LETTERS = {"rgb": "v", "audio": "a", "flow": "f"}  # this project's modality -> reference letter
REFERENCE_GENERATOR_HEADS = 4  # fixed in the reference's generator
SEQUENTIAL_INDEX = {"conv1": "0", "norm1": "1", "conv2": "3", "norm2": "4"}  # Conv, BN, act, Conv, BN
SELECTION = ("chosen by the checkpoint's authors: the reference code keeps the epoch with the best test-set "
             "Spearman rho (or test MSE), so the test set took part in choosing it")


class CheckpointImportError(ValueError):
    """The file is not a usable reference checkpoint, or does not fit the features; the message says why."""


@dataclass
class ImportedCheckpoint:
    run_dir: Path
    config: MCMoEConfig
    num_tensors: int  # tensors read from the file
    sha256: str


# --------------------------------------------------------------------------- reading


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A plain {name: tensor} state dict, loaded without unpickling anything but tensors and containers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointImportError(
            f"{path}: not a plain PyTorch state dict that loads with weights_only=True ({reason}); "
            "the file is never unpickled in full"
        ) from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointImportError(f"{path}: expected a dict of tensor name -> tensor (model.state_dict()), got {type(state).__name__}")
    if all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    check_values(state, path)
    return state


def check_values(state: dict[str, Tensor], path: Path) -> None:
    """No tensor is empty along a dimension or holds NaN/inf: sizes are read off these shapes, and a NaN
    weight would make a run whose every score is NaN (evaluated as n=0, not as an error)."""
    for key, tensor in state.items():
        if 0 in tensor.shape:
            raise CheckpointImportError(f"{path}: tensor {key!r} is zero-sized (shape {tuple(tensor.shape)})")
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise CheckpointImportError(f"{path}: tensor {key!r} holds NaN/inf values (a damaged file, or a "
                                        "training run that diverged)")


def _count(state: dict[str, Tensor], prefix: str) -> int:
    """How many numbered children `prefix.{i}.` the keys have."""
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def _dimensions(tensor: Tensor, expected: int, key: str) -> str | None:
    """Why `tensor` (the file's `key`) does not have `expected` dimensions, or None."""
    return None if tensor.dim() == expected else f"{key!r} is {tensor.dim()}-D, expected {expected}-D"


def _shape(state: dict[str, Tensor], key: str, path: Path, dimensions: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointImportError(f"{path}: tensor {key!r} is missing; not an MCMoE reference checkpoint")
    problem = _dimensions(state[key], dimensions, key)
    if problem:
        raise CheckpointImportError(f"{path}: tensor {problem} (shape {tuple(state[key].shape)})")
    return tuple(state[key].shape)


def reference_config(
    state: dict[str, Tensor], path: Path, modalities: list[str], heads: int, **settings: Any
) -> MCMoEConfig:
    """The MCMoEConfig of the reference model these tensors come from (sizes read off the shapes)."""
    feature_dims = {m: _shape(state, f"in_proj.{REFERENCE_LETTERS[m]}.0.weight", path, 3)[1] for m in modalities}
    hidden = _shape(state, "in_proj.v.3.weight", path, 3)[0]
    feedforward = _shape(state, "transformer.encoder.layers.0.linear1.weight", path, 2)[0]
    if feedforward % hidden:
        raise CheckpointImportError(f"{path}: feed-forward width {feedforward} is not a multiple of hidden {hidden}")
    try:
        return MCMoEConfig(
            modalities=modalities, feature_dims=feature_dims, hidden=hidden,
            encoder_layers=_count(state, "transformer.encoder.layers."), encoder_heads=heads,
            decoder_layers=_count(state, "transformer.decoder.layers."), decoder_heads=heads,
            feedforward_ratio=feedforward // hidden,
            generator_layers=_count(state, "generators.v.cross_attn."), generator_heads=REFERENCE_GENERATOR_HEADS,
            num_grades=_shape(state, "prototype.weight", path, 2)[0], position_encoding=False, **settings,
        )
    except ValueError as exc:
        raise CheckpointImportError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- mapping


Recipe = tuple[list[str], Callable[[list[Tensor]], Tensor]]


def _recipe(key: str, letters: list[str], hidden: int) -> Recipe | None:
    """Reference tensors that make the project tensor `key`, and how they combine."""
    only = lambda tensors: tensors[0]  # noqa: E731
    order = [REFERENCE_ORDER.index(letter) for letter in letters]  # project modality k -> reference index
    head, _, rest = key.partition(".")
    if head == "projections":
        modality, layer, param = rest.split(".", 2)
        return [f"in_proj.{REFERENCE_LETTERS[modality]}.{SEQUENTIAL_INDEX[layer]}.{param}"], only
    if head == "stem":
        return [f"transformer.encoder.{rest}"], only
    if head == "decoder":
        return [f"transformer.decoder.{rest}"], only
    if head == "generators":
        index, part, tail = rest.split(".", 2)
        letter = letters[int(index)]
        source = f"cross_attn.{tail}" if part == "attention" else f"gate.0.{tail}"
        return [f"generators.{letter}.{source}"], only
    if head == "experts":
        layer, param = rest.split(".", 1)
        sources = [f"experts.{letter}.{SEQUENTIAL_INDEX[layer]}.{param}" for letter in letters]
        if param == "num_batches_tracked":  # one counter for the bank; it does not affect the outputs
            return sources, lambda tensors: torch.stack(tensors).amax()
        return sources, lambda tensors: torch.cat(tensors, 0)  # expert k owns channel block k
    if key in ("router.0.weight", "router.0.bias"):
        return [f"router_mix.fc1.{rest.split('.')[1]}"], only
    if key in ("router.2.weight", "router.2.bias"):
        return [f"router_mix.fc2.{rest.split('.')[1]}"], lambda tensors: tensors[0][order]
    if key == "fusion.0.weight":  # (2d, M*d, 1): input block k is modality k's F^m
        def reorder(tensors: list[Tensor]) -> Tensor:
            weight = tensors[0]
            return weight.view(weight.shape[0], len(REFERENCE_ORDER), hidden, -1)[:, order].reshape(weight.shape)
        return [key], reorder
    if head == "fusion":
        return [key], only
    if key == "grade_prototypes":
        return ["prototype.weight"], only
    if head == "head":
        return [f"regressor.{rest}"], only
    return None


def map_reference_state(state: dict[str, Tensor], model: MCMoE, path: Path) -> dict[str, Tensor]:
    """The project state dict of `model` made from the reference tensors; every tensor accounted for."""
    letters = [REFERENCE_LETTERS[m] for m in model.modalities]
    wanted = model.state_dict()
    mapped, used, missing, mismatched = {}, set(), [], []
    for key, target in wanted.items():
        recipe = _recipe(key, letters, model.config.hidden)
        if recipe is None:
            raise CheckpointImportError(f"no reference tensor is known for the project's {key!r}")
        sources, combine = recipe
        absent = [s for s in sources if s not in state]
        if absent:
            missing += absent
            continue
        used.update(sources)
        # every recipe keeps the number of dimensions; checked first, since combining assumes it
        wrong = [p for p in (_dimensions(state[s], target.dim(), s) for s in sources) if p]
        if wrong:
            mismatched.append(f"{key} <- {'; '.join(wrong)}")
            continue
        try:
            tensor = combine([state[s] for s in sources])
        except RuntimeError:  # sizes that cannot be concatenated or split into the modality blocks
            tensor = None
        if tensor is None or tuple(tensor.shape) != tuple(target.shape):
            found = ", ".join(str(tuple(state[s].shape)) for s in sources) if tensor is None else str(tuple(tensor.shape))
            mismatched.append(f"{key} <- {'+'.join(sources)}: {found}, expected {tuple(target.shape)}")
            continue
        mapped[key] = tensor.to(target.dtype).clone()
    if "pos_encoder.pe" in state:
        _check_position_encoding(state["pos_encoder.pe"], model.config.hidden, path)
        used.add("pos_encoder.pe")
    else:
        missing.append("pos_encoder.pe")
    unmapped = sorted(set(state) - used)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(sorted(missing))}")
    if unmapped:
        problems.append(f"{len(unmapped)} tensor(s) that nothing maps: {', '.join(unmapped)}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise CheckpointImportError(f"{path}: not the MCMoE reference layout this importer knows: " + "; ".join(problems))
    return mapped


def _check_position_encoding(pe: Tensor, hidden: int, path: Path) -> None:
    """The reference's buffer (max_len, 1, d) must be the sinusoidal encoding the project computes."""
    if pe.dim() != 3 or pe.shape[1] != 1 or pe.shape[2] != hidden:
        raise CheckpointImportError(f"{path}: pos_encoder.pe has shape {tuple(pe.shape)}, expected (max_len, 1, {hidden})")
    expected = sinusoidal_position_encoding(pe.shape[0], hidden)
    if not torch.allclose(pe[:, 0].float(), expected, atol=1e-5):
        raise CheckpointImportError(f"{path}: pos_encoder.pe is not the sinusoidal encoding this project computes")


# --------------------------------------------------------------------------- the run folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_reference_checkpoint(
    checkpoint: Path,
    out: Path,
    features: Path,
    preset: Preset | None = None,
    clip_num: int | None = None,
    score_range: float | None = None,
    heads: int = 2,
    prototype_encoding: str = "batch-position",
    allow_other_recipe: bool = False,
) -> ImportedCheckpoint:
    """Write run folder `out` from a reference checkpoint; `features` is the cache it will score.

    The run records the recipe of the features the released weights were trained on (the preset's
    dataset says which; without a preset, the features' own): evaluate and score hold every feature
    cache to it. Features of another recipe are refused unless `allow_other_recipe`."""
    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointImportError(f"{out} already holds files; choose another --out")
    cache = _reference_cache(features)
    expected = preset.feature_recipe if preset is not None else feature_recipe(cache.read_config())
    if not allow_other_recipe:
        try:
            check_feature_recipe(expected, cache.read_config(), "the released weights", cache.root)
        except RunError as exc:
            raise CheckpointImportError(str(exc)) from None
    scale = _clip_num_and_score_range(preset, clip_num, score_range)
    state = read_state_dict(checkpoint)
    model = _reference_model(state, checkpoint, cache, preset, heads, prototype_encoding)
    sha = _sha256(checkpoint)
    origin = {"format": "mcmoe-reference", "file": str(checkpoint.resolve()), "sha256": sha,
              "num_tensors": len(state), "modality_letters": {m: REFERENCE_LETTERS[m] for m in cache.modalities},
              "heads": heads, "prototype_encoding": prototype_encoding}
    record = _imported_record(model, cache, preset, scale, origin)
    record.feature_recipe = expected
    _write_run(RunDir(out), model, cache, record, origin)
    return ImportedCheckpoint(out, model.config, len(state), sha)


def _reference_cache(features: Path) -> FeatureCache:
    """The feature cache to score with; it must hold the three modalities the reference model takes."""
    cache = FeatureCache.open(features)
    if sorted(cache.modalities) != sorted(REFERENCE_LETTERS):
        raise CheckpointImportError(
            f"the reference model takes the modalities {sorted(REFERENCE_LETTERS)}; the cache {cache.root} has {cache.modalities}"
        )
    return cache


def _clip_num_and_score_range(
    preset: Preset | None, clip_num: int | None, score_range: float | None
) -> dict[str, Any]:
    """clip_num and score_range (flags first, else the preset's) with where each came from."""
    sources = {"clip_num": "flag", "score_range": "flag"}
    if preset is not None:
        where = f"preset {preset.dataset}/{preset.target}"
        if clip_num is None:
            clip_num, sources["clip_num"] = preset.clip_num, where
        if score_range is None:
            score_range, sources["score_range"] = preset.score_range, where
    if clip_num is None or score_range is None:
        raise CheckpointImportError("the run needs clip_num and the score range: pass --preset/--action or --clip-num and --score-range")
    if clip_num < 1 or not score_range > 0:
        raise CheckpointImportError(f"--clip-num must be >= 1 and --score-range > 0, got {clip_num} and {score_range}")
    return {"clip_num": int(clip_num), "clip_num_source": sources["clip_num"],
            "score_range": float(score_range), "score_range_source": sources["score_range"]}


def _reference_model(
    state: dict[str, Tensor], checkpoint: Path, cache: FeatureCache, preset: Preset | None, heads: int,
    prototype_encoding: str,
) -> MCMoE:
    """The project's MCMoE holding the reference tensors; its feature sizes must be the cache's."""
    settings: dict[str, Any] = {"prototype_encoding": prototype_encoding}
    if preset is not None:
        settings.update(div_weight=preset.alpha, dropout=preset.dropout)
    config = reference_config(state, checkpoint, cache.modalities, heads, **settings)
    if config.feature_dims != cache.feature_dims:
        raise CheckpointImportError(
            f"{checkpoint} was trained on features of sizes {config.feature_dims}; the cache {cache.root} has {cache.feature_dims}"
        )
    model = MCMoE(config)
    model.load_state_dict(map_reference_state(state, model, checkpoint), strict=True)
    return model


def _imported_record(
    model: MCMoE, cache: FeatureCache, preset: Preset | None, scale: dict[str, Any], origin: dict[str, Any]
) -> RunRecord:
    """run.json of an imported checkpoint: no labels, no training settings, chosen by its authors."""
    num_parameters = sum(p.numel() for p in model.parameters())
    return RunRecord(
        model="mcmoe",
        modalities=cache.modalities,
        feature_dims=model.config.feature_dims,
        **scale,
        features=str(cache.root.resolve()),
        feature_config_hash=cache.config_hash,
        labels=None,
        config=None,  # not trained here: nothing to resume
        preset=preset.to_dict() if preset else None,
        imported=origin,
        selection=SELECTION,
        selected_on="test set (by the authors of the imported checkpoint)",
        test_used_for_selection=True,
        validation_videos=0,
        selection_note=None,
        splits={"train": [], "val": [], "test_rows_ignored": 0},
        absent_in_data={},
        train_missing=None,
        num_parameters=num_parameters,
        num_trainable_parameters=num_parameters,
        sequence_length=None,
        random_weight_features=cache.random_weights,
        torch_version=torch.__version__,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def _write_run(folder: RunDir, model: MCMoE, cache: FeatureCache, record: RunRecord, origin: dict[str, Any]) -> None:
    """The run folder; run.json last, since a folder with run.json is complete. No epoch was chosen
    here, so the weights' header names none."""
    folder.path.mkdir(parents=True, exist_ok=True)
    save_model_config(folder.path, "mcmoe", model)
    folder.write_extraction_config(cache.read_config())
    save_tensors(folder.weights(), model_state(model),
                 {"best": {"epoch": None, "val_rho": None, "val_mse": None}, "model": "mcmoe", "imported": origin})
    folder.write_record(record)
