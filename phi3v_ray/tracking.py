"""Where a run's per-step metrics go on rank 0: the console, metrics.jsonl, TensorBoard, MLflow.

    logger = MetricLogger(run_dir, total_steps)
    logger.log({"step": 10, "loss": 1.9, ...})      # one flat dict per logged step, stable keys
    logger.close()                                   # at the end of the loop, also after an error

Only rank 0 builds one; TensorBoard is used when installed (local run directories only), MLflow when
$MLFLOW_TRACKING_URI names a tracking server or directory.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

from .storage import append_text, is_remote


CONSOLE_HIDDEN = ("wall_time", "host_rss_gb", "host_uss_gb", "host_shm_gb")  # in metrics.jsonl, not on the progress line
_console = None  # the driver's console queue (console.Console), when the driver is quiet


def set_console(queue) -> None:
    """Send this worker's `say` lines to the driver's console too (None: the worker's stdout only)."""
    global _console
    _console = queue


def say(text: str) -> None:
    """One line for the person at the terminal: to the worker's stdout (its log file; the console with
    -v) and, when the driver is quiet, through its console queue. Ray Train tees print() when a
    library has wrapped sys.stdout, hence sys.__stdout__."""
    line = f"[phi3v-ray] {text}"
    print(line, file=sys.__stdout__, flush=True)
    if _console is not None:
        _console.actor.put_nowait.remote(line)  # no wait: actor calls from one caller keep their order


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "wall_time")
            and math.isfinite(v)}


class Progress:
    """`[#####---------------] 5/20 eta 1m40s`; the ETA counts from the first step this process ran."""

    def __init__(self, total: int, width: int = 20):
        self.total, self.width = total, width
        self.start_step: int | None = None
        self.t0 = time.perf_counter()

    def line(self, step: int) -> str:
        if self.total <= 0:
            return ""
        if self.start_step is None:
            self.start_step, self.t0 = step, time.perf_counter()
        filled = round(min(step / self.total, 1.0) * self.width)
        done_here = step - self.start_step
        eta = "?"
        if done_here > 0:
            seconds = (time.perf_counter() - self.t0) / done_here * max(self.total - step, 0)
            eta = f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
        return f"[{'#' * filled}{'-' * (self.width - filled)}] {step}/{self.total} eta {eta}"


class MetricLogger:
    """Rank 0's sinks for one run; `close()` flushes and releases them."""

    def __init__(self, run_dir: str, total_steps: int):
        self.run_dir = run_dir
        self.metrics_file = f"{run_dir}/artifacts/metrics.jsonl"
        self.progress = Progress(total_steps)
        self._tensorboard = None
        self._mlflow = None
        if not is_remote(run_dir) and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(f"{run_dir}/artifacts/tensorboard")
        if os.environ.get("MLFLOW_TRACKING_URI") and importlib.util.find_spec("mlflow") is not None:
            import mlflow  # only when asked for: an installed MLflow alone costs every worker its import

            mlflow.set_experiment(Path(run_dir).name)
            self._mlflow = mlflow
            mlflow.start_run()

    def log(self, metrics: dict, show: bool = True) -> None:
        """Write one row everywhere; `show=False` keeps its line off a quiet console (worker log only)."""
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                         if k not in CONSOLE_HIDDEN and not k.startswith("val/"))
        line = f"{self.progress.line(int(metrics.get('step', 0)))} {shown}"
        if show and any(k not in ("step", "wall_time") and not k.startswith("val/") for k in metrics):
            # (a row of evaluation scores alone is on the console already, as a table)
            say(line)
        else:
            print(f"[phi3v-ray] {line}", file=sys.__stdout__, flush=True)
        append_text(self.metrics_file, json.dumps(metrics) + "\n")
        scalars = _scalars(metrics)
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, metrics["step"])
            self._tensorboard.flush()
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=int(metrics["step"]))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None
