"""Attention for packed rows (`phi3v_ray.packing`): no token attends across a sample boundary.

A packed batch carries cu_seqlens, the segment boundaries over its flattened (rows × width) tokens
(samples, and each row's padding as a segment of its own), and max_seqlen, the longest segment. The
attention implementation decides how they are used:

    flash-attn (flash_attention_2, …)  cu_seq_lens_q/k + max_length_q/k: transformers calls
                                       flash_attn_varlen_func; no mask, no padding computed
    sdpa                               a block-diagonal causal bool mask (rows, 1, width, width)
    eager                              the same mask as an additive float mask

The dense mask rules out SDPA's flash kernel and costs (rows · width²) elements: it is the fallback
that lets packing run (and be tested) without flash-attn, not the fast path. Rows that hold a single
sample each need no mask at all (plain causal attention).
"""

from __future__ import annotations

import torch

DENSE = ("sdpa", "eager")  # implementations that read a (rows, 1, width, width) mask


def packed_attention(implementation: str | None, cu_seqlens: torch.Tensor, max_seqlen: int | None,
                     shape: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor | None, dict]:
    """(the attention mask for the LM, extra attention kwargs) of a packed batch of `shape` (rows, width)."""
    rows, width = shape
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < rows + 1:
        raise ValueError(f"cu_seqlens must list the segment boundaries of {rows} rows, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() - 1 == rows:  # one segment per row: plain causal attention
        return None, {}
    implementation = implementation or "eager"
    if implementation == "flex_attention":
        raise ValueError("packed batches need flash-attn (varlen), sdpa or eager attention, not flex_attention")
    if implementation not in DENSE:  # flash-attn and kernels that follow its varlen interface
        if max_seqlen is None:
            raise ValueError("a packed batch for varlen attention needs max_seqlen")
        cu = cu_seqlens.to(torch.int32)
        return None, {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": int(max_seqlen),
                      "max_length_k": int(max_seqlen)}
    allowed = block_causal_mask(cu_seqlens, rows, width)
    if implementation == "sdpa":
        return allowed, {}
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min), {}


def segment_ids(cu_seqlens: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """(rows, width) int64: the segment each token belongs to."""
    lengths = cu_seqlens.long().diff()
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    if ids.numel() != rows * width:
        raise ValueError(f"cu_seqlens cover {ids.numel()} tokens, the batch holds {rows} × {width}")
    return ids.view(rows, width)


def block_causal_mask(cu_seqlens: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """(rows, 1, width, width) bool, True where query i may attend key j: same segment and j ≤ i."""
    seg = segment_ids(cu_seqlens, rows, width)
    causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril_()
    return (seg[:, :, None] == seg[:, None, :]).logical_and_(causal)[:, None]
