"""Fetching images named by ``image_uri``, under a policy the user controls.

* ``s3://bucket/key``: through ``otmel.storage`` (the AWS credential chain, ``--s3-endpoint``);
* ``http(s)://``: urllib with a timeout and a size cap; the host is resolved first and refused
  if any of its addresses is private, loopback, link-local, reserved, multicast or unspecified
  (SSRF: a dump must not make the cluster fetch from its own network) unless the policy allows
  private hosts; every redirect hop is checked the same way. The connection resolves the name
  again, so a DNS answer that changes between the check and the connection (rebinding) is not
  covered: clusters that need that guarantee put an egress proxy in front;
* a local path or ``file://`` URI: only when its real path (symlinks resolved) lies inside one
  of the allowed prefixes;
* anything else is refused.

Every failure is an :class:`ImageFetchError` with a one-line reason (the row's ``error``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

log = logging.getLogger(__name__)


class ImageFetchError(ValueError):
    """An image URI that cannot or may not be fetched (one-line reason)."""


@dataclass(frozen=True)
class ImagePolicy:
    allowed_prefixes: tuple[str, ...] = ()  # local directories images may be read from
    allow_http: bool = True
    allow_private_hosts: bool = False  # private/loopback/link-local/... addresses
    timeout_s: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3
    s3_endpoint: str | None = None


def _check_host(host: str | None, policy: ImagePolicy) -> None:
    if not host:
        raise ImageFetchError("refused: the URL has no host")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageFetchError(f"cannot resolve host {host}: {exc}") from None
    if policy.allow_private_hosts:
        return
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        for kind in ("loopback", "private", "link_local", "reserved", "multicast", "unspecified"):
            if getattr(addr, f"is_{kind}"):
                raise ImageFetchError(f"refused: {host} resolves to {addr}, a {kind.replace('_', '-')} address "
                                      "(pass --allow-private-hosts to allow)")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        return None  # redirects are followed by hand, each hop checked


_OPENER = urllib.request.build_opener(_NoRedirect)


def _read_capped(stream, max_bytes: int, what: str) -> bytes:
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageFetchError(f"{what}: larger than the {max_bytes}-byte cap")
    return data


def _fetch_http(uri: str, policy: ImagePolicy) -> bytes:
    if not policy.allow_http:
        raise ImageFetchError("refused: http(s) image URIs are not allowed")
    url = uri
    for _ in range(policy.max_redirects + 1):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            raise ImageFetchError(f"refused: redirect to a {parsed.scheme or 'relative'} URL")
        _check_host(parsed.hostname, policy)
        request = urllib.request.Request(url, headers={"User-Agent": "otmel-link"})
        try:
            with _OPENER.open(request, timeout=policy.timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > policy.max_bytes:
                    raise ImageFetchError(f"HTTP body of {length} bytes exceeds the {policy.max_bytes}-byte cap")
                return _read_capped(resp, policy.max_bytes, "HTTP body")
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303, 307, 308) and exc.headers.get("Location"):
                url = urllib.parse.urljoin(url, exc.headers["Location"])
                continue
            raise ImageFetchError(f"HTTP {exc.code} {exc.reason}") from None
        except ImageFetchError:
            raise
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ImageFetchError(f"fetch failed: {type(exc).__name__}: {reason}") from None
    raise ImageFetchError(f"more than {policy.max_redirects} redirects")


def _fetch_local(path: str, policy: ImagePolicy) -> bytes:
    if not policy.allowed_prefixes:
        raise ImageFetchError("refused: local image paths are not allowed (pass --allow-image-prefix DIR)")
    real = os.path.realpath(path)
    for prefix in policy.allowed_prefixes:
        root = os.path.realpath(prefix)
        if os.path.commonpath([real, root]) == root:
            break
    else:
        raise ImageFetchError(f"refused: {path} is outside the allowed image prefixes")
    try:
        if os.path.getsize(real) > policy.max_bytes:
            raise ImageFetchError(f"{path}: larger than the {policy.max_bytes}-byte cap")
        with open(real, "rb") as f:
            return _read_capped(f, policy.max_bytes, path)
    except OSError as exc:
        raise ImageFetchError(f"cannot read {path}: {exc.strerror or exc}") from None


def fetch_image(uri: str, policy: ImagePolicy) -> bytes:
    """The bytes of the image at ``uri`` under ``policy``; :class:`ImageFetchError` otherwise."""
    try:
        uri = str(uri).strip()
        scheme = urllib.parse.urlsplit(uri).scheme.lower()
        if scheme in ("s3", "s3a"):
            from otmel.storage import StorageError, read_bytes

            try:
                data = read_bytes(uri, policy.s3_endpoint)
            except (FileNotFoundError, StorageError) as exc:
                raise ImageFetchError(f"cannot read {uri}: {exc}") from None
            if len(data) > policy.max_bytes:
                raise ImageFetchError(f"{uri}: larger than the {policy.max_bytes}-byte cap")
            return data
        if scheme in ("http", "https"):
            return _fetch_http(uri, policy)
        if scheme == "file":
            return _fetch_local(urllib.parse.unquote(urllib.parse.urlsplit(uri).path), policy)
        if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
            return _fetch_local(uri, policy)
        raise ImageFetchError(f"refused: unsupported image URI scheme {scheme!r}")
    except ImageFetchError:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract: one error type, one line, per row
        raise ImageFetchError(f"fetch failed: {type(exc).__name__}: {exc}") from None
