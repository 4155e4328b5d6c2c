"""Attention kernels (layer L0): imports only torch, triton and the standard library.

Backends: ``reference`` (plain torch, materialises the map), ``chunked`` (torch, block-wise online
softmax), ``row_pass`` (CPU default: whole rows of a query block, one compiled softmax-and-statistics
loop between the two matmuls), ``sdpa_recompute`` (CPU: PyTorch's fused SDPA kernel for out + LSE,
then one exact pass for every statistic and the received mass) and ``triton`` (GPU kernels,
imported lazily). Every public function
validates its inputs and raises ``TypeError``/``ValueError`` with a message naming the fix.
"""

from .block_sparse import block_scores, select_blocks
from .dispatch import (
    attention_thumbnail,
    attention_tile,
    attention_with_stats,
    block_sparse_attention,
    received_mass,
)
from .recompute import thumbnail_edges
from .types import STAT_NAMES, AttentionStats

__all__ = [
    "STAT_NAMES",
    "AttentionStats",
    "attention_thumbnail",
    "attention_tile",
    "attention_with_stats",
    "block_scores",
    "block_sparse_attention",
    "received_mass",
    "select_blocks",
    "thumbnail_edges",
]
