"""`phi3v-ray submit`: the address and token rules, the runtime env, and a real job on a real head.

The slow test starts its own `ray start --head` (token auth on, every port on 127.0.0.1, its own
temp dir) in a subprocess, submits the tiny training through the Jobs API with `submit_job`, and
finds the checkpoint in storage_path. This test process never connects a driver to that head, and
the head is stopped by the ids of the processes it started, never by a global `ray stop` (other
Ray instances on the machine are left alone).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from phi3v_ray import submit
from phi3v_ray.submit import SubmitError, build_runtime_env, check_address, submit_job

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAD_START_TIMEOUT_S = 150
JOB_TIMEOUT_S = 420


# ----------------------------------------------------------------------------- fast: address and token
@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "127.0.0.1:8265", "http://localhost:8265/",
                                     "http://[::1]:8265", "http://127.0.0.2:9000", "https://127.0.0.1:8443"])
def test_loopback_addresses_are_accepted(address):
    assert check_address(address).startswith(("http://", "https://"))


@pytest.mark.parametrize("address", ["http://10.1.2.3:8265", "http://192.0.2.7:8265", "https://203.0.113.9",
                                     "http://0.0.0.0:8265", "http://head.example.com:8265",
                                     "http://127.0.0.1.example.com:8265"])
def test_non_loopback_address_is_refused_without_allow_remote(address, capsys):
    with pytest.raises(SubmitError, match="remote code execution"):
        check_address(address)
    # allowed on request, with the warning (check_address only parses; nothing is contacted)
    assert check_address(address, allow_remote=True)
    assert "remote code execution" in capsys.readouterr().err


def test_cli_refuses_a_remote_address_before_connecting(capsys):
    from phi3v_ray.cli import main

    assert main(["submit", "--address", "http://192.0.2.7:8265", "--", "train"]) == 2
    err = capsys.readouterr().err
    assert "not a loopback address" in err and "--allow-remote" in err and "port-forward" in err


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_is_one_clear_line(status, capsys, monkeypatch):
    """A real HTTP server that answers every request like Ray's dashboard without (401) or with a wrong (403) token."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"Unauthorized" if status == 401 else b"Forbidden")

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    try:
        from phi3v_ray.cli import main

        rc = main(["submit", "--address", f"http://127.0.0.1:{server.server_port}", "--no-working-dir", "--", "train"])
    finally:
        server.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert f"refused the request with {status}" in err[0] and "RAY_AUTH_TOKEN" in err[0]


def test_other_schemes_are_refused():
    with pytest.raises(SubmitError, match="http://HOST:PORT"):
        check_address("ray://127.0.0.1:10001")


def test_token_lookup_follows_ray(tmp_path, monkeypatch):
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit.auth_headers() == {}  # no token anywhere, mode unset: nothing sent
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(SubmitError, match="no token found"):
        submit.auth_headers()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert submit.auth_headers() == {"Authorization": "Bearer from-home"}
    named = tmp_path / "tok"
    named.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert submit.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.auth_headers() == {}


