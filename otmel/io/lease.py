"""One writer per output directory: a lease object created only if absent.

A job that writes an output directory (``otmel link``) first creates ``OUTPUT/_otmel.lease``
with create-if-absent semantics (a local file opened with ``O_CREAT | O_EXCL``; on S3 a
conditional PUT, ``If-None-Match: *``, which fails with 412 when the object exists). The
lease names its job (id, host, pid, command start) and carries a heartbeat time that a
thread renews every :data:`HEARTBEAT_S` seconds. A second job finds the lease and is refused
in one line naming the first. A lease whose job is gone is taken over, with a log line: at
once when the job ran on this host and its process is gone (a SIGKILLed driver, the common
case: the same command run again), else once its heartbeat is older than :data:`STALE_S`
(its node was lost; SIGKILL and lost nodes run no clean-up). The
holder alone cleans the directory's staging; the lease goes when the job ends, whatever
ended it (a SIGKILLed job's lease goes stale).

Stores without conditional writes: S3-compatible stores that ignore ``If-None-Match`` would
let two creates both succeed; the lease reads itself back after creating it and refuses the
job if another job's record is there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from otmel.io.storage import StorageError, delete_file, is_remote, join, read_bytes, write_bytes

log = logging.getLogger(__name__)

LEASE_FILE = "_otmel.lease"
#: how often the holder renews its heartbeat
HEARTBEAT_S = 30.0
#: a lease whose heartbeat is older than this belongs to a job that is gone: taken over
STALE_S = 300.0


class OutputBusy(StorageError):
    """Another live job holds the output's lease (one line: which job, since when)."""


def _create_exclusive(uri: str, data: bytes, s3_endpoint: str | None) -> bool:
    """Create ``uri`` holding ``data`` only if it does not exist; False if it does."""
    if not is_remote(uri):
        from otmel.io.storage import resolve

        _, path = resolve(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    import boto3
    from botocore.exceptions import ClientError
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client = boto3.client("s3", endpoint_url=endpoint,
                          region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    try:
        client.put_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"), Body=data, IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or \
                exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
            return False
        raise StorageError(f"{uri}: could not create the output's lease: {exc}") from None
    return True


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone, or no psutil: unknown
        return None


def _gone(held: dict) -> bool:
    """Whether a lease's job ran on this host and its process is no longer there (its pid
    free, or taken by a process started at another time)."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    started = _process_start(held["pid"])
    return started is None or (held.get("pid_started") is not None and abs(started - held["pid_started"]) > 1)


class OutputLease:
    """The lease of one job on ``output`` (see the module's docstring). Use as a context
    manager: taken on entry (or :class:`OutputBusy`), renewed while the job runs, released
    on exit."""

    def __init__(self, output: str, s3_endpoint: str | None = None, command: str = "otmel link",
                 heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.uri = join(output, LEASE_FILE)
        self.s3_endpoint = s3_endpoint
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.record = {"job": uuid.uuid4().hex, "command": command, "host": socket.gethostname(), "pid": os.getpid(),
                       "pid_started": _process_start(os.getpid()), "started": time.time(), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # set when the heartbeat found another job's record in place of ours

    # ------------------------------------------------------------------ take, renew, release
    def __enter__(self) -> "OutputLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _read(self) -> dict | None:
        try:
            return json.loads(read_bytes(self.uri, self.s3_endpoint))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):  # a torn or foreign file: treated as stale
            return {}

    def acquire(self) -> None:
        data = json.dumps(self.record).encode()
        if not _create_exclusive(self.uri, data, self.s3_endpoint):
            held = self._read()
            if held is not None:  # (None: released between the two calls: create it again below)
                age = time.time() - float(held.get("heartbeat", 0) or 0)
                if age <= self.stale_s and not _gone(held):
                    raise OutputBusy(
                        f"{self.uri.rsplit('/', 1)[0]}: another job is writing this output ({held.get('command', '?')} "
                        f"job {str(held.get('job', '?'))[:12]} on {held.get('host', '?')}, pid {held.get('pid', '?')}, "
                        f"heartbeat {age:.0f} s ago): wait for it to end, or give another --output; a lease whose "
                        f"heartbeat is older than {self.stale_s:.0f} s is taken over")
                log.warning("taking over the stale lease of %s (job %s on %s, pid %s, last heartbeat %.0f s ago%s)",
                            self.uri, str(held.get("job", "?"))[:12], held.get("host", "?"), held.get("pid", "?"), age,
                            ": its process is gone" if _gone(held) else "")
                delete_file(self.uri, self.s3_endpoint)
            if not _create_exclusive(self.uri, data, self.s3_endpoint):  # another job took it first
                held = self._read() or {}
                raise OutputBusy(f"{self.uri.rsplit('/', 1)[0]}: another job took this output's lease first (job "
                                 f"{str(held.get('job', '?'))[:12]} on {held.get('host', '?')})")
        if (self._read() or {}).get("job") != self.record["job"]:  # a store without conditional writes
            raise OutputBusy(f"{self.uri.rsplit('/', 1)[0]}: another job wrote this output's lease at the same time")
        self._thread = threading.Thread(target=self._renew, name="otmel-output-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self._read() or {}).get("job") != self.record["job"]:
                    self.lost = True
                    log.error("%s: the lease is no longer this job's (taken over as stale?): another job may write "
                              "this output", self.uri)
                    return
                self.record["heartbeat"] = time.time()
                write_bytes(self.uri, json.dumps(self.record).encode(), self.s3_endpoint)
            except Exception as exc:  # noqa: BLE001 - the next beat tries again; stale only after STALE_S
                log.warning("%s: could not renew the lease: %s", self.uri, str(exc).splitlines()[0] if str(exc) else exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if (self._read() or {}).get("job") == self.record["job"]:
                delete_file(self.uri, self.s3_endpoint)
        except Exception as exc:  # noqa: BLE001 - a lease left behind goes stale
            log.warning("%s: could not remove the lease (it goes stale in %.0f s): %s", self.uri, self.stale_s, exc)
