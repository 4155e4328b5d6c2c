"""What one capture recorded (:class:`Capture`), and its safetensors + JSON persistence."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from workbench.atomic import atomic_dir
from workbench.errors import InputError, WorkbenchError
from workbench.pattern_rows import DETECTOR_ROWS

CaptureMode = Literal["patterns", "stats"]
_FORMAT_VERSION = 1


@dataclass
class Capture:
    """What one capture recorded. Index order everywhere: ``[B, L_sel, H_sel, ...]``.

    Attributes:
        model_name: the model it came from.
        mode: ``"patterns"`` (materialised maps) or ``"stats"`` (recompute kernels).
        causal: causal (decoder) or bidirectional attention.
        tokens, mask: ``[B, N]`` ids (right-padded) and bool real-token mask.
        str_tokens: per sample, the readable tokens of its real positions.
        layers, heads: the captured subset (model indices).
        row_stats: docs/metrics.md §1 statistic -> ``[B, L, H, N]`` fp32 (0 on padding), plus the
            detector row masses ``induction_mass``/``duplicate_mass`` (NaN where undefined).
        received, received_normalized: per-key received mass ``[B, L, H, N]``.
        patterns: layer -> ``[B, H, N, N]`` fp32 maps, when kept.
        extras: mode-specific tensors (stats mode: ``q.L``, ``k.L``, ``lse.L`` for tiles).
        meta: per-sample metadata (dataset fields, spans).
        info: free-form run facts (dataset name, timings).
    """

    model_name: str
    mode: CaptureMode
    causal: bool
    tokens: torch.Tensor
    mask: torch.Tensor
    str_tokens: list[list[str]]
    layers: list[int]
    heads: list[int]
    row_stats: dict[str, torch.Tensor]
    received: torch.Tensor
    received_normalized: torch.Tensor
    patterns: dict[int, torch.Tensor] | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @classmethod
    def from_rows(cls, model, batch, mode: CaptureMode, layers: list[int], heads: list[int],
                  row_stats: dict[str, torch.Tensor], received: torch.Tensor, received_normalized: torch.Tensor,
                  **fields) -> "Capture":
        """The capture of ``batch`` from the recorded rows of either mode: detector rows past each
        sample's length become NaN (no target there), and the readable tokens are filled in."""
        for name in DETECTOR_ROWS:
            if name in row_stats:
                row_stats[name].masked_fill_(~batch.mask[:, None, None, :], float("nan"))
        return cls(model_name=model.name, mode=mode, causal=model.causal, tokens=batch.tokens, mask=batch.mask,
                   str_tokens=[model.str_tokens(t[m]) for t, m in zip(batch.tokens, batch.mask)],
                   layers=list(layers), heads=list(heads), row_stats=row_stats, received=received,
                   received_normalized=received_normalized, meta=batch.meta, **fields)

    @property
    def n_samples(self) -> int:
        return self.tokens.shape[0]

    def lengths(self) -> torch.Tensor:
        """``[B]`` real length of each sample."""
        return self.mask.sum(1)

    def index_of(self, layer: int, head: int) -> tuple[int, int]:
        """Positions of a model (layer, head) in this capture's ``L``/``H`` axes."""
        if layer not in self.layers:
            raise InputError(f"layer {layer} was not captured (captured layers: {self.layers})")
        if head not in self.heads:
            raise InputError(f"head {head} was not captured (captured heads: {self.heads})")
        return self.layers.index(layer), self.heads.index(head)

    def _check_sample(self, batch_index: int) -> int:
        if not 0 <= batch_index < self.n_samples:
            raise InputError(f"batch index {batch_index} out of range: the capture has {self.n_samples} samples")
        return int(self.mask[batch_index].sum())

    def pattern(self, layer: int, head: int, batch_index: int = 0) -> torch.Tensor:
        """The exact ``[n, n]`` attention map of one head on one sample (real tokens only)."""
        n = self._check_sample(batch_index)
        _, h = self.index_of(layer, head)
        if self.patterns is not None and layer in self.patterns:
            return self.patterns[layer][batch_index, h, :n, :n]
        if f"lse.{layer}" in self.extras:
            from workbench.recompute import tile_from_capture

            return tile_from_capture(self, layer, head, batch_index, (0, n), (0, n))
        raise WorkbenchError("this capture kept neither patterns nor Q/K: capture again with keep_patterns=True "
                             "(patterns mode) or keep_qk=True (stats mode)")

    def tokens_of(self, batch_index: int = 0) -> list[str]:
        """Readable tokens of one sample."""
        self._check_sample(batch_index)
        return self.str_tokens[batch_index]

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``path/`` (``tensors.safetensors`` + ``capture.json``) atomically."""
        tensors = {"tokens": self.tokens, "mask": self.mask.to(torch.uint8),
                   "received": self.received, "received_normalized": self.received_normalized}
        tensors |= {f"row.{k}": v for k, v in self.row_stats.items()}
        tensors |= {f"pattern.{k}": v for k, v in (self.patterns or {}).items()}
        tensors |= {f"extra.{k}": v for k, v in self.extras.items()}
        header = {
            "format_version": _FORMAT_VERSION, "model_name": self.model_name, "mode": self.mode,
            "causal": self.causal, "str_tokens": self.str_tokens, "layers": self.layers,
            "heads": self.heads, "meta": self.meta, "info": self.info,
            "has_patterns": self.patterns is not None,
        }
        path = Path(path)
        with atomic_dir(path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
            (tmp / "capture.json").write_text(json.dumps(header, default=_jsonable))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Capture":
        """Read a capture written by :meth:`save` (safetensors + JSON; nothing is unpickled)."""
        path = Path(path)
        try:
            header = json.loads((path / "capture.json").read_text())
            tensors = load_file(str(path / "tensors.safetensors"))
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read capture folder {path} ({err}): give a folder written by Capture.save") from None
        if header.get("format_version") != _FORMAT_VERSION:
            raise InputError(f"capture {path} has format {header.get('format_version')}, expected {_FORMAT_VERSION}")
        prefixed = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
        patterns = {int(k): v for k, v in prefixed("pattern.").items()} if header["has_patterns"] else None
        return cls(
            model_name=header["model_name"], mode=header["mode"], causal=header["causal"],
            tokens=tensors["tokens"], mask=tensors["mask"].bool(), str_tokens=header["str_tokens"],
            layers=header["layers"], heads=header["heads"], row_stats=prefixed("row."),
            received=tensors["received"], received_normalized=tensors["received_normalized"],
            patterns=patterns, extras=prefixed("extra."), meta=header["meta"], info=header["info"],
        )


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
