"""`pipeline train`: fit a scorer on cached features, select on validation, resume exactly.

Writes a run folder (its layout, readers and writers: manifests/run.py's `RunDir`; everything JSON,
CSV or safetensors, nothing is unpickled when loading it): run.json (a `RunRecord`) records the
TrainConfig, preset, score range / clip_num and where they came from, modalities, feature dims, the
cache and labels used, the splits, simulated missingness, parameter count and how the checkpoint was
chosen; best.safetensors holds the epoch chosen on validation, last/ the resume state after the last
finished epoch (model, optimizer and random streams: pipeline/train_state.py). The settings and how
flags resolve into them: pipeline/train_config.py.

The learning rate follows a per-epoch schedule: linear warm-up over `warmup_epochs`, then cosine decay
to `min_lr_ratio * lr`; it is a pure function of the epoch, so the "scheduler state" is the epoch.

`precision` "bf16" runs each training step's forward pass under torch.autocast to bfloat16 and its loss
in float32 (`forward_and_loss`); the weights, gradients and optimiser state stay float32, and validation
(like evaluate and score) runs in float32.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from manifests.cache import FeatureCache, feature_recipe
from manifests.claims import RunLock, describe_holder
from manifests.files import remove_temporary_files
from manifests.run import RunDir, RunFolderError, RunRecord, describe_differences, differing_settings
from models import build_model, config_class
from models.checkpoint import load_model_state, load_tensors, model_state, read_model_config, save_model_config, save_tensors
from models.layers import use_uniform_dropout
from pipeline import data
from pipeline.devices import native_bf16, resolve_device
from pipeline.inference import call_model, evaluate_samples, predict
from pipeline.labels import LabelError, Labels, check_against_cache, read_labels
from pipeline.metrics import mse, spearman_rho
from pipeline.presets import Preset
from pipeline.progress import progress_bar
from pipeline.train_config import OPTIMIZER_IMPLEMENTATIONS, TrainConfig, TrainError, recorded_settings
from pipeline.train_state import load_resume_state, save_resume_state

SELECTION = "best epoch on the validation split (Spearman rho, ties by lower MSE); the test set is never used"


class NonFiniteLossError(TrainError):
    """The loss became NaN/inf; the last good state and the best checkpoint were kept."""


def lr_at(config: TrainConfig, epoch: int) -> float:
    """Learning rate of epoch `epoch` (0-based): linear warm-up, then cosine to min_lr_ratio * lr."""
    if epoch < config.warmup_epochs:
        return config.lr * (epoch + 1) / config.warmup_epochs
    span = max(1, config.epochs - config.warmup_epochs)
    progress = (epoch - config.warmup_epochs) / span
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model_config(model: str, modalities: list[str], feature_dims: dict[str, int], options: dict[str, Any]):
    cls = config_class(model)
    known = set(cls.settings())
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"model {model!r} has no setting(s) {unknown}; its settings are {sorted(known)}")
    return cls(modalities=list(modalities), feature_dims=dict(feature_dims), **options)


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                    implementation: str = "torch-default") -> torch.optim.Optimizer:
    """Adam or AdamW over `params`, updating them with `implementation` (OPTIMIZER_IMPLEMENTATIONS)."""
    if implementation not in OPTIMIZER_IMPLEMENTATIONS:
        raise ValueError(f"optimizer implementation must be one of {OPTIMIZER_IMPLEMENTATIONS}, got {implementation!r}")
    optimizer_cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    how = {"fused": {"fused": True}, "foreach": {"foreach": True}, "torch-default": {}}[implementation]
    return optimizer_cls(params, lr=lr, weight_decay=weight_decay, **how)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    cache: FeatureCache
    labels: Labels
    modalities: list[str]
    feature_dims: dict[str, int]
    train: list[data.Sample]
    val: list[data.Sample]
    clip_num: int
    clip_num_source: str
    score_range: float
    score_range_source: str
    hidden: dict[str, list[str]]  # simulated missingness: video -> hidden modalities
    absent: dict[str, list[str]]  # genuinely absent in the data: video -> modalities
    ignored_test: int


def prepare_data(config: TrainConfig, log: Callable[[str], None]) -> TrainData:
    """Read and check labels against the cache, split, hide simulated-missing modalities, load features."""
    cache = FeatureCache.open(config.features)
    modalities, feature_dims = cache.modalities, cache.feature_dims
    labels = read_labels(config.labels)
    splits = labels.splits or {}
    usable = labels.ids_in_split("train", "val")
    ignored_test = len(labels.video_ids) - len(usable)
    if not usable:
        raise LabelError(f"{labels.path}: no rows with split train or val")
    present = check_against_cache(labels, cache, usable, require_all_labelled=not config.ignore_unlabelled)
    negative = [v for v in usable if labels.scores[v] < 0]
    if negative:
        raise LabelError(
            f"{labels.where(negative[0])}: score {labels.scores[negative[0]]} of {negative[0]!r} is negative; "
            "the models predict score / score_range in [0, 1]"
        )
    if labels.splits is not None and any(splits[v] == "val" for v in usable):
        train_ids = sorted(v for v in usable if splits[v] == "train")
        val_ids = sorted(v for v in usable if splits[v] == "val")
    else:
        train_ids, val_ids = data.split_train_val(usable, config.val_fraction, config.seed)
    if len(train_ids) < 2:
        raise LabelError(f"{labels.path}: {len(train_ids)} training video(s); at least 2 are needed")
    if not val_ids:
        log("warning: no validation split (--val-fraction 0): the last epoch is kept, nothing is selected")
    elif len(val_ids) < data.FEW_VALIDATION_VIDEOS:
        log(f"warning: only {len(val_ids)} validation videos: the epoch chosen on so few is close to a coin toss; "
            "give more (--val-fraction, or more split=val rows)")

    unknown = sorted(set(config.train_missing) - set(modalities))
    if unknown:
        raise ValueError(f"--train-missing names {unknown}, which are not modalities of the cache {modalities}")
    hidden = data.draw_train_missing(present, config.train_missing, config.seed) if config.train_missing else {}
    absent = {v: [m for m in modalities if m not in present[v]] for v in usable if len(present[v]) < len(modalities)}
    train = data.load_samples(cache, train_ids, labels.scores, hidden)
    val = data.load_samples(cache, val_ids, labels.scores, hidden)

    if config.score_range is not None:
        score_range = float(config.score_range)
        source = config.sources.get("score_range", "flag")
    else:
        score_range = max(labels.scores[v] for v in train_ids)
        source = f"largest training label ({len(train_ids)} videos)"
        if score_range <= 0:
            raise LabelError(f"{labels.path}: every training score is 0; pass --score-range")
    too_high = [v for v in train_ids if labels.scores[v] > score_range]
    if too_high:
        log(f"warning: {len(too_high)} training score(s) exceed the score range {score_range} "
            f"(e.g. {too_high[0]!r}: {labels.scores[too_high[0]]}); predictions cannot reach them")
    if config.clip_num is not None:
        clip_num, clip_source = int(config.clip_num), config.sources.get("clip_num", "flag")
    else:
        clip_num, clip_source = max(s.length for s in train), "longest training video"
    return TrainData(
        cache, labels, modalities, feature_dims, train, val, clip_num, clip_source,
        score_range, source, hidden, absent, ignored_test,
    )


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    finished: bool  # False when stopped by stop_after_epochs
    best: dict[str, Any]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _is_better(rho: float, error: float, best: dict[str, Any]) -> bool:
    """Higher validation rho wins (undefined rho counts as lowest); equal rho: lower MSE."""
    if not best:
        return True
    rho = -2.0 if math.isnan(rho) else rho
    best_rho = -2.0 if best["val_rho"] is None else best["val_rho"]
    if rho != best_rho:
        return rho > best_rho
    best_mse = math.inf if best["val_mse"] is None else best["val_mse"]
    return error < best_mse


def train(
    config: TrainConfig,
    preset: Preset | None = None,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] = _stderr,
) -> TrainResult:
    """Train (or continue) the run in `config.out`; see the module docstring for what it writes."""
    config.validate()
    run_dir = Path(config.out).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"--out {run_dir} is a file, not a run folder; choose another --out")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir, "pipeline train" + (" --resume" if resume else ""))
    holder = lock.acquire()
    if holder is not None:
        raise TrainError(f"{run_dir} is in use by another `{holder.get('command', 'pipeline train')}`: "
                         f"{describe_holder(holder)}; wait for it, or use another --out (if that process "
                         f"is surely gone, delete {lock.path})")
    try:
        return _train_locked(config, preset, resume, device, progress, stop_after_epochs, log, run_dir)
    finally:
        lock.release()
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()  # stopped before writing anything (bad labels, say): leave no empty folder


def _train_locked(
    config: TrainConfig, preset: Preset | None, resume: bool, device: str, progress: bool,
    stop_after_epochs: int | None, log: Callable[[str], None], run_dir: Path,
) -> TrainResult:
    """A run from start (or resume) to its closing validation; each step below is a function that follows."""
    remove_temporary_files(run_dir)  # what a killed write left; we are the folder's only writer now
    folder = RunDir(run_dir)
    check_folder(folder, config, resume)

    # data, then every random stream seeded, then the model (its initial weights draw from torch's)
    torch_device = resolve_device(device)
    check_precision(config.precision, torch_device)
    bundle = prepare_data(config, log)
    generator = seed_everything(config.seed)
    model = build_training_model(config, bundle, folder if resume else None, torch_device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optimizer, params, config.lr, config.weight_decay, config.optimizer_implementation)
    record = run_record(config, preset, bundle, model)
    describe_setup(config, bundle, record, log)

    # where to start: after the last finished epoch of the run, or a new run folder
    if resume:
        start_epoch, best, rows = restore_run(folder, record, model, optimizer, generator, config, log)
    else:
        start_epoch, best, rows = 0, {}, []
        start_run(folder, record, model, bundle)

    for epoch in range(start_epoch, config.epochs):
        if stop_after_epochs is not None and epoch - start_epoch >= stop_after_epochs:
            log(f"stopped after epoch {epoch} as asked; continue with --resume")
            return TrainResult(run_dir, epoch, False, best)
        lr = lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with epoch_bar(config, bundle, epoch, progress) as bar:
            losses = train_one_epoch(model, optimizer, params, bundle, config, epoch, generator, torch_device, bar,
                                     folder, best)
            scores = validate(model, bundle, config, torch_device)
            if bundle.val:  # validation first: a narrow terminal cuts the end of the line
                bar.set_postfix({"val_rho": f"{scores['val_rho']:.3f}", "val_mse": f"{scores['val_mse']:.3g}",
                                 **{k: f"{v:.3g}" for k, v in losses.items() if k != "train_rho"}})
        row = {"epoch": epoch + 1, "lr": lr, **losses, **scores}
        rows.append(row)
        best = keep_if_best(folder, model, config, row, best, chosen_on_validation=bool(bundle.val))
        # best.json and the log before the swap: a resume drops log rows beyond its state
        folder.write_progress(epoch + 1, config.epochs)
        folder.write_log(rows)
        save_resume_state(run_dir, model, optimizer, generator, epoch + 1, best)

    if not best:
        raise TrainError(f"{run_dir}: no epoch finished")
    if bundle.val:
        closing_validation(folder, model, bundle, config, torch_device)
    shown = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    log(f"done: best epoch {best['epoch']}"
        + (f" (val rho {shown(best['val_rho'])}, val MSE {shown(best['val_mse'])})" if bundle.val else "")
        + f"; run folder {run_dir}")
    return TrainResult(run_dir, config.epochs, True, best)


# --------------------------------------------------------------------------- its steps, in order


def check_folder(folder: RunDir, config: TrainConfig, resume: bool) -> None:
    """--resume needs a run recorded with these settings; a new run needs a folder with nothing in it."""
    if not resume:
        if folder.holds_other_files():
            raise TrainError(f"{folder.path} already holds files; pass --resume to continue that run or choose another --out")
        return
    if not folder.has_run():
        raise TrainError(f"--resume: {folder.path} holds no run ({folder.RUN} is missing)")
    try:
        differ = differing_settings(recorded_settings(folder), config.to_dict())
    except RunFolderError as exc:
        raise TrainError(str(exc)) from None
    if differ:
        raise TrainError(f"--resume: settings differ from the run in {folder.path}: {describe_differences(differ)}")


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 only where the device computes it natively: emulated bfloat16 is slower than float32."""
    if precision == "bf16" and not native_bf16(device):
        what = "this GPU does not support bfloat16" if device.type == "cuda" else \
            "this CPU has neither AVX512-BF16 nor AMX, so torch would emulate bfloat16, slower than float32"
        raise TrainError(f"--precision bf16: {what}; train with --precision fp32")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, numpy's and torch's streams; the returned generator draws batches and masks."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_training_model(config: TrainConfig, bundle: TrainData, resumed: RunDir | None,
                         device: torch.device) -> torch.nn.Module:
    """The model to train, on `device`; a resumed run's recorded model config wins over the
    current defaults, so a setting its record lacks or holds keeps the value the run was trained with."""
    options = {**config_class(config.model).device_defaults(device.type), **config.model_options}
    model_config = build_model_config(config.model, bundle.modalities, bundle.feature_dims, options)
    if resumed is not None and resumed.model_config_json.is_file():
        model_config = config_class(config.model).from_dict(read_model_config(resumed.path)[1],
                                                            str(resumed.model_config_json))
    model = build_model(config.model, model_config).to(device)
    if config.dropout_masks == "uniform":
        use_uniform_dropout(model)
    return model


