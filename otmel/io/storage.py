"""URIs everywhere: a local path, ``file://`` or ``s3://bucket/key``, through ``pyarrow.fs``.

Credentials come from the standard AWS chain only. ``--s3-endpoint`` (or the
``AWS_ENDPOINT_URL`` environment variable) points at any S3-compatible store; an
``http://`` endpoint turns TLS off (local test servers). Connection and request timeouts
are bounded and retries limited, so an unreachable endpoint fails with a clear error
instead of hanging.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0
#: attempts per S3 call (throttling, 5xx, reset connections): exponential backoff from 25 ms,
#: ~6 s in all before a call is given up. The SDK's "standard" strategy was not used: its
#: retry quota runs dry under sustained throttling and then fails calls on the first error.
S3_RETRIES = 8
#: attempts of a whole download: the SDK retries a request, not a response body that breaks
#: off half-way (a reset connection mid-object), so reads are retried whole on top of it
TRANSFER_ATTEMPTS = 3


class StorageError(OSError):
    """A storage location that cannot be reached, read or written (one clear line)."""


def is_remote(uri: str) -> bool:
    return urlparse(str(uri)).scheme in ("s3", "s3a")


def s3_filesystem(endpoint: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem for ``endpoint`` (default: AWS_ENDPOINT_URL, else AWS itself)."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = dict(
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=S3_RETRIES),
        region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// URI or s3:// URI."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise ValueError(f"{uri}: an s3 URI needs a bucket (s3://bucket/key)")
        return s3_filesystem(s3_endpoint), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(f"{uri}: unsupported URI scheme {parsed.scheme!r} (use a path, file:// or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


#: how pyarrow's S3 layer words a failure of the store or the network (after its retries):
#: such an OSError is worth retrying; any other one met while decoding a file's bytes (a
#: damaged page header, corrupt compressed data) is a problem of the file's content
STORAGE_ERROR_MARKERS = ("AWS Error", "curlCode", "Connection reset", "Connection refused", "timed out")


def is_storage_error(exc: BaseException) -> bool:
    """An error of the storage or the network (retry), not of the bytes read."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and any(m in str(exc) for m in STORAGE_ERROR_MARKERS)


def retry_delay(attempt: int) -> float:
    """Seconds to wait before re-running a broken-off transfer (attempt 0, 1, ...)."""
    return 0.2 * 4 ** attempt


