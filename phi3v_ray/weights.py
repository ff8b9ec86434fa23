"""Base checkpoints on object storage: each node downloads one once into a local cache and loads from there.

    local_checkpoint("s3://bucket/phi-3.5-vision")            → "/root/.cache/phi3v-ray/checkpoints/…/full"
    local_checkpoint("s3://bucket/phi-3.5-vision", processor_only=True)   tokenizer and configs, no weights
    local_checkpoint("/mnt/models/phi-3.5-vision")            → the same path (local and NFS need no copy)

Eight training workers and a few preprocessing actors on one node all call this at start-up; a file
lock next to the cache entry lets the first one download while the others wait, then they all find
the finished copy. A download goes to a temporary folder; every file's size is checked against the
listing, and its SHA-256 against `checksums.sha256` when the checkpoint has one (`write_checksums`
makes it, in `sha256sum` format); only then is the folder renamed into place with a marker file
recording what it holds. A later call reuses the copy when the remote listing (names, sizes,
modification times) still equals the marker and the local sizes are intact; otherwise it downloads
again. The cache lives in $PHI3V_CACHE_DIR, default ~/.cache/phi3v-ray.

Torch-free: the preprocessing actors call it for the tokenizer.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .storage import filesystem, is_remote, list_files

CHECKSUM_FILE = "checksums.sha256"
MARKER = ".phi3v-cache.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
CHUNK = 8 * 2**20


class CheckpointDownloadError(RuntimeError):
    """A downloaded file does not match its listing or its checksum; names the file and both values."""


def cache_root() -> Path:
    return Path(os.environ.get("PHI3V_CACHE_DIR") or Path.home() / ".cache" / "phi3v-ray")


def cache_dir_for(uri: str, processor_only: bool = False) -> Path:
    """Where `local_checkpoint(uri)` keeps its copy on this node."""
    uri = uri.rstrip("/")
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = uri.rsplit("/", 1)[-1] or "checkpoint"
    return cache_root() / "checkpoints" / f"{name}-{key}" / ("processor" if processor_only else "full")


def local_checkpoint(path: str, processor_only: bool = False) -> str:
    """A local directory holding the checkpoint at `path`: the path itself when local, else a verified cached copy."""
    if not is_remote(path):
        return str(path)
    target = cache_dir_for(path, processor_only)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f"{target.name}.lock"):
        listing = {rel: sig for rel, sig in list_files(path).items() if not processor_only or _is_processor_file(rel)}
        if not listing:
            raise FileNotFoundError(f"{path}: no files (expected a checkpoint directory on storage)")
        if _cached_matches(target, path, listing):
            return str(target)
        _download(path, listing, target, complete=not processor_only)
    return str(target)


def _is_processor_file(rel: str) -> bool:
    return "/" not in rel and not rel.endswith(WEIGHT_SUFFIXES)


@contextmanager
def _locked(lock_path: Path):
    """An exclusive lock between the processes of this node (released when the holder exits, even by a crash)."""
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached_matches(target: Path, uri: str, listing: dict[str, tuple[int, int]]) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    files = marker.get("files", {})
    if marker.get("source") != uri or set(files) != set(listing):
        return False
    for rel, (size, mtime) in listing.items():
        entry = files[rel]
        if entry["size"] != size or entry["mtime_ns"] != mtime:
            return False
        local = target / rel
        if not local.is_file() or local.stat().st_size != size:
            return False
    return True


def download_files(uri: str, listing: dict[str, tuple[int, int]], dest: Path) -> dict[str, str]:
    """Copy the listed files under `uri` ({relative path: (size, mtime_ns)}, as `list_files` gives) into `dest`;
    returns each file's SHA-256. A file whose size differs from its listing raises CheckpointDownloadError."""
    fs, inner = filesystem(uri)
    hashes = {}
    for rel, (size, _) in sorted(listing.items()):
        target = Path(dest) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, got = hashlib.sha256(), 0
        with fs.open_input_stream(f"{inner.rstrip('/')}/{rel}") as src, open(target, "wb") as out:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                got += len(chunk)
        if got != size:
            raise CheckpointDownloadError(f"{uri.rstrip('/')}/{rel}: downloaded {got} bytes, the listing says {size}")
        hashes[rel] = digest.hexdigest()
    return hashes


def _download(uri: str, listing: dict[str, tuple[int, int]], target: Path, complete: bool = True) -> None:
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        hashes = download_files(uri, listing, partial)
        expected = _read_checksums(partial / CHECKSUM_FILE) if CHECKSUM_FILE in listing else {}
        for rel, want in expected.items():
            if rel not in hashes:
                if not complete:  # processor files only: the weights it lists are not fetched here
                    continue
                raise CheckpointDownloadError(f"{uri}/{CHECKSUM_FILE} lists {rel}, which is not in the checkpoint")
            if hashes[rel] != want:
                raise CheckpointDownloadError(f"{uri}/{rel}: sha256 {hashes[rel]}, {CHECKSUM_FILE} says {want}")
        marker = {"source": uri, "verified": "sha256" if expected else "size",
                  "files": {rel: {"size": s, "mtime_ns": m, "sha256": hashes[rel]} for rel, (s, m) in listing.items()}}
        (partial / MARKER).write_text(json.dumps(marker, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    total = sum(s for s, _ in listing.values())
    with open(target.parent / "downloads.log", "a") as log:  # one line per download: what operators (and tests) count
        log.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "source": uri, "kind": target.name,
                              "files": len(listing),
                              "bytes": total, "seconds": round(time.perf_counter() - t0, 3)}) + "\n")


def _read_checksums(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, _, rel = line.strip().partition("  ")
            out[rel.lstrip("*")] = digest.lower()
    return out


def write_checksums(directory: str | Path) -> Path:
    """Write `checksums.sha256` (sha256sum format) for every file of a local checkpoint before uploading it."""
    directory = Path(directory)
    lines = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (CHECKSUM_FILE, MARKER)):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        lines.append(f"{digest.hexdigest()}  {path.relative_to(directory).as_posix()}")
    out = directory / CHECKSUM_FILE
    out.write_text("\n".join(lines) + "\n")
    return out
