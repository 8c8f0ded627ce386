"""`pipeline train`: a run folder from a feature cache and labels (pipeline/stages/train.py; how the flags
resolve into a TrainConfig: train_config.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import EXIT_FAILURES, EXIT_OK, UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from models import REGISTRY

    parser = sub.add_parser(
        "train",
        help="train a scorer on cached features (MCMoE or LIMSSR)",
        description="Train on a feature cache and a labels CSV (video_id,score[,split]). The best epoch "
        "is chosen on a validation split carved from the training data (--val-fraction, or split=val "
        "rows); rows with split=test are never used. Values come from the model's defaults, then "
        "--preset, then the flags. Writes a run folder: run.json, model_config.json, "
        "extraction_config.json, best.safetensors + best.json, train_log.csv, last/ (resume state). "
        "Exit 0: trained; 1: stopped by a non-finite loss (the last good state is kept); 2: usage error.",
    )
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--features", type=Path, help="feature cache (its --out folder or one configuration folder)")
    io.add_argument("--labels", type=Path, help="labels CSV: video_id,score and optionally split (train/val/test)")
    io.add_argument("--out", type=Path, required=True, help="run folder to create (or continue with --resume)")
    io.add_argument("--model", choices=sorted(REGISTRY), help="scorer (default: mcmoe)")
    io.add_argument("--preset", choices=["rg", "fisv", "fs1000"],
                    help="published settings of a benchmark (clip_num, score range, epochs, lr, ...)")
    io.add_argument("--action", help="RG apparatus (Ball, Clubs, Hoop, Ribbon) or score type (TES, PCS, ...) of --preset")
    opt = parser.add_argument_group("optimisation (default: the model's, then the preset's)")
    opt.add_argument("--epochs", type=int)
    opt.add_argument("--lr", type=float, help="peak learning rate")
    opt.add_argument("--batch-size", type=int)
    opt.add_argument("--optimizer", choices=["adam", "adamw"])
    opt.add_argument("--optimizer-implementation", choices=["fused", "foreach", "torch-default"],
                     help="how Adam's update runs (default: torch-default, torch's own choice; fused is "
                     "faster, its weights differ by float rounding)")
    opt.add_argument("--dropout-masks", choices=["uniform", "bernoulli"],
                     help="how dropout draws its masks on a CPU (default: uniform, one uniform draw per "
                     "element compared with the dropout rate, cheaper to draw; bernoulli: torch's own masks, "
                     "which a run recorded without this setting resumes with; same distribution)")
    opt.add_argument("--precision", choices=["fp32", "bf16"],
                     help="arithmetic of the forward pass and loss (default: fp32); bf16 = bfloat16 autocast "
                     "with float32 weights, optimiser state and loss terms, refused on a CPU without native "
                     "bfloat16 (AVX512-BF16 or AMX). Recorded; a resumed run keeps it. Evaluation and scoring "
                     "run in float32")
    opt.add_argument("--weight-decay", type=float)
    opt.add_argument("--warmup-epochs", type=int, help="linear warm-up epochs before the cosine decay")
    opt.add_argument("--min-lr-ratio", type=float, help="the cosine decays to this fraction of --lr")
    opt.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)")
    opt.add_argument("--mask-policy", choices=["incomplete", "any", "incomplete-per-batch", "any-per-batch"],
                     help="training availability masks: incomplete = a non-empty subset that is never the "
                     "full set, any = every non-empty subset, drawn per sample; the -per-batch forms draw one "
                     "subset for the whole batch, as the reference code does (MCMoE's presets: "
                     "incomplete-per-batch)")
    dat = parser.add_argument_group("data")
    dat.add_argument("--clip-num", type=int, help="segments per sample: random crop in training, centre crop "
                     "otherwise, zero padding when shorter (default: preset, else the longest training video)")
    dat.add_argument("--score-range", type=float, help="labels are divided by this (default: preset, else the "
                     "largest training label; recorded in run.json)")
    dat.add_argument("--val-fraction", type=float, help="validation share of the training rows when the labels "
                     "have no split=val rows (default: 0.2; 0 keeps the last epoch)")
    dat.add_argument("--seed", type=int, help="seeds initialisation, splits, crops and masks (default: 0)")
    dat.add_argument("--train-missing", metavar="MOD=RATE,...",
                     help="simulate incomplete training data: hide each modality from that share of the "
                     "training/validation videos, drawn once with --seed (e.g. audio=0.5,flow=0.3)")
    dat.add_argument("--ignore-unlabelled", action="store_true", default=None,
                     help="allow cache videos that the labels file does not mention")
    mod = parser.add_argument_group("model settings (default: the model's, then the preset's)")
    mod.add_argument("--hidden", type=int, help="MCMoE hidden size d")
    mod.add_argument("--dropout", type=float)
    mod.add_argument("--alpha", type=float, help="weight of the triplet / diversity loss")
    mod.add_argument("--position-encoding", action=argparse.BooleanOptionalAction, default=None,
                     help="MCMoE sinusoidal position encoding in the STEM")
    mod.add_argument("--llm", help="LIMSSR: hub id or local folder of the causal LLM")
    mod.add_argument("--llm-dtype", choices=["float32", "bfloat16"],
                     help="LIMSSR: dtype of the LLM (bfloat16 on a GPU halves its memory; projections and heads "
                     "stay float32; default: bfloat16 when training on a GPU, float32 on a CPU)")
    mod.add_argument("--limssr-variant", choices=["project", "reference"],
                     help="LIMSSR: reference = the authors' model (default: whole embedding matrix and LM head "
                     "trainable, LoRA rank 16, their prompt and heads, one mask per batch), project = this "
                     "project's design (only the new marker rows trained, rank 8, per-sample masks); "
                     "docs/design/limssr.md")
    mod.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                     help="LIMSSR: recompute the LLM's activations during the backward pass (less memory, slower steps)")
    mod.add_argument("--ablation", action="append", default=[], metavar="NAME",
                     help="MCMoE ablation: baseline, no-stem, no-agmg, no-moe, no-cfm, no-recon, no-align, "
                     "no-div (repeatable)")
    mod.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                     help="any other model-config field, VALUE as JSON (repeatable)")
    run = parser.add_argument_group("running")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out exactly where its last finished epoch left it")
    run.add_argument("--stop-after-epochs", type=int, metavar="N",
                     help="stop after N epochs of this invocation (continue later with --resume)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from manifests.cache import CacheError
    from pipeline import data
    from pipeline.stages import train as training
    from pipeline import train_config
    from pipeline.labels import LabelError

    overrides = {k: getattr(args, k) for k in (
        "epochs", "lr", "batch_size", "optimizer", "optimizer_implementation", "dropout_masks", "precision", "weight_decay",
        "warmup_epochs",
        "min_lr_ratio", "grad_clip", "mask_policy", "clip_num", "score_range", "val_fraction", "seed", "ignore_unlabelled",
    )}
    try:
        if args.train_missing is not None:
            overrides["train_missing"] = data.parse_missing_rates(args.train_missing)
        model_flags = {k: getattr(args, k) for k in train_config.MODEL_FLAGS}
        given = {k: getattr(args, k) for k in ("features", "labels", "model", "preset", "action")}
        config, preset = train_config.command_config(
            args.out, given, overrides, model_flags, args.ablation, args.model_option, args.resume
        )
        result = training.train(
            config, preset, resume=args.resume, device=args.device, progress=not args.quiet,
            stop_after_epochs=args.stop_after_epochs,
        )
    except training.NonFiniteLossError as exc:
        print(f"pipeline train: {exc}", file=sys.stderr)
        return EXIT_FAILURES
    except (LabelError, CacheError, train_config.TrainError, ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    if result.finished:
        print(f"run: {result.run_dir}  best epoch: {result.best.get('epoch')}  "
              f"val rho: {result.best.get('val_rho')}  val MSE: {result.best.get('val_mse')}")
        print(f"next: pipeline evaluate --run {result.run_dir} --labels TEST.csv")
    else:
        print(f"run: {result.run_dir}  stopped after epoch {result.epochs_done}; continue with "
              f"pipeline train --out {result.run_dir} --resume")
    return EXIT_OK
