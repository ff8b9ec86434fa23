"""Reading and writing run files on any storage Ray Train supports: local disk, NFS, s3://, gs://, abfs://.

Local paths go through the ordinary file API (appends are real appends, writes go to a temporary
name and are renamed into place); URIs go through pyarrow's filesystems, where an object is written
whole, so an append re-uploads the object.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def is_remote(path: str) -> bool:
    return "://" in str(path)


def local_run_dir(run_dir: str) -> Path:
    """Where the driver keeps a run's local files: the run directory itself, or ./runs/<name> for a
    run on object storage."""
    return Path(run_dir) if not is_remote(run_dir) else Path("runs").resolve() / run_dir.rstrip("/").rsplit("/", 1)[-1]


# The object stores phi3v-ray reads and writes, each through pyarrow's own filesystem (as Ray Train opens
# storage_path and Ray Data reads the data): scheme → (pyarrow module that holds it, its name, a URI's form).
SCHEMES = {
    "s3": ("pyarrow._s3fs", "S3", "s3://BUCKET/prefix"),
    "gs": ("pyarrow._gcsfs", "GCS", "gs://BUCKET/prefix"),
    "gcs": ("pyarrow._gcsfs", "GCS", "gs://BUCKET/prefix"),
    "abfs": ("pyarrow._azurefs", "Azure", "abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/prefix"),
    "abfss": ("pyarrow._azurefs", "Azure", "abfss://CONTAINER@ACCOUNT.dfs.core.windows.net/prefix"),
}
# Schemes other tools use for the same stores; pyarrow (and so Ray) does not know them.
_OTHER_NAMES = {"s3a": "s3", "s3n": "s3", "az": "abfs", "adl": "abfs", "wasb": "abfs", "wasbs": "abfs"}
_PYARROW_OTHERS = ("file", "hdfs", "viewfs")  # pyarrow opens these too; no cloud, nothing to check


class StorageUnsupported(ValueError):
    """A URI this Python cannot open at all: an unknown scheme, a malformed URI, or a pyarrow built without
    that store's filesystem. Found before any request is made; names the URI and the fix."""


def unsupported(path: str) -> str | None:
    """Why `path` (a URI) cannot be opened here, or None; looks at nothing but the URI and the installed pyarrow."""
    import importlib

    import pyarrow

    scheme = str(path).split("://", 1)[0].lower()
    if scheme in _OTHER_NAMES:
        form = SCHEMES[_OTHER_NAMES[scheme]][2]
        return f"{path}: {scheme}:// is another tool's name for this store; write it as {form}"
    if scheme in _PYARROW_OTHERS:
        return None
    if scheme not in SCHEMES:
        return (f"{path}: unknown storage scheme {scheme}://; use a local or NFS path, or one of "
                f"{', '.join(f'{s}://' for s in SCHEMES)}")
    module, name, _ = SCHEMES[scheme]
    try:
        importlib.import_module(module)
    except ImportError:
        return (f"{path}: this pyarrow ({pyarrow.__version__}) was built without its {name} filesystem, which "
                f"phi3v-ray, Ray Train and Ray Data all open {scheme}:// URIs with; install the PyPI wheel, which has "
                f"it: pip install --force-reinstall 'pyarrow>=17' (see cluster/README.md, 'Which package each "
                f"scheme needs')")
    return None


