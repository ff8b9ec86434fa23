"""One writer per run: a lease file `storage_path/name/.lease` held by the driver while it trains.

    with RunLease(cfg.run_dir, stale_after_s=cfg.lease_stale_s):
        trainer.fit()

The lease is JSON (owner id, host, pid, start and heartbeat times); a background thread rewrites the
heartbeat every `stale_after_s / 10` seconds (at least every 30 s). A second start with the same
name and storage_path finds a fresh heartbeat and is refused with `RunInUse`, naming the holder; a
heartbeat older than `stale_after_s` (a killed driver), or one whose holder ran on this host and is
no longer alive, is taken over, and the takeover is printed.

Local and NFS paths create the lease with O_CREAT|O_EXCL, so two starts cannot both get it. Object
storage (s3://, gs://) has no create-if-absent here: a start writes its lease, waits a moment and
reads it back, and proceeds only if its own id is there. Two starts within that moment of each other
can still both pass; the last writer's lease stays, the other driver's heartbeat thread finds a
foreign owner at its next beat and says so, and that run ends with RunInUse when `fit()` returns.
Until then both write: that window is the documented limit on object storage.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from .storage import delete_file, is_remote, read_text, write_text

LEASE_FILE = ".lease"
READ_BACK_S = 2.0  # object storage: wait this long before reading a new lease back


class RunInUse(RuntimeError):
    """Another live driver holds the run's lease."""


def _dead_here(held: dict) -> bool:
    """The holder ran on this host and its process is gone (a killed driver): its lease is stale at once."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RunLease:
    def __init__(self, run_dir: str, stale_after_s: float = 300.0):
        self.path = f"{run_dir.rstrip('/')}/{LEASE_FILE}"
        self.stale_after_s = stale_after_s
        self.heartbeat_s = max(0.5, min(30.0, stale_after_s / 10))
        self.owner = uuid.uuid4().hex
        self.lost: str | None = None  # why the lease was lost, if it was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, started: float) -> str:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": started, "heartbeat": time.time()})

    def holder(self) -> dict | None:
        """The lease as stored, or None when there is none (an unreadable lease counts as stale)."""
        text = read_text(self.path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return {"owner": "?", "host": "?", "pid": "?", "heartbeat": 0.0}

    def acquire(self) -> "RunLease":
        self._started = time.time()
        if not is_remote(self.path) and self._create_exclusive():
            return self._start_heartbeat()
        held = self.holder()
        if held is not None and held.get("owner") != self.owner:
            age = time.time() - float(held.get("heartbeat", 0.0))
            if age < self.stale_after_s and not _dead_here(held):
                raise RunInUse(
                    f"run directory {self.path.rsplit('/', 1)[0]} is in use by another driver (host {held.get('host')}, "
                    f"pid {held.get('pid')}, heartbeat {age:.0f}s ago; lease {self.path}). Two runs must not share "
                    f"one name and storage_path: use another name, or wait; a lease without a heartbeat for "
                    f"{self.stale_after_s:.0f}s (lease_stale_s) is taken over.")
            print(f"[phi3v-ray] taking over the stale lease {self.path} (host {held.get('host')}, pid {held.get('pid')}, "
                  f"last heartbeat {age:.0f}s ago)", flush=True)
        write_text(self.path, self._record(self._started))
        time.sleep(READ_BACK_S if is_remote(self.path) else 0.05)
        held = self.holder()
        if held is None or held.get("owner") != self.owner:
            raise RunInUse(f"lost the race for {self.path} to another start (host {held and held.get('host')}, "
                           f"pid {held and held.get('pid')}); use another name or retry")
        return self._start_heartbeat()

    def _create_exclusive(self) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._record(self._started))
        return True

    def _start_heartbeat(self) -> "RunLease":
        self._thread = threading.Thread(target=self._beat, name="phi3v-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self.holder()
                if held is not None and held.get("owner") != self.owner:
                    self.lost = f"the lease {self.path} now belongs to host {held.get('host')} pid {held.get('pid')}"
                    print(f"[phi3v-ray] lease lost: {self.lost}", flush=True)
                    return
                write_text(self.path, self._record(self._started))
            except OSError as err:  # storage hiccup: try again at the next beat
                print(f"[phi3v-ray] lease heartbeat failed: {err}", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        held = self.holder()
        if held is not None and held.get("owner") == self.owner:
            delete_file(self.path)

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
