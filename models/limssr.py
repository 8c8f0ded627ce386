"""LIMSSR: LLM-driven sequence-to-score reasoning for incomplete multimodal AQA (docs/design/limssr.md).

A causal LLM (frozen, with LoRA adapters) reads one sequence per sample:

    [pad ...] prompt naming available/missing modalities
    <m1_start> T projected features of m1 (or <m1_missing> x T) <m1_end>   (available modalities first)
    ...
    <fusion_0> ... <fusion_{K-1}>

LMRF turns the last-layer states at the K fusion tokens into the main score; MDA pools each modality's
span into a second, auxiliary score; the final score is a learned mix of the two.

Sequences are left padded: the prompt is the only part whose length varies, so every modality span and
fusion token sits after a common prompt block and each sample's positions are simple offsets from it.
Position ids count only real tokens, so a sample's output does not depend on how much padding it gets.

Token embeddings: the pretrained vocabulary stays frozen; the new marker tokens (start/end/missing per
modality, K fusion tokens) are added to the tokenizer and read from `new_token_embeddings`, a trainable
parameter owned by this module, so a checkpoint stores only those rows. The LLM is loaded through
AutoModel (the decoder without its LM head): only hidden states are used, so the LM head would cost a
vocabulary-sized projection per position for nothing.

`variant="reference"` (the default) is the authors' model (docs/design/limssr.md lists every
difference): the whole embedding matrix (resized to the tokenizer, markers as its rows) and the LM head
trainable, LoRA rank 16, the reference's prompt, modality order (visual, audio, flow) and heads. Its LM
head is kept for the parameter set but not computed: it never reaches the loss. `variant="project"` is
the design described above; it scored lower than the reference variant in every seed of the one
side-by-side measurement (benchmarks/results/limssr_modes.json), so it is not the default.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import ModelConfig
from models.losses import DISTANCES, hardest_triplet_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODALITY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
VARIANTS = ("project", "reference")
# Settings whose default depends on the variant (the reference's command-line defaults: LoRA rank 16,
# dropout 0.15); None in a config means "the variant's default".
VARIANT_DEFAULTS = {"project": {"lora_r": 8, "dropout": 0.1}, "reference": {"lora_r": 16, "dropout": 0.15}}
# The reference README's training command per dataset and target (`--preset DATASET --action TARGET`):
# the values it passes (epochs, --decay-rate as min_lr_ratio, dropout, and the per-target extras: seed,
# --alpha, --alpha_mse as task_weight, --alpha_con as consistency_weight); lr 2e-4 in every command. All
# else is main_llm.py's default, which training_defaults() and the reference variant's defaults hold,
# but the seed: its default 42 where the command gives none. clip_num and the score range are the
# preset's dataset facts (the same as the reference's readers use).
REFERENCE_COMMANDS: dict[str, dict[str, dict[str, Any]]] = {
    "rg": {
        "Ball": {"epochs": 80, "min_lr_ratio": 0.1, "dropout": 0.35, "seed": 6},
        "Clubs": {"epochs": 410, "min_lr_ratio": 0.1, "dropout": 0.35, "seed": 113, "alpha": 2.0},
        "Hoop": {"epochs": 100, "min_lr_ratio": 0.01, "dropout": 0.3, "consistency_weight": 2.0},
        "Ribbon": {"epochs": 270, "min_lr_ratio": 0.1, "dropout": 0.35},
    },
    "fisv": {"TES": {"epochs": 270}, "PCS": {"epochs": 140}},
    "fs1000": {
        "TES": {"epochs": 160},
        "PCS": {"epochs": 100, "task_weight": 1.0},
        "SS": {"epochs": 130},
        "TR": {"epochs": 90, "consistency_weight": 10.0},
        "PE": {"epochs": 130, "task_weight": 1.0},
        "CO": {"epochs": 200, "consistency_weight": 10.0},
        "IN": {"epochs": 290, "task_weight": 1.0, "alpha": 0.5},
    },
}
REFERENCE_COMMAND_DEFAULTS = {"lr": 2e-4, "min_lr_ratio": 0.1, "dropout": 0.15, "seed": 42}
# Which of a reference command's values are training settings (TrainConfig); the rest are config fields.
REFERENCE_TRAINING = ("epochs", "lr", "min_lr_ratio", "seed")
# The reference variant: its modality order (v, a, f), the words its prompt uses and its marker names.
REFERENCE_ORDER = ("rgb", "audio", "flow")
REFERENCE_WORDS = {"rgb": "visual"}
REFERENCE_MARKER_NAMES = {"rgb": "video"}


@dataclass
class LIMSSRConfig(ModelConfig):
    """Schema version 3 makes `reference` the default variant: a file of an earlier version without
    `variant` was trained as `project` (the default then), and a version-1 file also lacks
    triplet_distance, its run trained with Euclidean distance (see `upgrade`). The presets' published
    settings are MCMoE's: LIMSSR takes the dataset facts every model uses and, in place of the rest, the
    reference's own command for that dataset and target (REFERENCE_COMMANDS, `from_preset`)."""

    SCHEMA_VERSION = 3
    FLAG_FIELDS = {"dropout": "dropout", "alpha": "alpha", "llm": "llm", "llm_dtype": "torch_dtype",
                   "gradient_checkpointing": "gradient_checkpointing", "limssr_variant": "variant"}
    PATH_FIELDS = ("llm",)  # evaluate / score / resume must find a local LLM folder from any working folder
    GPUS_PER_RUN = 1.0  # an LLM each

    modalities: list[str]
    feature_dims: dict[str, int]
    llm: str = "Qwen/Qwen2.5-0.5B"  # hub id or local folder holding weights + tokenizer
    # "reference" (the authors' model) or "project" (this project's design): docs/design/limssr.md
    variant: str = "reference"
    lora_r: int | None = None  # None: the variant's (reference 16, project 8)
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    num_fusion_tokens: int = 4
    head_hidden: int = 256  # width of the refinement / regressor MLPs (project variant; the reference: H and H/2)
    mda_heads: int = 4  # heads of the self-attention across modality vectors; must divide the LLM width
    dropout: float | None = None  # None: the variant's (reference 0.15, project 0.1)
    margin: float = 1.0  # hardest-triplet margin
    triplet_distance: str = "cosine"  # 1 - cosine, as the GDLT triplet loss both papers' code imports
    task_weight: float = 10.0
    alpha: float = 1.0  # hardest-triplet weight
    consistency_weight: float = 1.0
    initial_mix: float = 0.7  # starting weight of the main (LMRF) score in the final score
    gradient_checkpointing: bool = False
    torch_dtype: str = "float32"  # dtype of the LLM; projections and heads always run in float32

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name, value in VARIANT_DEFAULTS[self.variant].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be non-empty and unique, got {self.modalities}")
        for name in self.modalities:
            if not MODALITY_NAME.match(name):
                raise ValueError(f"modality name {name!r} must be a letter followed by letters, digits, _ or -")
            if name not in self.feature_dims:
                raise ValueError(f"feature_dims has no entry for modality {name!r}: {self.feature_dims}")
        if self.triplet_distance not in DISTANCES:
            raise ValueError(f"triplet_distance must be one of {DISTANCES}, got {self.triplet_distance!r}")
        if self.num_fusion_tokens < 1:
            raise ValueError(f"num_fusion_tokens must be >= 1, got {self.num_fusion_tokens}")
        if not 0.0 < self.initial_mix < 1.0:
            raise ValueError(f"initial_mix must lie strictly between 0 and 1, got {self.initial_mix}")
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {sorted(DTYPES)}, got {self.torch_dtype!r}")

    @classmethod
    def upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        # Before version 3 the default variant was project: a file without `variant` trained as project.
        data = {"variant": "project", **data}
        if version == 1:  # a file without triplet_distance trained with Euclidean distance
            data = {"triplet_distance": "euclidean", **data}
        return data

    @classmethod
    def from_preset(cls, preset: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The reference's command for the preset's dataset and target: (training settings, config fields)."""
        command = {**REFERENCE_COMMAND_DEFAULTS, **REFERENCE_COMMANDS[preset.dataset][preset.target]}
        training = {key: value for key, value in command.items() if key in REFERENCE_TRAINING}
        return training, {key: value for key, value in command.items() if key not in REFERENCE_TRAINING}

    @classmethod
    def device_defaults(cls, device_type: str) -> dict[str, Any]:
        # the LLM trains in bf16 on a GPU unless told otherwise
        return {"torch_dtype": "bfloat16"} if device_type == "cuda" else {}

    @classmethod
    def training_defaults(cls) -> dict[str, Any]:
        # The reference's command-line defaults (main_llm.py; docs/design/limssr.md). A preset replaces
        # the epochs, the lr floor and the seed by its dataset's reference command (REFERENCE_COMMANDS).
        return {
            "optimizer": "adamw",
            "lr": 2e-4,
            "weight_decay": 1e-4,
            "batch_size": 8,
            "epochs": 100,
            "warmup_epochs": 5,
            "min_lr_ratio": 0.1,
            "grad_clip": 1.0,
            "mask_policy": "any",
        }

    @classmethod
    def training_defaults_for(cls, options: dict[str, Any]) -> dict[str, Any]:
        # The reference variant draws one availability pattern per batch, as the authors' code does.
        defaults = cls.training_defaults()
        if options.get("variant", cls.variant) == "reference":
            defaults["mask_policy"] = "any-per-batch"
        return defaults


def build_prompt(available: list[str], missing: list[str]) -> str:
    """The text the LLM reads before the modality spans."""
    return (
        "Judge the quality of this performance. "
        f"Available modalities: {', '.join(available)}. "
        f"Missing modalities: {', '.join(missing) if missing else 'none'}."
    )


def build_reference_prompt(available: list[str], missing: list[str]) -> str:
    """The reference code's prompt, word for word (its token sequence is part of the model it trained)."""
    have = ", ".join(available) if available else "no available modality"
    lack = ", ".join(missing) if missing else "none"
    return (
        f"Given the available {have} features from an action video. "
        f"The {lack} modality is missing. "
        f"Based on the available modalities, please infer and reconstruct the useful latent representations "
        f"for the missing {lack} modalities at the designated positions. "
        "Then integrate and enhance all multimodal features for action quality assessment. "
        "Output the fused multi-dimensional feature representations at the designated feature dimension positions: "
    )


def reference_order(modalities: list[str]) -> list[int]:
    """Indices of `modalities` in the reference's order: rgb, audio, flow, then the others as listed."""
    rank = {name: i for i, name in enumerate(REFERENCE_ORDER)}
    return sorted(range(len(modalities)), key=lambda i: rank.get(modalities[i], len(rank)))


def reference_marker_tokens(modalities: list[str], num_fusion_tokens: int) -> dict[str, list[str]]:
    """The reference's marker names per role, modalities in config order: start, end, missing, fusion."""
    names = [REFERENCE_MARKER_NAMES.get(m, m) for m in modalities]
    return {
        "start": [f"<|{n}_start|>" for n in names],
        "end": [f"<|{n}_end|>" for n in names],
        "missing": [f"<|missing_{n}|>" for n in names],
        "fusion": [f"<|feat_dim_{k}|>" for k in range(1, num_fusion_tokens + 1)],
    }


def marker_tokens(modalities: list[str], num_fusion_tokens: int) -> list[str]:
    """New special tokens, in the row order of `new_token_embeddings`: start/end/missing per modality,
    then the fusion tokens."""
    tokens = [f"<{name}_{role}>" for name in modalities for role in ("start", "end", "missing")]
    return tokens + [f"<fusion_{k}>" for k in range(num_fusion_tokens)]


def _looks_like_folder(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def load_llm(name: str, dtype: torch.dtype, causal: bool = False) -> tuple[Any, nn.Module]:
    """Tokenizer and decoder (no LM head; with it when `causal`) of a hub id or local folder, honouring
    offline mode."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    hint = (
        "pass a local folder holding the model's config, weights and tokenizer with --llm FOLDER "
        "(for a tiny random test model: python -m models.tiny_llm FOLDER)"
    )
    if _looks_like_folder(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"LLM folder {folder} does not exist; {hint}")
        source, local_only = str(folder), True
    else:
        flags = (os.environ.get(key, "").lower() for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        offline = any(flag in ("1", "true", "yes") for flag in flags)
        source, local_only = name, offline
    # transformers' per-tensor loading bar would interleave with train's own progress output
    bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        # transformers does not pass local_files_only on to its adapter-config lookup: say it twice
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(
            source, local_files_only=local_only, adapter_kwargs={"local_files_only": local_only}, dtype=dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:  # transformers reports a missing tokenizer file as ValueError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(
            f"could not load the LLM {name!r} (weights, config or tokenizer missing: {reason}); {hint}"
        ) from exc
    finally:
        if bar_was_on:
            transformers_logging.enable_progress_bar()
    return tokenizer, model


@dataclass
class SequenceLayout:
    """Where everything sits in one batch of PCMI sequences (all tensors indexed by sample first)."""

    token_ids: Tensor  # (B, L) tokenizer ids: padding, prompt, markers; feature slots hold <m_missing>
    marker_rows: Tensor  # (B, L) row of new_token_embeddings for marker positions, -1 elsewhere
    attention_mask: Tensor  # (B, L) 1 for real tokens, 0 for left padding
    position_ids: Tensor  # (B, L) positions counted over real tokens only
    prompt_lengths: Tensor  # (B,)
    start_positions: Tensor  # (B, M) position of <m_start>, modalities in config order
    content_positions: Tensor  # (B, M, T) positions of each modality's T feature (or MISSING) slots
    end_positions: Tensor  # (B, M) position of <m_end>
    fusion_positions: Tensor  # (B, K)


def _projection(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(in_dim, hidden, 1),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Conv1d(hidden, hidden, 1),
        nn.BatchNorm1d(hidden),
    )


def _regressor(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))


def head_outputs(main: Tensor, aux: Tensor, mix: Tensor, fusion_states: Tensor, weights: Tensor) -> dict[str, Tensor]:
    """What both variants' heads return, in the one layout the losses and predictions read: the score
    mixes the main and auxiliary regressors by `mix`."""
    return {"score": mix * main + (1 - mix) * aux, "main": main, "aux": aux, "fusion_states": fusion_states,
            "modality_weights": weights, "mix": mix}


class ReferenceHeads(nn.Module):
    """The reference's LMRF and MDA heads and mixing parameters, for H-wide states and M modalities
    (in the reference's order wherever they are stacked or concatenated)."""

    def __init__(self, modalities: list[str], hidden: int, num_fusion: int, heads: int, dropout: float,
                 initial_mix: float) -> None:
        super().__init__()
        count, half = len(modalities), hidden // 2

        def regressor() -> nn.Sequential:
            return nn.Sequential(nn.Linear(hidden, half), nn.LayerNorm(half), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(half, 1))

        self.fusion_norm = nn.LayerNorm(hidden)
        self.modality_attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.modality_norms = nn.ModuleDict({name: nn.LayerNorm(hidden) for name in modalities})
        self.modality_gate = nn.Sequential(nn.Linear(count * hidden, hidden), nn.GELU(), nn.Linear(hidden, count),
                                           nn.Softmax(dim=-1))
        self.main_regressor = regressor()
        self.aux_regressor = regressor()
        self.token_weights = nn.Parameter(torch.ones(num_fusion))
        self.refine_delta = nn.Sequential(nn.Linear(hidden + count, hidden), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(hidden, hidden))
        self.refine_gate = nn.Sequential(nn.Linear(hidden + count, hidden), nn.Sigmoid())
        self.missing_confidence = nn.Parameter(torch.full((count,), 0.6))  # through a sigmoid when used
        self.mix = nn.Parameter(torch.tensor([initial_mix]))  # the main score's weight, unconstrained


class LIMSSR(nn.Module):
    def __init__(self, config: LIMSSRConfig) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.config = config
        self.modalities = list(config.modalities)
        num_modalities, num_fusion = len(self.modalities), config.num_fusion_tokens
        self.reference = config.variant == "reference"
        # the order of the modality blocks (available ones first) and of stacked modality vectors
        self.order = reference_order(self.modalities) if self.reference else list(range(num_modalities))
        rank = torch.empty(num_modalities, dtype=torch.long)
        rank[self.order] = torch.arange(num_modalities)
        self.register_buffer("block_rank", rank, persistent=False)
        self.tokenizer, base = load_llm(config.llm, DTYPES[config.torch_dtype], causal=self.reference)

        pretrained_rows = len(self.tokenizer)
        if self.reference:
            roles = reference_marker_tokens(self.modalities, num_fusion)
            ordered = [roles[role][i] for role in ("start", "end") for i in self.order]
            self.new_tokens = ordered + [roles["missing"][i] for i in self.order] + roles["fusion"]
        else:
            self.new_tokens = marker_tokens(self.modalities, num_fusion)
            roles = {role: self.new_tokens[k : 3 * num_modalities : 3] for k, role in enumerate(("start", "end", "missing"))}
            roles["fusion"] = self.new_tokens[3 * num_modalities :]
        self.tokenizer.add_tokens(self.new_tokens, special_tokens=True)
        new_ids = self.tokenizer.convert_tokens_to_ids(self.new_tokens)
        if len(set(new_ids)) != len(new_ids) or self.tokenizer.unk_token_id in new_ids:
            raise ValueError(f"the tokenizer of {config.llm!r} did not give each marker token its own id")
        for role in ("start", "end", "missing", "fusion"):
            ids = self.tokenizer.convert_tokens_to_ids(roles[role])
            self.register_buffer(f"{role}_ids", torch.tensor(ids), persistent=False)
        # Qwen-style embedding matrices have spare rows; grow only when the new ids do not fit.
        if not self.reference and base.get_input_embeddings().num_embeddings < len(self.tokenizer):
            base.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        self.hidden_size = hidden = base.get_input_embeddings().embedding_dim
        if hidden % config.mda_heads:
            raise ValueError(f"mda_heads={config.mda_heads} must divide the LLM hidden size {hidden}")

        if not self.reference:
            # New rows start as draws from the pretrained vocabulary's per-dimension statistics, so the
            # frozen layers see ordinary-looking tokens; distinct draws keep the K fusion tokens apart.
            vocabulary = base.get_input_embeddings().weight.detach()[:pretrained_rows].float()
            self.new_token_embeddings = nn.Parameter(
                vocabulary.mean(0) + vocabulary.std(0) * torch.randn(len(self.new_tokens), hidden)
            )
            del vocabulary
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self._prompt_ids: dict[tuple[bool, ...], list[int]] = {}

        if config.gradient_checkpointing:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            bias="none",
            **({"task_type": "CAUSAL_LM"} if self.reference else {}),
        )
        self.llm = get_peft_model(base, lora)  # freezes every base weight, adds trainable adapters
        if self.reference:
            # The reference's order: adapters, then the embeddings and LM head trainable, then the
            # vocabulary resized to the tokenizer (which may shrink Qwen's spare rows away).
            self.llm.get_output_embeddings().weight.requires_grad = True
            self.llm.get_input_embeddings().weight.requires_grad = True
            self.llm.resize_token_embeddings(len(self.tokenizer))

        self.projections = nn.ModuleDict(
            {name: _projection(config.feature_dims[name], hidden, config.dropout) for name in self.modalities}
        )
        if self.reference:
            self.reference_heads = ReferenceHeads(
                [self.modalities[i] for i in self.order], hidden, num_fusion, config.mda_heads, config.dropout,
                config.initial_mix,
            )
            return
        # LMRF
        self.fusion_logits = nn.Parameter(torch.zeros(num_fusion))
        self.fusion_norm = nn.LayerNorm(hidden)
        self.refine_delta = nn.Sequential(
            nn.Linear(hidden + num_modalities, config.head_hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.head_hidden, hidden),
        )
        self.refine_gate = nn.Linear(hidden + num_modalities, hidden)
        self.main_regressor = _regressor(hidden, config.head_hidden, config.dropout)
        # MDA
        self.modality_norms = nn.ModuleDict({name: nn.LayerNorm(hidden) for name in self.modalities})
        self.modality_attention = nn.MultiheadAttention(
            hidden, config.mda_heads, dropout=config.dropout, batch_first=True
        )
        self.modality_gate = nn.Linear(hidden, 1)
        self.missing_confidence = nn.Linear(hidden, 1)
        self.aux_regressor = _regressor(hidden, config.head_hidden, config.dropout)
        # sigmoid(mix_logit) is the weight of the main score: always in (0, 1)
        self.mix_logit = nn.Parameter(torch.tensor(math.log(config.initial_mix / (1 - config.initial_mix))))

    # ------------------------------------------------------------------ sequence construction

    def prompt_ids(self, available: tuple[bool, ...]) -> list[int]:
        """Token ids of the prompt for one availability pattern (config modality order), cached."""
        if available not in self._prompt_ids:
            if self.reference:  # its words, its order, and the tokenizer's own special-token rule
                words = [REFERENCE_WORDS.get(self.modalities[i], self.modalities[i]) for i in self.order]
                here = [available[i] for i in self.order]
                text = build_reference_prompt([w for w, h in zip(words, here) if h], [w for w, h in zip(words, here) if not h])
                encoded = self.tokenizer(text)
            else:
                names = [name for name, here in zip(self.modalities, available) if here]
                absent = [name for name, here in zip(self.modalities, available) if not here]
                encoded = self.tokenizer(build_prompt(names, absent), add_special_tokens=False)
            self._prompt_ids[available] = encoded["input_ids"]
        return self._prompt_ids[available]

    def sequence_length(self, num_steps: int) -> int:
        """Longest LLM sequence for T = num_steps: prompt + M * (T + 2) + K over every availability pattern."""
        num_modalities = len(self.modalities)
        longest_prompt = max(
            len(self.prompt_ids(pattern)) for pattern in product((True, False), repeat=num_modalities) if any(pattern)
        )
        return longest_prompt + num_modalities * (num_steps + 2) + self.config.num_fusion_tokens

    def build_sequence(self, available: Tensor, num_steps: int) -> SequenceLayout:
        """Token ids, masks and per-sample positions for a batch with availability `available` (B, M)."""
        device = self.block_rank.device
        batch, num_modalities = available.shape
        prompts = [self.prompt_ids(tuple(row)) for row in available.tolist()]
        prompt_block = max(len(ids) for ids in prompts)
        span = num_steps + 2
        tail = num_modalities * span + self.config.num_fusion_tokens
        length = prompt_block + tail

        token_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        for row, ids in enumerate(prompts):
            token_ids[row, prompt_block - len(ids) : prompt_block] = torch.tensor(ids)
            attention_mask[row, prompt_block - len(ids) :] = 1
        token_ids, attention_mask = token_ids.to(device), attention_mask.to(device)
        marker_rows = torch.full_like(token_ids, -1)

        available = available.to(device)
        # available modalities first, each group in the variant's order (project: config order)
        order = torch.argsort((~available).long() * num_modalities + self.block_rank, dim=1)  # (B, M) modality per slot
        slot = torch.argsort(order, dim=1)  # (B, M) slot of each modality
        steps = torch.arange(num_steps, device=device)
        start_positions = prompt_block + slot * span
        content_positions = start_positions[..., None] + 1 + steps
        end_positions = start_positions + num_steps + 1
        fusion_slots = torch.arange(self.config.num_fusion_tokens, device=device)
        fusion_positions = (prompt_block + num_modalities * span + fusion_slots).expand(batch, -1)

        rows = torch.arange(batch, device=device)[:, None]
        modality_rows = torch.arange(num_modalities, device=device).expand(batch, -1)
        content_rows = (3 * modality_rows + 2)[..., None].expand(-1, -1, num_steps)
        token_ids[rows, start_positions] = self.start_ids.expand(batch, -1)
        token_ids[rows, end_positions] = self.end_ids.expand(batch, -1)
        token_ids[rows[..., None], content_positions] = self.missing_ids[:, None].expand(batch, -1, num_steps)
        token_ids[rows, fusion_positions] = self.fusion_ids.expand(batch, -1)
        marker_rows[rows, start_positions] = 3 * modality_rows
        marker_rows[rows, end_positions] = 3 * modality_rows + 1
        marker_rows[rows[..., None], content_positions] = content_rows
        marker_rows[rows, fusion_positions] = 3 * num_modalities + fusion_slots

        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return SequenceLayout(
            token_ids=token_ids,
            marker_rows=marker_rows,
            attention_mask=attention_mask,
            position_ids=position_ids,
            prompt_lengths=torch.tensor([len(ids) for ids in prompts], device=device),
            start_positions=start_positions,
            content_positions=content_positions,
            end_positions=end_positions,
            fusion_positions=fusion_positions,
        )

    def _embed(self, layout: SequenceLayout, features: dict[str, Tensor], available: Tensor) -> Tensor:
        embeds = self.llm.get_input_embeddings()(layout.token_ids).float()
        if not self.reference:  # the reference's markers are rows of the embedding matrix itself
            markers = self.new_token_embeddings[layout.marker_rows.clamp(min=0)]
            embeds = torch.where((layout.marker_rows >= 0)[..., None], markers, embeds)
        for index, name in enumerate(self.modalities):
            rows = available[:, index].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            # only available samples go through the projection: zero-filled absent ones would skew BatchNorm
            projected = self.projections[name](features[name][rows].transpose(1, 2)).transpose(1, 2)
            positions = layout.content_positions[rows, index]
            # under autocast (--precision bf16) the projection hands back bfloat16; the sequence is float32
            embeds = embeds.index_put((rows[:, None].expand_as(positions), positions), projected.to(embeds.dtype))
        return embeds

    # ------------------------------------------------------------------ forward / loss

    def _check_inputs(self, features: dict[str, Tensor], available: Tensor) -> int:
        if available.dtype != torch.bool or available.dim() != 2 or available.shape[1] != len(self.modalities):
            raise ValueError(
                f"available must be a (B, {len(self.modalities)}) bool tensor, "
                f"got {tuple(available.shape)} {available.dtype}"
            )
        if not available.any(dim=1).all():
            raise ValueError("every sample needs at least one available modality")
        shapes = {}
        for name in self.modalities:
            if name not in features:
                raise ValueError(f"features has no entry for modality {name!r} (zeros are expected where it is absent)")
            tensor = features[name]
            dim = self.config.feature_dims[name]
            if tensor.dim() != 3 or tensor.shape[0] != available.shape[0] or tensor.shape[2] != dim:
                expected = f"(B={available.shape[0]}, T, {dim})"
                raise ValueError(f"features[{name!r}] must be {expected}, got {tuple(tensor.shape)}")
            shapes[name] = tensor.shape[1]
        if len(set(shapes.values())) != 1:
            raise ValueError(f"all modalities need the same number of time steps, got {shapes}")
        return next(iter(shapes.values()))

    def forward(
        self, features: dict[str, Tensor], available: Tensor, present: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The contract's forward (models/__init__.py); `present` is accepted and unused: LIMSSR reads
        only what `available` lets it see and has no reconstruction-type targets."""
        num_steps = self._check_inputs(features, available)
        available = available.to(self.block_rank.device)
        layout = self.build_sequence(available, num_steps)
        embeds = self._embed(layout, features, available)
        llm_dtype = self.llm.get_input_embeddings().weight.dtype
        # the reference variant's decoder without its LM head (the adapters live inside it)
        decoder = self.llm.get_base_model().base_model if self.reference else self.llm
        hidden = decoder(
            inputs_embeds=embeds.to(llm_dtype),
            attention_mask=layout.attention_mask,
            position_ids=layout.position_ids,
            use_cache=False,
        ).last_hidden_state.float()
        if self.reference:
            return self._reference_heads(hidden, layout, available)
        batch, _, width = hidden.shape
        mask = available.float()

        # LMRF: weighted fusion tokens -> mask-aware refinement -> main score
        fusion_states = hidden.gather(1, layout.fusion_positions[..., None].expand(-1, -1, width))  # (B, K, H)
        fused = self.fusion_norm((fusion_states * self.fusion_logits.softmax(0)[:, None]).sum(1))
        refine_input = torch.cat([fused, mask], dim=1)
        fused = fused + torch.sigmoid(self.refine_gate(refine_input)) * self.refine_delta(refine_input)
        main = torch.sigmoid(self.main_regressor(fused)).squeeze(1)

        # MDA: per-modality span means -> attention across modalities -> confidence-weighted gate -> aux
        num_modalities, num_steps = layout.content_positions.shape[1:]
        positions = layout.content_positions.reshape(batch, -1, 1).expand(-1, -1, width)
        spans = hidden.gather(1, positions).view(batch, num_modalities, num_steps, width).mean(2)
        spans = torch.stack([self.modality_norms[name](spans[:, i]) for i, name in enumerate(self.modalities)], 1)
        attended, _ = self.modality_attention(spans, spans, spans, need_weights=False)
        spans = spans + attended
        # an imputed (missing) modality is trusted only as far as its learned confidence says
        imputed_confidence = torch.sigmoid(self.missing_confidence(spans)).squeeze(2)
        confidence = torch.where(available, torch.ones_like(mask), imputed_confidence)
        weights = self.modality_gate(spans).squeeze(2).softmax(1) * confidence
        weights = weights / weights.sum(1, keepdim=True)
        aux = torch.sigmoid(self.aux_regressor((weights[..., None] * spans).sum(1))).squeeze(1)

        return head_outputs(main, aux, torch.sigmoid(self.mix_logit), fusion_states, weights)

    def _reference_heads(self, hidden: Tensor, layout: SequenceLayout, available: Tensor) -> dict[str, Tensor]:
        """The reference's LMRF and MDA on the LLM's last hidden states (modalities in its order)."""
        heads = self.reference_heads
        batch, _, width = hidden.shape
        mask = available[:, self.order].float()  # (B, M) in the reference's order

        fusion_states = hidden.gather(1, layout.fusion_positions[..., None].expand(-1, -1, width))  # (B, K, H)
        fused = heads.fusion_norm((fusion_states * heads.token_weights.softmax(0)[:, None]).sum(1))
        refine_input = torch.cat([fused, mask], dim=1)
        fused = fused + heads.refine_gate(refine_input) * heads.refine_delta(refine_input)
        main = torch.sigmoid(heads.main_regressor(fused).squeeze(-1))

        num_modalities, num_steps = layout.content_positions.shape[1:]
        positions = layout.content_positions.reshape(batch, -1, 1).expand(-1, -1, width)
        spans = hidden.gather(1, positions).view(batch, num_modalities, num_steps, width).mean(2)
        spans = torch.stack([heads.modality_norms[self.modalities[i]](spans[:, i]) for i in self.order], 1)
        attended, _ = heads.modality_attention(spans, spans, spans, need_weights=False)
        weights = heads.modality_gate(spans.flatten(1))  # (B, M) from the concatenated modality vectors
        confidence = mask + (1.0 - mask) * torch.sigmoid(heads.missing_confidence)
        aux = torch.sigmoid(heads.aux_regressor((attended * (weights * confidence)[..., None]).sum(1)).squeeze(-1))

        return head_outputs(main, aux, heads.mix.squeeze(0), fusion_states, weights)

    def loss(
        self, out: dict[str, Tensor], target: Tensor, present: Tensor, available: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """10 * MSE(final, target) + alpha * hardest triplet over fusion tokens + MSE(main, aux).

        LIMSSR has no reconstruction-type terms, so `present` (which modalities exist in the data) is
        accepted for the shared contract and unused; what the model saw is `available`, already in `out`.
        """
        config = self.config
        task = F.mse_loss(out["score"], target)
        triplet = hardest_triplet_loss(out["fusion_states"], config.margin, config.triplet_distance)
        consistency = F.mse_loss(out["main"], out["aux"])
        total = config.task_weight * task + config.alpha * triplet + config.consistency_weight * consistency
        return total, {"task": task.detach(), "triplet": triplet.detach(), "consistency": consistency.detach()}

    # ------------------------------------------------------------------ saving

    def _is_saved(self, key: str) -> bool:
        if not key.startswith("llm.") or "lora_" in key:
            return True
        if not self.reference:
            return False
        # the reference variant trains the whole embedding matrix and the LM head (stored once when tied)
        output = self.llm.get_output_embeddings()
        tied = output is None or output.weight is self.llm.get_input_embeddings().weight
        return ".embed_tokens." in key or (".lm_head." in key and not tied)

    def state_to_save(self) -> dict[str, Tensor]:
        """LoRA adapters, the new token rows (reference variant: the embedding matrix and LM head),
        projections and heads: never the frozen base LLM."""
        return {key: value.detach() for key, value in self.state_dict().items() if self._is_saved(key)}

    def load_saved_state(self, state: dict[str, Tensor]) -> None:
        """Put `state_to_save()` output back onto a model freshly built from the same config."""
        expected = {key for key in self.state_dict() if self._is_saved(key)}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"saved LIMSSR state does not match this model (base LLM {self.config.llm!r}): "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        try:
            self.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ValueError(
                f"saved LIMSSR state has the wrong shapes for base LLM {self.config.llm!r}: {exc}"
            ) from None


def build_limssr(config: LIMSSRConfig | dict[str, Any]) -> LIMSSR:
    if isinstance(config, dict):
        config = LIMSSRConfig.from_dict(config)
    return LIMSSR(config)
