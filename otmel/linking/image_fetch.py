"""Fetching the images named by ``image_uri``, under a policy the user controls.

* ``s3://bucket/key`` (or ``s3a://``): through :func:`otmel.io.storage.read_bytes` (the AWS
  credential chain, ``--s3-endpoint``);
* ``http(s)://``: ``urllib.request`` with a timeout and a size cap. The host is resolved once
  and refused if ANY of its addresses is not public (private, loopback, link-local, reserved,
  multicast, unspecified or otherwise not global; an IPv4 address embedded in an IPv6 one is
  checked too) unless the policy allows private hosts: a dump must not make the cluster fetch
  from its own network (SSRF). The connection then goes to the addresses that were checked, not
  to a second DNS answer, so a name that re-resolves elsewhere (DNS rebinding) cannot slip
  through; TLS still verifies the certificate against the host NAME. Because of that pinning,
  ``HTTP(S)_PROXY`` environment variables are not used. Redirects are followed by hand, each
  hop's host checked the same way, at most ``max_redirects`` of them;
* a local path or ``file://`` URI: only when its real path (symlinks and '..' resolved) lies
  inside the real path of one of the allowed prefixes, and only regular files;
* anything else (``ftp:``, ``data:``, ...) is refused.

Every failure is an :class:`ImageFetchError` with a one-line reason (it becomes the row's
``error``); nothing else escapes :func:`fetch_image`.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import logging
import os
import socket
import ssl
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

_READ_CHUNK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
#: address properties that make a host non-public, most specific first (in Python's ipaddress,
#: 127.0.0.1, 169.254.0.0/16 and 0.0.0.0 are also "private")
_NON_PUBLIC = ("loopback", "link_local", "unspecified", "multicast", "private", "reserved")

_Address = tuple[int, str]  # (address family, IP string as returned by getaddrinfo, with any %scope)


class ImageFetchError(ValueError):
    """An image URI that cannot or may not be fetched; the message is a one-line reason."""


@dataclass(frozen=True)
class ImagePolicy:
    """What :func:`fetch_image` may fetch.

    Attributes
    ----------
    allowed_prefixes
        Local directories (paths or ``file://`` URIs) whose files may be read; empty: no local
        file may be read.
    allow_http
        Whether http(s) URIs are allowed at all.
    allow_private_hosts
        Allow hosts resolving to private/loopback/link-local/reserved/multicast/unspecified
        addresses (refused by default).
    timeout_s
        Socket timeout for connecting and for each read, and the deadline of a whole request.
    max_bytes
        Larger images are refused.
    max_redirects
        How many HTTP redirects may be followed.
    s3_endpoint
        S3-compatible endpoint for ``s3://`` URIs (None: AWS_ENDPOINT_URL, else AWS).
    """

    allowed_prefixes: tuple[str, ...] = ()
    allow_http: bool = True
    allow_private_hosts: bool = False
    timeout_s: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3
    s3_endpoint: str | None = None


def _one_line(message: object, limit: int = 300) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _too_big(max_bytes: int) -> ImageFetchError:
    return ImageFetchError(f"larger than the {max_bytes}-byte cap")


# ---------------------------------------------------------------------------- host checks
def _non_public_kind(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``addr`` is not a public address (e.g. 'loopback'), or None if it is public."""
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 address itself
            candidates = [addr.ipv4_mapped]
        else:  # IPv4 addresses carried inside 6to4/Teredo ones are checked first
            embedded = [addr.sixtofour, *(addr.teredo or ())]
            candidates = [a for a in embedded if a is not None] + candidates
    for candidate in candidates:
        for kind in _NON_PUBLIC:
            if getattr(candidate, f"is_{kind}"):
                return kind.replace("_", "-")
        if not candidate.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT)
            return "non-public"
    return None


