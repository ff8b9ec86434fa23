"""Batch collation: pad token rows, stack every sample's images along one axis; and the training
worker's side of Ray Data, which turns a shard's numpy batches into these padded (or packed,
`packing.py`) torch batches, optionally grouped by length first (`grouping.py`).

The attention mask comes from sequence lengths, never from the pad id: the pad id (32000) is also
`<|endoftext|>`, which sits inside every supervised answer (the recipe's collators hid it).
Right padding for training, left padding for generation.

    training worker: iter_train_batches(shard, ...) ──▶ shuffle_rows ──▶ [group_by_length] ──▶ Phi3VCollate
        ──▶ collate (right padding, pinned on CUDA) or pack (padding-free rows)
        ──▶ to_device (engine): non-blocking copies; uint8 crops → float pixel_values on the device;
            a right-padded training batch goes without its attention mask (causal attention suffices)

Nothing here imports Ray: `iter_train_batches` only calls the shard's own `iter_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Sequence

import numpy as np
import torch

from .constants import ENDOFTEXT_ID, IGNORE_INDEX
from .grouping import group_by_length, shuffle_rows
from .processor import pixel_values_from_crops


def collate(
    rows: Sequence[dict],
    padding_side: str = "right",
    pad_id: int = ENDOFTEXT_ID,
    pad_to_multiple_of: int | None = None,
    pin_memory: bool = False,
) -> dict[str, torch.Tensor | None]:
    """Rows with input_ids, labels (optional), pixels, image_sizes → one padded batch.

    Images of all rows are concatenated in row order, which is the order the model reads
    placeholder blocks in; rows may hold different numbers of images and crops. Rows carry their
    pixels in one of the two layouts of `phi3v_ray.processor`, all rows the same:

        pixel_values  float32 (n_img, slots, 3, 336, 336) → batch pixel_values, zero-padded to the most slots
        pixel_crops   uint8   (Σ h·w, 3, 336, 336)        → batch pixel_crops, concatenated; `to_device`
                                                            makes the float pixel_values on the device

    Every array is copied once, straight into the batch's buffer; with pin_memory the buffers are
    page-locked, so the host-to-device copies in `to_device` run asynchronously.
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
    batch = {
        "input_ids": _empty((n, width), torch.int64, pin_memory).fill_(pad_id),
        "attention_mask": _empty((n, width), torch.int64, pin_memory).zero_(),
        "labels": _empty((n, width), torch.int64, pin_memory).fill_(IGNORE_INDEX),
    }
    input_ids, attention_mask, labels = (batch[k].numpy() for k in ("input_ids", "attention_mask", "labels"))
    for i, (row, length) in enumerate(zip(rows, lengths)):
        span = slice(0, length) if padding_side == "right" else slice(width - length, width)
        input_ids[i, span] = row["input_ids"]
        attention_mask[i, span] = 1
        if row.get("labels") is not None:
            labels[i, span] = row["labels"]

    batch.update(collate_images(rows, pin_memory))
    return batch


def collate_images(rows: Sequence[dict], pin_memory: bool = False) -> dict:
    """The pixels and image_sizes of `rows`, concatenated in row order (see `collate`): pixel_values and
    image_sizes None when no row has an image; pixel_crops instead of pixel_values for uint8 rows."""
    out = {"pixel_values": None, "image_sizes": None}
    with_images = [r for r in rows if _num_images(r)]
    if not with_images:
        return out
    sizes = [np.asarray(r["image_sizes"], dtype=np.int64).reshape(-1, 2) for r in with_images]
    out["image_sizes"] = torch.from_numpy(np.concatenate(sizes, axis=0))
    if pin_memory:
        out["image_sizes"] = out["image_sizes"].pin_memory()
    uint8 = [r.get("pixel_crops") is not None for r in with_images]
    if all(uint8):
        crops = [r["pixel_crops"] for r in with_images]
        buf = _empty((sum(c.shape[0] for c in crops), *crops[0].shape[1:]), torch.uint8, pin_memory)
        np.concatenate(crops, axis=0, out=buf.numpy())
        out["pixel_crops"] = buf
    elif not any(uint8):
        images = [r["pixel_values"] for r in with_images]
        slots = max(p.shape[1] for p in images)
        buf = _empty((sum(p.shape[0] for p in images), slots, *images[0].shape[2:]), torch.float32, pin_memory)
        view, k = buf.numpy(), 0
        for p in images:
            view[k : k + p.shape[0], : p.shape[1]] = p
            view[k : k + p.shape[0], p.shape[1] :] = 0
            k += p.shape[0]
        out["pixel_values"] = buf
    else:
        raise ValueError("rows mix pixel layouts: some carry pixel_crops (uint8), others pixel_values (float); "
                         "build every row of a dataset with the same DataConfig.pixel_format")
    return out


