"""Row order of a training epoch: a seeded buffer shuffle, and length-grouped micro-batches.

`shuffle_rows` mixes a worker's shard in a buffer of rows it owns (one copy each, nothing else held),
seeded by (seed, epoch, rank). Ray Data's own local shuffle buffer (`iter_batches(local_shuffle_buffer_size=)`)
gives a seeded order too, but holds its buffer as concatenated blocks and compacts them into new ones:
iterating the demo's cached rows with a 64-row buffer, the feed's resident memory rose by 1.0 GB with
Ray's buffer and by 0.41 GB with this one (`bench/feed_memory.py`).

Length grouping: rows of similar length share a micro-batch, so padding stays small.

A right-padded micro-batch is as wide as its longest row. DocVQA pages differ (a letter page is 2509
image tokens, an A4 page 1933), so random micro-batches of 4 carry 5–10 % padding tokens, all of them
computed and thrown away. Sorted by length within a window of the shuffled stream they carry almost
none (`bench/pipeline.py --padding`).

    rows of one epoch (already shuffled by shuffle_rows)
      ──▶ windows of `window` rows (a multiple of micro_batch)
      ──▶ each window sorted by length (stable: equal lengths keep stream order), cut into micro-batches
      ──▶ the window's full micro-batches in an order drawn from (seed, epoch, window index)

The last step undoes the sort's order: without it every window would run short batches first and long
ones last, a sawtooth in step time and memory that the loss curve would show.

What the training loop relies on:
- deterministic: the micro-batches depend only on the row stream and (micro_batch, window, seed, epoch);
- the same number of micro-batches per epoch as without grouping, ⌈rows / micro_batch⌉: windows hold
  whole micro-batches, and the one short micro-batch an epoch may end with comes last, as before; so the
  driver's step plan holds and every rank steps the same number of times;
- resumable: a resumed run reads the epoch's rows again and skips the first k grouped micro-batches
  (`iter_train_batches(skip_batches=k)`), which are the k the interrupted run trained on.

Cost: the window's rows wait in host memory (a 16-crop DocVQA row is ~5.5 MB of uint8 crops: 64 rows
≈ 350 MB), beside the shuffle buffer's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

_SHUFFLE_STREAM = 0x5348  # keeps the shuffle's random stream apart from the window orders' below


def shuffle_rows(rows: Iterable[dict], buffer: int, seed: int, epoch: int, rank: int = 0) -> Iterator[dict]:
    """The rows in a seeded buffer-shuffled order: each row enters a buffer of `buffer` rows and a
    uniformly drawn one leaves in its place; the last `buffer` rows leave in a drawn order.

    Deterministic in (rows, buffer, seed, epoch, rank), so a resumed run reads the same order again.
    Each rank draws its own positions: with one draw for all, ranks whose shards repeat a pattern by
    position (the demo's four tasks, in turn) would hold the same kind of record at every step.
    """
    if buffer < 1:
        raise ValueError(f"shuffle buffer must be ≥ 1 row, got {buffer}")
    rng = np.random.default_rng([_SHUFFLE_STREAM, seed % 2**63, epoch, rank])
    pool: list[dict] = []
    for row in rows:
        if len(pool) < buffer:
            pool.append(row)
            continue
        k = int(rng.integers(buffer))
        yield pool[k]
        pool[k] = row
    for k in rng.permutation(len(pool)):
        yield pool[k]


def row_length(row: dict) -> int:
    """Tokens of one pipeline row: its num_tokens column when present, else its input_ids' length."""
    n = row.get("num_tokens")
    return int(n) if n is not None else len(row["input_ids"])


def window_rows(micro_batch: int, length_window: int) -> int:
    """length_window rounded up to whole micro-batches (at least one)."""
    return max(1, -(-length_window // micro_batch)) * micro_batch


def group_by_length(rows: Iterable[dict], micro_batch: int, window: int, seed: int, epoch: int) -> Iterator[list[dict]]:
    """The rows as length-grouped micro-batches of `micro_batch` rows (see the module docstring).

    window: rows sorted together, rounded up to a multiple of micro_batch. Only the last micro-batch of
    the stream can be shorter than micro_batch.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be ≥ 1, got {micro_batch}")
    size = window_rows(micro_batch, window)
    pending: list[dict] = []
    index = 0
    for row in rows:
        pending.append(row)
        if len(pending) == size:
            yield from _window_batches(pending, micro_batch, seed, epoch, index)
            pending, index = [], index + 1
    if pending:
        yield from _window_batches(pending, micro_batch, seed, epoch, index)


def _window_batches(rows: list[dict], micro_batch: int, seed: int, epoch: int, index: int) -> Iterator[list[dict]]:
    order = sorted(range(len(rows)), key=lambda i: row_length(rows[i]))  # stable: ties keep stream order
    batches = [[rows[i] for i in order[k:k + micro_batch]] for k in range(0, len(order), micro_batch)]
    short = [batches.pop()] if len(batches[-1]) < micro_batch else []  # only in the epoch's last window
    rng = np.random.default_rng([seed % 2**63, epoch, index])
    for k in rng.permutation(len(batches)):
        yield batches[k]
    yield from short
