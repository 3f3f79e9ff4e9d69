"""The one storage layer: every step names its inputs and outputs as URIs and moves files through here.

A location is either a local path (one machine: ``work/models/sft``) or a URI that every pod of a
cluster can reach (``s3://bucket/prefix``; ``gs://``, ``hdfs://`` where pyarrow supports them). On a
cluster no two pods share a disk, so nothing is handed between processes as a local path: a step
downloads its inputs with :func:`local_copy`, writes its outputs to a local scratch directory and
publishes them with :func:`upload` (or :func:`write_text`).

Built on ``pyarrow.fs`` (the filesystem layer Ray Train already uses for its checkpoint storage, so
checkpoints and artefacts take the same credentials and endpoint). S3 credentials come from the
usual AWS chain (IRSA web identity on EKS, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``);
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` points it at an S3-compatible endpoint (MinIO, moto's
server in tests), the same variables boto3 and MLflow honour.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from troupe.config import ConfigError


class StorageError(ConfigError):
    """A location that cannot be read or written; the message names the URI and why.

    ``reason`` is one of ``missing`` (no such object/prefix), ``credentials`` (access denied or no
    credentials), ``unreachable`` (endpoint down) or ``error``.
    """

    def __init__(self, message: str, *, uri: str = "", reason: str = "error"):
        super().__init__(message)
        self.uri, self.reason = uri, reason


def is_remote(location: str | Path) -> bool:
    """True for ``scheme://`` URIs other than ``file://`` (local paths and ``file://`` are local)."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


def join(location: str | Path, *parts: str) -> str:
    """``location`` joined with ``parts`` using ``/`` (URIs) or the OS separator (paths)."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location, *parts))


def s3_endpoint() -> str | None:
    """The S3 endpoint override from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(location: str | Path) -> tuple[Any, str]:
    """(``pyarrow.fs.FileSystem``, path inside it) for ``location``.

    S3 gets ``endpoint_override`` from :func:`s3_endpoint` and the region from ``AWS_DEFAULT_REGION``;
    other schemes go through ``pyarrow.fs.FileSystem.from_uri``.

    Raises:
        StorageError: a scheme pyarrow does not support.
    """
    import pyarrow.fs as pafs

    s = str(location)
    if not is_remote(s):
        return pafs.LocalFileSystem(), str(Path(s.removeprefix("file://")).resolve())
    if s.startswith("s3://"):
        endpoint = s3_endpoint()
        kw: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kw.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
        return pafs.S3FileSystem(**{k: v for k, v in kw.items() if v}), s[len("s3://") :].rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(s)
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError
        raise StorageError(f"{s}: unsupported storage URI ({e})", uri=s) from e
    return fs, path


def _classify(uri: str, e: Exception) -> StorageError:
    text = str(e)
    low = text.lower()
    if isinstance(e, FileNotFoundError) or "nosuchbucket" in low or "not found" in low or "404" in low:
        reason, why = "missing", "no such object or bucket"
    elif "accessdenied" in low or "403" in low or "credentials" in low or "signature" in low:
        reason, why = "credentials", "access denied or no credentials (IRSA role / AWS_* variables)"
    elif "connect" in low or "resolve" in low or "timed out" in low or "curl" in low:
        reason, why = "unreachable", "endpoint unreachable"
    else:
        reason, why = "error", "cannot be read"
    return StorageError(f"{uri}: {why} ({text.strip()[:300]})", uri=uri, reason=reason)


def info(location: str | Path) -> str:
    """``"file"``, ``"dir"`` or ``"missing"`` for ``location``.

    Raises:
        StorageError: credentials or endpoint problems (not a missing object).
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    try:
        t = fs.get_file_info(path).type
    except Exception as e:
        raise _classify(str(location), e) from e
    if t == pafs.FileType.File:
        return "file"
    if t == pafs.FileType.Directory:
        return "dir"
    return "missing"


def exists(location: str | Path) -> bool:
    """True when ``location`` is an existing file or directory (prefix with objects on S3)."""
    return info(location) != "missing"


def check_readable(location: str | Path, what: str, *, kind: str = "any") -> None:
    """Fail fast, before any compute, when ``location`` cannot be read.

    Args:
        location: path or URI.
        what: the setting that named it, e.g. ``paths.base_model``; put in the message.
        kind: ``file``, ``dir`` or ``any``.

    Raises:
        StorageError: missing (``reason='missing'``), wrong kind, no credentials, endpoint down; the
            message names ``what``, the location and the reason.
    """
    try:
        t = info(location)
    except StorageError as e:
        raise StorageError(f"{what}: {e}", uri=str(location), reason=e.reason) from e
    if t == "missing":
        raise StorageError(
            f"{what}: {location}: no such file or directory", uri=str(location), reason="missing"
        )
    if kind != "any" and t != kind:
        raise StorageError(
            f"{what}: {location}: is a {t}, expected a {kind}", uri=str(location), reason="error"
        )


def check_root(location: str | Path, what: str) -> None:
    """Fail fast when the bucket a remote output will be written under does not exist (local: no check).

    Raises:
        StorageError: naming ``what``, the location and why (missing bucket, credentials, endpoint).
    """
    s = str(location)
    if not is_remote(s):
        return
    scheme, _, rest = s.partition("://")
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    try:
        t = info(bucket)
    except StorageError as e:
        raise StorageError(f"{what}: {e}", uri=s, reason=e.reason) from e
    if t == "missing":
        raise StorageError(f"{what}: {s}: bucket {bucket} does not exist", uri=s, reason="missing")


def scratch_root() -> Path:
    """This process's node-local scratch directory: ``$TROUPE_SCRATCH`` or ``<tmp>/troupe-scratch``."""
    root = Path(os.environ.get("TROUPE_SCRATCH") or Path(tempfile.gettempdir()) / "troupe-scratch")
    root.mkdir(parents=True, exist_ok=True)
    return root