def _filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a URI; StorageUnsupported naming the URI when it cannot be opened."""
    import pyarrow
    import pyarrow.fs

    why = unsupported(path)
    if why:
        raise StorageUnsupported(why)
    scheme = str(path).split("://", 1)[0].lower()
    form = f"; write it as {SCHEMES[scheme][2]}" if scheme in SCHEMES else ""
    try:
        return pyarrow.fs.FileSystem.from_uri(path)
    except ImportError as err:  # a module missing on the Python side only
        raise StorageUnsupported(unsupported(path) or f"{path}: {err}") from err
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError) as err:  # malformed URI, or built without it
        if "compiled without" in str(err) or "not built with" in str(err):
            raise StorageUnsupported(f"{path}: this pyarrow ({pyarrow.__version__}) cannot open it ({err}); "
                                     f"pip install --force-reinstall 'pyarrow>=17' (see cluster/README.md)") from err
        raise StorageUnsupported(f"{path}: {err}{form}") from err


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
        names = [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory]
        # joined to the URI as given: an abfs:// URI's account is not part of the path inside the filesystem
        return [join(run_dir, n) for n in sorted(names, reverse=True) if n.startswith("checkpoint_")]
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


# ---------------------------------------------------------------------------------------------
# reading inputs (data, images, weights) from any filesystem
#
# Credentials are never part of a path or a config: pyarrow takes them from the environment
# (AWS_ACCESS_KEY_ID/…, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, AZURE_*), the instance profile
# or the pod's service account. AWS_ENDPOINT_URL points s3:// at an S3-compatible server.

# Words in the errors of pyarrow's S3, GCS and Azure filesystems that mean "you may not".
_DENIED_MARKS = ("ACCESS_DENIED", "AccessDenied", "Access Denied", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId",
                 "SIGNATURE_DOES_NOT_MATCH", "PERMISSION_DENIED", "PermissionDenied", "AuthorizationPermissionMismatch",
                 "AuthorizationFailure", "Forbidden", "HTTP status 403")


class StorageAccessDenied(PermissionError):
    """The credentials this process has may not read (or write) a path; names the path and what to check."""

    def __init__(self, path: str, detail: str = ""):
        self.path = str(path)
        hint = ("grant this node's identity read access (IAM instance profile / workload identity / managed "
                "identity; see cluster/README.md)" if is_remote(path) else "check the file's permissions")
        super().__init__(f"access denied to {path}: {hint}" + (f" ({detail.strip()})" if detail else ""))

    def __reduce__(self):  # keep the message when Ray pickles the error across processes
        return _rebuild_denied, (self.path, "")


def _rebuild_denied(path: str, detail: str) -> StorageAccessDenied:
    return StorageAccessDenied(path, detail)


def is_access_denied(err: BaseException) -> bool:
    return isinstance(err, PermissionError) or any(mark in str(err) for mark in _DENIED_MARKS)


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a URI or a local path."""
    import pyarrow.fs

    if is_remote(path):
        return _filesystem(path)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """`base/part/...` for local paths and URIs alike (URIs keep their scheme and bucket)."""
    if not is_remote(base):
        return str(Path(base, *parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


@contextlib.contextmanager
def _named_denial(path: str):
    """A filesystem call on `path`: a refusal of the credentials becomes StorageAccessDenied naming it."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as err:
        if is_access_denied(err):
            raise StorageAccessDenied(path, str(err)) from None
        raise


def _info(path: str):
    fs, inner = filesystem(path)
    with _named_denial(path):
        return fs.get_file_info(inner)


def is_file(path: str) -> bool:
    if not is_remote(path):
        return Path(path).is_file()
    import pyarrow.fs

    return _info(path).type == pyarrow.fs.FileType.File


def is_dir(path: str) -> bool:
    """A directory, or on object storage a prefix with at least one object under it."""
    if not is_remote(path):
        return Path(path).is_dir()
    import pyarrow.fs

    return _info(path).type == pyarrow.fs.FileType.Directory


def read_bytes(path: str, fs=None, inner: str | None = None) -> bytes:
    """The whole file; FileNotFoundError if missing, StorageAccessDenied if the credentials may not read it.

    Pass `fs` and `inner` (from `filesystem`) when reading many files: resolving a URI costs a request.
    """
    if fs is None:
        fs, inner = filesystem(path)
    with _named_denial(path), fs.open_input_stream(inner) as f:
        return f.read()


def open_text(path: str):
    """A text stream (UTF-8) over a local file or an object."""
    import io

    if not is_remote(path):
        return open(path, encoding="utf-8")
    fs, inner = filesystem(path)
    with _named_denial(path):
        return io.TextIOWrapper(fs.open_input_stream(inner), encoding="utf-8")


def list_files(directory: str) -> dict[str, tuple[int, int]]:
    """Every file under `directory`, recursively: {relative posix path: (size, mtime_ns)}; {} if missing."""
    import pyarrow.fs

    fs, inner = filesystem(directory)
    with _named_denial(directory):
        infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True, allow_not_found=True))
    prefix = inner.rstrip("/") + "/"
    out = {}
    for info in infos:
        if info.type == pyarrow.fs.FileType.File and info.path.startswith(prefix):
            mtime = info.mtime_ns if info.mtime_ns is not None else 0
            out[info.path[len(prefix):]] = (int(info.size or 0), int(mtime))
    return out


def list_names(directory: str) -> list[str]:
    """Names of the files directly in `directory`, sorted; [] if it does not exist."""
    return sorted(rel for rel in list_files(directory) if "/" not in rel)


def upload_dir(local_dir: str | Path, target: str) -> int:
    """Copy every file under a local directory to `target` (any filesystem); returns the file count.

    Each object appears only when its upload completes. Used to publish converted data and
    checkpoints to a bucket (tests, `convert --out s3://...`).
    """
    import pyarrow.fs

    fs, inner = filesystem(target)
    n = 0
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            rel = path.relative_to(local_dir).as_posix()
            dest = f"{inner.rstrip('/')}/{rel}"
            if not is_remote(target):
                fs.create_dir(os.path.dirname(dest), recursive=True)
            pyarrow.fs.copy_files(str(path), dest, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)
            n += 1
    return n
