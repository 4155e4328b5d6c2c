"""Input validation (clear TypeError/ValueError messages) and the package's import contract."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from kernels import (
    attention_thumbnail,
    attention_tile,
    attention_with_stats,
    block_scores,
    block_sparse_attention,
    received_mass,
    select_blocks,
)
from kernels.validation import resolve_backend

BACKENDS = ["reference", "chunked", "sdpa_recompute", "triton"]


def _qkv(Hq=4, Hkv=2, N=20, D=32, dtype=torch.float32):
    return torch.randn(1, Hq, N, D, dtype=dtype), torch.randn(1, Hkv, N, D, dtype=dtype), torch.randn(1, Hkv, N, D, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_ndim(backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="must have 4 dims"):
        attention_with_stats(q[0], k, v, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_not_multiple(backend):
    q, k, v = _qkv(Hq=3, Hkv=2)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention_with_stats(q, k, v, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_head_dim(backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="head_dim differs"):
        attention_with_stats(q[..., :16], k, v, backend=backend)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_bad_dtype(backend):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="supported dtypes"):
        attention_with_stats(q.double(), k.double(), v.double(), backend=backend)
    with pytest.raises(TypeError, match="same dtype"):
        attention_with_stats(q, k.half(), v, backend=backend)
    with pytest.raises(TypeError, match="torch.Tensor"):
        attention_with_stats(q.numpy(), k, v, backend=backend)


def test_other_argument_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="shape of k"):
        attention_with_stats(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="more rows"):
        attention_with_stats(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(TypeError, match="must be bool"):
        attention_with_stats(q, k, v, key_padding_mask=torch.ones(1, 20))
    with pytest.raises(ValueError, match=r"\[B, Nk\]"):
        attention_with_stats(q, k, v, key_padding_mask=torch.ones(1, 19, dtype=torch.bool))
    with pytest.raises(ValueError, match="positive finite"):
        attention_with_stats(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="unknown"):
        attention_with_stats(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="local_window"):
        attention_with_stats(q, k, v, local_window=-1)
    with pytest.raises(ValueError, match="power of two"):
        attention_with_stats(q, k, v, backend="triton", block_q=48)


def test_tile_and_thumbnail_ranges():
    q, k, v = _qkv()
    lse = attention_with_stats(q, k, v).lse
    with pytest.raises(ValueError, match=r"q_range=\(0, 21\) is out of range"):
        attention_tile(q, k, lse, head=0, q_range=(0, 21), k_range=(0, 4))
    with pytest.raises(ValueError, match="k_range"):
        attention_tile(q, k, lse, head=0, q_range=(0, 4), k_range=(5, 5))
    with pytest.raises(ValueError, match="head=4 is out of range"):
        attention_tile(q, k, lse, head=4, q_range=(0, 4), k_range=(0, 4))
    with pytest.raises(ValueError, match="batch_index"):
        attention_thumbnail(q, k, lse, head=0, batch_index=1)
    with pytest.raises(ValueError, match=r"lse must have shape"):
        received_mass(q, k, lse[:, :2])
    with pytest.raises(ValueError, match="size"):
        attention_thumbnail(q, k, lse, head=0, size=0)


def test_block_sparse_argument_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="keep must have shape"):
        block_sparse_attention(q, k, v, torch.ones(1, 4, 2, 2, dtype=torch.bool), block_size=8)
    with pytest.raises(TypeError, match="bool"):
        block_sparse_attention(q, k, v, torch.ones(1, 4, 2, 2), block_size=16)
    with pytest.raises(ValueError, match="key-block indices"):
        block_sparse_attention(q, k, v, [[[0, 7]] * 4] * 2, block_size=16)
    with pytest.raises(ValueError, match="too large"):
        block_sparse_attention(q, k, v, torch.ones(1, 4, 1, 1, dtype=torch.bool), block_size=256, backend="triton")
    scores = block_scores(q, k, block_size=8)
    with pytest.raises(ValueError, match="fractional"):
        select_blocks(scores, torch.tensor([1.5, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \[Hq\]"):
        select_blocks(scores, torch.tensor([1, 1]))


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"


def test_kernels_imports_only_torch_triton_stdlib():
    import sys

    allowed = {"torch", "triton", "__future__"} | set(sys.stdlib_module_names)
    root = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
        assert len(path.read_text().splitlines()) <= 500, f"{path.name} is over 500 lines"