def download(location: str | Path, dest: str | Path) -> Path:
    """Copy a file or a directory tree from ``location`` to the local ``dest`` (created); returns ``dest``.

    Raises:
        StorageError: ``location`` is missing or unreadable.
    """
    import pyarrow.fs as pafs

    dest = Path(dest)
    kind = info(location)
    if kind == "missing":
        raise StorageError(f"{location}: no such file or directory", uri=str(location), reason="missing")
    fs, path = filesystem(location)
    (dest.parent if kind == "file" else dest).mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except Exception as e:
        raise _classify(str(location), e) from e
    return dest


def local_copy(location: str | Path, *, what: str = "input") -> Path:
    """A local path holding ``location``: the path itself when local, else a download to scratch.

    Remote inputs are cached per URI under :func:`scratch_root` ``/inputs/<sha1 of URI>`` (a file
    URI gives a file, a prefix a directory); a second call on the same node reuses the copy (inputs
    are immutable per run identity).

    Raises:
        StorageError: naming ``what`` and the location when it is missing or unreadable.
    """
    if not is_remote(location):
        p = Path(str(location).removeprefix("file://"))
        if not p.exists():
            raise StorageError(f"{what}: {p}: no such file or directory", uri=str(p), reason="missing")
        return p
    dest = scratch_root() / "inputs" / hashlib.sha1(str(location).encode()).hexdigest()[:16]
    if dest.exists():
        return dest
    check_readable(location, what)
    # several ranks of one node may ask at once: each downloads into its own temp dir, the first
    # rename wins, the others drop their copy (a half-written copy is never visible as ``dest``)
    tmp = Path(tempfile.mkdtemp(prefix=".part-", dir=_mkdir(dest.parent)))
    try:
        download(location, tmp / "x")
        os.rename(tmp / "x", dest)
    except OSError:
        if not dest.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def clear_downloads() -> None:
    """Remove this node's cached input downloads (:func:`local_copy`), e.g. before handing work to
    other processes that must fetch their inputs themselves."""
    shutil.rmtree(scratch_root() / "inputs", ignore_errors=True)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def upload(local: str | Path, location: str | Path) -> str:
    """Copy the local file or directory tree ``local`` to ``location`` (replacing files of the same name).

    A local ``location`` gets a plain copy (nothing when it is ``local`` itself). Returns ``location``.

    Raises:
        StorageError: the destination cannot be written.
    """
    import pyarrow.fs as pafs

    src = Path(local)
    if not is_remote(location):
        dst = Path(str(location).removeprefix("file://"))
        if dst.resolve() == src.resolve():
            return str(location)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        return str(location)
    fs, path = filesystem(location)
    try:
        if src.is_dir():
            fs.create_dir(path, recursive=True)
        pafs.copy_files(
            str(src.resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
        )
    except Exception as e:
        raise _classify(str(location), e) from e
    return str(location)


@contextmanager
def output_dir(location: str | Path) -> Iterator[Path]:
    """A local directory to write a step's output into, published to ``location`` on success.

    Local ``location``: the directory itself (created). Remote: a fresh node-scratch directory,
    uploaded to ``location`` when the block exits without an exception and then removed.
    """
    if not is_remote(location):
        p = Path(str(location).removeprefix("file://"))
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    tmp = Path(tempfile.mkdtemp(prefix="out-", dir=_mkdir(scratch_root() / "outputs")))
    try:
        yield tmp
        upload(tmp, location)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_bytes(location: str | Path) -> bytes:
    """The bytes of the file at ``location`` (StorageError when missing or unreadable)."""
    if not is_remote(location):
        p = Path(str(location).removeprefix("file://"))
        if not p.is_file():
            raise StorageError(f"{p}: no such file", uri=str(p), reason="missing")
        return p.read_bytes()
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except Exception as e:
        raise _classify(str(location), e) from e


def read_text(location: str | Path) -> str:
    """The UTF-8 text of the file at ``location`` (StorageError when missing or unreadable)."""
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | Path, data: bytes) -> str:
    """Write ``data`` to the file at ``location``, creating parents; returns ``location``.

    Never a half-written file: locally a temporary file in the same directory is synced and renamed
    over the target (mode 0644); on S3 the object is one PUT, visible only when complete.
    """
    if not is_remote(location):
        p = Path(str(location).removeprefix("file://"))
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; other users' processes read these files too
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(location)
    fs, path = filesystem(location)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except Exception as e:
        raise _classify(str(location), e) from e
    return str(location)


def write_text(location: str | Path, text: str) -> str:
    """Write ``text`` (UTF-8) to the file at ``location`` (:func:`write_bytes`); returns ``location``."""
    return write_bytes(location, text.encode("utf-8"))


def list_files(location: str | Path) -> list[str]:
    """Paths of all files under the directory ``location``, relative to it, sorted (``[]`` if missing)."""
    if info(location) != "dir":
        return []
    return files_under(*filesystem(location))


def files_under(fs: Any, path: str) -> list[str]:
    """Paths of all files under ``path`` in the ``pyarrow.fs`` filesystem ``fs``, relative to it, sorted."""
    import pyarrow.fs as pafs

    base = path.rstrip("/") + "/"
    sel = pafs.FileSelector(path, recursive=True)
    return sorted(i.path[len(base) :] for i in fs.get_file_info(sel) if i.type == pafs.FileType.File)