def _resolve_checked(host: str, port: int, policy: ImagePolicy) -> list[_Address]:
    """The addresses of ``host``; all must be public unless the policy allows private hosts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageFetchError(f"cannot resolve host {host}: {exc}") from None
    addresses: list[_Address] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = str(sockaddr[0])
        if not policy.allow_private_hosts:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
            kind = _non_public_kind(addr)
            if kind is not None:
                what = f"{host} is" if host == str(addr) else f"{host} resolves to {addr},"
                raise ImageFetchError(f"refused: {what} a {kind} address (pass --allow-private-hosts)")
        if (family, ip) not in addresses:
            addresses.append((family, ip))
    if not addresses:
        raise ImageFetchError(f"cannot resolve host {host}: no IPv4/IPv6 address")
    return addresses


# ---------------------------------------------------------------------------- pinned connections
def _connect_pinned(addresses: list[_Address], port: int, timeout: Any, source_address: Any) -> socket.socket:
    """A TCP connection to the first reachable checked address (no second DNS lookup: the
    addresses are numeric, so ``create_connection`` resolves nothing)."""
    error: OSError | None = None
    for _, ip in addresses:
        try:
            return socket.create_connection((ip, port), timeout, source_address)
        except OSError as exc:
            error = exc
    assert error is not None  # addresses is never empty
    raise error


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to pre-checked addresses; the Host header keeps the name."""

    def __init__(self, host: str, *, addresses: list[_Address], **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self._addresses = addresses

    def connect(self) -> None:
        self.sock = _connect_pinned(self._addresses, self.port, self.timeout, self.source_address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to pre-checked addresses; SNI and certificate check use the name."""

    def __init__(self, host: str, *, addresses: list[_Address], **kwargs: Any) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, context=self._tls, **kwargs)
        self._addresses = addresses

    def connect(self) -> None:
        sock = _connect_pinned(self._addresses, self.port, self.timeout, self.source_address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, addresses: list[_Address]) -> None:
        super().__init__()
        self._addresses = addresses

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_PinnedHTTPConnection, addresses=self._addresses), req)


class _PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, addresses: list[_Address]) -> None:
        super().__init__()
        self._addresses = addresses

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_PinnedHTTPSConnection, addresses=self._addresses), req)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turns redirects into HTTPError: they are followed by hand, each hop's host checked."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def _opener(addresses: list[_Address]) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect(),
                                       _PinnedHTTPHandler(addresses), _PinnedHTTPSHandler(addresses))


# ---------------------------------------------------------------------------- http(s)
def _read_body(resp: http.client.HTTPResponse, policy: ImagePolicy, deadline: float) -> bytes:
    length = resp.headers.get("Content-Length", "").strip()
    if length.isdigit() and int(length) > policy.max_bytes:
        raise ImageFetchError(f"HTTP body of {length} bytes is larger than the {policy.max_bytes}-byte cap")
    chunks: list[bytes] = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise ImageFetchError(f"timed out after {policy.timeout_s:g} s reading the body")
        chunk = resp.read1(min(_READ_CHUNK, policy.max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > policy.max_bytes:
            raise _too_big(policy.max_bytes)


def _fetch_http(uri: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_http:
        raise ImageFetchError("refused: http(s) image URIs are not allowed")
    url = uri
    for hop in range(policy.max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        where = f" (after {hop} redirect{'s' if hop > 1 else ''}, at {url})" if hop else ""
        if parts.scheme not in ("http", "https"):
            raise ImageFetchError(f"refused: redirect to a non-http(s) URL {url}")
        if parts.username is not None or parts.password is not None:
            raise ImageFetchError(f"refused: credentials in the URL{where}")
        if not parts.hostname:
            raise ImageFetchError(f"refused: the URL has no host{where}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = _resolve_checked(parts.hostname, port, policy)
        deadline = time.monotonic() + policy.timeout_s
        request = urllib.request.Request(url, headers={"User-Agent": "otmel-image-fetch"})
        try:
            with _opener(addresses).open(request, timeout=policy.timeout_s) as resp:
                return _read_body(resp, policy, deadline)
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location") if exc.headers else None
            exc.close()
            if exc.code in _REDIRECTS and location:
                url = urllib.parse.urljoin(url, location)
                continue
            raise ImageFetchError(f"HTTP {exc.code} {exc.reason}{where}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise ImageFetchError(f"timed out after {policy.timeout_s:g} s connecting{where}") from None
            raise ImageFetchError(f"cannot connect: {exc.reason}{where}") from None
        except TimeoutError:
            raise ImageFetchError(f"timed out after {policy.timeout_s:g} s{where}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ImageFetchError(f"fetch failed: {type(exc).__name__}: {exc}{where}") from None
    raise ImageFetchError(f"refused: more than {policy.max_redirects} redirects")


# ---------------------------------------------------------------------------- local files
def _prefix_path(prefix: str) -> str:
    if prefix.startswith("file:"):
        return urllib.parse.unquote(urllib.parse.urlsplit(prefix).path)
    return prefix


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


def _read_capped(f: BinaryIO, max_bytes: int) -> bytes:
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_big(max_bytes)
    return data


def _fetch_local(path: str, policy: ImagePolicy) -> bytes:
    roots = [os.path.realpath(_prefix_path(p)) for p in policy.allowed_prefixes if p]
    if not roots:
        raise ImageFetchError("refused: local image paths are not allowed (pass --allow-image-prefix DIR)")
    real = os.path.realpath(path)
    if not any(_inside(real, root) for root in roots):
        raise ImageFetchError(f"refused: {path} is outside the allowed image prefixes")
    # O_NOFOLLOW: the checked real path must not have become a symlink since; O_NONBLOCK: a FIFO
    # does not block the open (it is refused below as not a regular file)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise ImageFetchError(f"cannot read {path}: no such file") from None
    except OSError as exc:
        raise ImageFetchError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageFetchError(f"refused: {path} is not a regular file")
        if info.st_size > policy.max_bytes:
            raise _too_big(policy.max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return _read_capped(f, policy.max_bytes)
    except OSError as exc:
        raise ImageFetchError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _file_uri_path(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ImageFetchError(f"refused: file URI on another host {parts.netloc!r}")
    return urllib.parse.unquote(parts.path)


# ---------------------------------------------------------------------------- s3
def _fetch_s3(uri: str, policy: ImagePolicy) -> bytes:
    from otmel.io.storage import StorageError, read_bytes

    try:
        data = read_bytes(uri, policy.s3_endpoint)
    except FileNotFoundError:
        raise ImageFetchError("cannot read the s3 object: no such key") from None
    except StorageError as exc:
        raise ImageFetchError(f"cannot read the s3 object: {exc}") from None
    if len(data) > policy.max_bytes:
        raise _too_big(policy.max_bytes)
    return data


# ---------------------------------------------------------------------------- entry point
def fetch_image(uri: str, policy: ImagePolicy) -> bytes:
    """The bytes of the image at ``uri``, if ``policy`` allows fetching it.

    Parameters
    ----------
    uri
        ``s3://bucket/key``, ``http(s)://...``, a local path or a ``file://`` URI.
    policy
        What may be fetched (see :class:`ImagePolicy` and the module docstring).

    Returns
    -------
    bytes
        The image file's bytes (not decoded).

    Raises
    ------
    ImageFetchError
        For every failure (refused, missing, too large, timed out, HTTP error, ...), with a
        one-line reason; no other exception escapes.
    """
    try:
        uri = str(uri).strip()
        scheme = urllib.parse.urlsplit(uri).scheme.lower()
        if scheme in ("s3", "s3a"):
            return _fetch_s3(uri, policy)
        if scheme in ("http", "https"):
            return _fetch_http(uri, policy)
        if scheme == "file":
            return _fetch_local(_file_uri_path(uri), policy)
        if not scheme or (len(scheme) == 1 and os.name == "nt"):  # a path (C:\... on Windows)
            return _fetch_local(uri, policy)
        raise ImageFetchError(f"refused: unsupported image URI scheme {scheme!r}")
    except ImageFetchError as exc:
        log.debug("image %s: %s", uri, exc)
        raise ImageFetchError(_one_line(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the contract: one error type, one line, per row
        log.debug("image %s: unexpected error", uri, exc_info=True)
        raise ImageFetchError(_one_line(f"fetch failed: {type(exc).__name__}: {exc}")) from None


def fetch_images(images: list, uris: list, policy) -> tuple[list, list[str | None]]:
    """Image bytes per row: the ``image`` cell, else ``image_uri`` fetched under ``policy``
    (the index and link jobs' preprocess step, ``otmel kge features``).

    Returns (bytes or None per row, fetch error or None per row). Rows carry one image (the
    link job's read step has already taken a post's first).
    """
    out, errors = [], []
    fetched: dict[str, tuple[bytes | None, str | None]] = {}  # a post's mentions share its image: fetch once
    for data, uri in zip(images, uris):
        if data is not None and len(data):
            out.append(bytes(data))
            errors.append(None)
        elif uri:
            uri = str(uri)
            if uri not in fetched:
                try:
                    fetched[uri] = (fetch_image(uri, policy), None)
                except ImageFetchError as exc:
                    fetched[uri] = (None, f"bad_image: {uri}: {exc}")
            out.append(fetched[uri][0])
            errors.append(fetched[uri][1])
        else:
            out.append(None)
            errors.append(None)
    return out, errors
