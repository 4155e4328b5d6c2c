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
        config: ``{"architecture": "llama"|"gpt2"|"bert", **hf_config_kwargs}`` or, for
            ``"llava"``, ``{"architecture": "llava", "text": {...}, "vision": {...}}``.
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
    if arch == "llava":
        build_tiny_llava(config, out_dir, seed)
        return
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**ids, **kwargs))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(**ids, **kwargs))
    elif arch == "bert":
        model = BertForMaskedLM(BertConfig(**ids, **kwargs))
    else:
        raise ValueError(f"unknown tiny architecture '{arch}': use llama, gpt2, bert or llava")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


IMAGE_TOKEN = "<image>"


def build_tiny_llava(config: dict, out_dir: Path, seed: int = 0) -> None:
    """A randomly initialised ``LlavaForConditionalGeneration`` (tiny CLIP tower + tiny Llama).

    The tokenizer is the tiny byte-level BPE plus an ``<image>`` special token (the image
    placeholder, appended at the end of the vocabulary). The folder has no image processor:
    pixels are passed as ``pixel_values [B, 3, S, S]`` tensors, and ``tokenizer_config.json`` names
    the tokenizer as the processor class, so ``AutoProcessor`` (which TransformerLens' boot
    calls for multimodal models) loads the tokenizer instead of failing and trying to install
    torchvision.

    Args:
        config: ``{"architecture": "llava", "text": LlamaConfig kwargs, "vision": CLIPVisionConfig kwargs}``.
    """
    import json

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(**config["vision"])
    text = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       **config["text"])
    n_image_tokens = (vision.image_size // vision.patch_size) ** 2
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                        vision_feature_select_strategy="default", vision_feature_layer=-1,
                        image_seq_length=n_image_tokens)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tokenizer_config = Path(out_dir) / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["processor_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.write_text(json.dumps(settings, indent=1))
