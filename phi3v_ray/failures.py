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


class StopOnDeterministicFailure(ray.train.UserCallback):
    """Raise in the controller when any worker failed deterministically: Ray Train then stops without retrying."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for rank, err in sorted(worker_exceptions.items()):
            message = deterministic_message(err)
            if message is not None:
                raise DeterministicFailure(f"{message} (rank {rank}; not retried: every retry would fail the same way)")
