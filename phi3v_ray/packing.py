"""Padding-free micro-batches: a micro-batch's samples laid end to end in one row (or a few).

    samples a (5 tokens), b (3), c (4), one row:
        input_ids     a a a a a b b b c c c c
        position_ids  0 1 2 3 4 0 1 2 0 1 2 3          restart per sample (RoPE sees each sample alone)
        labels        − a a a a − b b − c c c          each sample's first label is −100
        cu_seqlens    [0, 5, 8, 12]                    sample boundaries in the flattened batch (int32)

Labels never cross samples: position t is trained to predict label t+1, so the last token of a
would predict b's first token; that label is −100 (unpacked it is never predicted either: the
shift drops every row's first label). So the supervised tokens, and with them the step's loss
normalisation (`engine.supervised_tokens`), are those of the unpacked micro-batch, and a packed
micro-batch's token-loss sum equals the padded one's.

Attention never crosses samples either (`model/packed.py`): flash-attn's varlen kernel reads
cu_seqlens; a training run under sdpa runs SDPA's causal kernel once per sample (`segment_sdpa`);
plain SDPA and eager get a block-diagonal causal mask. Images: sample j's placeholders −k become
−(k + images of the samples before it in the row), so the row numbers its images 1..n in the order
their pixels are concatenated, which is the order the model fills them in.

A micro-batch keeps its samples (the same `micro_batch` samples as unpacked, never more): the step's
sample count, every rank's number of micro-batches and the resume position (micro-batches trained
in the epoch) stay what they are. `max_tokens` caps a row (the dense-mask fallback's cost grows with a
row's square); samples are spread over few, balanced rows (`assign_rows`), right-padded to the
longest row (padding is its own segment in cu_seqlens, so no token attends across it). 0 = no cap:
one row, no padding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .collate import collate_images
from .constants import ENDOFTEXT_ID, IGNORE_INDEX


def use_packing(packing: str, attention: str) -> bool:
    """The `packing` setting on a worker whose LM attention is `attention`.

    auto packs where attention runs per example without a mask: flash-attn's varlen kernel, and sdpa
    (a training run switches it to `model.packed.segment_sdpa`); eager would need the dense mask."""
    if packing == "auto":
        return attention in ("flash_attention_2", "sdpa")
    return packing == "always"


def assign_rows(lengths: Sequence[int], max_tokens: int = 0) -> list[list[int]]:
    """Sample indices per row, each row's samples in their original order.

    0 = one row. Otherwise as few rows as this greedy finds, balanced so that little padding is left:
    for k = ⌈Σ lengths / max_tokens⌉, k + 1, …, each sample, longest first, goes to the least-filled of
    k rows that still has room for it; the first k where every sample finds a row wins. (Fewest rows
    alone is not enough: four 2550-token pages under 8192 would fill one row with three and pad the
    second, holding one, to 7650 tokens.)
    """
    if not max_tokens:
        return [list(range(len(lengths)))]
    too_long = [n for n in lengths if n > max_tokens]
    if too_long:
        raise ValueError(f"a sample of {max(too_long)} tokens does not fit a packed row of {max_tokens} "
                         f"(pack_tokens must be at least max_length)")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    for count in range(max(1, -(-sum(lengths) // max_tokens)), len(lengths) + 1):
        rows: list[list[int]] = [[] for _ in range(count)]
        filled = [0] * count
        for i in order:
            fits = [r for r in range(count) if filled[r] + lengths[i] <= max_tokens]
            if not fits:
                break
            r = min(fits, key=lambda r: filled[r])  # ties: the first such row
            rows[r].append(i)
            filled[r] += lengths[i]
        else:
            return [sorted(r) for r in rows if r]
    raise AssertionError("unreachable: one sample per row always fits")


def pack(rows: Sequence[dict], max_tokens: int = 0, pad_id: int = ENDOFTEXT_ID, pin_memory: bool = False) -> dict:
    """Rows with input_ids, labels (optional), pixels, image_sizes → one packed batch.

    Keys: input_ids, labels, position_ids (R, W) int64; attention_mask (R, W), 1 on real tokens (what
    throughput logging and the padded-token count read; the model's attention follows cu_seqlens);
    cu_seqlens (int32, segments + 1) over the flattened R·W tokens and max_seqlen (int, the longest
    segment); pixels and image_sizes as `collate` makes them, in packed order.
    """
    if not rows:
        raise ValueError("cannot pack an empty batch")
    lengths = [len(r["input_ids"]) for r in rows]
    layout = assign_rows(lengths, max_tokens)
    width = max(sum(lengths[i] for i in row) for row in layout)
    n = len(layout)
    empty = (lambda: torch.empty((n, width), dtype=torch.int64, pin_memory=pin_memory))
    batch = {"input_ids": empty().fill_(pad_id), "labels": empty().fill_(IGNORE_INDEX),
             "position_ids": empty(), "attention_mask": empty().zero_()}
    ids, labels, positions, mask = (batch[k].numpy() for k in ("input_ids", "labels", "position_ids", "attention_mask"))
    bounds = [0]
    for r, members in enumerate(layout):
        at, images = 0, 0
        for i in members:
            row, length = rows[i], lengths[i]
            span = slice(at, at + length)
            sample = np.asarray(row["input_ids"], dtype=np.int64)
            ids[r, span] = np.where(sample < 0, sample - images, sample)  # −k → −(k + images before it)
            images += int(-sample.min()) if length and sample.min() < 0 else 0
            if row.get("labels") is not None:
                labels[r, span] = row["labels"]
                labels[r, at] = IGNORE_INDEX  # never predicted from the previous sample's last token
            positions[r, span] = np.arange(length)
            mask[r, span] = 1
            at += length
            bounds.append(r * width + at)
        if at < width:  # the row's padding: a segment of its own
            positions[r, at:] = np.arange(width - at)
            bounds.append((r + 1) * width)
    cu = torch.tensor(bounds, dtype=torch.int32)
    batch["cu_seqlens"] = cu.pin_memory() if pin_memory else cu
    batch["max_seqlen"] = int(np.diff(bounds).max())
    batch.update(collate_images([rows[i] for row in layout for i in row], pin_memory))
    return batch
