"""The hooked model: a ``TransformerBridge`` plus tokenization, validation and scoped hooks."""

from __future__ import annotations

import gc
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from workbench.batch import TokenBatch, pad_sequences
from workbench.errors import InputError, check_int
from workbench.pull import pull_model, verify_folder
from workbench.registry import DEFAULT_MODEL, ModelSpec, resolve_spec

Hook = tuple[str, Callable]

_LOADED: OrderedDict[tuple[str, str, str], "HookedModel"] = OrderedDict()  # least recently used first
_LOAD_LOCK = threading.Lock()
_CACHE_SIZE: int | None = None


def model_cache_size() -> int:
    """How many models :func:`load_model` keeps loaded (least recently used dropped first):
    :func:`set_model_cache_size`, else ``$WORKBENCH_MODEL_CACHE``, else 2."""
    if _CACHE_SIZE is not None:
        return _CACHE_SIZE
    text = os.environ.get("WORKBENCH_MODEL_CACHE", "2")
    try:
        return max(1, int(text))
    except ValueError:
        raise InputError(f"WORKBENCH_MODEL_CACHE={text!r} must be a positive integer") from None


def set_model_cache_size(size: int | None) -> None:
    """Keep at most ``size`` models loaded (None: back to ``$WORKBENCH_MODEL_CACHE`` / 2)."""
    global _CACHE_SIZE
    if size is not None:
        check_int("model cache size", size)
    _CACHE_SIZE = size
    with _LOAD_LOCK:
        _evict()


def _evict() -> None:
    """Drop the least recently used loaded models beyond the cache size (caller holds the lock).
    Models wrapped from memory are the caller's own and never dropped."""
    from_disk = [key for key in _LOADED if not key[0].startswith("in-memory:")]
    dropped = from_disk[:max(0, len(from_disk) - model_cache_size())]
    for key in dropped:
        del _LOADED[key]
    if dropped:
        gc.collect()  # bridges hold reference cycles: free their weights now


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
        self._attention = None

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.bridge.parameters()).dtype

    @property
    def attention(self):
        """The :class:`workbench.attention_backend.AttentionLayout` a workbench call switches (built once)."""
        if self._attention is None:
            from workbench.attention_backend import map_attention

            self._attention = map_attention(self.bridge)
        return self._attention

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
    def encode(self, text: str, *, max_tokens: int | None = None, truncate: bool = False) -> torch.Tensor:
        """Token ids ``[n]`` of one prompt (with BOS/CLS as the model expects).

        Args:
            max_tokens: the limit (default and at most the model context).
            truncate: keep the first ``max_tokens`` ids of a longer prompt instead of refusing it.

        Raises:
            InputError: empty prompt, or longer than ``max_tokens`` / the model context.
        """
        if not isinstance(text, str) or not text.strip():
            raise InputError("empty prompt: give at least one non-whitespace character")
        ids = self.bridge.to_tokens(text, truncate=False)[0].cpu()
        limit = min(max_tokens or self.n_ctx, self.n_ctx)
        if truncate:
            return ids[:limit]
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
            grad: bool = False, stop_at_layer: int | None = None, backend: str | None = None,
            interventions=None) -> torch.Tensor:
        """Forward ``batch`` with hooks and interventions scoped to this call; logits ``[B, N, vocab]``.

        See :func:`workbench.forward.run` (backend None: ``eager`` when a hook reads ``hook_pattern``).
        """
        from workbench.forward import run

        edits = None
        if interventions is not None:
            from workbench.interventions import as_intervention_set

            edits = as_intervention_set(interventions).compile(self, batch)
        return run(self, batch, backend=backend, edits=edits, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks,
                   grad=grad, stop_at_layer=stop_at_layer)

    def loss(self, batch: TokenBatch, *, fwd_hooks: Sequence[Hook] = (), grad: bool = False,
             per_token: bool = False, interventions=None) -> torch.Tensor:
        """Next-token cross-entropy over real positions (mean, or ``[B, N-1]`` with NaN on padding)."""
        if not self.causal:
            raise InputError(f"{self.name} is an encoder: next-token loss needs a causal language model")
        logits = self.run(batch, fwd_hooks=fwd_hooks, grad=grad, interventions=interventions)
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


def load_model(name_or_path=DEFAULT_MODEL, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = torch.float32, from_file: Path | None = None) -> HookedModel:
    """Load a model once: a registry name (pulled and cached on first use), a local Hugging Face
    folder, a Hugging Face hub id (resolved through the standard Hugging Face cache), or a model
    already in memory (a ``TransformerBridge``, a Hugging Face ``PreTrainedModel``, or a
    :class:`HookedModel`, returned as is).

    Loaded models are kept per process (keyed by resolved folder, device and dtype), so the app
    and repeated notebook calls load once; at most :func:`model_cache_size` of them (default 2,
    least recently used dropped first).

    Raises:
        InputError: unknown device / dtype, or CUDA asked of a torch without it.
        ModelNotFoundError: unknown name / missing folder / uncached hub id.
        CorruptModelError: truncated or unreadable checkpoint.
    """
    from workbench.devices import parse_device, parse_dtype

    if isinstance(name_or_path, HookedModel):
        return name_or_path
    if isinstance(name_or_path, torch.nn.Module):
        return _wrap_loaded(name_or_path)
    if not isinstance(name_or_path, (str, Path)):
        raise InputError(f"load_model takes a model name, folder, hub id or loaded model, "
                         f"got {type(name_or_path).__name__}")
    device, dtype = parse_device(device), parse_dtype(dtype)
    spec = resolve_spec(str(name_or_path))
    key = (spec.name if isinstance(spec, ModelSpec) else str(spec), str(device), str(dtype))
    with _LOAD_LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
        if isinstance(spec, ModelSpec):
            folder, causal = pull_model(spec, from_file=from_file), spec.causal
        else:
            verify_folder(spec)
            folder, causal = spec, _is_causal_folder(spec)
        _check_tokenizer_files(folder)
        bridge = _boot(folder, str(device), dtype)
        check_weights(bridge.original_model, folder)
        check_tokenizer(bridge, folder)
        model = HookedModel(str(name_or_path), folder, bridge, causal)
        _LOADED[key] = model
        _evict()
        return model