def describe_setup(config: TrainConfig, bundle: TrainData, record: RunRecord, log: Callable[[str], None]) -> None:
    log(f"{config.model}: {record.num_parameters:,} parameters ({record.num_trainable_parameters:,} trainable)"
        + (f"; LLM sequence length {record.sequence_length} at clip_num {bundle.clip_num}" if record.sequence_length else ""))
    log(f"data: {len(bundle.train)} train / {len(bundle.val)} val videos, modalities {bundle.modalities}, "
        f"clip_num {bundle.clip_num} ({bundle.clip_num_source}), score range {bundle.score_range:g} "
        f"({bundle.score_range_source}); batch {config.batch_size}, {config.epochs} epochs, mask policy "
        f"{config.mask_policy}" + (f", {bundle.ignored_test} test rows left out" if bundle.ignored_test else ""))
    if config.warmup_epochs >= config.epochs:
        log(f"warning: --warmup-epochs {config.warmup_epochs} >= --epochs {config.epochs}: the peak lr is never reached")
    if bundle.cache.random_weights:
        log("note: these features come from RANDOM-WEIGHT backbones; scores trained on them mean nothing")


def start_run(folder: RunDir, record: RunRecord, model: torch.nn.Module, bundle: TrainData) -> None:
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_record(record)
    save_model_config(folder.path, record.model, model)
    folder.write_extraction_config(bundle.cache.read_config())