def _empty(shape: tuple, dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)


def to_device(batch: dict, device: torch.device, training: bool = False) -> dict:
    """A collated host batch → the model's inputs on `device`.

    Tensors are copied non-blocking (asynchronous when `collate` pinned them); uint8 pixel_crops
    become the model's float pixel_values there (`pixel_values_from_crops`, reading the host copy of
    image_sizes, so nothing waits for the device).

    training=True (the engine's step): a batch padded on the right only, or not at all, goes without
    its attention mask (attention_mask None). Under causal attention a real token attends only to
    earlier positions, which right padding never is, so its output is the same with or without the
    mask; the padding's own outputs carry no label. Without a mask the attention runs its causal path
    (SDPA `is_causal=True`, flash-attn's dense kernel) instead of a dense (B, 1, T, T) mask, which rules
    out SDPA's flash kernel. Decided here, on the host copy: no device sync. Left-padded batches
    (generation) keep their mask.
    """
    drop = training and batch.get("attention_mask") is not None and right_padded(batch["attention_mask"])
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    if drop:
        out["attention_mask"] = None
    crops = out.pop("pixel_crops", None)
    if crops is not None:
        out["pixel_values"] = pixel_values_from_crops(crops, batch["image_sizes"])
    return out


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (padding on the right only, or none)."""
    mask = attention_mask.bool()
    return bool(mask[:, :1].all()) and bool((mask[:, 1:] <= mask[:, :-1]).all())


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
    """A numpy batch of pipeline rows (columns), or a list of rows (`collate_rows`), → one torch batch.

    Padded by `collate`, or packed by `phi3v_ray.packing.pack` with packing=True (rows of at most
    pack_tokens tokens; 0 = the whole micro-batch in one row). A batch without images has
    pixel_values and image_sizes None, as collate returns them; with return_ids the batch also carries
    "ids" (list of str), for logging and tests. pin_memory None pins the batch when this process sees
    a CUDA device.
    """

    def __init__(self, padding_side: str = "right", pad_to_multiple_of: int | None = None, return_ids: bool = False,
                 pin_memory: bool | None = None, packing: bool = False, pack_tokens: int = 0):
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_ids = return_ids
        self.pin_memory = pin_memory
        self.packing = packing
        self.pack_tokens = pack_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        return self.collate_rows(batch_rows(batch))

    def collate_rows(self, rows: list[dict]) -> dict:
        """Rows (dicts of arrays) → one batch; what `iter_train_batches` calls on length-grouped rows."""
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        if self.packing:
            from .packing import pack

            out = pack(rows, max_tokens=self.pack_tokens, pin_memory=pin)
        else:
            out = collate(rows, padding_side=self.padding_side, pad_to_multiple_of=self.pad_to_multiple_of,
                          pin_memory=pin)
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
    length_window: int = 0,
    collate_ahead: int = 0,
    rank: int = 0,
) -> Iterator[dict]:
    """Collated CPU torch batches of one epoch from a Dataset or a worker's shard (DataIterator).

    The order depends only on (data, seed, epoch, rank, shuffle_buffer, micro_batch, length_window): the
    pipeline preserves order and the shuffle (`phi3v_ray.grouping.shuffle_rows`, a buffer of
    shuffle_buffer rows) is seeded. skip_batches drops the first k
    batches without collating them, so a run resumed mid-epoch continues where it stopped.
    shuffle_buffer None or 0 keeps file order. length_window > 0 (with micro_batch > 1) groups rows of
    similar length into the same micro-batch within windows of that many rows
    (`phi3v_ray.grouping`); the epoch keeps its number of batches.

    collate_ahead > 0 fetches and collates in a background thread, up to that many batches ahead
    of the consumer (the training loop), as a DataLoader worker would: the step's torch kernels
    release the GIL, so taking blocks from the object store, shuffling and collating overlap the
    step instead of adding to it. Same batches, same order; an error in the feed is raised to the
    consumer at the batch where it happened.
    """
    batches = _collated_batches(data, micro_batch, epoch, seed, shuffle_buffer, skip_batches, drop_last,
                                prefetch_batches, collate_fn or Phi3VCollate(), length_window, rank)
    if collate_ahead > 0:
        batches = ahead(batches, collate_ahead, name="phi3v-collate")
    yield from batches


def _collated_batches(data, micro_batch, epoch, seed, shuffle_buffer, skip_batches, drop_last, prefetch_batches,
                      collate_fn, length_window, rank) -> Iterator[dict]:
    group = length_window and micro_batch > 1
    if not shuffle_buffer and not group:  # file order: Ray Data's batches as they come
        batches = data.iter_batches(batch_size=micro_batch, batch_format="numpy", drop_last=drop_last,
                                    prefetch_batches=prefetch_batches)
        for i, batch in enumerate(batches):
            if i >= skip_batches:
                yield collate_fn(batch)
        return
    batches = data.iter_batches(batch_size=micro_batch, batch_format="numpy", prefetch_batches=prefetch_batches)
    rows = (_owned(row) for batch in batches for row in batch_rows(batch))
    if shuffle_buffer:
        rows = shuffle_rows(rows, shuffle_buffer, seed, epoch, rank)
    groups = group_by_length(rows, micro_batch, length_window, seed, epoch) if group else _chunks(rows, micro_batch)
    for i, rows_of_batch in enumerate(groups):
        if i >= skip_batches and not (drop_last and len(rows_of_batch) < micro_batch):
            yield collate_fn.collate_rows(rows_of_batch)


def _owned(row: dict) -> dict:
    """A row whose arrays are its own: a view into the fetched batch or block would keep all of it alive
    while the row waits in a buffer."""
    return {k: v.copy() if isinstance(v, np.ndarray) and v.base is not None else v for k, v in row.items()}


def _chunks(rows: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_END = object()


class FirstFetched:
    """`items`, whose first item a daemon thread starts fetching when this is made, not when it is iterated.

    A fresh run's first epoch is made before the model loads, so Ray Data starts its coordinator and
    decoding actors and decodes the first rows while the worker imports its libraries and loads the
    weights. Iterating joins that thread, then yields the first item (or raises its error) and the rest
    of `items` from the caller's thread: the generator never runs in two threads at once.
    """

    def __init__(self, items: Iterator, name: str = "first-fetched"):
        import threading

        self._items = items
        self._first: list = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name=name, daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first.append(next(self._items))
        except StopIteration:
            pass
        except BaseException as err:  # raised to the consumer when it iterates
            self._error = err

    def __iter__(self) -> Iterator:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._items

    def close(self) -> None:
        """Release `items` if the first fetch is over (a run that failed before training); else the daemon
        thread ends with the worker's process."""
        if not self._thread.is_alive() and hasattr(self._items, "close"):
            self._items.close()


def ahead(items: Iterator, depth: int, name: str = "ahead") -> Iterator:
    """`items`, produced by a daemon thread up to `depth` items before they are asked for.

    The consumer gets the same items in the same order, and the producer's exception at the item
    where it was raised. Closing the generator early (a run that ends mid-epoch) tells the thread
    to stop at its next hand-over; it never blocks the consumer's exit.
    """
    import queue
    import threading

    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    break
            else:
                put((_END, None))
        except BaseException as err:  # handed to the consumer, raised there
            put((None, err))
        finally:
            if hasattr(items, "close"):
                items.close()  # a stopped epoch releases its Ray Data iterator here, in the thread that ran it

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, err = handoff.get()
            if err is not None:
                raise err
            if item is _END:
                return
            yield item
    finally:
        stop.set()

