"""Failures that a retry cannot fix, and the controller callback that stops the run on them at once.

    raise DeterministicFailure("data/train.jsonl:7 (id=r7): record has no conversations")

Ray Train retries every worker error up to `max_failures` times, restarting from the latest
checkpoint. A bad record in fail mode, a corrupt checkpoint with nothing older to fall back to, or a
bad setting fails the same way on every retry, so the worker raises `DeterministicFailure` and
`StopOnDeterministicFailure` (a `ray.train.UserCallback`, which runs in Ray Train's controller)
turns it into a controller error, which Ray Train's failure policy never retries. The driver then
prints the message, naming the file, line or record and the reason, as the CLI's last line.
"""

from __future__ import annotations

import ray.train

TAG = "[phi3v-ray deterministic failure]"


class DeterministicFailure(RuntimeError):
    """An error every retry would hit again; the message names the file, line/record and reason."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(f"{TAG} {message}")


def deterministic_message(err: BaseException | str) -> str | None:
    """The message of a DeterministicFailure anywhere in err's text (Ray wraps worker errors), else None."""
    text = str(err)
    at = text.find(TAG)
    if at < 0:
        return None
    message = text[at + len(TAG):].strip().splitlines()[0]
    while message.startswith(TAG):  # a worker's message wrapped again by the controller
        message = message[len(TAG):].strip()
    return message


OOM_MARKERS = ("OutOfMemoryError", "ran out of memory", "CUDA out of memory", "MemoryError")


def out_of_memory_message(err: BaseException) -> str | None:
    """A plain sentence when err (or a worker error Ray wrapped in it) is a process running out of memory."""
    text = str(err)
    seen, cause = set(), err
    while cause is not None and id(cause) not in seen:  # class names along the chain, then the wrapped text
        seen.add(id(cause))
        text += " " + type(cause).__name__
        cause = cause.__cause__ or cause.__context__
    if not any(marker in text for marker in OOM_MARKERS):
        return None
    where = "the GPU" if "CUDA out of memory" in text else "the machine's memory (Ray's memory monitor or the OS ended a worker)"
    return (f"a worker ran out of memory: {where}. Lower micro_batch, num_crops or max_length, use fewer workers per "
            f"machine (num_workers, cpus_per_worker), or close other programs; `-v` shows the worker's own error")


class StopOnDeterministicFailure(ray.train.UserCallback):
    """Raise in the controller when any worker failed deterministically: Ray Train then stops without retrying."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for rank, err in sorted(worker_exceptions.items()):
            message = deterministic_message(err)
            if message is not None:
                raise DeterministicFailure(f"{message} (rank {rank}; not retried: every retry would fail the same way)")
