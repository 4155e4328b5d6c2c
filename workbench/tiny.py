"""Tiny randomly initialised models (built from a config, seeded) for fast tests.

They are real Hugging Face architectures saved as safetensors, so they go through exactly
the same loading path (``TransformerBridge.boot_transformers``) as the real models.
"""

from __future__ import annotations

from pathlib import Path

import torch

# A fixed, project-authored corpus: the byte-level BPE of the tiny models is trained on it.
_TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Attention heads move information between token positions in a transformer.",
    "Question: what colour is the sky on a clear day? Answer: blue.",
    "One two three four five six seven eight nine ten eleven twelve.",
]
_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "<cls>", "<sep>"]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a fixed corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_TOKENIZER_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>", cls_token="<cls>", sep_token="<sep>",
    )


def build_tiny_model(config: dict, out_dir: Path, seed: int = 0) -> None:
    """Create, seed and save a tiny model plus tokenizer into ``out_dir``.

    Args:
        config: ``{"architecture": "llama"|"gpt2"|"bert", **hf_config_kwargs}``.
        out_dir: destination folder (written by the caller atomically).
        seed: torch seed for the random initialisation.
    """
    from transformers import (
        BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    )

    tokenizer = build_tokenizer()
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    kwargs = {k: v for k, v in config.items() if k != "architecture"}
    arch = config["architecture"]
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**ids, **kwargs))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(**ids, **kwargs))
    elif arch == "bert":
        model = BertForMaskedLM(BertConfig(**ids, **kwargs))
    else:
        raise ValueError(f"unknown tiny architecture '{arch}': use llama, gpt2 or bert")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