def _wrap_loaded(module: torch.nn.Module) -> HookedModel:
    """The :class:`HookedModel` of a ``TransformerBridge`` or a Hugging Face model already in memory,
    made once per module (one lock per module tree); a Hugging Face model is wrapped in place (the
    bridge puts its hook points into the module tree)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel

    if not isinstance(module, (TransformerBridge, PreTrainedModel)):
        raise InputError(f"load_model cannot use a {type(module).__name__}: pass a TransformerBridge, a "
                         "Hugging Face PreTrainedModel, a registry name or a folder")
    with _LOAD_LOCK:
        for loaded in _LOADED.values():  # already wrapped: a second bridge would rewire its modules
            if module is loaded.bridge or module is loaded.bridge.original_model:
                return loaded
        bridge = module if isinstance(module, TransformerBridge) else _bridge_from_hf(module)
        hf = bridge.original_model
        bridge.eval()
        name = getattr(hf.config, "_name_or_path", None) or type(hf).__name__
        model = HookedModel(name, Path(getattr(hf.config, "_name_or_path", "") or "."), bridge,
                            hf.config.model_type not in _ENCODER_TYPES)
        _LOADED[(f"in-memory:{id(bridge)}", "", "")] = model
        return model


def _bridge_from_hf(hf):
    """Boot a ``TransformerBridge`` around an in-memory Hugging Face model (its tokenizer from its folder)."""
    from transformers import AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    name = getattr(hf.config, "_name_or_path", "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name) if name else None
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None:
        raise InputError("this Hugging Face model has no tokenizer folder recorded (config._name_or_path): "
                         "load it with wb.load_model(folder) or wrap it in a TransformerBridge yourself")
    try:
        return TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tokenizer, device=hf.device,
                                                   dtype=hf.dtype)
    except Exception as err:  # transformers/TL raise many types for unsupported models
        raise InputError(f"cannot wrap this Hugging Face model in a TransformerBridge ({err}): "
                         "load it with wb.load_model(folder)") from None


_ENCODER_TYPES = {"bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "deberta", "mpnet"}


def _is_causal_folder(folder: Path) -> bool:
    import json

    config = json.loads((folder / "config.json").read_text())
    return config.get("model_type") not in _ENCODER_TYPES


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "sentencepiece.bpe.model")


def _check_tokenizer_files(folder: Path) -> None:
    """A folder without tokenizer files would tokenize through a fallback (every token unknown)."""
    from workbench.errors import CorruptModelError

    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CorruptModelError(f"model folder {folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, "
                                "...): copy the tokenizer of the model into the folder")


def check_tokenizer(bridge, folder: Path) -> None:
    """Refuse a tokenizer that maps plain text to unknown tokens only, or whose ids do not fit
    the model's embedding (``len(tokenizer) > d_vocab``)."""
    from workbench.errors import CorruptModelError

    tok = bridge.tokenizer
    ids = tok("The cat sat on the mat.", add_special_tokens=False)["input_ids"]
    if tok.unk_token_id is not None and ids and all(i == tok.unk_token_id for i in ids):
        raise CorruptModelError(f"the tokenizer in {folder} maps plain text to the unknown token only: "
                                "copy the model's own tokenizer files into the folder")
    d_vocab = getattr(bridge.cfg, "d_vocab", None)
    if d_vocab and len(tok) > d_vocab:
        raise CorruptModelError(f"the tokenizer in {folder} has {len(tok)} tokens but the model embeds only {d_vocab}: "
                                "use the tokenizer that belongs to these weights")


def check_weights(module: torch.nn.Module, folder: Path) -> None:
    """Refuse NaN/inf weights and all-zero weight matrices (an empty or zeroed checkpoint would
    otherwise be scored like a trained model). One pass over the parameters."""
    from workbench.errors import CorruptModelError

    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.is_meta:
                continue
            name = name.replace("._original_component", "")
            norm = float(torch.linalg.vector_norm(param))  # one pass: NaN/inf if any value is, 0 iff all zero
            if not math.isfinite(norm) and not bool(torch.isfinite(param).all()):
                raise CorruptModelError(f"weight {name} in {folder} holds NaN/inf values: the checkpoint is corrupt; "
                                        "re-download or re-convert it")
            if param.dim() >= 2 and norm == 0.0:
                raise CorruptModelError(f"weight {name} in {folder} is all zeros: the checkpoint is empty or "
                                        "was not saved; re-download or re-convert it")


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
