"""A tiny random-weight Qwen2 causal LM with a small byte-level BPE tokenizer, built fully offline.

It stands in for Qwen2.5-0.5B in the tests and on CPU: same architecture family, same tokenizer class,
same files on disk, so it goes through exactly the `--llm FOLDER` loading path a real model does. Its
weights are random: scores from a LIMSSR trained on it say nothing about the real model's quality.

    python -m models.tiny_llm runs/tiny-llm        # then: pipeline train --model limssr --llm runs/tiny-llm
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models.limssr import build_prompt

END_OF_TEXT = "<|endoftext|>"
# The tokenizer is trained on the prompts LIMSSR writes plus a few other modality names; byte-level BPE
# still encodes any other text, just in more pieces.
CORPUS_MODALITIES = ["rgb", "flow", "audio", "video", "pose", "depth", "skeleton", "motion"]


def _corpus() -> list[str]:
    lines = []
    for index in range(len(CORPUS_MODALITIES)):
        rest = CORPUS_MODALITIES[:index] + CORPUS_MODALITIES[index + 1 :]
        lines += [build_prompt([CORPUS_MODALITIES[index]], rest), build_prompt(rest[:2], [CORPUS_MODALITIES[index]])]
    return lines + [build_prompt(CORPUS_MODALITIES, [])]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A Qwen2Tokenizer (byte-level BPE) whose vocabulary and merges are trained here on the prompt text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(pair.split(" ")) if isinstance(pair, str) else tuple(pair) for pair in trained["merges"]]
    return Qwen2Tokenizer(vocab=trained["vocab"], merges=merges)


def save_tiny_llm(
    folder: str | Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_multiple: int = 64,
    seed: int = 0,
) -> Path:
    """Write config, random weights (safetensors) and tokenizer of a tiny Qwen2 causal LM to `folder`.

    The embedding matrix has len(tokenizer) rows rounded up to `vocab_multiple`, like Qwen's spare rows;
    vocab_multiple=1 leaves no room, so new tokens make the model grow its embeddings.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // vocab_multiple) * vocab_multiple,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the model (usable as --llm FOLDER)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = save_tiny_llm(args.folder, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed)
    print(f"tiny random-weight Qwen2 LM written to {folder} (use it with --llm {folder})")


if __name__ == "__main__":
    main()
