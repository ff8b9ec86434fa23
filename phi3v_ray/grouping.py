"""Length-grouped micro-batches: rows of similar length share a micro-batch, so padding stays small.

A right-padded micro-batch is as wide as its longest row. DocVQA pages differ (a letter page is 2509
image tokens, an A4 page 1933), so random micro-batches of 4 carry 5–10 % padding tokens, all of them
computed and thrown away. Sorted by length within a window of the shuffled stream they carry almost
none (`bench/pipeline.py --padding`).

    rows of one epoch (already shuffled by Ray Data's seeded local buffer)
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
≈ 350 MB), beside Ray Data's own shuffle buffer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


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
