"""Fault injection for recovery drills and tests: `fault_injection="rank:step:marker_file"`.

That rank's process exits once, right after that optimizer step; the marker file records that it
happened, so the restarted worker does not exit again. Several faults are separated by ";", e.g.
"1:2:/tmp/a;0:4:/tmp/b": rank 1 exits after step 2, and rank 0 after step 4.
"""

from __future__ import annotations

import os
from pathlib import Path


def parse_faults(spec: str) -> list[tuple[int, int, str]]:
    """`spec` → [(rank, step, marker file)]; a ValueError names the part that is not rank:step:marker."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        rank, step, marker = (part.split(":", 2) + ["", ""])[:3]
        if not (rank.isdigit() and step.isdigit() and marker):
            raise ValueError(f"{part!r} is not rank:step:marker_file")
        faults.append((int(rank), int(step), marker))
    return faults


def fault_hook(rank: int, spec: str):
    """A callable `after_step(step)`; a no-op unless `spec` names this rank."""
    mine = {step: marker for fault_rank, step, marker in parse_faults(spec) if fault_rank == rank}
    if not mine:
        return lambda step: None

    def after_step(step: int) -> None:
        marker = mine.get(step)
        if marker and not os.path.exists(marker):
            Path(marker).write_text(f"killed rank {rank} after step {step}\n")
            os._exit(1)

    return after_step
