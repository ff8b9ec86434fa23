"""Attention for packed rows (`phi3v_ray.packing`): no token attends across a sample boundary.

A packed batch carries cu_seqlens, the segment boundaries over its flattened (rows × width) tokens
(samples, and each row's padding as a segment of its own), and max_seqlen, the longest segment. The
attention implementation decides how they are used:

    flash-attn (flash_attention_2, …)  cu_seq_lens_q/k + max_length_q/k: transformers calls
                                       flash_attn_varlen_func; no mask, no padding computed
    phi3v_segment_sdpa (SEGMENT_SDPA)  segment_bounds (cu_seqlens as ints); `segment_sdpa` runs SDPA's causal kernel
                                       once per segment: Σ lengthᵢ² work, no mask, no padding computed
    sdpa                               a block-diagonal causal bool mask (rows, 1, width, width)
    eager                              the same mask as an additive float mask

The dense mask rules out SDPA's flash kernel and costs (rows · width²) elements: it is what packing
falls back to when the LM still says plain "sdpa" (a model loaded outside `train.load_model`).
A packed training run without flash-attn switches the language model to SEGMENT_SDPA
(`use_segment_sdpa`), which is transformers' own sdpa for every unpacked call (generation, evaluation)
and the per-segment loop for packed ones. Rows that hold a single sample each need no mask at all
(plain causal attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DENSE = ("sdpa", "eager")  # implementations that read a (rows, 1, width, width) mask
SEGMENT_SDPA = "phi3v_segment_sdpa"


def segment_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, segment_bounds=None, **kwargs):
    """transformers' attention interface: SDPA per packed segment, or transformers' sdpa when unpacked.

    query (rows, heads, width, dim), key/value (rows, kv_heads, width, dim); segment_bounds holds the
    segment boundaries over the flattened rows × width tokens as Python ints (cu_seqlens, read once per
    forward by `packed_attention` rather than once per layer, which on a GPU would wait for the device).
    Each segment gets SDPA's causal kernel on its own tokens, so a micro-batch costs Σ lengthᵢ² instead
    of width² and no mask is built. Returns (rows, width, heads, dim) as transformers' implementations do.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segment_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rows, heads, width, dim = query.shape
    groups = heads // key.shape[1]
    q, k, v = (x.transpose(1, 2).reshape(rows * width, x.shape[1], dim) for x in (query, key, value))
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = segment_bounds
    out = torch.cat([  # (1, heads, length, dim) per segment: the 4-D layout SDPA's fused kernels take
        F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)),
                                       dropout_p=dropout, is_causal=True, scale=scaling)[0].transpose(0, 1)
        for a, b in zip(bounds, bounds[1:]) if b > a
    ])
    return out.view(rows, width, heads, dim), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa)
    # Unpacked calls keep transformers' sdpa masks (left-padded generation needs them).
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_SDPA, sdpa_mask)


_register()


def use_segment_sdpa(model) -> bool:
    """Switch an sdpa language model to SEGMENT_SDPA (the vision tower keeps its own setting); True if switched."""
    if model.config._attn_implementation != "sdpa":
        return False
    model.config._attn_implementation = SEGMENT_SDPA
    return True


def packed_attention(implementation: str | None, cu_seqlens: torch.Tensor, max_seqlen: int | None,
                     shape: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor | None, dict]:
    """(the attention mask for the LM, extra attention kwargs) of a packed batch of `shape` (rows, width)."""
    rows, width = shape
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < rows + 1:
        raise ValueError(f"cu_seqlens must list the segment boundaries of {rows} rows, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() - 1 == rows:  # one segment per row: plain causal attention
        return None, {}
    implementation = implementation or "eager"
    if implementation == SEGMENT_SDPA:
        # An all-ones mask: transformers then neither builds a dense mask nor infers packing from the
        # restarting positions; the boundaries travel to every layer's attention call as a kwarg.
        ones = torch.ones(shape, dtype=torch.bool, device=cu_seqlens.device)
        return ones, {"segment_bounds": tuple(cu_seqlens.tolist())}
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
