"""An S3-compatible server on 127.0.0.1 for tests and benchmarks: moto's server mode, in its own process.

    with s3_server() as s3:          # sets AWS_ENDPOINT_URL and test credentials in os.environ
        s3.client.create_bucket(Bucket="b"); ... "s3://b/key" ...

Everything phi3v-ray reads goes through pyarrow, which finds the server through AWS_ENDPOINT_URL,
exactly as it finds a real bucket through the node's credentials: no test double of our own code.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass


BUCKET = "phi3v"  # the bucket the tests' session server holds (tests/conftest.py: s3, bucket)


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]  # what a process needs to reach it (also set in os.environ while it runs)
    client: object  # boto3 S3 client with the server's credentials


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(no_auth_actions: int | None = None, set_environ: bool = True):
    """Start moto's S3 server; with no_auth_actions=n it checks IAM credentials after the first n requests."""
    import boto3

    port = _free_port()
    env = dict(os.environ)
    if no_auth_actions is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(no_auth_actions)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.05)
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing")
        saved = {k: os.environ.get(k) for k in creds}
        if set_environ:
            os.environ.update(creds)
        try:
            yield S3Server(endpoint, creds, client)
        finally:
            if set_environ:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