def restore_run(
    folder: RunDir, record: RunRecord, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    generator: torch.Generator, config: TrainConfig, log: Callable[[str], None],
) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """(epochs done, best so far, their log rows) of the run being resumed, its state restored."""
    recorded = folder.read_record()
    if recorded.splits["train"] != record.splits["train"] or recorded.splits["val"] != record.splits["val"]:
        raise TrainError(f"--resume: the labels or features changed since the run started ({folder.run_json})")
    start_epoch, best = 0, {}
    state_folder = folder.resume_folder()
    if state_folder is None:
        log(f"--resume: {folder.path} has no finished epoch yet; starting from epoch 1")
    else:
        state = load_resume_state(state_folder, model, optimizer, generator)
        start_epoch, best = int(state["epoch"]), state["best"]
        log(f"resuming {folder.path} after epoch {start_epoch} of {config.epochs}")
    try:
        rows = [r for r in folder.read_log() if int(r["epoch"]) <= start_epoch]
    except (KeyError, ValueError, TypeError) as exc:
        raise TrainError(f"{folder.log_csv} is not a training log written by train ({exc}); "
                         "move it away to continue without the earlier rows") from None
    return start_epoch, best, rows


def epoch_bar(config: TrainConfig, bundle: TrainData, epoch: int, progress: bool) -> Any:
    """One epoch's progress bar, updated by hand: a wrapped iterator would close it before the
    validation numbers arrive."""
    return progress_bar(total=math.ceil(len(bundle.train) / config.batch_size), desc=f"epoch {epoch + 1}/{config.epochs}",
                        file=sys.stderr, disable=not progress, dynamic_ncols=True, leave=True)


