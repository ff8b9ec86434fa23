"""Fault injection for recovery drills and tests: `fault_injection="rank:step:marker_file"`.

That rank's process exits once, right after that optimizer step; the marker file records that it
happened, so the restarted worker does not exit again.
"""

from __future__ import annotations

import os
from pathlib import Path


def fault_hook(rank: int, spec: str):
    """A callable `after_step(step)`; a no-op unless `spec` names this rank."""
    if not spec:
        return lambda step: None
    fault_rank, fault_step, marker = spec.split(":", 2)

    def after_step(step: int) -> None:
        if rank == int(fault_rank) and step == int(fault_step) and not os.path.exists(marker):
            Path(marker).write_text(f"killed rank {rank} after step {step}\n")
            os._exit(1)

    return after_step
