"""Reading and writing run files on any storage Ray Train supports: local disk, NFS, s3://, gs://, abfs://.

Local paths go through the ordinary file API (appends are real appends, writes go to a temporary
name and are renamed into place); URIs go through pyarrow's filesystems, where an object is written
whole, so an append re-uploads the object.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def is_remote(path: str) -> bool:
    return "://" in str(path)


def local_run_dir(run_dir: str) -> Path:
    """Where the driver keeps a run's local files: the run directory itself, or ./runs/<name> for a
    run on object storage."""
    return Path(run_dir) if not is_remote(run_dir) else Path("runs").resolve() / run_dir.rstrip("/").rsplit("/", 1)[-1]


def _filesystem(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)  # (filesystem, path inside it)


def write_text(path: str, text: str) -> None:
    """Replace the file with `text`; a reader never sees a half-written file."""
    if is_remote(path):
        fs, inner = _filesystem(path)
        fs.create_dir(os.path.dirname(inner), recursive=True)
        with fs.open_output_stream(inner) as f:  # an object appears only when the upload completes
            f.write(text.encode())
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    if is_remote(path):
        fs, inner = _filesystem(path)
        try:
            with fs.open_input_stream(inner) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def delete_file(path: str) -> None:
    """Remove the file if it exists."""
    if is_remote(path):
        fs, inner = _filesystem(path)
        try:
            fs.delete_file(inner)
        except FileNotFoundError:
            pass
        return
    Path(path).unlink(missing_ok=True)


def append_text(path: str, text: str) -> None:
    """Add `text` at the end of the file (created if missing)."""
    if is_remote(path):
        fs, inner = _filesystem(path)
        try:
            with fs.open_input_stream(inner) as f:
                text = f.read().decode() + text
        except (FileNotFoundError, OSError):
            pass
        write_text(path, text)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as f:
        f.write(text)


def list_checkpoints(run_dir: str) -> list[str]:
    """The run's `checkpoint_*` directories, newest first (Ray names them by UTC time, so names sort by age)."""
    if is_remote(run_dir):
        import pyarrow.fs

        fs, inner = _filesystem(run_dir)
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
        except (FileNotFoundError, OSError):
            return []
        scheme = run_dir.split("://", 1)[0]
        names = [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory]
        return [f"{scheme}://{inner.rstrip('/')}/{n}" for n in sorted(names, reverse=True) if n.startswith("checkpoint_")]
    root = Path(run_dir)
    if not root.is_dir():
        return []
    return [str(p) for p in sorted(root.glob("checkpoint_*"), key=lambda p: p.name, reverse=True) if p.is_dir()]


def checkpoint_at(path: str):
    """A `ray.train.Checkpoint` for a directory on any storage (`as_directory()` downloads a remote one)."""
    import ray.train

    if is_remote(path):
        fs, inner = _filesystem(path)
        return ray.train.Checkpoint(inner, filesystem=fs)
    return ray.train.Checkpoint(path)
