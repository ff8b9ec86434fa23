"""What a person at the terminal sees: our lines only; Ray's and the libraries' logs go to files.

    with Console(run_dir) as console:        # driver: prints what workers `say`, logs to run_dir/logs/
        trainer = make_trainer(..., console=console.queue)
        trainer.fit()

By default (`quiet`) the local Ray does not forward worker output to the driver; rank 0's lines
(`tracking.say`) travel through a small queue actor and the driver prints them without Ray's
prefixes. The driver's own Ray, Ray Data and Python warning logs go to `<run_dir>/logs/driver.log`,
and, for a Ray this process started, the workers' stdout/stderr files are copied to
`<run_dir>/logs/ray/` at the end. `phi3v-ray -v …` (PHI3V_VERBOSE=1) shows everything as Ray prints it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .storage import is_remote

LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "py.warnings", "transformers", "deepspeed")
STARTED_HERE = {"ray": False}  # set by launch.ensure_ray when it starts a private local Ray


def verbose() -> bool:
    return os.environ.get("PHI3V_VERBOSE", "") not in ("", "0")


def local_logs_dir(run_dir: str) -> Path:
    from .storage import local_run_dir

    return local_run_dir(run_dir) / "logs"


def driver_log(run_dir: str) -> Path:
    """<run_dir>/logs/driver.log (its folder made): where the driver's library and native logs go."""
    logs = local_logs_dir(run_dir)
    logs.mkdir(parents=True, exist_ok=True)
    return logs / "driver.log"


class Console:
    """Prints rank 0's lines on the driver and sends library logs to a file (a no-op with -v)."""

    def __init__(self, run_dir: str, relay: bool = True):
        """relay=False: no queue; rank 0's lines stay in its worker's log (for a driver nobody watches)."""
        self.run_dir = run_dir
        self.relay = relay
        self.queue = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._handler: logging.Handler | None = None
        self._saved: list[tuple[logging.Handler, int]] = []

    def __enter__(self) -> "Console":
        if verbose():
            return self
        if self.relay:
            from ray.util.queue import Queue

            self.queue = Queue(actor_options={"num_cpus": 0})
            self._thread = threading.Thread(target=self._print_lines, name="phi3v-console", daemon=True)
            self._thread.start()
        self._files_for_library_logs()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._drain()
        if self.queue is not None:
            self.queue.shutdown()
            self.queue = None
        for handler, level in self._saved:
            handler.setLevel(level)
        if self._handler is not None:
            for name in LIBRARY_LOGGERS:
                logging.getLogger(name).removeHandler(self._handler)
            self._handler.close()
        copy_ray_worker_logs(self.run_dir)

    def _print_lines(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                print(self.queue.get(timeout=0.5), flush=True)
            except Empty:
                continue
            except Exception:  # the queue actor is gone (Ray shut down): nothing more will come
                return

    def _drain(self) -> None:
        try:
            while not self.queue.empty():
                print(self.queue.get_nowait(), flush=True)
        except Exception:
            pass

    def _files_for_library_logs(self) -> None:
        """Library loggers write to logs/driver.log; their console handlers only show errors."""
        if is_remote(self.run_dir):
            return
        self._handler = logging.FileHandler(driver_log(self.run_dir))
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.captureWarnings(True)
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(self._handler)
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and handler is not self._handler and \
                        getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                    self._saved.append((handler, handler.level))
                    handler.setLevel(logging.ERROR)
        logging.getLogger("py.warnings").propagate = False


@contextmanager
def native_stderr_to_log(run_dir: str):
    """Send what is written to file descriptor 2 inside the block to logs/driver.log (not with -v).

    Ray's C++ core writes its warnings there directly, past Python's logging: e.g. one line per
    preprocessing actor when the driver itself runs a pipeline (`cache_data`).
    """
    if verbose() or is_remote(run_dir):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(driver_log(run_dir), "ab") as log:
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def copy_ray_worker_logs(run_dir: str) -> None:
    """The stdout/stderr files of a Ray this process started (its session directory) → run_dir/logs/ray/."""
    import ray

    if is_remote(run_dir) or not ray.is_initialized() or not STARTED_HERE["ray"]:
        return
    try:
        session_logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API for the path
    except Exception:
        return
    out = local_logs_dir(run_dir) / "ray"
    out.mkdir(parents=True, exist_ok=True)
    for path in session_logs.glob("worker-*"):
        if path.suffix in (".out", ".err") and path.stat().st_size:
            shutil.copyfile(path, out / path.name)