def _whole_retry(fn, remote: bool):
    """``fn()``, re-run from the start when a remote transfer breaks off (not when the
    object does not exist), with a short backoff."""
    import time

    for attempt in range(TRANSFER_ATTEMPTS if remote else 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if attempt + 1 >= (TRANSFER_ATTEMPTS if remote else 1) or "not found" in str(exc).lower():
                raise
            log.warning("transfer failed (%s), retrying it whole", str(exc).splitlines()[0] if str(exc) else exc)
            time.sleep(retry_delay(attempt))


def _wrap(uri: str, exc: Exception) -> StorageError:
    return StorageError(f"{uri}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def storage_failure(exc: BaseException) -> OSError | None:
    """The storage error (after the filesystem's own retries) behind an exception raised by a
    distributed job, if there is one. Ray wraps a task's or actor's exception (``.cause``)
    and Ray Data wraps that again, but a chained ``__cause__`` does not survive the trip from
    the worker: then the error is read from the worker's formatted traceback in the message."""
    import re

    seen, todo, texts = set(), [exc], []
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and not type(e).__module__.startswith("ray"):
            return e
        texts.append(str(e))
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    for text in texts:
        # the class's qualified name as the worker's traceback prints it (from the class: it moves with the module)
        found = re.findall(rf"^\s*{re.escape(StorageError.__module__)}\.StorageError: (.+)$", text, flags=re.M)
        if found:
            return StorageError(found[-1].strip())
    return None


def exists(uri: str, s3_endpoint: str | None = None) -> bool:
    fs, path = resolve(uri, s3_endpoint)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise _wrap(uri, exc) from exc


def read_bytes(uri: str, s3_endpoint: str | None = None) -> bytes:
    fs, path = resolve(uri, s3_endpoint)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return _whole_retry(read, is_remote(uri))
    except FileNotFoundError:
        raise
    except OSError as exc:
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            raise FileNotFoundError(f"{uri}: no such file") from exc
        raise _wrap(uri, exc) from exc


def sha256_of(uri: str, s3_endpoint: str | None = None, chunk: int = 1 << 22) -> str:
    """sha256 of a file anywhere (local or s3://), streamed: what storage really holds."""
    fs, path = resolve(uri, s3_endpoint)
    h = hashlib.sha256()
    try:
        with fs.open_input_stream(path) as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as exc:
        raise StorageError(f"{uri}: {exc}") from exc
    return h.hexdigest()


def write_bytes(uri: str, data: bytes, s3_endpoint: str | None = None) -> None:
    """Write a whole object; local files are written to a temp name and renamed."""
    fs, path = resolve(uri, s3_endpoint)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as exc:
        raise _wrap(uri, exc) from exc


def write_parquet(uri: str, table: pa.Table, s3_endpoint: str | None = None, **options) -> None:
    """Write ``table`` as one whole Parquet object (:func:`write_bytes`; ``options`` go to
    ``pyarrow.parquet.write_table``)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    write_bytes(uri, sink.getvalue().to_pybytes(), s3_endpoint)


def read_parquet(uri: str, s3_endpoint: str | None = None, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    fs, path = resolve(uri, s3_endpoint)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise _wrap(uri, exc) from exc
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file")
    try:
        return _whole_retry(lambda: pq.read_table(path, filesystem=fs, columns=columns), is_remote(uri))
    except OSError as exc:
        raise _wrap(uri, exc) from exc


def upload_dir(local_dir: str | Path, uri: str, s3_endpoint: str | None = None) -> None:
    """Copy a local directory tree to ``uri`` (a local path or s3://)."""
    fs, path = resolve(uri, s3_endpoint)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            shutil.copytree(local_dir, path, dirs_exist_ok=True)
        else:
            pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as exc:
        raise _wrap(uri, exc) from exc


def file_sizes(uri: str, s3_endpoint: str | None = None) -> dict[str, int]:
    """Name -> size in bytes of the files directly in a directory (an S3 prefix); {} if absent."""
    fs, path = resolve(uri, s3_endpoint)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise _wrap(uri, exc) from exc
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


def probe_writable(dir_uri: str, s3_endpoint: str | None = None, what: str = "output") -> None:
    """Write and remove a small object in ``dir_uri`` (creating a local directory): a job checks
    its output this way before any work, not after every row was encoded. Raises StorageError
    in one line."""
    import uuid

    probe = join(dir_uri, f"_otmel-write-probe-{uuid.uuid4().hex[:12]}")
    try:
        write_bytes(probe, b"", s3_endpoint)
        delete_file(probe, s3_endpoint)
    except (StorageError, OSError) as exc:
        raise StorageError(f"{what} {dir_uri} is not writable: {exc}") from None


def delete_file(uri: str, s3_endpoint: str | None = None) -> None:
    """Remove one file; absent is fine."""
    fs, path = resolve(uri, s3_endpoint)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass  # nothing to delete
    except OSError as exc:
        if "not found" not in str(exc).lower() and "does not exist" not in str(exc).lower():
            raise _wrap(uri, exc) from exc


def delete_dir(uri: str, s3_endpoint: str | None = None) -> None:
    """Remove a directory tree (an S3 prefix); absent is fine."""
    fs, path = resolve(uri, s3_endpoint)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass  # nothing to delete
    except OSError as exc:
        raise _wrap(uri, exc) from exc


def download_dir(uri: str, dest: str | Path, s3_endpoint: str | None = None, exclude: tuple[str, ...] = ()) -> Path:
    """Copy a remote (or local) directory tree into ``dest`` (one copy, no staging); files
    whose path relative to ``uri`` is in ``exclude`` are not copied."""
    fs, path = resolve(uri, s3_endpoint)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        info = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        if not info:
            raise FileNotFoundError(f"{uri}: no such directory (or it is empty)")
        local = pafs.LocalFileSystem()
        if not exclude:
            _whole_retry(lambda: pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=local),
                         is_remote(uri))
            return dest
        root = path.rstrip("/") + "/"
        for f in info:
            rel = f.path[len(root):] if f.path.startswith(root) else f.base_name
            if f.type == pafs.FileType.File and rel not in exclude:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                _whole_retry(lambda src=f.path, dst=str(dest / rel): pafs.copy_files(
                    src, dst, source_filesystem=fs, destination_filesystem=local), is_remote(uri))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _wrap(uri, exc) from exc
    return dest


#: this process's scratch dirs not yet removed (:func:`remove_scratch_dirs`)
_SCRATCH_DIRS: list[Path] = []


def scratch_dir(prefix: str, key: str | None = None) -> Path:
    """A local temp directory removed when the process exits normally (atexit: model and
    shard copies of long-lived Ray actors) or by :func:`remove_scratch_dirs`, which the jobs
    call in their actors before ``ray.kill`` (which skips atexit; otmel.jobs.common.end_actors).

    ``key`` names it ``PREFIX + KEY`` instead of a random name, emptied first: an actor passes
    its Ray actor id, which a restarted actor keeps, so a restart on the same node replaces
    the copy its killed predecessor (no atexit) left, instead of adding one."""
    if key is None:
        d = Path(tempfile.mkdtemp(prefix=prefix))
    else:
        d = Path(tempfile.gettempdir()) / f"{prefix}{key}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(mode=0o700)
    _SCRATCH_DIRS.append(d)
    return d


def remove_scratch_dirs() -> int:
    """Remove this process's scratch dirs now (an actor about to be killed); how many."""
    n = 0
    while _SCRATCH_DIRS:
        shutil.rmtree(_SCRATCH_DIRS.pop(), ignore_errors=True)
        n += 1
    return n


atexit.register(remove_scratch_dirs)  # at a normal exit, whatever is left


def actor_scratch_key() -> str | None:
    """The current Ray actor's id (kept across its restarts), or None outside an actor."""
    try:
        import ray

        return ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    except Exception:  # not in a Ray worker
        return None


@contextmanager
def local_copy(uri: str, s3_endpoint: str | None = None) -> Iterator[Path]:
    """A local directory holding ``uri``'s tree: the directory itself if local, else a temp copy."""
    fs, path = resolve(uri, s3_endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        if not Path(path).exists():
            raise FileNotFoundError(f"{uri}: no such directory")
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="otmel-") as tmp:
        try:
            info = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise _wrap(uri, exc) from exc
        if not info:
            raise FileNotFoundError(f"{uri}: no such directory (or it is empty)")
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)
