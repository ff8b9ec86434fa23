"""`phi3v-ray submit`: run a phi3v-ray command as a Ray job on a cluster, through the Jobs API.

    phi3v-ray submit -- train --config docvqa name=docvqa-h100-full      # follows the logs
    phi3v-ray submit --no-wait --env PHI3V_STORAGE_PATH=s3://bucket/phi3v -- train --config docvqa
    job_id, status = submit_job(["train", "--config", "docvqa"])           # the same from Python

The job runs `phi3v-ray <args>` on the head node with this checkout as its working directory
(uploaded, minus the excludes below), so the code you submit is the code that runs; a
`--working-dir` upload takes precedence over the phi3v-ray installed on the nodes.

Security (cluster/README.md §5). The Jobs API is remote code execution by design: whoever reaches
it runs commands on every node with the nodes' credentials. So the address defaults to loopback
and you reach a cluster through an SSH tunnel (`ray dashboard cluster/aws.yaml`) or
`kubectl port-forward`; a non-loopback address is refused unless `--allow-remote` is given.
With token authentication (Ray 2.60: `ray start --head` turns it on when a token exists; our
cluster files set RAY_AUTH_MODE=token) every request carries `Authorization: Bearer <token>`. The
token is looked up as Ray itself does: $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token. RAY_AUTH_MODE=token makes a missing token an error; RAY_AUTH_MODE=disabled
sends none. The token is not encryption: keep it inside the tunnel.

RAY_ADDRESS / RAY_API_SERVER_ADDRESS, which Ray's own client lets override any address, are
ignored here: the address is `--address` and nothing else, so the loopback check cannot be
bypassed by a stray environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# gitwildmatch patterns relative to the working dir (Ray also honours .gitignore and .rayignore).
# Directory names carry no trailing slash so that Ray skips the whole directory instead of
# walking it file by file (.venv alone is several GB).
DEFAULT_EXCLUDES = [
    ".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    "runs", "exported", "build", "dist", ".whl", "bench/results", "wandb", "mlruns",
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.whl", "*.tar.gz", "*.zip",
    ".env", "*.pem", "*.key", "auth_token",  # credentials never travel with the code
]
LARGE_FILE_BYTES = 16 * 2**20  # files above this are left out too (data and weights belong on shared storage)
JOB_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
    # ensure_ray() passes its own runtime_env to ray.init(); Ray refuses to merge it with the job's
    # when both name the same env var, unless this is set (then the driver's value wins).
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
REMOTE_WARNING = (
    "the Ray Jobs API is remote code execution: anyone who can reach {address} can run commands on every "
    "node with the nodes' credentials. Never expose it publicly; prefer an SSH tunnel or kubectl port-forward "
    "to 127.0.0.1."
)


class SubmitError(RuntimeError):
    """A submission refused or failed before the job ran (bad address, missing token, ...)."""


# ----------------------------------------------------------------------------- address and token
def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; no DNS lookup (a name that resolves to loopback is still refused)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(address: str, allow_remote: bool = False) -> str:
    """Normalise the Jobs API address and refuse a non-loopback one unless allow_remote."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(f"--address {address!r}: use the dashboard's http://HOST:PORT (default {DEFAULT_ADDRESS})")
    if not is_loopback(parts.hostname):
        if not allow_remote:
            raise SubmitError(
                f"--address {address!r} is not a loopback address. " + REMOTE_WARNING.format(address=address) +
                " Open a tunnel (`ray dashboard cluster/<file>.yaml` or `kubectl port-forward svc/<head-svc> 8265:8265`) "
                f"and use {DEFAULT_ADDRESS}, or pass --allow-remote if this address is private to you."
            )
        print(f"phi3v-ray submit: warning: {REMOTE_WARNING.format(address=address)}"
              + (" The token travels unencrypted over http://." if parts.scheme == "http" else ""), file=sys.stderr)
    return address


