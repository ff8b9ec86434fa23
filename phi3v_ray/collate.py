"""Batch collation: pad token rows, stack every sample's images along one axis; and the training
worker's side of Ray Data, which turns a shard's numpy batches into these padded torch batches.

The attention mask comes from sequence lengths, never from the pad id: the pad id (32000) is also
`<|endoftext|>`, which sits inside every supervised answer (the recipe's collators hid it).
Right padding for training, left padding for generation.

    training worker: iter_train_batches(shard, ...) ──▶ Phi3VCollate ──▶ collate (right padding)

Nothing here imports Ray: `iter_train_batches` only calls the shard's own `iter_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Sequence

import numpy as np
import torch

from .constants import ENDOFTEXT_ID, IGNORE_INDEX


def collate(
    rows: Sequence[dict],
    padding_side: str = "right",
    pad_id: int = ENDOFTEXT_ID,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """Rows with input_ids, labels (optional), pixel_values, image_sizes → one padded batch.

    pixel_values of all rows are concatenated in row order, which is the order the model reads
    placeholder blocks in; rows may hold different numbers of images and crops.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not rows:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(r["input_ids"]) for r in rows]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((n, width), dtype=np.int64)
    for i, (row, length) in enumerate(zip(rows, lengths)):
        span = slice(0, length) if padding_side == "right" else slice(width - length, width)
        input_ids[i, span] = np.asarray(row["input_ids"])
        attention_mask[i, span] = 1
        if row.get("labels") is not None:
            labels[i, span] = np.asarray(row["labels"])

    images = [np.asarray(r["pixel_values"], dtype=np.float32) for r in rows if _num_images(r)]
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
        "pixel_values": None,
        "image_sizes": None,
    }
    if images:
        crops = max(p.shape[1] for p in images)
        padded = [np.pad(p, ((0, 0), (0, crops - p.shape[1]), (0, 0), (0, 0), (0, 0))) for p in images]
        batch["pixel_values"] = torch.from_numpy(np.concatenate(padded, axis=0))
        sizes = [np.asarray(r["image_sizes"], dtype=np.int64).reshape(-1, 2) for r in rows if _num_images(r)]
        batch["image_sizes"] = torch.from_numpy(np.concatenate(sizes, axis=0))
    return batch


def _num_images(row: dict) -> int:
    sizes = row.get("image_sizes")
    return 0 if sizes is None else int(np.asarray(sizes).reshape(-1, 2).shape[0])


def batch_stats(batch: dict) -> tuple[int, int]:
    """(real tokens, images) in a collated batch, for throughput logging."""
    tokens = int(batch["attention_mask"].sum())
    images = 0 if batch["image_sizes"] is None else int(batch["image_sizes"].shape[0])
    return tokens, images


# ---------------------------------------------------------------------------------------------
# the training worker: Ray Data batches → collated torch batches


def batch_rows(batch: dict[str, np.ndarray]) -> list[dict]:
    """A numpy batch (columns) → its rows. Ragged columns arrive as object arrays of arrays."""
    n = len(batch["input_ids"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


class Phi3VCollate:
    """A numpy batch of pipeline rows (columns) → one padded torch batch via `collate`.

    A batch without images has pixel_values and image_sizes None, as collate returns them; with
    return_ids the batch also carries "ids" (list of str), for logging and tests.
    """

    def __init__(self, padding_side: str = "right", pad_to_multiple_of: int | None = None, return_ids: bool = False):
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_ids = return_ids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        rows = batch_rows(batch)
        out = collate(rows, padding_side=self.padding_side, pad_to_multiple_of=self.pad_to_multiple_of)
        if self.return_ids:
            out["ids"] = [str(r["id"]) for r in rows]
        return out


def iter_train_batches(
    data,
    micro_batch: int,
    epoch: int,
    seed: int,
    shuffle_buffer: int | None = 64,
    skip_batches: int = 0,
    *,
    drop_last: bool = False,
    prefetch_batches: int = 1,
    collate_fn: Phi3VCollate | None = None,
) -> Iterator[dict]:
    """Collated CPU torch batches of one epoch from a Dataset or a worker's shard (DataIterator).

    The order depends only on (data, seed + epoch, shuffle_buffer, micro_batch): the pipeline
    preserves order and the local shuffle buffer is seeded. skip_batches drops the first k
    batches without collating them, so a run resumed mid-epoch continues where it stopped.
    shuffle_buffer None or 0 keeps file order.
    """
    collate_fn = collate_fn or Phi3VCollate()
    batches = data.iter_batches(
        batch_size=micro_batch,
        batch_format="numpy",
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=(seed + epoch) if shuffle_buffer else None,
    )
    for i, batch in enumerate(batches):
        if i < skip_batches:
            continue
        yield collate_fn(batch)
