"""One writer per run: the lease file under storage_path/name (no Ray needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from phi3v_ray.lease import RunInUse, RunLease


def test_a_second_start_is_refused_while_the_first_holds_the_lease(tmp_path):
    run = str(tmp_path / "runs" / "same-name")
    first = RunLease(run, stale_after_s=60).acquire()
    try:
        lease = json.loads((tmp_path / "runs" / "same-name" / ".lease").read_text())
        assert {"owner", "host", "pid", "heartbeat", "started"} <= set(lease)
        with pytest.raises(RunInUse, match=r"in use by another driver .*pid \d+.*use another name"):
            RunLease(run, stale_after_s=60).acquire()
    finally:
        first.release()
    assert not (tmp_path / "runs" / "same-name" / ".lease").exists()
    RunLease(run, stale_after_s=60).acquire().release()  # free again once released


def test_the_heartbeat_keeps_a_lease_fresh_and_a_stale_one_is_taken_over(tmp_path, capsys):
    run = str(tmp_path / "r")
    held = RunLease(run, stale_after_s=1.0).acquire()
    time.sleep(1.5)  # beats every 0.5 s: still fresh
    with pytest.raises(RunInUse):
        RunLease(run, stale_after_s=1.0).acquire()
    held._stop.set()  # the holder hangs (no more heartbeats) but its process lives
    held._thread.join()
    time.sleep(1.2)
    taker = RunLease(run, stale_after_s=1.0).acquire()
    assert "taking over the stale lease" in capsys.readouterr().out
    time.sleep(0.7)
    assert held.holder()["owner"] == taker.owner
    taker.release()


def test_the_lease_of_a_killed_driver_on_this_host_is_taken_over_at_once(tmp_path):
    run = str(tmp_path / "r")
    code = (f"from phi3v_ray.lease import RunLease; import os; RunLease({run!r}, stale_after_s=3600).acquire(); "
            "os._exit(9)")  # killed: no release
    subprocess.run([sys.executable, "-c", code], check=False)
    assert (tmp_path / "r" / ".lease").is_file()
    RunLease(run, stale_after_s=3600).acquire().release()


def test_a_holder_that_lost_its_lease_notices(tmp_path):
    run = str(tmp_path / "r")
    held = RunLease(run, stale_after_s=1.0).acquire()
    intruder = RunLease(run, stale_after_s=1.0)
    (tmp_path / "r" / ".lease").write_text(intruder._record(time.time()))  # the object-storage race: last writer wins
    time.sleep(1.0)
    assert held.lost and "now belongs to" in held.lost
    held.release()
    assert json.loads((tmp_path / "r" / ".lease").read_text())["owner"] == intruder.owner  # not deleted by the loser