def test_runtime_env_leaves_out_venv_weights_and_large_files(tmp_path, monkeypatch):
    monkeypatch.setattr(submit, "LARGE_FILE_BYTES", 1000)
    (tmp_path / "phi3v_ray").mkdir()
    (tmp_path / "phi3v_ray" / "x.py").write_text("x = 1\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "huge.so").write_bytes(b"0" * 5000)  # not walked: the directory is excluded
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.jsonl").write_bytes(b"0" * 5000)
    env = build_runtime_env(tmp_path, env={"PHI3V_STORAGE_PATH": "s3://b/p"}, pip=["phi3v-ray"])
    assert env["working_dir"] == str(tmp_path.resolve())
    assert {".venv", ".git", "runs", "*.safetensors", "/data/big.jsonl"} <= set(env["excludes"])
    assert "/.venv/huge.so" not in env["excludes"]
    assert env["env_vars"]["PHI3V_STORAGE_PATH"] == "s3://b/p"
    assert env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1" and env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert env["pip"] == ["phi3v-ray"]
    assert "working_dir" not in build_runtime_env(None)


def test_entrypoint_is_quoted():
    assert submit.entrypoint(["train", "name=a b", "--config", "docvqa"]) == "phi3v-ray train 'name=a b' --config docvqa"


# ----------------------------------------------------------------------------- slow: a real head, a real job
def _free_ports(n: int) -> list[int]:
    """Free ports below the kernel's ephemeral range (32768+) and above Ray's worker ports (10002-19999).

    A port taken with bind(0) and released is soon handed out again to the next bind(0), which Ray's own
    components do while starting: the dashboard port then meets a gRPC server.
    """
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, 32000)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def _http_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@contextlib.contextmanager
def local_head(token: str, num_cpus: int = 4):
    """`ray start --head --block` on loopback with token auth, in its own session; stopped by its process ids."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rjob", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    gcs, dashboard, client, agent = _free_ports(4)
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    # Ray's processes that look the cluster up (Train's PlacementGroupCleaner) would otherwise find several
    # Ray instances on this machine and give up; the head's processes inherit this.
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={1024 * 2**20}", f"--temp-dir={temp_dir}"]
    log_path = temp_dir / "head.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while _safe_status(f"{address}/api/version", token) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(1.0)
        yield address
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _safe_status(url: str, token: str) -> int:
    try:
        return _http_status(url, token)
    except (OSError, http.client.HTTPException):
        return 0


def _stop_head(proc: subprocess.Popen, temp_dir: Path) -> None:
    """SIGTERM to every Ray process of the head's session or temp dir at once, SIGKILL to any left after 3 s,
    then SIGKILL to `ray start --block` itself: the head is thrown away with its temp dir.

    (SIGTERM to `ray start --block` alone also works, but it stops its children one after another and
    then waits out its own grace period: ~35 s; the raylet alone takes ~14 s to drain after a SIGTERM.)
    """
    import psutil  # vendored by Ray

    ours = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            if p.pid not in (os.getpid(), proc.pid) and (
                    os.getsid(p.pid) == proc.pid or str(temp_dir) in " ".join(p.info["cmdline"] or [])):
                ours.append(p)
    for p in ours:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(ours, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.own_cluster
def test_tiny_training_runs_as_a_ray_job(tmp_path, tiny_ckpt, demo_data, monkeypatch):
    import ray

    if ray.is_initialized():  # the shared in-process Ray of other tests: not needed here, and it holds CPUs
        ray.shutdown()
    token = secrets.token_hex(32)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # how a user points the client at the cluster's token
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    store = tmp_path / "store"
    # Training only: evaluation in the workers runs in tests/test_train.py and tests/test_multinode.py.
    args = ["train", f"checkpoint={tiny_ckpt}", f"train_file={demo_data / 'train.jsonl'}",
            f"images_root={demo_data / 'images'}", f"storage_path={store}",
            "name=jobrun", "max_steps=2", "epochs=1", "num_crops=1", "micro_batch=2", "grad_accum=1", "num_workers=2",
            "eval_before=false", "precision=fp32", "attention=sdpa",
            "mode=frozen_vision", "warmup_steps=1", "max_failures=0", "preprocess_actors=1"]

    t0 = time.monotonic()
    with local_head(token) as address:
        started = time.monotonic() - t0
        # the head enforces the token on the Jobs API
        assert _http_status(f"{address}/api/jobs/", None) == 401
        assert _http_status(f"{address}/api/jobs/", "not-the-token") == 403
        job_id, status = submit_job(args, address=address, working_dir=REPO_ROOT, timeout_s=JOB_TIMEOUT_S)
        if status != "SUCCEEDED":
            print(submit.job_client(address).get_job_logs(job_id)[-6000:])
        assert status == "SUCCEEDED", job_id
        info = submit.job_client(address).get_job_info(job_id)
        assert info.entrypoint.startswith("phi3v-ray train ")
        assert info.runtime_env["working_dir"].startswith("gcs://")  # the checkout was uploaded
    print(f"head up in {started:.0f} s, head + job {time.monotonic() - t0:.0f} s")

    run = store / "jobrun"
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert checkpoints, f"no checkpoint in {run}"
    state = json.loads((checkpoints[-1] / "train_state.json").read_text())
    assert state["state"]["step"] == 2
    # Frozen vision trains under DeepSpeed ZeRO-2 by default: the whole model and each rank's optimizer shard.
    assert (checkpoints[-1] / "model" / "model.safetensors").is_file()
    assert len(list((checkpoints[-1] / "deepspeed").glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    metrics = [json.loads(line) for line in (run / "artifacts" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(m["step"] for m in metrics if "loss" in m) == [1, 2]