def auth_token() -> str | None:
    """The cluster token, found as Ray 2.60 finds it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        named = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
        path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
        if path.is_file():
            token = path.read_text().strip()
        elif named:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={named}: no such file")
    if mode == "token" and not token:
        raise SubmitError("RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, "
                          "or write ~/.ray/auth_token (`ray get-auth-token --generate`, or copy the cluster's)")
    return token or None


def auth_headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _without_address_env():
    """Ray's client replaces any address with RAY_API_SERVER_ADDRESS / RAY_ADDRESS; hide them meanwhile."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_client(address: str = DEFAULT_ADDRESS, allow_remote: bool = False):
    """A JobSubmissionClient for the checked address, sending the token when there is one."""
    from ray.job_submission import JobSubmissionClient

    address = check_address(address, allow_remote)
    with _without_address_env():
        try:
            return JobSubmissionClient(address, headers=auth_headers())
        except ConnectionError as err:
            raise SubmitError(f"no Ray dashboard at {address} ({err}); is the cluster up and the tunnel open?") from None


# ----------------------------------------------------------------------------- the job
def build_runtime_env(working_dir: str | Path | None, env: dict[str, str] | None = None,
                      pip: list[str] | None = None, excludes: list[str] | None = None) -> dict:
    """working_dir + excludes (defaults, plus every file over LARGE_FILE_BYTES), env_vars, pip."""
    runtime_env: dict = {"env_vars": {**JOB_ENV, **(env or {})}}
    if working_dir is not None:
        root = Path(working_dir).expanduser().resolve()
        if not root.is_dir():
            raise SubmitError(f"--working-dir {working_dir}: not a directory")
        patterns = list(DEFAULT_EXCLUDES if excludes is None else excludes)
        large = _large_files(root, patterns)
        for rel, size in large:
            print(f"phi3v-ray submit: leaving out {rel} ({size / 2**20:.0f} MiB); put data and weights on shared storage",
                  file=sys.stderr)
        runtime_env["working_dir"] = str(root)
        runtime_env["excludes"] = patterns + ["/" + rel for rel, _ in large]
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def _large_files(root: Path, patterns: list[str]) -> list[tuple[str, int]]:
    """Files over LARGE_FILE_BYTES, skipping directories named in the excludes (the .venv is not walked)."""
    import fnmatch

    names = [p for p in patterns if "/" not in p]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not any(fnmatch.fnmatch(d, p) for p in names)]
        for name in files:
            path = Path(folder) / name
            if any(fnmatch.fnmatch(name, p) for p in names):
                continue
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                if size > LARGE_FILE_BYTES:
                    found.append((path.relative_to(root).as_posix(), size))
    return sorted(found)


def entrypoint(args: list[str]) -> str:
    """The shell command the job runs: `phi3v-ray <args>`, each argument quoted."""
    return shlex.join(["phi3v-ray", *args])


def submit_job(entrypoint_args: list[str], address: str = DEFAULT_ADDRESS, working_dir: str | Path | None = ".",
               env: dict[str, str] | None = None, wait: bool = True, *, pip: list[str] | None = None,
               allow_remote: bool = False, submission_id: str | None = None,
               timeout_s: float | None = None) -> tuple[str, str]:
    """Submit `phi3v-ray <entrypoint_args>` as a Ray job; returns (job_id, status).

    With wait, prints the job's logs as they come and returns once the job ends (SUCCEEDED,
    FAILED or STOPPED); timeout_s bounds that wait (SubmitError, the job keeps running).
    Without wait, returns right after submission (status PENDING or later).
    working_dir None uploads nothing: the cluster's installed phi3v-ray runs.
    """
    if not entrypoint_args:
        raise SubmitError("nothing to run: give a phi3v-ray command, e.g. `phi3v-ray submit -- train --config docvqa`")
    if entrypoint_args[0] == "submit":
        raise SubmitError("`submit` cannot be submitted; give the command the cluster should run (train, eval, ...)")
    client = job_client(address, allow_remote)
    runtime_env = build_runtime_env(working_dir, env, pip)
    job_id = client.submit_job(entrypoint=entrypoint(list(entrypoint_args)), runtime_env=runtime_env,
                               submission_id=submission_id)
    print(f"phi3v-ray submit: job {job_id} submitted to {client.get_address()}: {entrypoint(list(entrypoint_args))}",
          file=sys.stderr, flush=True)
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    return job_id, follow(client, job_id, timeout_s)


