"""The hooked model: a ``TransformerBridge`` plus tokenization, validation and scoped hooks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from workbench.batch import TokenBatch, pad_sequences
from workbench.errors import InputError, WorkbenchError
from workbench.pull import pull_model, verify_folder
from workbench.registry import ModelSpec, resolve_spec

Hook = tuple[str, Callable]

_LOADED: dict[tuple[str, str, str], "HookedModel"] = {}
_LOAD_LOCK = threading.Lock()


def bind_hook(fn: Callable, **kwargs) -> Callable:
    """A TransformerLens hook ``(tensor, hook)`` calling ``fn(tensor, hook, **kwargs)``."""
    def hook(tensor, hook):
        return fn(tensor, hook, **kwargs)
    return hook


def hook_name(layer: int, site: str) -> str:
    """TransformerLens hook name of an attention site (``pattern``, ``z``, ``q``, ``k``, ``v``)."""
    return f"blocks.{layer}.attn.hook_{site}"


class HookedModel:
    """A loaded model with the facts the workbench needs.

    Attributes:
        name: registry name or folder path it was loaded from.
        folder: the local Hugging Face folder.
        bridge: the ``TransformerBridge`` (TransformerLens hooks).
        causal: True for decoders (causal attention), False for encoders.
        n_layers, n_heads, n_kv_heads, d_head, n_ctx: architecture facts.
        lock: serialises forwards so scoped hooks never leak across threads.
    """

    def __init__(self, name: str, folder: Path, bridge, causal: bool) -> None:
        self.name = name
        self.folder = folder
        self.bridge = bridge
        self.causal = causal
        cfg = bridge.cfg
        self.n_layers: int = cfg.n_layers
        self.n_heads: int = cfg.n_heads
        self.n_kv_heads: int = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        self.d_head: int = cfg.d_head
        self.n_ctx: int = cfg.n_ctx
        self.lock = threading.RLock()
        self._kernel_model = None

    @property
    def kernel_model(self):
        """Plain Hugging Face copy whose attention runs the workbench kernels (lazy, once).

        Use it inside :func:`workbench.kernel_attention.kernel_forward`; see that module.
        """
        if self._kernel_model is None:
            from workbench.kernel_attention import load_kernel_model

            dtype = next(self.bridge.parameters()).dtype
            device = next(self.bridge.parameters()).device
            self._kernel_model = load_kernel_model(self.folder, dtype, str(device), self.causal)
        return self._kernel_model

    @property
    def tokenizer(self):
        return self.bridge.tokenizer

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad if pad is not None else 0)

    def __repr__(self) -> str:
        return (f"HookedModel({self.name!r}, layers={self.n_layers}, heads={self.n_heads}, "
                f"kv_heads={self.n_kv_heads}, d_head={self.d_head}, n_ctx={self.n_ctx}, "
                f"{'causal' if self.causal else 'bidirectional'})")

    # ---------------------------------------------------------------- tokens
    def encode(self, text: str, *, max_tokens: int | None = None) -> torch.Tensor:
        """Token ids ``[n]`` of one prompt (with BOS/CLS as the model expects).

        Raises:
            InputError: empty prompt, or longer than ``max_tokens`` / the model context.
        """
        if not isinstance(text, str) or not text.strip():
            raise InputError("empty prompt: give at least one non-whitespace character")
        ids = self.bridge.to_tokens(text, truncate=False)[0].cpu()
        limit = min(max_tokens or self.n_ctx, self.n_ctx)
        if ids.numel() > limit:
            raise InputError(
                f"prompt is {ids.numel()} tokens, longer than the limit of {limit} "
                f"({'model context' if limit == self.n_ctx else 'max tokens'}): shorten it or use --seq-len to truncate"
            )
        return ids

    def tokenize(self, prompts: Sequence[str], *, max_tokens: int | None = None,
                 meta: Sequence[dict] | None = None) -> TokenBatch:
        """Right-padded batch of ``prompts``; see :meth:`encode` for the checks."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise InputError("no prompts given: pass at least one prompt")
        return self.batch_from_ids([self.encode(p, max_tokens=max_tokens) for p in prompts], meta=meta)

    def batch_from_ids(self, sequences: Sequence[torch.Tensor], meta: Sequence[dict] | None = None) -> TokenBatch:
        """Right-padded batch from 1-D id tensors (checked against the context length)."""
        if len(sequences) == 0:
            raise InputError("empty dataset: it has no sequences")
        for seq in sequences:
            if seq.numel() == 0:
                raise InputError("empty sequence in the batch: drop it or give text")
            if seq.numel() > self.n_ctx:
                raise InputError(f"sequence of {seq.numel()} tokens exceeds the model context "
                                 f"of {self.n_ctx}: use --seq-len to truncate")
        tokens, mask = pad_sequences([torch.as_tensor(s, dtype=torch.long) for s in sequences], self.pad_id)
        return TokenBatch(tokens, mask, [dict(m) for m in meta] if meta else [])

    def str_tokens(self, ids: torch.Tensor) -> list[str]:
        """Readable string of each id in a 1-D tensor."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    # ---------------------------------------------------------------- heads
    def check_heads(self, layers: Sequence[int] | None = None,
                    heads: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
        """Validate and default a layer/head subset; returns sorted lists.

        Raises:
            InputError: an index outside ``[0, n_layers)`` / ``[0, n_heads)``.
        """
        layers = list(range(self.n_layers)) if layers is None else sorted(set(int(x) for x in layers))
        heads = list(range(self.n_heads)) if heads is None else sorted(set(int(x) for x in heads))
        for kind, values, count in (("layer", layers, self.n_layers), ("head", heads, self.n_heads)):
            if not values:
                raise InputError(f"empty {kind} selection: give at least one {kind} index")
            bad = [v for v in values if not 0 <= v < count]
            if bad:
                raise InputError(f"{kind} index {bad[0]} out of range: {self.name} has {count} "
                                 f"{kind}s (valid 0..{count - 1})")
        return layers, heads

    # ---------------------------------------------------------------- running
    def run(self, batch: TokenBatch, *, fwd_hooks: Sequence[Hook] = (), bwd_hooks: Sequence[Hook] = (),
            grad: bool = False, stop_at_layer: int | None = None) -> torch.Tensor:
        """Forward ``batch`` with hooks scoped to this call; returns logits ``[B, N, vocab]``.

        Hooks are removed when the call returns or raises (TransformerLens ``hooks`` context).
        """
        with self.lock, torch.set_grad_enabled(grad), \
                self.bridge.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks)):
            out = self.bridge(batch.tokens, attention_mask=batch.mask.long(), stop_at_layer=stop_at_layer)
        _check_finite(out)
        return out

    def loss(self, batch: TokenBatch, *, fwd_hooks: Sequence[Hook] = (), grad: bool = False,
             per_token: bool = False) -> torch.Tensor:
        """Next-token cross-entropy over real positions (mean, or ``[B, N-1]`` with NaN on padding)."""
        if not self.causal:
            raise InputError(f"{self.name} is an encoder: next-token loss needs a causal language model")
        logits = self.run(batch, fwd_hooks=fwd_hooks, grad=grad)
        return next_token_loss(logits, batch, per_token=per_token)


def next_token_loss(logits: torch.Tensor, batch: TokenBatch, *, per_token: bool = False) -> torch.Tensor:
    """Masked next-token cross-entropy from ``logits [B, N, V]``."""
    targets = batch.tokens[:, 1:]
    valid = batch.mask[:, 1:] & batch.mask[:, :-1]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets, reduction="none")
    if per_token:
        return losses.masked_fill(~valid, float("nan"))
    if not valid.any():
        raise InputError("loss needs at least one sequence of 2 or more tokens")
    return losses[valid].mean()


def _check_finite(tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise WorkbenchError("the model produced NaN/inf values: the checkpoint may be corrupt, "
                             "or the dtype too narrow (try --dtype float32)")


def load_model(name_or_path: str = "smollm2-135m", *, device: str = "cpu",
               dtype: torch.dtype = torch.float32, from_file: Path | None = None) -> HookedModel:
    """Load a registry model (pulled and cached on first use) or a local HF folder.

    Loaded models are kept per process, so the app and repeated notebook calls load once.

    Raises:
        ModelNotFoundError: unknown name / missing folder.
        CorruptModelError: truncated or unreadable checkpoint.
    """
    key = (str(name_or_path), str(device), str(dtype))
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        spec = resolve_spec(str(name_or_path))
        if isinstance(spec, ModelSpec):
            folder, causal = pull_model(spec, from_file=from_file), spec.causal
        else:
            verify_folder(spec)
            folder, causal = spec, _is_causal_folder(spec)
        bridge = _boot(folder, device, dtype)
        model = HookedModel(str(name_or_path), folder, bridge, causal)
        _LOADED[key] = model
        return model


def _is_causal_folder(folder: Path) -> bool:
    import json

    config = json.loads((folder / "config.json").read_text())
    encoder_types = {"bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "deberta", "mpnet"}
    return config.get("model_type") not in encoder_types


def _boot(folder: Path, device: str, dtype: torch.dtype):
    """``TransformerBridge.boot_transformers`` with errors turned into one clear line."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(str(folder), device=device, dtype=dtype)
    except Exception as err:  # transformers/TL raise many types for unsupported or broken folders
        from workbench.errors import CorruptModelError

        raise CorruptModelError(
            f"could not load the model in {folder} ({type(err).__name__}: {str(err).splitlines()[0][:200]}): "
            "check it is a complete Hugging Face folder of an architecture TransformerLens supports"
        ) from None
    bridge.eval()
    return bridge
