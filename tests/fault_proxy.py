"""A fault-injecting HTTP proxy for the S3 test endpoint: what a throttled or flaky object
store does to a job, applied from outside the system.

The proxy sits between otmel (boto3/pyarrow speaking S3 over HTTP) and the moto server. For
each request it draws (seeded) whether to answer 503 SlowDown, 500 InternalError, reset the
connection without an answer, or delay the answer, and otherwise forwards the request
unchanged. ``rules`` pick the requests faults apply to (method, path prefix) and ``always``
turns a rule into a permanent failure. ``stall_writes_after`` makes a store that hangs: once
a write to a path containing it has gone through, every later write waits, unanswered, until
:meth:`Faults.end_stall`; the writes held are then dropped (a reset connection), as a store
or a network that stopped for a while does, and later ones go through again. ``hold_reads_of``
makes a slow object: every GET of a path containing it waits until :meth:`Faults.release_reads`,
then goes through unchanged (a test orders what a job sees: one file's rows arrive only when it
says). The tests own it; nothing in otmel knows it exists.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WRITES = ("PUT", "POST", "DELETE")
SLOW_DOWN = (503, "SlowDown", "Please reduce your request rate.")
INTERNAL = (500, "InternalError", "We encountered an internal error. Please try again.")
#: a grant revoked in mid-job: not a fault the SDK retries
FORBIDDEN = (403, "AccessDenied", "Access Denied")


@dataclass
class Faults:
    """Which requests fail and how. ``rate``: share of matching requests given a fault
    (drawn from ``kinds``); ``methods``/``path_contains`` select the requests; ``always``:
    every matching request fails with the first kind (a permanent outage)."""

    rate: float = 0.0
    kinds: tuple[str, ...] = ("slowdown", "internal", "reset", "delay")
    methods: tuple[str, ...] = ("GET", "HEAD", "PUT", "POST", "DELETE")
    path_contains: str = ""
    always: bool = False
    delay_s: float = 0.3
    stall_writes_after: str = ""
    hold_reads_of: str = ""
    seed: int = 0
    injected: dict = field(default_factory=dict)
    forwarded: int = 0

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self.stalled = threading.Event()  # set: writes wait (stall_writes_after went through)
        self._stall_over = threading.Event()
        self.holding = threading.Event()  # set: a GET of hold_reads_of is waiting
        self._reads_released = threading.Event()

    def end_stall(self) -> None:
        """The writes waiting in the stall are dropped; later ones go through."""
        self._stall_over.set()

    def release_reads(self) -> None:
        """The GETs of ``hold_reads_of`` waiting, and later ones, go through."""
        self._reads_released.set()

    def wait_if_held(self, method: str, path: str) -> None:
        if not self.hold_reads_of or method != "GET" or self.hold_reads_of not in path:
            return
        self.holding.set()
        self._reads_released.wait()

    def wait_if_stalled(self, method: str) -> bool:
        """True if this request was held in the stall (and must now be dropped)."""
        if method not in WRITES or not self.stalled.is_set() or self._stall_over.is_set():
            return False
        with self._lock:
            self.injected["stalled"] = self.injected.get("stalled", 0) + 1
        self._stall_over.wait()
        return True

    def went_through(self, method: str, path: str) -> None:
        """Called for every request forwarded with success: the stall starts once an object
        whose path contains ``stall_writes_after`` is written whole (a PUT that is not one part
        of a multipart upload, or the POST that completes one)."""
        if not self.stall_writes_after or self.stall_writes_after not in path:
            return
        if (method == "PUT" and "partNumber=" not in path) or (method == "POST" and "uploadId=" in path):
            self.stalled.set()

    def draw(self, method: str, path: str) -> str | None:
        if method not in self.methods or self.path_contains not in path:
            return None
        with self._lock:
            if self.always:
                kind = self.kinds[0]
            elif self._rng.random() < self.rate:
                kind = self._rng.choice(self.kinds)
            else:
                return None
            self.injected[kind] = self.injected.get(kind, 0) + 1
            return kind


class FaultProxy:
    def __init__(self, upstream: str, faults: Faults | None = None):
        host, port = upstream.split("://", 1)[1].rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.faults = faults or Faults()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                proxy.faults.wait_if_held(self.command, self.path)
                kind = "reset" if proxy.faults.wait_if_stalled(self.command) else proxy.faults.draw(self.command, self.path)
                if kind == "reset":
                    # RST, no answer: what a dropped connection looks like to the client
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if kind in ("slowdown", "internal", "forbidden"):
                    status, code, message = {"slowdown": SLOW_DOWN, "internal": INTERNAL, "forbidden": FORBIDDEN}[kind]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>{message}</Message><RequestId>fault</RequestId></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                if kind == "delay":
                    time.sleep(proxy.faults.delay_s)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                with proxy.faults._lock:
                    proxy.faults.forwarded += 1
                if resp.status < 300:
                    proxy.faults.went_through(self.command, self.path)
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                        self.send_header(k, v)
                # a HEAD answer has no body but tells the object's size
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.faults.end_stall()
        self.faults.release_reads()
        self.server.shutdown()
        self.server.server_close()