def follow(client, job_id: str, timeout_s: float | None = None) -> str:
    """Print the job's logs until it ends; returns its final status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except asyncio.TimeoutError:
        raise SubmitError(f"job {job_id} still running after {timeout_s:.0f} s; it keeps running on the cluster") from None
    except RuntimeError as err:  # the log stream broke (tunnel hiccup): fall back to polling the status
        print(f"phi3v-ray submit: log stream ended ({err}); polling the job status", file=sys.stderr, flush=True)
    while True:  # the stream closes when the job ends; the status may lag it by a moment
        status = str(client.get_job_status(job_id))
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} still {status} after {timeout_s:.0f} s; it keeps running on the cluster")
        time.sleep(1.0)


# ----------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    text = "run a phi3v-ray command as a Ray job on a cluster (Jobs API, loopback address, token auth)"
    p = subparsers.add_parser(
        "submit", help=text, description=text + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  phi3v-ray submit --env PHI3V_STORAGE_PATH=s3://YOUR-BUCKET/phi3v-ray -- train --config docvqa "
               "name=docvqa-h100-full\n\nReach a cluster through `ray dashboard cluster/<file>.yaml` (SSH tunnel) or "
               "`kubectl port-forward`.\nThe token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
    )
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"the dashboard / Jobs API (default {DEFAULT_ADDRESS})")
    p.add_argument("--allow-remote", action="store_true",
                   help="accept a non-loopback address (the Jobs API runs arbitrary code: never expose it)")
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working directory (default .)")
    p.add_argument("--no-working-dir", action="store_true",
                   help="upload nothing; run the phi3v-ray installed on the cluster (e.g. cluster/kuberay/Dockerfile)")
    p.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                   help="pip requirement installed for the job (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job (repeatable)")
    p.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the logs")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="the phi3v-ray command to run, e.g. -- train --config docvqa key=value ...")
    p.set_defaults(func=_submit)


def _submit(args) -> int:
    from ray.exceptions import AuthenticationError

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    try:
        env = _parse_env(args.env)
        job_id, status = submit_job(command, address=args.address, working_dir=None if args.no_working_dir else args.working_dir,
                                    env=env, wait=not args.no_wait, pip=args.pip, allow_remote=args.allow_remote,
                                    submission_id=args.submission_id)
    except SubmitError as err:
        print(f"phi3v-ray submit: {err}", file=sys.stderr)
        return 2
    except AuthenticationError as err:  # 401/403: one line saying what to fix, no traceback
        status = "403 (wrong token)" if "Authentication failed" in str(err) else "401 (no token sent)"
        print(f"phi3v-ray submit: the Jobs API at {args.address} refused the request with {status}: give the cluster's "
              f"token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (with RAY_AUTH_MODE=token)",
              file=sys.stderr)
        return 1
    except RuntimeError as err:  # what the Jobs API answered (unknown job, ...)
        print(f"phi3v-ray submit: the Jobs API at {args.address} answered: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nphi3v-ray submit: stopped following; the job keeps running on the cluster "
              f"(`RAY_AUTH_MODE=token ray job stop --address {args.address} <job id>` stops it)", file=sys.stderr)
        return 130
    follow_cmd = f"RAY_AUTH_MODE=token ray job logs --address {args.address} --follow {job_id}"
    if args.no_wait:
        print(job_id)
        print(f"phi3v-ray submit: follow with `{follow_cmd}`", file=sys.stderr)
        return 0
    print(f"phi3v-ray submit: job {job_id} {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SubmitError(f"--env {item!r}: write KEY=VALUE")
        env[key.strip()] = value
    return env
