"""image_uri fetching: SSRF checks, caps, timeouts and redirects against a local HTTP server,
local files only under allowed prefixes, s3 through the test endpoint."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from conftest import png_bytes
from otmel.linking.image_fetch import ImageFetchError, ImagePolicy, fetch_image

PNG = png_bytes(3)
BIG = b"x" * 5000
CAP = 4000  # between len(PNG) and len(BIG)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hosts: list[str] = []

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_length: bool = True) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if content_length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        if not content_length:
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802
        type(self).hosts.append(self.headers.get("Host", ""))
        path = self.path
        if path == "/img.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif path == "/big":
            self._send(200, BIG)
        elif path == "/big-no-length":  # no Content-Length: the cap must hold while reading
            self._send(200, BIG, content_length=False)
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, PNG)
        elif path.startswith("/hops/"):  # /hops/N redirects N times, then to the image
            n = int(path.rsplit("/", 1)[1])
            self._send(302, headers={"Location": f"/hops/{n - 1}" if n > 1 else "/img.png"})
        elif path == "/to-ftp":
            self._send(302, headers={"Location": "ftp://127.0.0.1/x.png"})
        else:
            self._send(404, b"not here")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


OPEN = ImagePolicy(allow_private_hosts=True, timeout_s=0.5, max_bytes=CAP)


# ---------------------------------------------------------------------------- http(s)
def test_loopback_is_refused_by_default_with_a_clear_message(server):
    with pytest.raises(ImageFetchError, match=r"^refused: 127\.0\.0\.1 is a loopback address "
                                              r"\(pass --allow-private-hosts\)$"):
        fetch_image(f"{server}/img.png", ImagePolicy())
    port = server.rsplit(":", 1)[1]
    with pytest.raises(ImageFetchError, match="refused: localhost resolves to .* a loopback address"):
        fetch_image(f"http://localhost:{port}/img.png", ImagePolicy())


@pytest.mark.parametrize("url, kind", [
    ("http://10.1.2.3/a.png", "private"),
    ("http://192.168.0.1/a.png", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://0.0.0.0/a.png", "unspecified"),
    ("http://224.0.0.1/a.png", "multicast"),
    ("http://100.64.0.1/a.png", "non-public"),
    ("http://[::1]/a.png", "loopback"),
    ("http://[::ffff:127.0.0.1]/a.png", "loopback"),  # IPv4-mapped IPv6
    ("http://2130706433/a.png", "loopback"),  # 127.0.0.1 as a decimal integer
])
def test_non_public_addresses_are_refused_before_connecting(url, kind):
    with pytest.raises(ImageFetchError, match=f"a {kind} address"):
        fetch_image(url, ImagePolicy(timeout_s=0.2))


def test_allowed_private_host_fetches_the_exact_bytes(server):
    assert fetch_image(f"{server}/img.png", OPEN) == PNG
    with pytest.raises(ImageFetchError, match="http\\(s\\) image URIs are not allowed"):
        fetch_image(f"{server}/img.png", ImagePolicy(allow_http=False, allow_private_hosts=True))


def test_the_connection_goes_to_the_checked_address_not_a_second_dns_answer(server, monkeypatch):
    """DNS rebinding: the name is resolved once; a second lookup would fail here."""
    real = socket.getaddrinfo
    lookups = []

    def fake(host, *args, **kwargs):
        if host == "images.example.test":
            lookups.append(host)
            if len(lookups) > 1:
                raise socket.gaierror(socket.EAI_NONAME, "second lookup")
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    _Handler.hosts.clear()
    port = server.rsplit(":", 1)[1]
    assert fetch_image(f"http://images.example.test:{port}/img.png", OPEN) == PNG
    assert lookups == ["images.example.test"]
    assert _Handler.hosts == [f"images.example.test:{port}"]  # the Host header keeps the name


def _self_signed(name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a self-signed certificate for ``name``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_https_is_pinned_and_verifies_the_certificate_against_the_name(tmp_path, monkeypatch):
    import ssl

    cert, key = _self_signed("images.example.test")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    srv.socket = server_tls.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host in ("images.example.test", "other.example.test"):
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    try:
        # the test certificate is not trusted by default
        with pytest.raises(ImageFetchError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch_image(f"https://images.example.test:{port}/img.png", OPEN)
        default_context = ssl.create_default_context

        def trusting(*args, **kwargs):
            ctx = default_context(*args, **kwargs)
            ctx.load_verify_locations(cadata=cert.decode())
            return ctx

        monkeypatch.setattr(ssl, "create_default_context", trusting)
        assert fetch_image(f"https://images.example.test:{port}/img.png", OPEN) == PNG
        # connected to the same address, but the certificate is checked against the URL's name
        with pytest.raises(ImageFetchError, match="CERTIFICATE_VERIFY_FAILED|match"):
            fetch_image(f"https://other.example.test:{port}/img.png", OPEN)
    finally:
        srv.shutdown()
        srv.server_close()


def test_http_status_errors_mention_the_status(server):
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        fetch_image(f"{server}/missing.png", OPEN)


def test_size_cap_with_and_without_content_length(server):
    assert len(PNG) <= CAP < len(BIG)
    with pytest.raises(ImageFetchError, match=f"{CAP}-byte cap"):
        fetch_image(f"{server}/big", OPEN)
    with pytest.raises(ImageFetchError, match=f"{CAP}-byte cap"):
        fetch_image(f"{server}/big-no-length", OPEN)
    assert fetch_image(f"{server}/big-no-length", ImagePolicy(allow_private_hosts=True, max_bytes=len(BIG))) == BIG


def test_a_slow_server_times_out(server):
    t0 = time.perf_counter()
    with pytest.raises(ImageFetchError, match="timed out after 0.5 s"):
        fetch_image(f"{server}/slow", OPEN)
    assert time.perf_counter() - t0 < 1.2  # gave up at the timeout, not when the body came


def test_redirects_are_followed_and_counted(server):
    assert fetch_image(f"{server}/hops/1", OPEN) == PNG
    assert fetch_image(f"{server}/hops/3", OPEN) == PNG  # max_redirects=3 by default
    with pytest.raises(ImageFetchError, match="more than 3 redirects"):
        fetch_image(f"{server}/hops/4", OPEN)
    with pytest.raises(ImageFetchError, match="more than 0 redirects"):
        fetch_image(f"{server}/hops/1", ImagePolicy(allow_private_hosts=True, max_redirects=0))
    with pytest.raises(ImageFetchError, match="redirect to a non-http"):
        fetch_image(f"{server}/to-ftp", OPEN)


def test_every_redirect_hop_is_checked(server, monkeypatch):
    """A first hop that passes the check but redirects to a loopback address is refused."""
    import otmel.linking.image_fetch as image_fetch

    checked = []
    original = image_fetch._non_public_kind

    def first_hop_public(addr):
        checked.append(str(addr))
        return None if len(checked) == 1 else original(addr)

    monkeypatch.setattr(image_fetch, "_non_public_kind", first_hop_public)
    with pytest.raises(ImageFetchError, match=r"refused: 127\.0\.0\.1 is a loopback address"):
        fetch_image(f"{server}/hops/1", ImagePolicy())
    assert checked == ["127.0.0.1", "127.0.0.1"]


# ---------------------------------------------------------------------------- local files
def test_local_paths_only_under_an_allowed_prefix(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(b"secret")
    (tmp_path / "allowed-not.png").write_bytes(b"sibling with a shared name prefix")
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    (allowed / "dirlink").symlink_to(tmp_path)
    policy = ImagePolicy(allowed_prefixes=(str(allowed),))
    assert fetch_image(str(allowed / "sub" / "a.png"), policy) == PNG
    assert fetch_image(f"file://{allowed / 'sub' / 'a.png'}", policy) == PNG
    assert fetch_image(str(allowed / "sub" / ".." / "sub" / "a.png"), policy) == PNG
    assert fetch_image(str(allowed / "sub" / "a.png"), ImagePolicy(allowed_prefixes=(f"file://{allowed}",))) == PNG
    for bad in (tmp_path / "secret.png", allowed / ".." / "secret.png", allowed / "link.png",
                allowed / "dirlink" / "secret.png", tmp_path / "allowed-not.png"):
        with pytest.raises(ImageFetchError, match="outside the allowed image prefixes"):
            fetch_image(str(bad), policy)
    with pytest.raises(ImageFetchError, match="outside the allowed image prefixes"):
        fetch_image(f"file://{allowed}/../secret.png", policy)
    with pytest.raises(ImageFetchError, match="no such file"):
        fetch_image(str(allowed / "missing.png"), policy)
    with pytest.raises(ImageFetchError, match="not a regular file"):
        fetch_image(str(allowed / "sub"), policy)


def test_local_paths_are_refused_without_allowed_prefixes_and_capped(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "big.bin").write_bytes(BIG)
    for uri in (str(tmp_path / "a.png"), f"file://{tmp_path / 'a.png'}"):
        with pytest.raises(ImageFetchError, match="local image paths are not allowed"):
            fetch_image(uri, ImagePolicy())
    with pytest.raises(ImageFetchError, match=f"{CAP}-byte cap"):
        fetch_image(str(tmp_path / "big.bin"), ImagePolicy(allowed_prefixes=(str(tmp_path),), max_bytes=CAP))


@pytest.mark.parametrize("uri", ["ftp://x/y", "data:image/png;base64,iVBORw0KGgo=", "gopher://x/y",
                                 "file://otherhost/etc/passwd"])
def test_other_schemes_are_refused(uri):
    with pytest.raises(ImageFetchError, match="refused"):
        fetch_image(uri, ImagePolicy(allowed_prefixes=("/",), allow_private_hosts=True))


def test_only_image_fetch_errors_escape():
    for uri in ("http://[::1", "http://127.0.0.1:99999/x", "s3:///no-bucket", None):
        with pytest.raises(ImageFetchError) as info:
            fetch_image(uri, ImagePolicy(allow_private_hosts=True, timeout_s=0.2))
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- s3
def test_s3_images_through_the_test_endpoint(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").put_object(
        Bucket="otmel-test", Key="images/a.png", Body=PNG)
    policy = ImagePolicy(s3_endpoint=s3_server)
    assert fetch_image("s3://otmel-test/images/a.png", policy) == PNG
    with pytest.raises(ImageFetchError, match="no such key"):
        fetch_image("s3://otmel-test/images/nope.png", policy)
    with pytest.raises(ImageFetchError, match="10-byte cap"):
        fetch_image("s3://otmel-test/images/a.png", ImagePolicy(s3_endpoint=s3_server, max_bytes=10))