def train_one_epoch(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], bundle: TrainData,
    config: TrainConfig, epoch: int, generator: torch.Generator, device: torch.device, bar: Any,
    folder: RunDir, best: dict[str, Any],
) -> dict[str, float]:
    """One pass over the training videos: the mean of each loss term and the training rho."""
    model.train()
    sums: dict[str, float] = {}
    seen = 0
    train_pred, train_true = [], []
    sizes = (bundle.modalities, bundle.feature_dims, bundle.clip_num)
    for index, batch in enumerate(data.training_batches(bundle.train, *sizes, config.batch_size, generator)):
        available = data.draw_training_masks(batch.present, config.mask_policy, generator)
        batch = batch.to(device)
        available = available.to(device)
        # Present-but-masked modalities keep their real features: they are the targets of
        # reconstruction-type losses; the model itself looks only at `available`.
        out, total, terms = forward_and_loss(model, batch.features, available, batch.present,
                                             batch.score / bundle.score_range, config.precision, device)
        if not torch.isfinite(total):
            raise non_finite_loss(folder, epoch, index, total, terms, best)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        size = len(batch.video_ids)
        seen += size
        for key, value in {"loss": total.detach(), **terms}.items():
            sums[key] = sums.get(key, 0.0) + float(value) * size
        train_pred.append(out["score"].detach().float().cpu() * bundle.score_range)
        train_true.append(batch.score.cpu())
        bar.set_postfix({k: f"{v / seen:.3g}" for k, v in sums.items()}, refresh=False)
        bar.update(1)
    means = {k: v / seen for k, v in sums.items()}
    return {**means, "train_rho": spearman_rho(torch.cat(train_pred).numpy(), torch.cat(train_true).numpy())}


def forward_and_loss(
    model: torch.nn.Module, features: dict[str, torch.Tensor], available: torch.Tensor, present: torch.Tensor,
    target: torch.Tensor, precision: str, device: torch.device,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward pass and its loss at `precision`: (outputs, total, loss terms).

    bf16: the forward pass runs under torch.autocast (matmuls and convolutions in bfloat16, the float32
    weights cast on the fly); its outputs are cast to float32 and the loss runs outside autocast, so
    every loss term and their sum are float32 reductions and the gradient enters the model as float32."""
    if precision == "fp32":
        out = call_model(model, features, available, present)
        return (out, *model.loss(out, target, present, available))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = call_model(model, features, available, present)
    out = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
    return (out, *model.loss(out, target, present, available))


def non_finite_loss(folder: RunDir, epoch: int, index: int, total: torch.Tensor, terms: dict[str, Any],
                    best: dict[str, Any]) -> NonFiniteLossError:
    """The error that stops training, saying what was kept (nothing of this epoch is written)."""
    kept = (f"the state after epoch {epoch} is kept in {folder.path / folder.LAST}"
            if folder.resume_folder() else "no epoch had finished, so no state was saved")
    if best:
        kept += f"; the best checkpoint (epoch {best['epoch']}) is {folder.weights()}"
    described = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
    return NonFiniteLossError(
        f"non-finite loss {total.item()} at epoch {epoch + 1}, batch {index + 1} ({described}); "
        f"training stopped: {kept}. Try a lower --lr or --grad-clip."
    )


def validate(model: torch.nn.Module, bundle: TrainData, config: TrainConfig,
             device: torch.device) -> dict[str, float | None]:
    """Validation rho and MSE of the epoch's weights on every modality the videos have (None: no split)."""
    if not bundle.val:
        return {"val_rho": None, "val_mse": None}
    predicted = predict(model, bundle.val, bundle.modalities, bundle.feature_dims, bundle.clip_num, device=device,
                        batch_size=config.batch_size)
    truth = np.array([s.score for s in bundle.val])
    return {"val_rho": spearman_rho(predicted * bundle.score_range, truth),
            "val_mse": mse(predicted * bundle.score_range, truth)}


def keep_if_best(folder: RunDir, model: torch.nn.Module, config: TrainConfig, row: dict[str, Any],
                 best: dict[str, Any], chosen_on_validation: bool) -> dict[str, Any]:
    """Write the epoch's weights as the chosen ones when they beat `best` (without validation: every
    epoch, so the last is kept); the epoch and its metrics go into the weights' header, their one record."""
    if chosen_on_validation and not _is_better(row["val_rho"], row["val_mse"], best):
        return best
    best = {"epoch": row["epoch"], "val_rho": _finite_or_none(row["val_rho"]), "val_mse": _finite_or_none(row["val_mse"])}
    save_tensors(folder.weights(), model_state(model), {"best": best, "model": config.model})
    return best


def closing_validation(folder: RunDir, model: torch.nn.Module, bundle: TrainData, config: TrainConfig,
                       device: torch.device) -> None:
    """Every modality setting's validation metrics of the chosen weights (2^M - 1 passes, once), into best.json."""
    weights, _ = load_tensors(folder.weights())
    load_model_state(model, weights)
    evaluation = evaluate_samples(model, bundle.val, bundle.modalities, bundle.feature_dims, bundle.clip_num,
                                  bundle.score_range, device, config.batch_size)
    folder.write_progress(config.epochs, config.epochs, evaluation.to_dict())


def run_record(config: TrainConfig, preset: Preset | None, bundle: TrainData, model: torch.nn.Module) -> RunRecord:
    """run.json of a run trained here."""
    total, trainable = count_parameters(model)
    val = len(bundle.val)
    return RunRecord(
        model=config.model,
        modalities=bundle.modalities,
        feature_dims=bundle.feature_dims,
        clip_num=bundle.clip_num,
        clip_num_source=bundle.clip_num_source,
        score_range=bundle.score_range,
        score_range_source=bundle.score_range_source,
        features=str(bundle.cache.root.resolve()),
        feature_config_hash=bundle.cache.config_hash,
        labels=str(Path(config.labels).expanduser().resolve()),
        config=config.to_dict(),
        preset=preset.to_dict() if preset else None,
        imported=None,
        selection=SELECTION if val else "no validation split: the last epoch",
        selected_on="validation" if val else "none (last epoch)",
        test_used_for_selection=False,
        validation_videos=val,
        selection_note=(f"only {val} validation videos: the chosen epoch is close to a coin toss"
                        if 0 < val < data.FEW_VALIDATION_VIDEOS else None),
        splits={"train": [s.video_id for s in bundle.train], "val": [s.video_id for s in bundle.val],
                "test_rows_ignored": bundle.ignored_test},
        absent_in_data=bundle.absent,
        train_missing={"rates": config.train_missing, "hidden": bundle.hidden,
                       "applies_to": "training and validation videos (both are training data)"},
        num_parameters=total,
        num_trainable_parameters=trainable,
        sequence_length=model.sequence_length(bundle.clip_num) if hasattr(model, "sequence_length") else None,
        random_weight_features=bundle.cache.random_weights,
        feature_recipe=feature_recipe(bundle.cache.read_config()),
        torch_version=torch.__version__,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
